"""luod.kernel.image: reading a next kernel (bzImage payloads in every
compression, UKIs, the embedded config), its command line, and the running
kernel's LUO values."""

from __future__ import annotations

import builtins
import errno
import importlib
from pathlib import Path
from typing import Any

import pytest

from luod.kernel import image, kexec
from luod.kernel.image import ImageError, RunningLuo
from testsupport import images

STD_COMPRESSIONS = ["gzip", "xz", "lzma", "bzip2", "none"]


def _has(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


# -- bzImages -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "compression",
    [
        *STD_COMPRESSIONS,
        pytest.param(
            "zstd", marks=pytest.mark.skipif(not _has("zstandard"), reason="no zstandard")
        ),
        pytest.param("lz4", marks=pytest.mark.skipif(not _has("lz4.block"), reason="no lz4")),
    ],
)
def test_bzimage_in_each_compression(tmp_path: Path, compression: str) -> None:
    path = images.bzimage(tmp_path / "bzImage", compression)
    facts = image.read_bzimage(image.read_file(str(path)))
    assert facts.compression == compression
    assert facts.version == images.VERSION and facts.release == "7.3.4-luod-test"
    assert facts.luo_abi == ("luo-v5",)
    assert facts.handlers == {"memfd": ("memfd-v2",)}
    assert facts.config is None and facts.option("LIVEUPDATE") is None
    assert image.handover_problems(facts, images.RUNNING_LUO) == []


@pytest.mark.parametrize(("compression", "package"), [("zstd", "zstandard"), ("lz4", "lz4")])
def test_missing_decompressor_is_named(
    monkeypatch: pytest.MonkeyPatch, compression: str, package: str
) -> None:
    """zstd and lz4 need a package the standard library lacks: refused by
    name, with how to get it."""
    real_import = builtins.__import__

    def no_package(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.split(".")[0] == package:
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", lambda n: no_package(n))
    magic = {"zstd": b"\x28\xb5\x2f\xfd", "lz4": b"\x02\x21\x4c\x18"}[compression]
    data = images.bzimage_bytes(magic + b"\0" * 64)
    with pytest.raises(ImageError) as e:
        image.read_bzimage(data)
    assert str(e.value) == (
        f"its payload is {compression}-compressed and the Python package {package!r} that reads "
        f"it is not installed (pip install {package}, or Debian's python3-{package})"
    )


@pytest.mark.parametrize(
    ("kwargs", "problems"),
    [
        ({}, []),
        ({"luo_abi": None}, ["the image has no LUO (built without CONFIG_LIVEUPDATE?): it would"]),
        ({"luo_abi": "luo-v4"}, ["the image speaks LUO ABI luo-v4, the running kernel writes"]),
        ({"luo_abi": "luo-v5-luod-test"}, ["the image speaks LUO ABI luo-v5-luod-test, the"]),
        ({"memfd": None}, ["the image has no memfd file handler (CONFIG_LIVEUPDATE_MEMFD)"]),
        ({"memfd": "memfd-v3"}, ["the image's memfd file handler is memfd-v3, the running"]),
    ],
)
def test_handover_problems(tmp_path: Path, kwargs: dict[str, Any], problems: list[str]) -> None:
    facts = image.read_bzimage(images.bzimage(tmp_path / "k", **kwargs).read_bytes())
    found = image.handover_problems(facts, images.RUNNING_LUO)
    assert len(found) == len(problems)
    for got, want in zip(found, problems, strict=True):
        assert got.startswith(want), got


def test_unknown_running_kernel_is_a_problem(tmp_path: Path) -> None:
    facts = image.read_bzimage(images.bzimage(tmp_path / "k").read_bytes())
    found = image.handover_problems(facts, RunningLuo(None, {}, "nothing known of 9.9"))
    assert found[0].startswith("cannot tell which LUO ABI the running kernel writes (nothing")
    assert found[1].startswith("cannot tell the running kernel's memfd file handler")


def test_embedded_config(tmp_path: Path) -> None:
    config = {"LIVEUPDATE": "y", "KEXEC_HANDOVER_ENABLE_DEFAULT": "y", "LOCALVERSION": '""'}
    facts = image.read_bzimage(images.bzimage(tmp_path / "k", config=config).read_bytes())
    assert facts.config == config
    assert facts.option("KEXEC_HANDOVER_ENABLE_DEFAULT") is True
    assert facts.option("LIVEUPDATE_MEMFD") is False


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"\0" * 4096, "not an x86 bzImage"),
        (images.bzimage_bytes(b"junk" * 10), "its payload's compression is unknown"),
        (images.bzimage_bytes(images.compress("xz", b"x" * 1000)[:40]), "cut short"),
        (images.bzimage_bytes(b"\xfd7zXZ\x00" + b"\xff" * 64), "does not decompress"),
        (images.bzimage_bytes(images.compress("bzip2", b"x" * 1000)[:30]), "cut short"),
        (images.bzimage_bytes(images.compress("gzip", b"x" * 100000)[:60]), "cut short"),
    ],
    ids=["zeros", "unknown-payload", "xz-cut", "xz-garbage", "bzip2-cut", "gzip-cut"],
)
def test_unreadable_images(data: bytes, says: str) -> None:
    with pytest.raises(ImageError, match=says):
        image.read_bzimage(data)


