"""Smoke: one memfd across one kexec on a real LUO kernel, raw kernel layer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from luod.kernel import fdinfo, uapi
from testsupport.vm import qemu

from .conftest import LuoKernel

pytestmark = pytest.mark.vm

GUEST = Path(__file__).with_name("guest_smoke.py")
TIMEOUT = 240.0  # one cycle takes ~20 s under TCG on 2 cores


def test_memfd_survives_kexec(luo_kernel: LuoKernel, tmp_path: Path) -> None:
    result = qemu.run_guest(luo_kernel.bzimage, GUEST, tmp_path / "results", TIMEOUT)
    result.check(final_stage=2)
    s1: dict[str, Any] = result.read_json("smoke-stage-1.json")
    s2: dict[str, Any] = result.read_json("smoke-stage-2.json")
    report = result.report()
    assert "error" not in s1, report
    assert "error" not in s2, report

    release = f"-luod-{luo_kernel.variant}"
    assert s1["kernel_release"].endswith(release), s1["kernel_release"]
    assert s2["kernel_release"].endswith(release), s2["kernel_release"]
    assert s1["device_exists"] and s2["device_exists"]

    # The memfd came back whole: bytes, size, position.
    assert s2["sha256"] == s1["sha256"]
    assert s2["size"] == s1["size"] == 1 << 20
    assert s2["position"] == s1["position"]
    assert s2["finished"] is True
    assert s2["memfd"]["fs_type"] == uapi.TMPFS_MAGIC
    assert s2["memfd"]["kind"] == fdinfo.FdKind.MEMFD.value

    # The session fd, before (outgoing) and after (incoming) the kexec.
    name = s1["session_name"]
    for facts in (s1, s2):
        assert facts["session_name"] == name
        assert facts["identify_session"] == name
        session = facts["session"]
        assert session["kind"] == fdinfo.FdKind.LUO_SESSION.value
        assert session["mode"] & 0o777 == 0o600
        if luo_kernel.variant == "magic":
            assert session["fs_type"] == uapi.LUO_SESSION_MAGIC == 0x4C554F53
            assert session["link"] == f"luo_session:[{name}]"
        else:
            assert session["fs_type"] == uapi.ANON_INODE_FS_MAGIC
            assert session["link"] == f"anon_inode:[luo_session] {name}"
        assert fdinfo.link_session_name(session["link"]) == name
