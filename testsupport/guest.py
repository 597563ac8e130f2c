"""What the programs inside a test VM share, whichever tier runs them:
memfds of known bytes, what an fd holds, the fds a service was passed.

Used by the bare tier's guest programs (tests/vm, bench), the systemd tier's
helpers (testsupport/systemd/guest) and its test units' programs
(tests/systemd/units). Those last two run on the sid image's own python3,
so vm/build-image.sh installs this module (with testsupport/__init__.py and
testsupport/util.py, which it builds on) next to luod: it may import only
the standard library, luod and testsupport.util.
"""

from __future__ import annotations

import ctypes
import dataclasses
import fcntl
import hashlib
import json
import os
import socket
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from luod import notify
from luod.interfaces import CUSTODY
from testsupport.util import make_memfd, memfd_facts

if TYPE_CHECKING:
    from luod.client import Client

PAGE = b"\xa5" * 4096


def content(size: int, seed: str) -> bytes:
    """`size` bytes that only `seed` gives: a changed page anywhere shows in
    the sha256."""
    out = bytearray()
    block = hashlib.sha256(seed.encode()).digest()
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out += block * 64
    return bytes(out[:size])


def seeded_memfd(size: int, seed: str, position: int = 0, name: str = "luod-test") -> int:
    """A memfd of content(size, seed), its file position at `position`."""
    return make_memfd(content(size, seed), position=position, name=name)


def memfds(n: int, name: str = "luod-test") -> list[int]:
    """n small memfds of one 4 KiB page each, for counting fds, not bytes."""
    fds = []
    for _ in range(n):
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.write(fd, PAGE)
        fds.append(fd)
    return fds


def close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        os.close(fd)


def raw_preserve(fds: Sequence[int], session: str, identify: bool = False) -> float:
    """Seconds for CREATE_SESSION `session` and PRESERVE_FD of each of `fds`
    in this process, the raw loop goal 4 compares luod's hand-off with; the
    session is closed after (unpreserving them). `identify`: each fd is
    first asked what luod asks before the kernel sees it (fstat: a memfd?
    F_GETFL: not O_PATH?), which any holder that refuses by name what it
    cannot carry must ask too."""
    # Here, not at the top: the guest's services import this module for
    # its memfds, and need no kernel backend.
    from luod.kernel.backend import KernelBackend

    be = KernelBackend()
    t0 = time.perf_counter()
    sfd = be.create_session(session)
    for i, fd in enumerate(fds):
        if identify:
            os.fstat(fd)
            fcntl.fcntl(fd, fcntl.F_GETFL)
        be.preserve_fd(sfd, fd, i + 1)
    took = time.perf_counter() - t0
    os.close(sfd)  # the last fd of an outgoing session: unpreserves all
    return took


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def preserve_fd_vs_getinfo(c: Client, session: str, fds: Sequence[int]) -> dict[str, list[float]]:
    """One PreserveFd (the next of `fds`, one-page memfds, into `session`,
    created here) and one org.varlink.service.GetInfo, each timed alone,
    interleaved on the connection `c`, len(fds) - 1 of each: GetInfo is
    what a round trip through the client, the socket and luod's varlink
    server costs with no work behind it (goal 4: PreserveFd <= 1.5x). The
    caller discards `session`."""
    preserve: list[float] = []
    info: list[float] = []

    def get_info() -> None:
        c.call("org.varlink.service.GetInfo").close()

    # Untimed: the session's creation, and each call once.
    c.preserve_fd(session, "warm", fds[-1], create_session=True)
    get_info()
    for i, fd in enumerate(fds[:-1]):

        def one(i: int = i, fd: int = fd) -> None:
            c.preserve_fd(session, f"f{i}", fd)

        # Which goes first alternates, so that neither always follows the
        # other's wake-ups.
        if i % 2:
            info.append(_timed(get_info))
            preserve.append(_timed(one))
        else:
            preserve.append(_timed(one))
            info.append(_timed(get_info))
    return {"preserve_fd": preserve, "get_info": info}


class _Statfs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 112)]


def fs_type(fd: int) -> int:
    """fstatfs(2)'s f_type of `fd` (-1 when it fails): TMPFS_MAGIC for a memfd."""
    libc = ctypes.CDLL(None, use_errno=True)
    buf = _Statfs()
    if libc.fstatfs(fd, ctypes.byref(buf)) != 0:
        return -1
    return int(buf.f_type) & 0xFFFFFFFF


def describe(fd: int) -> dict[str, Any]:
    """What a memfd holds and where it points, as JSON for the host: size,
    position, sha256 of all its bytes, seals, /proc link, file system type."""
    return {
        **dataclasses.asdict(memfd_facts(fd)),
        "link": os.readlink(f"/proc/self/fd/{fd}"),
        "fs_type": fs_type(fd),
    }


def listen_fds_by_name() -> dict[str, int]:
    """The fds the service manager passed (LISTEN_FDS), by FDNAME."""
    return {entry.name: entry.fd for entry in notify.listen_fds()}


def write_json(path: str, data: Any) -> None:
    """A guest program's results: to `path` (the host reads it from the
    results share) and to stdout (the step's log)."""
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    print(json.dumps(data))


def take_unread(path: str, session: str, name: str) -> socket.socket:
    """A connection to luod at `path` whose client reads nothing, with a
    take of `session`/`name` on it: 60 replies of 6 KB fill the socket
    first, and the take's reply waits in luod."""
    return unread_reply(
        path,
        {
            "method": f"{CUSTODY}.RetrieveFd",
            "parameters": {"session": session, "name": name, "take": True},
        },
    )


def unread_reply(path: str, call: dict[str, Any]) -> socket.socket:
    """The same for any `call`: its reply waits in luod behind 60 others."""
    describe = {
        "method": "org.varlink.service.GetInterfaceDescription",
        "parameters": {"interface": CUSTODY},
    }
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    sock.sendall(b"".join(json.dumps(m).encode() + b"\0" for m in [describe] * 60 + [call]))
    return sock
