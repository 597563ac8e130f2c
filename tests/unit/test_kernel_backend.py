"""luod.kernel.backend and luod.kernel.kexec: errnos turned into LuoError
with the operation and subject a user reads, and the image check."""

from __future__ import annotations

import errno
import os
import platform
from pathlib import Path

import pytest

from luod.kernel import backend, kexec, uapi
from luod.kernel.backend import MISSING_LUO, KernelBackend, LuoError
from testsupport.images import fake_bzimage


def test_luo_error_message_and_subject() -> None:
    e = LuoError("create_session", errno.EEXIST, "db")
    assert (e.op, e.errno, e.subject) == ("create_session", errno.EEXIST, "db")
    assert e.message == uapi.describe("create_session", errno.EEXIST)
    assert str(e) == f"db: {e.message}"
    assert str(LuoError("finish_session", errno.EBUSY)) == uapi.describe(
        "finish_session", errno.EBUSY
    )


def test_unknown_errno_still_says_what_failed() -> None:
    assert uapi.describe("retrieve_fd", errno.EXDEV) == "retrieve_fd failed: EXDEV (18)"


def test_missing_device(tmp_path: Path) -> None:
    kb = KernelBackend(device=str(tmp_path / "liveupdate"), busy_timeout=0.0)
    assert kb.unavailable_reason() == MISSING_LUO
    with pytest.raises(LuoError) as e:
        kb.create_session("s")
    assert (e.value.op, e.value.errno, e.value.subject) == (
        "open",
        errno.ENOENT,
        str(tmp_path / "liveupdate"),
    )


def test_ioctl_on_a_closed_fd_is_ebadf() -> None:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    kb = KernelBackend()
    with pytest.raises(LuoError) as e:
        kb.preserve_fd(r, w, 7)
    assert (e.value.op, e.value.errno, e.value.subject) == ("preserve_fd", errno.EBADF, "token 7")
    with pytest.raises(LuoError) as e:
        kb.finish_session(r)
    assert (e.value.op, e.value.errno) == ("finish_session", errno.EBADF)


def _failing(err: int, subject: str | None) -> object:
    def fail(*args: object) -> None:
        raise OSError(err, os.strerror(err), subject)

    return fail


def test_kexec_errors_become_luo_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    kb = KernelBackend()
    monkeypatch.setattr(kexec, "load", _failing(errno.ENOEXEC, "/boot/vmlinuz"))
    with pytest.raises(LuoError) as e:
        kb.load_kernel("/boot/vmlinuz", None, "")
    assert (e.value.op, e.value.errno, e.value.subject) == (
        "kexec_file_load",
        errno.ENOEXEC,
        "/boot/vmlinuz",
    )
    monkeypatch.setattr(kexec, "unload", _failing(errno.EPERM, "unload"))
    with pytest.raises(LuoError) as e:
        kb.unload_kernel()
    assert (e.value.op, e.value.errno, e.value.subject) == (
        "kexec_file_load",
        errno.EPERM,
        "unload",
    )
    monkeypatch.setattr(kexec, "reboot_kexec", _failing(errno.EPERM, "LINUX_REBOOT_CMD_KEXEC"))
    with pytest.raises(LuoError) as e:
        kb.reboot_kexec()
    assert (e.value.op, e.value.subject) == ("reboot", "LINUX_REBOOT_CMD_KEXEC")


def test_kexec_error_without_subject_names_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kexec, "load", _failing(errno.ENOMEM, None))
    with pytest.raises(LuoError) as e:
        KernelBackend().load_kernel("/k", None, "")
    assert e.value.subject == "/k"


def test_unsupported_architecture(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform, "machine", lambda: "m68k")
    with pytest.raises(LuoError) as e:
        KernelBackend().unload_kernel()
    assert (e.value.op, e.value.errno, e.value.subject) == (
        "kexec_file_load",
        errno.ENOSYS,
        "architecture m68k",
    )


def test_boot_id(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "boot_id"
    path.write_text("0123-abcd\n")
    monkeypatch.setattr(backend, "BOOT_ID_PATH", str(path))
    assert KernelBackend().boot_id() == "0123-abcd"
    path.unlink()
    with pytest.raises(OSError):
        KernelBackend().boot_id()


@pytest.mark.parametrize(
    ("machine", "head", "problem"),
    [
        ("x86_64", None, None),
        ("x86_64", b"\0" * 0x240, "not an x86 bzImage"),
        ("aarch64", b"\0" * 0x38 + b"ARM\x64" + b"\0" * 0x200, None),
        ("aarch64", b"\0" * 0x240, "not an arm64 Image"),
        ("riscv64", b"\0" * 0x240, None),  # not checked there
    ],
)
def test_image_problem(
    tmp_path: Path, machine: str, head: bytes | None, problem: str | None
) -> None:
    path = tmp_path / "image"
    if head is None:
        fake_bzimage(path)
    else:
        path.write_bytes(head)
    found = kexec.image_problem(str(path), machine)
    if problem is None:
        assert found is None
    else:
        assert found is not None and found.startswith(problem)


def test_image_problem_unreadable(tmp_path: Path) -> None:
    assert kexec.image_problem(str(tmp_path / "absent"), "x86_64") == (
        "cannot open it: No such file or directory"
    )
    assert kexec.image_problem(str(tmp_path), "x86_64") == "not a regular file"
