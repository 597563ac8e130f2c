"""luod.nextkernel: loading the next kernel, why a kexec would fail, the jump."""

from __future__ import annotations

import asyncio
import errno
import platform
from collections.abc import Callable
from pathlib import Path
from typing import cast

import pytest

from luod import errors
from luod.kernel.backend import Backend, LuoError
from luod.nextkernel import PID1_KEXEC, LoadedKernel, NextKernel
from testsupport.util import fake_bzimage


class StubBackend:
    """The kexec part of a Backend, with failures on request."""

    name = "stub"

    def __init__(self) -> None:
        self.loaded: tuple[str, str | None, str] | None = None
        self.load_error: LuoError | None = None
        self.unload_error: LuoError | None = None
        self.reboot_error: LuoError | None = None
        self.reboots = 0

    def kernel_loaded(self) -> bool:
        return self.loaded is not None

    def load_kernel(self, kernel: str, initrd: str | None, cmdline: str) -> None:
        if self.load_error is not None:
            raise self.load_error
        self.loaded = (kernel, initrd, cmdline)

    def unload_kernel(self) -> None:
        if self.unload_error is not None:
            raise self.unload_error
        self.loaded = None

    def reboot_kexec(self) -> None:
        self.reboots += 1
        if self.reboot_error is not None:
            raise self.reboot_error


@pytest.fixture
def stub() -> StubBackend:
    return StubBackend()


def next_kernel(
    stub: StubBackend,
    *,
    via_pid1: bool,
    pid1_kexec: tuple[str, ...] = PID1_KEXEC,
    on_kexec: Callable[[], None] = lambda: None,
) -> NextKernel:
    return NextKernel(
        cast(Backend, stub), via_pid1=via_pid1, pid1_kexec=pid1_kexec, on_kexec=on_kexec
    )


@pytest.fixture
def image(tmp_path: Path) -> str:
    return str(fake_bzimage(tmp_path / "bzImage"))


needs_x86 = pytest.mark.skipif(
    platform.machine() != "x86_64", reason="the image check of x86_64 (bzImage)"
)


# -- load_kernel -----------------------------------------------------------------


def test_load_kernel_unreadable_image(stub: StubBackend, tmp_path: Path) -> None:
    nk = next_kernel(stub, via_pid1=False)
    with pytest.raises(errors.KernelUnusable) as e:
        nk.load_kernel(str(tmp_path / "absent"), None, None, False)
    assert e.value.parameter == "kernel"
    assert e.value.reason == f"{tmp_path / 'absent'}: cannot open it: No such file or directory"
    assert stub.loaded is None and nk.loaded is None


def test_load_kernel_directory_is_no_image(stub: StubBackend, tmp_path: Path) -> None:
    with pytest.raises(errors.KernelUnusable, match="not a regular file"):
        next_kernel(stub, via_pid1=False).load_kernel(str(tmp_path), None, None, False)


@needs_x86
def test_load_kernel_not_a_bzimage(stub: StubBackend, tmp_path: Path) -> None:
    junk = tmp_path / "vmlinux"
    junk.write_bytes(b"\0" * 4096)
    with pytest.raises(errors.KernelUnusable, match="not an x86 bzImage"):
        next_kernel(stub, via_pid1=False).load_kernel(str(junk), None, None, False)


@needs_x86
def test_load_kernel_bad_initrd(stub: StubBackend, image: str, tmp_path: Path) -> None:
    initrd = str(tmp_path / "no-initrd")
    with pytest.raises(errors.KernelUnusable) as e:
        next_kernel(stub, via_pid1=False).load_kernel(image, initrd, None, False)
    assert (e.value.parameter, e.value.reason) == ("initrd", f"{initrd}: not readable")
    assert stub.loaded is None


@needs_x86
def test_load_kernel_backend_refusal(stub: StubBackend, image: str) -> None:
    stub.load_error = LuoError("kexec_file_load", errno.EPERM, image)
    nk = next_kernel(stub, via_pid1=False)
    with pytest.raises(errors.KernelUnusable) as e:
        nk.load_kernel(image, None, "quiet", False)
    assert e.value.parameter == "kernel"
    assert e.value.reason == f"{image}: {stub.load_error.message}"
    assert nk.loaded is None


@needs_x86
def test_load_and_unload(stub: StubBackend, image: str, tmp_path: Path) -> None:
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"x")
    nk = next_kernel(stub, via_pid1=False)
    loaded = nk.load_kernel(image, str(initrd), "console=ttyS0", False)
    assert isinstance(loaded, LoadedKernel)
    assert (loaded.kernel, loaded.initrd, loaded.cmdline) == (
        image,
        str(initrd),
        "console=ttyS0",
    )
    assert loaded.loaded_at > 0
    assert nk.loaded is loaded
    assert stub.loaded == (image, str(initrd), "console=ttyS0")
    nk.unload_kernel()
    assert nk.loaded is None and stub.loaded is None


