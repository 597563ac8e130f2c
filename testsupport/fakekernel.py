"""A fake LUO kernel: /dev/liveupdate's rules and errnos, in a process of its own.

Tests need sessions that behave like the real ones across processes: luod
runs as its own process, clients create sessions and hand the session fds to
luod over SCM_RIGHTS, and a kexec must carry what is still open into "the
next boot". So the fake kernel is a server process that owns all LUO state
(`python -m testsupport.fakekernel serve --socket PATH`, or `serve(path)`, or
`running_fake_kernel(directory)` in tests), and `FakeBackend` is the
`Backend` that talks to it. Every operation is one request on a short-lived
unix SOCK_SEQPACKET connection (message boundaries for free, fds passed with
SCM_RIGHTS); only `FakeBackend.hold_device()` keeps its connection open,
because holding the device is what it simulates.

How the kernel's rules are reproduced:

- A session fd is one end of a socketpair. The fake keeps only the other end
  (the "peer") and remembers the handed-out end's (st_dev, st_ino), which is
  how it recognises the session when a client sends the fd back with a
  request. It closes its own copy of the handed-out end, so when every copy
  is closed anywhere (including copies in flight in SCM_RIGHTS messages) the
  peer hangs up: an outgoing session is then dropped with everything in it,
  a retrieved incoming one is finished and dropped, as in the kernel. The
  fake checks for hang-ups before every request, so a client that closes a
  session fd and then asks something sees the effect at once.
- /dev/liveupdate is exclusive: create/retrieve "open" it for the duration
  of one request; `hold_device()` keeps it open. A second open gets EBUSY.
- A kexec turns every still-open outgoing session into an incoming one whose
  memfds are NEW memfds with the same bytes, size, position and seals (the
  real kernel restores into a new file too), drops outgoing sessions nobody
  holds and unfinished incoming ones, and closes every old peer.

Deviations from the real kernel that cannot be avoided:

- A fake session fd is a socket: `fdinfo.inspect_fd` says SOCKET, not
  LUO_SESSION, and its /proc link is `socket:[INO]`, not
  `anon_inode:[luo_session] NAME`. Use `Backend.identify_session(fd)` to
  recognise sessions; that is the authoritative test for both backends.
  Its mode is 0600 and it is FD_CLOEXEC, as in the kernel.
- Session fds from before a fake kexec stay open in the process that held
  them (a real kexec ends that process). Using one gives EBADF. An fd that
  is no session at all gives ENOTTY, as an ioctl on a foreign file does.
- Preserving does not freeze the memfd's size (the kernel's shmem_freeze
  makes growing or shrinking fail until the kexec); doing so from userspace
  would need seals, which are visible and cannot be removed afterwards.
- A restored memfd's /proc link reads `/memfd: (deleted)`, not `/ (deleted)`.
- A kexec always "works": there is no loaded kernel image to check, and the
  holder of /dev/liveupdate is released, since its process did not survive.
- Bad names: the fake kernel answers EINVAL, which `FakeBackend` turns into
  the ValueError of uapi.encode_session_name, because KernelBackend raises
  that (after opening the device, before any ioctl) and never sees EINVAL.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import fcntl
import functools
import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypedDict, cast

from luod.kernel import fdinfo, uapi
from luod.kernel.backend import BOOT_ID_PATH, LuoError
from luod.kernel.image import RunningLuo
from luod.kernel.kexec import image_problem
from testsupport.util import fd_is_open

FAKE_LUO_ABI = "luo-v5"
FAKE_MEMFD_ABI = "memfd-v2"

# -- the wire ---------------------------------------------------------------

_MAX_MESSAGE = 1 << 18  # requests are tiny; a snapshot of many sessions is not
_MAX_FDS = 4
_REQUEST_TIMEOUT = 120.0  # a kexec copies every preserved memfd
_SEND_TIMEOUT = 5.0
_U64 = struct.Struct("=Q")
_DEVICE_OPS = frozenset({"create_session", "retrieve_session", "hold"})

Json = dict[str, Any]
FileKey = tuple[int, int]  # (st_dev, st_ino): what makes two fds the same file


class FakeKernelUnavailable(ConnectionError):
    """Nothing answers on the fake kernel's socket."""


class FdTableFull(OSError):
    """The caller's fd table is full (EMFILE, ENFILE): it had no place for
    the socket to the fake kernel (`connecting`), or for the fds the fake
    kernel sent."""

    def __init__(self, err: int, connecting: bool) -> None:
        super().__init__(err, os.strerror(err))
        self.connecting = connecting


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        if fd >= 0:
            os.close(fd)


