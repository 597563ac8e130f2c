"""luod's wire types, and how domain objects become them.

The dataclasses and TypedDicts below ARE the varlink contract's types:
asyncvarlink renders the IDL from them (protocol/*.varlink, checked by
tests/test_idl.py). Names and fields are the wire's (camelCase, times in
microseconds); the converters at the end take luod's domain objects
(luod.model, luod.orchestrator, luod.nextkernel, ...) and say them in these
terms, so nothing outside luod.varlink knows the wire shapes.

This module deliberately does not use `from __future__ import annotations`:
asyncvarlink reads the field types at run time.
"""

import enum
import typing

from asyncvarlink import FileDescriptor

from luod import nextkernel, orchestrator
from luod.crashcost import CrashCost as DomainCrashCost
from luod.model import HeldFile, Owner, Session
from luod.orchestrator import Phase
from luod.preflight import Problem
from luod.reclaim import ReclaimReport
from luod.record import record


class SessionKind(enum.Enum):
    managed = "managed"
    adopted = "adopted"
    delegated = "delegated"


class SessionState(enum.Enum):
    outgoing = "outgoing"
    incoming = "incoming"


@record
class OwnerInfo:
    """A session's owner, on the wire."""

    uid: int
    unit: typing.Optional[str]  # noqa: UP045 - asyncvarlink evaluates this at run time
    comm: str


@record
class FileInfo:
    """A file held in a session, on the wire."""

    name: str
    token: int
    size: int
    preservedUSec: int


@record
class SessionInfo:
    """A session and the files in it, on the wire."""

    name: str
    kind: SessionKind
    state: SessionState
    kernelName: str
    owner: OwnerInfo
    files: list[FileInfo]
    bytesPinned: int
    createdUSec: int
    kexecCount: int
    claimDeadlineUSec: typing.Optional[int]  # noqa: UP045


@record
class FileToPreserve:
    """One file of a PreserveFds call: its name and the index of its fd."""

    name: str
    fileDescriptor: int


@record
class RetrievedFile:
    """One file of a RetrieveFds reply: the index of its fd and the file."""

    # An index into the fds of the reply, as RetrieveFd's.
    fileDescriptor: FileDescriptor
    file: FileInfo


@record
class ProblemInfo:
    """Something the next kexec would lose, on the wire."""

    session: str
    name: typing.Optional[str]  # noqa: UP045
    reason: str


@record
class CrashCost:
    """What luod's exit now would release, on the wire."""

    # What luod's exit now (a crash, kill -9) would release; to anyone but
    # root, of its own sessions only.
    sessions: int
    files: int
    bytesPinned: int
    # All luod holds: the carrier keeps nothing across luod's exit.
    everything: bool
    # Why, one sentence.
    reason: str
    # The sessions concerned, each with why, when not everything is lost.
    problems: list[ProblemInfo]


@record
class ReclaimInfo:
    """What luod's start took back, on the wire."""

    state: str
    sessions: int
    files: int
    lost: list[str]
    error: typing.Optional[str]  # noqa: UP045
    # Until every file that came over could be retrieved.
    durationUSec: int
    # Then, until every managed session was preserved again for the next
    # kexec; null while that is still going on.
    preservedAgainUSec: typing.Optional[int]  # noqa: UP045


@record
class LoadedKernel:
    """The kernel loaded for the next kexec, on the wire."""

    kernel: str
    initrd: typing.Optional[str]  # noqa: UP045
    commandLine: str
    loadedUSec: int
    # What the image says: its version string (release first), whether it
    # was a UKI, the LUO ABI it speaks; why it cannot take the handover
    # (empty: the preflight accepts it).
    version: typing.Optional[str]  # noqa: UP045
    uki: bool
    luoAbi: typing.Optional[str]  # noqa: UP045
    problems: list[str]


@record
class SubscriberInfo:
    """A subscriber to the update barrier, on the wire."""

    name: str
    owner: OwnerInfo
    state: str
    deadlineSec: float
    lastEvent: Phase


@record
class UpdateInfo:
    """How the last update ended, on the wire."""

    update: int
    ok: bool
    subscriber: typing.Optional[str]  # noqa: UP045
    reason: typing.Optional[str]  # noqa: UP045
    prepareUSec: typing.Optional[int]  # noqa: UP045
    freezeUSec: typing.Optional[int]  # noqa: UP045


@record
class Event:
    """An event of the update barrier, on the wire."""

    phase: Phase
    subscription: str
    update: typing.Optional[int]  # noqa: UP045
    deadlineUSec: typing.Optional[int]  # noqa: UP045
    reason: typing.Optional[str]  # noqa: UP045
    kexecCount: typing.Optional[int]  # noqa: UP045
    sessions: typing.Optional[list[str]]  # noqa: UP045


