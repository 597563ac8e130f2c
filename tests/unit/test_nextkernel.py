"""luod.nextkernel: loading the next kernel, why a kexec would fail, the jump."""

from __future__ import annotations

import asyncio
import errno
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
import structlog.testing

from luod import errors
from luod.kernel.backend import Backend, LuoError
from luod.kernel.image import RunningLuo
from luod.nextkernel import PID1_KEXEC, LoadedKernel, NextKernel
from testsupport import images
from testsupport.images import GOOD_CMDLINE, fake_bzimage


class StubBackend:
    """The kexec part of a Backend, with failures on request."""

    name = "stub"

    def __init__(self) -> None:
        self.loaded: tuple[str, str | None, str] | None = None
        # What kexec_file_load read: the kernel's and the initrd's bytes.
        self.read: tuple[bytes, bytes | None] | None = None
        self.running = RunningLuo("luo-v5", {"memfd": "memfd-v2"}, "the stub")
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
        self.read = (
            Path(kernel).read_bytes(),
            None if initrd is None else Path(initrd).read_bytes(),
        )

    def running_luo(self) -> RunningLuo:
        return self.running

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
    assert e.value.parameter == "initrd"
    assert e.value.reason.startswith(f"{initrd}: cannot be read (No such file or directory): ")
    assert "--initrd" in e.value.reason
    assert stub.loaded is None


@needs_x86
def test_load_kernel_backend_refusal(stub: StubBackend, image: str) -> None:
    stub.load_error = LuoError("kexec_file_load", errno.EBUSY, image)
    nk = next_kernel(stub, via_pid1=False)
    with pytest.raises(errors.KernelUnusable) as e:
        nk.load_kernel(image, None, GOOD_CMDLINE, False)
    assert e.value.parameter == "kernel"
    assert e.value.reason == f"{image}: {stub.load_error.message}"
    assert nk.loaded is None


@needs_x86
def test_load_and_unload(stub: StubBackend, image: str, tmp_path: Path) -> None:
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"x")
    nk = next_kernel(stub, via_pid1=False)
    loaded = nk.load_kernel(image, str(initrd), GOOD_CMDLINE, False)
    assert isinstance(loaded, LoadedKernel)
    assert (loaded.kernel, loaded.initrd, loaded.cmdline) == (
        image,
        str(initrd),
        GOOD_CMDLINE,
    )
    assert loaded.loaded_at > 0
    assert nk.loaded is loaded
    assert stub.loaded == (image, str(initrd), GOOD_CMDLINE)
    assert loaded.problems == () and nk.problems() == []
    assert loaded.facts is not None and loaded.facts.luo_abi == ("luo-v5",)
    nk.unload_kernel()
    assert nk.loaded is None and stub.loaded is None


@needs_x86
def test_load_kernel_no_cmdline_is_empty(stub: StubBackend, image: str) -> None:
    """An empty command line has neither kho=on nor liveupdate=on: only
    forced."""
    loaded = next_kernel(stub, via_pid1=False).load_kernel(image, None, None, False, force=True)
    assert loaded.cmdline == "" and stub.loaded == (image, None, "")


@needs_x86
def test_load_kernel_reuses_running_cmdline(stub: StubBackend, image: str) -> None:
    with open("/proc/cmdline") as f:
        running = f.read().strip()
    nk = next_kernel(stub, via_pid1=False)
    loaded = nk.load_kernel(image, None, "ignored", True, force=True)
    assert loaded.cmdline == running


# -- the next-kernel preflight -----------------------------------------------------


@needs_x86
@pytest.mark.parametrize(
    ("cmdline", "parameter", "lacks"),
    [
        ("console=ttyS0", "commandLine", ["lacks kho=on", "lacks liveupdate=on"]),
        ("console=ttyS0 kho=on", "commandLine", ["lacks liveupdate=on"]),
        ("liveupdate=on", "commandLine", ["lacks kho=on"]),
        ("kho=on liveupdate=off", "commandLine", ["lacks liveupdate=on (it has liveupdate=off)"]),
        ("kho=off liveupdate=on", "commandLine", ["turns KHO off (kho=off)"]),
        # After "--" the words are init's, not the kernel's.
        ("kho=on -- liveupdate=on", "commandLine", ["lacks liveupdate=on"]),
    ],
)
def test_load_refuses_a_command_line_without_kho_and_luo(
    stub: StubBackend, image: str, cmdline: str, parameter: str, lacks: list[str]
) -> None:
    nk = next_kernel(stub, via_pid1=False)
    with pytest.raises(errors.KernelUnusable) as e:
        nk.load_kernel(image, None, cmdline, False)
    assert e.value.parameter == parameter
    for what in lacks:
        assert f"its command line {what}" in e.value.reason
    assert "force loads it anyway" in e.value.reason
    assert stub.loaded is None and nk.loaded is None


