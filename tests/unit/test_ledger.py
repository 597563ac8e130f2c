"""luod.ledger: the record of what is held and the steps that keep kernel,
carrier and manifest in agreement (re-preserving a session, dropping one,
writing the manifest)."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator

import pytest

from luod.kernel.backend import LuoError
from luod.ledger import Ledger
from luod.manifest import ManifestError, from_json, to_json
from luod.model import HeldFile, Holdings, Owner, Session, SessionKind, SessionState
from tests.unit.spycarrier import SpyCarrier
from testsupport.fakekernel import FakeBackend
from testsupport.util import make_memfd


@pytest.fixture
def ledger(kernel: FakeBackend) -> Iterator[Ledger]:
    ledger = Ledger(kernel, SpyCarrier(kernel), clock=lambda: 42.0, boot_id="boot-1")
    yield ledger
    ledger.close()


def _spy(ledger: Ledger) -> SpyCarrier:
    assert isinstance(ledger.carrier, SpyCarrier)
    return ledger.carrier


def _held_session(ledger: Ledger, name: str, contents: dict[str, bytes]) -> Session:
    """A session as custody makes one: a kernel session with the files in it."""
    kernel_name = ledger.new_kernel_name(0, name)
    s = Session(
        name=name,
        kind=SessionKind.MANAGED,
        owner=Owner(uid=0),
        kernel_name=kernel_name,
        created_at=0.0,
        fd=ledger.backend.create_session(kernel_name),
    )
    for fname, data in contents.items():
        f = HeldFile(fname, s.next_token(), len(data), 0.0, make_memfd(data))
        ledger.backend.preserve_fd(s.fd, f.fd, f.token)
        s.files[fname] = f
        ledger.index(s, f)
    ledger.add(s)
    ledger.carrier.session_held(kernel_name, s.fd)
    return s


def _outgoing(kernel: FakeBackend) -> dict[str, list[int]]:
    snap = kernel.snapshot()
    return {n: s["tokens"] for n, s in snap["outgoing"].items() if n not in ("luod", "luod.b")}


def test_holdings_and_index(ledger: Ledger) -> None:
    s = _held_session(ledger, "app", {"a": b"12345", "b": b"678"})
    assert ledger.holdings() == Holdings(sessions=1, files=2, bytes_pinned=8)
    st = os.fstat(s.files["b"].fd)
    assert ledger.holder_of((st.st_dev, st.st_ino)) == ((0, "app"), "b")
    ledger.unindex(s.files["b"])
    assert ledger.holder_of((st.st_dev, st.st_ino)) is None


def test_represerve_moves_files_to_a_new_kernel_session(
    ledger: Ledger, kernel: FakeBackend
) -> None:
    s = _held_session(ledger, "app", {"a": b"1", "b": b"2", "c": b"3"})
    assert s.kernel_name == "luod.1.u0.app"
    ledger.represerve(s, [s.files["a"], s.files["c"]])
    assert (s.kernel_name, s.state) == ("luod.2.u0.app", SessionState.OUTGOING)
    assert _outgoing(kernel) == {"luod.2.u0.app": [1, 3]}
    assert _spy(ledger).calls[-3:] == [
        ("dropped", "luod.1.u0.app"),
        ("held", "luod.2.u0.app"),
        ("keep", "luod.2.u0.app:1,3"),
    ]


def test_represerve_failure_leaves_the_session_uncarried(
    ledger: Ledger, kernel: FakeBackend
) -> None:
    s = _held_session(ledger, "app", {"a": b"1"})
    # A file preserved elsewhere: the kernel keeps a file in one session at a time.
    other = kernel.create_session("elsewhere")
    try:
        x = HeldFile("x", 2, 1, 0.0, make_memfd(b"x"))
        kernel.preserve_fd(other, x.fd, 1)
        s.files["x"] = x
        with pytest.raises(LuoError) as e:
            ledger.represerve(s, s.files.values())
        assert e.value.errno == errno.EBUSY
        # luod still holds the files, but no kernel session carries them.
        assert s.fd == -1 and s.files["a"].fd >= 0
        assert list(_outgoing(kernel)) == ["elsewhere"]
    finally:
        os.close(other)


def test_drop_lets_go_of_everything(ledger: Ledger, kernel: FakeBackend) -> None:
    s = _held_session(ledger, "app", {"a": b"1"})
    fd = s.files["a"].fd
    st = os.fstat(fd)
    incoming = os.memfd_create("stand-in for an incoming session fd")
    ledger.awaiting_preservation[(0, "app")] = incoming
    ledger.drop(s, "test")
    assert ledger.sessions == {} and ledger.awaiting_preservation == {}
    assert ledger.holder_of((st.st_dev, st.st_ino)) is None
    for gone in (fd, incoming):
        with pytest.raises(OSError):
            os.fstat(gone)
    assert _outgoing(kernel) == {}
    assert _spy(ledger).calls[-1] == ("dropped", "luod.1.u0.app")


def test_manifest_says_what_is_held(ledger: Ledger) -> None:
    _held_session(ledger, "app", {"a": b"1"})
    ledger.kexec_count = 3
    ledger.note_subscriber("db.service", 1000)
    m = from_json(to_json(ledger.manifest()))
    assert (m.kexec_count, m.name_counter, m.boot_id, m.written_at) == (3, 1, "boot-1", 42.0)
    assert m.subscribers == {("db.service", 1000)}
    assert [s.name for s in m.sessions] == ["app"]


def test_saves(ledger: Ledger) -> None:
    spy = _spy(ledger)
    ledger.note_subscriber("db.service", 1000)
    ledger.note_subscriber("db.service", 1000)  # known already: nothing to write
    assert spy.saves() == 1
    ledger.note_subscriber("db.service", 0)
    assert spy.saves() == 2
    # Writing would shadow the incoming state the operator must see.
    ledger.manifest_error = ManifestError("corrupt", "bad checksum")
    ledger.save()
    ledger.note_subscriber("web.service", 1000)
    assert spy.saves() == 2


# --- commits: what changed, appended to the manifest (issue 12) -----------------------


class LogCarrier(SpyCarrier):
    """Keeps the manifest as a base and the records appended after it, as
    luod.carriers.slots does; `room` records fit before a new base is due."""

    def __init__(self, backend: FakeBackend, room: int) -> None:
        super().__init__(backend)
        self.base = b""
        self.records: list[bytes] = []
        self.room = room

    def save(self, payload: bytes) -> None:
        self.calls.append(("save", ""))
        self.base, self.records = payload, []

    def append(self, record: bytes) -> bool:
        if len(self.records) >= self.room:
            return False
        self.calls.append(("append", ""))
        self.records.append(record)
        return True


def _shape(raw: bytes, records: list[bytes] | None = None) -> list[tuple[object, ...]]:
    m = from_json(raw, records or [])
    return [
        (s.owner.uid, s.name, s.kernel_name, s.claim_deadline, sorted(s.files), m.name_counter)
        for s in sorted(m.sessions, key=lambda s: s.key)
    ]


@pytest.mark.parametrize("room", [0, 3, 1000])
def test_commits_read_back_as_the_whole_manifest(kernel: FakeBackend, room: int) -> None:
    """Whatever mix of whole manifests and appended changes the carrier
    takes, reading it back gives what luod holds."""
    carrier = LogCarrier(kernel, room)
    ledger = Ledger(kernel, carrier, clock=lambda: 42.0, boot_id="boot-1")
    try:
        ledger.save()
        a = _held_session(ledger, "a", {"x": b"x"})
        ledger.commit()
        b = _held_session(ledger, "b", {"y": b"y", "z": b"z"})
        ledger.commit(b)
        a.claim_deadline = 7.0
        ledger.changed(a)
        f = HeldFile("w", a.next_token(), 1, 0.0, make_memfd(b"w"))
        a.files["w"] = f
        ledger.commit(a)
        ledger.drop(b, "test")
        c = _held_session(ledger, "b", {"again": b"a"})  # the same name, a new session
        ledger.commit(c)
        ledger.note_subscriber("sub", 0)
        want = _shape(to_json(ledger.manifest()))
        assert _shape(carrier.base, carrier.records) == want
        assert len(want) == 2 and want[1][4] == ["again"] and want[0][3] == 7.0
        appended = sum(1 for op, _ in carrier.calls if op == "append")
        # Six commits; a full log takes a whole manifest, then it starts anew.
        assert appended == {0: 0, 3: 5, 1000: 6}[room]
    finally:
        ledger.close()


def test_a_commit_writes_what_changed_not_what_is_held(kernel: FakeBackend) -> None:
    carrier = LogCarrier(kernel, 1000)
    ledger = Ledger(kernel, carrier, clock=lambda: 42.0, boot_id="boot-1")
    try:
        for i in range(50):
            _held_session(ledger, f"s{i}", {"f": b"f"})
        ledger.save()
        one = _held_session(ledger, "one", {"f": b"f"})
        ledger.commit(one)
        (record,) = carrier.records
        # One session's worth, against a base of 51.
        assert len(record) * 20 < len(carrier.base)
        assert b'"s1"' not in record and b'"one"' in record
    finally:
        ledger.close()


def test_holdings_of_one_owner_do_not_look_at_others(ledger: Ledger) -> None:
    _held_session(ledger, "mine", {"f": b"12345"})
    other = Session("theirs", SessionKind.MANAGED, Owner(uid=1000), "k", 0.0)
    ledger.add(other)
    assert ledger.holdings(1000) == Holdings(1, 0, 0)
    assert ledger.holdings(0) == Holdings(1, 1, 5)
    assert [s.name for s in ledger.owned_by(1000)] == ["theirs"]
    ledger.remove(other.key)
    assert list(ledger.owned_by(1000)) == [] and ledger.holdings() == Holdings(1, 1, 5)
