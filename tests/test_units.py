"""The systemd units in units/, checked with systemd 262's systemd-analyze.

systemd 262 comes from Debian sid through tools/sid-systemd.sh (see
tests/sidtools.py); these tests skip, saying so, only when the Debian mirror
cannot be reached.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest

from tests import sidtools
from testsupport.fakekernel import FakeBackend
from testsupport.luodproc import LuodProcess, running_luod
from testsupport.systemd.guest import startup

pytestmark = pytest.mark.varlinkctl

# `systemd-analyze security` exposure, 0.0 (best) .. 10.0; luod.service must
# stay at or below this.
MAX_EXPOSURE = 2.0

EXPECTED_UNITS = {"luod.socket", "luod.service", "luod-reclaim.service"}


@pytest.fixture(scope="session")
def sid_bin() -> Path:
    return sidtools.sid_bin_dir_or_skip()


def test_units_present() -> None:
    assert {p.name for p in sidtools.project_units()} >= EXPECTED_UNITS


def test_systemd_analyze_is_262_or_newer(sid_bin: Path) -> None:
    for tool in ("systemd-analyze", "varlinkctl"):
        result = sidtools.run([str(sid_bin / tool), "--version"])
        assert result.returncode == 0, result.output
        major = int(result.output.split()[1])
        assert major >= 262, result.output


SAMPLE_IDL = """\
# A sample interface, to show that varlinkctl runs.
interface io.luod.Sample

type Held (
  name: string,
  token: int
)

method Ping(name: string) -> (reply: string, held: []Held)

