"""Unit tests of luod.carriers.fdstore against the fake kernel, with the
service manager's fd store played by a recorder of notify messages (the
whole fake service manager, FakePid1, plays in tests/test_fdstore.py's
scenarios)."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator, Sequence

import pytest

from luod.carriers import IncomingState
from luod.carriers.fdstore import (
    SESSION_FDNAME_PREFIX,
    FdStoreCarrier,
    fdname_for,
    kernel_name_of_parking,
    parking_fdname,
)
from luod.carriers.slots import SlotMemfd
from luod.kernel import fdinfo
from luod.kernel.backend import LuoError
from luod.manifest import ManifestError
from luod.notify import ListenFd
from testsupport.fakekernel import FakeBackend
from testsupport.fakepid1 import fdname_is_valid
from testsupport.util import make_memfd


class Notes:
    """The notify messages a carrier sent, with a copy of every fd; `ok`
    says whether the service manager takes the next one."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, list[int]]] = []  # (message, a copy of each fd)
        self.ok = True

    def __call__(self, message: str, fds: Sequence[int]) -> bool:
        if not self.ok:
            return False
        self.sent.append((message, [os.dup(fd) for fd in fds]))
        return True

    def lines(self) -> list[str]:
        return [" ".join(m.split("\n")[:2]) for m, _fds in self.sent]

    def pushed_all(self, fdname: str) -> list[int]:
        """The copies of the fds of the last message pushed under `fdname`."""
        return [fds for m, fds in self.sent if f"FDNAME={fdname}\n" in m][-1]

    def pushed(self, fdname: str) -> int:
        """The copy of the (first) fd last pushed under `fdname`."""
        return self.pushed_all(fdname)[0]

    def close(self) -> None:
        for _m, fds in self.sent:
            for fd in fds:
                os.close(fd)


@pytest.fixture
def notes() -> Iterator[Notes]:
    n = Notes()
    yield n
    n.close()


def test_sessions_and_manifest_go_into_the_store(kernel: FakeBackend, notes: Notes) -> None:
    carrier = FdStoreCarrier(kernel, [], store_max=8, send=notes)
    sfd = kernel.create_session("luod.1.app")
    try:
        assert carrier.load() is None
        carrier.finish_incoming()
        carrier.save(b"{}")
        carrier.session_held("luod.1.app", sfd)
        carrier.save(b"{1}")  # in place: nothing to push
        carrier.session_dropped("luod.1.app")
        assert notes.lines() == [
            "FDSTORE=1 FDNAME=luod-manifest-a",
            "FDSTORE=1 FDNAME=session.luod.1.app",
            "FDSTOREREMOVE=1 FDNAME=session.luod.1.app",
        ]
        assert carrier.holds_after_exit and carrier.problems() == []
        assert carrier.describe() == (
            "fd store: manifest 'luod-manifest-a' (65536 bytes), 0 session fds of at most 8"
        )
    finally:
        carrier.close()
        os.close(sfd)


def test_what_the_store_refused_is_a_problem_until_it_is_pushed(
    kernel: FakeBackend, notes: Notes
) -> None:
    carrier = FdStoreCarrier(kernel, [], send=notes, kexec_problem="systemd 255 drops it")
    sfd = kernel.create_session("s")
    try:
        notes.ok = False
        carrier.save(b"{}")
        carrier.session_held("s", sfd)
        assert [(p.kernel_name, p.reason.split(":")[0]) for p in carrier.problems()] == [
            ("s", "its session fd is not in luod's fd store"),
            (None, "the manifest 'luod-manifest-a' is not in luod's fd store"),
            (None, "systemd 255 drops it"),
        ]
        assert carrier.describe().endswith(
            "; NOT carried over a kexec by the service manager; 2 not in the store"
        )
        notes.ok = True
        carrier.save(b"{}")  # the next save pushes the manifest again
        carrier.session_dropped("s")
        assert [p.reason for p in carrier.problems()] == ["systemd 255 drops it"]
        assert notes.lines() == ["FDSTORE=1 FDNAME=luod-manifest-a"]
    finally:
        carrier.close()
        os.close(sfd)


def test_the_next_luod_takes_over_what_the_manifest_names(
    kernel: FakeBackend, notes: Notes
) -> None:
    named = kernel.create_session("luod.1.named")
    unnamed = kernel.create_session("luod.2.unnamed")
    manifest = SlotMemfd.create("luod-manifest-b", 7, b'{"the": "manifest"}')
    listen = [
        ListenFd(manifest.fd, "luod-manifest-b"),
        ListenFd(named, fdname_for("luod.1.named")),
        ListenFd(unnamed, "renamed"),  # the kernel's name counts, not the label
        ListenFd(make_memfd(b"junk"), "stray"),
    ]
    carrier = FdStoreCarrier(kernel, listen, send=notes)
    try:
        assert carrier.load() == IncomingState(
            b'{"the": "manifest"}', "fd store entry 'luod-manifest-b'"
        )
        assert carrier.retrieve_session("luod.1.named") == named
        with pytest.raises(LuoError) as e:
            carrier.retrieve_session("luod.3.absent")
        assert e.value.errno == errno.ENOENT
        carrier.finish_incoming()
        assert not fdinfo.is_valid_fd(unnamed)  # released: nobody knows it
        assert notes.lines() == [
            "FDSTOREREMOVE=1 FDNAME=renamed",
            "FDSTOREREMOVE=1 FDNAME=stray",
        ]
        # It writes on in the incoming manifest, which the store has.
        carrier.save(b"{}")
        assert len(notes.sent) == 2
        assert "manifest 'luod-manifest-b'" in carrier.describe()
        assert "1 session fds" in carrier.describe()
    finally:
        carrier.close()
        os.close(named)


