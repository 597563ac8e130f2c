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
)
from asyncvarlink.serviceinterface import VarlinkServiceInterface

import luod
from luod import errors
from luod.core import Custodian, Incoming, Problem, ReclaimReport
from luod.kernel import fdinfo
from luod.model import HeldFile, Session
from luod.peer import Peer, peer_of_socket

log = structlog.get_logger("luod")

CUSTODY = "io.luod.Custody"
MANAGER = "io.luod.Manager"

# --- types ---------------------------------------------------------------


class SessionKind(enum.Enum):
    managed = "managed"
    adopted = "adopted"


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
    durationUSec: int


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


def _usec(t: float) -> int:
    return int(t * 1_000_000)


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
        AlreadyPreserved,
        PermissionDenied,
        WrongSessionKind,
        KernelRefused,
        NotReady,
        PreflightFailed,
        RootRequired,
    )
}


def to_varlink(e: errors.LuodError) -> TypedVarlinkErrorReply:
    cls = _ERRORS[e.error_name]
    params = {k: v for k, v in e.parameters.items() if v is not None}
    return cls(**params)  # type: ignore[arg-type]


# --- per-call context: who called, and the fds that came with the call -------


@dataclasses.dataclass
class CallContext:
    peer: Peer
    fds: FileDescriptorArray | None
    taken: set[int] = dataclasses.field(default_factory=set)


_current: contextvars.ContextVar[CallContext] = contextvars.ContextVar("luod_call")


def _ctx() -> CallContext:
    return _current.get()


def take_fd(index: int, parameter: str) -> int:
    """Take ownership of fd `index` of the current call, or MissingFd."""
    ctx = _ctx()
    if ctx.fds is None or index < 0 or index >= len(ctx.fds) or index in ctx.taken:
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


def translating(fn: collections.abc.Callable[_P, _R]) -> collections.abc.Callable[_P, _R]:
    """Turn core errors into the varlink errors of the same name."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return fn(*args, **kwargs)
        except errors.LuodError as e:
            log.info(
                "call-refused",
                method=fn.__name__,
                error=e.error_name,
                detail=e.message,
                peer=_ctx().peer.describe(),
            )
            raise to_varlink(e) from None

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
        """Give an adopted session back to its owner; luod lets go of it."""
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


class ManagerInterface(VarlinkInterface, name=MANAGER):
    """Inspect and drive luod: status, the preflight check, reclaim after a
    kexec, and the kexec itself where no service manager does it."""

    errors = (PreflightFailed, RootRequired)

    def __init__(self, daemon: "DaemonHooks") -> None:
        self.daemon = daemon

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

    @varlinkmethod
    @translating
    def KExec(self, force: typing.Optional[bool] = None) -> None:  # noqa: UP045
        """Jump into the loaded kernel with reboot(LINUX_REBOOT_CMD_KEXEC),
        for systems where no service manager does it. Root only. Refused
        when the preflight check finds problems, unless force is set."""
        peer = _ctx().peer
        if not peer.is_root:
            raise errors.RootRequired("KExec")
        problems = self.core.check()
        if problems and not force:
            raise errors.PreflightFailed(
                len(problems), "; ".join(f"{p.session}: {p.reason}" for p in problems)
            )
        self.daemon.schedule_kexec(peer)


class DaemonHooks(typing.Protocol):
    core: Custodian

    def schedule_kexec(self, peer: Peer) -> None: ...

    def kexec_blocker(self) -> str | None: ...


# --- transport -------------------------------------------------------------


class LuodProtocol(VarlinkInterfaceServerProtocol):
    """Knows its peer, marks received fds FD_CLOEXEC, and sets the call context."""

    peer: Peer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("luod.peer")
        assert isinstance(peer, Peer)
        self.peer = peer

    def call_received(
        self, call: VarlinkMethodCall, fds: FileDescriptorArray | None
    ) -> asyncio.Future[None] | None:
        if fds:
            for fd in fds:
                if fd:
                    fdinfo.set_cloexec(fd.fileno())
        token = _current.set(CallContext(self.peer, fds))
        try:
            fut: asyncio.Future[None] | None = super().call_received(call, fds)
        finally:
            _current.reset(token)
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


def serve_connection(
    loop: asyncio.AbstractEventLoop,
    conn: socket.socket,
    factory: collections.abc.Callable[[], typing.Any],
    transports: typing.Any = None,
) -> VarlinkTransport:
    conn.setblocking(False)
    transport = VarlinkTransport(loop, conn, conn, factory(), {"luod.peer": peer_of_socket(conn)})
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
