"""luod.reclaim: what start() takes over, preserving again after a kexec
(and the order of its steps, which a crash between them must survive), and
the grace period. The scenarios across luod restarts are in
tests/test_reclaim.py."""

from __future__ import annotations

import os

import pytest

from luod.custody import Custodian, Handoff
from luod.ledger import Ledger
from luod.manifest import ManifestError
from luod.model import SessionKind, SessionState
from luod.peer import Peer
from luod.reclaim import Reclaimer
from tests.unit.spycarrier import SpyCarrier
from testsupport.fakekernel import FakeBackend
from testsupport.util import make_memfd

ALICE = Peer(pid=2, uid=1000, gid=1000, unit="alice.service")
APP, OTHER, OWN = (1000, "app"), (1000, "other"), (1000, "own")


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _old_boot(kernel: FakeBackend) -> None:
    """Managed sessions 'app' (a, b) and 'other' (c), delegated 'own'; then a kexec."""
    old = Custodian(kernel, SpyCarrier(kernel), boot_id="boot-1")
    old.start()
    for session, names in (("app", "ab"), ("other", "c")):
        old.preserve_fds(
            ALICE, session, [Handoff(n, make_memfd(f"data {n}".encode())) for n in names], True
        )
    fd, _ = old.create_delegated(ALICE, "own")
    os.close(fd)
    kernel.reboot_kexec()
    old.close()


def _reclaimer(kernel: FakeBackend, carrier: SpyCarrier, clock: Clock) -> Reclaimer:
    return Reclaimer(Ledger(kernel, carrier, clock, boot_id="boot-2"), grace=30)


def test_fresh_start(kernel: FakeBackend) -> None:
    carrier = SpyCarrier(kernel)
    r = _reclaimer(kernel, carrier, Clock(0))
    report = r.start()
    assert (report.state, report.sessions, report.files, report.lost) == ("fresh", 0, 0, [])
    assert report is r.report and report.preserved_again == 0.0
    # The previous boot's state (none) is done with, and a manifest written.
    assert carrier.calls[:2] == [("finish", ""), ("save", "")]
    assert r.ledger.kexec_count == 0


def test_reclaim_retrieves_before_preserving_again(kernel: FakeBackend) -> None:
    _old_boot(kernel)
    carrier = SpyCarrier(kernel)
    r = _reclaimer(kernel, carrier, Clock(500.0))
    try:
        report = r.start()
        assert (report.state, report.sessions, report.files, report.lost) == (
            "reclaimed",
            3,
            3,
            [],
        )
        ledger = r.ledger
        assert ledger.kexec_count == 1
        assert report.preserved_again is None
        assert sorted(ledger.awaiting_preservation) == [APP, OTHER]
        # Every file is retrieved already; no session is finished yet.
        assert all(f.fd >= 0 for s in ledger.sessions.values() for f in s.files.values())
        assert ("finish", "") not in carrier.calls
        own = ledger.sessions[OWN]
        assert own.kind is SessionKind.DELEGATED and own.fd >= 0
        assert {s.state for s in ledger.sessions.values()} == {SessionState.INCOMING}
        assert {s.claim_deadline for s in ledger.sessions.values()} == {530.0}

        assert r.preserve_again(OTHER)
        assert list(ledger.awaiting_preservation) == [APP]
        assert r.preserve_again((1000, "nope"))  # not waiting: nothing done; "app" still is
        assert r.preserve_again((0, "app"))  # nor is root's "app"
        assert list(ledger.awaiting_preservation) == [APP]
        r.preserve_all_again()
        assert not ledger.awaiting_preservation
        assert report.preserved_again is not None and report.preserved_again >= 0
        assert carrier.calls[-2:] == [("finish", ""), ("save", "")]
        app = ledger.sessions[APP]
        # The counter came over: kernel names are never used twice.
        assert app.state is SessionState.OUTGOING and app.kernel_name == "luod.5.u1000.app"
        assert kernel.snapshot()["outgoing"][app.kernel_name]["tokens"] == [1, 2]
        # Preserving again does not claim a session.
        assert app.claim_deadline == 530.0
    finally:
        r.ledger.close()


def test_manifest_written_before_the_incoming_session_is_let_go(kernel: FakeBackend) -> None:
    """Under a carrier that holds sessions across luod's exit, a luod that
    dies right after the carrier let go of an incoming session must find
    the new one in the manifest."""
    _old_boot(kernel)
    carrier = SpyCarrier(kernel, holds_after_exit=True)
    r = _reclaimer(kernel, carrier, Clock(0))
    try:
        r.start()
        incoming = r.ledger.sessions[APP].kernel_name
        del carrier.calls[:]
        r.preserve_again(APP)
        new = r.ledger.sessions[APP].kernel_name
        # luod's references are kept before FINISH (a restarted luod has
        # nothing else once it is done), the new session is named in the
        # manifest before the incoming one is let go of.
        tokens = ",".join(str(f.token) for f in r.ledger.sessions[APP].files.values())
        assert carrier.calls == [
            ("keep", f"{incoming}:{tokens}"),
            ("held", new),
            ("keep", f"{new}:{tokens}"),
            ("save", ""),
            ("dropped", incoming),
            ("release", incoming),
        ]
    finally:
        r.ledger.close()


def test_a_lost_session_is_reported(kernel: FakeBackend) -> None:
    _old_boot(kernel)
    # Someone else took it out of the kernel first.
    os.close(kernel.retrieve_session("luod.2.u1000.other"))
    r = _reclaimer(kernel, SpyCarrier(kernel), Clock(0))
    try:
        report = r.start()
        assert report.lost == ["other"]
        assert (report.sessions, report.files) == (2, 2)
        assert OTHER not in r.ledger.sessions
    finally:
        r.ledger.close()


def test_unusable_manifest_releases_nothing(kernel: FakeBackend) -> None:
    class Broken(SpyCarrier):
        def load(self) -> None:
            raise ManifestError("corrupt", "bad checksum")

    carrier = Broken(kernel)
    r = _reclaimer(kernel, carrier, Clock(0))
    report = r.start()
    assert (report.state, report.error) == ("failed", "bad checksum")
    assert r.ledger.manifest_error is not None
    # Nothing is finished, nothing written over what the operator must see.
    r.ledger.save()
    assert carrier.calls == []


def test_grace_period(kernel: FakeBackend) -> None:
    _old_boot(kernel)
    clock = Clock(100.0)
    c = Custodian(kernel, SpyCarrier(kernel), grace=30, clock=clock, boot_id="boot-2")
    try:
        c.start()
        assert c.next_deadline() == 130.0
        assert c.expire() == []
        fd, _ = c.retrieve_fd(ALICE, "app", "a", take=False)  # claims 'app'
        os.close(fd)
        clock.now = 130.0
        assert sorted(c.expire()) == ["other", "own"]
        assert list(c.sessions) == [APP]
        assert c.next_deadline() is None
        # Released unclaimed, the incoming sessions are finished by closing.
        incoming = kernel.snapshot()["incoming"]
        assert not [n for n in incoming if n.endswith((".other", ".own"))]
    finally:
        c.close()


@pytest.mark.parametrize("grace", [0.0, 600.0])
def test_grace_is_the_custodians(kernel: FakeBackend, grace: float) -> None:
    c = Custodian(kernel, SpyCarrier(kernel), grace=grace)
    assert c.grace == grace
