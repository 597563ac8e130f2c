"""luod's varlink interfaces, served with asyncvarlink.

The Python types below ARE the wire contract: asyncvarlink renders the
interface description from them, and tests/test_idl.py asserts that the
rendering equals the IDL files in protocol/ (which `varlinkctl validate-idl`
checks). Change one, regenerate the other: `make idl`.

This module deliberately does not use `from __future__ import annotations`:
asyncvarlink reads the dataclass field types at run time.

fds travel as sd-varlink does it: an int in the JSON is an index into the
SCM_RIGHTS array of the message. luod resolves indexes itself (rather than
typing them as asyncvarlink FileDescriptor) so that a bad index is a named
error with its parameter, and so that every received fd is accounted for:
taken into the core (which keeps or closes it) or closed with the message.
"""

import asyncio
import collections.abc
import contextvars
import dataclasses
import enum
import functools
import os
import resource
import socket
import typing

import structlog
from asyncvarlink import (
    FileDescriptor,
    FileDescriptorArray,
    TypedVarlinkErrorReply,
    VarlinkInterface,
    VarlinkInterfaceRegistry,
    VarlinkInterfaceServerProtocol,
    VarlinkMethodCall,
    VarlinkTransport,
    VarlinkUnixServer,
    varlinkmethod,
    varlinksignature,
)
from asyncvarlink.conversion import ObjectVarlinkType, VarlinkType
from asyncvarlink.serviceinterface import VarlinkServiceInterface

import luod
from luod import errors, orchestrator
from luod.core import Custodian, Incoming, Problem, ReclaimReport
from luod.fastconv import FlatRecordList
from luod.model import HeldFile, Session
from luod.orchestrator import OrchestrationError, Orchestrator, Phase
from luod.peer import Peer, peer_of_socket

log = structlog.get_logger("luod")

CUSTODY = "io.luod.Custody"
MANAGER = "io.luod.Manager"

# --- types ---------------------------------------------------------------


class SessionKind(enum.Enum):
    managed = "managed"
    adopted = "adopted"
    delegated = "delegated"


class SessionState(enum.Enum):
    outgoing = "outgoing"
    incoming = "incoming"


@dataclasses.dataclass
class OwnerInfo:
    uid: int
    unit: typing.Optional[str]  # noqa: UP045 - asyncvarlink evaluates this at run time
    comm: str


@dataclasses.dataclass
class FileInfo:
    name: str
    token: int
    size: int
    preservedUSec: int


@dataclasses.dataclass
class SessionInfo:
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


@dataclasses.dataclass
class FileToPreserve:
    name: str
    fileDescriptor: int


@dataclasses.dataclass
class ProblemInfo:
    session: str
    name: typing.Optional[str]  # noqa: UP045
    reason: str


@dataclasses.dataclass
class ReclaimInfo:
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


@dataclasses.dataclass
class LoadedKernel:
    kernel: str
    initrd: typing.Optional[str]  # noqa: UP045
    commandLine: str
    loadedUSec: int


@dataclasses.dataclass
class SubscriberInfo:
    name: str
    owner: OwnerInfo
    state: str
    deadlineSec: float
    lastEvent: Phase


@dataclasses.dataclass
class UpdateInfo:
    update: int
    ok: bool
    subscriber: typing.Optional[str]  # noqa: UP045
    reason: typing.Optional[str]  # noqa: UP045
    prepareUSec: typing.Optional[int]  # noqa: UP045
    freezeUSec: typing.Optional[int]  # noqa: UP045


@dataclasses.dataclass
class Event:
    phase: Phase
    subscription: str
    update: typing.Optional[int]  # noqa: UP045
    deadlineUSec: typing.Optional[int]  # noqa: UP045
    reason: typing.Optional[str]  # noqa: UP045
    kexecCount: typing.Optional[int]  # noqa: UP045
    sessions: typing.Optional[list[str]]  # noqa: UP045


@dataclasses.dataclass
class StatusInfo:
    version: str
    backend: str
    carrier: str
    kexecCount: int
    sessions: int
    files: int
    bytesPinned: int
    graceSec: int
    nextReleaseUSec: typing.Optional[int]  # noqa: UP045
    reclaim: typing.Optional[ReclaimInfo]  # noqa: UP045
    kernelLoaded: bool
    loadedKernel: typing.Optional[LoadedKernel]  # noqa: UP045
    subscribers: list[SubscriberInfo]
    lastUpdate: typing.Optional[UpdateInfo]  # noqa: UP045


