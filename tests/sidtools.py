"""systemd 262's varlinkctl and systemd-analyze for tests on an older host.

tools/sid-systemd.sh fetches them from Debian sid into the cache (once; later
runs only print the path).  Tests use them through this module:

    from tests import sidtools

    @pytest.fixture(scope="session")
    def sid_bin() -> Path:
        return sidtools.sid_bin_dir_or_skip()

    def test_idl(sid_bin: Path) -> None:
        subprocess.run([sid_bin / "varlinkctl", "validate-idl", path], check=True)

`sid_bin_dir_or_skip()` skips (with the reason in the -ra summary) only when
the Debian mirror cannot be reached; any other failure of the fetch is an
error.  LUOD_REQUIRE_SID_TOOLS=1 turns that skip into a failure too.

`verify_units()` and `security_exposure()` run systemd-analyze against a
throw-away root (--root=) that holds systemd 262's own units, the units under
test, and executable stubs for their Exec*= binaries: the host's
/lib/systemd/system is systemd 252's and its noise is not ours, and
/usr/bin/luod, /usr/bin/luoctl do not exist on a development host.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SID_SYSTEMD = REPO / "tools" / "sid-systemd.sh"
UNITS_DIR = REPO / "units"

# tools/sid-systemd.sh: exit status when the Debian mirror cannot be reached.
EX_UNREACHABLE = 75

_EXEC_KEYS = re.compile(
    r"^\s*(ExecStart|ExecStartPre|ExecStartPost|ExecReload|ExecStop|ExecStopPost"
    r"|ExecCondition)\s*=\s*(.*)$"
)


class SidToolsUnavailable(RuntimeError):
    """The Debian mirror cannot be reached, so the tools cannot be fetched."""


def sid_bin_dir() -> Path:
    """The folder with the `varlinkctl` and `systemd-analyze` wrappers.

    Runs tools/sid-systemd.sh (a no-op once cached) once per process.  Raises
    SidToolsUnavailable if the mirror is unreachable, RuntimeError on any
    other failure (the same one again on later calls).
    """
    result = _fetch()
    if isinstance(result, Exception):
        raise result
    return result


@functools.cache
def _fetch() -> Path | Exception:
    try:
        return _run_sid_systemd()
    except RuntimeError as e:
        return e


def _run_sid_systemd() -> Path:
    proc = subprocess.run(
        [str(SID_SYSTEMD)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
    if proc.returncode == EX_UNREACHABLE:
        last = tail.splitlines()[-1] if tail else "Debian mirror unreachable"
        raise SidToolsUnavailable(f"{SID_SYSTEMD.name}: {last}")
    if proc.returncode != 0:
        raise RuntimeError(f"{SID_SYSTEMD.name} failed with status {proc.returncode}:\n{tail}")
    lines = proc.stdout.strip().splitlines()
    if not lines:
        raise RuntimeError(f"{SID_SYSTEMD.name} printed no bin folder:\n{tail}")
    bindir = Path(lines[-1])
    for tool in ("varlinkctl", "systemd-analyze"):
        if not os.access(bindir / tool, os.X_OK):
            raise RuntimeError(f"{SID_SYSTEMD.name}: {bindir / tool} is missing")
    return bindir


def sid_bin_dir_or_skip() -> Path:
    """sid_bin_dir() for tests: skip loudly if the mirror is unreachable."""
    try:
        return sid_bin_dir()
    except SidToolsUnavailable as e:
        reason = f"SKIPPED FOR LACK OF NETWORK, NOT TESTED: systemd 262 tools not fetchable: {e}"
        if os.environ.get("LUOD_REQUIRE_SID_TOOLS") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


def varlinkctl() -> Path:
    return sid_bin_dir() / "varlinkctl"


def systemd_analyze() -> Path:
    return sid_bin_dir() / "systemd-analyze"


def sid_root() -> Path:
    """The unpacked sid root behind the wrappers."""
    return sid_bin_dir().parent / "root"


def exec_binaries(unit: Path) -> set[str]:
    """Absolute paths of the programs a unit's Exec*= lines start."""
    found: set[str] = set()
    for line in unit.read_text().splitlines():
        m = _EXEC_KEYS.match(line)
        if not m or not m.group(2):
            continue
        # Drop the special prefixes (-, @, :, +, !, |) of systemd.service(5).
        program = m.group(2).split()[0].lstrip("-@:+!|")
        if program.startswith("/"):
            found.add(program)
    return found


@contextmanager
def unit_root(units: Iterable[Path]) -> Iterator[Path]:
    """A temporary --root= for systemd-analyze holding `units`.

    It has systemd 262's own unit folder (sockets.target, sysinit.target, ...),
    the units under test installed where a package puts them
    (/usr/lib/systemd/system), and an executable stub for each program they
    start.
    """
    with tempfile.TemporaryDirectory(prefix="luod-units-") as tmp:
        root = Path(tmp)
        unitdir = root / "usr/lib/systemd/system"
        shutil.copytree(sid_root() / "usr/lib/systemd/system", unitdir, symlinks=True)
        for unit in units:
            shutil.copy2(unit, unitdir / unit.name)
            for program in exec_binaries(unit):
                stub = root / program.lstrip("/")
                stub.parent.mkdir(parents=True, exist_ok=True)
                stub.write_text("#!/bin/sh\nexit 0\n")
                stub.chmod(0o755)
        (root / "etc/systemd/system").mkdir(parents=True)
        yield root


@dataclass(frozen=True)
class Result:
    returncode: int
    output: str  # stdout and stderr together


def run(args: list[str]) -> Result:
    proc = subprocess.run(
        args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        check=False,
        env={**os.environ, "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0", "SYSTEMD_LOG_COLOR": "0"},
    )
    return Result(proc.returncode, proc.stdout)


def verify_units(units: Iterable[Path]) -> Result:
    """`systemd-analyze verify` of `units` together, in a throw-away root.

    --recursive-errors=yes: a warning about a unit or any of its dependencies
    makes the exit status non-zero.  --man=no: no man pages to look up.
    """
    units = list(units)
    with unit_root(units) as root:
        return run(
            [
                str(systemd_analyze()),
                "verify",
                f"--root={root}",
                "--man=no",
                "--recursive-errors=yes",
                *(u.name for u in units),
            ]
        )


_EXPOSURE = re.compile(r"Overall exposure level for (\S+): ([0-9]+(?:\.[0-9]+)?)")


def security_exposure(unit: Path) -> tuple[float, Result]:
    """The overall exposure of `systemd-analyze security --offline=yes`."""
    with unit_root([unit]) as root:
        result = run(
            [
                str(systemd_analyze()),
                "security",
                "--offline=yes",
                f"--root={root}",
                "--no-pager",
                unit.name,
            ]
        )
    m = _EXPOSURE.search(result.output)
    if m is None:
        raise RuntimeError(f"no exposure level in systemd-analyze output:\n{result.output}")
    return float(m.group(2)), result


def project_units() -> list[Path]:
    return sorted(p for p in UNITS_DIR.iterdir() if p.suffix in {".service", ".socket"})
