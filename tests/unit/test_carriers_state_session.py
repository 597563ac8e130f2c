"""Unit tests of luod.carriers.state_session against the fake kernel."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from luod.carriers import IncomingState
from luod.carriers.slots import SlotMemfd, slot_capacity
from luod.carriers.state_session import MANIFEST_TOKEN, StateSessionCarrier
from luod.manifest import ManifestError
from testsupport.fakekernel import FakeBackend
from testsupport.util import make_memfd


@pytest.fixture
def carrier(kernel: FakeBackend) -> Iterator[StateSessionCarrier]:
    c = StateSessionCarrier(kernel)
    yield c
    c.close()


def _next_boot(kernel: FakeBackend, old: StateSessionCarrier) -> StateSessionCarrier:
    kernel.reboot_kexec()
    old.close()  # the old boot's fds: dead after the kexec
    return StateSessionCarrier(kernel)


def test_first_boot_has_nothing_and_saves_into_session_luod(
    kernel: FakeBackend, carrier: StateSessionCarrier
) -> None:
    assert carrier.load() is None
    carrier.finish_incoming()
    assert carrier.describe() == "state session not created yet"
    carrier.save(b"{}")
    out = kernel.snapshot()["outgoing"]
    assert list(out) == ["luod"] and out["luod"]["tokens"] == [MANIFEST_TOKEN]
    assert carrier.describe() == "manifest in LUO session 'luod' (65536 bytes)"
    assert (carrier.holds_after_exit, carrier.problems()) == (False, [])


def test_saves_in_place_while_it_fits_then_moves_to_the_other_session(
    kernel: FakeBackend, carrier: StateSessionCarrier
) -> None:
    carrier.save(b"one")
    carrier.save(b"two")
    assert list(kernel.snapshot()["outgoing"]) == ["luod"]
    big = b"x" * (slot_capacity(65536) + 1)
    carrier.save(big)
    # The new session exists before the old one goes: never no manifest.
    assert list(kernel.snapshot()["outgoing"]) == ["luod.b"]
    assert "LUO session 'luod.b'" in carrier.describe()
    carrier.save(b"y" * 200_000)  # and back
    assert list(kernel.snapshot()["outgoing"]) == ["luod"]


def test_the_next_boot_reads_the_newest_and_finishes_the_old(
    kernel: FakeBackend, carrier: StateSessionCarrier
) -> None:
    assert carrier.load() is None
    for payload in (b"first", b"second", b"third"):
        carrier.save(payload)
    new = _next_boot(kernel, carrier)
    try:
        assert new.load() == IncomingState(b"third", "session luod")
        assert kernel.snapshot()["incoming"]["luod"]["retrieved"]
        # Incoming and outgoing names are apart: the new state session may
        # be 'luod' again before the old one is finished.
        new.save(b"fourth")
        assert list(kernel.snapshot()["outgoing"]) == ["luod"]
        new.finish_incoming()
        assert "luod" not in kernel.snapshot()["incoming"]
        # The sequence number carries on: a kexec now brings "fourth".
        newer = _next_boot(kernel, new)
        assert newer.load() == IncomingState(b"fourth", "session luod")
        newer.close()
    finally:
        new.close()


def test_a_state_session_without_manifest_raises_and_is_kept(kernel: FakeBackend) -> None:
    old = StateSessionCarrier(kernel)
    session = kernel.create_session("luod")
    data = make_memfd(b"not a manifest")
    kernel.preserve_fd(session, data, MANIFEST_TOKEN + 1)
    os.close(data)
    new = _next_boot(kernel, old)
    os.close(session)
    try:
        with pytest.raises(ManifestError, match="state session 'luod' has no manifest"):
            new.load()
        # Not finished: finishing would release what it holds.
        assert not kernel.snapshot()["incoming"]["luod"]["finished"]
    finally:
        new.close()


def test_a_torn_write_falls_back_to_the_last_good_manifest(
    kernel: FakeBackend, carrier: StateSessionCarrier
) -> None:
    carrier.save(b"good")  # slot 0 of a new memfd
    carrier.save(b"torn")  # slot 1
    # Writes into a preserved memfd are carried: tear slot 1's body as a
    # crash in the middle of a write would (the carrier's own memfd; the
    # kernel gives nobody else a reference to it).
    out = carrier._manifest.current
    assert out is not None
    os.pwrite(out.fd, b"X", out.size // 2 + 56)  # past the 56-byte header
    new = _next_boot(kernel, carrier)
    try:
        assert new.load() == IncomingState(b"good", "session luod")
    finally:
        new.close()


@pytest.mark.parametrize(("seq_a", "seq_b", "winner"), [(1, 2, "luod.b"), (3, 2, "luod")])
def test_of_two_state_sessions_the_newer_manifest_wins(
    kernel: FakeBackend, seq_a: int, seq_b: int, winner: str
) -> None:
    """luod died after making the new state session, before dropping the old."""
    held = []
    for name, seq in (("luod", seq_a), ("luod.b", seq_b)):
        memfd = SlotMemfd.create("luod-manifest", seq, name.encode())
        session = kernel.create_session(name)
        kernel.preserve_fd(session, memfd.fd, MANIFEST_TOKEN)
        held += [session, memfd.fd]
    new = _next_boot(kernel, StateSessionCarrier(kernel))
    for fd in held:
        os.close(fd)
    try:
        assert new.load() == IncomingState(winner.encode(), f"session {winner}")
        new.finish_incoming()  # both go
        assert kernel.snapshot()["incoming"] == {}
    finally:
        new.close()