def _usec(t: float) -> int:
    return int(t * 1_000_000)


def _opt_usec(t: float | None) -> int | None:
    return None if t is None else _usec(t)


def event_info(e: orchestrator.Event) -> Event:
    return Event(
        phase=e.phase,
        subscription=e.subscription,
        update=e.update,
        deadlineUSec=_opt_usec(e.deadline),
        reason=e.reason,
        kexecCount=e.kexec_count,
        sessions=e.sessions,
    )


def update_info(o: orchestrator.Outcome) -> UpdateInfo:
    return UpdateInfo(
        update=o.update,
        ok=o.ok,
        subscriber=o.who,
        reason=o.reason,
        prepareUSec=_opt_usec(o.phases.get("prepare")),
        freezeUSec=_opt_usec(o.phases.get("freeze")),
    )


def subscriber_info(sub: orchestrator.Subscriber) -> SubscriberInfo:
    return SubscriberInfo(
        name=sub.name,
        owner=OwnerInfo(uid=sub.peer.uid, unit=sub.peer.unit, comm=sub.peer.comm),
        state=sub.state,
        deadlineSec=sub.deadline,
        lastEvent=sub.last_event,
    )


def file_info(f: HeldFile) -> FileInfo:
    return FileInfo(name=f.name, token=f.token, size=f.size, preservedUSec=_usec(f.preserved_at))


def session_info(s: Session) -> SessionInfo:
    return SessionInfo(
        name=s.name,
        kind=SessionKind(s.kind.value),
        state=SessionState(s.state.value),
        kernelName=s.kernel_name,
        owner=OwnerInfo(uid=s.owner.uid, unit=s.owner.unit, comm=s.owner.comm),
        files=[file_info(f) for f in s.files.values()],
        bytesPinned=s.bytes_pinned,
        createdUSec=_usec(s.created_at),
        kexecCount=s.kexec_count,
        claimDeadlineUSec=None if s.claim_deadline is None else _usec(s.claim_deadline),
    )


def reclaim_info(r: ReclaimReport) -> ReclaimInfo:
    return ReclaimInfo(
        state=r.state,
        sessions=r.sessions,
        files=r.files,
        lost=r.lost,
        error=r.error,
        durationUSec=_usec(r.duration),
        preservedAgainUSec=_opt_usec(r.preserved_again),
    )


def problem_info(p: Problem) -> ProblemInfo:
    return ProblemInfo(session=p.session, name=p.name, reason=p.reason)


class RetrievedFd(typing.TypedDict):
    fileDescriptor: FileDescriptor
    file: FileInfo


class RetrievedSession(typing.TypedDict):
    fileDescriptor: FileDescriptor
    session: SessionInfo


class CheckResult(typing.TypedDict):
    ready: bool
    problems: list[ProblemInfo]


class UpdateResult(typing.TypedDict):
    update: int
    prepareUSec: int
    freezeUSec: int


# --- errors ----------------------------------------------------------------


class NoSuchSession(TypedVarlinkErrorReply, interface=CUSTODY):
    """No session of that name is in luod's custody."""

    class Parameters:
        session: str


class NoSuchFd(TypedVarlinkErrorReply, interface=CUSTODY):
    """The session holds no fd of that name."""

    class Parameters:
        session: str
        name: str


class SessionExists(TypedVarlinkErrorReply, interface=CUSTODY):
    """A session of that name exists already."""

    class Parameters:
        session: str


class FdNameExists(TypedVarlinkErrorReply, interface=CUSTODY):
    """The session holds an fd of that name already."""

    class Parameters:
        session: str
        name: str


class InvalidName(TypedVarlinkErrorReply, interface=CUSTODY):
    """A session or fd name breaks the naming rules; reason says which."""

    class Parameters:
        parameter: str
        reason: str


class ReservedSessionName(TypedVarlinkErrorReply, interface=CUSTODY):
    """The session name belongs to PID 1 ('systemd') or to luod ('luod*')."""

    class Parameters:
        session: str
        reason: str


class UnsupportedFd(TypedVarlinkErrorReply, interface=CUSTODY):
    """The kernel cannot carry this kind of file over a kexec; kind names it."""

    class Parameters:
        parameter: str
        kind: str
        reason: str


