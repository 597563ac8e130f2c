"""Helpers for programs that run INSIDE the test VM (see qemu.run_guest).

Only the standard library and luod.kernel: this runs as PID 1's child in a
minimal guest, on the host's read-only root.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any, NoReturn

STAGE_PARAM = "luod.test_stage"


def stage() -> int:
    """The current stage (init passes it on from the kernel command line)."""
    return int(os.environ.get("LUOD_VM_STAGE", "1"))


def results_dir() -> Path:
    return Path(os.environ["LUOD_VM_RESULTS"])


def uptime() -> float:
    with open("/proc/uptime") as f:
        return float(f.read().split()[0])


def write_json(name: str, data: Any) -> Path:
    """Write `data` as results/NAME, durably (the next thing may be a kexec)."""
    path = results_dir() / name
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def next_stage_cmdline(next_stage: int | None = None) -> str:
    """This boot's command line with the stage replaced by the next one."""
    with open("/proc/cmdline") as f:
        words = f.read().split()
    words = [w for w in words if not re.fullmatch(rf"{re.escape(STAGE_PARAM)}=\d*", w)]
    n = stage() + 1 if next_stage is None else next_stage
    return " ".join([*words, f"{STAGE_PARAM}={n}"])


def kexec_next_stage(kernel: str | None = None, next_stage: int | None = None) -> NoReturn:
    """kexec_file_load the test kernel (by default the one this VM booted)
    with the next stage on its command line, then reboot(KEXEC) into it.

    Every LUO session whose fds are still open here is serialized by the
    reboot syscall. Never returns: raises if the kexec fails."""
    from luod.kernel import kexec

    path = kernel or os.environ["LUOD_VM_KERNEL"]
    kexec.load(path, None, next_stage_cmdline(next_stage))
    if not kexec.is_loaded():
        raise RuntimeError("kexec_file_load returned 0 but /sys/kernel/kexec_loaded is not 1")
    os.sync()
    kexec.reboot_kexec()
    # reboot_kexec() returns only by raising; be explicit for the type checker.
    time.sleep(60)
    raise RuntimeError("reboot(LINUX_REBOOT_CMD_KEXEC) returned")