error NoSuchThing (name: string)
"""


def test_varlinkctl_validate_idl(sid_bin: Path, tmp_path: Path) -> None:
    good = tmp_path / "io.luod.Sample.varlink"
    good.write_text(SAMPLE_IDL)
    result = sidtools.run([str(sid_bin / "varlinkctl"), "validate-idl", str(good)])
    assert result.returncode == 0, result.output
    assert "interface io.luod.Sample" in result.output
    bad = tmp_path / "bad.varlink"
    bad.write_text(SAMPLE_IDL.replace("[]Held", "[]Unknown"))
    result = sidtools.run([str(sid_bin / "varlinkctl"), "validate-idl", str(bad)])
    assert result.returncode != 0, result.output


def test_verify_is_clean(sid_bin: Path) -> None:
    result = sidtools.verify_units(sidtools.project_units())
    assert result.output == "", result.output
    assert result.returncode == 0, result.output


def test_verify_catches_mistakes(sid_bin: Path, tmp_path: Path) -> None:
    """The harness is not vacuous: a broken unit does produce output."""
    broken = tmp_path / "luod.service"
    text = (sidtools.UNITS_DIR / "luod.service").read_text()
    broken.write_text(text.replace("[Service]\n", "[Service]\nNoSuchSetting=yes\n", 1))
    others = [p for p in sidtools.project_units() if p.name != "luod.service"]
    result = sidtools.verify_units([*others, broken])
    assert "NoSuchSetting" in result.output
    assert result.returncode != 0


def test_verify_needs_exec_binaries(sid_bin: Path, tmp_path: Path) -> None:
    """verify checks ExecStart= binaries under --root: the stubs matter."""
    unit = tmp_path / "luod-missing.service"
    unit.write_text("[Service]\nType=oneshot\nExecStart=/usr/bin/luod\n")
    with sidtools.unit_root([unit]) as root:
        (root / "usr/bin/luod").unlink()
        result = sidtools.run(
            [str(sid_bin / "systemd-analyze"), "verify", f"--root={root}", "--man=no", unit.name]
        )
    assert "/usr/bin/luod" in result.output
    assert result.returncode != 0


@pytest.mark.parametrize("name", ["luod.service"])
def test_security_exposure(sid_bin: Path, name: str) -> None:
    exposure, result = sidtools.security_exposure(sidtools.UNITS_DIR / name)
    print(f"{name}: overall exposure {exposure}")
    assert exposure <= MAX_EXPOSURE, result.output


def test_bench_baseline_runs_in_luods_sandbox(sid_bin: Path, tmp_path: Path) -> None:
    """bench/systemd.py compares luod's start under PID 1 with `import
    asyncio` as a service in luod.service's sandbox (startup.py): that
    service must be as confined as luod, and the plain one not at all."""
    sandbox = startup.sandbox_lines((sidtools.UNITS_DIR / "luod.service").read_text())
    assert not any(
        line.startswith(("ExecStart=", "Type=", "FileDescriptorStore")) for line in sandbox
    )
    exposure = {}
    for kind in ("sandboxed", "plain"):
        unit = tmp_path / f"luod-bench-asyncio-{kind}.service"
        unit.write_text(startup.baseline_unit(kind, sandbox))
        result = sidtools.verify_units([unit])
        assert result.returncode == 0, result.output
        exposure[kind], _ = sidtools.security_exposure(unit)
    luod, _ = sidtools.security_exposure(sidtools.UNITS_DIR / "luod.service")
    assert exposure["sandboxed"] == luod
    assert exposure["plain"] > 5.0


# --- luod-reclaim.service: what it runs ---------------------------------------------


def _reclaim_exec_start() -> list[str]:
    (line,) = [
        line
        for line in (sidtools.UNITS_DIR / "luod-reclaim.service").read_text().splitlines()
        if line.startswith("ExecStart=")
    ]
    # systemd splits and unquotes a command line as a shell does here (no
    # specifiers, variables or escapes in it).
    return shlex.split(line.removeprefix("ExecStart="))


def test_reclaim_unit_starts_no_second_interpreter() -> None:
    """The boot-time reclaim is systemd's varlinkctl calling luod: the only
    Python of the boot is luod's own (issue 12, goal 3)."""
    argv = _reclaim_exec_start()
    assert argv[0] == "/usr/bin/varlinkctl", argv
    assert "io.luod.Manager.Reclaim" in argv and "/run/luod/io.luod" in argv
    assert "--timeout=infinity" in argv  # as luoctl: luod's start may be slow
    assert not [a for a in argv if "luoctl" in a or "python" in a], argv


def _run_reclaim_unit(socket: str, sid_bin: Path) -> subprocess.CompletedProcess[str]:
    """The unit's command as systemd runs it, against `socket`."""
    argv = _reclaim_exec_start()
    argv[0] = str(sid_bin / "varlinkctl")
    argv = [socket if a == "/run/luod/io.luod" else a for a in argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def test_reclaim_unit_succeeds_and_says_what_was_reclaimed(
    sid_bin: Path, luod: LuodProcess
) -> None:
    r = _run_reclaim_unit(luod.socket, sid_bin)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["reclaim"]["state"] == "fresh"
    with luod.client() as c:
        fd = os.memfd_create("x")
        c.preserve_fd("app", "x", fd, create_session=True)
        os.close(fd)
    luod.kexec()
    r = _run_reclaim_unit(luod.socket, sid_bin)
    assert r.returncode == 0, r.stderr
    reclaim = json.loads(r.stdout)["reclaim"]
    assert (reclaim["state"], reclaim["sessions"], reclaim["files"]) == ("reclaimed", 1, 1)


def test_reclaim_unit_fails_as_luoctl_did(sid_bin: Path, workdir: Path, fake_kernel: str) -> None:
    """A failed reclaim (an unusable incoming manifest) fails the unit, as
    `luoctl reclaim` (exit 1) did; so does a luod that cannot be reached."""
    from testsupport import fakekernel as fake

    kernel = FakeBackend(fake_kernel)
    state = kernel.create_session("luod")
    memfd = os.memfd_create("manifest", os.MFD_CLOEXEC)
    os.ftruncate(memfd, 4096)
    os.pwrite(memfd, b"this is not a manifest", 0)
    kernel.preserve_fd(state, memfd, 1)
    fake.kexec(fake_kernel)
    os.close(state)
    os.close(memfd)
    with running_luod(workdir, fake_kernel) as luod:
        r = _run_reclaim_unit(luod.socket, sid_bin)
        assert r.returncode == 1, (r.stdout, r.stderr)
        with luod.client() as c:
            assert c.reclaim()["state"] == "failed"
    r = _run_reclaim_unit(str(workdir / "absent"), sid_bin)
    assert r.returncode != 0
