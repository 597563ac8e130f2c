"""Where luod's per-call and per-fd time goes on the hand-off and retrieve
paths, measured on the host (issue 12, goals 4 and 5).

    .venv/bin/python -m bench.hotpath [--repeats N] [--no-profile]
        [--null-preserve] [--only getinfo,singles,...] [--gc freeze|off]

luod runs as the tests run it (testsupport.luod_fake on the fake kernel, as
its own process) and this program is its client (luod.client). Each of
--repeats runs times:

- 300 `org.varlink.service.GetInfo` calls (the round trip luod's own work
  is compared with), 300 `GetStatus` calls;
- hand-off of 1,000 memfds as PreserveFds 4 x 250 into a new session;
- 300 single `PreserveFd` calls into a new session;
- RetrieveFds (copies) of 1,000 memfds: 8 sessions x 125, 100 x 10;
- the raw loop in this process on the same fake kernel (PRESERVE_FD x
  1,000), to say what of luod's time is the kernel's.

Printed per call and per fd: the wall time (median, best), luod's CPU time
(from /proc/PID/task/*/schedstat: median, best) and this client's. On a
shared host the wall time carries the others' load; luod's CPU time far
less, so compare that.

The fake kernel is another process reached by one request per operation:
its PRESERVE_FD costs far more than the real ioctl (54 us/fd in the TCG
guest, a few us on a host). `--null-preserve` makes luod's PRESERVE_FD a
no-op (sessions still come from the fake kernel), so that what is left is
luod's own cost. Then the same workload runs with luod under cProfile and
the top of luod's profile is printed (not with --no-profile).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

GETINFO = "org.varlink.service.GetInfo"
BATCHES = (4, 250)  # PreserveFds calls x fds
SINGLES = 300  # PreserveFd calls
ROUND_TRIPS = 300  # GetInfo, GetStatus calls
RETRIEVE = ((8, 125), (100, 10))  # sessions x fds, one RetrieveFds each
RAW = 1000  # PRESERVE_FD of the raw loop
NULL_PRESERVE = "--hotpath-null-preserve"


# --- luod as the bench starts it ------------------------------------------------


def serve_luod(argv: Sequence[str]) -> int:
    """The luod process: testsupport.luod_fake, optionally with a PRESERVE_FD
    that does nothing (luod's own cost without the fake kernel's)."""
    from testsupport import luod_fake
    from testsupport.fakekernel import FakeBackend

    gc_mode = os.environ.get("HOTPATH_GC", "")
    if gc_mode == "off":
        gc.disable()
    elif gc_mode == "freeze":
        # Everything imported so far (asyncvarlink, structlog, luod) is
        # never looked at by a collection again: what daemon.main() could
        # do once it is ready.
        gc.freeze()
    if NULL_PRESERVE in argv:
        argv = [a for a in argv if a != NULL_PRESERVE]

        def preserve_fd(self: FakeBackend, session_fd: int, fd: int, token: int) -> None:
            return None

        FakeBackend.preserve_fd = preserve_fd  # type: ignore[method-assign]
    return luod_fake.main(argv)


def luod_process(workdir: Path, fake_kernel: str, null: bool, profile: str | None) -> Any:
    from testsupport.luodproc import LuodProcess, fake_backend_args

    class HotpathLuod(LuodProcess):
        @property
        def module(self) -> str:
            return "bench.hotpath"

    args = ["--serve-luod", *fake_backend_args(fake_kernel)]
    if null:
        args.append(NULL_PRESERVE)
    python_args = ["-m", "cProfile", "-o", profile] if profile else []
    return HotpathLuod(workdir, args, ["--grace=1h"], python_args=python_args)


@contextlib.contextmanager
def running(null: bool, profile: str | None = None) -> Iterator[tuple[Any, str]]:
    from testsupport.fakekernel import running_fake_kernel

    with tempfile.TemporaryDirectory(prefix="luod-hotpath-") as d:
        workdir = Path(d)
        with running_fake_kernel(workdir) as fk:
            p = luod_process(workdir, fk, null, profile)
            p.start()
            try:
                yield p, fk
            finally:
                if p.proc is not None and p.proc.poll() is None:
                    p.proc.terminate()  # cProfile writes its file on SIGTERM's exit
                    p.wait_exit(60)


# --- the workload ----------------------------------------------------------------


def memfds(n: int) -> list[int]:
    from testsupport.guest import memfds as make

    return make(n, "hotpath")


def close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        os.close(fd)


def cpu_ns(pid: int) -> int:
    """CPU time process `pid` has run so far, in ns (all its threads)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError), open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            total += int(f.read().split()[0])
    return total


# (wall seconds, luod's CPU seconds, the client's CPU seconds) of one timed
# run: the scheduling noise of a shared host lands on the wall time, far
# less on CPU times.
Timing = tuple[float, float, float]


