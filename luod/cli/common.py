"""What every luoctl command shares: reaching luod, refusing with an exit
status, and printing numbers, times, tables and JSON the same way.

Exit statuses: 0 success, 1 luod refused (the error is printed), 2 usage,
3 luod is not reachable (luod.cli.main maps exceptions to them).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from typing import Any

from luod.client import Client


class CliError(Exception):
    """luoctl gives up: `message` is printed, `code` is the exit status."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def connect(args: argparse.Namespace) -> Client:
    try:
        return Client(args.socket)
    except OSError as e:
        raise CliError(3, f"cannot reach luod at {args.socket}: {e.strerror or e}") from None


def inherited_fd(fd: int) -> int:
    """`fd` (--fd N), or a usage error if luoctl did not inherit it open:
    else sendmsg() fails with EBADF, and a traceback says so."""
    try:
        os.fstat(fd)
    except OSError:
        raise CliError(2, f"--fd {fd}: not an open file descriptor") from None
    return fd


def format_time(usec: int | None) -> str:
    if usec is None:
        return "-"
    return datetime.datetime.fromtimestamp(usec / 1e6).strftime("%Y-%m-%d %H:%M:%S")


def format_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *rows]
    )


def print_json(obj: Any) -> None:
    # One write: json.dump() writes token by token, which on an unbuffered
    # stdout (PYTHONUNBUFFERED=1) is a syscall per token: minutes for a
    # list of thousands of files written to a 9p share under TCG.
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")
