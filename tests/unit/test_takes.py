"""A take (RetrieveFd with take) stays recorded in the manifest until it is
settled (luod.custody): delivered, or given back. What each settling leaves
in the manifest the next luod reads."""

from __future__ import annotations

import os

import pytest

from luod import crashpoint
from luod.carriers.state_session import StateSessionCarrier
from luod.custody import Custodian, Handoff
from luod.manifest import from_json
from luod.peer import Peer
from tests.unit.spycarrier import SpyCarrier
from testsupport.fakekernel import FakeBackend
from testsupport.util import make_memfd

ALICE = Peer(pid=2, uid=1000, gid=1000, unit="alice.service")


def _hand_off(c: Custodian, session: str) -> None:
    c.preserve_fds(ALICE, session, [Handoff(n, make_memfd(n.encode())) for n in "ab"], True)


def test_a_delivered_take_is_not_reported_lost_after_the_kexec(kernel: FakeBackend) -> None:
    """The state session carrier, whose manifest is what the next boot
    reads: a take delivered ends its record there too."""
    old = Custodian(kernel, StateSessionCarrier(kernel), boot_id="boot-1")
    old.start()
    _hand_off(old, "app")
    pending: list[int] = []
    fd, _ = old.retrieve_fd(ALICE, "app", "a", take=True, pending=pending)
    old.delivered(pending[0])  # the reply went out: the client has "a"
    os.close(fd)
    kernel.reboot_kexec()
    old.close()
    new = Custodian(kernel, StateSessionCarrier(kernel), boot_id="boot-2")
    try:
        report = new.start()
        assert report.lost == []
        assert [f for s in new.sessions.values() for f in s.files] == ["b"]
    finally:
        new.close()


class Killed(BaseException):
    """SIGKILL, as the crash hook would."""


def test_a_give_back_keeps_the_take_recorded_until_the_files_are(
    kernel: FakeBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a kexec, 'app' and 'other' wait to be preserved again. A take
    from 'app' is given back (its reply not delivered): the give-back's
    hand-off preserves 'other' again first, which commits. Killed in the
    hand-off before its own commit, the manifest must still name the take
    (or the file): before, it named neither, and the file was lost."""
    old = Custodian(kernel, SpyCarrier(kernel), boot_id="boot-1")
    old.start()
    for session in ("app", "other"):
        _hand_off(old, session)
    kernel.reboot_kexec()
    old.close()
    carrier = SpyCarrier(kernel, holds_after_exit=True)
    saved: list[bytes] = []
    inner_save = carrier.save

    def save(payload: bytes) -> None:
        saved.append(payload)
        inner_save(payload)

    monkeypatch.setattr(carrier, "save", save)
    new = Custodian(kernel, carrier, boot_id="boot-2")
    new.start()
    pending: list[int] = []
    fd, _ = new.retrieve_fd(ALICE, "app", "a", take=True, pending=pending)
    assert (1000, "other") in new.ledger.awaiting_preservation

    def hook(step: str) -> None:
        if step == "handoff.intent":
            raise Killed(step)

    monkeypatch.setattr(crashpoint, "HOOK", hook)
    try:
        with pytest.raises(Killed):
            new.give_back(ALICE, pending[0], [fd])
    finally:
        monkeypatch.setattr(crashpoint, "HOOK", None)
        new.close()
    m = from_json(saved[-1])
    held = {f.name for s in m.sessions if s.name == "app" for f in s.files.values()}
    taking = {f.name for t in m.taking.values() for f in t.files.values()}
    assert "a" in held | taking, (held, taking)


def test_a_take_waiting_is_written_once_not_with_every_record(
    kernel: FakeBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The records after the one that recorded a take waiting do not write
    it again: a client that never reads the replies of its takes would
    otherwise make every uid's every record as large as all it took."""
    carrier = SpyCarrier(kernel, holds_after_exit=True)
    records: list[bytes] = []
    inner_append = carrier.append

    def append(record: bytes) -> bool:
        records.append(record)
        return inner_append(record)

    monkeypatch.setattr(carrier, "append", append)
    c = Custodian(kernel, carrier, boot_id="boot-1")
    c.start()
    try:
        _hand_off(c, "app")
        pending: list[int] = []
        fd, _ = c.retrieve_fd(ALICE, "app", "a", take=True, pending=pending)
        os.close(fd)
        assert b'"took":[[' in records[-1]
        _hand_off(c, "other")
        assert b"took" not in records[-1] and b'"app"' not in records[-1]
        c.delivered(pending[0])
        assert records[-1].endswith(b',"settled":[%d]}' % pending[0])
    finally:
        c.close()