class MissingFd(TypedVarlinkErrorReply, interface=CUSTODY):
    """A file descriptor index names no fd sent with the call."""

    class Parameters:
        parameter: str
        index: int


class TooManyOpenFiles(TypedVarlinkErrorReply, interface=CUSTODY):
    """The fd was sent, but luod is at its limit of open files (limit), so
    the kernel dropped it on the way in; nothing of the call was kept."""

    class Parameters:
        parameter: str
        index: int
        limit: int


class AlreadyPreserved(TypedVarlinkErrorReply, interface=CUSTODY):
    """The file is in luod's custody already, under another name."""

    class Parameters:
        parameter: str
        session: str
        name: str


class PermissionDenied(TypedVarlinkErrorReply, interface=CUSTODY):
    """The session belongs to another user; only its owner or root may use it."""

    class Parameters:
        session: str


class WrongSessionKind(TypedVarlinkErrorReply, interface=CUSTODY):
    """The operation does not apply to this kind of session."""

    class Parameters:
        session: str
        kind: str
        reason: str


class KernelRefused(TypedVarlinkErrorReply, interface=CUSTODY):
    """The kernel refused an operation; errno and message say why."""

    class Parameters:
        operation: str
        errno: int
        message: str
        session: typing.Optional[str]  # noqa: UP045


class NotReady(TypedVarlinkErrorReply, interface=CUSTODY):
    """luod cannot do this now; reason says why."""

    class Parameters:
        reason: str


class PreflightFailed(TypedVarlinkErrorReply, interface=MANAGER):
    """The preflight check found problems; the kexec was not started."""

    class Parameters:
        problems: int
        reason: str


class RootRequired(TypedVarlinkErrorReply, interface=MANAGER):
    """Only root may call this method."""

    class Parameters:
        method: str


class KernelUnusable(TypedVarlinkErrorReply, interface=MANAGER):
    """The kernel image (or initrd) cannot be loaded; reason says why."""

    class Parameters:
        parameter: str
        reason: str


class InvalidDeadline(TypedVarlinkErrorReply, interface=MANAGER):
    """The deadline is not more than 0 and at most maximum seconds."""

    class Parameters:
        parameter: str
        maximum: int


class SubscriptionExists(TypedVarlinkErrorReply, interface=MANAGER):
    """A subscriber of that name is connected already."""

    class Parameters:
        name: str


class NoSuchSubscription(TypedVarlinkErrorReply, interface=MANAGER):
    """No subscription with that id (of the caller's)."""

    class Parameters:
        subscription: str


class UnexpectedAcknowledge(TypedVarlinkErrorReply, interface=MANAGER):
    """The acknowledgement does not answer an event this subscription is waiting on."""

    class Parameters:
        subscription: str
        update: int
        phase: str
        reason: str


class UpdateInProgress(TypedVarlinkErrorReply, interface=MANAGER):
    """Another update is running."""

    class Parameters:
        update: int


class UpdateAborted(TypedVarlinkErrorReply, interface=MANAGER):
    """A subscriber refused, missed its deadline or went away; nothing was dropped."""

    class Parameters:
        update: int
        subscriber: str
        reason: str


class SubscriptionEnded(TypedVarlinkErrorReply, interface=MANAGER):
    """The subscription was ended by luod (it is stopping)."""

    class Parameters:
        reason: str


_ERRORS: dict[str, type[TypedVarlinkErrorReply]] = {
    cls.name: cls
    for cls in (
        NoSuchSession,
        NoSuchFd,
        SessionExists,
        FdNameExists,
        InvalidName,
        ReservedSessionName,
        UnsupportedFd,
        MissingFd,
        TooManyOpenFiles,
        AlreadyPreserved,
        PermissionDenied,
        WrongSessionKind,
        KernelRefused,
        NotReady,
        PreflightFailed,
        RootRequired,
        KernelUnusable,
    )
}

_ORCHESTRATION_ERRORS: dict[str, type[TypedVarlinkErrorReply]] = {
    cls.__name__: cls
    for cls in (
        InvalidDeadline,
        SubscriptionExists,
        NoSuchSubscription,
        UnexpectedAcknowledge,
        UpdateInProgress,
    )
}


def orchestration_error(e: OrchestrationError) -> TypedVarlinkErrorReply:
    return _ORCHESTRATION_ERRORS[e.name](**e.parameters)  # type: ignore[arg-type]


