"""What must hold after every category of hostile input, and the table
the tier prints.

`Target` is a luod on the fake kernel with seeded sessions (root's, memfds
of known content) and its baseline: open fds and RSS after a warm-up.
`measure` checks it after a category; `Row` is one line of the summary.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections import Counter

from luod.client import Client
from tests.hostile.sender import ISE, Tally
from testsupport.luodproc import LuodProcess

# The bound on luod's growth over a whole run: generous for the allocator
# keeping what a 17 MiB message made it take, far below what a leak per
# message (10,000 of them) or a buffered flood would reach.
RSS_BOUND = 64 << 20
# How long luod may take to close what a category left open.
SETTLE = 1.0

SEEDS: dict[str, dict[str, bytes]] = {
    "seed-a": {"small": b"luod hostile tier: small\n", "big": bytes(range(256)) * 4096},
    "seed-b": {"only": b"\x00\xff" * 2048},
}


@dataclasses.dataclass
class Target:
    luod: LuodProcess
    base_fds: int = 0
    base_rss: int = 0
    tracebacks: int = 0
    log_bytes: int = 0
    # As the last category left luod: each category is judged by what it
    # changed, so one leak does not fail every category after it (the
    # table's total says what the whole run left).
    fds_before: int = 0
    sessions_before: set[tuple[int, str]] = dataclasses.field(default_factory=set)

    def rss(self) -> int:
        with open(f"/proc/{self.luod.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def seed(self) -> None:
        """Root's sessions, then one pass over what the checks use (luod
        opens some files lazily), then the baseline."""
        with self.luod.client() as c:
            for session, files in SEEDS.items():
                for name, data in files.items():
                    fd = os.memfd_create(name, os.MFD_CLOEXEC)
                    os.write(fd, data)
                    c.preserve_fd(session, name, fd, create_session=True)
                    os.close(fd)
        self.sessions_before = held(self).sessions
        self.base_fds = self.fds_before = self.luod.fd_count()
        self.base_rss = self.rss()


@dataclasses.dataclass
class Held:
    # (owner uid, name) of every session root sees.
    sessions: set[tuple[int, str]]
    # The seeded files whose bytes came back different (or not at all).
    differing: list[str]


def held(target: Target) -> Held:
    """Every session, as root lists them; each seeded file retrieved (a
    copy) and compared."""
    differing = []
    with Client(target.luod.socket) as c:
        sessions = {(s["owner"]["uid"], s["name"]) for s in c.list_sessions()}
        for session, files in SEEDS.items():
            for name, data in files.items():
                try:
                    fd = c.retrieve_fd(session, name)
                except Exception as e:  # a finding, said in the table
                    differing.append(f"{session}/{name}: {e}")
                    continue
                with os.fdopen(fd, "rb") as f:
                    if os.pread(f.fileno(), len(data) + 1, 0) != data:
                        differing.append(f"{session}/{name}")
    return Held(sessions, differing)


@dataclasses.dataclass
class Row:
    category: str
    tally: Tally
    seconds: float
    alive: bool = True
    fds_over: int = 0
    # Over the baseline taken before the first category.
    fds_total: int = 0
    rss_over: int = 0
    new_tracebacks: int = 0
    log_bytes: int = 0
    extra_sessions: list[str] = dataclasses.field(default_factory=list)
    differing: list[str] = dataclasses.field(default_factory=list)

    @property
    def ise(self) -> int:
        return self.tally.replies[ISE]

    def failures(self) -> list[str]:
        """Each invariant that does not hold, as a sentence."""
        out = []
        if not self.alive:
            out.append("luod is not running")
        if self.fds_over > 0:
            out.append(f"luod holds {self.fds_over} fds more than before, {SETTLE}s after")
        if self.rss_over > RSS_BOUND:
            out.append(f"luod's RSS grew by {self.rss_over >> 20} MiB (bound {RSS_BOUND >> 20})")
        if self.extra_sessions:
            out.append(f"sessions appeared: {self.extra_sessions}")
        if self.differing:
            out.append(f"seeded files differ or are gone: {self.differing}")
        if self.ise:
            out.append(f"{self.ise} InternalServerError replies: {self.tally.examples}")
        if self.new_tracebacks:
            out.append(f"{self.new_tracebacks} tracebacks in luod's log")
        if self.tally.timeouts:
            out.append(f"{self.tally.timeouts} connections neither answered nor closed")
        return out


def measure(target: Target, row: Row) -> Row:
    """Fill in `row` with the invariants, luod as it is now."""
    luod = target.luod
    row.alive = luod.proc is not None and luod.proc.poll() is None
    if not row.alive:
        return row
    deadline = time.monotonic() + SETTLE
    while (fds := luod.fd_count()) > target.fds_before and time.monotonic() < deadline:
        time.sleep(0.02)
    row.fds_over = fds - target.fds_before
    row.fds_total = fds - target.base_fds
    target.fds_before = fds
    h = held(target)
    row.differing = h.differing
    new = h.sessions - target.sessions_before
    row.extra_sessions = sorted(f"{name} (uid {uid})" for uid, name in new)
    row.differing += [f"{s}: not listed" for s in SEEDS if (0, s) not in h.sessions]
    target.sessions_before = h.sessions
    row.rss_over = target.rss() - target.base_rss
    log = luod.log()
    total = log.count("Traceback")
    row.new_tracebacks, target.tracebacks = total - target.tracebacks, total
    row.log_bytes, target.log_bytes = len(log) - target.log_bytes, len(log)
    return row


ROWS: dict[str, Row] = {}


def table(seed: int) -> list[str]:
    """The summary: one line per category, then replies by error name."""
    lines = [
        f"hostile-input tier, seed {seed} (LUOD_HOSTILE_SEED to vary)",
        f"{'category':16} {'msgs':>6} {'root':>5} {'fds sent':>8} {'closed':>6} "
        f"{'timeout':>7} {'ISE':>4} {'fds leaked':>10} {'tracebacks':>10} {'RSS +MiB':>8} "
        f"{'sec':>5} {'log KiB':>7}  ok",
    ]
    total = Tally()
    replies: Counter[str] = Counter()
    for row in ROWS.values():
        t = row.tally
        total.add(t)
        replies.update(t.replies)
        lines.append(
            f"{row.category:16} {t.sent:6} {t.root_sent:5} {t.fds_sent:8} {t.closed:6} "
            f"{t.timeouts:7} {row.ise:4} {max(row.fds_over, 0):10} {row.new_tracebacks:10} "
            f"{row.rss_over / (1 << 20):8.1f} {row.seconds:5.1f} {row.log_bytes >> 10:7}  "
            f"{'yes' if not row.failures() else 'NO'}"
        )
    rows = list(ROWS.values())
    last = rows[-1]
    lines.append(
        f"{'total':16} {total.sent:6} {total.root_sent:5} {total.fds_sent:8} {total.closed:6} "
        f"{total.timeouts:7} {sum(r.ise for r in rows):4} {max(last.fds_total, 0):10} "
        f"{sum(r.new_tracebacks for r in rows):10} {max(r.rss_over for r in rows) / (1 << 20):8.1f} "
        f"{sum(r.seconds for r in rows):5.1f} {sum(r.log_bytes for r in rows) >> 10:7}  "
        f"(RSS bound +{RSS_BOUND >> 20} MiB)"
    )
    lines.append("replies by error name:")
    lines += [f"  {n:8}  {name}" for name, n in replies.most_common()]
    return lines
