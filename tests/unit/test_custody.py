"""luod.custody: the operations clients call, against the fake kernel, in
process: what each keeps, what it refuses, and that nothing changes (and
no fd leaks) when it refuses."""

from __future__ import annotations

import errno
import os
from typing import Any

import pytest

from luod import errors
from luod.custody import Custodian, Handoff
from luod.kernel.backend import LuoError
from luod.manifest import ManifestError, from_json, to_json
from luod.model import Holdings, SessionKind, SessionState
from luod.peer import Peer
from tests.unit.spycarrier import SpyCarrier
from testsupport.fakekernel import FakeBackend
from testsupport.util import fd_is_open, make_memfd

ROOT = Peer(pid=1, uid=0, gid=0, comm="root-client")
ALICE = Peer(pid=2, uid=1000, gid=1000, unit="alice.service")
BOB = Peer(pid=3, uid=1001, gid=1001, comm="bob")


@pytest.fixture
def custodian_options() -> dict[str, Any]:
    """The `custodian` fixture's (tests/unit/conftest.py) options."""
    return {"grace": 60}


def _handoffs(*names: str) -> list[Handoff]:
    return [
        Handoff(n, make_memfd(f"data {n}".encode()), f"files[{i}]") for i, n in enumerate(names)
    ]


def _outgoing(kernel: FakeBackend) -> dict[str, list[int]]:
    """Outgoing kernel sessions (but luod's own state session) and their tokens."""
    snap = kernel.snapshot()
    return {n: s["tokens"] for n, s in snap["outgoing"].items() if n not in ("luod", "luod.b")}


# --- sessions ------------------------------------------------------------------


def test_create_session(custodian: Custodian, kernel: FakeBackend) -> None:
    s = custodian.create_session(ALICE, "app")
    assert (s.name, s.kind, s.state, s.kernel_name) == (
        "app",
        SessionKind.MANAGED,
        SessionState.OUTGOING,
        "luod.1.u1000.app",
    )
    assert s.owner.uid == 1000 and s.owner.unit == "alice.service"
    assert _outgoing(kernel) == {"luod.1.u1000.app": []}
    with pytest.raises(errors.SessionExists):
        custodian.create_session(ALICE, "app")
    # Names are per owner: Bob's "app" is his own, and nothing tells him
    # Alice has one.
    assert custodian.create_session(BOB, "app").kernel_name == "luod.2.u1001.app"
    with pytest.raises(errors.ReservedSessionName):
        custodian.create_session(ALICE, "luod-app")
    with pytest.raises(errors.InvalidName):
        custodian.create_session(ALICE, "")
    # The kernel names are never used again, also after the session is gone.
    custodian.discard_session(ALICE, "app")
    assert custodian.create_session(ALICE, "app").kernel_name == "luod.3.u1000.app"


def test_every_change_is_written_down(custodian: Custodian, carrier: SpyCarrier) -> None:
    before = carrier.saves()
    custodian.create_session(ALICE, "app")
    assert carrier.saves() == before + 1
    custodian.preserve_fds(ALICE, "app", _handoffs("a", "b"))
    assert carrier.saves() == before + 2  # one write for a batch


# --- hand-off ------------------------------------------------------------------


def test_preserve_fds_creates_and_keeps(custodian: Custodian, kernel: FakeBackend) -> None:
    files = _handoffs("a", "b", "c")
    added = custodian.preserve_fds(ALICE, "app", files, create=True)
    assert [(f.name, f.token, f.size) for f in added] == [("a", 1, 6), ("b", 2, 6), ("c", 3, 6)]
    # Kept by the session: the handed-off entries no longer own them.
    assert all(h.fd == -1 for h in files)
    assert all(fd_is_open(f.fd) for f in added)
    assert _outgoing(kernel) == {"luod.1.u1000.app": [1, 2, 3]}
    more = custodian.preserve_fds(ALICE, "app", _handoffs("d"))
    assert [f.token for f in more] == [4]
    assert custodian.status() == Holdings(sessions=1, files=4, bytes_pinned=24)


def test_preserve_fds_needs_a_session_without_create(custodian: Custodian) -> None:
    files = _handoffs("a")
    with pytest.raises(errors.NoSuchSession):
        custodian.preserve_fds(ALICE, "app", files)
    assert not fd_is_open(files[0].fd)  # taken and closed, also on error
    assert custodian.session_count == 0