class Workload:
    def __init__(self, client: Any, pid: int) -> None:
        self.c = client
        self.pid = pid
        self.n = 0

    def timed(self, fn: Callable[[], object]) -> Timing:
        c0 = cpu_ns(self.pid)
        p0 = time.process_time()
        t0 = time.perf_counter()
        fn()
        took = time.perf_counter() - t0
        return took, (cpu_ns(self.pid) - c0) / 1e9, time.process_time() - p0

    def tag(self) -> str:
        self.n += 1
        return str(self.n)

    def getinfo(self) -> Timing:
        c = self.c

        def run() -> None:
            for _ in range(ROUND_TRIPS):
                c.call(GETINFO).close()

        return self.timed(run)

    def getstatus(self) -> Timing:
        c = self.c

        def run() -> None:
            for _ in range(ROUND_TRIPS):
                c.status()

        return self.timed(run)

    def batches(self) -> Timing:
        calls, per = BATCHES
        fds = memfds(calls * per)
        session = "hp-batch-" + self.tag()
        names = [f"f{i}" for i in range(len(fds))]
        c = self.c

        def run() -> None:
            for k in range(calls):
                part = range(k * per, (k + 1) * per)
                c.preserve_fds(session, [(names[i], fds[i]) for i in part], create_session=k == 0)

        return self.handed_off(run, fds, session)

    def singles(self) -> Timing:
        fds = memfds(SINGLES)
        session = "hp-single-" + self.tag()
        c = self.c

        def run() -> None:
            for i, fd in enumerate(fds):
                c.preserve_fd(session, f"f{i}", fd, create_session=i == 0)

        return self.handed_off(run, fds, session)

    def handed_off(self, run: Callable[[], None], fds: list[int], session: str) -> Timing:
        """`run` (a hand-off of `fds` into `session`) timed; then the fds
        closed and the session discarded."""
        try:
            took = self.timed(run)
        finally:
            close_all(fds)
        self.c.discard_session(session)
        return took

    def retrieve(self, sessions: int, files: int) -> Timing:
        c = self.c
        names = [f"hp-ret-{self.tag()}-{s}" for s in range(sessions)]
        for s in names:
            fds = memfds(files)
            try:
                c.preserve_fds(s, [(f"f{i}", fd) for i, fd in enumerate(fds)], create_session=True)
            finally:
                close_all(fds)

        def run() -> None:
            for s in names:
                for _name, fd in c.retrieve_fds(s):
                    os.close(fd)

        took = self.timed(run)
        for s in names:
            c.discard_session(s)
        return took


def raw_preserve(fake_kernel: str) -> float:
    """CREATE_SESSION + PRESERVE_FD x RAW on the fake kernel, in this process."""
    from testsupport.fakekernel import FakeBackend

    be = FakeBackend(fake_kernel)
    fds = memfds(RAW)
    try:
        t0 = time.perf_counter()
        sfd = be.create_session("hp-raw")
        for i, fd in enumerate(fds):
            be.preserve_fd(sfd, fd, i + 1)
        took = time.perf_counter() - t0
        os.close(sfd)
    finally:
        close_all(fds)
    return took


WORKLOADS = ("getinfo", "getstatus", "batches", "singles", "retrieve", "raw")
# luod's start, the warm-up and its exit, nothing timed: the count that is
# subtracted when luod runs under callgrind (bench/RESULTS.md).
NONE = "none"


def measure(
    p: Any, fake_kernel: str, repeats: int, only: Sequence[str] = WORKLOADS
) -> dict[str, list[Timing]]:
    out: dict[str, list[Timing]] = {}

    def add(key: str, value: Timing) -> None:
        out.setdefault(key, []).append(value)

    with p.client() as c:
        w = Workload(c, p.pid)
        # Warm up: every path once (first calls import and cache).
        w.getinfo()
        w.batches()
        w.singles()
        w.retrieve(2, 10)
        for _ in range(repeats):
            if "getinfo" in only:
                add("getinfo", w.getinfo())
            if "getstatus" in only:
                add("getstatus", w.getstatus())
            if "batches" in only:
                add("batches", w.batches())
            if "singles" in only:
                add("singles", w.singles())
            if "retrieve" in only:
                for sessions, files in RETRIEVE:
                    add(f"retrieve{sessions}x{files}", w.retrieve(sessions, files))
            if "raw" in only:
                add("raw", (raw_preserve(fake_kernel), 0.0, 0.0))
    return out


# --- the report --------------------------------------------------------------------


def us(seconds: float) -> str:
    return f"{seconds * 1e6:8.1f} us"


