"""luoctl handback against luod on the fake kernel, with a fake service
manager: a datagram socket standing in for PID 1's notify socket, which
takes FDSTORE=1 messages with their fds and answers BARRIER=1 the way
PID 1 does (by closing the pipe end that came with it)."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from testsupport.luodproc import LuodProcess
from testsupport.util import make_memfd, memfd_facts


@dataclasses.dataclass
class Message:
    fields: dict[str, str]
    fds: list[int]


@dataclasses.dataclass
class FakeManager:
    """The service manager's side of $NOTIFY_SOCKET, for one luoctl run."""

    path: Path
    sock: socket.socket
    messages: list[Message] = dataclasses.field(default_factory=list)
    answer_barrier: bool = True

    def env(self, fd_store_max: int | None = 8) -> dict[str, str]:
        env = dict(os.environ, NOTIFY_SOCKET=str(self.path))
        env.pop("FDSTORE", None)
        if fd_store_max is not None:
            env["FDSTORE"] = str(fd_store_max)
        return env

    def pump(self) -> None:
        """Take what arrived; answer BARRIER=1 at once, as PID 1 does."""
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.sock, 4096, 16)
            except BlockingIOError:
                return
            fields = dict(line.partition("=")[::2] for line in data.decode().split("\n") if line)
            if fields.get("BARRIER") == "1" and self.answer_barrier:
                for fd in fds:
                    os.close(fd)
                fds = []
            self.messages.append(Message(fields, fds))

    def stored(self) -> list[tuple[str, int]]:
        """(FDNAME, fd) of every FDSTORE=1 message, in order."""
        out = []
        for m in self.messages:
            if m.fields.get("FDSTORE") == "1":
                assert len(m.fds) == 1, m
                out.append((m.fields["FDNAME"], m.fds[0]))
        return out

    def close(self) -> None:
        for m in self.messages:
            for fd in m.fds:
                os.close(fd)
        self.messages = []
        self.sock.close()


@pytest.fixture
def manager(workdir: Path) -> Iterator[FakeManager]:
    path = workdir / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    sock.bind(str(path))
    sock.setblocking(False)
    m = FakeManager(path, sock)
    yield m
    m.close()