@pytest.mark.parametrize("create", [True, False])
def test_preserve_fds_all_or_nothing(
    custodian: Custodian, kernel: FakeBackend, create: bool
) -> None:
    if not create:
        custodian.preserve_fds(ALICE, "app", _handoffs("x"), create=True)
    before = _outgoing(kernel)
    r, w = os.pipe()
    os.close(w)
    batches: list[tuple[list[Handoff], type[Exception], str]] = [
        (_handoffs("a", "a"), errors.FdNameExists, "a"),
        (_handoffs("a", "b:c"), errors.InvalidName, "files[1].name"),
        (
            [*_handoffs("a"), Handoff("p", r, "files[1]")],
            errors.UnsupportedFd,
            "files[1].fileDescriptor",
        ),
    ]
    for files, error, detail in batches:
        fds = [h.fd for h in files]
        with pytest.raises(error) as e:
            custodian.preserve_fds(ALICE, "app", files, create=True)
        assert detail in str(e.value) or detail in repr(e.value)
        assert not any(fd_is_open(fd) for fd in fds)
        assert _outgoing(kernel) == before
        assert custodian.status().files == (0 if create else 1)
        assert ((1000, "app") in custodian.sessions) is not create


def test_a_file_is_held_once(custodian: Custodian) -> None:
    (h,) = _handoffs("a")
    copy, bobs = os.dup(h.fd), os.dup(h.fd)
    custodian.preserve_fds(ALICE, "app", [h], create=True)
    with pytest.raises(errors.AlreadyPreserved) as e:
        custodian.preserve_fds(ALICE, "other", [Handoff("b", copy, "files[0]")], create=True)
    assert (e.value.parameter, e.value.session, e.value.name) == (
        "files[0].fileDescriptor",
        "app",
        "a",
    )
    # Another uid is told the file is held, not where: that is Alice's.
    with pytest.raises(errors.AlreadyPreserved) as e:
        custodian.preserve_fds(BOB, "b", [Handoff("b", bobs)], create=True)
    assert (e.value.session, e.value.name) == ("(another user's)", "?")
    # Once taken back the file can be handed off again.
    fd, _ = custodian.retrieve_fd(ALICE, "app", "a", take=True)
    custodian.preserve_fds(ALICE, "other", [Handoff("b", fd)], create=True)


def test_kernel_refusal_mid_batch_is_undone(kernel: FakeBackend, carrier: SpyCarrier) -> None:
    class Refusing(FakeBackend):
        refuse_token = 0

        def preserve_fd(self, session_fd: int, fd: int, token: int) -> None:
            if token == self.refuse_token:
                raise LuoError("preserve_fd", errno.ENOMEM)
            super().preserve_fd(session_fd, fd, token)

    backend = Refusing(kernel.socket_path)
    c = Custodian(backend, carrier, boot_id="boot-1")
    c.start()
    try:
        c.preserve_fds(ALICE, "app", _handoffs("a"), create=True)
        backend.refuse_token = 3
        files = _handoffs("b", "c")
        with pytest.raises(errors.KernelRefused) as e:
            c.preserve_fds(ALICE, "app", files)
        assert (e.value.operation, e.value.errno, e.value.session) == (
            "preserve_fd",
            errno.ENOMEM,
            "app",
        )
        assert not any(fd_is_open(h.fd) for h in files)
        # 'b' made it into the kernel session before 'c' was refused: the
        # session is rebuilt without it.
        assert list(c.sessions[(1000, "app")].files) == ["a"]
        assert _outgoing(kernel) == {c.sessions[(1000, "app")].kernel_name: [1]}
        # A session created for the batch goes with it.
        backend.refuse_token = 1
        with pytest.raises(errors.KernelRefused):
            c.preserve_fds(ALICE, "new", _handoffs("x"), create=True)
        assert (1000, "new") not in c.sessions
        assert not [n for n in _outgoing(kernel) if n.endswith(".new")]
    finally:
        c.close()


def test_only_managed_sessions_take_files(custodian: Custodian) -> None:
    fd, _ = custodian.create_delegated(ALICE, "own")
    os.close(fd)
    with pytest.raises(errors.WrongSessionKind):
        custodian.preserve_fds(ALICE, "own", _handoffs("a"))


# --- access --------------------------------------------------------------------