def _send(sock: socket.socket, body: Json, fds: Sequence[int] = ()) -> None:
    data = json.dumps(body).encode()
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.send(data)


def _recv(sock: socket.socket, flags: int = 0) -> tuple[Json | None, list[int]]:
    """One message and its fds (FD_CLOEXEC); (None, []) at end of stream."""
    msg, fds, msg_flags, _ = socket.recv_fds(
        sock, _MAX_MESSAGE, _MAX_FDS, socket.MSG_CMSG_CLOEXEC | flags
    )
    if msg_flags & socket.MSG_CTRUNC and not msg_flags & socket.MSG_TRUNC:
        # The kernel had no place for the fds in the receiver's table.
        _close_all(fds)
        raise FdTableFull(errno.EMFILE, connecting=False)
    if msg_flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        _close_all(fds)
        raise ValueError("message or its fds were truncated")
    if not msg and not fds:
        return None, []
    try:
        body = json.loads(msg)
    except ValueError:
        _close_all(fds)
        raise
    if not isinstance(body, dict):
        _close_all(fds)
        raise ValueError("message is not a JSON object")
    return body, fds


def _connect(path: str) -> socket.socket:
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.EMFILE, errno.ENFILE):
            raise FdTableFull(e.errno, connecting=True) from None
        raise
    sock.settimeout(_REQUEST_TIMEOUT)
    try:
        sock.connect(path)
    except OSError as e:
        sock.close()
        raise FakeKernelUnavailable(f"no fake LUO kernel at {path}: {e.strerror}") from None
    return sock


def _exchange(
    sock: socket.socket, op: str, args: Json, fds: Sequence[int]
) -> tuple[Json, list[int]]:
    try:
        _send(sock, {"op": op, **args}, fds)
        body, received = _recv(sock)
    except FdTableFull:
        raise
    except (OSError, ValueError) as e:
        raise FakeKernelUnavailable(f"the fake LUO kernel did not answer {op}: {e}") from None
    if body is None:
        raise FakeKernelUnavailable(f"the fake LUO kernel hung up on {op}")
    for fd in received:
        fdinfo.set_cloexec(fd)
    return body, received


def call(
    socket_path: str | os.PathLike[str], op: str, args: Json | None = None, fds: Sequence[int] = ()
) -> tuple[Json, list[int]]:
    """One raw request: the reply body and the fds it carried (caller owns them).

    Error replies are {"ok": false, "op": OP, "errno": N}. Tests use this to
    reach the fake kernel past FakeBackend's own checks.
    """
    with _connect(os.fspath(socket_path)) as sock:
        return _exchange(sock, op, args or {}, fds)


# -- what the fake kernel remembers -------------------------------------------


class KernelError(Exception):
    """The errno the fake kernel answers; `op` is "open" for the device."""

    def __init__(self, op: str, err: int) -> None:
        super().__init__(f"{op}: {errno.errorcode.get(err, str(err))}")
        self.op = op
        self.err = err


def _file_key(fd: int) -> FileKey:
    st = os.fstat(fd)
    return (st.st_dev, st.st_ino)


@dataclasses.dataclass
class _File:
    """A preserved file: the fake kernel's own reference to it, by token."""

    token: int
    fd: int
    key: FileKey
    retrieved: bool = False


@dataclasses.dataclass
class _Session:
    name: str
    incoming: bool
    files: dict[int, _File] = dataclasses.field(default_factory=dict)
    # The kernel's end of the session socketpair and the identity of the end
    # handed out; both None while an incoming session waits to be retrieved.
    peer: socket.socket | None = None
    client: FileKey | None = None
    retrieved: bool = False
    finished: bool = False

    def close_files(self) -> None:
        _close_all([f.fd for f in self.files.values()])
        self.files.clear()

    def close(self) -> None:
        self.close_files()
        if self.peer is not None:
            self.peer.close()
            self.peer = None


class SessionSnapshot(TypedDict):
    tokens: list[int]  # tokens the kernel still holds a file for
    retrieved_tokens: list[int]
    client_open: bool  # a session fd exists somewhere
    retrieved: bool  # incoming only: RETRIEVE_SESSION was done
    finished: bool  # incoming only: FINISH was done


class Snapshot(TypedDict):
    kexec_count: int
    device_held: bool
    outgoing: dict[str, SessionSnapshot]
    incoming: dict[str, SessionSnapshot]
    server_fds: int  # fds open in the fake kernel process, to catch leaks


def _check_name(op: str, name: str) -> None:
    raw = name.encode()
    if not 0 < len(raw) <= uapi.MAX_SESSION_NAME or b"\0" in raw:
        raise KernelError(op, errno.EINVAL)


