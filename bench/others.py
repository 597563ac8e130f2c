"""Cost independent of others: one call's cost while other owners hold 10
sessions, and while they hold many (issue 12, goal 6: <= 1.2x).

Runs on the host against luod on the fake kernel, fd-store carrier under
testsupport.fakepid1 as under systemd. uid 65534 fills luod with sessions
of one memfd each; then root hands off one memfd into a session of its own
and takes it back, CALLS times. What is compared is luod's own CPU time per
call (/proc/PID/schedstat, nanoseconds): the fake kernel and the fake PID 1
are Python processes whose own bookkeeping grows with what they hold (a
real kernel's xarray and systemd's fd store do not), so their time is
printed apart, as the wall time per call. The verdict is a row of
bench.run's goals table (bench/report.py's format): the ratio, its target,
met or missed.

    .venv/bin/python -m bench.others [N_OTHERS [CALLS]]

N_OTHERS defaults to 5,000, not the issue's 10,000: the fake kernel keeps
two fds per session (its end of the session fd, the memfd), luod and the
fake PID 1 two each too, and this host caps RLIMIT_NOFILE at 20,000.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

from luod.client import Client
from testsupport.fakekernel import running_fake_kernel
from testsupport.fakepid1 import FakePid1
from testsupport.util import make_memfd, run_as

from .report import GOALS_HEADER, OTHERS_TARGET, goal_row

NOBODY = 65534
UNLIMITED = [
    *(f"--max-{what}-per-user=0" for what in ("sessions", "files", "bytes")),
    # Above what the others hold, not 0 (no cap): its check is part of a call.
    "--max-held=1000000",
]


def _cpu_ns(pid: int) -> int:
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0])


def _fill(socket_path: str, n: int) -> None:
    """uid 65534's sessions, one memfd each."""

    def work() -> None:
        with Client(socket_path) as c:
            for i in range(n):
                c.preserve_fd(f"o{i}", "f", make_memfd(b"o"), create_session=True)

    run_as(NOBODY, work)


def _measure(workdir: Path, n_others: int, calls: int) -> tuple[float, float]:
    """luod's CPU seconds per PreserveFd + RetrieveFd(take) by root, and the
    wall seconds per call."""
    for sub in ("k", "p"):
        (workdir / f"{sub}{n_others}").mkdir()
    with running_fake_kernel(workdir / f"k{n_others}") as fake:
        pid1 = FakePid1(workdir / f"p{n_others}", fake, store_max=None)
        os.chmod(pid1.luod.socket, 0o666)  # as luod.socket is: access is per call
        try:
            pid1.start(*UNLIMITED)
            _fill(pid1.luod.socket, n_others)
            with Client(pid1.luod.socket) as c:
                c.preserve_fd("mine", "keep", make_memfd(b"k"), create_session=True)
                cpu0, t0 = _cpu_ns(pid1.pid), time.perf_counter()
                for _ in range(calls):
                    fd = make_memfd(b"x")
                    c.preserve_fd("mine", "x", fd)
                    os.close(c.retrieve_fd("mine", "x", take=True))
                    os.close(fd)
                wall = (time.perf_counter() - t0) / calls
                cpu = (_cpu_ns(pid1.pid) - cpu0) / 1e9 / calls
            return cpu, wall
        finally:
            pid1.close()


def main(argv: list[str]) -> int:
    n_big = int(argv[0]) if argv else 5_000
    calls = int(argv[1]) if len(argv) > 1 else 300
    with tempfile.TemporaryDirectory(prefix="luod-bench-others-") as d:
        os.chmod(d, 0o755)  # uid 65534 connects to luod's socket in it
        small = _measure(Path(d), 10, calls)
        big = _measure(Path(d), n_big, calls)
    for n, (cpu, wall) in ((10, small), (n_big, big)):
        print(
            f"root's hand-off + take, others holding {n:,} sessions: luod CPU "
            f"{cpu * 1000:.2f} ms per call (wall {wall * 1000:.2f} ms, with the fakes')"
        )
    # A row of bench.run's goals table (issue 12, goal 6).
    print()
    print("\n".join(GOALS_HEADER))
    print(
        goal_row(
            "6",
            f"root's PreserveFd + RetrieveFd(take), others holding {n_big:,} sessions vs 10 "
            f"(luod's CPU per call, mean of {calls})",
            f"{big[0] * 1000:.2f} ms",
            f"{small[0] * 1000:.2f} ms (10 sessions)",
            big[0] / small[0],
            OTHERS_TARGET,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
