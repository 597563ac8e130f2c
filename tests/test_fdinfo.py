"""fdinfo.inspect_fd on real fds of this host."""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Iterator

import pytest

from luod.kernel import fdinfo, uapi


@pytest.fixture
def fds() -> Iterator[list[int]]:
    opened: list[int] = []
    yield opened
    for fd in opened:
        os.close(fd)


def _kind(fd: int) -> fdinfo.FdKind:
    return fdinfo.inspect_fd(fd).kind


def test_memfd_known_from_fstat_alone(fds: list[int]) -> None:
    fd = os.memfd_create("x", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    fds.append(fd)
    os.write(fd, b"12345")
    facts = fdinfo.inspect_fd(fd)
    assert (facts.kind, facts.size, facts.fs_type) == (fdinfo.FdKind.MEMFD, 5, uapi.TMPFS_MAGIC)
    st = os.fstat(fd)
    assert (facts.dev, facts.ino) == (st.st_dev, st.st_ino)
    # The shortcut's premise: every memfd is on the one internal shmem mount.
    other = os.memfd_create("y", os.MFD_CLOEXEC)
    fds.append(other)
    assert os.fstat(other).st_dev == fdinfo.memfd_dev() == st.st_dev
    assert fdinfo.fstatfs_type(fd) == uapi.TMPFS_MAGIC


def test_tmpfs_tmpfile_is_a_memfd_to_the_kernel(fds: list[int]) -> None:
    try:
        fd = os.open("/dev/shm", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        pytest.skip(f"no O_TMPFILE on /dev/shm: {e}")
    fds.append(fd)
    assert os.fstat(fd).st_dev != fdinfo.memfd_dev()
    assert _kind(fd) is fdinfo.FdKind.MEMFD


def test_files_that_are_not_memfds(fds: list[int]) -> None:
    with tempfile.NamedTemporaryFile(dir="/var/tmp") as f:
        fd = os.open(f.name, os.O_RDONLY | os.O_CLOEXEC)
        fds.append(fd)
        assert _kind(fd) is fdinfo.FdKind.REGULAR_FILE
    # Unlinked now: no links, like a memfd, but not on shmem.
    if fdinfo.fstatfs_type(fd) != uapi.TMPFS_MAGIC:
        assert _kind(fd) is fdinfo.FdKind.REGULAR_FILE
    r, w = os.pipe()
    fds += [r, w]
    assert _kind(r) is fdinfo.FdKind.PIPE
    a, b = socket.socketpair()
    fds += [a.detach(), b.detach()]
    assert _kind(fds[-1]) is fdinfo.FdKind.SOCKET
    fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    fds.append(fd)
    assert _kind(fd) is fdinfo.FdKind.DEVICE
    facts = fdinfo.inspect_fd(fd)
    assert facts.describe() == "a device node (/dev/null)"
