"""The LUO userspace ABI: ioctl numbers, struct layouts and errno meanings.

Mirrors include/uapi/linux/liveupdate.h of Linux 7.3. Every argument struct
starts with its own size (the kernel's extensible-struct convention), and
every ioctl is _IO(0xBA, nr), so the number does not encode the size.
"""

from __future__ import annotations

import errno
import fcntl
import struct

LIVEUPDATE_IOCTL_TYPE = 0xBA
DEVICE_PATH = "/dev/liveupdate"
SESSION_NAME_LENGTH = 64  # including the terminating NUL
MAX_SESSION_NAME = SESSION_NAME_LENGTH - 1


def _io(nr: int) -> int:
    return (LIVEUPDATE_IOCTL_TYPE << 8) | nr


LIVEUPDATE_IOCTL_CREATE_SESSION = _io(0x00)
LIVEUPDATE_IOCTL_RETRIEVE_SESSION = _io(0x01)
LIVEUPDATE_SESSION_PRESERVE_FD = _io(0x40)
LIVEUPDATE_SESSION_RETRIEVE_FD = _io(0x41)
LIVEUPDATE_SESSION_FINISH = _io(0x42)
LIVEUPDATE_SESSION_GET_NAME = _io(0x43)

# struct liveupdate_ioctl_create_session / _retrieve_session:
#   u32 size; s32 fd; u8 name[64]
_SESSION = struct.Struct("=Ii64s")
# struct liveupdate_session_preserve_fd / _retrieve_fd:
#   u32 size; s32 fd; aligned u64 token
_FD = struct.Struct("=IiQ")
# struct liveupdate_session_finish: u32 size; u32 reserved
_FINISH = struct.Struct("=II")
# struct liveupdate_session_get_name: u32 size; u32 reserved; u8 name[64]
_GET_NAME = struct.Struct("=II64s")

assert _SESSION.size == 72 and _FD.size == 16
assert _FINISH.size == 8 and _GET_NAME.size == 72

# Filesystem magics seen by fstatfs() (include/uapi/linux/magic.h).
ANON_INODE_FS_MAGIC = 0x09041934
LUO_SESSION_MAGIC = 0x4C554F53  # "LUOS": session pseudo-fs, patch series v8+
TMPFS_MAGIC = 0x01021994
HUGETLBFS_MAGIC = 0x958458F6


def encode_session_name(name: str) -> bytes:
    """Validate a session name the way the kernel does, before asking it."""
    raw = name.encode()
    if not raw:
        raise ValueError("session name is empty")
    if len(raw) > MAX_SESSION_NAME:
        raise ValueError(
            f"session name is {len(raw)} bytes, the kernel allows at most {MAX_SESSION_NAME}"
        )
    if b"\0" in raw:
        raise ValueError("session name contains a NUL byte")
    return raw


def _decode_name(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def create_session(dev_fd: int, name: str) -> int:
    buf = bytearray(_SESSION.pack(_SESSION.size, -1, encode_session_name(name)))
    fcntl.ioctl(dev_fd, LIVEUPDATE_IOCTL_CREATE_SESSION, buf)
    return int(_SESSION.unpack(buf)[1])


def retrieve_session(dev_fd: int, name: str) -> int:
    buf = bytearray(_SESSION.pack(_SESSION.size, -1, encode_session_name(name)))
    fcntl.ioctl(dev_fd, LIVEUPDATE_IOCTL_RETRIEVE_SESSION, buf)
    return int(_SESSION.unpack(buf)[1])


def preserve_fd(session_fd: int, fd: int, token: int) -> None:
    buf = bytearray(_FD.pack(_FD.size, fd, token))
    fcntl.ioctl(session_fd, LIVEUPDATE_SESSION_PRESERVE_FD, buf)


def retrieve_fd(session_fd: int, token: int) -> int:
    buf = bytearray(_FD.pack(_FD.size, -1, token))
    fcntl.ioctl(session_fd, LIVEUPDATE_SESSION_RETRIEVE_FD, buf)
    return int(_FD.unpack(buf)[1])


def finish_session(session_fd: int) -> None:
    buf = bytearray(_FINISH.pack(_FINISH.size, 0))
    fcntl.ioctl(session_fd, LIVEUPDATE_SESSION_FINISH, buf)


def get_session_name(session_fd: int) -> str:
    buf = bytearray(_GET_NAME.pack(_GET_NAME.size, 0, b""))
    fcntl.ioctl(session_fd, LIVEUPDATE_SESSION_GET_NAME, buf)
    return _decode_name(_GET_NAME.unpack(buf)[2])


# What an errno means for each operation, in words a user can act on. The
# kernel reuses errnos with different meanings per ioctl (ENOENT from
# PRESERVE_FD means "no handler for this file type", not "not found").
_MESSAGES: dict[tuple[str, int], str] = {
    ("open", errno.ENOENT): "/dev/liveupdate does not exist: this kernel has no LUO support",
    ("open", errno.EBUSY): "/dev/liveupdate is held by another agent",
    ("open", errno.EIO): "the kernel failed to deserialize the incoming LUO state; "
    "/dev/liveupdate is unusable in this boot",
    ("open", errno.EACCES): "permission denied opening /dev/liveupdate (needs root)",
    ("create_session", errno.EEXIST): "an outgoing session with this name exists already",
    ("create_session", errno.EINVAL): "the session name is empty or longer than 63 bytes",
    ("retrieve_session", errno.ENOENT): "no incoming session with this name "
    "(never preserved, or all its fds were closed before the kexec)",
    ("retrieve_session", errno.EINVAL): "the incoming session was retrieved already",
    ("preserve_fd", errno.ENOENT): "the kernel cannot preserve this kind of file",
    ("preserve_fd", errno.EEXIST): "the token is used already in this session",
    ("preserve_fd", errno.EBUSY): "the file is preserved already (in this or another session)",
    ("preserve_fd", errno.EINVAL): "the session is an incoming session; "
    "files can only be preserved into outgoing sessions",
    ("preserve_fd", errno.EBADF): "the file descriptor is not open",
    ("preserve_fd", errno.EOPNOTSUPP): "the kernel cannot preserve this kind of file",
    ("retrieve_fd", errno.ENOENT): "no file with this token in the session "
    "(or the session was finished)",
    ("retrieve_fd", errno.EINVAL): "the session is an outgoing session; "
    "files can only be retrieved after the kexec",
    ("finish_session", errno.EINVAL): "the session is an outgoing session; "
    "only incoming sessions can be finished",
    ("kexec_file_load", errno.ENOEXEC): "the file is not a kernel image this kernel can load",
    ("kexec_file_load", errno.EPERM): "loading a kernel needs CAP_SYS_BOOT "
    "(and is refused under kernel lockdown for unsigned images)",
    ("kexec_file_load", errno.EBUSY): "another kexec load is in progress",
    ("kexec_file_load", errno.ENOSYS): "this kernel was built without CONFIG_KEXEC_FILE",
}


def describe(op: str, err: int) -> str:
    """An exact message for errno `err` returned by operation `op`."""
    msg = _MESSAGES.get((op, err))
    if msg is None:
        msg = f"{op} failed: {errno.errorcode.get(err, str(err))} ({err})"
    return msg
