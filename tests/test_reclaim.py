"""Reclaim in two steps, in-process on the fake kernel: after a kexec every
file is retrieved before luod is ready, and custody is carried on (FINISH,
then a new outgoing session) session by session afterwards."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator, Sequence

import pytest

from luod.carriers.fdstore import FdStoreCarrier
from luod.carriers.state_session import StateSessionCarrier
from luod.custody import Custodian, Handoff
from luod.model import SessionState
from luod.notify import ListenFd
from luod.peer import Peer, peer_of_socket
from testsupport.fakekernel import FakeBackend
from testsupport.util import make_memfd


@pytest.fixture
def peer() -> Iterator[Peer]:
    a, b = socket.socketpair()
    try:
        yield peer_of_socket(a)
    finally:
        a.close()
        b.close()


def _custodian(kernel: FakeBackend, boot: str) -> Custodian:
    c = Custodian(kernel, StateSessionCarrier(kernel), grace=600, boot_id=boot)
    c.start()
    return c


def _after_kexec(kernel: FakeBackend, peer: Peer) -> Custodian:
    """Sessions 'app' (a, b) and 'other' (c), a kexec, and the next luod
    started (its reclaim done, nothing preserved again yet)."""
    old = _custodian(kernel, "boot-1")
    for session, names in (("app", "ab"), ("other", "c")):
        fds = [make_memfd(f"data {n}".encode()) for n in names]
        old.preserve_fds(
            peer, session, [Handoff(n, fd) for n, fd in zip(names, fds, strict=True)], True
        )
    kernel.reboot_kexec()
    old.close()  # the old boot's fds: dead after the kexec
    return _custodian(kernel, "boot-2")


def test_reclaim_makes_files_retrievable_before_preserving_again(
    kernel: FakeBackend, peer: Peer
) -> None:
    new = _after_kexec(kernel, peer)
    try:
        report = new.reclaim
        assert report is not None
        assert (report.state, report.sessions, report.files, report.lost) == (
            "reclaimed",
            2,
            3,
            [],
        )
        # Retrieved, not finished, nothing preserved again yet.
        assert report.preserved_again is None
        assert sorted(new.ledger.awaiting_preservation) == [(0, "app"), (0, "other")]
        snap = kernel.snapshot()
        assert snap["incoming"]["luod.1.u0.app"]["retrieved_tokens"] == [1, 2]
        assert not snap["incoming"]["luod.1.u0.app"]["finished"]
        assert not [n for n in snap["outgoing"] if n.endswith(".app")]

        # A copy needs nothing preserved again.
        fd, _ = new.retrieve_fd(peer, "app", "a", take=False)
        assert os.pread(fd, 100, 0) == b"data a"
        os.close(fd)
        assert (0, "app") in new.ledger.awaiting_preservation

        # Taking a file preserves that session again only, then rebuilds it.
        fd, _ = new.retrieve_fd(peer, "other", "c", take=True)
        assert os.pread(fd, 100, 0) == b"data c"
        os.close(fd)
        assert list(new.ledger.awaiting_preservation) == [(0, "app")]
        assert (0, "other") not in new.sessions
        assert report.preserved_again is None

        # The preflight preserves the rest again: everything is carried again.
        assert new.check() == []
        assert not new.ledger.awaiting_preservation
        assert report.preserved_again is not None
        app = new.sessions[(0, "app")]
        assert app.state is SessionState.OUTGOING
        snap = kernel.snapshot()
        assert snap["outgoing"][app.kernel_name]["tokens"] == [1, 2]
        assert snap["incoming"] == {}  # finished, the state session too
    finally:
        new.close()


def test_session_waiting_to_be_preserved_again_released_by_grace_or_discard(
    kernel: FakeBackend, peer: Peer
) -> None:
    new = _after_kexec(kernel, peer)
    try:
        new.discard_session(peer, "other")
        assert list(new.ledger.awaiting_preservation) == [(0, "app")]
        new.clock = lambda: 1e12  # far past every claim deadline
        assert new.expire() == ["app"]
        assert not new.ledger.awaiting_preservation and not new.sessions
        snap = kernel.snapshot()
        # Closing a retrieved session finishes it: nothing is left over.
        assert not [n for n in snap["incoming"] if n.startswith("luod.1.")]
        assert set(snap["outgoing"]) <= {"luod", "luod.b"}  # luod's own state only
    finally:
        new.close()


def test_handoff_preserves_what_came_over_again_first(kernel: FakeBackend, peer: Peer) -> None:
    """AlreadyPreserved knows the files that came over once their session
    is preserved again, so a hand-off preserves everything again first."""
    new = _after_kexec(kernel, peer)
    try:
        fd, _ = new.retrieve_fd(peer, "app", "a", take=False)
        with pytest.raises(Exception, match="already") as e:
            new.preserve_fds(peer, "again", [Handoff("a", fd)], True)
        assert type(e.value).__name__ == "AlreadyPreserved"
        assert not new.ledger.awaiting_preservation
    finally:
        new.close()


class Store:
    """A service's fd store as PID 1 keeps it (FDSTORE=1, FDSTOREREMOVE=1),
    in this process: enough for the fd-store carrier without a service manager."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, int]] = []

    def send(self, text: str, fds: Sequence[int]) -> bool:
        fields = dict(line.split("=", 1) for line in text.split("\n") if "=" in line)
        if fields.get("FDSTORE") == "1":
            self.entries += [(fields["FDNAME"], os.dup(fd)) for fd in fds]
        if fields.get("FDSTOREREMOVE") == "1":
            for e in [e for e in self.entries if e[0] == fields["FDNAME"]]:
                os.close(e[1])
                self.entries.remove(e)
        return True

    def listen(self) -> list[ListenFd]:
        """What the next luod gets in LISTEN_FDS."""
        return [ListenFd(os.dup(fd), name) for name, fd in self.entries]

    def kexec(self, kernel: FakeBackend) -> None:
        """Carry the store over a kexec as systemd >= 261 does: session fds
        by name (retrieved again after it); the manifest memfd (which PID 1
        preserves in its own session) simply stays open here."""
        names = {fd: kernel.identify_session(fd) for _n, fd in self.entries}
        kernel.reboot_kexec()
        for i, (fdname, fd) in enumerate(self.entries):
            session = names[fd]
            if session is not None:
                os.close(fd)
                self.entries[i] = (fdname, kernel.retrieve_session(session))

    def close(self) -> None:
        for _name, fd in self.entries:
            os.close(fd)


