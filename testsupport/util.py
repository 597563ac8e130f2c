"""Small helpers shared by the tests and the bench: memfds with known
contents, a fake kernel image, waiting for a condition, whether an fd is
open, running a function as another uid, Python code in a fresh
interpreter.

Only the standard library: this is also installed into the Debian sid VM
image."""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


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


def fresh_python(code: str) -> str:
    """What `code` prints in a new interpreter (this one, this environment):
    what luod's start imports or makes, without what the test process has
    loaded already."""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    return done.stdout


def fd_is_open(fd: int) -> bool:
    """Whether `fd` is open in this process (-1 never is). An error other
    than EBADF is raised, not taken for "closed"."""
    try:
        os.fstat(fd)
    except OSError as e:
        if e.errno != errno.EBADF:
            raise
        return False
    return True


def become(uid: int) -> None:
    """Drop this process to `uid` (gid `uid`, no supplementary groups)."""
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


class ChildFailed(Exception):
    """`work` failed in run_as's child: the message has its traceback."""


def run_as(uid: int, work: Callable[[], T]) -> T:
    """Run `work` in a forked child dropped to `uid` (see become; not
    dropped when it is this process's uid already) and return its result,
    which must be JSON-serialisable (it comes back as JSON over a pipe).
    Raises ChildFailed, with the child's traceback, when it fails."""
    r, w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.close(r)
            try:
                if uid != os.getuid():
                    become(uid)
                data = json.dumps({"result": work()}).encode()
            except BaseException:
                data = json.dumps({"traceback": traceback.format_exc()}).encode()
            view = memoryview(data)
            while view:
                view = view[os.write(w, view) :]
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0 or not data:
        raise ChildFailed(f"the child as uid {uid} exited {code}: {data!r}")
    doc = json.loads(data)
    if "traceback" in doc:
        raise ChildFailed(f"the child as uid {uid} failed:\n{doc['traceback']}")
    result: T = doc["result"]
    return result