def to_varlink(e: errors.LuodError) -> TypedVarlinkErrorReply:
    cls = _ERRORS[e.error_name]
    params = {k: v for k, v in e.parameters.items() if v is not None}
    return cls(**params)  # type: ignore[arg-type]


# --- per-call context: who called, and the fds that came with the call -------


@dataclasses.dataclass
class CallContext:
    peer: Peer
    fds: FileDescriptorArray | None
    protocol: "LuodProtocol"
    # The kernel dropped fds of this call: luod was at its open-file limit.
    fds_dropped: bool = False
    taken: set[int] = dataclasses.field(default_factory=set)


_current: contextvars.ContextVar[CallContext] = contextvars.ContextVar("luod_call")


def _ctx() -> CallContext:
    return _current.get()


def take_fd(index: int, parameter: str) -> int:
    """Take ownership of fd `index` of the current call, or MissingFd
    (TooManyOpenFiles when the kernel dropped fds of the call)."""
    ctx = _ctx()
    if ctx.fds is None or index < 0 or index >= len(ctx.fds) or index in ctx.taken:
        if ctx.fds_dropped and index >= (0 if ctx.fds is None else len(ctx.fds)):
            limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            raise errors.TooManyOpenFiles(parameter, index, limit)
        raise errors.MissingFd(parameter, index)
    fd = ctx.fds[index]
    if not fd:
        raise errors.MissingFd(parameter, index)
    ctx.taken.add(index)
    raw = fd.take()
    assert isinstance(raw, int)
    return raw


_P = typing.ParamSpec("_P")
_R = typing.TypeVar("_R")


def refused(method: str, e: errors.LuodError | OrchestrationError) -> TypedVarlinkErrorReply:
    """Log a refused call and make the varlink error of the same name."""
    if isinstance(e, errors.LuodError):
        name, reply = e.error_name, to_varlink(e)
    else:
        name, reply = f"{MANAGER}.{e.name}", orchestration_error(e)
    log.info(
        "call-refused", method=method, error=name, detail=e.message, peer=_ctx().peer.describe()
    )
    return reply


