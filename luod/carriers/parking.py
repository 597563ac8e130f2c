"""Parking: luod's references to the files of one kernel session, kept in
the queue of a socket pair whose two ends sit in luod's fd store.

An fd sent with SCM_RIGHTS and not received yet stays open for as long as
the socket it waits in does. So a socket pair holds any number of files as
two fds: luod sends its references into one end (each message: up to 253
fds and their tokens), pushes both ends into its fd store, and a luod
restarted in the same boot receives them back from whichever end has them.
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

# SCM_MAX_FD: the most fds one message carries.
MAX_FDS = 253
_TOKEN = struct.Struct("<Q")


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
        for i in range(0, len(refs), MAX_FDS):
            chunk = refs[i : i + MAX_FDS]
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
            while True:
                try:
                    data, fds, _flags, _addr = socket.recv_fds(
                        end, _TOKEN.size * MAX_FDS, MAX_FDS, socket.MSG_CMSG_CLOEXEC
                    )
                except (BlockingIOError, InterruptedError):
                    break
                if not data and not fds:
                    break  # the other end is gone and nothing is left
                tokens = [t for (t,) in _TOKEN.iter_unpack(data[: len(fds) * _TOKEN.size])]
                for token, fd in zip(tokens, fds, strict=False):
                    old = out.pop(token, -1)
                    if old >= 0:
                        os.close(old)
                    out[token] = fd
                for fd in fds[len(tokens) :]:
                    os.close(fd)
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
