#!/usr/bin/python3
"""Guest helper of the systemd tier: memfds for shell scripts.

    memfd.py create [--size N] [--seed S] [--pos P] [--fd 3] --info FILE -- CMD...
        create a memfd of N deterministic bytes (from S), leave its file
        position at P, write what it is to FILE (JSON) and exec CMD with the
        memfd as fd 3 (e.g. `varlinkctl call --push-fd=3 ...`).
    memfd.py describe [--fd 3] --info FILE
        describe an inherited fd (size, position, sha256 of all its bytes,
        /proc link, file system type) into FILE, e.g. under
        `varlinkctl --exec call ... -- memfd.py describe ...`.

Runs on the guest's python3 (sid's 3.14) with the image's luod and
testsupport (vm/build-image.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from testsupport.guest import describe, seeded_memfd


def facts(fd: int) -> dict[str, Any]:
    """describe(fd), with the fd number and what LISTEN_FDS said."""
    return {
        "fd": fd,
        **describe(fd),
        "listen_fds": os.environ.get("LISTEN_FDS"),
        "listen_fdnames": os.environ.get("LISTEN_FDNAMES"),
    }


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
        found = facts(args.fd)
        with open(args.info, "w") as f:
            json.dump(found, f, indent=1)
        print(json.dumps(found))
        return 0

    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("create needs a command after --")
    fd = seeded_memfd(args.size, args.seed, position=args.pos)
    if fd != args.fd:
        os.dup2(fd, args.fd, inheritable=True)
        os.close(fd)
    else:
        os.set_inheritable(fd, True)
    with open(args.info, "w") as f:
        json.dump(facts(args.fd), f, indent=1)
    sys.stdout.flush()
    os.execvp(command[0], command)


if __name__ == "__main__":
    sys.exit(main())
