"""Guest side of `make bench` (host side: bench/run.py).

Runs as the stage program of a VM booted by tests/vm/qemu.run_guest on the
real LUO kernel. luod runs as its own process (as in production: the real
kernel, the state-session carrier, info-level logs to a file on tmpfs);
this program is its client and, for the raw baselines, calls the kernel
itself through luod.kernel.backend.KernelBackend in-process.

Stage 1: luod's RSS idle; hand-off of N small memfds, three ways (raw
PRESERVE_FD loop, PreserveFds batches, one PreserveFd per fd), repeated and
interleaved; luod's RSS with many held fds; then it sets up the first
reclaim case (S sessions x F memfds in luod, and the same again as raw
sessions of this process) and live-updates with `luoctl kexec`.
Stage k+1: luod starts and reclaims; the first fd is retrieved (the end of
the blackout, stamped by the host); luod's reclaim duration and start time;
the raw reclaim loop; then the next case, or the end.

Config: LUOD_BENCH_CONFIG (JSON, see DEFAULTS). Results: bench-<stage>.json
in the results share. Host-stamped events: tests/vm/timeline.mark().
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from luod.client import MAX_FDS_PER_MESSAGE, Client, VarlinkError
from luod.kernel.backend import KernelBackend
from luod.protocol import CUSTODY
from tests.vm import guestlib
from tests.vm.timeline import mark

WORK = Path("/run/luod-bench")
FILE_SIZE = 4096
PAGE = b"\xa5" * FILE_SIZE
NOFILE = 65536
READY_TIMEOUT = 120.0

DEFAULTS: dict[str, Any] = {
    "handoff": [100, 1000],  # fds per hand-off run
    "repeats": 3,  # of each hand-off run, interleaved
    "held": 10000,  # fds luod holds for the RSS measurement
    "held_per_session": 1000,
    "reclaim": [10, 100, 100, 100, 100],  # sessions per reclaim case, one kexec each
    # Per case: the raw loop runs before luod starts instead of after it
    # (the first LUO calls after a boot may cost more: who goes first pays).
    "raw_first": [False, False, True, False, True],
    "files_per_session": 10,
    "profile": False,  # luod under cProfile; importtime of luod.daemon
}


def config() -> dict[str, Any]:
    cfg = dict(DEFAULTS)
    cfg.update(json.loads(os.environ.get("LUOD_BENCH_CONFIG", "{}")))
    return cfg


# --- luod as a process -----------------------------------------------------------


class Luod:
    """luod on the real kernel, started like tests/luodproc.LuodProcess
    (READY=1 on a notify socket), optionally under cProfile."""

    def __init__(self, profile: str | None = None) -> None:
        WORK.mkdir(parents=True, exist_ok=True)
        self.socket = str(WORK / "io.luod")
        self.log_path = WORK / f"luod-{guestlib.stage()}.log"
        self.profile = profile
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> float:
        """Start luod; the seconds from spawning it to READY=1."""
        notify_path = str(WORK / f"notify-{guestlib.stage()}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(notify_path)
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        notify.bind(notify_path)
        env = dict(os.environ, NOTIFY_SOCKET=notify_path, PYTHONUNBUFFERED="1")
        prefix: list[str] = []
        if self.profile:
            prefix = ["-m", "cProfile", "-o", str(guestlib.results_dir() / self.profile)]
        argv = [
            sys.executable,
            *prefix,
            "-m",
            "luod.daemon",
            f"--socket={self.socket}",
            "--grace=1h",
        ]
        try:
            t0 = time.monotonic()
            with open(self.log_path, "ab") as logf:
                self.proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, env=env)
            notify.settimeout(0.05)
            while time.monotonic() - t0 < READY_TIMEOUT:
                try:
                    msg = notify.recv(4096).decode()
                except TimeoutError:
                    if self.proc.poll() is not None:
                        raise RuntimeError(
                            f"luod exited with {self.proc.returncode}:\n{self.log()}"
                        ) from None
                    continue
                if "READY=1" in msg.split("\n"):
                    return time.monotonic() - t0
            raise RuntimeError(f"luod not ready in {READY_TIMEOUT}s:\n{self.log()}")
        finally:
            notify.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def client(self) -> Client:
        return Client(self.socket)

    def status(self) -> dict[str, Any]:
        with self.client() as c:
            return c.status()

    def proc_status(self) -> dict[str, int]:
        """VmRSS, RssAnon, RssFile, VmHWM in KiB, and the open fd count."""
        out: dict[str, int] = {}
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                    out[key] = int(value.split()[0])
        out["fds"] = len(os.listdir(f"/proc/{self.pid}/fd"))
        return out

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def keep_log(self) -> None:
        (guestlib.results_dir() / f"luod-stage-{guestlib.stage()}.log").write_text(self.log())


# --- memfds -----------------------------------------------------------------------


def memfds(n: int) -> list[int]:
    """n small memfds of one 4 KiB page each."""
    fds = []
    for _ in range(n):
        fd = os.memfd_create("bench", os.MFD_CLOEXEC)
        os.write(fd, PAGE)
        fds.append(fd)
    return fds


def close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        os.close(fd)


# asyncvarlink 0.3.3 (luod's varlink server) reads a socket 4096 bytes at a
# time and keeps the fds only with a chunk that ends a message: the fds of a
# call whose JSON is longer than that are closed, and luod answers MissingFd.
# probe_batch() finds out whether this luod has that limit.
RECV_CHUNK = 4096


def message_size(session: str, names: Sequence[str], create: bool) -> int:
    """Bytes of the PreserveFds call luod.client sends for these names."""
    params: dict[str, Any] = {
        "session": session,
        "files": [{"name": n, "fileDescriptor": i} for i, n in enumerate(names)],
    }
    if create:
        params["createSession"] = True
    return len(json.dumps({"method": f"{CUSTODY}.PreserveFds", "parameters": params})) + 1


def plan_batches(session: str, names: Sequence[str], limit: int | None) -> list[range]:
    """Split names into PreserveFds calls: at most 253 fds each, and, with a
    byte limit, messages of at most `limit` bytes."""
    out: list[range] = []
    start = 0
    while start < len(names):
        end = min(start + MAX_FDS_PER_MESSAGE, len(names))
        if limit is not None:
            while end - start > 1 and message_size(session, names[start:end], not out) > limit:
                end -= 1
        out.append(range(start, end))
        start = end
    return out


def probe_batch(c: Client) -> dict[str, Any]:
    """One PreserveFds of 253 fds: does a message over RECV_CHUNK bytes work?"""
    names = [f"f{i}" for i in range(MAX_FDS_PER_MESSAGE)]
    fds = memfds(len(names))
    size = message_size("bench-probe", names, True)
    try:
        c.preserve_fds("bench-probe", list(zip(names, fds, strict=True)), create_session=True)
    except VarlinkError as e:
        return {"ok": False, "bytes": size, "error": str(e), "limit": RECV_CHUNK}
    finally:
        close_all(fds)
    c.discard_session("bench-probe")
    return {"ok": True, "bytes": size, "limit": None}


# --- hand-off ---------------------------------------------------------------------


def handoff_raw(be: KernelBackend, n: int, tag: str) -> float:
    """CREATE_SESSION + PRESERVE_FD x n, in this process; then unpreserved."""
    fds = memfds(n)
    try:
        t0 = time.perf_counter()
        sfd = be.create_session(f"bench-raw-{tag}")
        for i, fd in enumerate(fds):
            be.preserve_fd(sfd, fd, i + 1)
        took = time.perf_counter() - t0
        os.close(sfd)  # the last fd of an outgoing session: unpreserves all
    finally:
        close_all(fds)
    return took


def handoff_batches(c: Client, n: int, tag: str, limit: int | None) -> tuple[float, int]:
    """PreserveFds in batches of up to 253 fds (SCM_MAX_FD), or as many as
    fit `limit` bytes, into a new session; (seconds, calls)."""
    fds = memfds(n)
    session = f"bench-batch-{tag}"
    names = [f"f{i}" for i in range(n)]
    plan = plan_batches(session, names, limit)
    try:
        t0 = time.perf_counter()
        for k, part in enumerate(plan):
            c.preserve_fds(session, [(names[i], fds[i]) for i in part], create_session=k == 0)
        took = time.perf_counter() - t0
    finally:
        close_all(fds)
    c.discard_session(session)
    return took, len(plan)


def handoff_per_fd(c: Client, n: int, tag: str) -> float:
    """One PreserveFd call per fd into a new session."""
    fds = memfds(n)
    session = f"bench-perfd-{tag}"
    try:
        t0 = time.perf_counter()
        for i, fd in enumerate(fds):
            c.preserve_fd(session, f"f{i}", fd, create_session=i == 0)
        took = time.perf_counter() - t0
    finally:
        close_all(fds)
    c.discard_session(session)
    return took


def bench_handoff(luod: Luod, cfg: dict[str, Any], limit: int | None) -> dict[str, Any]:
    be = KernelBackend()
    runs: dict[str, Any] = {
        m: {str(n): [] for n in cfg["handoff"]} for m in ("raw", "batches", "per_fd")
    }
    runs["batch_calls"] = {}
    with luod.client() as c:
        for rep in range(cfg["repeats"]):
            for n in cfg["handoff"]:
                # Interleaved, so that a burst of load on the shared host
                # lands on all three alike.
                runs["raw"][str(n)].append(handoff_raw(be, n, f"{n}-{rep}"))
                took, calls = handoff_batches(c, n, f"{n}-{rep}", limit)
                runs["batches"][str(n)].append(took)
                runs["batch_calls"][str(n)] = calls
                runs["per_fd"][str(n)].append(handoff_per_fd(c, n, f"{n}-{rep}"))
                mark(
                    f"handoff-{n}-{rep}",
                    **{m: runs[m][str(n)][-1] for m in ("raw", "batches", "per_fd")},
                )
    return runs


def bench_held(luod: Luod, cfg: dict[str, Any], limit: int | None) -> dict[str, Any]:
    """luod's memory with cfg['held'] fds in custody (PreserveFds batches)."""
    per = cfg["held_per_session"]
    sessions = [f"held-{i}" for i in range((cfg["held"] + per - 1) // per)]
    before = luod.proc_status()
    t0 = time.perf_counter()
    left = cfg["held"]
    calls = 0
    with luod.client() as c:
        for s in sessions:
            names = [f"f{i}" for i in range(min(per, left))]
            left -= len(names)
            for k, part in enumerate(plan_batches(s, names, limit)):
                fds = memfds(len(part))
                calls += 1
                try:
                    c.preserve_fds(
                        s, [(names[i], fd) for i, fd in zip(part, fds, strict=True)], k == 0
                    )
                finally:
                    close_all(fds)
        took = time.perf_counter() - t0
        status = c.status()
        held = luod.proc_status()
        for s in sessions:
            c.discard_session(s)
    after = luod.proc_status()
    mark("held", files=status["files"], rss_kib=held["VmRSS"])
    return {
        "files": status["files"],
        "sessions": len(sessions),
        "handoff_seconds": took,
        "calls": calls,
        "before": before,
        "held": held,
        "released": after,
    }


# --- where a hand-off's time goes: luod's building blocks, in this process ---


def per_call(fn: Any, n: int) -> float:
    """Seconds per call of fn(), over n calls."""
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def bench_breakdown(luod: Luod) -> dict[str, Any]:
    """What luod does per PreserveFd, piece by piece, with luod's own code
    (called here, not changed): the fd check, a log line, the manifest
    written after every call (it holds every file luod holds), and a
    varlink round trip of a call that does next to nothing."""
    from luod import log as luodlog
    from luod.kernel import fdinfo
    from luod.manifest import Manifest, capacity_for, to_json, write_slot
    from luod.model import HeldFile, Owner, Session, SessionKind

    out: dict[str, Any] = {}
    fd = memfds(1)[0]
    try:
        out["inspect_fd"] = per_call(lambda: fdinfo.inspect_fd(fd), 500)
    finally:
        os.close(fd)
    with open(os.devnull, "w") as devnull:
        luodlog.setup("info", stream=devnull)
        import structlog

        log = structlog.get_logger("luod")
        out["log_line"] = per_call(
            lambda: log.info(
                "fd-preserved", session="s", name="f1", token=1, size=4096, owner="x (uid 0)"
            ),
            500,
        )
    out["manifest"] = {}
    for n in (1, 100, 1000, 10000):
        files = {
            f"f{i}": HeldFile(name=f"f{i}", token=i + 1, size=FILE_SIZE, preserved_at=time.time())
            for i in range(n)
        }
        s = Session("s", SessionKind.MANAGED, Owner(0, None, "bench"), "luod.1.s", time.time())
        s.files = files
        m = Manifest(sessions=[s])
        payload = to_json(m)
        mfd = os.memfd_create("manifest", os.MFD_CLOEXEC)
        size = capacity_for(len(payload))
        os.ftruncate(mfd, size)
        reps = max(3, min(200, 20000 // n))
        try:
            out["manifest"][str(n)] = {
                "bytes": len(payload),
                "to_json": per_call(lambda m=m: to_json(m), reps),
                "write_slot": per_call(
                    lambda mfd=mfd, size=size, payload=payload: write_slot(
                        mfd, size, 0, 1, payload
                    ),
                    reps,
                ),
            }
        finally:
            os.close(mfd)
    with luod.client() as c:
        c.status()
        out["status_round_trip"] = per_call(c.status, 100)
    return out


# --- reclaim ----------------------------------------------------------------------


def setup_reclaim(luod: Luod, sessions: int, files: int) -> dict[str, Any]:
    """sessions x files memfds in luod, and as many in raw sessions of this
    process; returns the raw session fds, which must stay open until the
    reboot syscall."""
    be = KernelBackend()
    raw: list[int] = []
    with luod.client() as c:
        for s in range(sessions):
            fds = memfds(files)
            try:
                c.preserve_fds(
                    f"rec-{s}", [(f"f{i}", fd) for i, fd in enumerate(fds)], create_session=True
                )
            finally:
                close_all(fds)
        status = c.status()
    for s in range(sessions):
        fds = memfds(files)
        try:
            sfd = be.create_session(f"bench-raw-rec-{s}")
            raw.append(sfd)
            for i, fd in enumerate(fds):
                be.preserve_fd(sfd, fd, i + 1)
        finally:
            close_all(fds)
    return {"sessions": sessions, "files": files, "luod_files": status["files"], "raw_fds": raw}


def raw_reclaim(sessions: int, files: int) -> dict[str, float]:
    """The raw loop: RETRIEVE_SESSION + RETRIEVE_FD for all, in-process; then,
    separately, what luod also does so that custody goes on (FINISH, and a
    new outgoing session with every file PRESERVE_FD'd again)."""
    be = KernelBackend()
    got: list[tuple[int, list[int]]] = []
    t0 = time.perf_counter()
    for s in range(sessions):
        sfd = be.retrieve_session(f"bench-raw-rec-{s}")
        got.append((sfd, [be.retrieve_fd(sfd, i + 1) for i in range(files)]))
    t1 = time.perf_counter()
    out: list[int] = []
    for s, (sfd, fds) in enumerate(got):
        be.finish_session(sfd)
        os.close(sfd)
        nfd = be.create_session(f"bench-raw-again-{s}")
        out.append(nfd)
        for i, fd in enumerate(fds):
            be.preserve_fd(nfd, fd, i + 1)
    t2 = time.perf_counter()
    for _sfd, fds in got:
        close_all(fds)
    close_all(out)
    return {"retrieve": t1 - t0, "finish_represerve": t2 - t1}


def luoctl_kexec(luod: Luod, out: dict[str, Any]) -> None:
    luod.keep_log()
    guestlib.write_json(f"bench-{guestlib.stage()}.json", out)
    exe = Path(sys.executable).with_name("luoctl")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "luod.cli"]
    argv = [
        *cmd,
        f"--socket={luod.socket}",
        "kexec",
        os.environ["LUOD_VM_KERNEL"],
        "--append",
        guestlib.next_stage_cmdline(),
    ]
    mark("kexec-requested")
    r = subprocess.run(argv, capture_output=True, text=True, check=False)
    if r.returncode == 0:
        time.sleep(300)  # luod jumps right after its reply
    raise RuntimeError(
        f"still here after luoctl kexec (exit {r.returncode}): {r.stdout}{r.stderr}\n{luod.log()}"
    )


def environment() -> dict[str, Any]:
    mem = ""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = line.split(":", 1)[1].strip()
    return {
        "kernel": platform.release(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "memory": mem,
        "cmdline": Path("/proc/cmdline").read_text().strip(),
    }


def importtime() -> list[tuple[int, int, str]]:
    """python -X importtime -c 'import luod.daemon': the 25 costliest imports
    (cumulative us, self us, module)."""
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import luod.daemon"],
        capture_output=True,
        text=True,
        check=False,
    )
    rows = []
    for line in r.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, cum_us, name = (p.strip() for p in line[len("import time:") :].split("|"))
        rows.append((int(cum_us), int(self_us), name))
    rows.sort(reverse=True)
    return rows[:25]


def stage1(cfg: dict[str, Any], out: dict[str, Any]) -> None:
    mark("boot")
    out["environment"] = environment()
    if cfg["profile"]:
        out["importtime"] = importtime()
    luod = Luod(profile="luod-handoff.prof" if cfg["profile"] else None)
    out["luod_start_fresh"] = luod.start()
    mark("luod-ready")
    out["rss_idle"] = luod.proc_status()
    out["status_fresh"] = luod.status()
    out["rss_idle_after_call"] = luod.proc_status()
    with luod.client() as c:
        out["probe"] = probe = probe_batch(c)
    mark("probe", **probe)
    out["handoff"] = bench_handoff(luod, cfg, probe["limit"])
    out["breakdown"] = bench_breakdown(luod)
    mark("breakdown", **out["breakdown"])
    out["held"] = bench_held(luod, cfg, probe["limit"])
    if cfg["profile"]:
        luod.stop()  # writes the profile; custody is empty now
        luod.keep_log()
        luod = Luod()
        luod.start()
    setup = setup_reclaim(luod, cfg["reclaim"][0], cfg["files_per_session"])
    out["next_reclaim"] = {k: v for k, v in setup.items() if k != "raw_fds"}
    luoctl_kexec(luod, out)


def stage_reclaim(cfg: dict[str, Any], out: dict[str, Any], n: int) -> None:
    """Stage n >= 2 measures reclaim case n-2."""
    sessions, files = cfg["reclaim"][n - 2], cfg["files_per_session"]
    raw_first = bool(cfg["raw_first"][n - 2])
    last = n - 1 == len(cfg["reclaim"])
    mark("boot")
    if raw_first:
        out["raw"] = raw_reclaim(sessions, files)
        mark("raw-measured")
    luod = Luod(profile="luod-reclaim.prof" if cfg["profile"] and last else None)
    mark("luod-starting")
    out["luod_start"] = luod.start()
    mark("luod-ready")
    with luod.client() as c:
        t0 = time.perf_counter()
        os.close(c.retrieve_fd("rec-0", "f0"))
        out["first_retrieve"] = time.perf_counter() - t0
        mark("service-has-data")
        # luod preserves the sessions again after READY, in the background:
        # wait for it, so that it is measured and does not overlap the raw loop.
        deadline = time.monotonic() + 120
        status = c.status()
        while status["reclaim"].get("preservedAgainUSec") is None:
            if time.monotonic() > deadline:
                raise RuntimeError("luod did not preserve the sessions again within 120 s")
            time.sleep(0.05)
            status = c.status()
        mark("preserved-again")
        if not raw_first:
            # Right after luod's reclaim, so that both see the same load.
            out["raw"] = raw_reclaim(sessions, files)
        out["rss_after_reclaim"] = luod.proc_status()
        t0 = time.perf_counter()
        for s in range(sessions):
            for i in range(files):
                os.close(c.retrieve_fd(f"rec-{s}", f"f{i}"))
        out["retrieve_all_via_luod"] = time.perf_counter() - t0
    out["status"] = status
    out["reclaim"] = status["reclaim"]
    out["case"] = {"sessions": sessions, "files": files, "raw_first": raw_first}
    mark("measured", reclaim_usec=status["reclaim"]["durationUSec"])
    with luod.client() as c:
        for s in range(sessions):
            c.discard_session(f"rec-{s}")
    if last:
        luod.stop()
        luod.keep_log()
        return
    setup = setup_reclaim(luod, cfg["reclaim"][n - 1], files)
    out["next_reclaim"] = {k: v for k, v in setup.items() if k != "raw_fds"}
    luoctl_kexec(luod, out)


def main() -> int:
    cfg = config()
    n = guestlib.stage()
    out: dict[str, Any] = {"stage": n, "config": cfg}
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, NOFILE), max(hard, NOFILE)))
    try:
        if n == 1:
            stage1(cfg, out)
        elif 2 <= n <= len(cfg["reclaim"]) + 1:
            stage_reclaim(cfg, out, n)
        else:
            raise RuntimeError(f"no stage {n}")
    except BaseException as e:
        out["error"] = f"{type(e).__name__}: {e}"
        out["traceback"] = traceback.format_exc()
        print(out["traceback"], flush=True)
        for log in sorted(WORK.glob("luod-*.log")) if WORK.exists() else []:
            out.setdefault("luod_logs", {})[log.name] = log.read_text(errors="replace")[-20000:]
        mark("failed", error=out["error"])
    guestlib.write_json(f"bench-{n}.json", out)
    return 1 if "error" in out else 0


if __name__ == "__main__":
    raise SystemExit(main())
