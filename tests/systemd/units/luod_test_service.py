#!/usr/bin/python3
"""Test-only service program of tests/systemd (installed by vm/build-image.sh
--test-units as /usr/lib/luod-test/luod_test_service.py; run by the
luod-test-*.service units next to it). Runs on the guest's python3 with the
image's luod and testsupport.

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
    luod_test_service.py handback SESSION NAME
        (luod-test-handback.service) If the fd store handed it an fd named
        NAME (LISTEN_FDNAMES, put there by `luoctl handback` in
        ExecStartPre=), describe it: mode "from-store", and luod is not
        called. Otherwise (the first boot) create a memfd of known bytes and
        hand it to luod under SESSION/NAME: mode "pushed-to-luod".

Each writes what it did to /run/luod-test/$LUOD_TEST_UNIT.json and stdout;
exit status 0 on success.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from luod import notify
from luod.kernel.backend import KernelBackend
from testsupport.guest import describe, listen_fds_by_name, seeded_memfd

OUT = "/run/luod-test"
SIZE = 256 * 1024
TOKEN = 1
HANDBACK_SIZE = 512 * 1024
HANDBACK_POSITION = 4096


def from_store(fds: dict[str, int], name: str, out: dict[str, Any]) -> bool:
    """Whether the fd store passed an fd named `name`; describes it if so."""
    if name not in fds:
        return False
    out["mode"] = "from-store"
    out["memfd"] = describe(fds[name])
    return True


def luosession(name: str, out: dict[str, Any]) -> bool:
    fds = listen_fds_by_name()
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
    fd = seeded_memfd(SIZE, f"luosession-{name}", name=f"luosession-{name}")
    be.preserve_fd(sfd, fd, TOKEN)
    out["mode"] = "preserved"
    out["memfd"] = describe(fd)
    return True


def fdstore(name: str, out: dict[str, Any]) -> bool:
    fds = listen_fds_by_name()
    out["listen_fdnames"] = sorted(fds)
    if from_store(fds, name, out):
        return True
    fd = seeded_memfd(SIZE, f"fdstore-{name}", name=f"fdstore-{name}")
    out["mode"] = "pushed"
    out["memfd"] = describe(fd)
    if not notify.notify(f"FDSTORE=1\nFDNAME={name}", [fd]):
        out["error"] = "FDSTORE=1 not sent (no $NOTIFY_SOCKET?)"
        return False
    return notify.barrier(30.0)  # PID 1 has it in the store


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


def handback(session: str, name: str, out: dict[str, Any]) -> bool:
    out.update(session=session, name=name, pid=os.getpid())
    out["listen_fds"] = os.environ.get("LISTEN_FDS")
    out["listen_fdnames"] = os.environ.get("LISTEN_FDNAMES")
    fds = listen_fds_by_name()
    out["names"] = sorted(fds)
    if from_store(fds, name, out):
        return True
    if fds:
        out["error"] = f"fds in the store, but none named {name!r}"
        return False
    from luod.client import connect

    seed = f"{session}/{name}"
    fd = seeded_memfd(HANDBACK_SIZE, seed, position=HANDBACK_POSITION, name=f"handback-{name}")
    out["memfd"] = describe(fd)
    with connect() as c:
        out["preserved"] = c.preserve_fd(session, name, fd, create_session=True)
    out["mode"] = "pushed-to-luod"
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
        elif what == "handback":
            ok = handback(args[0], args[1], out)
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
