"""The fake LUO kernel against the rules observed on a real 7.3.4 kernel.

Each test of the first part is one row of the table "Observed on a real
7.3.4 kernel" in /work/shared/docs/luo-kernel-interface.md. The fake kernel
runs as its own process, as it does under luod's integration tests.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import multiprocessing
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing import reduction
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest

from luod.kernel import fdinfo, uapi
from luod.kernel.backend import Backend, KernelBackend, LuoError, is_incoming_session
from testsupport import fakekernel as fake
from testsupport.fakekernel import FakeBackend, running_fake_kernel


class Fds:
    """Every fd a test opens, closed at teardown unless the test closed it."""

    def __init__(self) -> None:
        self.open: set[int] = set()

    def add(self, fd: int) -> int:
        self.open.add(fd)
        return fd

    def close(self, fd: int) -> None:
        self.open.discard(fd)
        os.close(fd)

    def close_all(self) -> None:
        for fd in self.open:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.open.clear()

    def memfd(self, data: bytes = b"", name: str = "data", flags: int = os.MFD_CLOEXEC) -> int:
        fd = self.add(os.memfd_create(name, flags))
        if data:
            os.write(fd, data)
        return fd


@pytest.fixture
def fds() -> Iterator[Fds]:
    jar = Fds()
    yield jar
    jar.close_all()


@pytest.fixture
def kernel(tmp_path: Path) -> Iterator[str]:
    with running_fake_kernel(tmp_path) as path:
        yield path


@pytest.fixture
def luo(kernel: str) -> FakeBackend:
    return FakeBackend(kernel, busy_timeout=0.05)


def fails(op: str, err: int, fn: Callable[..., Any], *args: Any) -> LuoError:
    with pytest.raises(LuoError) as caught:
        fn(*args)
    assert (caught.value.op, errno.errorcode[caught.value.errno]) == (op, errno.errorcode[err])
    return caught.value


def preserved_session(
    luo: FakeBackend, fds: Fds, name: str, files: dict[int, bytes]
) -> tuple[int, dict[int, int]]:
    session = fds.add(luo.create_session(name))
    memfds = {}
    for token, data in files.items():
        memfds[token] = fds.memfd(data)
        luo.preserve_fd(session, memfds[token], token)
    return session, memfds


def kexec_and_retrieve(luo: FakeBackend, fds: Fds, name: str) -> int:
    luo.reboot_kexec()
    return fds.add(luo.retrieve_session(name))


def has_cloexec(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)


# -- the observed table, row by row ---------------------------------------------


def test_second_open_of_device_is_ebusy(luo: FakeBackend, fds: Fds) -> None:
    with luo.hold_device():
        err = fails("open", errno.EBUSY, luo.create_session, "s")
        assert err.message == uapi.describe("open", errno.EBUSY)
        fails("open", errno.EBUSY, luo.retrieve_session, "s")
        with pytest.raises(LuoError) as caught, luo.hold_device():
            pass
        assert caught.value.errno == errno.EBUSY
    fds.add(luo.create_session("s"))  # released when the holder closed it


def test_busy_device_is_waited_for_briefly(kernel: str, fds: Fds) -> None:
    holder, patient = FakeBackend(kernel), FakeBackend(kernel, busy_timeout=10)
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with holder.hold_device():
            held.set()
            release.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    try:
        assert held.wait(10)
        threading.Timer(0.2, release.set).start()
        start = time.monotonic()
        fds.add(patient.create_session("patient"))
        assert time.monotonic() - start >= 0.15
    finally:
        release.set()
        thread.join()


def _hold_until_killed(socket_path: str, ready: Connection) -> None:
    with FakeBackend(socket_path).hold_device():
        ready.send("held")
        time.sleep(60)


def test_device_is_released_when_its_holder_dies(luo: FakeBackend, fds: Fds) -> None:
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    child = ctx.Process(target=_hold_until_killed, args=(luo.socket_path, theirs))
    child.start()
    try:
        assert ours.poll(30) and ours.recv() == "held"
        fails("open", errno.EBUSY, luo.create_session, "s")
    finally:
        child.kill()
        child.join()
    fds.add(luo.create_session("s"))


def _unsupported_file(kind: str, luo: FakeBackend, fds: Fds, tmp_path: Path) -> int:
    if kind == "pipe":
        r, w = os.pipe()
        fds.add(w)
        return fds.add(r)
    if kind == "socket":
        a, b = socket.socketpair()
        fds.add(b.detach())
        return fds.add(a.detach())
    if kind == "regular file":
        regular = tmp_path / "regular"
        regular.write_bytes(b"on disk")
        return fds.add(os.open(regular, os.O_RDWR | os.O_CLOEXEC))
    if kind == "session fd":
        return fds.add(luo.create_session("other-session"))
    if kind == "device node":
        # /dev/liveupdate itself is a character device; the fake has none.
        return fds.add(os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC))
    assert kind == "directory"
    return fds.add(os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))


@pytest.mark.parametrize(
    "kind", ["pipe", "regular file", "session fd", "device node", "socket", "directory"]
)
def test_preserve_unsupported_file_is_enoent(
    luo: FakeBackend, fds: Fds, tmp_path: Path, kind: str
) -> None:
    session = fds.add(luo.create_session("s"))
    fd = _unsupported_file(kind, luo, fds, tmp_path)
    err = fails("preserve_fd", errno.ENOENT, luo.preserve_fd, session, fd, 1)
    assert err.message == uapi.describe("preserve_fd", errno.ENOENT)
    assert luo.snapshot()["outgoing"]["s"]["tokens"] == []


def test_preserve_hugetlb_memfd_is_refused(luo: FakeBackend, fds: Fds) -> None:
    try:
        huge = fds.add(os.memfd_create("huge", os.MFD_HUGETLB | os.MFD_CLOEXEC))
    except OSError as e:
        pytest.skip(f"no hugetlb memfds here: {e}")
    session = fds.add(luo.create_session("s"))
    fails("preserve_fd", errno.ENOENT, luo.preserve_fd, session, huge, 1)


def test_preserve_bad_fd_is_ebadf(luo: FakeBackend, fds: Fds) -> None:
    session = fds.add(luo.create_session("s"))
    closed = os.memfd_create("gone")
    os.close(closed)
    fails("preserve_fd", errno.EBADF, luo.preserve_fd, session, closed, 1)
    fails("preserve_fd", errno.EBADF, luo.preserve_fd, session, -1, 1)
    # The kernel checks the token before it looks the fd up.
    luo.preserve_fd(session, fds.memfd(b"x"), 2)
    fails("preserve_fd", errno.EEXIST, luo.preserve_fd, session, closed, 2)


def test_preserve_same_memfd_same_token_is_eexist(luo: FakeBackend, fds: Fds) -> None:
    session, memfds = preserved_session(luo, fds, "s", {1: b"a"})
    fails("preserve_fd", errno.EEXIST, luo.preserve_fd, session, memfds[1], 1)


def test_preserve_same_memfd_new_token_is_ebusy(luo: FakeBackend, fds: Fds) -> None:
    session, memfds = preserved_session(luo, fds, "s", {1: b"a"})
    fails("preserve_fd", errno.EBUSY, luo.preserve_fd, session, memfds[1], 2)
    # Another fd of the same file is the same file.
    dup = fds.add(os.dup(memfds[1]))
    fails("preserve_fd", errno.EBUSY, luo.preserve_fd, session, dup, 3)
    # A file can be in one session only.
    other = fds.add(luo.create_session("other"))
    fails("preserve_fd", errno.EBUSY, luo.preserve_fd, other, memfds[1], 1)


def test_preserve_other_memfd_used_token_is_eexist(luo: FakeBackend, fds: Fds) -> None:
    session, _ = preserved_session(luo, fds, "s", {1: b"a"})
    fails("preserve_fd", errno.EEXIST, luo.preserve_fd, session, fds.memfd(b"b"), 1)
    # Tokens are per session.
    other = fds.add(luo.create_session("other"))
    luo.preserve_fd(other, fds.memfd(b"c"), 1)


def test_create_session_whose_name_exists_is_eexist(luo: FakeBackend, fds: Fds) -> None:
    first = fds.add(luo.create_session("taken"))
    fails("create_session", errno.EEXIST, luo.create_session, "taken")
    fds.close(first)  # closing its last fd frees the name
    fds.add(luo.create_session("taken"))


def test_session_names_are_1_to_63_bytes(luo: FakeBackend, fds: Fds) -> None:
    fds.add(luo.create_session("x" * 63))
    fds.add(luo.create_session("é" * 31))  # 62 bytes
    for bad in ("", "x" * 64, "é" * 32, "a\0b"):
        # The fake kernel answers EINVAL...
        body, received = fake.call(luo.socket_path, "create_session", {"name": bad})
        assert received == []
        assert body == {"ok": False, "op": "create_session", "errno": errno.EINVAL}
        # ...which FakeBackend reports as KernelBackend does: ValueError.
        with pytest.raises(ValueError):
            luo.create_session(bad)
        with pytest.raises(ValueError):
            luo.retrieve_session(bad)
        with luo.hold_device():  # the device is opened first, as KernelBackend does
            fails("open", errno.EBUSY, luo.create_session, bad)


def test_before_kexec_retrieve_session_is_enoent(luo: FakeBackend, fds: Fds) -> None:
    preserved_session(luo, fds, "s", {1: b"a"})
    fails("retrieve_session", errno.ENOENT, luo.retrieve_session, "s")


def test_before_kexec_retrieve_fd_on_outgoing_is_einval(luo: FakeBackend, fds: Fds) -> None:
    session, _ = preserved_session(luo, fds, "s", {1: b"a"})
    fails("retrieve_fd", errno.EINVAL, luo.retrieve_fd, session, 1)
    fails("retrieve_fd", errno.EINVAL, luo.retrieve_fd, session, 99)


def test_before_kexec_finish_on_outgoing_is_einval(luo: FakeBackend, fds: Fds) -> None:
    session, _ = preserved_session(luo, fds, "s", {1: b"a"})
    fails("finish_session", errno.EINVAL, luo.finish_session, session)


def test_after_kexec_retrieve_session_twice_is_einval(luo: FakeBackend, fds: Fds) -> None:
    preserved_session(luo, fds, "s", {1: b"a"})
    kexec_and_retrieve(luo, fds, "s")
    fails("retrieve_session", errno.EINVAL, luo.retrieve_session, "s")


def test_after_kexec_unknown_session_is_enoent(luo: FakeBackend, fds: Fds) -> None:
    preserved_session(luo, fds, "s", {1: b"a"})
    luo.reboot_kexec()
    fails("retrieve_session", errno.ENOENT, luo.retrieve_session, "never-made")


def test_after_kexec_session_closed_before_kexec_is_enoent(luo: FakeBackend, fds: Fds) -> None:
    session, memfds = preserved_session(luo, fds, "closed", {1: b"a"})
    dup = fds.add(os.dup(session))
    fds.close(session)
    assert "closed" in luo.snapshot()["outgoing"]  # a dup keeps it alive
    fds.close(dup)
    assert luo.snapshot()["outgoing"] == {}
    # Everything in it was unpreserved: the memfd is free for another session.
    other = fds.add(luo.create_session("other"))
    luo.preserve_fd(other, memfds[1], 1)
    luo.reboot_kexec()
    fails("retrieve_session", errno.ENOENT, luo.retrieve_session, "closed")
    fds.add(luo.retrieve_session("other"))


def test_retrieve_same_token_twice_gives_same_inode(luo: FakeBackend, fds: Fds) -> None:
    preserved_session(luo, fds, "s", {1: b"a"})
    session = kexec_and_retrieve(luo, fds, "s")
    first = fds.add(luo.retrieve_fd(session, 1))
    second = fds.add(luo.retrieve_fd(session, 1))
    assert first != second
    assert os.fstat(first).st_ino == os.fstat(second).st_ino
    os.lseek(first, 1, os.SEEK_SET)  # the same open file, as in the kernel
    assert os.lseek(second, 0, os.SEEK_CUR) == 1


def test_retrieve_unknown_token_is_enoent(luo: FakeBackend, fds: Fds) -> None:
    preserved_session(luo, fds, "s", {1: b"a"})
    session = kexec_and_retrieve(luo, fds, "s")
    fails("retrieve_fd", errno.ENOENT, luo.retrieve_fd, session, 2)
    fds.add(luo.retrieve_fd(session, 1))


def test_preserve_into_retrieved_session_is_einval(luo: FakeBackend, fds: Fds) -> None:
    preserved_session(luo, fds, "s", {1: b"a"})
    session = kexec_and_retrieve(luo, fds, "s")
    fails("preserve_fd", errno.EINVAL, luo.preserve_fd, session, fds.memfd(b"new"), 2)
    fails("preserve_fd", errno.EINVAL, luo.preserve_fd, session, fds.memfd(b"new"), 1)


def test_finish_twice_then_retrieve_is_enoent(luo: FakeBackend, fds: Fds) -> None:
    preserved_session(luo, fds, "s", {1: b"one", 2: b"two"})
    session = kexec_and_retrieve(luo, fds, "s")
    kept = fds.add(luo.retrieve_fd(session, 1))
    luo.finish_session(session)
    luo.finish_session(session)
    fails("retrieve_fd", errno.ENOENT, luo.retrieve_fd, session, 1)
    fails("retrieve_fd", errno.ENOENT, luo.retrieve_fd, session, 2)
    # Already retrieved fds stay usable.
    assert os.pread(kept, 10, 0) == b"one"
    os.pwrite(kept, b"ONE", 0)
    assert os.pread(kept, 10, 0) == b"ONE"
    assert luo.session_name(session) == "s"


def test_session_fd_is_cloexec_0600_and_named(luo: FakeBackend, fds: Fds) -> None:
    name = "a-long-session-name-" + "n" * 43  # 63 bytes
    session = fds.add(luo.create_session(name))
    assert has_cloexec(session)
    assert stat.S_IMODE(os.fstat(session).st_mode) == 0o600
    assert luo.session_name(session) == name
    assert luo.identify_session(session) == name
    # Documented deviation: a fake session fd is a socket.
    assert fdinfo.inspect_fd(session).kind is fdinfo.FdKind.SOCKET
    luo.reboot_kexec()
    retrieved = fds.add(luo.retrieve_session(name))
    assert has_cloexec(retrieved)
    assert stat.S_IMODE(os.fstat(retrieved).st_mode) == 0o600
    assert luo.identify_session(retrieved) == name
    assert os.fstat(retrieved).st_ino != os.fstat(session).st_ino


def test_restored_memfd_keeps_size_bytes_position_and_is_writable(
    luo: FakeBackend, fds: Fds
) -> None:
    data = os.urandom(3 * 4096 + 17)
    _, memfds = preserved_session(luo, fds, "s", {5: data})
    os.lseek(memfds[5], 1234, os.SEEK_SET)
    os.pwrite(memfds[5], b"late write", 100)  # carried: serialized at the kexec
    expected = data[:100] + b"late write" + data[110:]
    old_ino = os.fstat(memfds[5]).st_ino
    restored = fds.add(luo.retrieve_fd(kexec_and_retrieve(luo, fds, "s"), 5))
    st = os.fstat(restored)
    assert st.st_size == len(data)
    assert hashlib.sha256(os.pread(restored, len(data) + 1, 0)).digest() == (
        hashlib.sha256(expected).digest()
    )
    assert os.lseek(restored, 0, os.SEEK_CUR) == 1234
    assert fdinfo.access_mode(restored) == os.O_RDWR
    assert has_cloexec(restored)
    assert fdinfo.fstatfs_type(restored) == uapi.TMPFS_MAGIC
    assert fdinfo.inspect_fd(restored).kind is fdinfo.FdKind.MEMFD
    assert st.st_ino != old_ino  # a new file, like the kernel's restore
    os.write(restored, b"!")
    assert os.pread(restored, 1, 1234) == b"!"


def test_restored_memfd_keeps_seals(luo: FakeBackend, fds: Fds) -> None:
    sealed = fds.memfd(b"frozen", flags=os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    seals = fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_WRITE
    fcntl.fcntl(sealed, fcntl.F_ADD_SEALS, seals)
    unsealable = fds.memfd(b"plain")  # no MFD_ALLOW_SEALING: F_SEAL_SEAL is set
    session = fds.add(luo.create_session("s"))
    luo.preserve_fd(session, sealed, 1)
    luo.preserve_fd(session, unsealable, 2)
    retrieved = kexec_and_retrieve(luo, fds, "s")
    first = fds.add(luo.retrieve_fd(retrieved, 1))
    second = fds.add(luo.retrieve_fd(retrieved, 2))
    assert fcntl.fcntl(first, fcntl.F_GET_SEALS) == seals
    assert fcntl.fcntl(second, fcntl.F_GET_SEALS) == fcntl.F_SEAL_SEAL
    assert os.pread(first, 10, 0) == b"frozen"
    with pytest.raises(PermissionError):
        os.pwrite(first, b"x", 0)


def test_restored_memfd_of_large_sparse_file(luo: FakeBackend, fds: Fds) -> None:
    memfd = fds.memfd()
    size = 1 << 30
    os.ftruncate(memfd, size)
    os.pwrite(memfd, b"tail", size - 4)
    session = fds.add(luo.create_session("sparse"))
    luo.preserve_fd(session, memfd, 1)
    restored = fds.add(luo.retrieve_fd(kexec_and_retrieve(luo, fds, "sparse"), 1))
    st = os.fstat(restored)
    assert st.st_size == size
    assert os.pread(restored, 4, size - 4) == b"tail"
    assert st.st_blocks * 512 < 16 << 20  # holes stayed holes


# -- lifetime rules beyond the table ----------------------------------------------


def test_closing_a_retrieved_session_finishes_it(luo: FakeBackend, fds: Fds) -> None:
    preserved_session(luo, fds, "s", {1: b"a", 2: b"b"})
    session = kexec_and_retrieve(luo, fds, "s")
    kept = fds.add(luo.retrieve_fd(session, 1))
    assert luo.snapshot()["incoming"]["s"]["retrieved_tokens"] == [1]
    fds.close(session)
    assert luo.snapshot()["incoming"] == {}
    fails("retrieve_session", errno.ENOENT, luo.retrieve_session, "s")
    assert os.pread(kept, 1, 0) == b"a"


def test_unfinished_incoming_sessions_are_discarded_at_next_kexec(
    luo: FakeBackend, fds: Fds
) -> None:
    preserved_session(luo, fds, "retrieved", {1: b"a"})
    preserved_session(luo, fds, "waiting", {1: b"b"})
    old = kexec_and_retrieve(luo, fds, "retrieved")
    luo.reboot_kexec()
    snap = luo.snapshot()
    assert (snap["incoming"], snap["outgoing"], snap["kexec_count"]) == ({}, {}, 2)
    fails("retrieve_session", errno.ENOENT, luo.retrieve_session, "waiting")
    fails("retrieve_fd", errno.EBADF, luo.retrieve_fd, old, 1)


def test_incoming_is_told_apart_without_changing_anything(luo: FakeBackend, fds: Fds) -> None:
    """luod.kernel.backend.is_incoming_session asks PRESERVE_FD with fd -1:
    EINVAL on an incoming session, EEXIST or EBADF on an outgoing one."""
    preserved_session(luo, fds, "old", {0: b"a", 1: b"b"})
    incoming = kexec_and_retrieve(luo, fds, "old")
    used, _ = preserved_session(luo, fds, "used", {0: b"c"})  # token 0 taken: EEXIST
    empty = fds.add(luo.create_session("empty"))  # EBADF
    before = luo.snapshot()
    assert is_incoming_session(luo, incoming)
    assert not is_incoming_session(luo, used) and not is_incoming_session(luo, empty)
    after = luo.snapshot()
    assert (after["incoming"], after["outgoing"]) == (before["incoming"], before["outgoing"])


def test_session_fds_of_a_previous_boot_are_dead(luo: FakeBackend, fds: Fds) -> None:
    session, _ = preserved_session(luo, fds, "s", {1: b"a"})
    luo.reboot_kexec()
    for op, call in [
        ("preserve_fd", lambda: luo.preserve_fd(session, fds.memfd(b"x"), 2)),
        ("retrieve_fd", lambda: luo.retrieve_fd(session, 1)),
        ("finish_session", lambda: luo.finish_session(session)),
        ("get_session_name", lambda: luo.session_name(session)),
    ]:
        fails(op, errno.EBADF, call)
    assert luo.identify_session(session) is None
    # The old fd is not the session of the new boot either.
    assert "s" in luo.snapshot()["incoming"]


def test_foreign_fds_are_no_sessions(luo: FakeBackend, fds: Fds) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    foreign = fds.add(a.detach())
    fds.add(b.detach())
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    memfd = fds.memfd(b"x")
    fds.add(luo.create_session("real"))
    with listener:
        for fd in (foreign, listener.fileno(), memfd):
            assert luo.identify_session(fd) is None
    fails("get_session_name", errno.ENOTTY, luo.session_name, foreign)
    fails("preserve_fd", errno.ENOTTY, luo.preserve_fd, memfd, memfd, 1)
    fails("finish_session", errno.EBADF, luo.finish_session, -1)
    with pytest.raises(OSError):
        luo.identify_session(-1)  # as KernelBackend: not an fd at all


def test_session_sent_into_itself_does_not_keep_itself_alive(luo: FakeBackend) -> None:
    session = luo.create_session("loop")
    with socket.socket(fileno=os.dup(session)) as sock:
        socket.send_fds(sock, [b"x"], [session])
    os.close(session)
    assert luo.snapshot()["outgoing"] == {}


def test_retrieved_memfd_can_be_preserved_again(luo: FakeBackend, fds: Fds) -> None:
    preserved_session(luo, fds, "gen1", {1: b"carried twice"})
    incoming = kexec_and_retrieve(luo, fds, "gen1")
    restored = fds.add(luo.retrieve_fd(incoming, 1))
    luo.finish_session(incoming)  # until FINISH the restored file is busy
    nxt = fds.add(luo.create_session("gen2"))
    luo.preserve_fd(nxt, restored, 1)
    again = fds.add(luo.retrieve_fd(kexec_and_retrieve(luo, fds, "gen2"), 1))
    assert os.pread(again, 100, 0) == b"carried twice"


def test_write_only_memfd_is_carried(luo: FakeBackend, fds: Fds) -> None:
    memfd = fds.memfd(b"secret")
    write_only = fds.add(os.open(f"/proc/self/fd/{memfd}", os.O_WRONLY | os.O_CLOEXEC))
    session = fds.add(luo.create_session("s"))
    luo.preserve_fd(session, write_only, 1)
    restored = fds.add(luo.retrieve_fd(kexec_and_retrieve(luo, fds, "s"), 1))
    assert os.pread(restored, 10, 0) == b"secret"


def test_tmpfile_on_tmpfs_is_preservable(luo: FakeBackend, fds: Fds) -> None:
    try:
        tmpfile = fds.add(os.open("/dev/shm", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC))
    except OSError as e:
        pytest.skip(f"no O_TMPFILE on /dev/shm: {e}")
    os.write(tmpfile, b"tmpfile")
    session = fds.add(luo.create_session("s"))
    luo.preserve_fd(session, tmpfile, 1)
    restored = fds.add(luo.retrieve_fd(kexec_and_retrieve(luo, fds, "s"), 1))
    assert os.pread(restored, 10, 0) == b"tmpfile"


def test_kexec_releases_the_device(luo: FakeBackend, fds: Fds) -> None:
    with luo.hold_device():
        assert luo.snapshot()["device_held"]
        luo.reboot_kexec()
        fds.add(luo.create_session("s"))


def test_snapshot_describes_sessions(luo: FakeBackend, fds: Fds) -> None:
    preserved_session(luo, fds, "a", {3: b"x", 1: b"y"})
    preserved_session(luo, fds, "b", {})
    snap = luo.snapshot()
    assert snap["kexec_count"] == 0 and not snap["device_held"]
    assert snap["outgoing"]["a"]["tokens"] == [1, 3]
    assert snap["outgoing"]["b"]["tokens"] == []
    assert snap["incoming"] == {}
    session = kexec_and_retrieve(luo, fds, "a")
    fds.add(luo.retrieve_fd(session, 3))
    snap = luo.snapshot()
    assert snap["kexec_count"] == 1
    assert set(snap["incoming"]) == {"a", "b"}
    assert snap["incoming"]["a"] == {
        "tokens": [1, 3],
        "retrieved_tokens": [3],
        "client_open": True,
        "retrieved": True,
        "finished": False,
    }
    assert not snap["incoming"]["b"]["retrieved"]
    luo.finish_session(session)
    assert luo.snapshot()["incoming"]["a"]["finished"]


# -- across processes ---------------------------------------------------------------

CHILD_DATA = b"made in a child process"


def _create_session_in_child(socket_path: str, conn: Connection, name: str, send: bool) -> None:
    luo = FakeBackend(socket_path)
    session = luo.create_session(name)
    memfd = os.memfd_create("child")
    os.write(memfd, CHILD_DATA)
    luo.preserve_fd(session, memfd, 7)
    if send:
        reduction.send_handle(conn, session, os.getppid())
    # Exits without waiting: the fd in flight keeps the session alive.


def _run_child(socket_path: str, name: str, send: bool) -> int | None:
    ctx = multiprocessing.get_context("spawn")
    ours, theirs = ctx.Pipe()
    child = ctx.Process(target=_create_session_in_child, args=(socket_path, theirs, name, send))
    child.start()
    theirs.close()
    child.join(60)
    assert child.exitcode == 0
    session = reduction.recv_handle(ours) if send else None
    ours.close()
    return session


def test_session_handed_over_by_exited_child_survives(luo: FakeBackend, fds: Fds) -> None:
    session = _run_child(luo.socket_path, "from-child", send=True)
    assert session is not None
    fds.add(session)
    assert luo.snapshot()["outgoing"]["from-child"]["tokens"] == [7]
    assert luo.identify_session(session) == "from-child"
    restored = fds.add(luo.retrieve_fd(kexec_and_retrieve(luo, fds, "from-child"), 7))
    assert os.pread(restored, 100, 0) == CHILD_DATA


def test_session_closed_by_its_last_holder_is_dropped_at_kexec(luo: FakeBackend) -> None:
    session = _run_child(luo.socket_path, "from-child", send=True)
    assert session is not None
    assert "from-child" in luo.snapshot()["outgoing"]
    os.close(session)
    luo.reboot_kexec()
    fails("retrieve_session", errno.ENOENT, luo.retrieve_session, "from-child")


def test_session_of_exited_child_is_dropped(luo: FakeBackend) -> None:
    _run_child(luo.socket_path, "kept-by-nobody", send=False)
    assert luo.snapshot()["outgoing"] == {}


def test_command_line_kexec_and_snapshot(luo: FakeBackend, fds: Fds) -> None:
    preserved_session(luo, fds, "s", {1: b"a"})
    cli = [sys.executable, "-m", "testsupport.fakekernel"]
    out = subprocess.run(
        [*cli, "kexec", "--socket", luo.socket_path], check=True, capture_output=True, text=True
    )
    assert "kexec 1" in out.stdout
    out = subprocess.run(
        [*cli, "snapshot", "--socket", luo.socket_path], check=True, capture_output=True, text=True
    )
    assert '"s"' in out.stdout
    assert fake.kexec(luo.socket_path) == 2
    assert fake.snapshot(luo.socket_path)["incoming"] == {}


# -- the fake kernel's own hygiene ----------------------------------------------------


def test_server_fds_return_to_baseline(luo: FakeBackend, fds: Fds, tmp_path: Path) -> None:
    baseline = luo.snapshot()["server_fds"]
    session, memfds = preserved_session(luo, fds, "s", {1: b"a"})
    holding = luo.snapshot()["server_fds"]
    assert holding == baseline + 2  # the session's peer end and the memfd
    r = _unsupported_file("pipe", luo, fds, tmp_path)
    other = fds.memfd(b"b")
    for _ in range(30):
        fails("create_session", errno.EEXIST, luo.create_session, "s")
        fails("preserve_fd", errno.ENOENT, luo.preserve_fd, session, r, 2)
        fails("preserve_fd", errno.ENOENT, luo.preserve_fd, session, session, 2)
        fails("preserve_fd", errno.EEXIST, luo.preserve_fd, session, other, 1)
        fails("preserve_fd", errno.EBUSY, luo.preserve_fd, session, memfds[1], 2)
        fails("preserve_fd", errno.ENOTTY, luo.preserve_fd, other, other, 2)
        fails("retrieve_fd", errno.EINVAL, luo.retrieve_fd, session, 1)
        fails("finish_session", errno.EINVAL, luo.finish_session, session)
        fails("retrieve_session", errno.ENOENT, luo.retrieve_session, "s")
        assert luo.identify_session(r) is None
        assert fake.call(luo.socket_path, "no-such-op")[0]["errno"] == errno.EOPNOTSUPP
        with luo.hold_device():
            fails("open", errno.EBUSY, luo.create_session, "t")
        body, received = fake.call(luo.socket_path, "preserve_fd", {"token": -1}, [session, other])
        assert (body["errno"], received) == (errno.EINVAL, [])
    assert luo.snapshot()["server_fds"] == holding
    luo.reboot_kexec()
    retrieved = fds.add(luo.retrieve_session("s"))
    fds.add(luo.retrieve_fd(retrieved, 1))
    for _ in range(30):
        fails("retrieve_fd", errno.ENOENT, luo.retrieve_fd, retrieved, 9)
        fails("retrieve_session", errno.EINVAL, luo.retrieve_session, "s")
        fails("preserve_fd", errno.EINVAL, luo.preserve_fd, retrieved, other, 2)
        fails("get_session_name", errno.EBADF, luo.session_name, session)
    fds.close(retrieved)
    assert luo.snapshot()["server_fds"] == baseline


# -- the Backend contract -------------------------------------------------------------


def test_fake_backend_is_a_backend(kernel: str) -> None:
    backend: Backend = FakeBackend(kernel)  # mypy checks the signatures
    assert backend.name == "fake"
    assert backend.unavailable_reason() is None
    public = {n for n in dir(KernelBackend) if not n.startswith("_")}
    assert public <= {n for n in dir(FakeBackend) if not n.startswith("_")}


def test_unavailable_when_no_fake_kernel_runs(tmp_path: Path, fds: Fds) -> None:
    luo = FakeBackend(tmp_path / "nothing.sock")
    reason = luo.unavailable_reason()
    assert reason is not None and "nothing.sock" in reason
    fails("open", errno.ENOENT, luo.create_session, "s")
    fails("open", errno.ENOENT, luo.retrieve_session, "s")


def test_returned_fds_are_cloexec(luo: FakeBackend, fds: Fds) -> None:
    preserved_session(luo, fds, "s", {1: b"a"})
    session = kexec_and_retrieve(luo, fds, "s")
    assert has_cloexec(session)
    assert has_cloexec(fds.add(luo.retrieve_fd(session, 1)))
    assert has_cloexec(fds.add(luo.create_session("new")))


def test_retrieved_file_is_busy_until_finish(kernel: str, luo: FakeBackend) -> None:
    """luo_retrieve_file() keeps a restored file in luo_preserved_files until
    FINISH, so re-preserving it into a new session before that is EBUSY."""
    k = luo
    s = k.create_session("a")
    m = os.memfd_create("x", os.MFD_CLOEXEC)
    k.preserve_fd(s, m, 1)
    fake.kexec(kernel)
    inc = k.retrieve_session("a")
    got = k.retrieve_fd(inc, 1)
    out = k.create_session("b")
    with pytest.raises(LuoError) as e:
        k.preserve_fd(out, got, 1)
    assert e.value.errno == errno.EBUSY
    k.finish_session(inc)
    k.preserve_fd(out, got, 1)
    for fd in (s, m, inc, got, out):
        os.close(fd)
