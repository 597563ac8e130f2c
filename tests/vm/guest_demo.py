"""Guest side of `make demo` (host side: tests/vm/demo.py).

Two programs in one module:

    python -m tests.vm.guest_demo
        the stage program init runs: starts luod, runs the service, and
        plays the operator (luoctl list/check, then `luoctl kexec`).
    python -m tests.vm.guest_demo service fill|restore --socket PATH
        the service, a separate process. `fill` builds a cache in a memfd
        (a 4 KiB header naming the payload's sha256, then the payload),
        hands it to luod over varlink and exits. `restore`, after the
        kexec, gets the memfd back from luod by name and verifies it.

Every step is a timeline.mark() the host stamps and prints as it happens.
Nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import platform
import random
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from luod.client import Client
from testsupport.luodproc import LuodProcess
from testsupport.vm import guestlib
from testsupport.vm.timeline import mark

WORK = Path("/run/luod-demo")
SESSION = "demo-cache"
NAME = "cache"
MAGIC = b"LUOD-DEMO-CACHE\n"
HEADER = 4096
DEFAULT_MIB = 64


def boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


# --- the service ----------------------------------------------------------------


def sha256_of(view: memoryview | bytes) -> str:
    return hashlib.sha256(view).hexdigest()


def service_fill(sock: str, mib: int) -> int:
    mark("service-started")
    size = mib << 20
    t0 = time.monotonic()
    fd = os.memfd_create("demo-cache", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    with mmap.mmap(fd, size) as m:
        # The "cache": deterministic pseudo-random records, so a wrong page
        # anywhere changes the hash.
        payload = random.Random(int.from_bytes(os.urandom(8))).randbytes(size - HEADER)
        m[HEADER:] = payload
        t1 = time.monotonic()
        digest = sha256_of(payload)
        del payload
        t2 = time.monotonic()
        header = {
            "format": 1,
            "service": "demo-cache",
            "payload_bytes": size - HEADER,
            "payload_sha256": digest,
            "filled_in_boot": boot_id(),
            "filled_by_kernel": platform.release(),
        }
        raw = MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n"
        m[: len(raw)] = raw
    mark(
        "service-filled",
        bytes=size,
        sha256=digest,
        fill_seconds=t1 - t0,
        hash_seconds=t2 - t1,
        boot_id=header["filled_in_boot"],
    )
    t3 = time.monotonic()
    with Client(sock) as c:
        info = c.preserve_fd(SESSION, NAME, fd, create_session=True)
    t4 = time.monotonic()
    os.close(fd)  # luod holds it now; this process goes away
    mark("service-handed-off", handoff_seconds=t4 - t3, file=info)
    return 0


def service_restore(sock: str, expect_sha256: str, expect_bytes: int) -> int:
    mark("service-started")
    t0 = time.monotonic()
    with Client(sock) as c:
        fd = c.retrieve_fd(SESSION, NAME)  # a copy: luod keeps custody
    t1 = time.monotonic()
    st = os.fstat(fd)
    mark("service-has-data", retrieve_seconds=t1 - t0, bytes=st.st_size)
    problems: list[str] = []
    with mmap.mmap(fd, st.st_size, prot=mmap.PROT_READ) as m:
        view = memoryview(m)
        try:
            t2 = time.monotonic()
            raw = bytes(view[:HEADER])
            header: dict[str, Any] = {}
            if not raw.startswith(MAGIC):
                problems.append(f"no {MAGIC!r} header: {raw[:32]!r}")
            else:
                header = json.loads(raw[len(MAGIC) :].split(b"\n", 1)[0])
            digest = sha256_of(view[HEADER:])
            t3 = time.monotonic()
        finally:
            view.release()
    os.close(fd)
    if st.st_size != expect_bytes:
        problems.append(f"size {st.st_size}, expected {expect_bytes}")
    if header and digest != header.get("payload_sha256"):
        problems.append(f"payload sha256 {digest} != header's {header.get('payload_sha256')}")
    if digest != expect_sha256:
        problems.append(f"payload sha256 {digest} != {expect_sha256} (before the kexec)")
    now_boot = boot_id()
    if header.get("filled_in_boot") == now_boot:
        problems.append("the boot id did not change: this is not a new kernel")
    mark(
        "service-verified",
        ok=not problems,
        problems=problems,
        sha256=digest,
        header=header,
        boot_id=now_boot,
        kernel=platform.release(),
        hash_seconds=t3 - t2,
    )
    return 0 if not problems else 1


# --- the stage program ----------------------------------------------------------


def run_luoctl(luod: LuodProcess, *args: str) -> str:
    r = subprocess.run(
        [*guestlib.luoctl(luod.socket), *args], capture_output=True, text=True, check=False
    )
    return (r.stdout + r.stderr).rstrip()


def run_service(*args: str) -> None:
    mark("service-starting", argv=list(args))
    r = subprocess.run([sys.executable, "-m", "tests.vm.guest_demo", "service", *args], check=False)
    if r.returncode != 0:
        raise RuntimeError(f"the service ({' '.join(args)}) exited with {r.returncode}")


def start_luod() -> LuodProcess:
    WORK.mkdir(parents=True, exist_ok=True)
    luod = LuodProcess(WORK, [], ["--grace=10min"])
    mark("luod-starting")
    luod.start()  # returns on READY=1
    mark("luod-ready", pid=luod.pid)
    return luod


def stage1(mib: int) -> None:
    mark("boot", kernel=platform.release(), python=platform.python_version(), boot_id=boot_id())
    luod = start_luod()
    with luod.client() as c:
        mark("luod-status", status=c.status())
    run_service("fill", f"--socket={luod.socket}", f"--mib={mib}")
    mark(
        "operator-before",
        list=run_luoctl(luod, "list"),
        check=run_luoctl(luod, "check"),
    )
    guestlib.keep_log(luod)
    argv = guestlib.luoctl_kexec_argv(luod.socket)
    mark("kexec-requested", argv=argv)
    r = guestlib.run_luoctl_kexec(argv)
    guestlib.keep_log(luod)
    raise RuntimeError(f"still here after luoctl kexec (exit {r.returncode}): {r.stdout}{r.stderr}")


def stage2() -> None:
    mark("boot", kernel=platform.release(), boot_id=boot_id())
    before = json.loads((guestlib.results_dir() / "events" / "1-service-filled.json").read_text())
    luod = start_luod()
    try:
        run_service(
            "restore",
            f"--socket={luod.socket}",
            f"--expect-sha256={before['sha256']}",
            f"--expect-bytes={before['bytes']}",
        )
        with luod.client() as c:
            status = c.status()
        mark(
            "operator-after",
            status=status,
            luoctl_status=run_luoctl(luod, "status"),
            list=run_luoctl(luod, "list"),
        )
    finally:
        guestlib.keep_log(luod)
        luod.stop()


def main() -> int:
    p = argparse.ArgumentParser(prog="guest_demo")
    sub = p.add_subparsers(dest="role")
    svc = sub.add_parser("service")
    svc.add_argument("action", choices=("fill", "restore"))
    svc.add_argument("--socket", required=True)
    svc.add_argument("--mib", type=int, default=DEFAULT_MIB)
    svc.add_argument("--expect-sha256", default="")
    svc.add_argument("--expect-bytes", type=int, default=0)
    args = p.parse_args()
    try:
        if args.role == "service":
            if args.action == "fill":
                return service_fill(args.socket, args.mib)
            return service_restore(args.socket, args.expect_sha256, args.expect_bytes)
        n = guestlib.stage()
        if n == 1:
            stage1(int(os.environ.get("LUOD_DEMO_MIB", DEFAULT_MIB)))
        elif n == 2:
            stage2()
        else:
            raise RuntimeError(f"no stage {n} in the demo")
        return 0
    except BaseException as e:
        traceback.print_exc()
        role = "service" if args.role == "service" else "stage"
        mark(f"{role}-failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
