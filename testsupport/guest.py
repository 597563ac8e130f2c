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
import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

from luod import notify
from testsupport.util import make_memfd, memfd_facts

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