def _discard_message(sock: socket.socket) -> None:
    try:
        _, fds, _, _ = socket.recv_fds(
            sock, 4096, _MAX_FDS, socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT
        )
    except OSError:
        return
    _close_all(fds)


def _hung_up(sock: socket.socket) -> bool:
    """True once every copy of the other end of `sock` is closed.

    Pending messages are discarded first, closing the fds they carry: a
    client could send its session fd into the session itself, and that
    in-flight copy would keep the session alive for ever.
    """
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    for _ in range(64):
        events = poller.poll(0)
        if not events:
            return False
        if events[0][1] & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
            return True
        _discard_message(sock)
    return False


_CHUNK = 1 << 20
_ZEROS = bytes(_CHUNK)


@contextlib.contextmanager
def _readable(fd: int) -> Iterator[int]:
    """An fd `fd`'s bytes can be pread from, without moving its position."""
    if fdinfo.access_mode(fd) != os.O_WRONLY:
        yield fd
        return
    reader = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        yield reader
    finally:
        os.close(reader)


def _copy_bytes(src: int, dst: int, size: int) -> None:
    """Copy [0, size); all-zero chunks are skipped so sparse files stay sparse."""
    pos = 0
    while pos < size:
        chunk = os.pread(src, min(_CHUNK, size - pos), pos)
        if not chunk:
            break
        if chunk != _ZEROS[: len(chunk)]:
            view = memoryview(chunk)
            done = 0
            while done < len(chunk):
                done += os.pwrite(dst, view[done:], pos + done)
        pos += len(chunk)


def _seals(fd: int) -> int:
    try:
        return fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        return 0