def test_names_are_per_owner_and_root_says_whose(custodian: Custodian) -> None:
    custodian.preserve_fds(ALICE, "app", _handoffs("a"), create=True)
    custodian.create_session(BOB, "bobs")
    # To Bob, Alice's session is no session at all: not "denied", which
    # would say it exists.
    for attempt in (
        lambda: custodian.retrieve_fd(BOB, "app", "a", take=False),
        lambda: custodian.list_sessions(BOB, "app"),
        lambda: custodian.discard_session(BOB, "app"),
        lambda: custodian.retrieve_session(BOB, "app"),
    ):
        with pytest.raises(errors.NoSuchSession):
            attempt()
    # Naming another owner is root's alone, refused before any lookup.
    for owner in (1000, 4242):
        with pytest.raises(errors.PermissionDenied) as e:
            custodian.retrieve_fd(BOB, "app", "a", take=False, owner=owner)
        assert e.value.session == "app" and e.value.owner == f"uid {owner}"
        with pytest.raises(errors.PermissionDenied):
            custodian.list_sessions(BOB, owner=owner)
        with pytest.raises(errors.PermissionDenied):
            custodian.discard_session(BOB, "app", owner=owner)
    # Naming oneself is fine.
    assert [s.name for s in custodian.list_sessions(BOB, owner=1001)] == ["bobs"]
    # Bob's hand-off with create makes Bob's own "app".
    custodian.preserve_fds(BOB, "app", _handoffs("b"), create=True)
    assert sorted(custodian.sessions) == [(1000, "app"), (1001, "app"), (1001, "bobs")]
    assert list(custodian.sessions[(1000, "app")].files) == ["a"]
    with pytest.raises(errors.NoSuchSession):
        custodian.list_sessions(ALICE, "nope")
    assert sorted(s.name for s in custodian.list_sessions(BOB)) == ["app", "bobs"]
    assert [s.name for s in custodian.list_sessions(ALICE)] == ["app"]
    # Root's view is everyone's; owner narrows it.
    assert sorted(s.key for s in custodian.list_sessions(ROOT)) == sorted(custodian.sessions)
    assert [s.key for s in custodian.list_sessions(ROOT, "app", owner=1000)] == [(1000, "app")]
    assert len(custodian.list_sessions(ROOT, "app")) == 2
    # Without owner, root reaches only its own.
    with pytest.raises(errors.NoSuchSession):
        custodian.retrieve_fd(ROOT, "app", "a", take=False)
    fd, _ = custodian.retrieve_fd(ROOT, "app", "a", take=False, owner=1000)
    os.close(fd)
    custodian.discard_session(ROOT, "app", owner=1001)
    assert (1001, "app") not in custodian.sessions and (1000, "app") in custodian.sessions


# --- giving back ---------------------------------------------------------------


def test_retrieve_fd_copy_and_take(custodian: Custodian, kernel: FakeBackend) -> None:
    custodian.preserve_fds(ALICE, "app", _handoffs("a", "b"), create=True)
    fd, f = custodian.retrieve_fd(ALICE, "app", "a", take=False)
    assert f.name == "a" and os.pread(fd, 100, 0) == b"data a"
    os.close(fd)
    assert custodian.status().files == 2
    with pytest.raises(errors.NoSuchFd):
        custodian.retrieve_fd(ALICE, "app", "z", take=False)

    fd, f = custodian.retrieve_fd(ALICE, "app", "a", take=True)
    assert os.pread(fd, 100, 0) == b"data a" and f.fd == -1
    os.close(fd)
    # The kernel cannot unpreserve one file: the rest is in a new session.
    s = custodian.sessions[(1000, "app")]
    assert list(s.files) == ["b"]
    assert _outgoing(kernel) == {s.kernel_name: [2]}
    assert s.kernel_name == "luod.2.u1000.app"

    fd, _ = custodian.retrieve_fd(ALICE, "app", "b", take=True)
    os.close(fd)
    assert (1000, "app") not in custodian.sessions  # its last file was taken
    assert _outgoing(kernel) == {}


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_retrieve_fds_copies(custodian: Custodian, kernel: FakeBackend) -> None:
    custodian.preserve_fds(ALICE, "app", _handoffs("a", "b", "c"), create=True)
    before = _outgoing(kernel)
    got = custodian.retrieve_fds(ALICE, "app", ["c", "a"], take=False)
    # In the order asked for; copies of the held files.
    assert [f.name for _fd, f in got] == ["c", "a"]
    assert [os.pread(fd, 100, 0) for fd, _f in got] == [b"data c", b"data a"]
    for fd, _f in got:
        os.close(fd)
    got = custodian.retrieve_fds(ALICE, "app", None, take=False)
    assert [f.name for _fd, f in got] == ["a", "b", "c"]
    for fd, _f in got:
        os.close(fd)
    assert custodian.retrieve_fds(ALICE, "app", [], take=False) == []
    # Custody goes on, unchanged.
    assert _outgoing(kernel) == before and custodian.status().files == 3