def test_a_session_stored_twice_is_kept_once(kernel: FakeBackend, notes: Notes) -> None:
    sfd = kernel.create_session("s")
    listen = [ListenFd(sfd, fdname_for("s")), ListenFd(os.dup(sfd), "s-again")]
    carrier = FdStoreCarrier(kernel, listen, send=notes)
    try:
        with pytest.raises(ManifestError, match="no manifest"):
            carrier.load()  # sessions but no manifest: nothing is released
        assert carrier.retrieve_session("s") == sfd
        carrier.finish_incoming()
        assert notes.lines() == ["FDSTOREREMOVE=1 FDNAME=s-again"]
    finally:
        carrier.close()
        os.close(sfd)


def test_a_memfd_named_like_a_manifest_must_be_one(kernel: FakeBackend, notes: Notes) -> None:
    a, b = os.pipe()
    carrier = FdStoreCarrier(kernel, [ListenFd(a, "luod-manifest-a")], send=notes)
    try:
        assert not fdinfo.is_valid_fd(a)
        assert carrier.load() is None
        # Its name is in use again by the time the junk goes: kept.
        carrier.save(b"{}")
        carrier.finish_incoming()
        assert notes.lines() == ["FDSTORE=1 FDNAME=luod-manifest-a"]
    finally:
        carrier.close()
        os.close(b)


def test_rebuild_pushes_the_new_manifest_before_removing_the_old(
    kernel: FakeBackend, notes: Notes
) -> None:
    carrier = FdStoreCarrier(kernel, [], store_max=10, send=notes)
    try:
        assert carrier.load() is None
        carrier.save(b"{}")
        carrier.save(b"x" * 40_000)  # more than a 64 KiB memfd's slot
        carrier.save(b"y" * 200_000)
        assert [m for m, _fd in notes.sent] == [
            "FDSTORE=1\nFDNAME=luod-manifest-a\nFDPOLL=0",
            "FDSTORE=1\nFDNAME=luod-manifest-b\nFDPOLL=0",
            "FDSTOREREMOVE=1\nFDNAME=luod-manifest-a",
            "FDSTORE=1\nFDNAME=luod-manifest-a\nFDPOLL=0",
            "FDSTOREREMOVE=1\nFDNAME=luod-manifest-b",
        ]
        # The store's copy is the memfd luod writes to.
        carrier.save(b"z")
        stored = os.dup(notes.pushed("luod-manifest-a"))
        newest = FdStoreCarrier(kernel, [ListenFd(stored, "luod-manifest-a")])
        state = newest.load()
        assert state == IncomingState(b"z", "fd store entry 'luod-manifest-a'")
        newest.close()
    finally:
        carrier.close()


def test_full_store_is_a_problem(kernel: FakeBackend, notes: Notes) -> None:
    carrier = FdStoreCarrier(kernel, [], store_max=2, send=notes)
    sessions = [kernel.create_session(f"s{i}") for i in range(2)]
    try:
        carrier.save(b"{}")
        carrier.session_held("s0", sessions[0])
        carrier.session_held("s1", sessions[1])  # the manifest and s0 fill it
        assert [
            (p.kernel_name, "lost when luod stops" in p.reason) for p in carrier.problems()
        ] == [("s1", True)]
        assert "1 not in the store" in carrier.describe()
        carrier.session_dropped("s1")
        assert carrier.problems() == []
    finally:
        carrier.close()
        for fd in sessions:
            os.close(fd)


def test_unreadable_manifest_raises_and_keeps_everything(kernel: FakeBackend, notes: Notes) -> None:
    sfd = kernel.create_session("kept")
    bad = make_memfd(b"\0" * 8192)
    carrier = FdStoreCarrier(
        kernel,
        [ListenFd(bad, "luod-manifest-a"), ListenFd(sfd, fdname_for("kept"))],
        send=notes,
    )
    with pytest.raises(ManifestError):
        carrier.load()
    # Nothing was closed: the session is still there to be looked at.
    assert kernel.identify_session(sfd) == "kept"
    carrier.close()
    assert not fdinfo.is_valid_fd(sfd)  # close() closes luod's copies


