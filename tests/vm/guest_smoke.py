"""Guest side of the smoke scenario: one memfd across one kexec, through the
raw kernel layer (luod.kernel.backend.KernelBackend).

Stage 1: create a session, preserve a memfd holding 1 MiB of random bytes
(file position moved off 0), record everything, kexec.
Stage 2: retrieve the session and the memfd, measure them, finish the
session, record everything, return (init powers off).

Results: smoke-stage-1.json, smoke-stage-2.json. Assertions live in pytest
(test_smoke.py); this program only fails on errors it cannot record.
"""

from __future__ import annotations

import hashlib
import os
import platform
import traceback
from typing import Any

from luod.kernel import fdinfo
from luod.kernel.backend import KernelBackend
from testsupport.util import memfd_facts
from testsupport.vm import guestlib

SESSION = "luod-vm-smoke"
TOKEN = 0x5EED_0001
SIZE = 1 << 20
POSITION = 123_457


def fd_facts(fd: int) -> dict[str, Any]:
    facts = fdinfo.inspect_fd(fd)
    return {
        "kind": facts.kind.value,
        "fs_type": facts.fs_type,
        "link": facts.link,
        "mode": facts.mode,
        "size": facts.size,
    }


def common() -> dict[str, Any]:
    return {
        "stage": guestlib.stage(),
        "kernel_release": platform.release(),
        "uptime_start": guestlib.uptime(),
        "device_exists": os.path.exists("/dev/liveupdate"),
    }


def stage1(be: KernelBackend, out: dict[str, Any]) -> None:
    session = be.create_session(SESSION)
    out["session"] = fd_facts(session)
    out["session_name"] = be.session_name(session)
    out["identify_session"] = be.identify_session(session)

    data = os.urandom(SIZE)
    memfd = os.memfd_create("luod-smoke", os.MFD_CLOEXEC)
    os.write(memfd, data)
    os.lseek(memfd, POSITION, os.SEEK_SET)
    be.preserve_fd(session, memfd, TOKEN)
    out["memfd"] = fd_facts(memfd)
    out["sha256"] = hashlib.sha256(data).hexdigest()
    out["size"] = SIZE
    out["position"] = POSITION
    out["token"] = TOKEN
    out["uptime_kexec"] = guestlib.uptime()
    guestlib.write_json("smoke-stage-1.json", out)
    # The session and memfd fds stay open: closing them would unpreserve.
    guestlib.kexec_next_stage()


def stage2(be: KernelBackend, out: dict[str, Any]) -> None:
    session = be.retrieve_session(SESSION)
    out["session"] = fd_facts(session)
    out["session_name"] = be.session_name(session)
    out["identify_session"] = be.identify_session(session)
    fd = be.retrieve_fd(session, TOKEN)
    st = os.fstat(fd)
    out["memfd"] = fd_facts(fd)
    out["size"] = st.st_size
    out["position"] = os.lseek(fd, 0, os.SEEK_CUR)
    out["sha256"] = memfd_facts(fd).sha256
    be.finish_session(session)
    out["finished"] = True
    out["uptime_end"] = guestlib.uptime()


def main() -> int:
    be = KernelBackend()
    n = guestlib.stage()
    out = common()
    out["unavailable_reason"] = be.unavailable_reason()
    try:
        if n == 1:
            stage1(be, out)  # kexecs on success
        elif n == 2:
            stage2(be, out)
        else:
            out["error"] = f"unexpected stage {n}"
    except BaseException as e:
        out["error"] = f"{type(e).__name__}: {e}"
        out["traceback"] = traceback.format_exc()
        print(out["traceback"])
    guestlib.write_json(f"smoke-stage-{n}.json", out)
    return 1 if "error" in out else 0


if __name__ == "__main__":
    raise SystemExit(main())
