"""The hostile-input tier's luod (one for the whole tier, on the fake
kernel, with seeded sessions) and the summary table it prints."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hostile.invariants import ROWS, Target, table
from testsupport.fakekernel import running_fake_kernel
from testsupport.luodproc import running_luod

DEFAULT_SEED = 20261129


def seed() -> int:
    """The generator's seed: fixed, unless LUOD_HOSTILE_SEED says otherwise."""
    return int(os.environ.get("LUOD_HOSTILE_SEED", DEFAULT_SEED))


@pytest.fixture(scope="package")
def target() -> Iterator[Target]:
    with tempfile.TemporaryDirectory(prefix="luod-hostile-") as d:
        workdir = Path(d)
        # uid 65534 must reach the socket.
        workdir.chmod(0o755)
        with running_fake_kernel(workdir) as fake_kernel:
            os.chmod(fake_kernel, 0o666)
            with running_luod(workdir, fake_kernel) as luod:
                t = Target(luod)
                t.seed()
                yield t


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if ROWS:
        for line in table(seed()):
            terminalreporter.write_line(line)
