#!/usr/bin/python3
"""Guest helper of tests/systemd: memfds for shell scripts.

    memfd.py create [--size N] [--seed S] [--pos P] [--fd 3] --info FILE -- CMD...
        create a memfd of N deterministic bytes (from S), leave its file
        position at P, write what it is to FILE (JSON) and exec CMD with the
        memfd as fd 3 (e.g. `varlinkctl call --push-fd=3 ...`).
    memfd.py describe [--fd 3] --info FILE
        describe an inherited fd (size, position, sha256 of all its bytes,
        /proc link, file system type) into FILE, e.g. under
        `varlinkctl --exec call ... -- memfd.py describe ...`.

Runs on the guest's python3 (sid's 3.14) with the standard library only.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import sys


class _Statfs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 112)]


def fs_type(fd: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    buf = _Statfs()
    if libc.fstatfs(fd, ctypes.byref(buf)) != 0:
        return -1
    return int(buf.f_type) & 0xFFFFFFFF


def describe(fd: int) -> dict[str, object]:
    size = os.fstat(fd).st_size
    digest = hashlib.sha256()
    offset = 0
    while offset < size:
        chunk = os.pread(fd, min(1 << 20, size - offset), offset)
        if not chunk:
            break
        digest.update(chunk)
        offset += len(chunk)
    return {
        "fd": fd,
        "size": size,
        "position": os.lseek(fd, 0, os.SEEK_CUR),
        "sha256": digest.hexdigest(),
        "link": os.readlink(f"/proc/self/fd/{fd}"),
        "fs_type": fs_type(fd),
        "listen_fds": os.environ.get("LISTEN_FDS"),
        "listen_fdnames": os.environ.get("LISTEN_FDNAMES"),
    }


def content(size: int, seed: str) -> bytes:
    out = bytearray()
    block = hashlib.sha256(seed.encode()).digest()
    while len(out) < size:
        block = hashlib.sha256(block).digest()
        out += block * 64
    return bytes(out[:size])


def main() -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("create")
    c.add_argument("--size", type=int, default=1 << 20)
    c.add_argument("--seed", default="luod")
    c.add_argument("--pos", type=int, default=0)
    c.add_argument("--fd", type=int, default=3)
    c.add_argument("--info", required=True)
    c.add_argument("command", nargs=argparse.REMAINDER)
    d = sub.add_parser("describe")
    d.add_argument("--fd", type=int, default=3)
    d.add_argument("--info", required=True)
    args = p.parse_args()

    if args.cmd == "describe":
        facts = describe(args.fd)
        with open(args.info, "w") as f:
            json.dump(facts, f, indent=1)
        print(json.dumps(facts))
        return 0

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("create needs a command after --")
    fd = os.memfd_create("luod-test", os.MFD_CLOEXEC)
    os.write(fd, content(args.size, args.seed))
    os.lseek(fd, args.pos, os.SEEK_SET)
    if fd != args.fd:
        os.dup2(fd, args.fd, inheritable=True)
        os.close(fd)
    else:
        os.set_inheritable(fd, True)
    facts = describe(args.fd)
    with open(args.info, "w") as f:
        json.dump(facts, f, indent=1)
    sys.stdout.flush()
    os.execvp(command[0], command)


if __name__ == "__main__":
    sys.exit(main())
