"""Helpers for programs that run INSIDE the bare test VM (qemu.run_guest):
the stage they run in, the results share, and the way to the next stage
(a raw kexec, or `luoctl kexec` through luod).

Only the standard library, luod and testsupport: this runs as PID 1's child
in a minimal guest, on the host's read-only root.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from .qemu import STAGE_PARAM

if TYPE_CHECKING:
    from testsupport.luodproc import LuodProcess


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


Stage = Callable[[dict[str, Any]], None]


def run_stage(
    stages: Mapping[str, Mapping[int, Stage]], prefix: str, work: Path, timed: bool = False
) -> int:
    """A guest program's main(): run this boot's stage of LUOD_VM_SCENARIO
    on a fresh `out`, then write `out` as results/PREFIX-SCENARIO-N.json
    (unless the stage kexec'd away first). A failure goes into `out` as
    "error" and "traceback", with the luod logs under `work`; `timed` adds
    "uptime_start" and "uptime_end". The exit status: 1 on failure."""
    scenario = os.environ["LUOD_VM_SCENARIO"]
    n = stage()
    out: dict[str, Any] = {"stage": n}
    if timed:
        out["uptime_start"] = uptime()
    try:
        stages[scenario][n](out)
    except BaseException as e:
        out["error"] = f"{type(e).__name__}: {e}"
        out["traceback"] = traceback.format_exc()
        print(out["traceback"])
        if work.exists():
            for log in sorted(work.glob("luod-*.log")):
                out.setdefault("luod_logs", {})[log.name] = log.read_text()
    if timed:
        out["uptime_end"] = uptime()
    write_json(f"{prefix}-{scenario}-{n}.json", out)
    return 1 if "error" in out else 0


def keep_log(luod: LuodProcess) -> None:
    """The logs of every luod `luod` started in this stage into the results
    share, as luod-stage-N.log (the guest's /run goes with the next kexec)."""
    (results_dir() / f"luod-stage-{stage()}.log").write_text(luod.all_logs())


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


def luoctl(socket: str) -> list[str]:
    """The argv of luoctl talking to luod at `socket`: the venv's entry
    script, or `python -m luod.cli` where there is none."""
    exe = Path(sys.executable).with_name("luoctl")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "luod.cli"]
    return [*cmd, f"--socket={socket}"]


def luoctl_kexec_argv(socket: str) -> list[str]:
    """`luoctl kexec` into the kernel this VM booted, with the next stage
    on its command line: the operator's live update."""
    kernel = os.environ["LUOD_VM_KERNEL"]
    return [*luoctl(socket), "kexec", kernel, "--append", next_stage_cmdline()]


def run_luoctl_kexec(argv: list[str], wait: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run `argv` (luoctl_kexec_argv). luod jumps right after its reply, so
    when luoctl succeeds this waits `wait` seconds for the old kernel to go;
    it returns only if luoctl failed or the kexec never came, with what
    luoctl said, for the caller to report."""
    r = subprocess.run(argv, capture_output=True, text=True, check=False)
    if r.returncode == 0:
        time.sleep(wait)
    return r