def test_payload_past_the_end() -> None:
    data = images.bzimage_bytes(images.compress("xz", images.vmlinux()))
    with pytest.raises(ImageError, match="past the end"):
        image.read_bzimage(data[:2048])


def test_read_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="cannot open it: No such file"):
        image.read_file(str(tmp_path / "absent"))


# -- UKIs ------------------------------------------------------------------------------


def test_split_uki() -> None:
    linux = images.bzimage_bytes(images.compress("xz", images.vmlinux()))
    data = images.uki_bytes(linux, b"initrd", "root=/dev/vda kho=on liveupdate=on\n", "7.3.4")
    uki = image.split_uki(data)
    assert uki is not None
    assert (uki.linux, uki.initrd) == (linux, b"initrd")
    assert (uki.cmdline, uki.uname) == ("root=/dev/vda kho=on liveupdate=on", "7.3.4")
    assert image.read_bzimage(uki.linux).luo_abi == ("luo-v5",)


def test_split_uki_without_initrd_and_cmdline() -> None:
    uki = image.split_uki(images.uki_bytes(b"L" * 1000))
    assert uki is not None and (uki.initrd, uki.cmdline, uki.uname) == (None, None, None)


def test_bzimage_and_other_files_are_no_uki(tmp_path: Path) -> None:
    assert image.split_uki(images.bzimage(tmp_path / "k").read_bytes()) is None
    assert image.split_uki(b"MZ" + b"\0" * 100) is None  # no PE signature
    pe_without_linux = images.uki_bytes(b"L").replace(b".linux\0\0", b".other\0\0")
    assert image.split_uki(pe_without_linux) is None


def test_uki_with_a_section_past_the_end() -> None:
    data = images.uki_bytes(b"L" * 5000)
    with pytest.raises(ImageError, match=r"its PE section \.linux reaches past the end"):
        image.split_uki(data[:-1024])


# -- the command line -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "means"),
    [
        ("on", True),
        ("1", True),
        ("y", True),
        ("Yes", True),
        ("true", True),
        ("enable", True),
        ("off", False),
        ("0", False),
        ("no", False),
        ("disable", False),
        ("", None),
        (None, None),
        ("o", None),
        ("maybe", None),
    ],
)
def test_kstrtobool_as_the_kernel(value: str | None, means: bool | None) -> None:
    assert image.kstrtobool(value) is means


def test_parse_cmdline() -> None:
    got = image.parse_cmdline('a=1 b "c=x y" kho=off kho=on BOOT_IMAGE=/v -- liveupdate=on')
    assert got == {"a": "1", "b": None, "c": "x y", "kho": "on", "BOOT-IMAGE": "/v"}


@pytest.mark.parametrize(
    ("cmdline", "problems"),
    [
        ("kho=on liveupdate=on", []),
        ("kho=1 liveupdate=y quiet", []),
        ("liveupdate=on", ["its command line lacks kho=on (the image has no embedded config"]),
        ("kho=on", ["its command line lacks liveupdate=on"]),
        ("kho=on liveupdate", ["its command line lacks liveupdate=on (a bare liveupdate does"]),
        ("kho=off liveupdate=on", ["its command line turns KHO off (kho=off): use kho=on"]),
        ("kho=on liveupdate=on liveupdate=off", ["its command line lacks liveupdate=on (it has"]),
        ("", ["its command line lacks kho=on", "its command line lacks liveupdate=on"]),
    ],
)
def test_cmdline_problems(cmdline: str, problems: list[str]) -> None:
    found = image.cmdline_problems(cmdline, None)
    assert len(found) == len(problems), found
    for got, want in zip(found, problems, strict=True):
        assert got.startswith(want), got


