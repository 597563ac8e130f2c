"""luoctl's looking-glass commands: status, check, reclaim."""

from __future__ import annotations

import argparse
import os
from typing import Any

from luod.cli.common import connect, format_bytes, format_time, print_json


def cmd_status(args: argparse.Namespace) -> int:
    with connect(args) as c:
        st = c.status()
        check = c.check()
    if args.json:
        print_json({"status": st, "check": check})
        return 0
    print(f"luod {st['version']}  backend: {st['backend']}  carrier: {st['carrier']}")
    print(
        f"kexecs: {st['kexecCount']}  sessions: {st['sessions']}  files: {st['files']}  pinned: {format_bytes(st['bytesPinned'])}"
    )
    rec = st.get("reclaim")
    if rec:
        print(_reclaim_line(rec))
    if st.get("nextReleaseUSec") is not None:
        print(
            f"unclaimed sessions are released at {format_time(st['nextReleaseUSec'])} (grace {st['graceSec']}s)"
        )
    lk = st.get("loadedKernel")
    if lk:
        print(
            f"loaded kernel: {lk['kernel']}"
            + (" (UKI)" if lk.get("uki") else "")
            + (f" initrd {lk['initrd']}" if lk.get("initrd") else "")
            + f", command line: {lk['commandLine']!r}"
        )
        print(_next_kernel_line(lk))
    else:
        print(
            "loaded kernel: "
            + (
                "yes (not loaded by luod: its command line and LUO ABI are not checked)"
                if st["kernelLoaded"]
                else "none (luoctl load KERNEL)"
            )
        )
    for sub in st.get("subscribers", []):
        owner = sub["owner"]
        print(
            f"subscriber {sub['name']}: {owner.get('unit') or owner.get('comm')} (uid {owner['uid']}), {sub['state']}, deadline {sub['deadlineSec']:g}s, last event {sub['lastEvent']}"
        )
    lu = st.get("lastUpdate")
    if lu:
        print(
            f"last update {lu['update']}: "
            + (
                "passed the barrier"
                if lu["ok"]
                else f"aborted by {lu['subscriber']}: {lu['reason']}"
            )
        )
    print(
        "ready for kexec: "
        + ("yes" if check["ready"] else f"no ({len(check['problems'])} problems, see luoctl check)")
    )
    print("\n".join(crash_cost_lines(st["crashCost"])))
    return 0


def crash_cost_lines(cost: dict[str, Any]) -> list[str]:
    """What a crash of luod now would release, and why (GetStatus's and
    Check's crashCost): one line, then one per session concerned."""
    if not cost["sessions"]:
        return [f"a luod crash now would release nothing: {cost['reason']}"]
    what = ", ".join(
        [
            _count(cost["sessions"], "session"),
            _count(cost["files"], "file"),
            format_bytes(cost["bytesPinned"]),
        ]
    )
    if cost["everything"]:
        # luod scopes what it tells anyone but root to the caller's own.
        what += " (everything luod holds" + ("" if os.geteuid() == 0 else " for you") + ")"
    lines = [f"a luod crash now would release {what}: {cost['reason']}"]
    lines += [f"  {p['session']}: {p['reason']}" for p in cost.get("problems", [])]
    return lines


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _next_kernel_line(lk: dict[str, Any]) -> str:
    """status's line on what the loaded kernel is and whether it can take
    the handover."""
    version = (lk.get("version") or "unknown").split()[0]
    problems = lk.get("problems") or []
    verdict = (
        "the preflight accepts it"
        if not problems
        else f"it CANNOT take the handover (loaded with force): {'; '.join(problems)}"
    )
    return f"  version {version}, LUO ABI {lk.get('luoAbi') or 'none'}: {verdict}"


def _reclaim_line(rec: dict[str, Any]) -> str:
    """status's line on what came over the last kexec."""
    line = f"reclaim: {rec['state']}, {rec['sessions']} sessions, {rec['files']} files in {rec['durationUSec'] / 1000:.1f} ms"
    again = rec.get("preservedAgainUSec")
    if rec["state"] == "reclaimed":
        line += (
            ", preserving them again for the next kexec"
            if again is None
            else f", preserved again in {again / 1000:.1f} ms"
        )
    if rec.get("lost"):
        line += f", lost: {', '.join(rec['lost'])}"
    if rec.get("error"):
        line += f", error: {rec['error']}"
    return line


def cmd_check(args: argparse.Namespace) -> int:
    with connect(args) as c:
        res = c.check()
    if args.json:
        print_json(res)
    else:
        if res["ready"]:
            print("ready: nothing would be lost by a kexec now")
        for p in res["problems"]:
            where = p["session"] + (f"/{p['name']}" if p.get("name") else "")
            print(f"{where or 'luod'}: {p['reason']}")
        # Not a kexec's loss: it does not change the exit status.
        print("\n".join(crash_cost_lines(res["crashCost"])))
    return 0 if res["ready"] else 1


def cmd_reclaim(args: argparse.Namespace) -> int:
    with connect(args) as c:
        rec = c.reclaim()
    if args.json:
        print_json(rec)
    else:
        print(
            f"reclaim {rec['state']}: {rec['sessions']} sessions, {rec['files']} files, {len(rec['lost'])} lost"
        )
        if rec.get("error"):
            print(f"error: {rec['error']}")
    return 1 if rec["state"] == "failed" else 0
