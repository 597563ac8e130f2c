"""The next-kernel preflight over the real socket, on the fake kernel (which
speaks luo-v5 / memfd-v2): LoadKernel, Check, Update and KExec refuse a next
kernel that cannot take the handover, by name; force goes on and the log
says what will be lost; UKIs are split; luoctl status shows the verdict."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

from luod.client import VarlinkError
from testsupport import images
from testsupport.images import GOOD_CMDLINE
from testsupport.luodproc import LuodProcess
from testsupport.util import make_memfd

pytestmark = pytest.mark.skipif(
    platform.machine() != "x86_64", reason="synthetic x86 bzImages and UKIs"
)


def _hold_something(luod: LuodProcess) -> None:
    with luod.client() as c:
        c.preserve_fd("cache", "index", make_memfd(b"precious"), create_session=True)


def test_load_refuses_a_command_line_without_liveupdate(luod: LuodProcess, workdir: Path) -> None:
    image = str(images.bzimage(workdir / "bzImage"))
    with luod.client() as c:
        with pytest.raises(VarlinkError) as e:
            c.load_kernel(image, cmdline="console=ttyS0 kho=on")
        assert e.value.short == "KernelUnusable"
        assert e.value.parameters["parameter"] == "commandLine"
        assert "its command line lacks liveupdate=on" in e.value.parameters["reason"]
        assert c.status()["kernelLoaded"] is False


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"luo_abi": "luo-v5-luod-test"}, "speaks LUO ABI luo-v5-luod-test, the running kernel"),
        ({"luo_abi": None}, "the image has no LUO"),
        ({"memfd": "memfd-v3"}, "memfd file handler is memfd-v3, the running kernel's is memfd-v2"),
    ],
)
def test_load_refuses_an_image_that_cannot_take_the_handover(
    luod: LuodProcess, workdir: Path, kwargs: dict[str, str | None], says: str
) -> None:
    image = str(images.bzimage(workdir / "bzImage", "gzip", **kwargs))  # type: ignore[arg-type]
    with luod.client() as c:
        with pytest.raises(VarlinkError) as e:
            c.load_kernel(image, cmdline=GOOD_CMDLINE)
        assert (e.value.short, e.value.parameters["parameter"]) == ("KernelUnusable", "kernel")
        assert says in e.value.parameters["reason"]
        assert c.status()["kernelLoaded"] is False


def test_forced_load_then_check_update_and_kexec_refuse_then_force_logs(
    luod: LuodProcess, workdir: Path
) -> None:
    _hold_something(luod)
    image = str(images.bzimage(workdir / "bzImage", luo_abi="luo-v5-luod-test"))
    with luod.client() as c:
        loaded = c.load_kernel(image, cmdline="console=ttyS0", force=True)
        assert loaded["luoAbi"] == "luo-v5-luod-test"
        assert [p.split(" (")[0] for p in loaded["problems"]] == [
            "its command line lacks kho=on",
            "its command line lacks liveupdate=on",
            "the image speaks LUO ABI luo-v5-luod-test, the running kernel writes luo-v5",
        ]
        check = c.check()
        assert check["ready"] is False
        reasons = [p["reason"] for p in check["problems"] if p["session"] == ""]
        assert len(reasons) == 3 and all(r.startswith("next kernel: ") for r in reasons)
        for method in (c.update, c.kexec):
            with pytest.raises(VarlinkError) as e:
                method()
            assert e.value.short == "PreflightFailed"
            assert (
                "next kernel: its command line lacks liveupdate=on"
                in (e.value.parameters["reason"])
            )
        assert [s["name"] for s in c.list_sessions()] == ["cache"]
    log = luod.log()
    assert "event=kernel-preflight-overridden" in log
    assert "every session luod holds (1)" in log
    with luod.client() as c:
        c.update(force=True)
    luod.wait_exit()
    log = luod.log()
    assert log.count("event=kernel-preflight-overridden") == 2, log


def test_good_kernel_passes_and_status_says_so(luod: LuodProcess, workdir: Path) -> None:
    _hold_something(luod)
    image = str(images.bzimage(workdir / "bzImage", "bzip2"))
    with luod.client() as c:
        loaded = c.load_kernel(image, cmdline=GOOD_CMDLINE)
        assert loaded["problems"] == [] and loaded["luoAbi"] == "luo-v5"
        assert loaded["version"] == images.VERSION and loaded["uki"] is False
        assert c.check()["ready"] is True
    r = subprocess.run(
        [sys.executable, "-m", "luod.cli", f"--socket={luod.socket}", "status"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "  version 7.3.4-luod-test, LUO ABI luo-v5: the preflight accepts it" in r.stdout


def test_luoctl_load_uki_uses_its_cmdline_and_status_shows_it(
    luod: LuodProcess, workdir: Path
) -> None:
    uki = images.uki(workdir / "linux.efi", initrd=b"initrd" * 50)
    luoctl = [sys.executable, "-m", "luod.cli", f"--socket={luod.socket}"]
    r = subprocess.run([*luoctl, "load", str(uki)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"loaded {uki} (UKI) with kexec_file_load, command line: {GOOD_CMDLINE!r}" in r.stdout
    with luod.client() as c:
        lk = c.status()["loadedKernel"]
        assert (lk["uki"], lk["commandLine"], lk["initrd"]) == (
            True,
            GOOD_CMDLINE,
            f"{uki}:.initrd",
        )
    bad = images.uki(workdir / "bad.efi", cmdline="root=/dev/vda")
    r = subprocess.run([*luoctl, "load", str(bad)], capture_output=True, text=True)
    assert r.returncode != 0
    assert "lacks liveupdate=on" in r.stderr
    r = subprocess.run([*luoctl, "load", str(bad), "--force"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "warning: it cannot take the handover: its command line lacks kho=on" in r.stderr
    r = subprocess.run([*luoctl, "status"], capture_output=True, text=True, check=True)
    assert "LUO ABI luo-v5: it CANNOT take the handover (loaded with force)" in r.stdout