def translating(fn: collections.abc.Callable[_P, _R]) -> collections.abc.Callable[_P, _R]:
    """Turn core errors into the varlink errors of the same name."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return fn(*args, **kwargs)
        except (errors.LuodError, OrchestrationError) as e:
            raise refused(fn.__name__, e) from None

    return wrapper


# --- interfaces -------------------------------------------------------------


class CustodyInterface(VarlinkInterface, name=CUSTODY):
    """Hand file descriptors to luod so that they survive a kexec, and get
    them back after it. File descriptors travel with the message
    (SCM_RIGHTS); an int named fileDescriptor is an index into them."""

    errors = (
        NoSuchSession,
        NoSuchFd,
        SessionExists,
        FdNameExists,
        InvalidName,
        ReservedSessionName,
        UnsupportedFd,
        MissingFd,
        TooManyOpenFiles,
        AlreadyPreserved,
        PermissionDenied,
        WrongSessionKind,
        KernelRefused,
        NotReady,
    )

    def __init__(self, core: Custodian) -> None:
        self.core = core

    @varlinkmethod(return_parameter="session")
    @translating
    def CreateSession(self, session: str) -> SessionInfo:
        """Create a session that luod manages for the caller."""
        return session_info(self.core.create_session(_ctx().peer, session))

    @varlinkmethod(return_parameter="file")
    @translating
    def PreserveFd(
        self,
        session: str,
        name: str,
        fileDescriptor: int,
        createSession: typing.Optional[bool] = None,  # noqa: UP045
    ) -> FileInfo:
        """Hand off one memfd into a session under a name. It is preserved
        at once, so errors surface now and not at the kexec."""
        fd = take_fd(fileDescriptor, "fileDescriptor")
        added = self.core.preserve_fds(
            _ctx().peer, session, [Incoming(name, fd)], create=bool(createSession)
        )
        return file_info(added[0])

    @varlinkmethod(return_parameter="files")
    @translating
    def PreserveFds(
        self,
        session: str,
        files: list[FileToPreserve],
        createSession: typing.Optional[bool] = None,  # noqa: UP045
    ) -> list[FileInfo]:
        """Hand off many memfds in one call: all are preserved, or none."""
        incoming: list[Incoming] = []
        try:
            for i, f in enumerate(files):
                where = f"files[{i}]"
                incoming.append(
                    Incoming(f.name, take_fd(f.fileDescriptor, f"{where}.fileDescriptor"), where)
                )
        except BaseException:
            for inc in incoming:
                os.close(inc.fd)
            raise
        added = self.core.preserve_fds(_ctx().peer, session, incoming, create=bool(createSession))
        return [file_info(f) for f in added]

    @varlinkmethod(return_parameter="session")
    @translating
    def AdoptSession(self, fileDescriptor: int) -> SessionInfo:
        """Hand over a LUO session the caller created itself. luod holds it
        as it is until the kexec and gives it back after."""
        fd = take_fd(fileDescriptor, "fileDescriptor")
        return session_info(self.core.adopt_session(_ctx().peer, fd))

    @varlinkmethod
    @translating
    def CreateDelegatedSession(self, session: str) -> RetrievedSession:
        """Create a session and hand its fd to the caller, to preserve its
        own files into. luod keeps a reference as custodian: the session
        survives the caller's restart or crash and the shutdown, and after
        the kexec the caller takes it back with RetrieveSession."""
        fd, s = self.core.create_delegated(_ctx().peer, session)
        return {"fileDescriptor": FileDescriptor(fd, should_close=True), "session": session_info(s)}

    @varlinkmethod(return_parameter="sessions")
    @translating
    def ListSessions(self, session: typing.Optional[str] = None) -> list[SessionInfo]:  # noqa: UP045
        """The caller's sessions (root: all sessions), or just one."""
        return [session_info(s) for s in self.core.list_sessions(_ctx().peer, session)]

    @varlinkmethod
    @translating
    def RetrieveFd(
        self,
        session: str,
        name: str,
        take: typing.Optional[bool] = None,  # noqa: UP045
    ) -> RetrievedFd:
        """Get a held fd back. Without take, a copy: luod keeps it in
        custody. With take, luod lets go of it."""
        fd, f = self.core.retrieve_fd(_ctx().peer, session, name, bool(take))
        return {"fileDescriptor": FileDescriptor(fd, should_close=True), "file": file_info(f)}

    @varlinkmethod
    @translating
    def RetrieveSession(self, session: str) -> RetrievedSession:
        """An adopted or delegated session's fd, for its owner. Before the
        kexec a copy (luod goes on holding it, so that it is carried); after
        the kexec the session itself, and luod lets go of it."""
        info = session_info(self.core.sessions[session]) if session in self.core.sessions else None
        fd = self.core.retrieve_session(_ctx().peer, session)
        assert info is not None
        return {"fileDescriptor": FileDescriptor(fd, should_close=True), "session": info}

    @varlinkmethod
    @translating
    def DiscardSession(self, session: str) -> None:
        """Release a session and everything in it. Before the kexec this
        means it will not be carried; after it, that it is dropped."""
        self.core.discard_session(_ctx().peer, session)


def _quicken_preserve_fds() -> None:
    """PreserveFds converts its two lists with FlatRecordList (luod.fastconv):
    the same types, quicker. Rebuilt as asyncvarlink's varlinkmethod builds
    them (optional arguments with a default are dropped when None); if this
    asyncvarlink has no signature to adjust, the generic conversion stays."""
    sig = varlinksignature(CustodyInterface.PreserveFds)
    if sig is None:
        return
    sig.parameter_type = ObjectVarlinkType(
        {
            "session": VarlinkType.from_type_annotation(str),
            "files": FlatRecordList(FileToPreserve),
            "createSession": VarlinkType.from_type_annotation(bool).optional(),
        },
        discardnone={"createSession"},
    )
    sig.return_type = ObjectVarlinkType({"files": FlatRecordList(FileInfo)})


_quicken_preserve_fds()


