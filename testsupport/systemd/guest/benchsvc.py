#!/usr/bin/python3
"""Guest helper of bench/systemd.py (issue 12, goal 1): one service program,
two ways to keep a 4 KiB memfd over a kexec, so that both pay the same
interpreter start.

    benchsvc.py store --out DIR   (FileDescriptorStoreMax=, ...Preserve=yes)
        LISTEN_FDNAMES has "page" -> the fd is back (systemd alone); else
        create the memfd and push it into this unit's own fd store
        (sd_notify FDSTORE=1, FDNAME=page, then BARRIER=1).
    benchsvc.py luod --out DIR    (Wants=/After=luod-reclaim.service)
        RetrieveFd of bench-page/page over varlink with luod.client, in this
        process, as a Python service would (a copy: luod keeps custody) ->
        the fd is back; NoSuchSession -> create the memfd and hand it to
        luod (PreserveFd, createSession).
    benchsvc.py handback --out DIR  (ExecStartPre=luoctl handback bench-handback
                                     --optional, FileDescriptorStoreMax=)
        LISTEN_FDNAMES has "page" (put into the fd store by luoctl) -> the
        fd is back, luod is not called from this process; else (first boot)
        hand the memfd to luod as in luod mode, session bench-handback.

The moment the fd is in hand the program reads CLOCK_BOOTTIME (seconds since
this kernel started: nothing was suspended) and CLOCK_MONOTONIC (systemd's
*TimestampMonotonic clock), and only then checks the bytes. What it did goes
to DIR/MODE.json. Only the standard library is imported before the fd is in
hand, plus luod.client in luod mode (that import is part of luod's path).
Exit status 0 when the fd came back byte-identical or was handed away.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from typing import Any

NAME = "page"
SESSION = "bench-page"
HANDBACK_SESSION = "bench-handback"
SIZE = 4096
SEED = b"luod-bench-page"


def now() -> dict[str, float]:
    return {
        "boottime": time.clock_gettime(time.CLOCK_BOOTTIME),
        "monotonic": time.clock_gettime(time.CLOCK_MONOTONIC),
    }


def page() -> bytes:
    """SIZE bytes only SEED gives (sha256 chain): any changed byte shows."""
    out = b""
    block = SEED
    while len(out) < SIZE:
        block = hashlib.sha256(block).digest()
        out += block
    return out[:SIZE]


def make_memfd() -> int:
    fd = os.memfd_create(f"luod-bench-{NAME}", os.MFD_CLOEXEC)
    os.write(fd, page())
    return fd


def read_all(fd: int) -> bytes:
    return os.pread(fd, SIZE + 1, 0)


def from_store() -> int | None:
    """The fd named NAME that PID 1 passed (sd_listen_fds_with_names)."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    count = int(os.environ.get("LISTEN_FDS", "0"))
    for i, name in enumerate(names[:count]):
        if name == NAME:
            return 3 + i
    return None


def store(out: dict[str, Any]) -> int | None:
    fd = from_store()
    if fd is not None:
        return fd
    from luod import notify  # first boot only: not on the timed path

    out["action"] = "handed"
    mfd = make_memfd()
    if not notify.notify(f"FDSTORE=1\nFDNAME={NAME}", [mfd]):
        raise RuntimeError("FDSTORE=1 not sent: no $NOTIFY_SOCKET")
    if not notify.barrier(60.0):
        raise RuntimeError("BARRIER=1 not answered in 60 s")
    return None


def luod(out: dict[str, Any], session: str = SESSION) -> int | None:
    t = time.clock_gettime(time.CLOCK_MONOTONIC)
    from luod.client import VarlinkError, connect

    out["import_seconds"] = time.clock_gettime(time.CLOCK_MONOTONIC) - t
    with connect() as c:
        if session == SESSION:
            try:
                return c.retrieve_fd(session, NAME)
            except VarlinkError as e:
                if e.short != "NoSuchSession":
                    raise
        out["action"] = "handed"
        mfd = make_memfd()
        c.preserve_fd(session, NAME, mfd, create_session=True)
        os.close(mfd)
    return None


def handback(out: dict[str, Any]) -> int | None:
    fd = from_store()
    if fd is not None:
        return fd
    return luod(out, HANDBACK_SESSION)


def main() -> int:
    started = now()
    mode, out_dir = sys.argv[1], sys.argv[sys.argv.index("--out") + 1]
    out: dict[str, Any] = {"mode": mode, "pid": os.getpid(), "started": started}
    ok = True
    try:
        fd = {"store": store, "luod": luod, "handback": handback}[mode](out)
        if fd is not None:
            out["has_fd"] = now()
            out["action"] = "got-back"
            data = read_all(fd)
            out["size"] = len(data)
            out["identical"] = data == page()
            out["sha256"] = hashlib.sha256(data).hexdigest()
            ok = bool(out["identical"])
    except Exception as e:  # reported to the host, not hidden
        out["error"] = f"{type(e).__name__}: {e}"
        ok = False
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{mode}.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
