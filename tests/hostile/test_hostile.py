"""The hostile-input tier: every category of the generator against one
luod, as uid 65534 and as root, and after each the invariants: luod alive,
its fds back to the baseline within a second, its RSS within the bound,
the seeded sessions listed and byte-identical and no other session made,
no InternalServerError, no traceback in its log, no connection left
hanging. The summary table is printed at the end of the run."""

from __future__ import annotations

import os
import re
import socket
import time

import pytest

from tests.hostile.conftest import seed
from tests.hostile.generator import (
    CATEGORIES,
    PROTOCOL,
    generate,
    read_methods,
    wrong_values,
)
from tests.hostile.invariants import ROWS, Row, Target, measure
from tests.hostile.sender import NOBODY, Tally, send_all
from testsupport.util import become

MIN_MESSAGES = 10_000


def test_generator_covers_every_method_and_is_seeded() -> None:
    methods = read_methods()
    served = {
        f"{path.name.removesuffix('.varlink')}.{name}"
        for path in PROTOCOL.glob("*.varlink")
        for name in re.findall(r"^method (\w+)", path.read_text(), re.M)
    }
    assert served <= {m.full for m in methods}
    assert "org.varlink.service.GetInterfaceDescription" in {m.full for m in methods}
    # Every parameter has values of the wrong type to try.
    assert all(wrong_values(t) for m in methods for _p, t in m.parameters)
    counts = {c: len(generate(seed(), c, methods)) for c in CATEGORIES}
    assert sum(counts.values()) >= MIN_MESSAGES, counts
    assert generate(seed(), "names", methods) == generate(seed(), "names", methods)


@pytest.mark.parametrize("category", list(CATEGORIES))
def test_category(target: Target, category: str) -> None:
    messages = generate(seed(), category)
    tally, seconds = send_all(target.luod.socket, messages)
    row = measure(target, Row(category, tally, seconds))
    ROWS[category] = row
    assert tally.sent == len(messages)
    assert not row.failures(), f"seed {seed()}, {category}: " + "; ".join(row.failures())


# --- a connection flood ---------------------------------------------------------------

FLOOD = 300


def _flood(path: str, ready: int, go: int) -> None:
    """As uid 65534: open FLOOD connections that send nothing, hold them
    until told, then let go."""
    become(NOBODY)
    held = []
    for _ in range(FLOOD):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            s.connect(path)
        except OSError:
            s.close()
            continue
        held.append(s)
    os.write(ready, str(len(held)).encode())
    os.read(go, 1)
    for s in held:
        s.close()


def _root_status_seconds(target: Target, n: int = 10) -> float:
    """The slowest of n of root's GetStatus, each on a new connection."""
    worst = 0.0
    for _ in range(n):
        start = time.monotonic()
        with target.luod.client() as c:
            c.status()
        worst = max(worst, time.monotonic() - start)
    return worst


def test_connection_flood(target: Target) -> None:
    """uid 65534 holds FLOOD idle connections; root is still answered, and
    when they go luod is back to its baseline."""
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    go_r, go_w = os.pipe2(os.O_CLOEXEC)
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            _flood(target.luod.socket, ready_w, go_r)
            code = 0
        finally:
            os._exit(code)
    os.close(ready_w)
    os.close(go_r)
    opened = int(os.read(ready_r, 16) or b"0")
    os.close(ready_r)
    try:
        worst = _root_status_seconds(target)
    finally:
        os.write(go_w, b"x")
        os.close(go_w)
        os.waitpid(pid, 0)
    tally = Tally(sent=opened)
    tally.replies["ok"] = 10
    row = measure(target, Row("connection-flood", tally, time.monotonic() - start))
    ROWS["connection-flood"] = row
    assert worst < 2.0, f"root's GetStatus took {worst:.2f}s with {opened} idle connections"
    assert not row.failures(), "; ".join(row.failures())