class ManagerInterface(VarlinkInterface, name=MANAGER):
    """Inspect and drive luod: status, the preflight check, reclaim after a
    kexec, and the kexec itself where no service manager does it."""

    errors = (
        PreflightFailed,
        RootRequired,
        KernelUnusable,
        InvalidDeadline,
        SubscriptionExists,
        NoSuchSubscription,
        UnexpectedAcknowledge,
        UpdateInProgress,
        UpdateAborted,
        SubscriptionEnded,
    )

    def __init__(self, daemon: "DaemonHooks") -> None:
        self.daemon = daemon

    @property
    def orchestrator(self) -> Orchestrator:
        return self.daemon.orchestrator

    @property
    def core(self) -> Custodian:
        return self.daemon.core

    @varlinkmethod(return_parameter="status")
    @translating
    def GetStatus(self) -> StatusInfo:
        """What luod holds, and how it will carry it."""
        core = self.core
        st = core.status()
        nxt = core.next_deadline()
        return StatusInfo(
            version=luod.__version__,
            backend=core.backend.name,
            carrier=core.carrier.describe(),
            kexecCount=core.kexec_count,
            sessions=st["sessions"],
            files=st["files"],
            bytesPinned=st["bytesPinned"],
            graceSec=int(core.grace),
            nextReleaseUSec=None if nxt is None else _usec(nxt),
            reclaim=None if core.reclaim is None else reclaim_info(core.reclaim),
            kernelLoaded=core.backend.kernel_loaded(),
            loadedKernel=self.daemon.loaded,
            subscribers=[subscriber_info(s) for s in self.orchestrator.subscribers.values()],
            lastUpdate=None
            if self.orchestrator.last_outcome is None
            else update_info(self.orchestrator.last_outcome),
        )

    @varlinkmethod
    @translating
    def Check(self) -> CheckResult:
        """Preflight: what would be lost if the kexec happened now, and why."""
        problems = self.core.check()
        return {"ready": not problems, "problems": [problem_info(p) for p in problems]}

    @varlinkmethod(return_parameter="reclaim")
    @translating
    def Reclaim(self) -> ReclaimInfo:
        """Make sure everything the previous kernel carried was taken over.
        luod does this when it starts; this returns what it found. The
        boot-time luod-reclaim.service calls it to start luod early."""
        if self.core.reclaim is None:
            raise errors.NotReady("luod has not started its reclaim yet")
        return reclaim_info(self.core.reclaim)

    def _root(self, method: str) -> Peer:
        peer = _ctx().peer
        if not peer.is_root:
            raise errors.RootRequired(method)
        return peer

    def _preflight(self, force: bool, own_reboot: bool) -> None:
        blocker = self.daemon.kexec_blocker(own_reboot)
        if blocker is not None:
            raise errors.NotReady(blocker)
        problems = self.core.check()
        if problems and not force:
            raise errors.PreflightFailed(
                len(problems), "; ".join(f"{p.session}: {p.reason}" for p in problems)
            )

    @varlinkmethod
    @translating
    def KExec(self, force: typing.Optional[bool] = None) -> None:  # noqa: UP045
        """Jump into the loaded kernel with reboot(LINUX_REBOOT_CMD_KEXEC) at
        once, without asking subscribers, for systems where no service
        manager does it. Root only. Refused when the preflight check finds
        problems, unless force is set. Update is the orderly way."""
        peer = self._root("KExec")
        self._preflight(bool(force), own_reboot=True)
        self.daemon.schedule_kexec(peer)

    @varlinkmethod(return_parameter="loaded")
    @translating
    def LoadKernel(
        self,
        kernel: str,
        initrd: typing.Optional[str] = None,  # noqa: UP045
        commandLine: typing.Optional[str] = None,  # noqa: UP045
        reuseCommandLine: typing.Optional[bool] = None,  # noqa: UP045
    ) -> LoadedKernel:
        """Check a kernel image (a readable kernel for this architecture)
        and load it with kexec_file_load(2), ready for Update. Root only."""
        self._root("LoadKernel")
        return self.daemon.load_kernel(kernel, initrd, commandLine, bool(reuseCommandLine))

    @varlinkmethod
    @translating
    def UnloadKernel(self) -> None:
        """Undo LoadKernel. Root only."""
        self._root("UnloadKernel")
        self.daemon.unload_kernel()

    @varlinkmethod(return_parameter="event", delay_generator=False)
    async def Subscribe(
        self,
        name: str,
        deadlineSec: typing.Optional[float] = None,  # noqa: UP045
    ) -> collections.abc.AsyncIterator[Event]:
        """Follow live updates (call with more). The first event is
        subscribed, or resumed when this name was subscribed before the last
        kexec. Then, per update: prepare and freeze, each to be answered with
        Acknowledge within deadlineSec, or aborted with the reason."""
        ctx = _ctx()
        try:
            sessions = [s.name for s in self.core.list_sessions(ctx.peer)]
            sub = self.orchestrator.subscribe(
                ctx.peer, name, deadlineSec, self.core.kexec_count, sessions
            )
        except OrchestrationError as e:
            raise refused("Subscribe", e) from None
        ctx.protocol.on_disconnect(lambda: self.orchestrator.unsubscribe(sub, "disconnected"))
        try:
            while (event := await sub.queue.get()) is not None:
                yield event_info(event)
        finally:
            self.orchestrator.unsubscribe(sub, "stream closed")
        raise SubscriptionEnded(reason="the subscription ended")

    @varlinkmethod
    @translating
    def Acknowledge(
        self,
        subscription: str,
        update: int,
        phase: Phase,
        refuse: typing.Optional[bool] = None,  # noqa: UP045
        reason: typing.Optional[str] = None,  # noqa: UP045
    ) -> None:
        """Answer prepare or freeze of an update. With refuse, the update is
        aborted for everyone, with reason."""
        self.orchestrator.acknowledge(
            _ctx().peer, subscription, update, phase, bool(refuse), reason
        )

    @varlinkmethod
    async def Update(self, force: typing.Optional[bool] = None) -> UpdateResult:  # noqa: UP045
        """The live update: preflight check, prepare, freeze, then the kexec
        (through PID 1 under systemd, else luod's own reboot). Returns once
        the barrier passed and the kexec is under way. Root only."""
        try:
            self._root("Update")
            self._preflight(bool(force), own_reboot=False)
            outcome = await self.orchestrator.run(self.daemon.jump)
        except (errors.LuodError, OrchestrationError) as e:
            raise refused("Update", e) from None
        if not outcome.ok:
            raise UpdateAborted(
                update=outcome.update, subscriber=outcome.who or "", reason=outcome.reason or ""
            )
        return {
            "update": outcome.update,
            "prepareUSec": _usec(outcome.phases["prepare"]),
            "freezeUSec": _usec(outcome.phases["freeze"]),
        }


