"""The kernel backend: the one place luod talks to /dev/liveupdate.

`Backend` is what the rest of luod sees. `KernelBackend` is the real kernel;
the tests' fake kernel, kept outside the runtime package, obeys the same
rules. Dependencies go one way: this module uses uapi, fdinfo and kexec,
which raise OSError and import nothing above them; it turns their errors
into LuoError.

/dev/liveupdate is exclusive: while any process holds it, systemd cannot
start units with LUOSession= and services cannot create their own sessions.
So it is opened for exactly one create/retrieve and closed again; session fds
stay valid without it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

from luod.kernel import fdinfo, uapi

if TYPE_CHECKING:
    from luod.kernel import image

BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"

MISSING_LUO = (
    "/dev/liveupdate does not exist. luod needs a kernel built with "
    "CONFIG_KEXEC_HANDOVER=y, CONFIG_LIVEUPDATE=y and CONFIG_LIVEUPDATE_MEMFD=y, "
    "booted with 'kho=on liveupdate=on' on its command line."
)


class LuoError(Exception):
    """A LUO operation failed; `message` says what it means for the user."""

    def __init__(self, op: str, err: int, subject: str = "") -> None:
        self.op = op
        self.errno = err
        self.subject = subject
        self.message = uapi.describe(op, err)
        super().__init__(f"{subject}: {self.message}" if subject else self.message)


class Backend(Protocol):
    """The kernel's LUO operations, as luod uses them.

    Every returned fd is owned by the caller and has FD_CLOEXEC set.
    Every failure raises LuoError.
    """

    name: str

    def unavailable_reason(self) -> str | None:
        """None when usable, else why not (missing device, missing config)."""
        ...

    def create_session(self, name: str) -> int: ...

    def retrieve_session(self, name: str) -> int: ...

    def preserve_fd(self, session_fd: int, fd: int, token: int) -> None: ...

    def retrieve_fd(self, session_fd: int, token: int) -> int: ...

    def finish_session(self, session_fd: int) -> None: ...

    def session_name(self, session_fd: int) -> str:
        """SESSION_GET_NAME: the full name of the session `session_fd` is."""
        ...

    def identify_session(self, fd: int) -> str | None:
        """The session name if `fd` is a LUO session of this backend, else None."""
        ...

    def reboot_kexec(self) -> None:
        """reboot(LINUX_REBOOT_CMD_KEXEC): serialize every session, jump."""
        ...

    def load_kernel(self, kernel: str, initrd: str | None, cmdline: str) -> None:
        """kexec_file_load the next kernel (never kexec_load: no handover data)."""
        ...

    def unload_kernel(self) -> None: ...

    def kernel_loaded(self) -> bool: ...

    def running_luo(self) -> image.RunningLuo:
        """The running kernel's LUO ABI and file handlers: what the next
        kernel must speak to read the handover."""
        ...

    def boot_id(self) -> str:
        """What tells this boot from the one before a kexec; raises OSError
        when it cannot be read."""
        ...


class KernelBackend:
    """The real kernel, through /dev/liveupdate."""

    name = "kernel"

    def __init__(
        self,
        device: str = uapi.DEVICE_PATH,
        busy_timeout: float = 2.0,
    ) -> None:
        self.device = device
        self.busy_timeout = busy_timeout

    def unavailable_reason(self) -> str | None:
        if not os.path.exists(self.device):
            return MISSING_LUO
        return None

    @contextlib.contextmanager
    def _device(self) -> Iterator[int]:
        """Open the device for one operation, waiting out brief contention."""
        deadline = time.monotonic() + self.busy_timeout
        delay = 0.005
        while True:
            try:
                fd = os.open(self.device, os.O_RDWR | os.O_CLOEXEC)
                break
            except OSError as e:
                if e.errno == errno.EBUSY and time.monotonic() < deadline:
                    time.sleep(delay)
                    delay = min(delay * 2, 0.1)
                    continue
                raise LuoError("open", e.errno or errno.EIO, self.device) from None
        try:
            yield fd
        finally:
            os.close(fd)

    def create_session(self, name: str) -> int:
        with self._device() as dev:
            try:
                return uapi.create_session(dev, name)
            except OSError as e:
                raise LuoError("create_session", e.errno or errno.EIO, name) from None

    def retrieve_session(self, name: str) -> int:
        with self._device() as dev:
            try:
                return uapi.retrieve_session(dev, name)
            except OSError as e:
                raise LuoError("retrieve_session", e.errno or errno.EIO, name) from None

    def preserve_fd(self, session_fd: int, fd: int, token: int) -> None:
        try:
            uapi.preserve_fd(session_fd, fd, token)
        except OSError as e:
            raise LuoError("preserve_fd", e.errno or errno.EIO, f"token {token}") from None

    def retrieve_fd(self, session_fd: int, token: int) -> int:
        try:
            return uapi.retrieve_fd(session_fd, token)
        except OSError as e:
            raise LuoError("retrieve_fd", e.errno or errno.EIO, f"token {token}") from None

    def finish_session(self, session_fd: int) -> None:
        try:
            uapi.finish_session(session_fd)
        except OSError as e:
            raise LuoError("finish_session", e.errno or errno.EIO) from None

    def session_name(self, session_fd: int) -> str:
        try:
            return uapi.get_session_name(session_fd)
        except OSError as e:
            raise LuoError("get_session_name", e.errno or errno.EIO) from None

    def identify_session(self, fd: int) -> str | None:
        facts = fdinfo.inspect_fd(fd)
        if facts.kind is not fdinfo.FdKind.LUO_SESSION:
            return None
        # The link may cut long names and anyone can name an anon inode;
        # only the ioctl answers for the kernel.
        try:
            return self.session_name(fd)
        except LuoError:
            return None

    # kexec (ctypes) and image (gzip, zlib) only when a kernel is loaded or
    # inspected: luod's start to READY does not pay for them.
    def reboot_kexec(self) -> None:
        from luod.kernel import kexec

        try:
            kexec.reboot_kexec()
        except OSError as e:
            raise LuoError("reboot", e.errno or errno.EIO, _subject(e)) from None

    def load_kernel(self, kernel: str, initrd: str | None, cmdline: str) -> None:
        from luod.kernel import kexec

        try:
            kexec.load(kernel, initrd, cmdline)
        except OSError as e:
            raise LuoError("kexec_file_load", e.errno or errno.EIO, _subject(e, kernel)) from None

    def unload_kernel(self) -> None:
        from luod.kernel import kexec

        try:
            kexec.unload()
        except OSError as e:
            raise LuoError("kexec_file_load", e.errno or errno.EIO, _subject(e)) from None

    def kernel_loaded(self) -> bool:
        from luod.kernel import kexec

        return kexec.is_loaded()

    def running_luo(self) -> image.RunningLuo:
        from luod.kernel import image

        return image.running_luo()

    def boot_id(self) -> str:
        with open(BOOT_ID_PATH) as f:
            return f.read().strip()


def is_incoming_session(backend: Backend, session_fd: int) -> bool:
    """Whether the session `session_fd` came over the last kexec (was
    retrieved) rather than created in this boot. The kernel serializes only
    its outgoing list at the kexec (luo_session_serialize()): an incoming
    session is not carried, however long it is held open.

    No ioctl or fdinfo says which list a session is in, so PRESERVE_FD is
    asked with fd -1. The kernel checks the session's direction before
    anything else (luo_session_ioctl(): EINVAL for an incoming session);
    an outgoing one gets on to luo_preserve_file(), which answers EEXIST
    (token used) or EBADF (no file at -1) and undoes what it began. Either
    way nothing is preserved or changed."""
    try:
        backend.preserve_fd(session_fd, -1, 0)
    except LuoError as e:
        if e.errno == errno.EINVAL:
            return True
        if e.errno in (errno.EBADF, errno.EEXIST):
            return False
        raise
    return False  # accepted, so outgoing (an incoming session accepts nothing)


def _subject(e: OSError, default: str = "") -> str:
    return str(e.filename) if e.filename is not None else default
