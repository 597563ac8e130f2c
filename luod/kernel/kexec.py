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

LOCKDOWN = "/sys/kernel/security/lockdown"

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
        # A UKI is a PE file (systemd-stub) whose .linux section is the
        # bzImage: luod.kernel.image splits it and checks that section.
        if head[0x202:0x206] != b"HdrS" and head[:2] != b"MZ":
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


def lockdown(path: str = LOCKDOWN) -> str | None:
    """The kernel's lockdown mode ("integrity", "confidentiality"), None
    when it is not locked down or cannot say."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    mode = text[start + 1 : end] if 0 <= start < end else "none"
    return None if mode == "none" else mode


def explain(
    err: int,
    message: str,
    *,
    initrd: str | None,
    uki: bool = False,
    machine: str | None = None,
    lockdown_mode: str | None = None,
) -> tuple[str, str]:
    """(parameter, reason) for a failed kexec_file_load: what the errno
    means there, and the fix. `message` is the generic description."""
    machine = machine or platform.machine()
    if err == errno.EPERM:
        mode = lockdown_mode if lockdown_mode is not None else lockdown()
        if mode is not None:
            return "kernel", (
                f"the running kernel is locked down ({mode}) and loads only images signed "
                "with a key it trusts: sign the image (sbsign with a key in the kernel's "
                "secondary or platform keyring, or enrolled with mokutil under Secure Boot)"
            )
        return "kernel", (
            "kexec is not permitted: luod needs CAP_SYS_BOOT, and sysctl "
            "kernel.kexec_load_disabled=1 forbids it until the next reboot"
        )
    if err in (errno.EKEYREJECTED, errno.ENOKEY, errno.EBADMSG, errno.ENODATA):
        what = {
            errno.EKEYREJECTED: "its signature was rejected",
            errno.ENOKEY: "it is signed with a key the kernel does not know",
            errno.EBADMSG: "its signature is malformed",
            errno.ENODATA: "it is not signed",
        }[err]
        return "kernel", (
            f"the running kernel requires signed kernels for kexec (CONFIG_KEXEC_SIG_FORCE or "
            f"lockdown) and {what}: sign it with sbsign using a key in the kernel's secondary "
            f"or platform keyring (or enrolled with mokutil)"
        )
    if err == errno.ENOEXEC:
        want = {"x86_64": "an x86 bzImage", "aarch64": "an arm64 Image"}.get(machine, "a kernel")
        more = " (from the UKI's .linux section)" if uki else ""
        return "kernel", (
            f"the running kernel cannot load this image{more}: {want} for {machine} is needed "
            "(a kernel of another architecture, or a vmlinux ELF instead of the boot image?)"
        )
    if err in (errno.ENOENT, errno.EACCES) and initrd is not None:
        return "initrd", (
            f"{initrd}: cannot be read ({os.strerror(err)}): give the initrd of that kernel "
            "with --initrd (e.g. /boot/initrd.img-RELEASE), or none if it boots without one"
        )
    if err == errno.EINVAL:
        return "commandLine", (
            "the kernel refused the load (EINVAL): the command line may be longer than the "
            "kernel accepts (COMMAND_LINE_SIZE, 2048 bytes on x86), or the image is damaged"
        )
    if err == errno.ENOMEM:
        return "kernel", (
            "not enough memory to load the image (and initrd) for kexec: free memory, or "
            "use a smaller initrd"
        )
    return "kernel", message
