#!/usr/bin/python3
"""Guest helper of tests/systemd/test_qemu_cpr.py and `make demo-vm`: a QEMU
VM run by examples/qemu-cpr/luod-vmm.py (installed as /usr/local/bin/luod-vmm).

    qemucpr.py peek NAME --out FILE [--anchor FILE] [--wait S] [--samples 2] [--interval 1]
        --anchor: first tie this boot's CLOCK_MONOTONIC to the host's clock
        (a file written into the 9p results share gets its mtime from the
        host's kernel) into FILE. Then wait until luod-vmm's status says the
        guest runs; read the guest's counter, magic and pattern flag
        (tinyguest.py layout) through QEMU (`xp`) a few times; have QEMU save
        the pattern region (`pmemsave`) and check it against what the guest
        writes; QEMU's status; luod's sessions and status. One Python start
        for all of it: under TCG each costs seconds.
    qemucpr.py hang-qemu NAME --out FILE
        a second subscriber that, once NAME has acknowledged prepare,
        stops (SIGSTOP) NAME's QEMU and acknowledges prepare and freeze
        itself: NAME's save cannot finish. On `aborted` it lets QEMU go on
        (SIGCONT) and exits. Start it, wait for FILE.ready, run the update.

Runs on the guest's python3 with the image's luod (luod.client).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.machinery
import importlib.util
import json
import os
import signal
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import luod.client

VMM = os.environ.get("LUOD_VMM", "/usr/local/bin/luod-vmm")
TINYGUEST = os.environ.get("LUOD_TINYGUEST", "/usr/local/lib/luod-vmm/tinyguest.py")
RUNTIME = Path("/run/luod-vmm")


def load(path: str, name: str) -> ModuleType:
    loader = importlib.machinery.SourceFileLoader(name, path)
    spec = importlib.util.spec_from_loader(name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def write(path: str, data: Any) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    print(json.dumps(data, sort_keys=True))


def status(name: str) -> dict[str, Any]:
    try:
        return dict(json.loads((RUNTIME / name / "status.json").read_text()))
    except (OSError, ValueError):
        return {}


@functools.cache
def vmm_module() -> ModuleType:
    return load(VMM, "luod_vmm")


def qmp(name: str, command: str, arguments: dict[str, Any] | None = None) -> Any:
    vmm = vmm_module()
    q = vmm.QMP.connect(str(RUNTIME / name / "qmp.sock"), 60.0)
    try:
        return q.execute(command, arguments, 60.0)
    finally:
        q.close()


def anchor(path: str) -> dict[str, Any]:
    """This boot's CLOCK_MONOTONIC against the host's clock: the mtime the
    host's kernel gives a file written into the 9p results share."""
    probe = f"{path}.probe"
    before = time.monotonic()
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, b"anchor\n")
        os.fsync(fd)
        host_ns = os.fstat(fd).st_mtime_ns
    finally:
        os.close(fd)
    after = time.monotonic()
    os.unlink(probe)
    data = {
        "monotonic": (before + after) / 2,
        "error": (after - before) / 2,
        "host_realtime": host_ns / 1e9,
        "boot_id": Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
    }
    write(path, data)
    return data


def wait_running(name: str, timeout: float) -> dict[str, Any]:
    end = time.monotonic() + timeout
    while True:
        st = status(name)
        if st.get("state") == "running":
            return st
        if time.monotonic() > end:
            raise SystemExit(f"luod-vmm's {name} not running after {timeout} s: {st}")
        time.sleep(0.2)


def cmd_peek(args: argparse.Namespace) -> int:
    out: dict[str, Any] = {}
    if args.anchor:
        out["anchor"] = anchor(args.anchor)
    deadline = time.monotonic() + args.wait
    out["vmm"] = wait_running(args.name, args.wait)
    tiny = load(TINYGUEST, "tinyguest")

    def sample() -> dict[str, Any]:
        text = qmp(
            args.name, "human-monitor-command", {"command-line": f"xp /3wx {tiny.COUNTER:#x}"}
        )
        words = [int(w, 16) for w in str(text).split(":", 1)[1].split()]
        return {
            "monotonic": time.monotonic(),
            "counter": words[0],
            "magic_ok": words[1] == tiny.MAGIC,
            "pattern_done": words[2],
        }

    # QEMU "running" is not the guest booted: on a loaded TCG host its boot
    # sector may not have written the magic and the pattern yet when the
    # VM was just started (stage 1). Wait for them, within --wait; a guest
    # restored from its RAM (stage 2) has them at once.
    first = sample()
    while not (first["magic_ok"] and first["pattern_done"] == 1):
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
        first = sample()
    samples = [first]
    for _ in range(1, args.samples):
        time.sleep(args.interval)
        samples.append(sample())
    out["samples"] = samples
    dump = f"/tmp/pattern-{os.getpid()}.bin"
    size = tiny.PATTERN_END - tiny.PATTERN_START
    qmp(args.name, "pmemsave", {"val": tiny.PATTERN_START, "size": size, "filename": dump})
    got = Path(dump).read_bytes()
    os.unlink(dump)
    out["pattern_bytes"] = len(got)
    out["pattern_sha256"] = hashlib.sha256(got).hexdigest()
    out["pattern_ok"] = got == tiny.pattern()
    out["qemu"] = qmp(args.name, "query-status")
    with luod.client.connect() as c:
        out["sessions"] = c.list_sessions()
        out["luod"] = c.status()
    write(args.out, out)
    return 0


def cmd_hang_qemu(args: argparse.Namespace) -> int:
    done: dict[str, Any] = {"events": []}
    qemu_pid = int(status(args.name)["qemu_pid"])
    stopped = False
    with luod.client.connect() as events, luod.client.connect() as acks:
        try:
            for ev in events.subscribe(f"{args.name}-hang", deadline=60):
                done["events"].append({"phase": ev["phase"], "monotonic": time.monotonic()})
                if ev["phase"] == "subscribed":
                    Path(f"{args.out}.ready").write_text("ready\n")
                elif ev["phase"] == "prepare":
                    # Once the VMM has answered prepare: its QEMU hangs.
                    end = time.monotonic() + 60
                    while time.monotonic() < end:
                        subs = {s["name"]: s for s in acks.status()["subscribers"]}
                        if subs.get(args.name, {}).get("state") == "acked-prepare":
                            break
                        time.sleep(0.02)
                    os.kill(qemu_pid, signal.SIGSTOP)
                    stopped = True
                    done["sigstop_monotonic"] = time.monotonic()
                    acks.acknowledge(ev["subscription"], ev["update"], "prepare")
                elif ev["phase"] == "freeze":
                    acks.acknowledge(ev["subscription"], ev["update"], "freeze")
                elif ev["phase"] == "aborted":
                    done["aborted_reason"] = ev.get("reason")
                    break
        finally:
            if stopped:
                os.kill(qemu_pid, signal.SIGCONT)
                done["sigcont_monotonic"] = time.monotonic()
    write(args.out, done)
    return 0


def main() -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("peek")
    k.add_argument("name")
    k.add_argument("--anchor", metavar="FILE", help="tie this boot's clock to the host's first")
    k.add_argument("--wait", type=float, default=240, help="seconds to wait for the guest")
    k.add_argument("--samples", type=int, default=2)
    k.add_argument("--interval", type=float, default=1.0)
    k.add_argument("--out", required=True)
    h = sub.add_parser("hang-qemu")
    h.add_argument("name")
    h.add_argument("--out", required=True)
    args = p.parse_args()
    return {"peek": cmd_peek, "hang-qemu": cmd_hang_qemu}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
