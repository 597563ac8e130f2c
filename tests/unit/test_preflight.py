"""luod.preflight: what a kexec now would lose, case by case, over a ledger
set up by hand."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from luod.carriers import CarrierProblem
from luod.ledger import Ledger
from luod.manifest import ManifestError
from luod.model import HeldFile, Owner, Session, SessionKind, SessionState
from luod.preflight import Problem, check
from tests.unit.spycarrier import SpyCarrier
from testsupport.fakekernel import FakeBackend


@pytest.fixture
def ledger(kernel: FakeBackend) -> Iterator[Ledger]:
    ledger = Ledger(kernel, SpyCarrier(kernel))
    yield ledger
    ledger.close()


def _fd() -> int:
    return os.memfd_create("preflight-test", os.MFD_CLOEXEC)


def _session(
    ledger: Ledger,
    name: str,
    held: bool = True,
    state: SessionState = SessionState.OUTGOING,
    files: dict[str, bool] | None = None,
) -> Session:
    """A session in the ledger; `held`: luod has its fd; `files`: name ->
    whether luod holds a reference to it."""
    s = Session(
        name=name,
        kind=SessionKind.MANAGED,
        owner=Owner(uid=1000),
        kernel_name=f"luod.9.{name}",
        created_at=0.0,
        state=state,
        fd=_fd() if held else -1,
    )
    for i, (fname, ref) in enumerate((files or {}).items(), 1):
        s.files[fname] = HeldFile(fname, i, 0, 0.0, _fd() if ref else -1)
    ledger.add(s)
    return s


def test_nothing_held_nothing_lost(ledger: Ledger) -> None:
    assert check(ledger) == []


def test_held_and_outgoing_is_carried(ledger: Ledger) -> None:
    _session(ledger, "app", files={"a": True})
    # After a luod restart in this boot luod holds no reference to the
    # files of an outgoing session: the kernel carries them all the same.
    _session(ledger, "restored", files={"a": False, "b": False})
    assert check(ledger) == []


def test_what_would_be_lost(ledger: Ledger) -> None:
    _session(ledger, "nofd", held=False, files={"a": True, "b": False})
    _session(ledger, "came-over", state=SessionState.INCOMING)
    problems = check(ledger)
    assert [(p.session, p.name) for p in problems] == [
        ("nofd", None),
        ("nofd", "b"),
        ("came-over", None),
    ]
    assert problems[0].reason == "luod holds no fd for this session"
    assert problems[1].reason == "luod holds no reference to this file"
    assert "arrived with the last kexec" in problems[2].reason


def test_the_carriers_problems(ledger: Ledger) -> None:
    carrier = ledger.carrier
    assert isinstance(carrier, SpyCarrier)
    _session(ledger, "app")
    _session(ledger, "fine")
    carrier.extra_problems = [
        CarrierProblem(None, "the fd store is full"),
        CarrierProblem("luod.9.app", "not in the fd store"),
        CarrierProblem("luod.9.gone", "about a session luod does not hold"),
    ]
    assert check(ledger) == [
        Problem("", None, "the fd store is full"),
        Problem("app", None, "not in the fd store"),
    ]


def test_an_unusable_manifest_comes_first(ledger: Ledger) -> None:
    _session(ledger, "nofd", held=False)
    ledger.manifest_error = ManifestError("version", "manifest version 9 is newer than luod")
    problems = check(ledger)
    assert problems[0] == Problem(
        "", None, "the incoming manifest is unusable: manifest version 9 is newer than luod"
    )
    assert [p.session for p in problems] == ["", "nofd"]