def test_restart_before_preserving_again_loses_nothing(kernel: FakeBackend, peer: Peer) -> None:
    """Under the fd-store carrier a luod that dies after the kexec, before
    it preserved a session again, leaves that session incoming and not
    finished: the next luod retrieves its files again and preserves it again."""
    store = Store()
    try:
        old = Custodian(kernel, FdStoreCarrier(kernel, [], send=store.send), boot_id="boot-1")
        old.start()
        for session, names in (("app", "ab"), ("other", "c"), ("more", "d")):
            fds = [make_memfd(f"data {n}".encode()) for n in names]
            old.preserve_fds(
                peer, session, [Handoff(n, fd) for n, fd in zip(names, fds, strict=True)], True
            )
        old.close()  # luod stops before the kexec; the store keeps everything
        store.kexec(kernel)

        new = Custodian(
            kernel, FdStoreCarrier(kernel, store.listen(), send=store.send), boot_id="boot-2"
        )
        assert new.start().state == "reclaimed"
        # Taking a file preserves 'other' again and writes the manifest of this boot.
        fd, _ = new.retrieve_fd(peer, "other", "c", take=True)
        os.close(fd)
        # Preserved again in the background: no call writes the manifest after it.
        assert new.preserve_again((0, "more"))
        assert list(new.ledger.awaiting_preservation) == [(0, "app")]
        new.close()  # luod dies here: 'app' is not preserved again

        again = Custodian(
            kernel, FdStoreCarrier(kernel, store.listen(), send=store.send), boot_id="boot-2"
        )
        report = again.start()
        assert (report.state, report.sessions, report.files, report.lost) == (
            "restored",
            2,
            3,
            [],
        )
        assert list(again.ledger.awaiting_preservation) == [(0, "app")]
        # 'more' was preserved again before the crash: it is held, outgoing.
        more = again.sessions[(0, "more")]
        assert more.state is SessionState.OUTGOING
        assert kernel.snapshot()["outgoing"][more.kernel_name]["tokens"] == [1]
        fd, _ = again.retrieve_fd(peer, "app", "b", take=False)
        assert os.pread(fd, 100, 0) == b"data b"
        os.close(fd)
        assert again.check() == []
        app = again.sessions[(0, "app")]
        assert kernel.snapshot()["outgoing"][app.kernel_name]["tokens"] == [1, 2]
        again.close()
    finally:
        store.close()
