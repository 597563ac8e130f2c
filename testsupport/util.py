"""Small helpers shared by the tests and the bench: memfds with known
contents, a fake kernel image, waiting for a condition."""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import os
import time
from collections.abc import Callable


@dataclasses.dataclass(frozen=True)
class MemfdFacts:
    sha256: str
    size: int
    position: int
    seals: int


def make_memfd(data: bytes, position: int = 0, seals: int = 0, name: str = "test") -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
    os.lseek(fd, position, os.SEEK_SET)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def memfd_facts(fd: int) -> MemfdFacts:
    size = os.fstat(fd).st_size
    h = hashlib.sha256()
    offset = 0
    while offset < size:
        chunk = os.pread(fd, 1 << 20, offset)
        if not chunk:
            break
        h.update(chunk)
        offset += len(chunk)
    return MemfdFacts(
        sha256=h.hexdigest(),
        size=size,
        position=os.lseek(fd, 0, os.SEEK_CUR),
        seals=fcntl.fcntl(fd, fcntl.F_GET_SEALS),
    )


def wait_until(done: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Polls `done` until it holds: what luod does in the background (a
    grace timer, a subscriber's last event) is waited for, never slept for,
    so a loaded machine makes a test slower, not red."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not so after {timeout:g}s")
        time.sleep(0.02)
