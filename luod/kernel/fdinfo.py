"""What a file descriptor is, from fstatfs(), fstat() and its /proc link.

Python has no fstatfs(), so it is called through ctypes. struct statfs is
120 bytes on x86_64 and aarch64; only f_type (the first long) is read.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import functools
import os
import re
import stat
import typing

from luod.kernel import uapi

_STATFS_SIZE = 120


@functools.cache
def _fstatfs() -> typing.Callable[[int], int]:
    """fstatfs_type's work, made at its first call: ctypes is imported then,
    not at luod's start (7 M of its 494 M instructions of imports, Python
    3.11), and a start with nothing held never calls it. The process's own
    symbols include libc's: no ctypes.util.find_library(), which runs
    ldconfig or a compiler (seconds under emulation)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.fstatfs.restype = ctypes.c_int
    # One buffer for every call: making one per call cost as much as the
    # syscall. luod calls this from one thread only.
    buf = ctypes.create_string_buffer(_STATFS_SIZE)
    f_type = ctypes.c_long.from_buffer(buf)

    def fstatfs_type(fd: int) -> int:
        if libc.fstatfs(fd, buf) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return int(f_type.value) & 0xFFFFFFFF

    return fstatfs_type


def fstatfs_type(fd: int) -> int:
    """f_type of the filesystem `fd` lives on."""
    return _fstatfs()(fd)


@functools.cache
def memfd_dev() -> int:
    """st_dev of memfd_create() files. Every one lives on the kernel's
    internal shmem mount (hugetlb memfds excepted), one for the whole system,
    so a regular file without links on that device is a memfd: no fstatfs()
    needed to tell."""
    fd = os.memfd_create("luod-probe", os.MFD_CLOEXEC)
    try:
        return os.fstat(fd).st_dev
    finally:
        os.close(fd)


def fd_link(fd: int) -> str:
    """The /proc/self/fd link: 'anon_inode:[luo_session] NAME', '/memfd:x (deleted)'…"""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


class FdKind(enum.Enum):
    LUO_SESSION = "luo-session"
    MEMFD = "memfd"
    SOCKET = "socket"
    PIPE = "pipe"
    REGULAR_FILE = "regular-file"
    DIRECTORY = "directory"
    DEVICE = "device"
    HUGETLB_MEMFD = "hugetlb-memfd"
    ANON_INODE = "anon-inode"
    OTHER = "other"


class FdFacts(typing.NamedTuple):
    """Everything the classifier knows about one fd, gathered in one go.
    (A named tuple: made for every fd of a hand-off, where a frozen
    dataclass cost half of inspect_fd().)"""

    kind: FdKind
    fs_type: int
    link: str
    mode: int
    size: int
    ino: int
    dev: int

    @property
    def preservable(self) -> bool:
        return self.kind in (FdKind.LUO_SESSION, FdKind.MEMFD)

    def describe(self) -> str:
        """A short human description, used in refusals."""
        what = {
            FdKind.SOCKET: "a socket",
            FdKind.PIPE: "a pipe",
            FdKind.REGULAR_FILE: "a regular file",
            FdKind.DIRECTORY: "a directory",
            FdKind.DEVICE: "a device node",
            FdKind.HUGETLB_MEMFD: "a hugetlb memfd",
            FdKind.ANON_INODE: "an anonymous-inode file",
            FdKind.MEMFD: "a memfd",
            FdKind.LUO_SESSION: "a LUO session",
            FdKind.OTHER: "a file of an unsupported type",
        }[self.kind]
        return f"{what} ({self.link})" if self.link else what


_ANON_SESSION = re.compile(r"^anon_inode:\[luo_session\](?: (?P<name>.*))?$")
_FS_SESSION = re.compile(r"^luo_session:\[(?P<name>.*)\]$")


def link_session_name(link: str) -> str | None:
    """The session name as the /proc link shows it (may be cut), or None."""
    m = _ANON_SESSION.match(link) or _FS_SESSION.match(link)
    if m is None:
        return None
    return m.group("name") or ""


def inspect_fd(fd: int) -> FdFacts:
    """Classify `fd` without the kernel's LUO help.

    A LUO session is recognised by the dedicated pseudo-fs magic (kernels
    with the LUO_FS_MAGIC series) or, on 7.x, by the anon-inode filesystem
    plus the 'anon_inode:[luo_session]' link. Callers confirm a session with
    SESSION_GET_NAME before trusting it.
    """
    st = os.fstat(fd)
    mode = st.st_mode
    unlinked = stat.S_ISREG(mode) and st.st_nlink == 0
    # A memfd, the common case of a hand-off, is known by its device: one
    # syscall. Anything else needs its filesystem.
    fs_type = uapi.TMPFS_MAGIC if unlinked and st.st_dev == memfd_dev() else fstatfs_type(fd)
    if unlinked and fs_type == uapi.TMPFS_MAGIC:
        # memfd_create() files, and O_TMPFILE or unlinked files on a tmpfs
        # mount: shmem files with no name in any directory, which memfd_luo
        # accepts. The link only matters when something is refused.
        return FdFacts(FdKind.MEMFD, fs_type, "", mode, st.st_size, st.st_ino, st.st_dev)
    link = fd_link(fd)
    kind: FdKind
    if fs_type == uapi.LUO_SESSION_MAGIC:
        kind = FdKind.LUO_SESSION
    elif fs_type == uapi.ANON_INODE_FS_MAGIC:
        kind = FdKind.LUO_SESSION if link_session_name(link) is not None else FdKind.ANON_INODE
    elif stat.S_ISSOCK(mode):
        kind = FdKind.SOCKET
    elif stat.S_ISFIFO(mode):
        kind = FdKind.PIPE
    elif stat.S_ISDIR(mode):
        kind = FdKind.DIRECTORY
    elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        kind = FdKind.DEVICE
    elif fs_type == uapi.HUGETLBFS_MAGIC:
        kind = FdKind.HUGETLB_MEMFD
    elif stat.S_ISREG(mode):
        kind = FdKind.REGULAR_FILE
    else:
        kind = FdKind.OTHER
    return FdFacts(kind, fs_type, link, mode, st.st_size, st.st_ino, st.st_dev)


def set_cloexec(fd: int) -> None:
    """Received fds arrive without FD_CLOEXEC; nothing luod holds may leak
    into a child it spawns."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFD)
    if not flags & fcntl.FD_CLOEXEC:
        fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)


def access_mode(fd: int) -> int:
    return fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE


def is_valid_fd(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError as e:
        if e.errno == errno.EBADF:
            return False
        raise
    return True
