"""sd_notify(3) with fds, and the LISTEN_FDS side of socket activation.

Small enough to write here: a datagram to $NOTIFY_SOCKET, fds attached with
SCM_RIGHTS for FDSTORE=1.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Sequence

SD_LISTEN_FDS_START = 3


def notify(message: str, fds: Sequence[int] = ()) -> bool:
    """Send `message` to the service manager. False when there is none or
    it did not take the message; like sd_notify(3) callers, luod goes on."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(path)
            if fds:
                socket.send_fds(sock, [message.encode()], list(fds))
            else:
                sock.sendall(message.encode())
    except OSError:
        return False
    return True


@dataclasses.dataclass
class ListenFd:
    fd: int
    name: str


def listen_fds(unset: bool = True) -> list[ListenFd]:
    """The fds passed by the service manager (socket activation and the fd
    store), with their names. Marks them FD_CLOEXEC."""
    try:
        pid = int(os.environ.get("LISTEN_PID", ""))
        count = int(os.environ.get("LISTEN_FDS", ""))
    except ValueError:
        return []
    if pid != os.getpid() or count <= 0:
        return []
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    if len(names) != count:
        names = ["unknown"] * count
    if unset:
        for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(var, None)
    out = []
    for i in range(count):
        fd = SD_LISTEN_FDS_START + i
        os.set_inheritable(fd, False)
        out.append(ListenFd(fd, names[i]))
    return out
