"""luod.crashcost: what a crash of luod now would release, under a carrier
that keeps nothing across luod's exit and under one whose fd store keeps
it all, over a ledger set up by hand."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator

import pytest

from luod.carriers import CarrierProblem
from luod.crashcost import crash_cost
from luod.ledger import Ledger
from luod.model import HeldFile, Owner, Session, SessionKind
from luod.preflight import Problem
from tests.unit.spycarrier import SpyCarrier
from testsupport.fakekernel import FakeBackend


@dataclasses.dataclass
class ExitProblem(CarrierProblem):
    """A problem of the carrier's own state that a crash costs too."""

    on_exit: bool = True


def _ledger(kernel: FakeBackend, holds_after_exit: bool) -> Ledger:
    ledger = Ledger(kernel, SpyCarrier(kernel, holds_after_exit=holds_after_exit))
    # Root: 2 files (10 + 20 bytes); uid 1000: 1 file of 5 bytes, and an empty session.
    _session(ledger, 0, "app", {"a": 10, "b": 20})
    _session(ledger, 1000, "app", {"x": 5})
    _session(ledger, 1000, "empty", {})
    return ledger


@pytest.fixture
def state_session(kernel: FakeBackend) -> Iterator[Ledger]:
    ledger = _ledger(kernel, holds_after_exit=False)
    yield ledger
    ledger.close()


@pytest.fixture
def fdstore(kernel: FakeBackend) -> Iterator[Ledger]:
    ledger = _ledger(kernel, holds_after_exit=True)
    yield ledger
    ledger.close()


def _session(ledger: Ledger, uid: int, name: str, files: dict[str, int]) -> Session:
    s = Session(
        name=name,
        kind=SessionKind.MANAGED,
        owner=Owner(uid=uid),
        kernel_name=f"luod.9.u{uid}.{name}",
        created_at=0.0,
        fd=os.memfd_create("crashcost-test", os.MFD_CLOEXEC),
    )
    for i, (fname, size) in enumerate(files.items(), 1):
        s.files[fname] = HeldFile(fname, i, size, 0.0, os.memfd_create(fname, os.MFD_CLOEXEC))
    ledger.add(s)
    return s


def _spy(ledger: Ledger) -> SpyCarrier:
    assert isinstance(ledger.carrier, SpyCarrier)
    return ledger.carrier


def _counts(ledger: Ledger, uid: int | None = None) -> tuple[int, int, int, bool]:
    cost = crash_cost(ledger, uid)
    return (cost.sessions, cost.files, cost.bytes_pinned, cost.everything)


# --- a carrier that keeps nothing across luod's exit ----------------------------


def test_state_session_a_crash_releases_everything(state_session: Ledger) -> None:
    assert _counts(state_session) == (3, 3, 35, True)
    cost = crash_cost(state_session)
    assert cost.reason == (
        "luod holds every session fd itself (spy carrier) and nothing outside luod holds a "
        "copy; its exit closes them, and the kernel unpreserves a session whose last fd is closed"
    )
    # One reason for everything: no session is listed on its own.
    assert cost.problems == []


def test_state_session_each_uid_is_told_its_own(state_session: Ledger) -> None:
    assert _counts(state_session, 0) == (1, 2, 30, True)
    assert _counts(state_session, 1000) == (2, 1, 5, True)
    assert _counts(state_session, 65534) == (0, 0, 0, True)


def test_state_session_nothing_held_costs_nothing(kernel: FakeBackend) -> None:
    ledger = Ledger(kernel, SpyCarrier(kernel))
    assert _counts(ledger) == (0, 0, 0, True)


def test_state_session_carrier_problems_change_nothing(state_session: Ledger) -> None:
    _spy(state_session).extra_problems.append(CarrierProblem("luod.9.u0.app", "not carried"))
    assert _counts(state_session) == (3, 3, 35, True)
    assert crash_cost(state_session).problems == []


# --- a carrier whose fd store keeps it all ----------------------------------------


def test_fdstore_a_crash_releases_nothing(fdstore: Ledger) -> None:
    assert _counts(fdstore) == (0, 0, 0, False)
    cost = crash_cost(fdstore)
    assert cost.reason == (
        "the service manager's fd store (spy carrier) keeps luod's session fds, its manifest "
        "and its references to every file; a restarted luod takes them back"
    )
    assert cost.problems == []
    assert _counts(fdstore, 1000) == (0, 0, 0, False)


def test_fdstore_a_session_not_in_the_store_is_lost(fdstore: Ledger) -> None:
    why = "its session fd is not in luod's fd store: it is lost when luod stops"
    spy = _spy(fdstore)
    spy.extra_problems += [
        CarrierProblem("luod.9.u1000.app", why),
        CarrierProblem("luod.7.u0.gone", "a session luod no longer holds"),
    ]
    cost = crash_cost(fdstore)
    assert (cost.sessions, cost.files, cost.bytes_pinned, cost.everything) == (1, 1, 5, False)
    assert cost.problems == [Problem("app", None, why, 1000)]
    assert cost.problems[0].uid == 1000
    assert "keeps all but the sessions listed" in cost.reason
    # The owner is told; root's own sessions are not concerned, and
    # another uid hears nothing of it.
    assert _counts(fdstore, 1000) == (1, 1, 5, False)
    assert crash_cost(fdstore, 1000).problems == cost.problems
    assert _counts(fdstore, 0) == (0, 0, 0, False)
    assert crash_cost(fdstore, 0).problems == []
    assert _counts(fdstore, 65534) == (0, 0, 0, False)


def test_fdstore_a_problem_of_the_next_kexec_costs_no_crash(fdstore: Ledger) -> None:
    """A service manager that drops the store at a kexec: a restart in
    this boot still loses nothing."""
    _spy(fdstore).extra_problems.append(CarrierProblem(None, "systemd 258 drops it"))
    assert _counts(fdstore) == (0, 0, 0, False)


def test_fdstore_a_problem_of_its_own_state_on_exit_costs_everything(fdstore: Ledger) -> None:
    why = "the manifest is not in luod's fd store"
    _spy(fdstore).extra_problems.append(ExitProblem(None, why))
    cost = crash_cost(fdstore)
    assert (cost.sessions, cost.files, cost.bytes_pinned, cost.everything) == (3, 3, 35, True)
    assert cost.reason == f"{why} (spy carrier)"
    assert _counts(fdstore, 1000) == (2, 1, 5, True)
