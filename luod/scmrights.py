"""The fds that came with a message: SCM_RIGHTS out of recvmsg()'s
ancillary data. luod's transport, its client and the fd store's parking
each receive fds with recvmsg() itself (MSG_CMSG_CLOEXEC, MSG_PEEK:
Python 3.11's socket.recv_fds() drops its flags)."""

from __future__ import annotations

import array
import socket
from collections.abc import Iterable

# Bytes of one fd in SCM_RIGHTS data (an int).
FD_SIZE = array.array("i").itemsize


def fds_in(ancdata: Iterable[tuple[int, int, bytes]]) -> list[int]:
    """Every fd of the SCM_RIGHTS messages in `ancdata`, in order; owned by
    the caller. A cut-off last one (MSG_CTRUNC) is left out."""
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % FD_SIZE])
    return fds.tolist()