@needs_x86
def test_kho_on_by_default_needs_no_kho_on(stub: StubBackend, tmp_path: Path) -> None:
    """A kernel built with CONFIG_KEXEC_HANDOVER_ENABLE_DEFAULT (its
    embedded config says so) needs only liveupdate=on."""
    config = {"KEXEC_HANDOVER": "y", "KEXEC_HANDOVER_ENABLE_DEFAULT": "y", "LIVEUPDATE": "y"}
    image = str(images.bzimage(tmp_path / "bzImage", config=config))
    loaded = next_kernel(stub, via_pid1=False).load_kernel(image, None, "liveupdate=1", False)
    assert loaded.problems == ()
    config["KEXEC_HANDOVER_ENABLE_DEFAULT"] = "n"
    image = str(images.bzimage(tmp_path / "bzImage", config=config))
    with pytest.raises(errors.KernelUnusable, match="not built with CONFIG_KEXEC_HANDOVER_ENABLE"):
        next_kernel(stub, via_pid1=False).load_kernel(image, None, "liveupdate=1", False)


@needs_x86
@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"luo_abi": None}, "the image has no LUO (built without CONFIG_LIVEUPDATE?)"),
        ({"luo_abi": None, "config": {"LIVEUPDATE": "n"}}, "its config has no CONFIG_LIVEUPDATE"),
        (
            {"luo_abi": "luo-v6"},
            "the image speaks LUO ABI luo-v6, the running kernel writes luo-v5",
        ),
        ({"memfd": None}, "the image has no memfd file handler"),
        ({"memfd": "memfd-v3"}, "the image's memfd file handler is memfd-v3"),
    ],
)
def test_load_refuses_an_image_that_cannot_take_the_handover(
    stub: StubBackend, tmp_path: Path, kwargs: dict[str, Any], says: str
) -> None:
    image = str(images.bzimage(tmp_path / "bzImage", **kwargs))
    nk = next_kernel(stub, via_pid1=False)
    with pytest.raises(errors.KernelUnusable) as e:
        nk.load_kernel(image, None, GOOD_CMDLINE, False)
    assert e.value.parameter == "kernel"
    assert says in e.value.reason
    assert stub.loaded is None


@needs_x86
def test_running_kernel_of_another_abi_refuses_the_image(stub: StubBackend, image: str) -> None:
    stub.running = RunningLuo("luo-v4", {"memfd": "memfd-v1"}, "the stub")
    with pytest.raises(errors.KernelUnusable) as e:
        next_kernel(stub, via_pid1=False).load_kernel(image, None, GOOD_CMDLINE, False)
    assert "the running kernel writes luo-v4 (the stub)" in e.value.reason
    assert "the running kernel's is memfd-v1" in e.value.reason


@needs_x86
def test_running_kernel_unknown_is_a_problem(stub: StubBackend, image: str) -> None:
    stub.running = RunningLuo(None, {}, "nothing known of 9.9.9")
    with pytest.raises(errors.KernelUnusable) as e:
        next_kernel(stub, via_pid1=False).load_kernel(image, None, GOOD_CMDLINE, False)
    assert "cannot tell which LUO ABI the running kernel writes (nothing known of 9.9.9" in (
        e.value.reason
    )


@needs_x86
def test_forced_load_keeps_the_problems_and_logs_what_is_lost(
    stub: StubBackend, tmp_path: Path
) -> None:
    image = str(images.bzimage(tmp_path / "bzImage", luo_abi="luo-v6"))
    nk = NextKernel(cast(Backend, stub), via_pid1=False, session_count=lambda: 3)
    with structlog.testing.capture_logs() as logged:
        loaded = nk.load_kernel(image, None, "console=ttyS0", False, force=True)
    assert stub.loaded == (image, None, "console=ttyS0")
    assert [p.split(" (")[0] for p in loaded.problems] == [
        "its command line lacks kho=on",
        "its command line lacks liveupdate=on",
        "the image speaks LUO ABI luo-v6, the running kernel writes luo-v5",
    ]
    assert nk.problems() == [f"next kernel: {p}" for p in loaded.problems]
    [warning] = [e for e in logged if e["event"] == "kernel-preflight-overridden"]
    assert warning["lost"] == "every session luod holds (3), if kexeced into"
    assert warning["problems"] == "; ".join(loaded.problems)


