"""`make demo`: a live update in a VM, end to end, told as it happens.

Boots the project's LUO kernel under QEMU (TCG). In the guest a small
service fills a memfd with a cache (a header naming the sha256 of its
payload), hands it to luod over varlink and exits; the operator runs
`luoctl kexec` into the next kernel; there luod starts and reclaims, the
service starts again, gets its memfd back from luod by name and verifies it.

Timings come from the host's clock: see testsupport/vm/timeline.py for why and
how precise. Guest side: tests/vm/guest_demo.py.

    .venv/bin/python -m tests.vm.demo [--mib 64] [--results DIR] [--kernel BZIMAGE]

Exit status 0 when the data came back intact, 1 otherwise (with the guest's
logs), 2 when QEMU or the kernel is not available.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

from testsupport.vm import qemu
from testsupport.vm.timeline import CLOCK_NOTE, Event, Timeline

GUEST = Path(__file__).with_name("guest_demo.py")
TIMEOUT = 600.0


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.0f} MiB"


def _s(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds < 10 else f"{seconds:.1f} s"


class Narrator:
    """Prints each guest event as the host sees it."""

    def __init__(self, out: Any = sys.stdout) -> None:
        self.out = out
        self.seen: dict[tuple[int, str], Event] = {}

    def say(self, t: float | None, who: str, text: str) -> None:
        stamp = f"[{t:6.2f}]" if t is not None else " " * 8
        lines = text.splitlines() or [""]
        print(f"{stamp} {who:<9} {lines[0]}", file=self.out)
        for line in lines[1:]:
            print(f"{'':8} {'':<9} {line}", file=self.out)
        self.out.flush()

    def block(self, text: str) -> str:
        return "\n" + textwrap.indent(text.rstrip(), "  ") if text.strip() else " (nothing)"

    def since(self, ev: Event, stage: int, name: str) -> float | None:
        other = self.seen.get((stage, name))
        return None if other is None else ev.seen - other.seen

    def __call__(self, ev: Event) -> None:
        self.seen[(ev.stage, ev.name)] = ev
        t, s, d = ev.seen, ev.stage, ev.data
        if ev.name == "init":
            if s == 1:
                self.say(t, "kernel", f"booted; init runs (guest uptime {d['uptime']:.2f} s)")
            else:
                took = self.since(ev, 1, "kexec-requested")
                extra = f", {_s(took)} after luoctl kexec" if took is not None else ""
                self.say(
                    t,
                    "kernel",
                    f"the NEXT kernel booted; init runs (guest uptime {d['uptime']:.2f} s{extra})",
                )
        elif ev.name == "boot":
            who = f"{d.get('kernel')}, Python {d['python']}" if "python" in d else d.get("kernel")
            self.say(t, "guest", f"stage {s} program up ({who}; boot id {d['boot_id'][:8]}…)")
        elif ev.name == "luod-starting":
            what = (
                "fresh boot, nothing to reclaim" if s == 1 else "reclaiming what the kernel carried"
            )
            self.say(t, "luod", f"starting ({what})")
        elif ev.name == "luod-ready":
            took = self.since(ev, s, "luod-starting")
            self.say(t, "luod", f"ready (READY=1) after {_s(took or 0.0)}, pid {d['pid']}")
        elif ev.name == "luod-status":
            st = d["status"]
            self.say(
                t, "luod", f"holding {st['sessions']} sessions; reclaim: {st['reclaim']['state']}"
            )
        elif ev.name == "service-starting":
            verb = "fill a cache and hand it to luod" if s == 1 else "get the cache back"
            self.say(t, "service", f"starting: {verb}")
        elif ev.name == "service-started":
            took = self.since(ev, s, "service-starting")
            self.say(t, "service", f"process up (Python start {_s(took or 0.0)})")
        elif ev.name == "service-filled":
            self.say(
                t,
                "service",
                f"filled a {_mib(d['bytes'])} memfd: header + payload sha256 {d['sha256'][:16]}… "
                f"(fill {_s(d['fill_seconds'])}, hash {_s(d['hash_seconds'])})",
            )
        elif ev.name == "service-handed-off":
            f = d["file"]
            self.say(
                t,
                "service",
                f"PreserveFd('demo-cache', 'cache') → luod, token {f['token']}, "
                f"in {d['handoff_seconds'] * 1000:.0f} ms; the service exits, luod holds the memfd",
            )
        elif ev.name == "operator-before":
            self.say(t, "operator", "$ luoctl list" + self.block(d["list"]))
            self.say(None, "operator", "$ luoctl check" + self.block(d["check"]))
        elif ev.name == "kexec-requested":
            argv = d["argv"]
            shown = shlex.join(["luoctl", *argv[argv.index("kexec") :]])
            self.say(t, "operator", f"$ {shown}")
            self.say(None, "", "──── blackout begins: the service's cache is out of reach ────")
        elif ev.name == "service-has-data":
            took = self.since(ev, 1, "kexec-requested")
            self.say(
                t,
                "service",
                f"RetrieveFd('demo-cache', 'cache') → {_mib(d['bytes'])} memfd "
                f"in {d['retrieve_seconds'] * 1000:.0f} ms",
            )
            if took is not None:
                self.say(None, "", f"──── blackout ends: {_s(took)} after luoctl kexec ────")
        elif ev.name == "service-verified":
            if d["ok"]:
                h = d["header"]
                self.say(
                    t,
                    "service",
                    f"verified: header ok, payload sha256 {d['sha256'][:16]}… matches "
                    f"(hash {_s(d['hash_seconds'])});\nfilled in boot {h['filled_in_boot'][:8]}…, "
                    f"now boot {d['boot_id'][:8]}… ({d['kernel']})",
                )
            else:
                self.say(t, "service", "VERIFICATION FAILED:\n" + "\n".join(d["problems"]))
        elif ev.name == "operator-after":
            self.say(t, "operator", "$ luoctl status" + self.block(d["luoctl_status"]))
            self.say(None, "operator", "$ luoctl list" + self.block(d["list"]))
        elif ev.name.endswith("-failed"):
            self.say(t, "FAILED", f"{d['error']}\n{d.get('traceback', '')}")
        else:
            self.say(t, "guest", ev.name)


def summarize(tl: Timeline, result: qemu.GuestResult, mib: int) -> tuple[list[str], str]:
    """The timing table and the final line. Raises KeyError if an event is missing."""
    boot = tl[1, "init"].seen
    s1_luod = tl.between((1, "luod-starting"), (1, "luod-ready"))
    filled = tl[1, "service-filled"].data
    handoff = float(tl[1, "service-handed-off"].data["handoff_seconds"])
    kexec = tl.between((1, "kexec-requested"), (2, "init"))
    new_kernel = float(tl[2, "init"].data["uptime"])
    to_luod = tl.between((2, "init"), (2, "luod-starting"))
    luod_start = tl.between((2, "luod-starting"), (2, "luod-ready"))
    status = tl[2, "operator-after"].data["status"]
    reclaim = status["reclaim"]["durationUSec"] / 1e6
    svc_start = tl.between((2, "luod-ready"), (2, "service-started"))
    retrieve_host = tl.between((2, "service-started"), (2, "service-has-data"))
    retrieve = float(tl[2, "service-has-data"].data["retrieve_seconds"])
    blackout = tl.between((1, "kexec-requested"), (2, "service-has-data"))
    verify = float(tl[2, "service-verified"].data["hash_seconds"])
    rows = [
        ("VM boot (QEMU start → init)", boot, "host"),
        ("luod start, fresh (→ READY=1)", s1_luod, "host"),
        (
            f"service fills {mib} MiB + sha256",
            float(filled["fill_seconds"]) + float(filled["hash_seconds"]),
            "guest",
        ),
        ("hand-off (PreserveFd over varlink)", handoff, "guest"),
        ("kexec (luoctl kexec → next kernel's init)", kexec, "host"),
        ("  of which the next kernel's boot", new_kernel, "guest uptime at init"),
        ("  of which luoctl + luod + reboot(KEXEC)", kexec - new_kernel, "difference"),
        ("init → luod started (stage program's Python)", to_luod, "host"),
        ("luod start + reclaim (→ READY=1)", luod_start, "host"),
        ("  of which reclaim", reclaim, "luod: reclaim.durationUSec"),
        ("service start (luod READY → service up)", svc_start, "host"),
        ("service gets its data back (RetrieveFd)", retrieve_host, "host"),
        ("  RetrieveFd call itself", retrieve, "guest"),
        ("BLACKOUT (luoctl kexec → service has data)", blackout, "host"),
        (f"verification (sha256 of {mib} MiB)", verify, "guest"),
        ("whole run (QEMU start → QEMU exit)", result.duration, "host"),
    ]
    width = max(len(r[0]) for r in rows)
    table = [f"  {name:<{width}}  {secs:7.2f} s   {src}" for name, secs, src in rows]
    final = (
        f"demo: OK — {mib} MiB came back intact after a live update; "
        f"blackout {blackout:.1f} s (kexec {kexec:.1f} s, stage start {to_luod:.1f} s, "
        f"luod start {luod_start:.1f} s incl. reclaim {reclaim:.2f} s, "
        f"service start {svc_start:.1f} s, retrieve {retrieve_host:.2f} s)"
    )
    return table, final


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.vm.demo", description=__doc__.split("\n")[0])
    p.add_argument("--mib", type=int, default=64, help="size of the service's cache (default 64)")
    p.add_argument("--results", type=Path, help="results folder (default: a new one in /tmp)")
    p.add_argument("--kernel", type=Path, help="bzImage (default: vm/build-kernel.sh stock)")
    p.add_argument("--memory", default="1G", help="guest memory (default 1G)")
    p.add_argument("--timeout", type=float, default=TIMEOUT)
    p.add_argument(
        "--uncached-root",
        action="store_true",
        help="mount the guest's 9p root without cache=loose "
        "(much slower: every stat() and read() goes to QEMU)",
    )
    args = p.parse_args(argv)

    reason = qemu.qemu_unavailable_reason()
    if reason is not None:
        print(f"demo: cannot run: {reason}", file=sys.stderr)
        return 2
    try:
        kernel = args.kernel or qemu.build_kernel("stock")
    except RuntimeError as e:
        print(f"demo: no kernel: {e}", file=sys.stderr)
        return 2
    results: Path = args.results or Path(tempfile.mkdtemp(prefix="luod-demo-"))
    results.mkdir(parents=True, exist_ok=True)

    print("luod demo: a live update in a VM")
    print(f"  kernel   {kernel}")
    cache = "no cache" if args.uncached_root else "cache=loose"
    print(
        f"  VM       QEMU/TCG (no KVM), 2 vCPUs, {args.memory}; root = the host's / "
        f"read-only over 9p ({cache})"
    )
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"  host     {os.cpu_count()} cores, load average {load} (shared with other QEMU runs)")
    print(f"  results  {results}")
    print(f"  clock    {CLOCK_NOTE}")
    print()
    narrator = Narrator()
    narrator.say(0.0, "host", "starting QEMU")
    tl = Timeline(results, on_event=narrator)
    result = tl.run_guest(
        kernel,
        GUEST,
        args.timeout,
        guest_env={"LUOD_DEMO_MIB": str(args.mib)},
        extra_cmdline=qemu.uncached_root_cmdline() if args.uncached_root else [],
        memory=args.memory,
        one_thread=False,
    )
    if result.timed_out:
        narrator.say(result.duration, "host", f"QEMU killed after {args.timeout:.0f} s")
    elif result.returncode == 0:
        narrator.say(result.duration, "host", "QEMU exited (the guest powered off)")
    else:
        narrator.say(result.duration, "host", f"QEMU exited with status {result.returncode}")
    print()

    problems: list[str] = []
    try:
        result.check(final_stage=2)
    except qemu.GuestError as e:
        problems.append(str(e).split("\n", 1)[0])
    verified = tl.get(2, "service-verified")
    if verified is None:
        problems.append("the service never verified its data after the kexec")
    elif not verified.data["ok"]:
        problems.append(
            "the data did not come back intact: " + "; ".join(verified.data["problems"])
        )
    table: list[str] = []
    final = ""
    if not problems:
        try:
            table, final = summarize(tl, result, args.mib)
        except KeyError as e:
            problems.append(str(e))
    if problems:
        print("demo: FAILED — " + "; ".join(problems))
        print()
        print(result.report())
        for log in [results / "qemu.log", *sorted(results.glob("luod-stage-*.log"))]:
            if not log.exists() or not log.read_text(errors="replace").strip():
                continue
            print(f"--- {log.name} ---\n{log.read_text(errors='replace').rstrip()}")
        print(f"\ndemo: FAILED — results kept in {results}")
        return 1
    print(
        "timeline (seconds; source: host = host clock, ±0.02 s; guest = the guest's monotonic clock)"
    )
    print("\n".join(table))
    print()
    print(final)
    if args.results is None:
        shutil.rmtree(results, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
