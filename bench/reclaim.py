"""Guest side of `make bench`: the reclaim cases. Before a kexec, S sessions
x F memfds go into luod and as many into raw sessions of this process; after
it, the raw loop that luod's reclaim is compared with, and getting every fd
back through luod (one RetrieveFd per fd, one RetrieveFds per session).
Called by bench/guest.py, which measures luod's side.
"""

from __future__ import annotations

import os
import time
from typing import Any

from luod.client import Client
from luod.kernel.backend import KernelBackend
from testsupport.guest import close_all, memfds
from testsupport.luodproc import LuodProcess


def setup_reclaim(luod: LuodProcess, sessions: int, files: int) -> dict[str, Any]:
    """sessions x files memfds in luod, and as many in raw sessions of this
    process; returns the raw session fds, which must stay open until the
    reboot syscall."""
    be = KernelBackend()
    raw: list[int] = []
    with luod.client() as c:
        for s in range(sessions):
            fds = memfds(files, "bench")
            try:
                c.preserve_fds(
                    f"rec-{s}", [(f"f{i}", fd) for i, fd in enumerate(fds)], create_session=True
                )
            finally:
                close_all(fds)
        status = c.status()
    for s in range(sessions):
        fds = memfds(files, "bench")
        try:
            sfd = be.create_session(f"bench-raw-rec-{s}")
            raw.append(sfd)
            for i, fd in enumerate(fds):
                be.preserve_fd(sfd, fd, i + 1)
        finally:
            close_all(fds)
    return {"sessions": sessions, "files": files, "luod_files": status["files"], "raw_fds": raw}


def raw_reclaim(sessions: int, files: int) -> dict[str, float]:
    """The raw loop: RETRIEVE_SESSION + RETRIEVE_FD for all, in-process; then,
    separately, what luod also does so that custody goes on (FINISH, and a
    new outgoing session with every file PRESERVE_FD'd again)."""
    be = KernelBackend()
    got: list[tuple[int, list[int]]] = []
    t0 = time.perf_counter()
    for s in range(sessions):
        sfd = be.retrieve_session(f"bench-raw-rec-{s}")
        got.append((sfd, [be.retrieve_fd(sfd, i + 1) for i in range(files)]))
    t1 = time.perf_counter()
    out: list[int] = []
    for s, (sfd, fds) in enumerate(got):
        be.finish_session(sfd)
        os.close(sfd)
        nfd = be.create_session(f"bench-raw-again-{s}")
        out.append(nfd)
        for i, fd in enumerate(fds):
            be.preserve_fd(nfd, fd, i + 1)
    t2 = time.perf_counter()
    for _sfd, fds in got:
        close_all(fds)
    close_all(out)
    return {"retrieve": t1 - t0, "finish_represerve": t2 - t1}


def retrieve_per_fd(c: Client, sessions: int, files: int) -> float:
    """Every fd back through luod, one RetrieveFd (a copy) per fd."""
    t0 = time.perf_counter()
    for s in range(sessions):
        for i in range(files):
            os.close(c.retrieve_fd(f"rec-{s}", f"f{i}"))
    return time.perf_counter() - t0


def retrieve_batches(c: Client, sessions: int) -> float:
    """Every fd back through luod, one RetrieveFds (copies, every fd of the
    session) per session."""
    t0 = time.perf_counter()
    for s in range(sessions):
        for _name, fd in c.retrieve_fds(f"rec-{s}"):
            os.close(fd)
    return time.perf_counter() - t0
