"""Guest side of `make bench`: what handing fds to luod costs.

Hand-off of N memfds four ways, in the same run (the raw PRESERVE_FD loop
in this process, the same loop asking fstat and F_GETFL of each fd first,
PreserveFds batches, one PreserveFd per fd), one PreserveFd
next to a GetInfo round trip on the same connection, luod's memory while it
holds many fds, and where a hand-off's time goes (luod's own building
blocks, timed piece by piece). Called by bench/guest.py.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from luod.client import MAX_FDS_PER_MESSAGE, Client, VarlinkError
from luod.interfaces import CUSTODY
from testsupport.guest import PAGE, close_all, memfds, preserve_fd_vs_getinfo, raw_preserve
from testsupport.luodproc import LuodProcess
from testsupport.vm.timeline import mark

# asyncvarlink 0.3.3 (luod's varlink server) reads a socket 4096 bytes at a
# time and keeps the fds only with a chunk that ends a message: the fds of a
# call whose JSON is longer than that are closed, and luod answers MissingFd.
# probe_batch() finds out whether this luod has that limit.
RECV_CHUNK = 4096


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, RssFile, VmHWM of process `pid` in KiB, and its open
    fd count."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = int(value.split()[0])
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


def message_size(session: str, names: Sequence[str], create: bool) -> int:
    """Bytes of the PreserveFds call luod.client sends for these names."""
    params: dict[str, Any] = {
        "session": session,
        "files": [{"name": n, "fileDescriptor": i} for i, n in enumerate(names)],
    }
    if create:
        params["createSession"] = True
    return len(json.dumps({"method": f"{CUSTODY}.PreserveFds", "parameters": params})) + 1


def plan_batches(session: str, names: Sequence[str], limit: int | None) -> list[range]:
    """Split names into PreserveFds calls: at most 253 fds each, and, with a
    byte limit, messages of at most `limit` bytes."""
    out: list[range] = []
    start = 0
    while start < len(names):
        end = min(start + MAX_FDS_PER_MESSAGE, len(names))
        if limit is not None:
            while end - start > 1 and message_size(session, names[start:end], not out) > limit:
                end -= 1
        out.append(range(start, end))
        start = end
    return out


def probe_batch(c: Client) -> dict[str, Any]:
    """One PreserveFds of 253 fds: does a message over RECV_CHUNK bytes work?"""
    names = [f"f{i}" for i in range(MAX_FDS_PER_MESSAGE)]
    fds = memfds(len(names), "bench")
    size = message_size("bench-probe", names, True)
    try:
        c.preserve_fds("bench-probe", list(zip(names, fds, strict=True)), create_session=True)
    except VarlinkError as e:
        return {"ok": False, "bytes": size, "error": str(e), "limit": RECV_CHUNK}
    finally:
        close_all(fds)
    c.discard_session("bench-probe")
    return {"ok": True, "bytes": size, "limit": None}


# --- hand-off ---------------------------------------------------------------------


# How a hand-off is timed: the raw loop, the raw loop with each fd
# identified first, luod's PreserveFds batches, a PreserveFd per fd.
HANDOFF_WAYS = ("raw", "identified", "batches", "per_fd")


def handoff_raw(n: int, tag: str, identify: bool = False) -> float:
    """The raw loop (testsupport.guest.raw_preserve) of n fresh memfds."""
    fds = memfds(n, "bench")
    try:
        return raw_preserve(fds, f"bench-{'i' if identify else ''}raw-{tag}", identify)
    finally:
        close_all(fds)


def handoff_batches(c: Client, n: int, tag: str, limit: int | None) -> tuple[float, int]:
    """PreserveFds in batches of up to 253 fds (SCM_MAX_FD), or as many as
    fit `limit` bytes, into a new session; (seconds, calls)."""
    fds = memfds(n, "bench")
    session = f"bench-batch-{tag}"
    names = [f"f{i}" for i in range(n)]
    plan = plan_batches(session, names, limit)
    try:
        t0 = time.perf_counter()
        for k, part in enumerate(plan):
            c.preserve_fds(session, [(names[i], fds[i]) for i in part], create_session=k == 0)
        took = time.perf_counter() - t0
    finally:
        close_all(fds)
    c.discard_session(session)
    return took, len(plan)


def handoff_per_fd(c: Client, n: int, tag: str) -> float:
    """One PreserveFd call per fd into a new session."""
    fds = memfds(n, "bench")
    session = f"bench-perfd-{tag}"
    try:
        t0 = time.perf_counter()
        for i, fd in enumerate(fds):
            c.preserve_fd(session, f"f{i}", fd, create_session=i == 0)
        took = time.perf_counter() - t0
    finally:
        close_all(fds)
    c.discard_session(session)
    return took


def bench_handoff(luod: LuodProcess, cfg: dict[str, Any], limit: int | None) -> dict[str, Any]:
    runs: dict[str, Any] = {m: {str(n): [] for n in cfg["handoff"]} for m in HANDOFF_WAYS}
    runs["batch_calls"] = {}
    with luod.client() as c:
        for rep in range(cfg["repeats"]):
            for n in cfg["handoff"]:
                # Interleaved, so that a burst of load on the shared host
                # lands on all four alike.
                runs["raw"][str(n)].append(handoff_raw(n, f"{n}-{rep}"))
                runs["identified"][str(n)].append(handoff_raw(n, f"{n}-{rep}", identify=True))
                took, calls = handoff_batches(c, n, f"{n}-{rep}", limit)
                runs["batches"][str(n)].append(took)
                runs["batch_calls"][str(n)] = calls
                runs["per_fd"][str(n)].append(handoff_per_fd(c, n, f"{n}-{rep}"))
                mark(
                    f"handoff-{n}-{rep}",
                    **{m: runs[m][str(n)][-1] for m in HANDOFF_WAYS},
                )
    return runs


def bench_call_vs_getinfo(luod: LuodProcess, n: int) -> dict[str, Any]:
    """n PreserveFd next to n GetInfo on one connection
    (testsupport.guest.preserve_fd_vs_getinfo)."""
    session = "bench-pair"
    fds = memfds(n + 1, "bench")
    try:
        with luod.client() as c:
            out = preserve_fd_vs_getinfo(c, session, fds)
            c.discard_session(session)
    finally:
        close_all(fds)
    return out


def bench_held(luod: LuodProcess, cfg: dict[str, Any], limit: int | None) -> dict[str, Any]:
    """luod's memory with cfg['held'] fds in custody (PreserveFds batches)."""
    per = cfg["held_per_session"]
    sessions = [f"held-{i}" for i in range((cfg["held"] + per - 1) // per)]
    before = proc_status(luod.pid)
    t0 = time.perf_counter()
    left = cfg["held"]
    calls = 0
    with luod.client() as c:
        for s in sessions:
            names = [f"f{i}" for i in range(min(per, left))]
            left -= len(names)
            for k, part in enumerate(plan_batches(s, names, limit)):
                fds = memfds(len(part), "bench")
                calls += 1
                try:
                    c.preserve_fds(
                        s, [(names[i], fd) for i, fd in zip(part, fds, strict=True)], k == 0
                    )
                finally:
                    close_all(fds)
        took = time.perf_counter() - t0
        status = c.status()
        held = proc_status(luod.pid)
        for s in sessions:
            c.discard_session(s)
    after = proc_status(luod.pid)
    mark("held", files=status["files"], rss_kib=held["VmRSS"])
    return {
        "files": status["files"],
        "sessions": len(sessions),
        "handoff_seconds": took,
        "calls": calls,
        "before": before,
        "held": held,
        "released": after,
    }


# --- where a hand-off's time goes: luod's building blocks, in this process ---


def per_call(fn: Callable[..., object], n: int) -> float:
    """Seconds per call of fn(), over n calls."""
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def bench_breakdown(luod: LuodProcess) -> dict[str, Any]:
    """What luod does per PreserveFd, piece by piece, with luod's own code
    (called here, not changed): the fd check, a log line, the manifest
    written after every call (it holds every file luod holds), and a
    varlink round trip of a call that does next to nothing."""
    from luod import log as luodlog
    from luod.carriers.slots import capacity_for, write_slot
    from luod.kernel import fdinfo
    from luod.manifest import Manifest, to_json
    from luod.model import HeldFile, HeldFiles, Owner, Session, SessionKind

    out: dict[str, Any] = {}
    fd = memfds(1, "bench")[0]
    try:
        out["inspect_fd"] = per_call(lambda: fdinfo.inspect_fd(fd), 500)
    finally:
        os.close(fd)
    with open(os.devnull, "w") as devnull:
        luodlog.setup("info", stream=devnull)
        log = luodlog.get_logger()
        out["log_line"] = per_call(
            lambda: log.info(
                "fd-preserved", session="s", name="f1", token=1, size=4096, owner="x (uid 0)"
            ),
            500,
        )
    out["manifest"] = {}
    for n in (1, 100, 1000, 10000):
        files = {
            f"f{i}": HeldFile(name=f"f{i}", token=i + 1, size=len(PAGE), preserved_at=time.time())
            for i in range(n)
        }
        s = Session("s", SessionKind.MANAGED, Owner(0, None, "bench"), "luod.1.s", time.time())
        s.files = HeldFiles(files)
        m = Manifest(sessions=[s])
        payload = to_json(m)
        mfd = os.memfd_create("manifest", os.MFD_CLOEXEC)
        size = capacity_for(len(payload))
        os.ftruncate(mfd, size)
        reps = max(3, min(200, 20000 // n))
        try:
            out["manifest"][str(n)] = {
                "bytes": len(payload),
                "to_json": per_call(lambda m=m: to_json(m), reps),
                "write_slot": per_call(
                    lambda mfd=mfd, size=size, payload=payload: write_slot(
                        mfd, size, 0, 1, payload
                    ),
                    reps,
                ),
            }
        finally:
            os.close(mfd)
    with luod.client() as c:
        c.status()
        out["status_round_trip"] = per_call(c.status, 100)
    return out
