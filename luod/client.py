"""A small blocking varlink client for luod, for luoctl and for services.

Synchronous on purpose: most services that hand fds to luod are not
asyncio programs. Wire format as sd-varlink: JSON objects terminated by NUL
on a unix stream socket; fds ride along with SCM_RIGHTS and are named in the
JSON by their index in the message.

    with luod.client.connect() as c:
        c.preserve_fd("cache", "index", memfd, create_session=True)
        ...
        fd = c.retrieve_fd("cache", "index")
        for name, fd in c.retrieve_fds("cache"):  # every fd of the session
            ...
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Iterator, Sequence
from typing import Any

from luod.errors import describe
from luod.interfaces import CUSTODY, DEFAULT_SOCKET, MANAGER
from luod.scmrights import ANCBUF_SIZE, SCM_MAX_FD, fds_in

MAX_FDS_PER_MESSAGE = SCM_MAX_FD


class VarlinkError(Exception):
    """luod (or the varlink layer) answered with an error; the message is
    its sentence from luod's error catalogue (luod.errors)."""

    def __init__(self, error: str, parameters: dict[str, Any]) -> None:
        self.error = error
        self.parameters = parameters
        super().__init__(describe(error, parameters))

    @property
    def short(self) -> str:
        return self.error.rsplit(".", 1)[-1]


class Reply:
    def __init__(self, parameters: dict[str, Any], fds: list[int]) -> None:
        self.parameters = parameters
        self.fds = fds

    def take_fd(self, key: str = "fileDescriptor") -> int:
        """Take the fd the reply names under `key`; the rest are closed."""
        try:
            return self.take_index(self.parameters[key], key)
        finally:
            self.close()

    def take_index(self, index: Any, parameter: str) -> int:
        """Take the fd at `index` of the reply's fds (each once); the rest
        stay with the reply until close()."""
        if (
            not isinstance(index, int)
            or isinstance(index, bool)
            or not 0 <= index < len(self.fds)
            or self.fds[index] < 0
        ):
            raise VarlinkError("io.luod.client.MissingFd", {"parameter": parameter, "index": index})
        fd = self.fds[index]
        self.fds[index] = -1
        return fd

    def close(self) -> None:
        for fd in self.fds:
            if fd >= 0:
                os.close(fd)
        self.fds = []


