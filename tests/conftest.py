from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from testsupport.fakekernel import FakeBackend, running_fake_kernel
from testsupport.fakepid1 import FakePid1
from testsupport.luodproc import LuodProcess, running_luod


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A directory other users can reach (tests drop to uid 65534)."""
    d = Path(tempfile.mkdtemp(prefix="luod-test-"))
    d.chmod(0o755)
    yield d
    for p in sorted(d.rglob("*"), reverse=True):
        if p.is_dir():
            p.rmdir()
        else:
            p.unlink()
    d.rmdir()


@pytest.fixture
def fake_kernel(workdir: Path) -> Iterator[str]:
    with running_fake_kernel(workdir) as path:
        os.chmod(path, 0o666)
        yield path


@pytest.fixture
def kernel(fake_kernel: str) -> FakeBackend:
    return FakeBackend(fake_kernel)


@pytest.fixture
def luod(workdir: Path, fake_kernel: str) -> Iterator[LuodProcess]:
    with running_luod(workdir, fake_kernel) as p:
        yield p


@pytest.fixture
def pid1(workdir: Path, fake_kernel: str) -> Iterator[FakePid1]:
    """luod's service manager with an fd store (testsupport.fakepid1: the
    fd-store carrier); luod's logs are printed after the test, the last 200
    lines of them, and all of them go to $LUOD_TEST_LOGS when it is set."""
    manager = FakePid1(workdir, fake_kernel)
    try:
        yield manager
    finally:
        manager.close()
        logs = manager.all_logs()
        if os.environ.get("LUOD_TEST_LOGS"):
            Path(os.environ["LUOD_TEST_LOGS"]).write_text(logs)
        print(f"--- luod logs ({workdir}), last 200 lines ---")
        print("\n".join(logs.splitlines()[-200:]))
