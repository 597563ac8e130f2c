"""Fixtures of the systemd tier (marker `systemd`): a LUO kernel, the cached
Debian sid root with systemd 262, and one disk image per test run with luod
of this working tree installed from its Debian package, as an operator
installs it (tools/build-deb.sh, vm/build-root.sh, vm/build-image.sh --deb)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Generator, Iterator, Sequence
from pathlib import Path

import pytest

from testsupport.systemd import harness
from testsupport.vm import qemu

# The stage programs of the tests (bash; harness.boot runs one per test).
SCENARIOS = Path(__file__).resolve().parent / "guest"
# Test-only units and their programs, put into every test image
# (build-image.sh --test-units): installed, never enabled by the image.
TEST_UNITS = Path(__file__).resolve().parent / "units"
# Where the results of a failed test are copied (serial log, stage logs,
# journals), besides pytest's own tmp_path.
ARTIFACTS = Path(os.environ.get("LUOD_SYSTEMD_ARTIFACTS", "/tmp/luod-systemd-artifacts"))
# The version of the same tree the upgrade scenario installs over the image's.
UPGRADE_VERSION = "0.1.0+upgrade1"


@dataclasses.dataclass(frozen=True)
class SystemdVM:
    """What a test boots: the image (used with snapshot=on) and its kernel."""

    kernel: Path
    image: Path
    build_seconds: dict[str, float]
    # luod's package built as UPGRADE_VERSION (None with LUOD_SYSTEMD_IMAGE).
    upgrade_deb: Path | None = None

    def boot(
        self, script: Path, results: Path, timeout: float, extra_files: Sequence[Path] = ()
    ) -> harness.GuestResult:
        result = harness.boot(
            self.image, self.kernel, script, results, timeout, extra_files=extra_files
        )
        print(harness.describe(result))
        return result


@pytest.fixture(scope="session")
def systemd_vm(tmp_path_factory: pytest.TempPathFactory) -> SystemdVM:
    """Skips (loudly) only when QEMU cannot run here; a failed kernel, root
    or image build is an error. LUOD_SYSTEMD_KERNEL / LUOD_SYSTEMD_IMAGE
    override the builds. Each of make test's two systemd-tier runs builds
    its own image (the package and the root come from the cache)."""
    reason = qemu.qemu_unavailable_reason()
    if reason is not None:
        pytest.skip(f"SYSTEMD TIER SKIPPED: {reason}")
    seconds: dict[str, float] = {}
    t = time.monotonic()
    kernel_env = os.environ.get("LUOD_SYSTEMD_KERNEL")
    kernel = Path(kernel_env) if kernel_env else qemu.build_kernel("stock")
    seconds["kernel"] = time.monotonic() - t
    image_env = os.environ.get("LUOD_SYSTEMD_IMAGE")
    if image_env:
        return SystemdVM(kernel, Path(image_env), seconds)
    t = time.monotonic()
    root = harness.build_root()
    seconds["root"] = time.monotonic() - t
    t = time.monotonic()
    deb = harness.build_deb(tmp_path_factory.mktemp("deb"))
    upgrade = harness.build_deb(tmp_path_factory.mktemp("deb-upgrade"), UPGRADE_VERSION)
    seconds["deb"] = time.monotonic() - t
    t = time.monotonic()
    image = harness.build_image(
        tmp_path_factory.mktemp("systemd-image") / "root.img",
        kernel,
        root,
        test_units=TEST_UNITS,
        deb=deb,
    )
    seconds["image"] = time.monotonic() - t
    return SystemdVM(kernel, image, seconds, upgrade)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    setattr(item, f"luod_report_{call.when}", report)
    return report


# guest/cycle.sh: one boot, one kexec, one boot, shared by
# test_socket_activation, test_handoff and test_handback.
CYCLE = SCENARIOS / "cycle.sh"
# Two boots of ~20-45 s and one kexec, under TCG on a shared 2-core host.
CYCLE_TIMEOUT = 600.0


def shared_run(
    systemd_vm: SystemdVM,
    tmp_path_factory: pytest.TempPathFactory,
    script: Path,
    timeout: float,
    name: str,
) -> Iterator[harness.GuestResult]:
    """A run several tests read (the body of a fixture): its results are
    kept in ARTIFACTS/`name` whether a test failed or not."""
    results = tmp_path_factory.mktemp(name) / "results"
    result = systemd_vm.boot(script, results, timeout)
    yield result
    keep_artifacts(results, name)


def keep_artifacts(results: Path, name: str) -> Path:
    """Copy a run's results (but the guest's helpers) to ARTIFACTS/`name`."""
    dest = ARTIFACTS / name
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(results, dest, ignore=shutil.ignore_patterns(".guest"))
    return dest


@pytest.fixture(scope="session")
def cycle(
    systemd_vm: SystemdVM, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[harness.GuestResult]:
    """The run of guest/cycle.sh, booted by the first test that asks for it."""
    yield from shared_run(systemd_vm, tmp_path_factory, CYCLE, CYCLE_TIMEOUT, "cycle")


@pytest.fixture
def results(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """The results share of a test's VM; copied to ARTIFACTS if it failed."""
    path = tmp_path / "results"
    yield path
    report = getattr(request.node, "luod_report_call", None)
    if report is not None and report.failed and path.exists():
        dest = keep_artifacts(path, request.node.name)
        print(f"results of the failed run kept in {dest}")