def test_retrieve_fds_is_all_or_nothing(custodian: Custodian, kernel: FakeBackend) -> None:
    custodian.preserve_fds(ALICE, "app", _handoffs("a", "b", "c"), create=True)
    fd, _ = custodian.create_delegated(ALICE, "own")
    os.close(fd)
    before, open_before = _outgoing(kernel), _open_fds()
    refusals: list[tuple[dict[str, Any], type[Exception], str]] = [
        ({"names": ["a", "z"]}, errors.NoSuchFd, "'z'"),
        ({"names": ["a", "b", "a"]}, errors.InvalidName, "names[2]"),
        ({"names": ["a", "b"], "limit": 1}, errors.TooManyFds, "2 fds asked for, at most 1"),
        ({"names": None, "limit": 2}, errors.TooManyFds, "3 fds asked for, at most 2"),
        ({"session": "own"}, errors.WrongSessionKind, "RetrieveSession"),
        ({"session": "none"}, errors.NoSuchSession, "none"),
    ]
    for take in (False, True):
        for kw, error, detail in refusals:
            args: dict[str, Any] = {"session": "app", "names": None, **kw}
            with pytest.raises(error) as e:
                custodian.retrieve_fds(ALICE, take=take, **args)
            assert detail in str(e.value), (kw, str(e.value))
            assert _open_fds() == open_before, kw  # no fd handed out, none leaked
            assert _outgoing(kernel) == before, kw
            assert list(custodian.sessions[(1000, "app")].files) == ["a", "b", "c"]


def test_retrieve_fds_names_are_per_owner(custodian: Custodian) -> None:
    custodian.preserve_fds(ALICE, "app", _handoffs("a"), create=True)
    with pytest.raises(errors.NoSuchSession):
        custodian.retrieve_fds(BOB, "app", None, take=False)
    with pytest.raises(errors.PermissionDenied):
        custodian.retrieve_fds(BOB, "app", None, take=True, owner=1000)
    ((fd, f),) = custodian.retrieve_fds(ROOT, "app", ["a"], take=False, owner=1000)
    assert f.name == "a"
    os.close(fd)


def test_retrieve_fds_take_rebuilds_the_session_once(
    kernel: FakeBackend, custodian_options: dict[str, Any]
) -> None:
    """Several files taken: one intent, one new kernel session holding the
    rest, one commit, then luod's references released (as for one file)."""
    carrier = SpyCarrier(kernel, holds_after_exit=True)
    c = Custodian(kernel, carrier, boot_id="boot-1", **custodian_options)
    c.start()
    try:
        c.preserve_fds(ALICE, "app", _handoffs("a", "b", "c", "d"), create=True)
        old = c.sessions[(1000, "app")].kernel_name
        carrier.calls.clear()
        got = c.retrieve_fds(ALICE, "app", ["d", "b"], take=True)
        assert [(f.name, f.fd) for _fd, f in got] == [("d", -1), ("b", -1)]
        assert [os.pread(fd, 100, 0) for fd, _f in got] == [b"data d", b"data b"]
        for fd, _f in got:
            os.close(fd)
        s = c.sessions[(1000, "app")]
        assert list(s.files) == ["a", "c"]
        assert _outgoing(kernel) == {s.kernel_name: [1, 3]}
        ops = [op for op, _ in carrier.calls]
        # One intent, one rebuild (its references kept under the new name),
        # one commit, then the old references (the taken files') let go of.
        assert ops == ["intend", "dropped", "held", "keep", "save", "release"], carrier.calls
        assert carrier.calls[1:4] == [
            ("dropped", old),
            ("held", s.kernel_name),
            ("keep", f"{s.kernel_name}:1,3"),
        ]
        assert carrier.calls[-1] == ("release", old)

        # The rest: nothing remains, so the session is let go of (one commit).
        carrier.calls.clear()
        got = c.retrieve_fds(ALICE, "app", None, take=True)
        assert [f.name for _fd, f in got] == ["a", "c"]
        for fd, _f in got:
            os.close(fd)
        assert (1000, "app") not in c.sessions and _outgoing(kernel) == {}
        assert [op for op, _ in carrier.calls if op in ("intend", "save", "held")] == ["save"]
    finally:
        c.close()