def handback(
    luod: LuodProcess, manager: FakeManager, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `luoctl handback ARGS` as ExecStartPre= would, serving the
    notify socket while it runs."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "luod.cli", f"--socket={luod.socket}", "handback", *args],
        env=manager.env() if env is None else env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        manager.pump()
        time.sleep(0.01)
    if proc.poll() is None:
        proc.kill()
    out, err = proc.communicate(timeout=10)
    manager.pump()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def preserve(luod: LuodProcess, session: str, files: dict[str, bytes]) -> dict[str, str]:
    """Hand memfds to luod; their sha256 by name."""
    digests = {}
    with luod.client() as c:
        for i, (name, data) in enumerate(files.items()):
            fd = make_memfd(data, position=len(data) // 2, name=name)
            try:
                c.preserve_fd(session, name, fd, create_session=i == 0)
                digests[name] = memfd_facts(fd).sha256
            finally:
                os.close(fd)
    return digests


FILES = {
    "index": os.urandom(300_000),
    "wal.0": os.urandom(4096),
    "empty": b"",
}


def test_handback_copies_every_fd_into_the_store(luod: LuodProcess, manager: FakeManager) -> None:
    digests = preserve(luod, "cache", FILES)
    luod.kexec()  # the fds went through a kexec, as at boot

    r = handback(luod, manager, "cache")
    assert r.returncode == 0, r.stderr
    assert "handed 3 fds of session 'cache'" in r.stdout and "luod keeps custody" in r.stdout

    stored = manager.stored()
    assert sorted(name for name, _ in stored) == sorted(FILES)
    for name, fd in stored:
        facts = memfd_facts(fd)
        assert facts.sha256 == digests[name], name
        assert facts.size == len(FILES[name])
        assert facts.position == len(FILES[name]) // 2
        assert os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:"), name
    # Every FDSTORE=1 came before the BARRIER=1, which came last.
    kinds = [("FDSTORE" in m.fields, "BARRIER" in m.fields) for m in manager.messages]
    assert kinds == [(True, False)] * 3 + [(False, True)], manager.messages

    # Copies: luod keeps custody, and it is the same file (a write through
    # the fd store's copy is what luod carries over the next kexec).
    with luod.client() as c:
        [session] = c.list_sessions("cache")
        assert sorted(f["name"] for f in session["files"]) == sorted(FILES)
    index = dict(stored)["index"]
    os.pwrite(index, b"written by the service", 0)
    with luod.client() as c:
        fd = c.retrieve_fd("cache", "index")
    try:
        assert os.pread(fd, 22, 0) == b"written by the service"
    finally:
        os.close(fd)


def test_take_ends_custody_after_the_manager_confirmed(
    luod: LuodProcess, manager: FakeManager
) -> None:
    digests = preserve(luod, "app", {"state": b"s" * 70_000, "journal": b"j" * 10})
    r = handback(luod, manager, "app", "--take")
    assert r.returncode == 0, r.stderr
    assert "luod let go of them" in r.stdout
    got = {name: memfd_facts(fd).sha256 for name, fd in manager.stored()}
    assert got == digests
    with luod.client() as c:
        assert all(s["name"] != "app" for s in c.list_sessions())
    # Again (a restart of the unit): the session is gone now.
    r = handback(luod, manager, "app", "--take")
    assert r.returncode == 1 and r.stderr == "luoctl: no session named 'app'\n", r.stderr
    r = handback(luod, manager, "app", "--take", "--optional")
    assert r.returncode == 0, r.stderr


def test_missing_session_fails_unless_optional(luod: LuodProcess, manager: FakeManager) -> None:
    r = handback(luod, manager, "first-boot")
    assert r.returncode == 1
    assert r.stderr == "luoctl: no session named 'first-boot'\n"
    assert manager.messages == []

    r = handback(luod, manager, "first-boot", "--optional")
    assert r.returncode == 0, r.stderr
    assert "no session named 'first-boot'" in r.stderr and "nothing to hand back" in r.stderr
    assert manager.messages == []


def test_without_a_notify_socket_or_fd_store(luod: LuodProcess, manager: FakeManager) -> None:
    preserve(luod, "cache", {"index": b"x"})
    env = manager.env()
    del env["NOTIFY_SOCKET"]
    for args in (("cache",), ("cache", "--optional")):
        r = handback(luod, manager, *args, env=env)
        assert r.returncode == 1, r
        assert r.stderr.startswith("luoctl: handback: $NOTIFY_SOCKET is not set"), r.stderr
        assert "NotifyAccess=all" in r.stderr and "FileDescriptorStoreMax=" in r.stderr

    r = handback(luod, manager, "cache", env=manager.env(fd_store_max=None))
    assert r.returncode == 1
    assert "the unit has no fd store ($FDSTORE is not set)" in r.stderr, r.stderr
    assert "FileDescriptorStoreMax=" in r.stderr

    preserve(luod, "big", {"a": b"a", "b": b"b", "c": b"c"})
    r = handback(luod, manager, "big", env=manager.env(fd_store_max=2))
    assert r.returncode == 1
    assert "holds 3 fds, the fd store takes 2" in r.stderr, r.stderr
    assert manager.messages == []
    with luod.client() as c:
        assert len(c.list_sessions("big")[0]["files"]) == 3


def test_notify_socket_gone(luod: LuodProcess, manager: FakeManager, workdir: Path) -> None:
    preserve(luod, "cache", {"index": b"x" * 100})
    env = manager.env()
    env["NOTIFY_SOCKET"] = str(workdir / "no-such-socket")
    r = handback(luod, manager, "cache", "--take", env=env)
    assert r.returncode == 1
    assert "cannot send to $NOTIFY_SOCKET: No such file or directory" in r.stderr, r.stderr
    with luod.client() as c:  # nothing was taken
        assert len(c.list_sessions("cache")[0]["files"]) == 1


def test_empty_and_delegated_sessions(luod: LuodProcess, manager: FakeManager) -> None:
    with luod.client() as c:
        c.create_session("nothing")
        os.close(c.create_delegated_session("own"))
    r = handback(luod, manager, "nothing")
    assert r.returncode == 0, r.stderr
    assert "handed 0 fds" in r.stdout
    assert manager.stored() == []

    r = handback(luod, manager, "own")
    assert r.returncode == 1
    assert "session 'own' is delegated" in r.stderr and "retrieve-session" in r.stderr
