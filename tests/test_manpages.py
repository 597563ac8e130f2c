"""The man pages and the shell completion (tools/gendocs.py, make man):
rendered from the parsers, so every option, configuration key, command and
varlink method is in them; and they render without a warning, as lintian
checks them (man --warnings)."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from luod import config, daemon
from luod.cli.main import build_parser as luoctl_parser
from luod.varlink.registry import interface_descriptions
from tools import gendocs


@pytest.fixture(scope="module")
def rendered() -> dict[str, str]:
    return gendocs.render()


def text(roff: str) -> str:
    """The words of a roff page, for looking things up."""
    roff = re.sub(r"\\f[BIRP]|\\f\(..|\\[,/&]", "", roff)
    return roff.replace("\\-", "-").replace("\\e", "\\")


def options(parser: argparse.ArgumentParser) -> set[str]:
    """Its long options but --help, which every page and command has."""
    return {s for a in parser._actions for s in a.option_strings if s.startswith("--")} - {"--help"}


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            return dict(a.choices)
    return {}


def test_luod_page_has_every_option_and_key(rendered: dict[str, str]) -> None:
    page = text(rendered["man/luod.8"])
    parser = daemon.build_parser()
    assert page.startswith('.TH LUOD "8"')
    for opt in options(parser):
        assert opt in page, opt
    for key in config.keys(parser):
        assert f"{key}=" in page, key
    for path in ("/etc/luod/luod.conf", "/usr/lib/luod/luod.conf", "luod.conf.d"):
        assert path in page
    assert ".SH CONFIGURATION" in page and "luod.varlink(7)" in page


def test_luoctl_page_has_every_command_and_option(rendered: dict[str, str]) -> None:
    page = text(rendered["man/luoctl.1"])
    parser = luoctl_parser()
    assert page.startswith('.TH LUOCTL "1"')
    assert options(parser) <= set(re.findall(r"--[a-z-]+", page))
    for name, sub in subcommands(parser).items():
        assert f"luoctl {name}" in page, name
        for opt in options(sub):
            assert opt in page, (name, opt)


def test_varlink_page_has_every_method(rendered: dict[str, str]) -> None:
    page = text(rendered["man/luod.varlink.7"])
    for name, idl in interface_descriptions().items():
        assert f"interface {name}" in page
        for method in re.findall(r"^method (\w+)", idl, re.M):
            assert f"method {method}(" in page, method


def test_bash_completion_knows_every_command(rendered: dict[str, str]) -> None:
    script = rendered["completion/luoctl"]
    parser = luoctl_parser()
    for name, sub in subcommands(parser).items():
        assert name in script
        for opt in options(sub):
            assert opt in script, (name, opt)
    assert "-F _shtab_luoctl luoctl" in script
    bash = shutil.which("bash")
    if bash is not None:
        r = subprocess.run([bash, "-n"], input=script, text=True, capture_output=True, check=False)
        assert r.returncode == 0, r.stderr


@pytest.mark.skipif(shutil.which("man") is None, reason="man-db is not installed")
@pytest.mark.parametrize("name", ["man/luod.8", "man/luoctl.1", "man/luod.varlink.7"])
def test_pages_render_without_warnings(rendered: dict[str, str], tmp_path: Path, name: str) -> None:
    """lintian's check (groff-message): man --warnings, in UTF-8."""
    page = tmp_path / Path(name).name
    page.write_text(rendered[name])
    env = dict(os.environ, LC_ALL="C.UTF-8", MANROFFSEQ="", MANWIDTH="80")
    r = subprocess.run(
        ["man", "--warnings", "-E", "UTF-8", "-l", "-Tutf8", "-Z", str(page)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
