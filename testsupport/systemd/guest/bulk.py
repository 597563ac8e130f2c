#!/usr/bin/python3
"""Guest helper of tests/systemd and bench/systemd.py: many memfds at once.

    bulk.py luod --count N --session S --info FILE [--mark FILE] [--until FILE]
        N memfds of one 4 KiB page each into luod (PreserveFds batches of at
        most 253 fds, SCM_MAX_FD), timed. --mark: a file written once the
        first batch is in. --until: after the N, go on with batches of fresh
        memfds into a scratch session (discarded after each batch) until
        that file exists, so that whatever the caller does before creating
        it happens while luod is busy, however fast luod is.
    bulk.py compare --count N --info FILE [--rounds R] [--pairs P]
        the same N memfds into luod (session bench) and then into this
        service's own fd store (sd_notify FDSTORE=1, up to 253 fds per
        message, then BARRIER=1 so PID 1 has taken them all); run it as a
        service with FileDescriptorStoreMax= >= N and NotifyAccess=.
        Then goal 4 as luod runs under PID 1: R rounds of N fresh memfds
        three ways each (the raw PRESERVE_FD loop in this process, the same
        loop identifying each fd first, luod's PreserveFds batches), and P
        PreserveFd calls next to P GetInfo on one connection.

Runs on the guest's python3 (sid) with the image's luod and testsupport. The
time of each push is from its first message to its last answer (luod) or to
the barrier (PID 1); creating the memfds is not counted.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from collections.abc import Sequence
from typing import Any

from luod import notify
from luod.client import MAX_FDS_PER_MESSAGE as SCM_MAX_FD
from luod.client import Client, connect
from testsupport.guest import (
    close_all,
    memfds,
    preserve_fd_vs_getinfo,
    raw_preserve,
    write_json,
)

# Bounds the extra batches of --until: the caller's step takes seconds, not
# the minutes this many fds would take under TCG.
UNTIL_MAX_FDS = 50_000


def push_luod(
    c: Client,
    session: str,
    fds: Sequence[int],
    mark: str | None = None,
    until: str | None = None,
) -> dict[str, Any]:
    """`fds` into a new session, in PreserveFds batches of SCM_MAX_FD, timed.
    `mark`: a file written once the first batch is in (luod is busy).
    `until`: a file whose existence ends the extra batches after `fds`."""
    t0 = time.monotonic()
    batches = range(0, len(fds), SCM_MAX_FD)
    for start in batches:
        part = [(f"f{i}", fds[i]) for i in range(start, min(start + SCM_MAX_FD, len(fds)))]
        c.preserve_fds(session, part, create_session=start == 0)
        if start == 0 and mark:
            with open(mark, "w") as f:
                f.write(f"{time.monotonic()}\n")
    extra = push_until(c, session, until) if until else 0
    t1 = time.monotonic()
    return {
        "seconds": t1 - t0,
        "start_monotonic": t0,
        "end_monotonic": t1,
        "batches": len(batches),
        "extra": extra,
    }


def push_until(c: Client, session: str, until: str) -> int:
    """Batches of fresh memfds into a scratch session, discarded after each,
    until `until` exists, so that luod keeps working but holds no more than
    before however long that takes; returns how many fds they carried."""
    scratch = f"{session}-extra"
    pushed = 0
    while not os.path.exists(until):
        if pushed >= UNTIL_MAX_FDS:
            raise RuntimeError(f"{until} not created after {pushed} extra fds")
        fds = memfds(SCM_MAX_FD, "bulk")
        try:
            c.preserve_fds(
                scratch, [(f"f{i}", fd) for i, fd in enumerate(fds)], create_session=True
            )
            c.discard_session(scratch)
        finally:
            close_all(fds)
        pushed += len(fds)
    return pushed


def push_fdstore(fds: Sequence[int], name: str) -> dict[str, Any]:
    messages = 0
    t0 = time.monotonic()
    for start in range(0, len(fds), SCM_MAX_FD):
        if not notify.notify(f"FDSTORE=1\nFDNAME={name}", fds[start : start + SCM_MAX_FD]):
            raise RuntimeError("FDSTORE=1 not sent: no $NOTIFY_SOCKET")
        messages += 1
    sent = time.monotonic()
    if not notify.barrier(120.0):
        raise RuntimeError("BARRIER=1 not answered")
    t1 = time.monotonic()
    return {"seconds": t1 - t0, "send_seconds": sent - t0, "messages": messages}


def handoff_rounds(c: Client, count: int, rounds: int, pairs: int) -> dict[str, Any]:
    """Goal 4 in this guest: each round hands `count` fresh memfds off three
    ways, in turn (a burst of load lands on all three alike): the raw loop,
    the raw loop identifying each fd first, luod's PreserveFds batches
    (into a session discarded after). Then `pairs` PreserveFd next to
    `pairs` GetInfo on the connection `c`."""
    ways: dict[str, list[float]] = {"raw": [], "identified": [], "batches": []}
    for r in range(rounds):
        for way, times in ways.items():
            fds = memfds(count, "bulk")
            try:
                if way == "batches":
                    session = f"bench-handoff-{r}"
                    times.append(push_luod(c, session, fds)["seconds"])
                    c.discard_session(session)
                else:
                    times.append(raw_preserve(fds, f"bench-{way}-{r}", way == "identified"))
            finally:
                close_all(fds)
    fds = memfds(pairs + 1, "bulk")
    try:
        pair = preserve_fd_vs_getinfo(c, "bench-pair", fds)
        c.discard_session("bench-pair")
    finally:
        close_all(fds)
    return {"count": count, "ways": ways, "pairs": pair}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["luod", "compare"])
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--session", default="bulk")
    p.add_argument("--info", required=True)
    p.add_argument("--mark", help="file written after the first batch")
    p.add_argument("--until", help="go on with more batches until this file exists")
    p.add_argument("--rounds", type=int, default=5, help="compare: goal 4's rounds")
    p.add_argument("--pairs", type=int, default=50, help="compare: PreserveFd/GetInfo pairs")
    args = p.parse_args()
    out: dict[str, Any] = {"count": args.count}
    # The N memfds, one batch more at a time for --until (compare: N more,
    # or the pairs' memfds, at a time for goal 4), and some to spare;
    # services start with a soft limit of 1024.
    more = 0
    if args.until:
        more = SCM_MAX_FD
    elif args.what == "compare":
        more = max(args.count, args.pairs + 1)
    need = args.count + more + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need <= hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    fds = memfds(args.count, "bulk")
    try:
        with connect() as c:
            session = args.session if args.what == "luod" else "bench"
            out["luod"] = push_luod(c, session, fds, args.mark, args.until)
        if args.what == "compare":
            out["fdstore"] = push_fdstore(fds, "bench")
            out["fdstore"]["n_store"] = os.environ.get("FDSTORE")
            out["ratio"] = out["luod"]["seconds"] / out["fdstore"]["seconds"]
            with connect() as c:
                out["goal4"] = handoff_rounds(c, args.count, args.rounds, args.pairs)
    finally:
        close_all(fds)
    write_json(args.info, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
