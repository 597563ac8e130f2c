"""io.luod.Custody: hand fds to luod, get them back after the kexec.

Each method takes the call apart (the peer, the fds that came with it),
calls the Custodian (luod.custody), and says the result in wire types
(luod.varlink.types). The errors it declares are the catalogue's Custody
entries (luod.errors); `translating` serves a raised one as its reply.

This module deliberately does not use `from __future__ import annotations`:
asyncvarlink reads the method signatures at run time.
"""

import fcntl
import os
import typing

from asyncvarlink import FileDescriptor, VarlinkInterface, varlinkmethod, varlinksignature
from asyncvarlink.conversion import ObjectVarlinkType, VarlinkType

from luod import errors
from luod.custody import Custodian, Handoff
from luod.interfaces import CUSTODY
from luod.varlink.fastconv import (
    FdRecordList,
    FlatObject,
    FlatRecord,
    FlatRecordList,
    FlatReply,
)
from luod.varlink.limits import MAX_FDS_PER_MESSAGE
from luod.varlink.replies import replies_of, translating
from luod.varlink.transport import current, declaring_errors, reply_fd, take_fd
from luod.varlink.types import (
    FileInfo,
    FileToPreserve,
    RetrievedFd,
    RetrievedFile,
    RetrievedSession,
    SessionInfo,
    file_info,
    session_info,
)


@declaring_errors(replies_of(CUSTODY))
class CustodyInterface(VarlinkInterface, name=CUSTODY):
    """Hand file descriptors to luod so that they survive a kexec, and get
    them back after it. File descriptors travel with the message
    (SCM_RIGHTS); an int named fileDescriptor is an index into them.
    Session names are per user (uid): a call reaches the caller's own
    sessions only. Root names another uid's with owner (logged)."""

    def __init__(self, custodian: Custodian) -> None:
        self.custodian = custodian

    @varlinkmethod(return_parameter="session")
    @translating
    def CreateSession(self, session: str) -> SessionInfo:
        """Create a session that luod manages for the caller."""
        return session_info(self.custodian.create_session(current().peer, session))

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
        fd = _take_file(fileDescriptor, "fileDescriptor")
        added = self.custodian.preserve_fds(
            current().peer, session, [Handoff(name, fd)], create=bool(createSession)
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
        return [file_info(f) for f in added]

    @varlinkmethod(return_parameter="session")
    @translating
    def AdoptSession(self, fileDescriptor: int) -> SessionInfo:
        """Hand over a LUO session the caller created itself. luod holds it
        as it is until the kexec and gives it back after."""
        fd = take_fd(fileDescriptor, "fileDescriptor")
        return session_info(self.custodian.adopt_session(current().peer, fd))

    @varlinkmethod
    @translating
    def CreateDelegatedSession(self, session: str) -> RetrievedSession:
        """Create a session and hand its fd to the caller, to preserve its
        own files into. luod keeps a reference as custodian: the session
        survives the caller's restart or crash and the shutdown, and after
        the kexec the caller takes it back with RetrieveSession."""
        fd, s = self.custodian.create_delegated(current().peer, session)
        return {"fileDescriptor": FileDescriptor(fd, should_close=True), "session": session_info(s)}

    @varlinkmethod(return_parameter="sessions")
    @translating
    def ListSessions(
        self,
        session: typing.Optional[str] = None,  # noqa: UP045
        owner: typing.Optional[int] = None,  # noqa: UP045
    ) -> list[SessionInfo]:
        """The caller's sessions (root: everyone's, or owner's), or only
        those named session."""
        found = self.custodian.list_sessions(current().peer, session, owner)
        return [session_info(s) for s in found]

    @varlinkmethod
    @translating
    def RetrieveFd(
        self,
        session: str,
        name: str,
        take: typing.Optional[bool] = None,  # noqa: UP045
        owner: typing.Optional[int] = None,  # noqa: UP045
    ) -> RetrievedFd:
        """Get a held fd back. Without take, a copy: luod keeps it in
        custody. With take, luod lets go of it. owner (root only): the uid
        whose session it is."""
        fd, f = self.custodian.retrieve_fd(current().peer, session, name, bool(take), owner)
        return {"fileDescriptor": reply_fd(fd), "file": file_info(f)}

    @varlinkmethod(return_parameter="files")
    @translating
    def RetrieveFds(
        self,
        session: str,
        names: typing.Optional[list[str]] = None,  # noqa: UP045
        take: typing.Optional[bool] = None,  # noqa: UP045
        owner: typing.Optional[int] = None,  # noqa: UP045
    ) -> list[RetrievedFile]:
        """Get many held fds back in one call: those named, or without names
        every fd of the session; at most 253 (SCM_MAX_FD) per call. All or
        nothing. Without take, copies: luod keeps them in custody. With
        take, luod lets go of them (the session is preserved again once,
        without them). owner (root only): the uid whose session it is."""
        got = self.custodian.retrieve_fds(
            current().peer, session, names, bool(take), owner, limit=MAX_FDS_PER_MESSAGE
        )
        return [RetrievedFile(fileDescriptor=reply_fd(fd), file=file_info(f)) for fd, f in got]

    @varlinkmethod
    @translating
    def RetrieveSession(
        self,
        session: str,
        owner: typing.Optional[int] = None,  # noqa: UP045
    ) -> RetrievedSession:
        """An adopted or delegated session's fd, for its owner. Before the
        kexec a copy (luod goes on holding it, so that it is carried); after
        the kexec the session itself, and luod lets go of it. owner (root
        only): the uid whose session it is."""
        fd, s = self.custodian.retrieve_session(current().peer, session, owner)
        return {"fileDescriptor": FileDescriptor(fd, should_close=True), "session": session_info(s)}

    @varlinkmethod
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


def _quicken_preserve_fds() -> None:
    """PreserveFds converts its two lists with FlatRecordList (fastconv):
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


def _quicken_retrieve_fds() -> None:
    """RetrieveFds says its list of files with FdRecordList (fastconv): the
    same type, quicker. As for PreserveFds, the generic conversion stays if
    this asyncvarlink keeps no signature to adjust."""
    sig = varlinksignature(CustodyInterface.RetrieveFds)
    if sig is None:
        return
    sig.return_type = ObjectVarlinkType({"files": FdRecordList(RetrievedFile)})


_quicken_retrieve_fds()


def _quicken_one_fd() -> None:
    """PreserveFd, RetrieveFd and RetrieveFds take flat parameters
    (FlatObject), and PreserveFd says a flat record (FlatRecord): a client
    calling once per fd pays asyncvarlink's generic conversion per fd. As
    above, the generic conversion stays without a signature to adjust."""
    preserve = varlinksignature(CustodyInterface.PreserveFd)
    if preserve is not None:
        preserve.parameter_type = FlatObject(
            {"session": str, "name": str, "fileDescriptor": int, "createSession": bool},
            optional={"createSession"},
        )
        preserve.return_type = FlatReply({"file": FlatRecord(FileInfo)})
    retrieve = varlinksignature(CustodyInterface.RetrieveFd)
    if retrieve is not None:
        retrieve.parameter_type = FlatObject(
            {"session": str, "name": str, "take": bool, "owner": int},
            optional={"take", "owner"},
        )
    many = varlinksignature(CustodyInterface.RetrieveFds)
    if many is not None:
        many.parameter_type = FlatObject(
            {"session": str, "names": list[str], "take": bool, "owner": int},
            optional={"names", "take", "owner"},
        )


_quicken_one_fd()
