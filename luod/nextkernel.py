"""The next kernel: loading it, and jumping into it once an update may go.

`NextKernel` is what luod knows and does about the kernel after this one:
the image loaded with kexec_file_load (checked first, so a refusal names the
problem), why a kexec would fail right now, and the jump itself — luod's own
reboot(LINUX_REBOOT_CMD_KEXEC), or `systemctl kexec` when PID 1 must carry
luod's state in the fd store. The orchestrator's barrier decides *when*;
this module does the *how*. No varlink here: the Manager interface turns
`LoadedKernel` into its wire form.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections.abc import Callable

import structlog

from luod import errors, notify
from luod.kernel import kexec
from luod.kernel.backend import Backend, LuoError
from luod.peer import Peer

log = structlog.get_logger("luod")

# `systemctl kexec` starts kexec.target: services are stopped in order (their
# ExecStop= runs), then PID 1 carries the fd stores and jumps. (varlink's
# io.systemd.Manager.KExec skips the stopping, like `systemctl kexec --force`.)
# --no-block: luod is one of the services to be stopped.
PID1_KEXEC = ("systemctl", "--no-block", "kexec")

PROC_CMDLINE = "/proc/cmdline"

# Between the reply to KExec and the jump: the reply must get out first.
KEXEC_DELAY = 0.1


@dataclasses.dataclass(frozen=True)
class LoadedKernel:
    """A kernel loaded for the next kexec, as luod loaded it."""

    kernel: str
    initrd: str | None
    cmdline: str
    loaded_at: float  # wall clock, seconds since the epoch


class NextKernel:
    """The kernel luod kexecs into, and the kexec itself.

    `via_pid1`: luod's state is in its fd store, which only PID 1 carries on
    its way down, so the jump must be PID 1's `systemctl kexec`.
    `session_count` only feeds the log lines. `on_kexec` is called when a
    kexec returned as done (only the fake kernel returns): this process is
    then "the old userspace" and must stop without touching state.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        via_pid1: bool,
        session_count: Callable[[], int] = lambda: 0,
        on_kexec: Callable[[], None] = lambda: None,
        pid1_kexec: tuple[str, ...] = PID1_KEXEC,
    ) -> None:
        self.backend = backend
        self.via_pid1 = via_pid1
        self.session_count = session_count
        self.on_kexec = on_kexec
        self.pid1_kexec = pid1_kexec
        self.loaded: LoadedKernel | None = None
        self.kexeced = False

    def kexec_blocker(self, own_reboot: bool) -> str | None:
        """Why the kexec would fail now, checked before anything stops.
        `own_reboot`: luod would jump itself (KExec), not through an update."""
        if not self.backend.kernel_loaded():
            return (
                "no kernel is loaded for kexec (luoctl load KERNEL loads one with kexec_file_load)"
            )
        if own_reboot and self.via_pid1:
            return "luod's state is in its fd store, which only PID 1 carries: use luoctl update or systemctl kexec"
        return None

    def load_kernel(
        self, kernel: str, initrd: str | None, cmdline: str | None, reuse: bool
    ) -> LoadedKernel:
        """Check the image and the initrd, then kexec_file_load them.
        `reuse`: the command line of the running kernel instead of `cmdline`."""
        problem = kexec.image_problem(kernel)
        if problem is not None:
            raise errors.KernelUnusable("kernel", f"{kernel}: {problem}")
        if initrd is not None and not os.access(initrd, os.R_OK):
            raise errors.KernelUnusable("initrd", f"{initrd}: not readable")
        if reuse:
            with open(PROC_CMDLINE) as f:
                cmdline = f.read().strip()
        try:
            self.backend.load_kernel(kernel, initrd, cmdline or "")
        except LuoError as e:
            raise errors.KernelUnusable("kernel", f"{kernel}: {e.message}") from None
        self.loaded = LoadedKernel(
            kernel=kernel, initrd=initrd, cmdline=cmdline or "", loaded_at=time.time()
        )
        log.info("kernel-loaded", kernel=kernel, initrd=initrd or "-", cmdline=cmdline or "")
        return self.loaded

    def unload_kernel(self) -> None:
        """Undo load_kernel."""
        try:
            self.backend.unload_kernel()
        except LuoError as e:
            raise errors.KernelUnusable("kernel", e.message) from None
        self.loaded = None
        log.info("kernel-unloaded")

    async def jump(self) -> None:
        """The barrier passed: hand over to the kexec. Through PID 1 this
        returns once systemctl accepted the job; luod is stopped later."""
        if not self.via_pid1:
            self.schedule_kexec(None)
            return
        command = " ".join(self.pid1_kexec)
        log.warning("kexec-via-pid1", sessions=self.session_count(), command=command)
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.pid1_kexec,
                stdin=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
            _, err = await proc.communicate()
        except OSError as e:
            raise errors.NotReady(f"cannot run {command}: {e.strerror}") from None
        if proc.returncode != 0:
            raise errors.NotReady(
                f"{command} failed ({proc.returncode}): {err.decode(errors='replace').strip()}"
            )

    def schedule_kexec(self, peer: Peer | None) -> None:
        """luod's own reboot(LINUX_REBOOT_CMD_KEXEC), soon: after the reply
        to `peer` (None: the update barrier) went out."""
        log.warning(
            "kexec-requested",
            by=peer.describe() if peer is not None else "update",
            sessions=self.session_count(),
        )
        asyncio.get_running_loop().call_later(KEXEC_DELAY, self._kexec)

    def _kexec(self) -> None:
        notify.notify("STOPPING=1\nSTATUS=Jumping into the next kernel")
        try:
            self.backend.reboot_kexec()
        except LuoError as e:
            log.error("kexec-failed", reason=str(e))
            notify.notify(f"READY=1\nSTATUS=kexec failed: {e}")
            return
        # Only the fake kernel returns from a successful kexec.
        log.info("kexec-done", backend=self.backend.name)
        self.kexeced = True
        self.on_kexec()
