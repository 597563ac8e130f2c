"""Everything that reaches into asyncvarlink's internals, and the per-call context.

luod serves with asyncvarlink but needs what it does not offer: the peer's
credentials on each call, a listen backlog for a burst of clients at boot,
received fds with FD_CLOEXEC, noticing fds the kernel dropped (luod at its
open-file limit), messages longer than asyncvarlink peeks, and a `more` call
(a subscription) that does not stop the connection from being read. Each is
done here by overriding or reading asyncvarlink's private parts; this is the
one module to check when asyncvarlink changes (pyproject.toml pins the
versions the tests cover).

fds travel as sd-varlink does it: an int in the JSON is an index into the
SCM_RIGHTS array of the message. luod resolves indexes itself (`take_fd`,
rather than typing them as asyncvarlink FileDescriptor) so that a bad index
is a named error with its parameter, and so that every received fd is
accounted for: taken into custody (which keeps or closes it) or closed with
the message.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import resource
import socket
from collections.abc import Callable
from typing import Any

from asyncvarlink import (
    FileDescriptorArray,
    VarlinkInterfaceRegistry,
    VarlinkInterfaceServerProtocol,
    VarlinkMethodCall,
    VarlinkTransport,
    VarlinkUnixServer,
)

from luod import errors
from luod.peer import Peer, peer_of_socket

# --- per-call context: who called, and the fds that came with the call -------


@dataclasses.dataclass
class CallContext:
    peer: Peer
    fds: FileDescriptorArray | None
    protocol: LuodProtocol
    # The kernel dropped fds of this call: luod was at its open-file limit.
    fds_dropped: bool = False
    taken: set[int] = dataclasses.field(default_factory=set)


_current: contextvars.ContextVar[CallContext] = contextvars.ContextVar("luod_call")


def current() -> CallContext:
    """The call being served (inside an interface method only)."""
    return _current.get()


def take_fd(index: int, parameter: str) -> int:
    """Take ownership of fd `index` of the current call, or MissingFd
    (TooManyOpenFiles when the kernel dropped fds of the call)."""
    ctx = current()
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


# --- protocol, server, transport ---------------------------------------------


class LuodProtocol(VarlinkInterfaceServerProtocol):
    """Knows its peer and sets the call context."""

    peer: Peer
    sock: ConnectionSocket | None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("luod.peer")
        assert isinstance(peer, Peer)
        self.peer = peer
        sock = transport.get_extra_info("luod.socket")
        self.sock = sock if isinstance(sock, ConnectionSocket) else None
        self._disconnect_hooks: list[Callable[[], None]] = []

    def on_disconnect(self, hook: Callable[[], None]) -> None:
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
    """A client connection as asyncvarlink reads it, with three changes:

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

    def recvmsg(self, bufsize: int, ancbufsize: int = 0, flags: int = 0) -> Any:
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
    factory: Callable[[], Any],
    transports: Any = None,
) -> VarlinkTransport:
    """Serve one accepted (or inherited) connection with luod's transport."""
    if not isinstance(conn, ConnectionSocket):
        conn = ConnectionSocket(conn.family, conn.type, conn.proto, fileno=conn.detach())
    conn.setblocking(False)
    transport = LuodTransport(
        loop, conn, conn, factory(), {"luod.peer": peer_of_socket(conn), "luod.socket": conn}
    )
    if transports is not None:
        transports.add(transport)
    return transport
