"""luod's Debian package (debian/, tools/build-deb.sh, make deb): its
metadata agrees with the code, and the package built from this tree holds
what an operator needs and nothing of the test machinery, lintian-clean."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

import luod
from tools import gendocs

REPO = Path(__file__).resolve().parent.parent
DEBIAN = REPO / "debian"


def test_changelog_version_is_luods() -> None:
    first = (DEBIAN / "changelog").read_text().splitlines()[0]
    assert first.startswith(f"luod ({luod.__version__}) unstable;"), first


def test_depends_on_debians_packages_of_the_requirements() -> None:
    """Each requirement of pyproject.toml is a Depends on python3-NAME with
    the same bounds."""
    control = (DEBIAN / "control").read_text()
    depends = control.split("\nDepends:", 1)[1].split("\nDescription:", 1)[0]
    with open(REPO / "pyproject.toml", "rb") as f:
        requirements = tomllib.load(f)["project"]["dependencies"]
    for req in requirements:
        name, specs = re.match(r"([A-Za-z0-9_.-]+)(.*)", req.replace(" ", "")).groups()  # type: ignore[union-attr]
        for spec in filter(None, specs.split(",")):
            op, version = re.match(r"(>=|<)(.+)", spec).groups()  # type: ignore[union-attr]
            deb_op = {">=": ">=", "<": "<<"}[op]
            assert f"python3-{name.lower()} ({deb_op} {version})" in depends, (req, depends)
    assert "systemd (>= 261)" in depends


def test_installs_every_unit() -> None:
    install = (DEBIAN / "luod.install").read_text()
    for unit in sorted((REPO / "units").iterdir()):
        assert f"units/{unit.name} lib/systemd/system/" in install


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    missing = [t for t in ("dpkg-buildpackage", "dh", "pybuild", "lintian") if not shutil.which(t)]
    if missing:
        pytest.skip(f"no {', '.join(missing)} on this host: vm/host-deps.sh deb installs them")
    tmp = tmp_path_factory.mktemp("deb")
    docs = tmp / "docs"
    for rel, text in gendocs.render().items():
        (docs / rel).parent.mkdir(parents=True, exist_ok=True)
        (docs / rel).write_text(text)
    r = subprocess.run(
        [str(REPO / "tools/build-deb.sh"), str(tmp / "out")],
        env=dict(os.environ, LUOD_DOCS=str(docs)),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    return Path(r.stdout.splitlines()[-1])


def test_package_contents(deb: Path) -> None:
    listing = subprocess.run(
        ["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True
    ).stdout
    files = {line.split()[-1].lstrip(".") for line in listing.splitlines()}
    for path in (
        "/usr/bin/luod",
        "/usr/bin/luoctl",
        "/usr/lib/python3/dist-packages/luod/daemon.py",
        "/usr/lib/python3/dist-packages/luod/config.py",
        "/usr/lib/python3/dist-packages/luod/py.typed",
        "/usr/lib/systemd/system/luod.service",
        "/usr/lib/systemd/system/luod.socket",
        "/usr/lib/systemd/system/luod-reclaim.service",
        "/usr/lib/luod/luod.conf",
        "/usr/share/man/man8/luod.8.gz",
        "/usr/share/man/man1/luoctl.1.gz",
        "/usr/share/man/man7/luod.varlink.7.gz",
        "/usr/share/bash-completion/completions/luoctl",
        "/usr/share/zsh/vendor-completions/_luoctl",
        "/usr/share/doc/luod/README.md",
    ):
        assert path in files, path
    assert not [f for f in files if "testsupport" in f or "/tests/" in f or "/tools/" in f]
    assert not [f for f in files if f.startswith("/lib/")]  # merged /usr: /usr/lib only


def test_package_enables_socket_and_reclaim_only(deb: Path, tmp_path: Path) -> None:
    subprocess.run(["dpkg-deb", "-e", str(deb), str(tmp_path)], check=True)
    postinst = (tmp_path / "postinst").read_text()
    assert "deb-systemd-helper enable 'luod.socket'" in postinst
    assert "deb-systemd-helper enable 'luod-reclaim.service'" in postinst
    assert "enable 'luod.service'" not in postinst
    # luod restarts after an upgrade only if it runs; its socket starts it.
    assert "deb-systemd-invoke try-restart 'luod.service'" in postinst
    assert "deb-systemd-invoke start 'luod.socket'" in postinst
    control = subprocess.run(
        ["dpkg-deb", "-f", str(deb), "Depends"], capture_output=True, text=True, check=True
    ).stdout
    assert "python3-asyncvarlink" in control and "python3-structlog" in control


def test_package_refuses_removal_while_luod_holds_sessions(deb: Path, tmp_path: Path) -> None:
    """The policy tests/systemd/test_package.py sees in a VM: removal refused
    while luod holds a session, unless LUOD_REMOVE_RELEASES=1; then luod's fd
    store in PID 1 is closed too."""
    subprocess.run(["dpkg-deb", "-e", str(deb), str(tmp_path)], check=True)
    prerm = (tmp_path / "prerm").read_text()
    assert "LUOD_REMOVE_RELEASES" in prerm and "luoctl --json status" in prerm
    assert prerm.index("exit 1") < prerm.index("deb-systemd-invoke stop 'luod.socket'")
    assert "systemctl clean --what=fdstore luod.service" in prerm
