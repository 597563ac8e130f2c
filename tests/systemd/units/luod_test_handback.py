#!/usr/bin/python3
"""Test-only program of luod-test-handback.service (tests/systemd/units/).

    luod_test_handback.py SESSION NAME

If the fd store handed it an fd named NAME (LISTEN_FDNAMES, put there by
`luoctl handback` in ExecStartPre=), describe it: mode "from-store", and luod
is not called. Otherwise (the first boot) create a memfd of known bytes and
hand it to luod under SESSION/NAME: mode "pushed-to-luod". What it saw goes
to /run/luod-test/$LUOD_TEST_UNIT.json and stdout.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from typing import Any

from luod import notify

OUT = "/run/luod-test"
SIZE = 512 * 1024
POSITION = 4096


def content(seed: str) -> bytes:
    out = bytearray()
    block = hashlib.sha256(seed.encode()).digest()
    while len(out) < SIZE:
        block = hashlib.sha256(block).digest()
        out += block * 64
    return bytes(out[:SIZE])


def describe(fd: int) -> dict[str, Any]:
    size = os.fstat(fd).st_size
    return {
        "size": size,
        "position": os.lseek(fd, 0, os.SEEK_CUR),
        "sha256": hashlib.sha256(os.pread(fd, size, 0)).hexdigest(),
        "link": os.readlink(f"/proc/self/fd/{fd}"),
    }


def run(session: str, name: str, out: dict[str, Any]) -> bool:
    out["listen_fds"] = os.environ.get("LISTEN_FDS")
    out["listen_fdnames"] = os.environ.get("LISTEN_FDNAMES")
    fds = {entry.name: entry.fd for entry in notify.listen_fds()}
    out["names"] = sorted(fds)
    if name in fds:
        out["mode"] = "from-store"
        out["memfd"] = describe(fds[name])
        return True
    if fds:
        out["error"] = f"fds in the store, but none named {name!r}"
        return False
    from luod.client import connect

    fd = os.memfd_create(f"handback-{name}", os.MFD_CLOEXEC)
    os.write(fd, content(f"{session}/{name}"))
    os.lseek(fd, POSITION, os.SEEK_SET)
    out["memfd"] = describe(fd)
    with connect() as c:
        out["preserved"] = c.preserve_fd(session, name, fd, create_session=True)
    out["mode"] = "pushed-to-luod"
    return True


def main() -> int:
    session, name = sys.argv[1], sys.argv[2]
    out: dict[str, Any] = {"session": session, "name": name, "pid": os.getpid()}
    out["start_monotonic"] = time.monotonic()
    try:
        ok = run(session, name, out)
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"
        ok = False
    out["ok"] = ok
    os.makedirs(OUT, exist_ok=True)
    with open(f"{OUT}/{os.environ.get('LUOD_TEST_UNIT', 'handback')}.json", "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
