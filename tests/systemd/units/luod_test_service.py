#!/usr/bin/python3
"""Test-only service program of tests/systemd (installed by vm/build-image.sh
--test-units as /usr/lib/luod-test/luod_test_service.py; run by the
luod-test-*.service units next to it). Runs on the guest's python3 with the
luod package of the image.

    luod_test_service.py luosession NAME   (LUOSession=NAME)
        The session PID 1 hands over in LISTEN_FDS (FDNAME=NAME): an outgoing
        one -> preserve a memfd of known bytes into it as token 1; an
        incoming one (after a kexec) -> retrieve token 1 and describe it.
    luod_test_service.py fdstore NAME      (FileDescriptorStorePreserve=yes)
        LISTEN_FDNAMES has NAME -> describe it; else create a memfd and
        push it into the service's own fd store (FDSTORE=1, FDNAME=NAME).
    luod_test_service.py wants-fds SESSION NAME
        One RetrieveFd from luod, no retry (boot ordering after
        luod-reclaim.service); describes what came back.

Each writes what it did to /run/luod-test/<unit>.json; exit status 0 on
success.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import sys
import time
from typing import Any

from luod import notify
from luod.kernel.backend import KernelBackend

OUT = "/run/luod-test"
SIZE = 256 * 1024
TOKEN = 1


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
        "sha256": hashlib.sha256(os.pread(fd, size, 0)).hexdigest(),
        "link": os.readlink(f"/proc/self/fd/{fd}"),
    }


def new_memfd(seed: str) -> int:
    fd = os.memfd_create(seed, os.MFD_CLOEXEC)
    os.write(fd, content(seed))
    return fd


def listen() -> dict[str, int]:
    return {entry.name: entry.fd for entry in notify.listen_fds()}


def barrier() -> bool:
    """sd_notify_barrier(): True once PID 1 processed every message before."""
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        if not notify.notify("BARRIER=1", [w]):
            return False
        os.close(w)
        w = -1
        ready, _, _ = select.select([r], [], [], 30.0)
        return bool(ready)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def luosession(name: str, out: dict[str, Any]) -> bool:
    fds = listen()
    out["listen_fdnames"] = sorted(fds)
    sfd = fds.get(name)
    if sfd is None:
        out["error"] = f"no fd named {name!r} in LISTEN_FDS"
        return False
    be = KernelBackend()
    out["session_link"] = os.readlink(f"/proc/self/fd/{sfd}")
    out["kernel_name"] = be.session_name(sfd)
    try:
        fd = be.retrieve_fd(sfd, TOKEN)
    except Exception as e:  # an outgoing session: nothing to retrieve yet
        out["retrieve_error"] = str(e)
    else:
        out["mode"] = "retrieved"
        out["memfd"] = describe(fd)
        return True
    fd = new_memfd(f"luosession-{name}")
    be.preserve_fd(sfd, fd, TOKEN)
    out["mode"] = "preserved"
    out["memfd"] = describe(fd)
    return True


def fdstore(name: str, out: dict[str, Any]) -> bool:
    fds = listen()
    out["listen_fdnames"] = sorted(fds)
    if name in fds:
        out["mode"] = "from-store"
        out["memfd"] = describe(fds[name])
        return True
    fd = new_memfd(f"fdstore-{name}")
    out["mode"] = "pushed"
    out["memfd"] = describe(fd)
    if not notify.notify(f"FDSTORE=1\nFDNAME={name}", [fd]):
        out["error"] = "FDSTORE=1 not sent (no $NOTIFY_SOCKET?)"
        return False
    return barrier()


def wants_fds(session: str, name: str, out: dict[str, Any]) -> bool:
    from luod.client import connect

    try:
        with connect() as c:
            fd = c.retrieve_fd(session, name)
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"
        return False
    out["memfd"] = describe(fd)
    return True


def main() -> int:
    what, args = sys.argv[1], sys.argv[2:]
    out: dict[str, Any] = {"what": what, "args": args, "start_monotonic": time.monotonic()}
    try:
        if what == "luosession":
            ok = luosession(args[0], out)
        elif what == "fdstore":
            ok = fdstore(args[0], out)
        elif what == "wants-fds":
            ok = wants_fds(args[0], args[1], out)
        else:
            out["error"] = f"unknown command {what!r}"
            ok = False
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"
        ok = False
    out["ok"] = ok
    out["end_monotonic"] = time.monotonic()
    os.makedirs(OUT, exist_ok=True)
    unit = os.environ.get("LUOD_TEST_UNIT", what)
    with open(f"{OUT}/{unit}.json", "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