def test_retrieve_fds_take_refused_by_the_kernel(kernel: FakeBackend, carrier: SpyCarrier) -> None:
    class Refusing(FakeBackend):
        refuse = False

        def create_session(self, name: str) -> int:
            if self.refuse:
                raise LuoError("create_session", errno.ENOMEM)
            return super().create_session(name)

    backend = Refusing(kernel.socket_path)
    c = Custodian(backend, carrier, boot_id="boot-1")
    c.start()
    try:
        c.preserve_fds(ALICE, "app", _handoffs("a", "b", "c"), create=True)
        open_before = _open_fds()
        backend.refuse = True
        with pytest.raises(errors.KernelRefused) as e:
            c.retrieve_fds(ALICE, "app", ["a", "b"], take=True)
        assert (e.value.errno, e.value.session) == (errno.ENOMEM, "app")
        # The copies made for the reply are closed; so is the old kernel
        # session, which goes first (the kernel keeps a file in one session).
        assert _open_fds() == open_before - 1
        # Nothing was taken: luod still holds every file, the preflight says
        # the session is not carried.
        s = c.sessions[(1000, "app")]
        assert list(s.files) == ["a", "b", "c"] and s.fd == -1
        assert [p.session for p in c.check()] == ["app"]
    finally:
        c.close()


def test_adopt_session(custodian: Custodian, kernel: FakeBackend) -> None:
    sfd = kernel.create_session("vm-1")
    s = custodian.adopt_session(ALICE, sfd)
    assert (s.name, s.kind, s.kernel_name) == ("vm-1", SessionKind.ADOPTED, "vm-1")
    assert "vm-1" in _outgoing(kernel)

    dup = kernel.create_session("luod-mine")
    with pytest.raises(errors.ReservedSessionName):
        custodian.adopt_session(ALICE, dup)
    assert not fd_is_open(dup)

    memfd = make_memfd(b"x")
    with pytest.raises(errors.UnsupportedFd) as e:
        custodian.adopt_session(ALICE, memfd)
    assert e.value.parameter == "fileDescriptor" and "not a LUO session" in e.value.reason
    assert not fd_is_open(memfd)


def test_delegated_session_is_handed_back(custodian: Custodian, kernel: FakeBackend) -> None:
    fd, s = custodian.create_delegated(ALICE, "own")
    assert s.kind is SessionKind.DELEGATED and fd != s.fd
    kernel.preserve_fd(fd, make_memfd(b"device"), 7)
    os.close(fd)
    # Before the kexec a copy: luod goes on holding it.
    fd, seen = custodian.retrieve_session(ALICE, "own")
    assert seen.name == "own" and kernel.identify_session(fd) == s.kernel_name
    os.close(fd)
    assert (1000, "own") in custodian.sessions
    with pytest.raises(errors.NoSuchSession):
        custodian.retrieve_session(BOB, "own")
    with pytest.raises(errors.PermissionDenied):
        custodian.retrieve_session(BOB, "own", owner=1000)
    custodian.create_session(ALICE, "managed")
    with pytest.raises(errors.WrongSessionKind):
        custodian.retrieve_session(ALICE, "managed")


def test_discard_session(custodian: Custodian, kernel: FakeBackend) -> None:
    added = custodian.preserve_fds(ALICE, "app", _handoffs("a"), create=True)
    gone = custodian.discard_session(ALICE, "app")
    assert gone.name == "app"
    assert not fd_is_open(added[0].fd) and added[0].fd == -1
    assert custodian.session_count == 0 and _outgoing(kernel) == {}
    with pytest.raises(errors.NoSuchSession):
        custodian.discard_session(ALICE, "app")


# --- an unusable manifest --------------------------------------------------------


def test_no_new_custody_while_the_manifest_is_unusable(custodian: Custodian) -> None:
    custodian.preserve_fds(ALICE, "app", _handoffs("a"), create=True)
    custodian.ledger.manifest_error = ManifestError("corrupt", "bad checksum")
    for attempt in (
        lambda: custodian.create_session(ALICE, "new"),
        lambda: custodian.preserve_fds(ALICE, "app", _handoffs("b")),
        lambda: custodian.adopt_session(ALICE, make_memfd(b"")),
    ):
        with pytest.raises(errors.NotReady, match="manifest is unusable"):
            attempt()
    # What is held can still be looked at.
    fd, _ = custodian.retrieve_fd(ALICE, "app", "a", take=False)
    os.close(fd)


