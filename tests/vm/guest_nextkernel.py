"""Guest side of the next-kernel preflight on real kernels
(tests/vm/test_nextkernel.py). Each stage writes nextkernel-<scenario>-<N>.json
into the results share. LUOD_VM_KERNEL is the stock kernel this VM booted,
LUOD_VM_KERNEL_ABI the test variant whose LUO_ABI_COMPATIBLE differs.

- preflight:
  1. (stock) luod holds two memfds. `luoctl load ABI-KERNEL` and
     `luoctl kexec STOCK --append <without liveupdate=on>` are refused and
     nothing is lost (every byte checked); then `luoctl kexec UKI` into a
     UKI made here from the stock kernel, whose .cmdline is the next stage's.
  2. (stock, from the UKI) everything came over byte-identical. The same
     bad command line is refused again, then loaded with `--force` (Check
     names the problem) and `luoctl kexec --force`.
  3. (stock, liveupdate=off) no /dev/liveupdate: this kernel cannot hand
     anything on. A plain kexec_file_load into stage 4 with liveupdate=on.
  4. (stock) luod finds nothing: the forced kexec lost everything.
- abi: 1. (stock) luod holds a memfd; `luoctl kexec ABI-KERNEL --force`.
  The ABI kernel meets state it cannot read and panics (the host checks
  the serial console): there is no stage 2.
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
import subprocess
import time
from pathlib import Path
from typing import Any

from luod.client import Client
from luod.kernel import image, kexec
from testsupport import images
from testsupport.luodproc import LuodProcess
from testsupport.util import make_memfd, memfd_facts
from testsupport.vm import guestlib

WORK = Path("/run/luod-test")
PAYLOADS = {
    "index": (random.Random(31).randbytes(1 << 20), 77),
    "small": (random.Random(32).randbytes(5000), 0),
}


def cmdline(stage: int, liveupdate: str) -> str:
    """The next stage's command line with liveupdate=VALUE."""
    words = guestlib.next_stage_cmdline(stage).split()
    return " ".join(re.sub(r"^liveupdate=.*", f"liveupdate={liveupdate}", w) for w in words)


def start_luod() -> LuodProcess:
    WORK.mkdir(parents=True, exist_ok=True)
    p = LuodProcess(WORK, [], ["--grace=1h"], ready_timeout=180.0)
    p.start()
    return p


def luoctl(luod: LuodProcess, *args: str) -> dict[str, Any]:
    r = subprocess.run(
        [*guestlib.luoctl(luod.socket), *args], capture_output=True, text=True, timeout=300
    )
    return {"rc": r.returncode, "stdout": r.stdout, "stderr": r.stderr}


def copies(c: Client) -> dict[str, Any]:
    """Every held file, read through a copy (luod keeps custody)."""
    got = {}
    for name in PAYLOADS:
        fd = c.retrieve_fd("cache", name)
        got[name] = dataclasses.asdict(memfd_facts(fd))
        os.close(fd)
    return got


def kexec_with(luod: LuodProcess, out: dict[str, Any], name: str, *argv: str) -> None:
    """`luoctl kexec ARGV...`; returns only if it failed (recorded)."""
    guestlib.write_json(name, out)
    r = guestlib.run_luoctl_kexec([*guestlib.luoctl(luod.socket), "kexec", *argv])
    out["kexec_failed"] = {"rc": r.returncode, "stdout": r.stdout, "stderr": r.stderr}
    guestlib.keep_log(luod)
    raise RuntimeError(f"luoctl kexec did not kexec: {r.stderr}")


def preflight_stage1(out: dict[str, Any]) -> None:
    stock, abi = os.environ["LUOD_VM_KERNEL"], os.environ["LUOD_VM_KERNEL_ABI"]
    out["running"] = dataclasses.asdict(image.running_luo())
    luod = start_luod()
    expected = {}
    with luod.client() as c:
        for name, (data, pos) in PAYLOADS.items():
            fd = make_memfd(data, pos, name="guest")
            expected[name] = dataclasses.asdict(memfd_facts(fd))
            c.preserve_fd("cache", name, fd, create_session=True)
            os.close(fd)
    out["expected"] = expected
    out["refused_abi"] = luoctl(luod, "load", abi, "--append", cmdline(2, "on"))
    out["refused_cmdline"] = luoctl(luod, "kexec", stock, "--append", cmdline(2, "off"))
    with luod.client() as c:
        out["status_after_refusals"] = c.status()
        out["check_after_refusals"] = c.check()
        out["after_refusals"] = copies(c)
    # The UKI: the stock kernel with the next stage's command line inside.
    uki = WORK / "linux.efi"
    uki.write_bytes(
        images.uki_bytes(Path(stock).read_bytes(), None, cmdline(2, "on"), "7.3.4-luod-stock")
    )
    out["uki_load"] = luoctl(luod, "load", str(uki))
    out["uki_status"] = luoctl(luod, "status")
    guestlib.keep_log(luod)
    kexec_with(luod, out, "nextkernel-preflight-1.json")


def preflight_stage2(out: dict[str, Any]) -> None:
    stock = os.environ["LUOD_VM_KERNEL"]
    out["cmdline"] = Path("/proc/cmdline").read_text().strip()
    luod = start_luod()
    with luod.client() as c:
        out["status"] = c.status()
        out["got"] = copies(c)
    bad = cmdline(3, "off")
    out["refused_again"] = luoctl(luod, "load", stock, "--append", bad)
    out["forced_load"] = luoctl(luod, "load", stock, "--append", bad, "--force")
    with luod.client() as c:
        out["check_forced"] = c.check()
    guestlib.keep_log(luod)  # /run goes with the kexec: the log so far
    kexec_with(luod, out, "nextkernel-preflight-2.json", "--force")


def preflight_stage3(out: dict[str, Any]) -> None:
    out["cmdline"] = Path("/proc/cmdline").read_text().strip()
    out["dev_liveupdate"] = os.path.exists("/dev/liveupdate")
    guestlib.write_json("nextkernel-preflight-3.json", out)
    kexec.load(os.environ["LUOD_VM_KERNEL"], None, cmdline(4, "on"))
    os.sync()
    kexec.reboot_kexec()
    time.sleep(60)
    raise RuntimeError("reboot(LINUX_REBOOT_CMD_KEXEC) returned")


def preflight_stage4(out: dict[str, Any]) -> None:
    luod = start_luod()
    with luod.client() as c:
        out["status"] = c.status()
        out["sessions"] = c.list_sessions()
    guestlib.keep_log(luod)
    luod.stop()


def abi_stage1(out: dict[str, Any]) -> None:
    luod = start_luod()
    with luod.client() as c:
        fd = make_memfd(b"lost in the panic", name="guest")
        c.preserve_fd("cache", "index", fd, create_session=True)
        os.close(fd)
    abi = os.environ["LUOD_VM_KERNEL_ABI"]
    out["refused"] = luoctl(luod, "kexec", abi, "--append", cmdline(2, "on"))
    guestlib.keep_log(luod)
    kexec_with(luod, out, "nextkernel-abi-1.json", abi, "--append", cmdline(2, "on"), "--force")


STAGES = {
    "preflight": {
        1: preflight_stage1,
        2: preflight_stage2,
        3: preflight_stage3,
        4: preflight_stage4,
    },
    "abi": {1: abi_stage1},
}


def main() -> int:
    return guestlib.run_stage(STAGES, "nextkernel", WORK)


if __name__ == "__main__":
    raise SystemExit(main())