@needs_x86
def test_load_kernel_no_cmdline_is_empty(stub: StubBackend, image: str) -> None:
    loaded = next_kernel(stub, via_pid1=False).load_kernel(image, None, None, False)
    assert loaded.cmdline == "" and stub.loaded == (image, None, "")


@needs_x86
def test_load_kernel_reuses_running_cmdline(stub: StubBackend, image: str) -> None:
    with open("/proc/cmdline") as f:
        running = f.read().strip()
    loaded = next_kernel(stub, via_pid1=False).load_kernel(image, None, "ignored", True)
    assert loaded.cmdline == running


def test_unload_refusal_keeps_loaded(stub: StubBackend) -> None:
    stub.unload_error = LuoError("kexec_file_load", errno.EPERM, "unload")
    nk = next_kernel(stub, via_pid1=False)
    nk.loaded = LoadedKernel("k", None, "", 1.0)
    with pytest.raises(errors.KernelUnusable) as e:
        nk.unload_kernel()
    assert (e.value.parameter, e.value.reason) == ("kernel", stub.unload_error.message)
    assert nk.loaded is not None


# -- kexec_blocker ---------------------------------------------------------------


def test_blocker_no_kernel_loaded(stub: StubBackend) -> None:
    blocker = next_kernel(stub, via_pid1=False).kexec_blocker(own_reboot=False)
    assert blocker is not None
    assert blocker.startswith("no kernel is loaded for kexec")
    assert "luoctl load KERNEL" in blocker


def test_blocker_own_reboot_under_fdstore(stub: StubBackend) -> None:
    stub.loaded = ("k", None, "")
    nk = next_kernel(stub, via_pid1=True)
    assert nk.kexec_blocker(own_reboot=False) is None  # an update goes through PID 1
    blocker = nk.kexec_blocker(own_reboot=True)
    assert blocker is not None
    assert "only PID 1 carries" in blocker and "luoctl update" in blocker


def test_no_blocker(stub: StubBackend) -> None:
    stub.loaded = ("k", None, "")
    nk = next_kernel(stub, via_pid1=False)
    assert nk.kexec_blocker(own_reboot=True) is None
    assert nk.kexec_blocker(own_reboot=False) is None


# -- the jump --------------------------------------------------------------------


def test_jump_via_pid1_command_fails(stub: StubBackend) -> None:
    nk = next_kernel(stub, via_pid1=True, pid1_kexec=("sh", "-c", "echo no job >&2; exit 3"))
    with pytest.raises(errors.NotReady) as e:
        asyncio.run(nk.jump())
    assert e.value.reason == "sh -c echo no job >&2; exit 3 failed (3): no job"
    assert stub.reboots == 0


def test_jump_via_pid1_command_missing(stub: StubBackend, tmp_path: Path) -> None:
    missing = str(tmp_path / "systemctl")
    nk = next_kernel(stub, via_pid1=True, pid1_kexec=(missing, "kexec"))
    with pytest.raises(errors.NotReady) as e:
        asyncio.run(nk.jump())
    assert e.value.reason == f"cannot run {missing} kexec: No such file or directory"


def test_jump_via_pid1_accepted(stub: StubBackend) -> None:
    kexeced: list[bool] = []
    nk = next_kernel(
        stub, via_pid1=True, pid1_kexec=("true",), on_kexec=lambda: kexeced.append(True)
    )
    asyncio.run(nk.jump())
    # PID 1 stops luod later; luod itself jumps nowhere.
    assert stub.reboots == 0 and not nk.kexeced and not kexeced


def _jump_and_wait(nk: NextKernel) -> None:
    async def go() -> None:
        await nk.jump()
        await asyncio.sleep(0.3)  # past the delay that lets the reply out

    asyncio.run(go())


def test_jump_own_reboot(stub: StubBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    kexeced: list[bool] = []
    nk = next_kernel(stub, via_pid1=False, on_kexec=lambda: kexeced.append(True))
    _jump_and_wait(nk)
    assert stub.reboots == 1
    assert nk.kexeced and kexeced == [True]


def test_own_reboot_fails(stub: StubBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    stub.reboot_error = LuoError("reboot", errno.EPERM, "LINUX_REBOOT_CMD_KEXEC")
    kexeced: list[bool] = []
    nk = next_kernel(stub, via_pid1=False, on_kexec=lambda: kexeced.append(True))
    _jump_and_wait(nk)
    # luod goes on serving: nothing was handed over.
    assert stub.reboots == 1
    assert not nk.kexeced and not kexeced
