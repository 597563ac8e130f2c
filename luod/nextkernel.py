"""The next kernel: loading it, and jumping into it once an update may go.

`NextKernel` is what luod knows and does about the kernel after this one:
the image loaded with kexec_file_load (checked first, so a refusal names the
problem), why a kexec would fail right now, and the jump itself — luod's own
reboot(LINUX_REBOOT_CMD_KEXEC), or `systemctl kexec` when PID 1 must carry
luod's state in the fd store. The orchestrator's barrier decides *when*;
this module does the *how*. No varlink here: the Manager interface turns
`LoadedKernel` into its wire form.

Before loading, the next kernel is checked for what it needs to read the
handover (luod.kernel.image): its command line turns on KHO and LUO, and
its image speaks the running kernel's LUO ABI and has its memfd file
handler. A UKI is split as `systemctl kexec` does. What the check finds is
kept with the loaded kernel, so Check, Update and KExec say it again.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import stat
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from luod import errors, notify
from luod.kernel.backend import Backend, LuoError
from luod.log import get_logger
from luod.peer import Peer
from luod.record import record

if TYPE_CHECKING:
    from luod.kernel import image

log = get_logger()

# `systemctl kexec` starts kexec.target: services are stopped in order (their
# ExecStop= runs), then PID 1 carries the fd stores and jumps. (varlink's
# io.systemd.Manager.KExec skips the stopping, like `systemctl kexec --force`.)
# --no-block: luod is one of the services to be stopped.
PID1_KEXEC = ("systemctl", "--no-block", "kexec")

PROC_CMDLINE = "/proc/cmdline"

# Between the reply to KExec and the jump: the reply must get out first.
KEXEC_DELAY = 0.1


@record(frozen=True)
class LoadedKernel:
    """A kernel loaded for the next kexec, as luod loaded it."""

    kernel: str
    initrd: str | None
    cmdline: str
    loaded_at: float  # wall clock, seconds since the epoch
    # What the image says (None: it could not be read, see problems).
    facts: image.KernelFacts | None = None
    # The image was a UKI: kernel, initrd and command line came out of it.
    uki: bool = False
    # Why it cannot take the handover; loaded anyway only when forced.
    problems: tuple[str, ...] = ()


def _check_text(parameter: str, value: str) -> None:
    """What the kernel is handed is a C string of UTF-8; a JSON string can
    hold a NUL or a lone surrogate (escaped as u0000, ud800), which
    neither can."""
    if "\0" in value:
        raise errors.KernelUnusable(parameter, "it contains a NUL character")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise errors.KernelUnusable(
            parameter, "it is not valid Unicode (a lone surrogate)"
        ) from None


def _check_path(parameter: str, path: str) -> None:
    """A path luod can open without waiting: a regular file. open() of a
    FIFO would block luod until someone writes to it."""
    _check_text(parameter, path)
    try:
        st = os.stat(path)
    except OSError:
        return  # opening it says why
    if not stat.S_ISREG(st.st_mode):
        raise errors.KernelUnusable(parameter, f"{path}: not a regular file")


@contextlib.contextmanager
def _parts(
    kernel: str, initrd: str | None, uki: image.Uki | None
) -> Iterator[tuple[str, str | None]]:
    """Paths for kexec_file_load: the files as given, or a UKI's sections
    in memfds (kexec_file_load reads from an fd; /proc/self/fd/N reopens
    the memfd), as `systemctl kexec` does. An initrd given wins over the
    UKI's."""
    if uki is None:
        yield kernel, initrd
        return
    fds = []
    try:

        def memfd(name: str, data: bytes) -> str:
            fd = os.memfd_create(f"luod-uki-{name}", os.MFD_CLOEXEC)
            fds.append(fd)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            return f"/proc/self/fd/{fd}"

        kpath = memfd("linux", uki.linux)
        ipath = initrd if initrd is not None or uki.initrd is None else memfd("initrd", uki.initrd)
        yield kpath, ipath
    finally:
        for fd in fds:
            os.close(fd)


