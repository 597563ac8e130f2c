"""Parking: luod's references to the files of one kernel session, kept in
the queue of a socket pair whose two ends sit in luod's fd store.

An fd sent with SCM_RIGHTS and not received yet stays open for as long as
the socket it waits in does. So a socket pair holds any number of files as
two fds: luod sends its references into one end (each message: up to 253
fds and their tokens), pushes both ends into its fd store, and a luod
restarted in the same boot copies them back out of whichever end has them
(peeking: they stay parked, also if that luod dies while it does).
PID 1 then holds two entries per session, not one per file: systemd looks
through a unit's whole store for each fd pushed (to refuse duplicates), so
an entry per file would cost it time in proportion to everything luod
holds, on every hand-off.

The kernel cannot carry a socket over a kexec; PID 1 tries and goes on
without it. A parking only serves a luod restarted within the boot.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterable, Sequence

from luod.scmrights import ANCBUF_SIZE, SCM_MAX_FD, fds_in

_TOKEN = struct.Struct("<Q")
# asm-generic/socket.h; Python's socket module does not name it.
SO_PEEK_OFF = getattr(socket, "SO_PEEK_OFF", 42)


def _receive(end: socket.socket, flags: int = 0) -> tuple[bytes, list[int]] | None:
    """One message of the queue at `end`: (tokens, fds), None when there
    is none. recvmsg() itself: socket.recv_fds() drops its flags."""
    try:
        data, ancdata, _flags, _addr = end.recvmsg(
            _TOKEN.size * SCM_MAX_FD,
            ANCBUF_SIZE,
            flags | socket.MSG_CMSG_CLOEXEC,
        )
    except (BlockingIOError, InterruptedError):
        return None
    return data, fds_in(ancdata)


def _collect(out: dict[int, int], data: bytes, fds: Sequence[int]) -> None:
    """Put a message's (token, fd) pairs into `out`, which owns them; a
    token seen before keeps the later fd, fds without a token are closed."""
    tokens = [t for (t,) in _TOKEN.iter_unpack(data[: len(fds) * _TOKEN.size])]
    for token, fd in zip(tokens, fds, strict=False):
        old = out.pop(token, -1)
        if old >= 0:
            os.close(old)
        out[token] = fd
    for fd in fds[len(tokens) :]:
        os.close(fd)


class Parking:
    """A socket pair holding (token, fd) references; luod's copies of its
    two ends (the store has its own)."""

    def __init__(self, ends: Sequence[socket.socket]) -> None:
        self.ends = list(ends)
        for end in self.ends:
            end.setblocking(False)

    @classmethod
    def create(cls) -> Parking:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        return cls([a, b])

    @classmethod
    def of_fds(cls, fds: Iterable[int]) -> Parking:
        """The parking whose ends came back as `fds` (owned from now on)."""
        return cls([socket.socket(fileno=fd) for fd in fds])

    def filenos(self) -> list[int]:
        return [end.fileno() for end in self.ends]

    def park(self, refs: Sequence[tuple[int, int]]) -> bool:
        """Send (token, fd) pairs into the queue (the fds stay luod's too).
        False when the queue is full (its socket buffer) or the pair is
        broken; what was sent before that stays parked."""
        if len(self.ends) != 2:
            return False
        for i in range(0, len(refs), SCM_MAX_FD):
            chunk = refs[i : i + SCM_MAX_FD]
            payload = b"".join(_TOKEN.pack(token) for token, _fd in chunk)
            try:
                socket.send_fds(self.ends[0], [payload], [fd for _token, fd in chunk])
            except OSError:  # EAGAIN: the socket buffer is full
                return False
        return True

    def take_all(self) -> dict[int, int]:
        """Receive every parked reference: token -> fd (owned by the caller,
        no longer parked). A token parked twice comes back once."""
        out: dict[int, int] = {}
        for end in self.ends:
            while (message := _receive(end)) is not None:
                data, fds = message
                if not data and not fds:
                    break  # the other end is gone and nothing is left
                _collect(out, data, fds)
        return out

    def copy_all(self) -> dict[int, int] | None:
        """Every parked reference copied, the parking keeping its own:
        token -> fd (owned by the caller). Each message is peeked at, never
        received, so that no reference is ever held by this process alone:
        a luod killed while taking references back leaves them all parked.
        None when the socket cannot peek past its first message (no
        SO_PEEK_OFF); nothing is copied then."""
        out: dict[int, int] = {}
        try:
            for end in self.ends:
                # From the start of the queue; each peek moves the offset
                # past the message it returned.
                end.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
                try:
                    while (message := _receive(end, socket.MSG_PEEK)) is not None:
                        data, fds = message
                        _collect(out, data, fds)
                        if not data:
                            break  # the peer is gone; or a message luod never sends
                finally:
                    end.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, -1)
        except OSError:
            for fd in out.values():
                os.close(fd)
            return None
        return out

    def compact(self, also: Sequence[tuple[int, int]] = ()) -> bool:
        """Receive everything and park it again in as few messages as may
        be, with `also`: room for more when single-file messages filled the
        socket buffer. False when even that does not fit."""
        held = self.take_all()
        try:
            merged = dict(held)
            merged.update(also)
            return self.park(sorted(merged.items()))
        finally:
            for fd in held.values():
                os.close(fd)

    def close(self) -> None:
        for end in self.ends:
            end.close()
        self.ends = []
