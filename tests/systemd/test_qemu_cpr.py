"""A QEMU VM whose guest RAM luod holds survives the host's live update
(QEMU 11's cpr-reboot with x-ignore-shared), driven by `luoctl update`
through luod's barrier, under systemd 262: examples/qemu-cpr/ installed as
README's "A VM through a live update" says, the guest a 512-byte boot
sector counting timer ticks (examples/qemu-cpr/tinyguest.py) in 4 MiB of
RAM, QEMU under TCG inside this TCG VM.

Stage 1: the VM runs; an update during which its QEMU hangs (the VMM cannot
save) is aborted and the guest runs on; `luoctl update` then kexecs.
Stage 2: luod-vmm@demo.service finds the RAM and the saved state in luod
and resumes the guest (QEMU -incoming, cont)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from testsupport.systemd import vmpause

from .conftest import SystemdVM

pytestmark = pytest.mark.systemd


def test_qemu_vm_survives_luoctl_update(systemd_vm: SystemdVM, results: Path) -> None:
    result = systemd_vm.boot(vmpause.GUEST, results, vmpause.TIMEOUT, vmpause.EXTRA_FILES)
    seen = vmpause.verify(result)
    p = seen["pause"]
    print(vmpause.format_pause(p, seen["host_kexec"], seen["boot"]))
    (results / "pause.json").write_text(json.dumps(p.json(), indent=1) + "\n")
