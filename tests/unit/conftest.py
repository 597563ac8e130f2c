"""Fixtures the unit tests share: a started Custodian on the fake kernel,
with a SpyCarrier."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from luod.custody import Custodian
from tests.unit.spycarrier import SpyCarrier
from testsupport.fakekernel import FakeBackend


@pytest.fixture
def carrier(kernel: FakeBackend) -> SpyCarrier:
    return SpyCarrier(kernel)


@pytest.fixture
def custodian_options() -> dict[str, Any]:
    """Custodian's keyword arguments past the carrier; a module overrides
    this fixture for its own (grace, quotas, ...)."""
    return {}


@pytest.fixture
def custodian(
    kernel: FakeBackend, carrier: SpyCarrier, custodian_options: dict[str, Any]
) -> Iterator[Custodian]:
    """A started Custodian of boot "boot-1", closed after the test."""
    c = Custodian(kernel, carrier, boot_id="boot-1", **custodian_options)
    c.start()
    yield c
    # Every test checks that the bytes counted as files came and went
    # (luod.model.HeldFiles, what quotas count) are what the files hold.
    for s in c.sessions.values():
        assert s.bytes_pinned == sum(f.size for f in s.files.values()), s.key
    # ... and that the files counted as held in all (luod.model.Tally, what
    # the cap on all uids together counts) are the sessions' files.
    held = len(c.sessions) + sum(len(s.files) for s in c.sessions.values())
    assert c.ledger.held_fds() == held
    # ... and the bytes counted for every uid but root (what the cap on
    # them together counts) are their sessions' files'.
    users = sum(s.bytes_pinned for s in c.sessions.values() if s.owner.uid != 0)
    assert c.ledger.users_bytes() == users
    c.close()
