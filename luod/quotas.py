"""Quotas: how much of luod's custody one uid may hold.

luod's socket is open to every local user, and everything a user hands off
is held by luod: a session and every file is an fd of luod's, every byte is
memory the kernel pins until the kexec. So each uid other than root has a
pool of its own (sessions, files, bytes pinned) that no other uid's use
touches, and root has a pool of its own, unlimited unless luod's options
say otherwise. Every uid together, root included, holds at most a share of
luod's open-file limit, of which a reserve only root may use, so that many
uids at their quotas cannot fill luod's fd table (`CustodyFull`); and every
uid but root together pins at most a share of the machine's memory (the
kernel allocates every page of a memfd luod preserves, holes included, and
charges them to luod), so that many uids at their bytes quota cannot take
the memory root's hand-off needs. What came over a kexec is carried
whatever the quotas say; only new custody is refused (`QuotaExceeded`,
`CustodyFull`, which change nothing).

Counted are what luod holds for the uid: its sessions of every kind, and
the files and bytes of its managed sessions. What a client preserves
itself into an adopted or delegated session is pinned by the kernel on
the client's own behalf and not seen by luod (nor counted).
"""

from __future__ import annotations

import argparse
import os
import re
import resource
from typing import Protocol

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
# fds (LimitNOFILE=262144) or the host's memory from the others.
USER_DEFAULTS = Limits(sessions=64, files=4096, bytes=1 << 30)
ROOT_DEFAULTS = Limits()


def default_max_held(nofile: int) -> int:
    """Half of the open-file limit: connections take at most a quarter of
    it, fds in transit another (luod.varlink.limits)."""
    return nofile // 2


def default_max_bytes_all_users() -> int:
    """A quarter of the machine's memory: the rest is root's, for guest
    RAM it hands off, and for the next kernel to boot in beside everything
    preserved."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4


class Held(Protocol):
    """What the quotas count: what luod holds (luod.ledger.Ledger)."""

    def holdings(self, uid: int | None = None) -> Holdings: ...

    def held_fds(self) -> int: ...

    def users_bytes(self) -> int: ...


@record(frozen=True)
class Quotas:
    """What each unprivileged uid may hold, and what root may; and what
    all of them together may (sessions and files: each is an fd of luod's)."""

    user: Limits = USER_DEFAULTS
    root: Limits = ROOT_DEFAULTS
    # Sessions and files luod holds for every uid together; 0: no cap.
    # Without it 64 uids at their files quota would fill LimitNOFILE=.
    max_held: int = 0
    # Of max_held, how many only root may hold: an eighth.
    held_reserved_for_root: int = 0
    # Bytes pinned by every uid but root together; 0: no cap. Root's are
    # not counted: they are bounded by root's own quota only.
    max_bytes_all_users: int = 0

    def of(self, uid: int) -> Limits:
        return self.root if uid == 0 else self.user

    def check(self, uid: int, held: Held, sessions: int = 0, files: int = 0, size: int = 0) -> None:
        """Refuse (QuotaExceeded, CustodyFull) if `uid` may not take on that
        much more, given what luod `held`. Without limits nothing is
        counted."""
        limits = self.of(uid)
        if limits.sessions or limits.files or limits.bytes:
            own = held.holdings(uid)
            for what, limit, now, more in (
                ("sessions", limits.sessions, own.sessions, sessions),
                ("files", limits.files, own.files, files),
                ("bytes", limits.bytes, own.bytes_pinned, size),
            ):
                if more and limit and now + more > limit:
                    raise errors.QuotaExceeded(what, limit)
        if self.max_held and (sessions or files):
            cap = self.max_held - (0 if uid == 0 else self.held_reserved_for_root)
            if held.held_fds() + sessions + files > cap:
                raise errors.CustodyFull("sessions and files of all users", cap, "--max-held")
        cap = self.max_bytes_all_users
        if cap and size and uid != 0 and held.users_bytes() + size > cap:
            raise errors.CustodyFull(
                "bytes pinned for all users but root", cap, "--max-bytes-all-users"
            )


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
        "QuotaExceeded (CustodyFull for the caps on many uids together) and changes nothing.",
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
    g.add_argument(
        "--max-held",
        type=count,
        default=None,
        metavar="N",
        help=(
            "sessions and files held for all uids together, an eighth of them for root "
            "alone; each is an fd of luod's (default: half the open-file limit)"
        ),
    )
    g.add_argument(
        "--max-bytes-all-users",
        type=parse_size,
        default=None,
        metavar="N",
        help=(
            "bytes pinned by every uid but root together; the kernel allocates every page "
            "of a memfd luod preserves, charged to luod (default: a quarter of the "
            "machine's memory)"
        ),
    )


def _said(what: str, n: int) -> str:
    if not n:
        return "no limit"
    if what == "bytes" and n % (1 << 20) == 0:
        return f"{n >> 30}G" if n % (1 << 30) == 0 else f"{n >> 20}M"
    return str(n)


def from_options(args: argparse.Namespace) -> Quotas:
    """The quotas luod's options give; after luod raised its open-file
    limit, of which the cap on everything held is a share by default."""
    max_held = args.max_held
    if max_held is None:
        max_held = default_max_held(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    max_bytes = args.max_bytes_all_users
    if max_bytes is None:
        max_bytes = default_max_bytes_all_users()
    return Quotas(
        user=Limits(args.max_sessions_per_user, args.max_files_per_user, args.max_bytes_per_user),
        root=Limits(args.max_sessions_root, args.max_files_root, args.max_bytes_root),
        max_held=max_held,
        held_reserved_for_root=max_held // 8,
        max_bytes_all_users=max_bytes,
    )