# --- across a kexec --------------------------------------------------------------


def test_after_the_kexec_owners_take_back_what_is_theirs(kernel: FakeBackend) -> None:
    old = Custodian(kernel, SpyCarrier(kernel), boot_id="boot-1", grace=60, clock=lambda: 1000.0)
    old.start()
    old.preserve_fds(ALICE, "app", _handoffs("a"), create=True)
    fd, _ = old.create_delegated(ALICE, "own")
    os.close(fd)
    old.note_subscriber("db.service", 1000)
    kernel.reboot_kexec()
    old.close()

    new = Custodian(kernel, SpyCarrier(kernel), boot_id="boot-2", grace=60, clock=lambda: 2000.0)
    try:
        new.start()
        assert new.kexec_count == 1
        assert new.previous_subscribers == {("db.service", 1000)}
        assert {s.claim_deadline for s in new.sessions.values()} == {2060.0}
        assert new.next_deadline() == 2060.0
        # Handed back whole, with the deadline it was found with.
        fd, seen = new.retrieve_session(ALICE, "own")
        assert seen.state is SessionState.INCOMING and seen.claim_deadline == 2060.0
        assert kernel.identify_session(fd) == "luod.2.u1000.own"
        os.close(fd)
        assert (1000, "own") not in new.sessions
        # The managed session: preserved again when used, and claimed.
        fd, _f = new.retrieve_fd(ALICE, "app", "a", take=False)
        assert os.pread(fd, 100, 0) == b"data a"
        os.close(fd)
        app = new.sessions[(1000, "app")]
        assert app.claim_deadline is None and new.next_deadline() is None
        assert new.check() == []
        assert app.state is SessionState.OUTGOING and app.kernel_name == "luod.3.u1000.app"
    finally:
        new.close()


def test_an_incoming_session_is_not_adopted(kernel: FakeBackend) -> None:
    """The kernel serializes only the sessions created in this boot: one that
    came over the last kexec is dropped at the next, whoever holds it. luod
    must not take it as if it would be carried (Check would say nothing
    would be lost, and the next boot would find it gone)."""
    old = Custodian(kernel, SpyCarrier(kernel), boot_id="boot-1", grace=60)
    old.start()
    sfd = kernel.create_session("vm-1")
    kernel.preserve_fd(sfd, make_memfd(b"device"), 7)
    old.adopt_session(ALICE, sfd)
    mine = kernel.create_session("vm-2")
    kernel.preserve_fd(mine, make_memfd(b"own"), 1)
    kernel.reboot_kexec()
    old.close()

    new = Custodian(kernel, SpyCarrier(kernel), boot_id="boot-2", grace=60)
    try:
        new.start()
        back, _ = new.retrieve_session(ALICE, "vm-1")  # custody ends: the session itself
        own = kernel.retrieve_session("vm-2")  # retrieved by the client itself
        for fd, name in ((back, "vm-1"), (own, "vm-2")):
            with pytest.raises(errors.UnsupportedFd) as e:
                new.adopt_session(ALICE, fd)
            assert (e.value.parameter, e.value.kind) == ("fileDescriptor", "incoming-luo-session")
            assert f"session '{name}' came over the last kexec" in e.value.reason
            assert "FINISH it" in e.value.reason
            assert not fd_is_open(fd)
        assert new.sessions == {} and new.check() == []
        # Nothing was changed in the kernel: closing the fds finished them.
        assert kernel.snapshot()["incoming"] == {}
        # A session created in this boot is still adopted.
        fresh = kernel.create_session("vm-1")
        assert new.adopt_session(ALICE, fresh).state is SessionState.OUTGOING
    finally:
        new.close()


def test_manifest_names_every_held_file(custodian: Custodian) -> None:
    custodian.preserve_fds(ALICE, "app", _handoffs("a", "b"), create=True)
    m = from_json(to_json(custodian.ledger.manifest()))
    (s,) = m.sessions
    assert (s.name, sorted(s.files), s.owner.uid) == ("app", ["a", "b"], 1000)
    assert m.boot_id == "boot-1"