def clone_memfd(src: int) -> int:
    """What memfd_luo restores after a kexec: a new memfd (O_RDWR, FD_CLOEXEC)
    with `src`'s bytes, size, file position and seals."""
    dst = os.memfd_create("", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        size = os.fstat(src).st_size
        with _readable(src) as reader:
            _copy_bytes(reader, dst, size)
        os.ftruncate(dst, size)
        os.lseek(dst, os.lseek(src, 0, os.SEEK_CUR), os.SEEK_SET)
        seals = _seals(src)
        if seals:
            # Last, and all at once: F_SEAL_WRITE and F_SEAL_SEAL would
            # refuse the writes and the other seals.
            fcntl.fcntl(dst, fcntl.F_ADD_SEALS, seals)
    except BaseException:
        os.close(dst)
        raise
    return dst


class FakeKernel:
    """All LUO state, and the rules; no I/O but on the fds it is given."""

    def __init__(self) -> None:
        self.outgoing: dict[str, _Session] = {}
        self.incoming: dict[str, _Session] = {}
        self.by_client: dict[FileKey, _Session] = {}
        self.preserved: dict[FileKey, _Session] = {}  # outgoing files only
        self.dead_clients: set[FileKey] = set()  # session fds of previous boots
        self.holder: socket.socket | None = None
        self.kexec_count = 0
        # Told of every new session fd, so that the server watches it for
        # its last close (its events are reaped one by one, not by looking
        # at every session on every request).
        self.on_attach: Callable[[_Session], None] | None = None

    # /dev/liveupdate

    def check_holder(self) -> None:
        if self.holder is not None and _hung_up(self.holder):
            self.drop_holder()

    def drop_holder(self) -> None:
        if self.holder is not None:
            self.holder.close()
            self.holder = None

    def open_device(self) -> None:
        """The exclusive open create/retrieve do first and hold_device keeps."""
        self.check_holder()
        if self.holder is not None:
            raise KernelError("open", errno.EBUSY)

    def create_session(self, name: str) -> int:
        """A new outgoing session; returns the fd to hand out (caller closes its copy)."""
        self.open_device()
        _check_name("create_session", name)
        self.reap_closed(self.outgoing.get(name))  # a closed session's name is free again
        if name in self.outgoing:
            raise KernelError("create_session", errno.EEXIST)
        session = _Session(name, incoming=False)
        self.outgoing[name] = session
        return self._attach(session)

    def retrieve_session(self, name: str) -> int:
        self.open_device()
        _check_name("retrieve_session", name)
        self.reap()
        session = self.incoming.get(name)
        if session is None:
            raise KernelError("retrieve_session", errno.ENOENT)
        if session.retrieved:
            raise KernelError("retrieve_session", errno.EINVAL)
        session.retrieved = True
        return self._attach(session)

    def _attach(self, session: _Session) -> int:
        peer, client = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        peer.setblocking(False)
        os.fchmod(client.fileno(), 0o600)  # the kernel's session files are 0600
        session.peer = peer
        session.client = _file_key(client.fileno())
        self.by_client[session.client] = session
        if self.on_attach is not None:
            self.on_attach(session)
        return client.detach()

    # session fds

    def session_of(self, op: str, fd: int | None) -> _Session:
        """The live session `fd` is (ioctl on it), or the errno the kernel gives."""
        if fd is None:
            raise KernelError(op, errno.EBADF)
        key = _file_key(fd)
        session = self.by_client.get(key)
        if session is not None:
            return session
        if key in self.dead_clients:
            raise KernelError(op, errno.EBADF)
        raise KernelError(op, errno.ENOTTY)

    def identify(self, fd: int) -> str | None:
        session = self.by_client.get(_file_key(fd))
        return None if session is None else session.name

    def preserve_fd(self, session: _Session, token: int, fd: int | None) -> None:
        """Checks in luo_preserve_file's order. On success the fake keeps `fd`."""
        if session.incoming:
            raise KernelError("preserve_fd", errno.EINVAL)
        if token in session.files:
            raise KernelError("preserve_fd", errno.EEXIST)
        if fd is None:
            raise KernelError("preserve_fd", errno.EBADF)
        facts = fdinfo.inspect_fd(fd)
        if facts.kind is not fdinfo.FdKind.MEMFD:
            raise KernelError("preserve_fd", errno.ENOENT)  # no handler for it
        key = (facts.dev, facts.ino)
        # The session holding it may have been closed a moment ago.
        self.reap_closed(self.preserved.get(key))
        if key in self.preserved:
            raise KernelError("preserve_fd", errno.EBUSY)
        session.files[token] = _File(token, fd, key)
        self.preserved[key] = session

    def retrieve_fd(self, session: _Session, token: int) -> int:
        """The restored file; the fake keeps its reference (same file each time)."""
        if not session.incoming:
            raise KernelError("retrieve_fd", errno.EINVAL)
        file = session.files.get(token)
        if file is None:
            raise KernelError("retrieve_fd", errno.ENOENT)
        file.retrieved = True
        # luo_retrieve_file() puts the restored file into luo_preserved_files
        # until FINISH: preserving it elsewhere before that is EBUSY.
        self.preserved[file.key] = session
        return file.fd

    def finish(self, session: _Session) -> None:
        if not session.incoming:
            raise KernelError("finish_session", errno.EINVAL)
        for file in session.files.values():
            self.preserved.pop(file.key, None)
        session.close_files()  # retrieved copies live on in their holders
        session.finished = True

    # lifetime

    def reap(self) -> None:
        """Release every session whose last fd was closed."""
        for session in list(self.by_client.values()):
            self.reap_closed(session)

    def reap_closed(self, session: _Session | None) -> None:
        """Release `session` if its last fd was closed (the kernel does so
        at that close; the fake notices when it looks)."""
        if session is not None and session.peer is not None and _hung_up(session.peer):
            self._release(session)

    def _release(self, session: _Session) -> None:
        # Outgoing: everything in it is unpreserved. Incoming (retrieved):
        # closing it finishes it. Either way the name is gone.
        table = self.incoming if session.incoming else self.outgoing
        if table.get(session.name) is session:
            del table[session.name]
        for file in session.files.values():
            if self.preserved.get(file.key) is session:
                del self.preserved[file.key]
        if session.client is not None:
            self.by_client.pop(session.client, None)
        session.close()

    def kexec(self) -> None:
        """Serialize what is still open, then start "the next boot"."""
        self.reap()
        survivors = self._serialize_all()
        for session in [*self.outgoing.values(), *self.incoming.values()]:
            if session.client is not None:
                self.dead_clients.add(session.client)
            session.close()
        self.outgoing, self.incoming = {}, survivors
        self.by_client, self.preserved = {}, {}
        self.drop_holder()  # its process did not survive the reboot
        self.kexec_count += 1

    def _serialize_all(self) -> dict[str, _Session]:
        """Every outgoing session as the next boot sees it; all or nothing."""
        survivors: dict[str, _Session] = {}
        try:
            for session in self.outgoing.values():
                restored = _Session(session.name, incoming=True)
                survivors[session.name] = restored
                for token, file in session.files.items():
                    clone = clone_memfd(file.fd)
                    restored.files[token] = _File(token, clone, _file_key(clone))
        except OSError as e:
            for restored in survivors.values():
                restored.close()
            raise KernelError("reboot", e.errno or errno.EIO) from None
        return survivors

    def close(self) -> None:
        for session in [*self.outgoing.values(), *self.incoming.values()]:
            session.close()
        self.outgoing, self.incoming, self.by_client, self.preserved = {}, {}, {}, {}
        self.drop_holder()

    def snapshot(self) -> Snapshot:
        self.reap()
        self.check_holder()
        return Snapshot(
            kexec_count=self.kexec_count,
            device_held=self.holder is not None,
            outgoing={n: _session_snapshot(s) for n, s in self.outgoing.items()},
            incoming={n: _session_snapshot(s) for n, s in self.incoming.items()},
            server_fds=len(os.listdir("/proc/self/fd")) - 1,  # minus listdir's own
        )


def _session_snapshot(session: _Session) -> SessionSnapshot:
    return SessionSnapshot(
        tokens=sorted(session.files),
        retrieved_tokens=sorted(t for t, f in session.files.items() if f.retrieved),
        client_open=session.peer is not None,
        retrieved=session.retrieved,
        finished=session.finished,
    )


# -- the server ---------------------------------------------------------------


class _Request:
    """A request body and the fds that came with it, which the server owns
    until an operation takes one; `close()` closes the rest."""

    def __init__(self, body: Json, fds: list[int]) -> None:
        self.op = str(body.get("op", ""))
        self.body = body
        self.fds = fds

    def fd(self, index: int) -> int | None:
        return self.fds[index] if index < len(self.fds) else None

    def take(self, index: int) -> int | None:
        fd = self.fd(index)
        if fd is not None:
            self.fds[index] = -1
        return fd

    def name(self) -> str:
        name = self.body.get("name")
        if not isinstance(name, str):
            raise KernelError(self.op, errno.EINVAL)
        return name

    def token(self) -> int:
        token = self.body.get("token")
        if not isinstance(token, int) or not 0 <= token < 1 << 64:
            raise KernelError(self.op, errno.EINVAL)
        return token

    def close(self) -> None:
        _close_all(self.fds)
        self.fds = []


@dataclasses.dataclass
class _Reply:
    body: Json
    fds: list[int] = dataclasses.field(default_factory=list)
    fresh: bool = False  # the fds were made for the client: close ours once sent
    hold: bool = False  # the connection becomes the device's holder


def _ok(**fields: Any) -> _Reply:
    return _Reply({"ok": True, **fields})


class _Server:
    def __init__(self, listener: socket.socket) -> None:
        self.listener = listener
        self.kernel = FakeKernel()
        self.conns: set[socket.socket] = set()
        self._epoll = select.epoll()
        self._handlers: dict[int, Callable[[], None]] = {}
        self._watch(listener.fileno(), self._accept)
        self.kernel.on_attach = self._watch_session
        self.ops: dict[str, Callable[[_Request], _Reply]] = {
            "create_session": self._create_session,
            "retrieve_session": self._retrieve_session,
            "hold": self._hold,
            "preserve_fd": self._preserve_fd,
            "retrieve_fd": self._retrieve_fd,
            "finish_session": self._finish_session,
            "get_session_name": self._get_session_name,
            "identify": self._identify,
            "kexec": self._kexec,
            "snapshot": self._snapshot,
        }

    def run_forever(self) -> None:
        while True:
            self.step()

    def _watch(self, fd: int, handler: Callable[[], None]) -> None:
        """Call `handler` when `fd` is readable or hung up, until it is
        closed (epoll forgets a closed file by itself)."""
        self._handlers[fd] = handler
        try:
            self._epoll.register(fd, select.EPOLLIN)
        except FileExistsError:  # the number of a file closed since, reused
            self._epoll.modify(fd, select.EPOLLIN)

    def step(self, timeout_ms: int | None = None) -> None:
        timeout = -1.0 if timeout_ms is None else timeout_ms / 1000
        # Handlers are bound to objects, not fd numbers, and are harmless
        # when their event went stale during this batch.
        for fd, _ in self._epoll.poll(timeout):
            handler = self._handlers.get(fd)
            if handler is not None:
                handler()

    def _watch_session(self, session: _Session) -> None:
        peer = session.peer
        assert peer is not None
        self._watch(peer.fileno(), functools.partial(self.kernel.reap_closed, session))

    def close(self) -> None:
        for conn in self.conns:
            conn.close()
        self.conns.clear()
        self.kernel.close()
        self.listener.close()
        self._epoll.close()

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        conn.setblocking(False)
        self.conns.add(conn)
        self._watch(conn.fileno(), functools.partial(self._serve, conn))

    def _serve(self, conn: socket.socket) -> None:
        self.conns.discard(conn)
        try:
            body, fds = _recv(conn, socket.MSG_DONTWAIT)
        except BlockingIOError:
            self.conns.add(conn)
            return
        except (OSError, ValueError):
            conn.close()
            return
        if body is None:
            conn.close()
            return
        request = _Request(body, fds)
        try:
            reply = self._dispatch(request)
        finally:
            request.close()
        if self._respond(conn, reply) and reply.hold:
            self.kernel.holder = conn
            self._watch(conn.fileno(), self.kernel.check_holder)
        else:
            conn.close()

    def _dispatch(self, request: _Request) -> _Reply:
        handler = self.ops.get(request.op)
        if handler is None:
            return _Reply({"ok": False, "op": request.op, "errno": errno.EOPNOTSUPP})
        try:
            return handler(request)
        except KernelError as e:
            return _Reply({"ok": False, "op": e.op, "errno": e.err})
        except Exception:  # a bug in the fake must not take every test down with it
            traceback.print_exc()
            return _Reply({"ok": False, "op": request.op, "errno": errno.EIO})

    def _respond(self, conn: socket.socket, reply: _Reply) -> bool:
        try:
            conn.settimeout(_SEND_TIMEOUT)
            _send(conn, reply.body, reply.fds)
            return True
        except OSError:
            return False  # the client left; an fd made for it is dropped below
        finally:
            if reply.fresh:
                _close_all(reply.fds)

    # operations: parse the request, let the kernel decide

    def _create_session(self, req: _Request) -> _Reply:
        return _Reply({"ok": True}, [self.kernel.create_session(req.name())], fresh=True)

    def _retrieve_session(self, req: _Request) -> _Reply:
        return _Reply({"ok": True}, [self.kernel.retrieve_session(req.name())], fresh=True)

    def _hold(self, req: _Request) -> _Reply:
        self.kernel.open_device()
        return _Reply({"ok": True}, hold=True)

    def _preserve_fd(self, req: _Request) -> _Reply:
        session = self.kernel.session_of(req.op, req.fd(0))
        self.kernel.preserve_fd(session, req.token(), req.fd(1))
        req.take(1)  # only reached on success: the kernel keeps the file
        return _ok()

    def _retrieve_fd(self, req: _Request) -> _Reply:
        session = self.kernel.session_of(req.op, req.fd(0))
        return _Reply({"ok": True}, [self.kernel.retrieve_fd(session, req.token())])

    def _finish_session(self, req: _Request) -> _Reply:
        self.kernel.finish(self.kernel.session_of(req.op, req.fd(0)))
        return _ok()

    def _get_session_name(self, req: _Request) -> _Reply:
        return _ok(name=self.kernel.session_of(req.op, req.fd(0)).name)

    def _identify(self, req: _Request) -> _Reply:
        fd = req.fd(0)
        return _ok(name=None if fd is None else self.kernel.identify(fd))

    def _kexec(self, req: _Request) -> _Reply:
        self.kernel.kexec()
        return _ok(kexec_count=self.kernel.kexec_count)

    def _snapshot(self, req: _Request) -> _Reply:
        return _ok(snapshot=self.kernel.snapshot())


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(0)


def serve(socket_path: str | os.PathLike[str]) -> None:
    """Run the fake kernel on `socket_path` until SIGTERM or SIGINT."""
    path = os.fspath(socket_path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # a stale socket of a server that died
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    listener.bind(path)
    listener.listen(128)
    listener.setblocking(False)
    server = _Server(listener)
    with contextlib.suppress(ValueError):  # not in the main thread: no handlers
        signal.signal(signal.SIGTERM, _exit_on_signal)
        signal.signal(signal.SIGINT, _exit_on_signal)
    try:
        server.run_forever()
    finally:
        server.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


# -- control calls for tests ----------------------------------------------------


def _checked(body: Json, fds: list[int], what: str) -> Json:
    _close_all(fds)
    if not body.get("ok"):
        raise LuoError(str(body.get("op", what)), int(body.get("errno", errno.EIO)), what)
    return body


def kexec(socket_path: str | os.PathLike[str]) -> int:
    """Simulate reboot(LINUX_REBOOT_CMD_KEXEC); returns the new kexec count."""
    body = _checked(*call(socket_path, "kexec"), "LINUX_REBOOT_CMD_KEXEC")
    return int(body["kexec_count"])


def snapshot(socket_path: str | os.PathLike[str]) -> Snapshot:
    """What the fake kernel holds right now."""
    return cast(Snapshot, _checked(*call(socket_path, "snapshot"), "snapshot")["snapshot"])


# -- the backend --------------------------------------------------------------


class FakeBackend:
    """`Backend` on the fake kernel server at `socket_path`."""

    name = "fake"

    def __init__(self, socket_path: str | os.PathLike[str], busy_timeout: float = 2.0) -> None:
        self.socket_path = os.fspath(socket_path)
        self._loaded: tuple[str, str | None, str] | None = None
        self.busy_timeout = busy_timeout

    def unavailable_reason(self) -> str | None:
        try:
            _connect(self.socket_path).close()
        except FakeKernelUnavailable as e:
            return str(e)
        return None

    def _request(
        self, op: str, subject: str, args: Json | None = None, fds: Sequence[int] = ()
    ) -> tuple[Json, list[int]]:
        try:
            body, received = call(self.socket_path, op, args, fds)
        except FdTableFull as e:
            # As the kernel: no place for the device's fd when opening it,
            # nor for the fd an ioctl returns. (The fake's other operations
            # need an fd for their socket, which the kernel's do not.)
            opening = e.connecting and op in _DEVICE_OPS
            raise LuoError("open" if opening else op, e.errno or errno.EMFILE, subject) from None
        except FakeKernelUnavailable:
            if op in _DEVICE_OPS:  # as if /dev/liveupdate did not exist
                raise LuoError("open", errno.ENOENT, self.socket_path) from None
            raise LuoError(op, errno.EIO, self.socket_path) from None
        if not body.get("ok"):
            _close_all(received)
            err_op = str(body.get("op", op))
            err = int(body.get("errno", errno.EIO))
            raise LuoError(err_op, err, self.socket_path if err_op == "open" else subject)
        return body, received

    def _with_device(self, attempt: Callable[[], int]) -> int:
        """KernelBackend's brief wait for /dev/liveupdate, then EBUSY."""
        deadline = time.monotonic() + self.busy_timeout
        delay = 0.005
        while True:
            try:
                return attempt()
            except LuoError as e:
                if e.op == "open" and e.errno == errno.EBUSY and time.monotonic() < deadline:
                    time.sleep(delay)
                    delay = min(delay * 2, 0.1)
                    continue
                raise

    def _one_fd(self, op: str, subject: str, args: Json, fds: Sequence[int] = ()) -> int:
        _, received = self._request(op, subject, args, fds)
        if len(received) != 1:
            _close_all(received)
            raise LuoError(op, errno.EIO, f"{subject}: the fake kernel sent {len(received)} fds")
        return received[0]

    def _no_fd(self, op: str, subject: str, args: Json, fds: Sequence[int]) -> Json:
        body, received = self._request(op, subject, args, fds)
        _close_all(received)
        return body

    def _session_fd(self, op: str, session_fd: int, subject: str) -> list[int]:
        # An ioctl on a closed fd fails before anything else is looked at.
        if not fd_is_open(session_fd):
            raise LuoError(op, errno.EBADF, subject)
        return [session_fd]

    def _device_op(self, op: str, name: str) -> int:
        def attempt() -> int:
            try:
                return self._one_fd(op, name, {"name": name})
            except LuoError as e:
                if e.op == op and e.errno == errno.EINVAL:
                    # KernelBackend opens the device, then refuses a bad name
                    # with ValueError before any ioctl: same order here.
                    uapi.encode_session_name(name)
                raise

        return self._with_device(attempt)

    def create_session(self, name: str) -> int:
        return self._device_op("create_session", name)

    def retrieve_session(self, name: str) -> int:
        return self._device_op("retrieve_session", name)

    def preserve_fd(self, session_fd: int, fd: int, token: int) -> None:
        _U64.pack(token)  # struct.error for a token that is no u64, as KernelBackend
        subject = f"token {token}"
        fds = self._session_fd("preserve_fd", session_fd, subject)
        # A bad fd is not sent (sendmsg would refuse it); the fake kernel
        # answers EBADF, after the checks the kernel makes before fget().
        if fd_is_open(fd):
            fds.append(fd)
        self._no_fd("preserve_fd", subject, {"token": token}, fds)

    def retrieve_fd(self, session_fd: int, token: int) -> int:
        _U64.pack(token)
        subject = f"token {token}"
        fds = self._session_fd("retrieve_fd", session_fd, subject)
        return self._one_fd("retrieve_fd", subject, {"token": token}, fds)

    def finish_session(self, session_fd: int) -> None:
        fds = self._session_fd("finish_session", session_fd, "")
        self._no_fd("finish_session", "", {}, fds)

    def session_name(self, session_fd: int) -> str:
        fds = self._session_fd("get_session_name", session_fd, "")
        return str(self._no_fd("get_session_name", "", {}, fds)["name"])

    def identify_session(self, fd: int) -> str | None:
        # Fake session fds are sockets; anything else cannot be one.
        if fdinfo.inspect_fd(fd).kind is not fdinfo.FdKind.SOCKET:
            return None
        try:
            name = self._no_fd("identify", "", {}, [fd]).get("name")
        except LuoError:
            return None
        return name if isinstance(name, str) else None

    def reboot_kexec(self) -> None:
        """Unlike the real one this returns; the caller should exit as if rebooted."""
        self._no_fd("kexec", "LINUX_REBOOT_CMD_KEXEC", {}, [])

    # A loaded kernel lives in the loading process only: the fake kexec
    # needs no image, and loading a real one on the test host would be wrong.

    def load_kernel(self, kernel: str, initrd: str | None, cmdline: str) -> None:
        """Checks the image as kexec_file_load would, then remembers it."""
        if image_problem(kernel) is not None:
            raise LuoError("kexec_file_load", errno.ENOEXEC, kernel)
        if initrd is not None and not os.access(initrd, os.R_OK):
            raise LuoError("kexec_file_load", errno.ENOENT, initrd)
        self._loaded = (kernel, initrd, cmdline)

    def unload_kernel(self) -> None:
        self._loaded = None

    def kernel_loaded(self) -> bool:
        return self._loaded is not None

    def running_luo(self) -> RunningLuo:
        """The fake kernel speaks 7.3's LUO (testsupport.images makes next
        kernels that do, or not)."""
        return RunningLuo(FAKE_LUO_ABI, {"memfd": FAKE_MEMFD_ABI}, "the fake kernel")

    def boot_id(self) -> str:
        """The host's boot id and the simulated boot: a fake kexec does not
        change the real boot id, and luod must see a new boot after one."""
        with open(BOOT_ID_PATH) as f:
            host = f.read().strip()
        return f"{host}+fake-kexec-{self.snapshot()['kexec_count']}"

    @contextlib.contextmanager
    def hold_device(self) -> Iterator[None]:
        """Hold /dev/liveupdate open, as another agent would, until the block ends."""
        conn = self._with_device(self._hold_connection)
        try:
            yield
        finally:
            os.close(conn)

    def _hold_connection(self) -> int:
        try:
            sock = _connect(self.socket_path)
        except FakeKernelUnavailable:
            raise LuoError("open", errno.ENOENT, self.socket_path) from None
        with sock:
            try:
                body, received = _exchange(sock, "hold", {}, [])
            except FakeKernelUnavailable:
                raise LuoError("open", errno.EIO, self.socket_path) from None
            _close_all(received)
            if not body.get("ok"):
                raise LuoError("open", int(body.get("errno", errno.EIO)), self.socket_path)
            return sock.detach()

    def snapshot(self) -> Snapshot:
        return snapshot(self.socket_path)


# -- running it under pytest ----------------------------------------------------

_SUN_PATH_MAX = 107  # sockaddr_un.sun_path, less the terminating NUL


def _socket_path(directory: str | os.PathLike[str], stack: contextlib.ExitStack) -> str:
    path = os.path.join(os.fspath(directory), "fake-luo.sock")
    if len(os.fsencode(path)) <= _SUN_PATH_MAX:
        return path
    # pytest's tmp_path can be longer than a unix socket address may be.
    short = tempfile.mkdtemp(prefix="fake-luo-")
    stack.callback(shutil.rmtree, short, ignore_errors=True)
    return os.path.join(short, "sock")


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_ready(path: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        rc = proc.poll()
        if rc is not None:
            raise RuntimeError(f"the fake LUO kernel exited with status {rc}")
        try:
            snapshot(path)
            return
        except FakeKernelUnavailable:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the fake LUO kernel did not come up at {path}") from None
            time.sleep(0.01)


@contextlib.contextmanager
def running_fake_kernel(directory: str | os.PathLike[str], timeout: float = 10.0) -> Iterator[str]:
    """Start a fake kernel server process; yields its socket path, stops it after."""
    with contextlib.ExitStack() as stack:
        path = _socket_path(directory, stack)
        proc = subprocess.Popen(
            [sys.executable, "-m", "testsupport.fakekernel", "serve", "--socket", path],
            env=_child_env(),
            stdin=subprocess.DEVNULL,
        )
        stack.callback(_stop, proc)
        _wait_ready(path, proc, timeout)
        yield path


# -- command line -------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m testsupport.fakekernel", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("command", choices=["serve", "kexec", "snapshot"])
    parser.add_argument("--socket", required=True, help="the fake kernel's unix socket")
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args.socket)
    elif args.command == "kexec":
        print(f"kexec {kexec(args.socket)} done")
    else:
        print(json.dumps(snapshot(args.socket), indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