@pytest.mark.parametrize(
    "kernel_name", ["luod.1.app", "a:b", "x" * 63, "odd%name", "sp ace", "ünï"]
)
def test_fdname_for_is_a_valid_unique_fd_name(kernel_name: str) -> None:
    name = fdname_for(kernel_name)
    assert fdname_is_valid(name)
    assert name.startswith(SESSION_FDNAME_PREFIX)
    assert ":" not in name
    assert fdname_for("a:b") != fdname_for("a%3Ab")


# --- luod's references to the files, and the journal (issue 11) ---------------------


@pytest.mark.parametrize("kernel_name", ["luod.1.u0.app", "a:b%c", "x" * 63])
def test_parking_fdnames_are_valid_and_name_the_session(kernel_name: str) -> None:
    name = parking_fdname(kernel_name)
    assert fdname_is_valid(name) and len(name) <= 255
    assert kernel_name_of_parking(name) == kernel_name


@pytest.mark.parametrize("name", ["refs.", "session.x", "file.u0.1.app", "refs.%ZZ"])
def test_other_fdnames_are_no_parkings(name: str) -> None:
    assert kernel_name_of_parking(name) is None or name == "refs.%ZZ"


def _contents(fd: int) -> bytes:
    try:
        return os.pread(fd, 10, 0)
    finally:
        os.close(fd)


def test_kept_files_come_back_and_the_rest_is_released(kernel: FakeBackend, notes: Notes) -> None:
    carrier = FdStoreCarrier(kernel, [], send=notes)
    files = {token: make_memfd(b"f%d" % token) for token in range(1, 4)}
    try:
        assert carrier.load() is None
        carrier.keep_files("luod.1.u0.app", [(1, files[1])])
        carrier.keep_files("luod.1.u0.app", [(2, files[2]), (3, files[3])])
        carrier.keep_files("luod.2.u0.gone", [(1, files[1])])
        carrier.release_files("luod.2.u0.gone")
        carrier.release_files("luod.3.u0.never")  # nothing kept: nothing to remove
        # Two entries per session (the parking's ends) in one message; the
        # files themselves never reach PID 1.
        assert notes.lines() == [
            "FDSTORE=1 FDNAME=refs.luod.1.u0.app",
            "FDSTORE=1 FDNAME=refs.luod.2.u0.gone",
            "FDSTOREREMOVE=1 FDNAME=refs.luod.2.u0.gone",
        ]
        ends = notes.pushed_all("refs.luod.1.u0.app")
    finally:
        carrier.close()
        for fd in files.values():
            os.close(fd)
    # The next luod: what it takes back, and a parking the manifest does not name.
    stale = FdStoreCarrier(kernel, [], send=notes)
    memfd = make_memfd(b"stale")
    stale.keep_files("luod.9.u0.old", [(7, memfd)])
    os.close(memfd)
    stale.close()
    listen = [ListenFd(os.dup(fd), "refs.luod.1.u0.app") for fd in ends]
    listen += [
        ListenFd(os.dup(fd), "refs.luod.9.u0.old") for fd in notes.pushed_all("refs.luod.9.u0.old")
    ]
    mark = len(notes.sent)
    carrier = FdStoreCarrier(kernel, listen, send=notes)
    try:
        kept = carrier.kept_files("luod.1.u0.app")
        assert {t: _contents(fd) for t, fd in kept.items()} == {1: b"f1", 2: b"f2", 3: b"f3"}
        assert carrier.kept_files("luod.1.u0.app") == {}  # handed out once
        carrier.release_unclaimed()
        assert notes.lines()[mark:] == ["FDSTOREREMOVE=1 FDNAME=refs.luod.9.u0.old"]
    finally:
        carrier.close()
    # Taken back, they were parked again: a third luod finds them too.
    listen = [ListenFd(os.dup(fd), "refs.luod.1.u0.app") for fd in ends]
    carrier = FdStoreCarrier(kernel, listen, send=notes)
    try:
        assert sorted(carrier.kept_files("luod.1.u0.app")) == [1, 2, 3]
    finally:
        carrier.close()


def test_an_intent_counts_until_the_next_commit(kernel: FakeBackend, notes: Notes) -> None:
    carrier = FdStoreCarrier(kernel, [], send=notes)
    try:
        assert carrier.load() is None
        carrier.save(b"{}")
        carrier.intend(b"first")
        carrier.intend(b"second")  # a later one replaces it
    finally:
        carrier.close()

    def restarted(then: bytes | None = None) -> IncomingState | None:
        """What the next luod finds in the store; `then`: it commits that."""
        names = ("luod-manifest-a", "luod-journal")
        c = FdStoreCarrier(kernel, [ListenFd(os.dup(notes.pushed(n)), n) for n in names])
        try:
            state = c.load()
            if then is not None:
                c.save(then)
            return state
        finally:
            c.close()

    state = restarted()
    assert state is not None and state.intent == b"second"
    restarted(then=b"{2}")  # a commit after the intent voids it
    state = restarted()
    assert state is not None and state.intent is None
