"""The next-kernel preflight on real kernels (guest side: guest_nextkernel.py):
a kernel of another LUO ABI and a command line without liveupdate=on are
refused before anything is lost; forced, the loss is real; the unforced
kexec into a good kernel (a UKI made from the project's kernel) carries
everything byte-identical."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from luod.kernel import image
from testsupport.images import RUNNING_LUO
from testsupport.vm import qemu

pytestmark = pytest.mark.vm

GUEST = Path(__file__).with_name("guest_nextkernel.py")


@pytest.fixture(scope="session")
def kernels(qemu_ready: None) -> tuple[Path, Path]:
    """The stock kernel and the `abi` variant (LUO_ABI_COMPATIBLE changed,
    vm/build-kernel.sh abi), each built once and cached."""
    stock = os.environ.get("LUOD_VM_KERNEL_STOCK")
    abi = os.environ.get("LUOD_VM_KERNEL_ABI")
    return (
        Path(stock) if stock else qemu.build_kernel("stock"),
        Path(abi) if abi else qemu.build_kernel("abi"),
    )


def test_the_project_kernels_read_as_built(kernels: tuple[Path, Path]) -> None:
    """luod.kernel.image on the real thing: the project's LUO kernels
    (vm/build-kernel.sh, xz), as `luoctl load` reads a next kernel. Here
    rather than in the fast tier, which runs before the kernels are built
    (a clean clone's CI would skip it)."""
    stock_path, abi_path = kernels
    stock = image.read_bzimage(image.read_file(str(stock_path)))
    assert (stock.compression, stock.luo_abi) == ("xz", ("luo-v5",))
    assert stock.handlers == {"memfd": ("memfd-v2",)}
    assert stock.option("LIVEUPDATE") is True
    assert stock.option("KEXEC_HANDOVER_ENABLE_DEFAULT") is False
    assert stock.release is not None and stock.release.endswith("-luod-stock")
    assert image.handover_problems(stock, RUNNING_LUO) == []
    abi = image.read_bzimage(image.read_file(str(abi_path)))
    assert abi.luo_abi == ("luo-v5-luod-test",)
    [problem] = image.handover_problems(abi, RUNNING_LUO)
    assert problem.startswith("the image speaks LUO ABI luo-v5-luod-test, the running")


def _run(
    kernels: tuple[Path, Path], scenario: str, results: Path, timeout: float
) -> tuple[qemu.GuestResult, list[dict[str, Any]]]:
    stock, abi = kernels
    result = qemu.run_guest(
        stock,
        GUEST,
        results,
        timeout,
        guest_env={"LUOD_VM_SCENARIO": scenario, "LUOD_VM_KERNEL_ABI": str(abi.resolve())},
    )
    out = []
    for n in sorted(result.stages):
        path = results / f"nextkernel-{scenario}-{n}.json"
        if not path.exists():
            break
        data: dict[str, Any] = result.read_json(path.name)
        assert "error" not in data, (
            f"stage {n}: {data.get('traceback')}\n{data.get('luod_logs', '')}\n{result.report()}"
        )
        out.append(data)
    return result, out


def test_refused_before_anything_is_lost_forced_loses_retry_carries(
    kernels: tuple[Path, Path], tmp_path: Path
) -> None:
    result, stages = _run(kernels, "preflight", tmp_path / "results", 1200.0)
    result.check(final_stage=4)
    s1, s2, s3, s4 = stages

    # The running kernel's values, read at run time in the guest.
    assert s1["running"]["luo_abi"] == "luo-v5"
    assert s1["running"]["source"].startswith("LUO ABI from /sys/kernel/debug/kho/out/sub_fdts/LUO")

    # Refused, by name, before anything changed.
    abi = s1["refused_abi"]
    assert abi["rc"] != 0
    assert "speaks LUO ABI luo-v5-luod-test, the running kernel writes luo-v5" in abi["stderr"]
    bad = s1["refused_cmdline"]
    assert bad["rc"] != 0
    assert "its command line lacks liveupdate=on (it has liveupdate=off)" in bad["stderr"]
    assert s1["status_after_refusals"]["kernelLoaded"] is False
    assert s1["check_after_refusals"]["ready"] is True
    assert s1["after_refusals"] == s1["expected"]

    # A UKI of the project's kernel: its .cmdline used, accepted.
    assert s1["uki_load"]["rc"] == 0, s1["uki_load"]
    assert "(UKI) with kexec_file_load" in s1["uki_load"]["stdout"]
    assert "LUO ABI luo-v5: the preflight accepts it" in s1["uki_status"]["stdout"]

    # The unforced kexec into the good kernel carried everything.
    assert "luod.test_stage=2" in s2["cmdline"] and "liveupdate=on" in s2["cmdline"]
    rec = s2["status"]["reclaim"]
    assert (rec["state"], rec["sessions"], rec["files"], rec["lost"]) == ("reclaimed", 1, 2, [])
    assert s2["got"] == s1["expected"]
    assert s2["refused_again"]["rc"] != 0
    assert s2["forced_load"]["rc"] == 0, s2["forced_load"]
    assert (
        "warning: it cannot take the handover: its command line lacks liveupdate=on"
        in (s2["forced_load"]["stderr"])
    )
    assert s2["check_forced"]["ready"] is False
    assert [p["reason"] for p in s2["check_forced"]["problems"]] == [
        "next kernel: its command line lacks liveupdate=on (it has liveupdate=off)"
    ]

    # Forced: the next kernel has no LUO to read with, and what it could
    # not read is gone for good.
    assert "liveupdate=off" in s3["cmdline"] and s3["dev_liveupdate"] is False
    assert s4["sessions"] == []
    assert s4["status"]["sessions"] == 0
    log = (tmp_path / "results" / "luod-stage-2.log").read_text()
    assert "kernel-preflight-overridden" in log


def test_forced_into_another_abi_the_next_kernel_panics(
    kernels: tuple[Path, Path], tmp_path: Path
) -> None:
    """What the check saves us from: 7.3 panics at boot on LUO state of
    another ABI (luo_restore_fail() is panic()). Here the struct's size
    check fails first ("LUO state is too small": the longer ABI string
    makes the compatible field longer), before the string compare."""
    result, stages = _run(kernels, "abi", tmp_path / "results", 600.0)
    (s1,) = stages
    assert s1["refused"]["rc"] != 0
    assert "speaks LUO ABI luo-v5-luod-test" in s1["refused"]["stderr"]
    assert 2 not in result.stage_uptime
    serial = result.serial_text()
    assert "luo: LUO state is " in serial, result.report()
    assert "Kernel panic - not syncing: The incoming tree failed to initialize properly" in serial
