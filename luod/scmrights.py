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
# SCM_MAX_FD (include/net/scm.h): the most fds one message carries; a
# sendmsg() with more fails (EINVAL).
SCM_MAX_FD = 253
# recvmsg()'s ancillary buffer with room for the fds of one message.
ANCBUF_SIZE = socket.CMSG_SPACE(SCM_MAX_FD * FD_SIZE)


def fds_in(ancdata: Iterable[tuple[int, int, bytes]]) -> list[int]:
    """Every fd of the SCM_RIGHTS messages in `ancdata`, in order; owned by
    the caller. A cut-off last one (MSG_CTRUNC) is left out."""
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % FD_SIZE])
    return fds.tolist()
