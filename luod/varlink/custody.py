"""io.luod.Custody: hand fds to luod, get them back after the kexec.

Each method takes the call apart (the peer, the fds that came with it),
calls the Custodian (luod.custody), and says the result in wire types
(luod.varlink.types). The errors it declares are the catalogue's Custody
entries (luod.errors); `translating` serves a raised one as its reply.

The methods' annotations are evaluated when a method is first looked up
(lazy_varlinkmethod), and the wire types imported then (luod.lazyimport).
"""

from __future__ import annotations

import fcntl
import os
import typing

from asyncvarlink import FileDescriptor, VarlinkInterface, VarlinkMethodSignature
from asyncvarlink.conversion import ObjectVarlinkType, VarlinkType

from luod import errors
from luod.custody import Custodian, Handoff
from luod.interfaces import CUSTODY
from luod.lazyimport import lazy_module
from luod.varlink.fastconv import (
    FdRecordList,
    FlatObject,
    FlatRecord,
    FlatRecordList,
    FlatReply,
)
from luod.varlink.limits import MAX_FDS_PER_MESSAGE
from luod.varlink.replies import replies_of, translating
from luod.varlink.transport import (
    current,
    declaring_errors,
    lazy_varlinkmethod,
    on_delivery,
    reply_fd,
    take_fd,
)

if typing.TYPE_CHECKING:
    from luod.varlink import types as wire
else:
    # Imported when a method is first built or called (luod.lazyimport).
    wire = lazy_module("luod.varlink.types")

# Quicker conversions (luod.varlink.fastconv) of the same types, put in
# place of asyncvarlink's generic ones when a method is built
# (lazy_varlinkmethod's adjust): a client calling once per fd, or with
# hundreds of fds in a call, would pay the generic conversion per fd.


def _quicker_preserve_fd(sig: VarlinkMethodSignature) -> None:
    """PreserveFd takes flat parameters (FlatObject) and says a flat
    record (FlatRecord)."""
    sig.parameter_type = FlatObject(
        {"session": str, "name": str, "fileDescriptor": int, "createSession": bool},
        optional={"createSession"},
    )
    sig.return_type = FlatReply({"file": FlatRecord(wire.FileInfo)})


def _quicker_preserve_fds(sig: VarlinkMethodSignature) -> None:
    """PreserveFds converts its two lists with FlatRecordList. Rebuilt as
    asyncvarlink's varlinkmethod builds them (optional arguments with a
    default are dropped when None)."""
    sig.parameter_type = ObjectVarlinkType(
        {
            "session": VarlinkType.from_type_annotation(str),
            "files": FlatRecordList(wire.FileToPreserve),
            "createSession": VarlinkType.from_type_annotation(bool).optional(),
        },
        discardnone={"createSession"},
    )
    sig.return_type = ObjectVarlinkType({"files": FlatRecordList(wire.FileInfo)})


def _quicker_retrieve_fd(sig: VarlinkMethodSignature) -> None:
    """RetrieveFd takes flat parameters."""
    sig.parameter_type = FlatObject(
        {"session": str, "name": str, "take": bool, "owner": int},
        optional={"take", "owner"},
    )


def _quicker_retrieve_fds(sig: VarlinkMethodSignature) -> None:
    """RetrieveFds takes flat parameters and says its list of files with
    FdRecordList."""
    sig.parameter_type = FlatObject(
        {"session": str, "names": list[str], "take": bool, "owner": int},
        optional={"names", "take", "owner"},
    )
    sig.return_type = ObjectVarlinkType({"files": FdRecordList(wire.RetrievedFile)})