class NextKernel:
    """The kernel luod kexecs into, and the kexec itself.

    `via_pid1`: luod's state is in its fd store, which only PID 1 carries on
    its way down, so the jump must be PID 1's `systemctl kexec`.
    `session_count` only feeds the log lines. `on_kexec` is called when a
    kexec returned as done (only the fake kernel returns): this process is
    then "the old userspace" and must stop without touching state.
    `before_kexec` is called an iteration of the loop before luod's own
    kexec: what must settle first (luod.service).
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
        self.before_kexec: Callable[[], None] = lambda: None
        self.pid1_kexec = pid1_kexec
        self.loaded: LoadedKernel | None = None
        self.kexeced = False
        self._running: image.RunningLuo | None = None

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
        self,
        kernel: str,
        initrd: str | None,
        cmdline: str | None,
        reuse: bool,
        force: bool = False,
    ) -> LoadedKernel:
        """Check the image, the initrd and the command line, then
        kexec_file_load them. `reuse`: the command line of the running
        kernel instead of `cmdline`. A UKI gives its own initrd and command
        line where none is given. `force`: load a kernel that cannot take
        the handover (logged, with what would be lost)."""
        # Imported here, not at the top: luod's start to READY does not
        # need them, and they pull in ctypes, gzip and zlib.
        import platform

        from luod.kernel import image, kexec

        _check_path("kernel", kernel)
        if initrd is not None:
            _check_path("initrd", initrd)
        if cmdline is not None:
            _check_text("commandLine", cmdline)
        problem = kexec.image_problem(kernel)
        if problem is not None:
            raise errors.KernelUnusable("kernel", f"{kernel}: {problem}")
        if initrd is not None and not os.access(initrd, os.R_OK):
            raise errors.KernelUnusable(
                *kexec.explain(
                    errno.ENOENT if not os.path.exists(initrd) else errno.EACCES, "", initrd=initrd
                )
            )
        if reuse:
            with open(PROC_CMDLINE) as f:
                cmdline = f.read().strip()
        try:
            data = image.read_file(kernel)
            uki = image.split_uki(data)
        except image.ImageError as e:
            raise errors.KernelUnusable("kernel", f"{kernel}: {e}") from None
        x86_pe = platform.machine() == "x86_64" and data[:2] == b"MZ"
        if uki is None and x86_pe and data[0x202:0x206] != b"HdrS":
            raise errors.KernelUnusable(
                "kernel", f"{kernel}: a PE file but neither a bzImage nor a UKI (no .linux section)"
            )
        if uki is not None:
            data = uki.linux
            if cmdline is None:
                cmdline = uki.cmdline
        cmdline = cmdline or ""
        facts, problems = self._inspect(data, cmdline)
        if problems:
            self._refuse_or_warn(kernel, cmdline, problems, force)
        with _parts(kernel, initrd, uki) as (kpath, ipath):
            try:
                self.backend.load_kernel(kpath, ipath, cmdline)
            except LuoError as e:
                parameter, reason = kexec.explain(
                    e.errno, e.message, initrd=initrd, uki=uki is not None
                )
                if parameter == "kernel":
                    reason = f"{kernel}: {reason}"
                raise errors.KernelUnusable(parameter, reason) from None
        self.loaded = LoadedKernel(
            kernel=kernel,
            initrd=initrd if uki is None or uki.initrd is None else initrd or f"{kernel}:.initrd",
            cmdline=cmdline,
            loaded_at=time.time(),
            facts=facts,
            uki=uki is not None,
            problems=tuple(problems),
        )
        log.info(
            "kernel-loaded",
            kernel=kernel,
            initrd=self.loaded.initrd or "-",
            cmdline=cmdline,
            uki=uki is not None,
            release=facts.release if facts is not None and facts.release else "-",
            luo_abi=",".join(facts.luo_abi) if facts is not None and facts.luo_abi else "-",
            running=self.running().source,
        )
        return self.loaded

    def running(self) -> image.RunningLuo:
        """The running kernel's LUO values (luod.kernel.image.running_luo),
        kept once complete: they do not change within a boot."""
        if self._running is not None:
            return self._running
        found = self.backend.running_luo()
        if found.luo_abi is not None and found.handlers:
            self._running = found
        return found

    def _inspect(self, data: bytes, cmdline: str) -> tuple[image.KernelFacts | None, list[str]]:
        """What the image says, and why it cannot take the handover."""
        from luod.kernel import image

        facts: image.KernelFacts | None = None
        problems: list[str] = []
        try:
            facts = image.read_bzimage(data)
        except image.ImageError as e:
            problems.append(f"cannot read the image's LUO: {e}")
        problems = image.cmdline_problems(cmdline, facts) + problems
        if facts is not None:
            problems += image.handover_problems(facts, self.running())
        return facts, problems

    def _refuse_or_warn(self, kernel: str, cmdline: str, problems: list[str], force: bool) -> None:
        if not force:
            # The command line alone is wrong: say so by its parameter.
            parameter = (
                "commandLine"
                if all(p.startswith("its command line") for p in problems)
                else "kernel"
            )
            raise errors.KernelUnusable(
                parameter,
                f"{kernel} cannot take the handover: "
                + "; ".join(problems)
                + " (force loads it anyway, and every session luod holds would be lost)",
            )
        log.warning(
            "kernel-preflight-overridden",
            kernel=kernel,
            cmdline=cmdline,
            problems="; ".join(problems),
            lost=f"every session luod holds ({self.session_count()}), if kexeced into",
        )

    def log_forced(self, problems: list[str]) -> None:
        """A forced kexec into a kernel that cannot take the handover."""
        log.warning(
            "kernel-preflight-overridden",
            kernel=self.loaded.kernel if self.loaded is not None else "-",
            problems="; ".join(problems),
            lost=f"every session luod holds ({self.session_count()})",
        )

    def problems(self) -> list[str]:
        """Why the loaded kernel cannot take the handover (for Check,
        Update and KExec). A kernel luod did not load is not checked: its
        command line cannot be read back."""
        if self.loaded is None:
            return []
        return [f"next kernel: {p}" for p in self.loaded.problems]

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
        asyncio.get_running_loop().call_later(KEXEC_DELAY, self._settle_then_kexec)

    def _settle_then_kexec(self) -> None:
        self.before_kexec()
        # What it set off runs first: callbacks run in the order they came.
        asyncio.get_running_loop().call_soon(self._kexec)

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
