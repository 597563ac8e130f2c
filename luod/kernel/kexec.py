"""Loading the next kernel and jumping into it: the kexec syscalls.

Only kexec_file_load(2) is used: the old kexec_load(2) (kexec-tools' plain
`kexec -l`) carries no KHO handover data, so every LUO session would be lost.
Like uapi, this module raises OSError; `backend.KernelBackend` turns it into
LuoError (this module imports nothing of luod's, so no cycle).
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import stat

# The process's own symbols include libc's: no ctypes.util.find_library(),
# which runs ldconfig or a compiler (seconds under emulation, at every start).
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

_SYS_KEXEC_FILE_LOAD = {"x86_64": 320, "aarch64": 294, "riscv64": 294}
KEXEC_FILE_UNLOAD = 0x1
KEXEC_FILE_NO_INITRAMFS = 0x4

LINUX_REBOOT_MAGIC1 = 0xFEE1DEAD
LINUX_REBOOT_MAGIC2 = 672274793
LINUX_REBOOT_CMD_KEXEC = 0x45584543

KEXEC_LOADED = "/sys/kernel/kexec_loaded"


def _error(err: int, subject: str) -> OSError:
    """The failed call's errno, and what it was about as the filename."""
    return OSError(err, os.strerror(err), subject)


def _syscall_nr() -> int:
    machine = platform.machine()
    try:
        return _SYS_KEXEC_FILE_LOAD[machine]
    except KeyError:
        raise _error(errno.ENOSYS, f"architecture {machine}") from None


def image_problem(path: str, machine: str | None = None) -> str | None:
    """Why `path` is not a kernel this machine can kexec into, or None.

    Checked before kexec_file_load so the answer names the problem instead
    of an ENOEXEC: x86 bzImages carry "HdrS" at 0x202 (the boot protocol
    header), arm64 Images "ARMd" at 0x38."""
    machine = machine or platform.machine()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        return f"cannot open it: {e.strerror}"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return "not a regular file"
        head = os.pread(fd, 0x240, 0)
    finally:
        os.close(fd)
    if machine == "x86_64":
        if head[0x202:0x206] != b"HdrS":
            return "not an x86 bzImage (no boot protocol header 'HdrS' at 0x202)"
    elif machine == "aarch64" and head[0x38:0x3C] != b"ARM\x64":
        return "not an arm64 Image (no 'ARM\\x64' magic at 0x38)"
    return None


def load(kernel: str, initrd: str | None, cmdline: str) -> None:
    """kexec_file_load KERNEL [INITRD] with CMDLINE. Raises OSError."""
    kfd = os.open(kernel, os.O_RDONLY | os.O_CLOEXEC)
    ifd = -1
    try:
        flags = 0
        if initrd:
            ifd = os.open(initrd, os.O_RDONLY | os.O_CLOEXEC)
        else:
            flags |= KEXEC_FILE_NO_INITRAMFS
        raw = cmdline.encode() + b"\0"
        rc = _libc.syscall(
            ctypes.c_long(_syscall_nr()),
            ctypes.c_int(kfd),
            ctypes.c_int(ifd),
            ctypes.c_ulong(len(raw)),
            ctypes.c_char_p(raw),
            ctypes.c_ulong(flags),
        )
        if rc != 0:
            raise _error(ctypes.get_errno(), kernel)
    finally:
        os.close(kfd)
        if ifd >= 0:
            os.close(ifd)


def unload() -> None:
    """kexec_file_load with KEXEC_FILE_UNLOAD. Raises OSError."""
    rc = _libc.syscall(
        ctypes.c_long(_syscall_nr()),
        ctypes.c_int(-1),
        ctypes.c_int(-1),
        ctypes.c_ulong(0),
        ctypes.c_char_p(None),
        ctypes.c_ulong(KEXEC_FILE_UNLOAD),
    )
    if rc != 0:
        raise _error(ctypes.get_errno(), "unload")


def is_loaded() -> bool:
    try:
        with open(KEXEC_LOADED) as f:
            return f.read().strip() == "1"
    except OSError:
        return False


def reboot_kexec() -> None:
    """reboot(LINUX_REBOOT_CMD_KEXEC). Returns only on failure, with OSError."""
    os.sync()
    rc = _libc.syscall(
        ctypes.c_long(169 if platform.machine() == "x86_64" else 142),
        ctypes.c_uint(LINUX_REBOOT_MAGIC1),
        ctypes.c_uint(LINUX_REBOOT_MAGIC2),
        ctypes.c_uint(LINUX_REBOOT_CMD_KEXEC),
        ctypes.c_void_p(None),
    )
    if rc != 0:
        raise _error(ctypes.get_errno(), "LINUX_REBOOT_CMD_KEXEC")
