#!/usr/bin/python3
"""Guest helper of tests/systemd and bench/systemd.py: many memfds at once.

    bulk.py luod --count N --session S --info FILE [--mark FILE]
        N memfds of one 4 KiB page each into luod (PreserveFds batches of at
        most 253 fds, SCM_MAX_FD; smaller when luod's varlink layer cannot
        take a message that long), timed.
    bulk.py compare --count N --info FILE
        the same N memfds into luod (session bench) and then into this
        service's own fd store (sd_notify FDSTORE=1, up to 253 fds per
        message, then BARRIER=1 so PID 1 has taken them all); run it as a
        service with FileDescriptorStoreMax= >= N and NotifyAccess=.

Runs on the guest's python3 (sid) with the luod package of the image. The
time of each push is from its first message to its last answer (luod) or to
the barrier (PID 1); creating the memfds is not counted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import select
import sys
import time
from collections.abc import Sequence
from typing import Any

from luod import notify
from luod.client import Client, VarlinkError, connect

PAGE = b"\xa5" * 4096
SCM_MAX_FD = 253
# asyncvarlink 0.3.3 reads 4096 bytes at a time and drops the fds of a call
# whose JSON is longer (bench/guest.py, RECV_CHUNK): luod answers MissingFd.
RECV_CHUNK = 4096


def memfds(n: int) -> list[int]:
    fds = []
    for _ in range(n):
        fd = os.memfd_create("bulk", os.MFD_CLOEXEC)
        os.write(fd, PAGE)
        fds.append(fd)
    return fds


def message_size(session: str, names: Sequence[str], create: bool) -> int:
    params: dict[str, Any] = {
        "session": session,
        "files": [{"name": n, "fileDescriptor": i} for i, n in enumerate(names)],
    }
    if create:
        params["createSession"] = True
    return len(json.dumps({"method": "io.luod.Custody.PreserveFds", "parameters": params})) + 1


def plan(session: str, names: Sequence[str], limit: int | None) -> list[range]:
    out: list[range] = []
    start = 0
    while start < len(names):
        end = min(start + SCM_MAX_FD, len(names))
        if limit is not None:
            while end - start > 1 and message_size(session, names[start:end], not out) > limit:
                end -= 1
        out.append(range(start, end))
        start = end
    return out


def push_luod(
    c: Client, session: str, fds: Sequence[int], mark: str | None = None
) -> dict[str, Any]:
    """`mark`: a file written once the first batch is in (luod is busy)."""
    names = [f"f{i}" for i in range(len(fds))]
    for limit in (None, RECV_CHUNK):
        batches = plan(session, names, limit)
        t0 = time.monotonic()
        try:
            for k, part in enumerate(batches):
                c.preserve_fds(session, [(names[i], fds[i]) for i in part], create_session=k == 0)
                if k == 0 and mark:
                    with open(mark, "w") as f:
                        f.write(f"{time.monotonic()}\n")
        except VarlinkError as e:
            if limit is None and e.short == "MissingFd":
                with contextlib.suppress(VarlinkError):
                    c.discard_session(session)
                continue
            raise
        t1 = time.monotonic()
        return {
            "seconds": t1 - t0,
            "start_monotonic": t0,
            "end_monotonic": t1,
            "batches": len(batches),
            "byte_limit": limit,
        }
    raise AssertionError("unreachable")


def barrier(timeout: float = 120.0) -> bool:
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        if not notify.notify("BARRIER=1", [w]):
            return False
        os.close(w)
        w = -1
        ready, _, _ = select.select([r], [], [], timeout)
        return bool(ready)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def push_fdstore(fds: Sequence[int], name: str) -> dict[str, Any]:
    messages = 0
    t0 = time.monotonic()
    for start in range(0, len(fds), SCM_MAX_FD):
        if not notify.notify(f"FDSTORE=1\nFDNAME={name}", fds[start : start + SCM_MAX_FD]):
            raise RuntimeError("FDSTORE=1 not sent: no $NOTIFY_SOCKET")
        messages += 1
    sent = time.monotonic()
    if not barrier():
        raise RuntimeError("BARRIER=1 not answered")
    t1 = time.monotonic()
    return {"seconds": t1 - t0, "send_seconds": sent - t0, "messages": messages}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["luod", "compare"])
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--session", default="bulk")
    p.add_argument("--info", required=True)
    p.add_argument("--mark", help="file written after the first batch")
    args = p.parse_args()
    out: dict[str, Any] = {"count": args.count}
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < args.count + 64 <= hard:  # services start with a soft limit of 1024
        resource.setrlimit(resource.RLIMIT_NOFILE, (args.count + 64, hard))
    fds = memfds(args.count)
    try:
        with connect() as c:
            session = args.session if args.what == "luod" else "bench"
            out["luod"] = push_luod(c, session, fds, args.mark)
        if args.what == "compare":
            out["fdstore"] = push_fdstore(fds, "bench")
            out["fdstore"]["n_store"] = os.environ.get("FDSTORE")
            out["ratio"] = out["luod"]["seconds"] / out["fdstore"]["seconds"]
    finally:
        for fd in fds:
            os.close(fd)
    with open(args.info, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