@declaring_errors(replies_of(CUSTODY))
class CustodyInterface(VarlinkInterface, name=CUSTODY):
    """Hand file descriptors to luod so that they survive a kexec, and get
    them back after it. File descriptors travel with the message
    (SCM_RIGHTS); an int named fileDescriptor is an index into them.
    Session names are per user (uid): a call reaches the caller's own
    sessions only. Root names another uid's with owner (logged)."""

    def __init__(self, custodian: Custodian) -> None:
        self.custodian = custodian

    @lazy_varlinkmethod(return_parameter="session")
    @translating
    def CreateSession(self, session: str) -> wire.SessionInfo:
        """Create a session that luod manages for the caller."""
        return wire.session_info(self.custodian.create_session(current().peer, session))

    @lazy_varlinkmethod(return_parameter="file", adjust=_quicker_preserve_fd)
    @translating
    def PreserveFd(
        self,
        session: str,
        name: str,
        fileDescriptor: int,
        createSession: typing.Optional[bool] = None,  # noqa: UP045
    ) -> wire.FileInfo:
        """Hand off one memfd into a session under a name. It is preserved
        at once, so errors surface now and not at the kexec."""
        fd = _take_file(fileDescriptor, "fileDescriptor")
        added = self.custodian.preserve_fds(
            current().peer, session, [Handoff(name, fd)], create=bool(createSession)
        )
        return wire.file_info(added[0])

    @lazy_varlinkmethod(return_parameter="files", adjust=_quicker_preserve_fds)
    @translating
    def PreserveFds(
        self,
        session: str,
        files: list[wire.FileToPreserve],
        createSession: typing.Optional[bool] = None,  # noqa: UP045
    ) -> list[wire.FileInfo]:
        """Hand off many memfds in one call: all are preserved, or none."""
        handoffs: list[Handoff] = []
        try:
            for i, f in enumerate(files):
                where = f"files[{i}]"
                handoffs.append(
                    Handoff(f.name, _take_file(f.fileDescriptor, f"{where}.fileDescriptor"), where)
                )
        except BaseException:
            for h in handoffs:
                os.close(h.fd)
            raise
        added = self.custodian.preserve_fds(
            current().peer, session, handoffs, create=bool(createSession)
        )
        return [wire.file_info(f) for f in added]

    @lazy_varlinkmethod(return_parameter="session")
    @translating
    def AdoptSession(self, fileDescriptor: int) -> wire.SessionInfo:
        """Hand over a LUO session the caller created itself, in this boot.
        luod holds it as it is until the kexec and gives it back after. A
        session that came over the last kexec is refused (UnsupportedFd):
        the kernel would not carry it over the next one."""
        fd = take_fd(fileDescriptor, "fileDescriptor")
        return wire.session_info(self.custodian.adopt_session(current().peer, fd))

    @lazy_varlinkmethod()
    @translating
    def CreateDelegatedSession(self, session: str) -> wire.RetrievedSession:
        """Create a session and hand its fd to the caller, to preserve its
        own files into. luod keeps a reference as custodian: the session
        survives the caller's restart or crash and the shutdown, and after
        the kexec the caller takes it back with RetrieveSession."""
        fd, s = self.custodian.create_delegated(current().peer, session)
        return {
            "fileDescriptor": FileDescriptor(fd, should_close=True),
            "session": wire.session_info(s),
        }

    @lazy_varlinkmethod(return_parameter="sessions")
    @translating
    def ListSessions(
        self,
        session: typing.Optional[str] = None,  # noqa: UP045
        owner: typing.Optional[int] = None,  # noqa: UP045
    ) -> list[wire.SessionInfo]:
        """The caller's sessions (root: everyone's, or owner's), or only
        those named session."""
        found = self.custodian.list_sessions(current().peer, session, owner)
        return [wire.session_info(s) for s in found]

    @lazy_varlinkmethod(adjust=_quicker_retrieve_fd)
    @translating
    def RetrieveFd(
        self,
        session: str,
        name: str,
        take: typing.Optional[bool] = None,  # noqa: UP045
        owner: typing.Optional[int] = None,  # noqa: UP045
    ) -> wire.RetrievedFd:
        """Get a held fd back. Without take, a copy: luod keeps it in
        custody. With take, luod lets go of it once the reply is sent (a
        reply that cannot be sent leaves it held). owner (root only): the
        uid whose session it is."""
        peer = current().peer
        pending: list[int] = []
        c = self.custodian
        fd, f = c.retrieve_fd(peer, session, name, bool(take), owner, pending)
        out = reply_fd(fd)
        self._settle_take(pending, [out], lambda take, fds: c.give_back(peer, take, fds))
        return {"fileDescriptor": out, "file": wire.file_info(f)}

    @lazy_varlinkmethod(return_parameter="files", adjust=_quicker_retrieve_fds)
    @translating
    def RetrieveFds(
        self,
        session: str,
        names: typing.Optional[list[str]] = None,  # noqa: UP045
        take: typing.Optional[bool] = None,  # noqa: UP045
        owner: typing.Optional[int] = None,  # noqa: UP045
    ) -> list[wire.RetrievedFile]:
        """Get many held fds back in one call: those named, or without names
        every fd of the session; at most 253 (SCM_MAX_FD) per call. All or
        nothing. Without take, copies: luod keeps them in custody. With
        take, luod lets go of them (the session is preserved again once,
        without them; a reply that cannot be sent leaves them held). owner
        (root only): the uid whose session it is."""
        peer = current().peer
        pending: list[int] = []
        c = self.custodian
        got = c.retrieve_fds(
            peer, session, names, bool(take), owner, limit=MAX_FDS_PER_MESSAGE, pending=pending
        )
        out = [reply_fd(fd) for fd, _f in got]
        self._settle_take(pending, out, lambda take, fds: c.give_back(peer, take, fds))
        return [
            wire.RetrievedFile(fileDescriptor=fd, file=wire.file_info(f))
            for fd, (_fd, f) in zip(out, got, strict=True)
        ]

    @lazy_varlinkmethod()
    @translating
    def RetrieveSession(
        self,
        session: str,
        owner: typing.Optional[int] = None,  # noqa: UP045
    ) -> wire.RetrievedSession:
        """An adopted or delegated session's fd, for its owner. Before the
        kexec a copy (luod goes on holding it, so that it is carried); after
        the kexec the session itself, and luod lets go of it once the reply
        is sent. owner (root only): the uid whose session it is."""
        peer = current().peer
        pending: list[int] = []
        c = self.custodian
        fd, s = c.retrieve_session(peer, session, owner, pending)
        out = reply_fd(fd)
        # After the kexec the session itself, not a copy.
        self._settle_take(pending, [out], lambda take, fds: c.give_back_session(peer, take, fds[0]))
        return {"fileDescriptor": out, "session": wire.session_info(s)}

    @lazy_varlinkmethod()
    @translating
    def DiscardSession(
        self,
        session: str,
        owner: typing.Optional[int] = None,  # noqa: UP045
    ) -> None:
        """Release a session and everything in it. Before the kexec this
        means it will not be carried; after it, that it is dropped. owner
        (root only): the uid whose session it is."""
        self.custodian.discard_session(current().peer, session, owner)

    def _settle_take(
        self,
        pending: list[int],
        out: list[FileDescriptor],
        give_back: typing.Callable[[int, list[int]], None],
    ) -> None:
        """A take (`pending`: its number; none for a copy) ends once its
        reply `out` went out; should it not, `give_back` holds again what
        it took (the take, the reply's fds)."""
        if pending:
            (take,) = pending
            c = self.custodian
            on_delivery(out, lambda fds: give_back(take, fds), lambda: c.delivered(take))


def _take_file(index: int, parameter: str) -> int:
    """take_fd, refusing an O_PATH fd: it gives no access to the file (the
    kernel's fdget() does not see it), yet fstat() tells a memfd behind one
    like the memfd itself."""
    fd = take_fd(index, parameter)
    if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_PATH:
        os.close(fd)
        raise errors.UnsupportedFd(
            parameter, "o-path", "an O_PATH fd gives no access to the file: send the file itself"
        )
    return fd
