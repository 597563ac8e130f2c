"""Quotas: how much of luod's custody one uid may hold.

luod's socket is open to every local user, and everything a user hands off
is held by luod: a session and every file is an fd of luod's, every byte is
memory the kernel pins until the kexec. So each uid other than root has a
pool of its own (sessions, files, bytes pinned) that no other uid's use
touches, and root has a pool of its own, unlimited unless luod's options
say otherwise. What came over a kexec is carried whatever the quotas say;
only new custody is refused (`QuotaExceeded`, which changes nothing).

Counted are what luod holds for the uid: its sessions of every kind, and
the files and bytes of its managed sessions. What a client preserves
itself into an adopted or delegated session is pinned by the kernel on
the client's own behalf and not seen by luod (nor counted).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable

from luod import errors
from luod.model import Holdings
from luod.record import record

_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_SHIFT = {"": 0, "B": 0, "K": 10, "M": 20, "G": 30, "T": 40}


@record(frozen=True)
class Limits:
    """What one uid may hold at most; 0: no limit."""

    sessions: int = 0
    files: int = 0
    bytes: int = 0


# Enough for a normal service (a VMM with a few dozen guests' memory, a
# cache of thousands of files), small enough that one uid cannot take luod's
# fds (LimitNOFILE=131072) or the host's memory from the others.
USER_DEFAULTS = Limits(sessions=64, files=4096, bytes=1 << 30)
ROOT_DEFAULTS = Limits()


@record(frozen=True)
class Quotas:
    """What each unprivileged uid may hold, and what root may."""

    user: Limits = USER_DEFAULTS
    root: Limits = ROOT_DEFAULTS

    def of(self, uid: int) -> Limits:
        return self.root if uid == 0 else self.user

    def check(
        self,
        uid: int,
        holdings: Callable[[int], Holdings],
        sessions: int = 0,
        files: int = 0,
        size: int = 0,
    ) -> None:
        """Refuse (QuotaExceeded) if `uid`, holding `holdings(uid)`, may not
        take on that much more. Without limits nothing is counted."""
        limits = self.of(uid)
        if not (limits.sessions or limits.files or limits.bytes):
            return
        held = holdings(uid)
        for resource, limit, now, more in (
            ("sessions", limits.sessions, held.sessions, sessions),
            ("files", limits.files, held.files, files),
            ("bytes", limits.bytes, held.bytes_pinned, size),
        ):
            if more and limit and now + more > limit:
                raise errors.QuotaExceeded(resource, limit)


def parse_size(text: str) -> int:
    """'1G', '512MiB', '4096', '0' → bytes (binary units)."""
    m = _SIZE.match(text)
    if m is None:
        raise argparse.ArgumentTypeError(f"'{text}' is not a size (try 1G, 512M, 4096)")
    unit = (m.group(2) or "").upper()[:1]
    return int(m.group(1)) << _SHIFT[unit]


def count(text: str) -> int:
    """A limit: a number >= 0 (0: no limit)."""
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"'{text}' is not a count (a number >= 0; 0: no limit)")
    return n


def add_options(p: argparse.ArgumentParser) -> None:
    """luod's quota options."""
    g = p.add_argument_group(
        "quotas",
        "What each uid may hold in luod's custody (0: no limit). Every uid but root has "
        "a pool of its own; root has another. A call that would go over is refused with "
        "QuotaExceeded and changes nothing.",
    )
    u, r = USER_DEFAULTS, ROOT_DEFAULTS
    for what, conv, user, root, text in (
        ("sessions", count, u.sessions, r.sessions, "sessions"),
        ("files", count, u.files, r.files, "files in managed sessions"),
        ("bytes", parse_size, u.bytes, r.bytes, "bytes pinned (memfd sizes; 1G, 512M)"),
    ):
        g.add_argument(
            f"--max-{what}-per-user",
            type=conv,
            default=user,
            metavar="N",
            help=f"{text} per non-root uid (default: {_said(what, user)})",
        )
        g.add_argument(
            f"--max-{what}-root",
            type=conv,
            default=root,
            metavar="N",
            help=f"{text} for root (default: {_said(what, root)})",
        )


def _said(what: str, n: int) -> str:
    if not n:
        return "no limit"
    if what == "bytes" and n % (1 << 20) == 0:
        return f"{n >> 30}G" if n % (1 << 30) == 0 else f"{n >> 20}M"
    return str(n)


def from_options(args: argparse.Namespace) -> Quotas:
    return Quotas(
        user=Limits(args.max_sessions_per_user, args.max_files_per_user, args.max_bytes_per_user),
        root=Limits(args.max_sessions_root, args.max_files_root, args.max_bytes_root),
    )