@needs_x86
def test_unreadable_payload_is_a_problem_force_overrides(stub: StubBackend, tmp_path: Path) -> None:
    path = tmp_path / "bzImage"
    path.write_bytes(images.bzimage_bytes(b"\x00garbage" * 100))
    nk = next_kernel(stub, via_pid1=False)
    with pytest.raises(
        errors.KernelUnusable, match="cannot read the image's LUO: its payload's comp"
    ):
        nk.load_kernel(str(path), None, GOOD_CMDLINE, False)
    assert nk.load_kernel(str(path), None, GOOD_CMDLINE, False, force=True).facts is None


# -- UKIs --------------------------------------------------------------------------


@needs_x86
def test_uki_is_split_and_its_cmdline_and_initrd_used(stub: StubBackend, tmp_path: Path) -> None:
    linux = images.bzimage_bytes(images.compress("gzip", images.vmlinux()))
    uki = images.uki(tmp_path / "uki.efi", linux, initrd=b"INITRD" * 100)
    nk = next_kernel(stub, via_pid1=False)
    loaded = nk.load_kernel(str(uki), None, None, False)
    assert loaded.uki and loaded.cmdline == GOOD_CMDLINE
    assert loaded.initrd == f"{uki}:.initrd"
    assert stub.read == (linux, b"INITRD" * 100)  # the sections' bytes, exactly
    assert stub.loaded is not None and stub.loaded[2] == GOOD_CMDLINE
    assert loaded.facts is not None and loaded.facts.compression == "gzip"


@needs_x86
def test_uki_given_cmdline_and_initrd_win(stub: StubBackend, tmp_path: Path) -> None:
    uki = images.uki(tmp_path / "uki.efi", initrd=b"old", cmdline="console=ttyS0")
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"new")
    nk = next_kernel(stub, via_pid1=False)
    loaded = nk.load_kernel(str(uki), str(initrd), GOOD_CMDLINE + " quiet", False)
    assert (loaded.cmdline, loaded.initrd) == (GOOD_CMDLINE + " quiet", str(initrd))
    assert stub.read is not None and stub.read[1] == b"new"


@needs_x86
def test_uki_with_a_bad_cmdline_is_refused(stub: StubBackend, tmp_path: Path) -> None:
    uki = images.uki(tmp_path / "uki.efi", cmdline="root=/dev/vda quiet")
    with pytest.raises(errors.KernelUnusable) as e:
        next_kernel(stub, via_pid1=False).load_kernel(str(uki), None, None, False)
    assert e.value.parameter == "commandLine" and "lacks liveupdate=on" in e.value.reason


@needs_x86
def test_uki_of_another_abi_is_refused(stub: StubBackend, tmp_path: Path) -> None:
    linux = images.bzimage_bytes(images.compress("xz", images.vmlinux(luo_abi="luo-v5-other")))
    uki = images.uki(tmp_path / "uki.efi", linux)
    with pytest.raises(errors.KernelUnusable, match="speaks LUO ABI luo-v5-other"):
        next_kernel(stub, via_pid1=False).load_kernel(str(uki), None, None, False)


@needs_x86
def test_pe_file_without_linux_section_is_no_kernel(stub: StubBackend, tmp_path: Path) -> None:
    pe = tmp_path / "app.efi"
    pe.write_bytes(images.uki_bytes(b"x" * 600)[:0x400])  # the header only: .linux cut off
    with pytest.raises(errors.KernelUnusable):
        next_kernel(stub, via_pid1=False).load_kernel(str(pe), None, GOOD_CMDLINE, False)


# -- kexec_file_load's errors, named ----------------------------------------------


@needs_x86
@pytest.mark.parametrize(
    ("err", "parameter", "says"),
    [
        (errno.EKEYREJECTED, "kernel", "its signature was rejected: sign it with sbsign"),
        (errno.ENOEXEC, "kernel", "an x86 bzImage for x86_64 is needed"),
        (errno.EINVAL, "commandLine", "COMMAND_LINE_SIZE"),
    ],
)
def test_kexec_file_load_errors_are_named_with_the_fix(
    stub: StubBackend, image: str, err: int, parameter: str, says: str
) -> None:
    stub.load_error = LuoError("kexec_file_load", err, image)
    with pytest.raises(errors.KernelUnusable) as e:
        next_kernel(stub, via_pid1=False).load_kernel(image, None, GOOD_CMDLINE, False)
    assert e.value.parameter == parameter and says in e.value.reason


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
