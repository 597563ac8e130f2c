"""`make bench`: luod's benchmarks on the real LUO kernel, in a QEMU guest.

    .venv/bin/python -m bench.run [--repeats 5] [--profile] [--results DIR]

Boots the project's LUO kernel (vm/build-kernel.sh stock) under QEMU/TCG
with bench/guest.py as the stage program, and prints what luod costs next
to what the kernel itself costs, measured in the same run; first, issue
12's goals this run measures (a table: each ratio, its target, met or
missed):

- luod's start to READY=1, on the first boot and after each kexec, vs
  `python -c "import asyncio"` with the same interpreter, spawned right
  after it in the same boot (median of 5; target: <= 1.5x);
- one PreserveFd vs one org.varlink.service.GetInfo round trip on the same
  connection, interleaved (medians; target: <= 1.5x);
- hand-off of N memfds: PreserveFds batches and one PreserveFd per fd over
  varlink, vs the raw in-process PRESERVE_FD loop (target: <= 3x);
- reclaim at boot of S sessions x 10 memfds: luod's reclaim until every
  file is retrievable (GetStatus reclaim.durationUSec) and luod's start to
  READY=1, vs the raw RETRIEVE_SESSION + RETRIEVE_FD loop (target: <= 2x),
  and their share of the blackout from `luoctl kexec` to the first fd
  retrieved through luod; then luod preserving every session again after
  READY (reclaim.preservedAgainUSec), vs the raw FINISH + re-PRESERVE loop;
- getting 1,000 memfds back through luod after the kexec: RetrieveFds (one
  call per session, 100 x 10 and 8 x 125) and one RetrieveFd per fd, vs the
  raw retrieve loop (target: <= 3x);
- luod's RSS idle and with many held fds;
- scaling: 10x the fds, the time ratio.

Before the boot, the plain .pyc files of luod, testsupport, bench, the
venv's site-packages and the interpreter's stdlib are written where missing
or stale (the guest's root is read-only: without them every interpreter in
the guest compiles its imports again); what was compiled is printed.

No assertion on time anywhere: a missed target is printed as such. The exit
status is non-zero only when the benchmark could not run. Numbers of one run
also go to RESULTS.md in the results folder (or --markdown PATH); the report
is bench/report.py's.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

from testsupport.vm import qemu
from testsupport.vm.timeline import Event, Timeline

from .report import fmt_s, host_description, report

GUEST = Path(__file__).with_name("guest.py")
REPO = Path(__file__).resolve().parents[1]

# Sources no import ever reaches and some of which do not compile on purpose
# (the stdlib's bad-syntax test data, python-config): neither checked nor
# compiled, or a missing .pyc there would make every run compile again.
NOT_IMPORTED = re.compile(r"/(test|tests|idle_test)/|/config-[^/]*/")


def bytecode_dirs() -> list[Path]:
    """What the guest's interpreters import from: luod, the tree's test and
    bench support, the venv's site-packages, the interpreter's stdlib."""
    paths = sysconfig.get_paths()
    dirs = [REPO / "luod", REPO / "testsupport", REPO / "bench"]
    return [*dirs, Path(paths["purelib"]), Path(paths["stdlib"])]


def stale_pyc(src: Path) -> bool:
    """Whether the plain (non-opt) .pyc of src is missing or not the one the
    import system would accept (magic number, source mtime and size)."""
    try:
        with open(importlib.util.cache_from_source(str(src)), "rb") as f:
            header = f.read(16)
    except OSError:
        return True
    if header[:4] != importlib.util.MAGIC_NUMBER:
        return True
    if int.from_bytes(header[4:8], "little") & 1:
        return False  # hash-based: validated against the source, not its stat
    st = src.stat()
    return header[8:16] != (
        (int(st.st_mtime) & 0xFFFFFFFF).to_bytes(4, "little")
        + (st.st_size & 0xFFFFFFFF).to_bytes(4, "little")
    )


def stale_count(root: Path) -> int:
    """Sources under root whose byte-code the guest would compile on every
    import."""
    n = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for name in filenames:
            path = os.path.join(dirpath, name)
            if name.endswith(".py") and not NOT_IMPORTED.search(path) and stale_pyc(Path(path)):
                n += 1
    return n


def compile_bytecode() -> list[str]:
    """Byte-compile, before the boot, every folder the guest imports from
    whose plain .pyc files are missing or stale: the guest's root is
    read-only and this environment sets PYTHONDONTWRITEBYTECODE=1, so
    without them every interpreter in the guest compiles its imports again
    (luod's start and the `import asyncio` baseline alike). compileall
    writes .pyc files whatever PYTHONDONTWRITEBYTECODE says. Returns what
    it did, one line per folder."""
    lines: list[str] = []
    for d in bytecode_dirs():
        t0 = time.monotonic()
        stale = stale_count(d)
        if not stale:
            lines.append(f"{d}: byte-code up to date")
            continue
        r = subprocess.run(
            [sys.executable, "-m", "compileall", "-q", "-j0", "-x", NOT_IMPORTED.pattern, str(d)],
            capture_output=True,
            text=True,
            check=False,
        )
        left = stale_count(d)
        took = time.monotonic() - t0
        what = f"{d}: compiled {stale - left} of {stale} missing or stale .pyc in {took:.1f} s"
        if r.returncode != 0 or left:
            # Not fatal (a read-only stdlib, say): the baseline and luod
            # then both compile in the guest, which the report shows.
            err = (r.stdout + r.stderr).strip().splitlines()
            what += f"; {left} left" + (f" ({err[-1]})" if err else "")
        lines.append(what)
    return lines


class Progress:
    def __call__(self, ev: Event) -> None:
        d = ev.data
        text = ev.name
        if ev.name == "init":
            text = f"kernel up, init runs stage {ev.stage} (guest uptime {d['uptime']:.1f} s)"
        elif ev.name.startswith("handoff-"):
            _, n, rep = ev.name.split("-")
            text = (
                f"hand-off {n} fds, run {int(rep) + 1}: raw {fmt_s(d['raw'])} "
                f"({fmt_s(d['identified'])} identifying each fd), "
                f"PreserveFds {fmt_s(d['batches'])}, PreserveFd x{n} {fmt_s(d['per_fd'])}"
            )
        elif ev.name == "probe":
            text = f"PreserveFds with 253 fds ({d['bytes']} bytes of JSON): " + (
                "ok"
                if d["ok"]
                else f"REFUSED ({d['error']}); batches kept under {d['limit']} bytes"
            )
        elif ev.name == "python-baseline":
            runs = " / ".join(fmt_s(x) for x in d["runs"])
            text = f"luod start -> READY {fmt_s(d['luod'])}; python -c 'import asyncio': {runs}"
        elif ev.name == "call-vs-getinfo":
            text = (
                f"one PreserveFd {fmt_s(d['preserve_fd'])}, one GetInfo {fmt_s(d['get_info'])} "
                "(medians, same connection)"
            )
        elif ev.name == "held":
            text = f"luod holds {d['files']} fds: VmRSS {d['rss_kib'] / 1024:.1f} MiB"
        elif ev.name == "measured":
            text = f"reclaim measured: luod's reclaim took {d['reclaim_usec'] / 1000:.1f} ms"
        elif ev.name == "failed":
            text = f"FAILED: {d['error']}"
        print(f"[{ev.seen:7.2f}] stage {ev.stage}: {text}", flush=True)


def collect(results: Path, final_stage: int) -> tuple[list[dict[str, Any]], list[str]]:
    """The guest's bench-N.json of every stage, and what went wrong."""
    stages: list[dict[str, Any]] = []
    problems: list[str] = []
    for n in range(1, final_stage + 1):
        path = results / f"bench-{n}.json"
        if not path.exists():
            problems.append(f"stage {n} wrote no results")
            break
        data: dict[str, Any] = json.loads(path.read_text())
        if "error" in data:
            problems.append(f"stage {n}: {data['error']}\n{data.get('traceback', '')}")
            for name, text in data.get("luod_logs", {}).items():
                problems.append(f"--- {name} ---\n{text}")
            break
        stages.append(data)
    return stages, problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=5, help="runs of each hand-off (default 5)")
    p.add_argument("--handoff", default="100,1000", help="fds per hand-off run (default 100,1000)")
    p.add_argument(
        "--reclaim",
        # Three kexecs: make bench (this, bench.barrier, bench.others and
        # bench.systemd) fits in about half an hour of a quiet 2-core host.
        # The order effect (who retrieves first pays) is measured with
        # 100,100r,100,100r.
        default="10,100,8x125",
        help="sessions per reclaim case (x10 fds, or SxF: F fds each, at most 128 on 7.3), "
        "one kexec each; a trailing r: the raw loop runs before luod starts; repeated "
        "cases are reported as medians (default 10,100,8x125)",
    )
    p.add_argument("--held", type=int, default=10000, help="fds luod holds for the RSS test")
    p.add_argument(
        "--pair-calls",
        type=int,
        default=200,
        help="PreserveFd and GetInfo calls each, interleaved on one connection (default 200)",
    )
    p.add_argument("--profile", action="store_true", help="luod under cProfile; import times")
    p.add_argument("--results", type=Path, help="results folder (default: a new one in /tmp)")
    p.add_argument("--markdown", type=Path, help="also write the report here")
    p.add_argument("--kernel", type=Path, help="bzImage (default: vm/build-kernel.sh stock)")
    p.add_argument("--memory", default="2G")
    p.add_argument("--timeout", type=float, default=3600.0)
    p.add_argument(
        "--uncached-root",
        action="store_true",
        help="mount the guest's 9p root without cache=loose "
        "(much slower: every stat() and read() goes to QEMU)",
    )
    p.add_argument(
        "--analyse", type=Path, metavar="DIR", help="no run: report on the results in DIR again"
    )
    args = p.parse_args(argv)

    if args.analyse is not None:
        first = json.loads((args.analyse / "bench-1.json").read_text())
        stages, problems = collect(args.analyse, len(first["config"]["reclaim"]) + 1)
        if problems:
            print("\n".join(["bench: that run FAILED", *problems]))
            return 1
        report(args.analyse, stages, Timeline.load(args.analyse), args.memory, args.markdown)
        return 0

    reason = qemu.qemu_unavailable_reason()
    if reason is not None:
        print(f"bench: cannot run: {reason}", file=sys.stderr)
        return 2
    kernel = args.kernel or qemu.build_kernel("stock")
    results: Path = args.results or Path(tempfile.mkdtemp(prefix="luod-bench-"))
    results.mkdir(parents=True, exist_ok=True)
    bytecode = compile_bytecode()
    for line in bytecode:
        print(f"bench: {line}", flush=True)
    cfg = {
        "repeats": args.repeats,
        "handoff": [int(x) for x in args.handoff.split(",")],
        "reclaim": [int(x.rstrip("r").partition("x")[0]) for x in args.reclaim.split(",")],
        "reclaim_files": [
            int(x.rstrip("r").partition("x")[2] or 10) for x in args.reclaim.split(",")
        ],
        "raw_first": [x.endswith("r") for x in args.reclaim.split(",")],
        "held": args.held,
        "profile": args.profile,
        "cached_root": not args.uncached_root,
        "pair_calls": args.pair_calls,
        "bytecode": bytecode,
        "host_load_before": [round(x, 2) for x in os.getloadavg()],
    }
    final_stage = len(cfg["reclaim"]) + 1
    print(f"bench: {kernel}, QEMU/TCG 2 vCPU {args.memory}, results in {results}")
    print(f"bench: config {json.dumps(cfg)}; {final_stage} stages ({final_stage - 1} kexecs)")
    tl = Timeline(results, on_event=Progress())
    result = tl.run_guest(
        kernel,
        GUEST,
        args.timeout,
        guest_env={"LUOD_BENCH_CONFIG": json.dumps(cfg)},
        extra_cmdline=qemu.uncached_root_cmdline() if args.uncached_root else [],
        memory=args.memory,
        one_thread=False,
    )
    (results / "host.json").write_text(
        json.dumps({**host_description(), "load_after": [round(x, 2) for x in os.getloadavg()]})
    )
    stages, problems = collect(results, final_stage)
    try:
        result.check(final_stage=final_stage)
    except qemu.GuestError as e:
        problems.append(str(e).split("\n", 1)[0])
    if problems:
        print("\n".join(["bench: FAILED", *problems, result.report()]))
        print(f"bench: FAILED — results kept in {results}")
        return 1
    report(results, stages, tl, args.memory, args.markdown)
    print(f"bench: done in {result.duration:.0f} s; report in {results / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