# -- the running kernel ---------------------------------------------------------------


def _proc_version(tmp_path: Path, release: str) -> str:
    p = tmp_path / "version"
    p.write_text(f"Linux version {release} (luod@luod-vm) (gcc 12.2.0) #1 SMP PREEMPT\n")
    return str(p)


def test_running_luo_from_debugfs_and_the_table(tmp_path: Path) -> None:
    """7.3 under the VM: debugfs has the LUO state (its ABI string first,
    NUL-padded), the memfd handler only luod's table knows."""
    debugfs = tmp_path / "LUO"
    debugfs.write_bytes(b"luo-v5-luod-test\0" + b"\0" * 7 + b"\x01" * 24)
    got = image.running_luo(str(debugfs), _proc_version(tmp_path, "7.3.4-x"), lambda r: [])
    assert got == RunningLuo(
        "luo-v5-luod-test",
        {"memfd": "memfd-v2"},
        f"LUO ABI from {debugfs}; file handlers from luod's table for 7.3",
    )


def test_running_luo_from_its_own_image(tmp_path: Path) -> None:
    """The running kernel's image is used only when its version is the one
    /proc/version has."""
    version = _proc_version(tmp_path, "7.3.4-luod-test")
    mine = images.bzimage(tmp_path / "vmlinuz", memfd="memfd-v9", luo_abi="luo-v9")
    got = image.running_luo(str(tmp_path / "none"), version, lambda r: [str(mine)])
    assert (got.luo_abi, got.handlers) == ("luo-v9", {"memfd": "memfd-v9"})
    assert got.source == f"LUO ABI from {mine}; file handlers from {mine}"
    other = images.bzimage(tmp_path / "other", luo_abi="luo-v9", version="7.3.5 (x) #2")
    got = image.running_luo(str(tmp_path / "none"), version, lambda r: [str(other)])
    assert got.luo_abi == "luo-v5" and "luod's table for 7.3" in got.source


def test_running_luo_unknown(tmp_path: Path) -> None:
    got = image.running_luo(str(tmp_path / "none"), _proc_version(tmp_path, "9.1.0"), lambda r: [])
    assert got == RunningLuo(None, {}, "nothing known of 9.1.0")


# -- kexec_file_load's errors ---------------------------------------------------------


@pytest.mark.parametrize(
    ("err", "lockdown", "initrd", "parameter", "says"),
    [
        (errno.EPERM, "integrity", None, "kernel", "locked down (integrity) and loads only images"),
        (errno.EPERM, None, None, "kernel", "needs CAP_SYS_BOOT, and sysctl kernel.kexec_load_d"),
        (errno.EKEYREJECTED, None, None, "kernel", "its signature was rejected: sign it with sb"),
        (errno.ENODATA, None, None, "kernel", "it is not signed: sign it"),
        (errno.ENOKEY, None, None, "kernel", "signed with a key the kernel does not know"),
        (errno.ENOEXEC, None, None, "kernel", "an x86 bzImage for x86_64 is needed"),
        (errno.ENOENT, None, "/i", "initrd", "/i: cannot be read (No such file or directory): gi"),
        (errno.EINVAL, None, None, "commandLine", "COMMAND_LINE_SIZE, 2048 bytes on x86"),
        (errno.EBUSY, None, None, "kernel", "generic"),
    ],
)
def test_kexec_errors_named_with_the_fix(
    err: int, lockdown: str | None, initrd: str | None, parameter: str, says: str
) -> None:
    got = kexec.explain(
        err, "generic", initrd=initrd, machine="x86_64", lockdown_mode=lockdown or None
    )
    assert got[0] == parameter and says in got[1], got


def test_lockdown_mode(tmp_path: Path) -> None:
    p = tmp_path / "lockdown"
    p.write_text("none [integrity] confidentiality\n")
    assert kexec.lockdown(str(p)) == "integrity"
    p.write_text("[none] integrity confidentiality\n")
    assert kexec.lockdown(str(p)) is None
    assert kexec.lockdown(str(tmp_path / "absent")) is None
