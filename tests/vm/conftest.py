"""Fixtures of the QEMU tier (marker `vm`): a real LUO kernel, built or taken
from the cache by vm/build-kernel.sh, and a QEMU that can boot it."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from testsupport.vm import qemu

VARIANTS = ("stock", "magic")


@dataclasses.dataclass(frozen=True)
class LuoKernel:
    variant: str
    bzimage: Path


@pytest.fixture(scope="session")
def qemu_ready() -> None:
    """Skip (loudly) only when QEMU cannot run here at all."""
    reason = qemu.qemu_unavailable_reason()
    if reason is not None:
        pytest.skip(f"VM TIER SKIPPED: {reason}")


@pytest.fixture(scope="session", params=VARIANTS)
def luo_kernel(request: pytest.FixtureRequest, qemu_ready: None) -> LuoKernel:
    """A LUO kernel per variant: `stock` Debian 7.3, and `magic` with the
    test-only session pseudo-fs patch. A build failure is a test error, not
    a skip. LUOD_VM_KERNEL_<VARIANT>=path overrides the build."""
    variant: str = request.param
    override = os.environ.get(f"LUOD_VM_KERNEL_{variant.upper()}")
    if override:
        return LuoKernel(variant, Path(override))
    return LuoKernel(variant, qemu.build_kernel(variant))


@pytest.fixture(scope="session")
def stock_kernel(qemu_ready: None) -> Path:
    """Scenarios that do not depend on how a session fd looks run on the
    stock Debian kernel only."""
    override = os.environ.get("LUOD_VM_KERNEL_STOCK")
    return Path(override) if override else qemu.build_kernel("stock")