class DaemonHooks(typing.Protocol):
    core: Custodian
    orchestrator: Orchestrator
    loaded: LoadedKernel | None

    def schedule_kexec(self, peer: Peer | None) -> None: ...

    def kexec_blocker(self, own_reboot: bool) -> str | None: ...

    def load_kernel(
        self, kernel: str, initrd: str | None, cmdline: str | None, reuse: bool
    ) -> LoadedKernel: ...

    def unload_kernel(self) -> None: ...

    async def jump(self) -> None: ...


# --- transport -------------------------------------------------------------


class LuodProtocol(VarlinkInterfaceServerProtocol):
    """Knows its peer and sets the call context."""

    peer: Peer
    sock: "ConnectionSocket | None"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("luod.peer")
        assert isinstance(peer, Peer)
        self.peer = peer
        sock = transport.get_extra_info("luod.socket")
        self.sock = sock if isinstance(sock, ConnectionSocket) else None
        self._disconnect_hooks: list[collections.abc.Callable[[], None]] = []

    def on_disconnect(self, hook: collections.abc.Callable[[], None]) -> None:
        """Run `hook` when the peer goes away. A pending `more` call (a
        subscription) would otherwise keep the connection open forever."""
        self._disconnect_hooks.append(hook)

    def _disconnected(self) -> None:
        hooks, self._disconnect_hooks = self._disconnect_hooks, []
        for hook in hooks:
            hook()

    def eof_received(self) -> None:
        self._disconnected()
        super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disconnected()
        super().connection_lost(exc)

    def call_received(
        self, call: VarlinkMethodCall, fds: FileDescriptorArray | None
    ) -> asyncio.Future[None] | None:
        # asyncvarlink hands each message on as soon as it is received, so
        # the flags of the last recvmsg() are this call's.
        dropped = self.sock is not None and self.sock.fds_dropped
        token = _current.set(CallContext(self.peer, fds, self, dropped))
        try:
            fut: asyncio.Future[None] | None = super().call_received(call, fds)
        finally:
            _current.reset(token)
        if call.more:
            # asyncvarlink stops reading until the call's future is done; a
            # subscription never is, so the peer going away (EOF) would go
            # unseen. Not handing the future back keeps reading on.
            return None
        return fut


