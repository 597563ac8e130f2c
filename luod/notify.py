"""sd_notify(3) with fds, and the LISTEN_FDS side of socket activation.

Small enough to write here: a datagram to $NOTIFY_SOCKET, fds attached with
SCM_RIGHTS for FDSTORE=1.
"""

from __future__ import annotations

import os
import select
import socket
from collections.abc import Callable, Sequence
from typing import NamedTuple

SD_LISTEN_FDS_START = 3


def _address() -> str | None:
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return None
    return "\0" + path[1:] if path.startswith("@") else path


def send(message: str, fds: Sequence[int] = ()) -> None:
    """Send `message` (with `fds`) to $NOTIFY_SOCKET; raises OSError when it
    did not go out (FileNotFoundError when there is no $NOTIFY_SOCKET)."""
    path = _address()
    if path is None:
        raise FileNotFoundError("$NOTIFY_SOCKET is not set")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(path)
        if fds:
            socket.send_fds(sock, [message.encode()], list(fds))
        else:
            sock.sendall(message.encode())


def notify(message: str, fds: Sequence[int] = ()) -> bool:
    """Send `message` to the service manager. False when there is none or
    it did not take the message; like sd_notify(3) callers, luod goes on."""
    try:
        send(message, fds)
    except OSError:
        return False
    return True


def barrier(timeout: float, via: Callable[[str, Sequence[int]], object] = send) -> bool:
    """sd_notify_barrier(3): True once the service manager has processed
    every message sent before (it closes its copy of a pipe's write end that
    came with BARRIER=1); False after `timeout` seconds. Raises OSError when
    the message did not go out. `via`: what sends it (the fd store
    carrier's own sender)."""
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        via("BARRIER=1", [w])
        os.close(w)
        w = -1
        poller = select.poll()
        poller.register(r, 0)  # POLLHUP is always reported
        return bool(poller.poll(max(0, int(timeout * 1000))))
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


# A NamedTuple, not a dataclass: luoctl imports this module, and the
# dataclasses module (with inspect) is a fifth of what it imports otherwise.
class ListenFd(NamedTuple):
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
