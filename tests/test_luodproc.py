"""testsupport.luodproc starts luod from the checkout it is given, whatever
the working directory: the bench compares the start of two trees with it
(bench.starts), and a luod imported from the wrong tree would measure the
same code twice."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from testsupport.luodproc import REPO, LuodProcess, fake_backend_args


def _stop_after_start(luod: LuodProcess) -> None:
    try:
        luod.start()
    finally:
        luod.stop()


def test_luod_comes_from_the_given_tree(workdir: Path, fake_kernel: str, tmp_path: Path) -> None:
    tree = tmp_path / "other-tree"
    for package in ("luod", "testsupport"):
        shutil.copytree(
            Path(REPO) / package, tree / package, ignore=shutil.ignore_patterns("__pycache__")
        )
    marker = tmp_path / "imported-from-other-tree"
    with open(tree / "luod" / "__init__.py", "a") as init:
        init.write(f"\nopen({str(marker)!r}, 'w').close()\n")

    _stop_after_start(LuodProcess(workdir, fake_backend_args(fake_kernel), []))
    assert not marker.exists()
    _stop_after_start(LuodProcess(workdir, fake_backend_args(fake_kernel), [], repo=str(tree)))
    assert marker.exists()


def test_a_luod_package_in_the_working_directory_is_not_imported(
    workdir: Path, fake_kernel: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `python -m` puts the working directory first on sys.path: a test run
    # from another checkout would start that checkout's luod.
    decoy = tmp_path / "decoy"
    (decoy / "luod").mkdir(parents=True)
    (decoy / "luod" / "__init__.py").write_text("raise SystemExit('the decoy luod')\n")
    monkeypatch.chdir(decoy)
    luod = LuodProcess(workdir, fake_backend_args(fake_kernel), [])
    _stop_after_start(luod)
    assert "decoy" not in luod.log()