class LuodServer(VarlinkUnixServer):
    """asyncvarlink's server with the backlog and the peer credentials luod needs."""

    def __init__(self, sock: socket.socket, registry: VarlinkInterfaceRegistry) -> None:
        super().__init__(sock, lambda: LuodProtocol(registry))

    async def start_serving(self) -> None:
        await super().start_serving()
        # asyncvarlink listens with a backlog of 1; a burst of clients at boot
        # would see ECONNREFUSED.
        if self._sock is not None:
            self._sock.listen(socket.SOMAXCONN)

    def _handle_accept(self) -> None:
        if self._sock is None:
            return
        try:
            conn, _addr = self._sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        serve_connection(self._loop, conn, self._protocol_factory, self._transports)


class LuodTransport(VarlinkTransport):
    """asyncvarlink peeks at most RECV_BUFFER_SIZE bytes to find where a
    message ends, so that the fds sent with it are received with it. A
    message longer than that (PreserveFds with a few dozen files) lost its
    fds: they came with a chunk holding no complete message, and were closed.
    Peek far enough for the largest call luod takes: 253 fds (SCM_MAX_FD)
    named in JSON are well below this."""

    RECV_BUFFER_SIZE = 256 * 1024


# One buffer for every peek of every connection (luod serves from one thread).
_peek_buffer = bytearray(LuodTransport.RECV_BUFFER_SIZE)
_peek_view = memoryview(_peek_buffer)


class ConnectionSocket(socket.socket):
    """A client connection as asyncvarlink reads it, with two changes:

    - received fds come with FD_CLOEXEC set, so that none leaks into a child
      luod spawns: asyncvarlink receives with socket.recv_fds(), which calls
      this recvmsg(); the flag costs nothing, where fcntl() afterwards cost
      two syscalls per fd;
    - it remembers whether the kernel dropped fds of the last message
      (MSG_CTRUNC: luod at its open-file limit), which asyncvarlink does not
      look at, so that the call can be refused for that reason by name;
    - asyncvarlink peeks RECV_BUFFER_SIZE bytes before every message: a
      fresh 256 KiB bytes object each time cost 18 us on the host (the heap
      shrinking and growing again), 16 times the peek itself; luod peeks
      into one buffer and copies out what came.
    """

    fds_dropped = False

    def recvmsg(self, bufsize: int, ancbufsize: int = 0, flags: int = 0) -> typing.Any:
        got = super().recvmsg(bufsize, ancbufsize, flags | socket.MSG_CMSG_CLOEXEC)
        self.fds_dropped = bool(got[2] & socket.MSG_CTRUNC)
        return got

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        if not flags & socket.MSG_PEEK or bufsize > len(_peek_buffer):
            return super().recv(bufsize, flags)
        n = self.recv_into(_peek_buffer, bufsize, flags)
        return bytes(_peek_view[:n])


def serve_connection(
    loop: asyncio.AbstractEventLoop,
    conn: socket.socket,
    factory: collections.abc.Callable[[], typing.Any],
    transports: typing.Any = None,
) -> VarlinkTransport:
    if not isinstance(conn, ConnectionSocket):
        conn = ConnectionSocket(conn.family, conn.type, conn.proto, fileno=conn.detach())
    conn.setblocking(False)
    transport = LuodTransport(
        loop, conn, conn, factory(), {"luod.peer": peer_of_socket(conn), "luod.socket": conn}
    )
    if transports is not None:
        transports.add(transport)
    return transport


def make_registry(core: Custodian, daemon: DaemonHooks) -> VarlinkInterfaceRegistry:
    registry = VarlinkInterfaceRegistry()
    registry.register_interface(CustodyInterface(core))
    registry.register_interface(ManagerInterface(daemon))
    registry.register_interface(
        VarlinkServiceInterface(
            "luod project",
            "luod",
            luod.__version__,
            "file:///usr/share/doc/luod/README.md",
            registry,
        )
    )
    return registry


def interface_descriptions() -> dict[str, str]:
    """The IDL text of each luod interface, as served."""
    return {
        CUSTODY: CustodyInterface.render_interface_description(),
        MANAGER: ManagerInterface.render_interface_description(),
    }


def main() -> None:
    """`python -m luod.server DIR`: write the IDL files (make idl)."""
    import pathlib
    import sys

    out = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "protocol")
    for name, text in interface_descriptions().items():
        (out / f"{name}.varlink").write_text(text)


if __name__ == "__main__":
    main()