def report(runs: dict[str, list[Timing]], title: str) -> None:
    """Per call or per fd: the wall time (median and best of the runs),
    luod's CPU time (median and best) and this client's (best)."""
    wall = {k: statistics.median(t[0] for t in v) for k, v in runs.items()}
    best = {k: min(t[0] for t in v) for k, v in runs.items()}
    cpu = {k: statistics.median(t[1] for t in v) for k, v in runs.items()}
    cpu_best = {k: min(t[1] for t in v) for k, v in runs.items()}
    client = {k: min(t[2] for t in v) for k, v in runs.items()}
    n_batch = BATCHES[0] * BATCHES[1]
    rows = [
        ("GetInfo", "getinfo", ROUND_TRIPS, "call"),
        ("GetStatus", "getstatus", ROUND_TRIPS, "call"),
        ("PreserveFd x300", "singles", SINGLES, "call"),
        (f"PreserveFds {BATCHES[0]}x{BATCHES[1]}", "batches", n_batch, "fd"),
        ("  per call", "batches", BATCHES[0], "call"),
    ]
    for sessions, files in RETRIEVE:
        rows.append(
            (
                f"RetrieveFds {sessions}x{files}",
                f"retrieve{sessions}x{files}",
                sessions * files,
                "fd",
            )
        )
        rows.append(("  per call", f"retrieve{sessions}x{files}", sessions, "call"))
    print(f"\n== {title} ({max(len(v) for v in runs.values())} runs) ==")
    print(
        f"{'':22} {'wall median':>11} {'wall best':>11} {'luod CPU':>11} {'CPU best':>11} "
        f"{'client CPU':>11}"
    )
    for label, key, n, unit in rows:
        if key not in runs:
            continue
        print(
            f"{label:22} {us(wall[key] / n)} {us(best[key] / n)} {us(cpu[key] / n)} "
            f"{us(cpu_best[key] / n)} {us(client[key] / n)}  per {unit}"
        )
    if "getinfo" not in runs or "singles" not in runs:
        return
    rt, rt_cpu = wall["getinfo"] / ROUND_TRIPS, cpu["getinfo"] / ROUND_TRIPS
    one, one_cpu = wall["singles"] / SINGLES, cpu["singles"] / SINGLES
    print(
        f"PreserveFd / GetInfo: {one / rt:.2f}x wall, {one_cpu / rt_cpu:.2f}x luod CPU "
        f"(luod's CPU beyond GetInfo's: {us(one_cpu - rt_cpu)})"
    )
    if "raw" in wall and "batches" in wall:
        r = wall["raw"] / RAW
        b = wall["batches"] / n_batch
        print(f"raw PRESERVE_FD (fake kernel, in this process) {us(r)} per fd")
        print(f"  PreserveFds / raw: {b / r:.2f}x")


def print_profile(path: str, top: int) -> None:
    st = pstats.Stats(path)
    st.strip_dirs()
    print(f"\n== luod's profile ({path}): top {top} by own time ==")
    st.sort_stats("tottime").print_stats(top)
    print(f"== top {top} by cumulative time ==")
    st.sort_stats("cumulative").print_stats(top)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--serve-luod"]:
        return serve_luod(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m bench.hotpath", description=__doc__)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-profile", action="store_true", help="timings only")
    ap.add_argument(
        "--null-preserve",
        action="store_true",
        help="luod's PRESERVE_FD does nothing: luod's own cost only",
    )
    ap.add_argument("--top", type=int, default=40, help="profile lines shown")
    ap.add_argument("--save-profile", metavar="FILE", help="keep luod's profile (pstats) there")
    ap.add_argument(
        "--gc",
        choices=("default", "freeze", "off"),
        default="default",
        help="luod's garbage collector: as it is, gc.freeze() after imports, or off",
    )
    ap.add_argument(
        "--only",
        default=",".join(WORKLOADS),
        help=f"comma-separated workloads of {','.join(WORKLOADS)} (default: all); "
        f"{NONE}: luod's start, warm-up and exit only (a count under valgrind subtracts it)",
    )
    args = ap.parse_args(argv)
    if args.gc != "default":
        os.environ["HOTPATH_GC"] = args.gc
    asked = [w for w in args.only.split(",") if w]
    if asked == [NONE]:
        with running(bool(args.null_preserve)) as (p, fk):
            measure(p, fk, args.repeats, [])
        print("bench.hotpath: --only none: luod started, warmed up and stopped; nothing timed")
        return 0
    unknown = sorted(set(asked) - set(WORKLOADS))
    if unknown:
        ap.error(
            f"--only: no workload {', '.join(unknown)} "
            f"(workloads: {', '.join(WORKLOADS)}; or {NONE} alone)"
        )
    null = bool(args.null_preserve)
    # The raw loop times the fake kernel's PRESERVE_FD, which --null-preserve takes away.
    only = [w for w in asked if w != "raw" or not null]
    if not only:
        ap.error("--only: nothing to measure (raw is not measured with --null-preserve)")
    what = "luod, PRESERVE_FD a no-op" if null else "luod on the fake kernel"
    with running(null) as (p, fk):
        runs = measure(p, fk, args.repeats, only)
    report(runs, what)
    if not args.no_profile:
        with tempfile.TemporaryDirectory(prefix="luod-hotpath-prof-") as d:
            prof = str(Path(d) / "luod.prof")
            with running(null, prof) as (p, fk):
                measure(p, fk, 1, [w for w in only if w != "raw"])
            print_profile(prof, args.top)
            if args.save_profile:
                shutil.copy(prof, args.save_profile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