@record
class StatusInfo:
    """What GetStatus says of luod, on the wire."""

    version: str
    backend: str
    carrier: str
    kexecCount: int
    sessions: int
    files: int
    bytesPinned: int
    crashCost: CrashCost
    graceSec: int
    nextReleaseUSec: typing.Optional[int]  # noqa: UP045
    reclaim: typing.Optional[ReclaimInfo]  # noqa: UP045
    kernelLoaded: bool
    loadedKernel: typing.Optional[LoadedKernel]  # noqa: UP045
    subscribers: list[SubscriberInfo]
    lastUpdate: typing.Optional[UpdateInfo]  # noqa: UP045


class RetrievedFd(typing.TypedDict):
    fileDescriptor: FileDescriptor
    file: FileInfo


class RetrievedSession(typing.TypedDict):
    fileDescriptor: FileDescriptor
    session: SessionInfo


class CheckResult(typing.TypedDict):
    ready: bool
    problems: list[ProblemInfo]
    crashCost: CrashCost


class UpdateResult(typing.TypedDict):
    update: int
    prepareUSec: int
    freezeUSec: int
    # What the update went on past (forced, or of a subscriber that may
    # not stop updates): "NAME (uid N): REASON", as luod logged each.
    overridden: list[str]


# --- from domain objects -------------------------------------------------------


def usec(t: float) -> int:
    """Seconds (wall clock or a duration) in the wire's microseconds, the
    nearest: a time read back from the manifest (luod.manifest, written to
    the microsecond) says the same as before it was written."""
    return round(t * 1_000_000)


def opt_usec(t: float | None) -> int | None:
    return None if t is None else usec(t)


def owner_info(o: Owner) -> OwnerInfo:
    return OwnerInfo(uid=o.uid, unit=o.unit, comm=o.comm)


def file_info(f: HeldFile) -> FileInfo:
    return FileInfo(name=f.name, token=f.token, size=f.size, preservedUSec=usec(f.preserved_at))


def session_info(s: Session) -> SessionInfo:
    return SessionInfo(
        name=s.name,
        kind=SessionKind(s.kind.value),
        state=SessionState(s.state.value),
        kernelName=s.kernel_name,
        owner=owner_info(s.owner),
        files=[file_info(f) for f in s.files.values()],
        bytesPinned=s.bytes_pinned,
        createdUSec=usec(s.created_at),
        kexecCount=s.kexec_count,
        claimDeadlineUSec=opt_usec(s.claim_deadline),
    )


def problem_info(p: Problem) -> ProblemInfo:
    return ProblemInfo(session=p.session, name=p.name, reason=p.reason)


def crash_cost_info(c: DomainCrashCost) -> CrashCost:
    return CrashCost(
        sessions=c.sessions,
        files=c.files,
        bytesPinned=c.bytes_pinned,
        everything=c.everything,
        reason=c.reason,
        problems=[problem_info(p) for p in c.problems],
    )


def reclaim_info(r: ReclaimReport) -> ReclaimInfo:
    return ReclaimInfo(
        state=r.state,
        sessions=r.sessions,
        files=r.files,
        lost=r.lost,
        error=r.error,
        durationUSec=usec(r.duration),
        preservedAgainUSec=opt_usec(r.preserved_again),
    )


def loaded_kernel(k: nextkernel.LoadedKernel) -> LoadedKernel:
    facts = k.facts
    return LoadedKernel(
        kernel=k.kernel,
        initrd=k.initrd,
        commandLine=k.cmdline,
        loadedUSec=usec(k.loaded_at),
        version=None if facts is None else facts.version,
        uki=k.uki,
        luoAbi=None if facts is None or not facts.luo_abi else ", ".join(facts.luo_abi),
        problems=list(k.problems),
    )


def event_info(e: orchestrator.Event) -> Event:
    return Event(
        phase=e.phase,
        subscription=e.subscription,
        update=e.update,
        deadlineUSec=opt_usec(e.deadline),
        reason=e.reason,
        kexecCount=e.kexec_count,
        sessions=e.sessions,
    )


def subscriber_info(sub: orchestrator.Subscriber) -> SubscriberInfo:
    return SubscriberInfo(
        name=sub.name,
        owner=OwnerInfo(uid=sub.peer.uid, unit=sub.peer.unit, comm=sub.peer.comm),
        state=sub.state,
        deadlineSec=sub.deadline,
        lastEvent=sub.last_event,
    )


def update_info(o: orchestrator.Outcome) -> UpdateInfo:
    return UpdateInfo(
        update=o.update,
        ok=o.ok,
        subscriber=o.who,
        reason=o.reason,
        prepareUSec=opt_usec(o.phases.get("prepare")),
        freezeUSec=opt_usec(o.phases.get("freeze")),
    )
