"""`make demo-vm`: a QEMU VM through the host's live update, with the
guest's pause part by part.

Boots the systemd tier's image (Debian sid: systemd 262, QEMU 11; luod of
this working tree) under QEMU/TCG. Inside it, examples/qemu-cpr/ runs a VM
(QEMU under TCG again) whose 4 MiB of guest RAM is a memfd held by luod, the
guest a 512-byte boot sector counting timer ticks. First an update during
which that VM's QEMU hangs: the VMM cannot save, luod aborts, the guest runs
on. Then `luoctl update`: the VMM saves the device state (cpr-reboot) into
a memfd it hands to luod and acknowledges; the host kexecs; after the boot
luod-vmm@demo.service takes RAM and state back from luod, starts QEMU with
-incoming and the guest counts on. The same program and checks as
tests/systemd/test_qemu_cpr.py (testsupport/systemd/vmpause.py).

    .venv/bin/python -m tests.systemd.demo_vm [--results DIR] [--kernel BZIMAGE] [--image IMG]

Exit status 0 when every check passed, 1 otherwise (with the logs), 2 when
QEMU is not available.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from testsupport.systemd import harness, vmpause
from testsupport.vm import qemu


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m tests.systemd.demo_vm", description=__doc__.split("\n")[0]
    )
    p.add_argument("--results", type=Path, help="results folder (default: a new one in /tmp)")
    p.add_argument("--kernel", type=Path, help="bzImage (default: vm/build-kernel.sh stock)")
    p.add_argument("--image", type=Path, help="a disk image of vm/build-image.sh to reuse")
    args = p.parse_args(argv)

    reason = qemu.qemu_unavailable_reason()
    if reason is not None:
        print(f"demo-vm: cannot run: {reason}", file=sys.stderr)
        return 2
    results = args.results or Path(tempfile.mkdtemp(prefix="luod-demo-vm-"))
    results.mkdir(parents=True, exist_ok=True)
    kernel = args.kernel or qemu.build_kernel("stock")
    root = harness.build_root()
    image = args.image
    if image is None:
        t = time.monotonic()
        image = harness.build_image(results / "root.img", kernel, root)
        print(f"image built in {time.monotonic() - t:.1f} s (luod of this working tree)")
    info = json.loads((root / ".luod-root.json").read_text())
    print(
        f"booting the host VM (TCG, 2 vCPUs): Debian {info['suite']}, systemd {info['systemd']}, "
        f"QEMU {info.get('qemu', '?')}; this takes 2-4 minutes ..."
    )
    result = harness.boot(image, kernel, vmpause.GUEST, results / "vm", vmpause.TIMEOUT,
                          extra_files=vmpause.EXTRA_FILES, one_thread=False)  # fmt: skip
    print(harness.describe(result))
    try:
        seen = vmpause.verify(result)
    except (AssertionError, harness.GuestError, OSError, ValueError, KeyError) as e:
        print(f"demo-vm: FAILED: {e}\nresults in {results}")
        return 1
    p = seen["pause"]

    def say(text: str) -> None:
        print(textwrap.fill(text, 100, subsequent_indent="    "))

    print()
    say(
        "1. luod-vmm@demo.service runs QEMU with 4 MiB of guest RAM in a memfd luod holds "
        f"(session demo.ram); the guest counts: {seen['counters_before']}"
    )
    say(
        "2. an update while the VM's QEMU hangs (SIGSTOP after prepare): the VMM cannot save, "
        f"`luoctl update` says: {seen['update_hung'].splitlines()[-1]}"
    )
    say(f"   the guest runs on where it was: {seen['counters_after_abort']}")
    out = seen["update_out"].splitlines()
    said = out[-1] if out else "(no reply: PID 1 stopped it with everything else for the kexec)"
    say(f"3. `luoctl update`: prepare, freeze (the VMM saved and acknowledged), kexec; {said}")
    say(
        f"4. after the kexec: QEMU -incoming, status {seen['qemu_status']}; the counter was "
        f"{seen['counter_frozen']} at the freeze and goes on: {seen['counters_after']}; guest RAM "
        f"sha256 {seen['ram_sha256'][:16]}... before and after; the pattern the guest wrote "
        "before the kexec reads back identical through QEMU"
    )
    print()
    print(vmpause.format_pause(p, seen["host_kexec"], seen["boot"]))
    (results / "pause.json").write_text(json.dumps(p.json(), indent=1) + "\n")
    print(f"\nresults in {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
