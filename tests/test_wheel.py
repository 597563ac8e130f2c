"""The wheel (make wheel): luod, luoctl and the typed client, and nothing
of the test machinery."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_wheel_ships_luod_only(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path)],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("luod-*-py3-none-any.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        scripts = z.read(entry_points).decode()
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"luod"}
    assert "luod/py.typed" in names and "luod/client.py" in names
    assert "luod/config.py" in names and "luod/varlink/registry.py" in names
    assert "luod = luod.daemon:main" in scripts and "luoctl = luod.cli:main" in scripts
    assert "License-Expression: LGPL-2.1-or-later" in metadata
    assert "Requires-Dist: asyncvarlink" in metadata