class Client:
    def __init__(self, path: str = DEFAULT_SOCKET) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self.sock.connect(path)
        except OSError:
            self.sock.close()
            raise
        self._buf = b""
        self._fds: list[int] = []

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # --- wire ---------------------------------------------------------------

    def _send(self, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
        data = json.dumps(message).encode() + b"\0"
        if fds:
            if len(fds) > MAX_FDS_PER_MESSAGE:
                raise ValueError(f"at most {MAX_FDS_PER_MESSAGE} fds fit one message")
            sent = socket.send_fds(self.sock, [data], list(fds))
            data = data[sent:]
        if data:
            self.sock.sendall(data)

    def _recv(self) -> tuple[dict[str, Any], list[int]]:
        # One call at a time: everything up to the NUL, and every fd that came
        # with it, belongs to the reply of the call just sent.
        while b"\0" not in self._buf:
            msg, ancdata, _flags, _addr = self.sock.recvmsg(
                65536, ANCBUF_SIZE, socket.MSG_CMSG_CLOEXEC
            )
            self._fds.extend(fds_in(ancdata))
            if not msg:
                raise ConnectionError("luod closed the connection")
            self._buf += msg
        raw, _, self._buf = self._buf.partition(b"\0")
        received, self._fds = self._fds, []
        return json.loads(raw), received

    def call(
        self, method: str, parameters: dict[str, Any] | None = None, fds: Sequence[int] = ()
    ) -> Reply:
        self._send({"method": method, "parameters": parameters or {}}, fds)
        reply, received = self._recv()
        if "error" in reply:
            for fd in received:
                os.close(fd)
            raise VarlinkError(reply["error"], reply.get("parameters") or {})
        return Reply(reply.get("parameters") or {}, received)

    def call_more(
        self, method: str, parameters: dict[str, Any] | None = None
    ) -> Iterator[dict[str, Any]]:
        """A `more` call: yields each reply's parameters until the last."""
        self._send({"method": method, "parameters": parameters or {}, "more": True})
        while True:
            reply, received = self._recv()
            for fd in received:
                os.close(fd)
            if "error" in reply:
                raise VarlinkError(reply["error"], reply.get("parameters") or {})
            yield reply.get("parameters") or {}
            if not reply.get("continues"):
                return

    def _call(
        self, method: str, parameters: dict[str, Any] | None = None, fds: Sequence[int] = ()
    ) -> dict[str, Any]:
        r = self.call(method, parameters, fds)
        r.close()
        return r.parameters

    # --- io.luod.Custody ----------------------------------------------------

    def create_session(self, session: str) -> dict[str, Any]:
        return dict(self._call(f"{CUSTODY}.CreateSession", {"session": session})["session"])

    def preserve_fd(
        self, session: str, name: str, fd: int, create_session: bool = False
    ) -> dict[str, Any]:
        params: dict[str, Any] = {"session": session, "name": name, "fileDescriptor": 0}
        if create_session:
            params["createSession"] = True
        return dict(self._call(f"{CUSTODY}.PreserveFd", params, [fd])["file"])

    def preserve_fds(
        self, session: str, files: Sequence[tuple[str, int]], create_session: bool = False
    ) -> list[dict[str, Any]]:
        params: dict[str, Any] = {
            "session": session,
            "files": [{"name": n, "fileDescriptor": i} for i, (n, _fd) in enumerate(files)],
        }
        if create_session:
            params["createSession"] = True
        return list(self._call(f"{CUSTODY}.PreserveFds", params, [fd for _n, fd in files])["files"])

    def adopt_session(self, session_fd: int) -> dict[str, Any]:
        return dict(
            self._call(f"{CUSTODY}.AdoptSession", {"fileDescriptor": 0}, [session_fd])["session"]
        )

    def list_sessions(
        self, session: str | None = None, owner: int | None = None
    ) -> list[dict[str, Any]]:
        params = _with_owner({} if session is None else {"session": session}, owner)
        return list(self._call(f"{CUSTODY}.ListSessions", params)["sessions"])

    def retrieve_fd(
        self, session: str, name: str, take: bool = False, owner: int | None = None
    ) -> int:
        params: dict[str, Any] = _with_owner({"session": session, "name": name}, owner)
        if take:
            params["take"] = True
        return self.call(f"{CUSTODY}.RetrieveFd", params).take_fd()

    def retrieve_fds(
        self,
        session: str,
        names: Sequence[str] | None = None,
        take: bool = False,
        owner: int | None = None,
    ) -> list[tuple[str, int]]:
        """Many held fds in one call: those `names`, or every fd of the
        session; (name, fd) in the order asked for. All or nothing. At most
        MAX_FDS_PER_MESSAGE (253) per call: luod refuses more (TooManyFds)."""
        params: dict[str, Any] = _with_owner({"session": session}, owner)
        if names is not None:
            params["names"] = list(names)
        if take:
            params["take"] = True
        r = self.call(f"{CUSTODY}.RetrieveFds", params)
        got: list[tuple[str, int]] = []
        try:
            for i, entry in enumerate(r.parameters["files"]):
                fd = r.take_index(entry["fileDescriptor"], f"files[{i}].fileDescriptor")
                got.append((entry["file"]["name"], fd))
        except BaseException:
            for _name, fd in got:
                os.close(fd)
            raise
        finally:
            r.close()
        return got

    def create_delegated_session(self, session: str) -> int:
        """A session fd to preserve your own files into; luod holds a copy."""
        return self.call(f"{CUSTODY}.CreateDelegatedSession", {"session": session}).take_fd()

    def retrieve_session(self, session: str, owner: int | None = None) -> int:
        return self.retrieve_session_info(session, owner)[0]

    def retrieve_session_info(
        self, session: str, owner: int | None = None
    ) -> tuple[int, dict[str, Any]]:
        """The session's fd, and the session as luod held it before the
        call: its state says whether luod goes on holding it (outgoing:
        before the kexec, a copy) or let go of it (incoming)."""
        params = _with_owner({"session": session}, owner)
        r = self.call(f"{CUSTODY}.RetrieveSession", params)
        info = dict(r.parameters["session"])
        return r.take_fd(), info

    def discard_session(self, session: str, owner: int | None = None) -> None:
        self._call(f"{CUSTODY}.DiscardSession", _with_owner({"session": session}, owner))

    # --- io.luod.Manager ----------------------------------------------------

    def status(self) -> dict[str, Any]:
        return dict(self._call(f"{MANAGER}.GetStatus")["status"])

    def check(self) -> dict[str, Any]:
        return self._call(f"{MANAGER}.Check")

    def reclaim(self) -> dict[str, Any]:
        return dict(self._call(f"{MANAGER}.Reclaim")["reclaim"])

    def kexec(self, force: bool = False) -> None:
        self._call(f"{MANAGER}.KExec", {"force": True} if force else {})

    def load_kernel(
        self,
        kernel: str,
        initrd: str | None = None,
        cmdline: str | None = None,
        reuse_cmdline: bool = False,
        force: bool = False,
    ) -> dict[str, Any]:
        params: dict[str, Any] = {"kernel": kernel}
        if force:
            params["force"] = True
        if initrd is not None:
            params["initrd"] = initrd
        if cmdline is not None:
            params["commandLine"] = cmdline
        if reuse_cmdline:
            params["reuseCommandLine"] = True
        return dict(self._call(f"{MANAGER}.LoadKernel", params)["loaded"])

    def unload_kernel(self) -> None:
        self._call(f"{MANAGER}.UnloadKernel")

    def update(self, force: bool = False) -> dict[str, Any]:
        """Prepare, freeze, kexec. Raises VarlinkError UpdateAborted with who and why."""
        return self._call(f"{MANAGER}.Update", {"force": True} if force else {})

    def subscribe(self, name: str, deadline: float | None = None) -> Iterator[dict[str, Any]]:
        """Events of live updates, for as long as the connection lasts.
        Acknowledge them on another connection (this one is busy)."""
        params: dict[str, Any] = {"name": name}
        if deadline is not None:
            params["deadlineSec"] = deadline
        for reply in self.call_more(f"{MANAGER}.Subscribe", params):
            yield dict(reply["event"])

    def acknowledge(
        self,
        subscription: str,
        update: int,
        phase: str,
        refuse: bool = False,
        reason: str | None = None,
    ) -> None:
        params: dict[str, Any] = {"subscription": subscription, "update": update, "phase": phase}
        if refuse:
            params["refuse"] = True
        if reason is not None:
            params["reason"] = reason
        self._call(f"{MANAGER}.Acknowledge", params)


def _with_owner(params: dict[str, Any], owner: int | None) -> dict[str, Any]:
    """`owner` (root acting on another uid's session) goes only when given."""
    if owner is not None:
        params["owner"] = owner
    return params


@contextlib.contextmanager
def connect(path: str | None = None) -> Iterator[Client]:
    c = Client(path or os.environ.get("LUOD_SOCKET", DEFAULT_SOCKET))
    try:
        yield c
    finally:
        c.close()
