"""luod.config: luod.conf and its drop-ins, systemd's precedence, the
command line over them, and bad values refused with the file and line."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from luod import config, daemon
from luod.interfaces import DEFAULT_SOCKET


def put(root: Path, path: str, text: str) -> Path:
    f = root / path.lstrip("/")
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(text)
    return f


def parse(root: Path, *argv: str) -> argparse.Namespace:
    return config.parse_args(daemon.build_parser, list(argv), root=str(root))


def test_no_files_no_change(tmp_path: Path) -> None:
    assert vars(parse(tmp_path)) == vars(daemon.build_parser().parse_args([]))


def test_every_flag_is_a_key() -> None:
    """Options added to build_parser() are keys without anything else to do."""
    parser = daemon.build_parser()
    keys = config.keys(parser)
    flags = {
        a.option_strings[-1]
        for a in parser._actions
        if a.option_strings and not isinstance(a, argparse._HelpAction | argparse._VersionAction)
    }
    assert {k.option_strings[-1] for k in keys.values()} == flags
    assert keys["Grace"].dest == "grace"
    assert keys["MaxConnectionsPerUser"].dest == "max_connections_per_user"
    assert "Help" not in keys and "Version" not in keys


def test_main_file_and_dropins(tmp_path: Path) -> None:
    put(tmp_path, "/usr/lib/luod/luod.conf", "[Luod]\nGrace=1min\nCarrier=fdstore\n")
    put(tmp_path, "/usr/lib/luod/luod.conf.d/50-vendor.conf", "[Luod]\nLogLevel=debug\n")
    put(tmp_path, "/etc/luod/luod.conf.d/60-admin.conf", "# admin\n[Luod]\nGrace=2min\n")
    args = parse(tmp_path)
    assert args.grace == 120.0  # the drop-in after the main file
    assert args.carrier == "fdstore"
    assert args.log_level == "debug"


def test_etc_main_file_hides_vendor_main_file(tmp_path: Path) -> None:
    put(tmp_path, "/usr/lib/luod/luod.conf", "[Luod]\nCarrier=fdstore\n")
    put(tmp_path, "/etc/luod/luod.conf", "[Luod]\nGrace=5s\n")
    args = parse(tmp_path)
    assert (args.grace, args.carrier) == (5.0, "auto")


def test_dropins_sorted_by_name_across_dirs(tmp_path: Path) -> None:
    put(tmp_path, "/etc/luod/luod.conf.d/10-a.conf", "[Luod]\nGrace=10s\n")
    put(tmp_path, "/usr/lib/luod/luod.conf.d/20-b.conf", "[Luod]\nGrace=20s\n")
    put(tmp_path, "/run/luod/luod.conf.d/15-c.conf", "[Luod]\nGrace=15s\n")
    assert parse(tmp_path).grace == 20.0
    assert [os.path.basename(p) for p in config.files(str(tmp_path))] == [
        "10-a.conf",
        "15-c.conf",
        "20-b.conf",
    ]


def test_same_name_in_etc_masks_vendor(tmp_path: Path) -> None:
    put(tmp_path, "/usr/lib/luod/luod.conf.d/50-x.conf", "[Luod]\nGrace=20s\n")
    put(tmp_path, "/etc/luod/luod.conf.d/50-x.conf", "")
    assert parse(tmp_path).grace == 600.0
    (tmp_path / "etc/luod/luod.conf.d/50-x.conf").unlink()
    (tmp_path / "etc/luod/luod.conf.d/50-x.conf").symlink_to("/dev/null")
    assert parse(tmp_path).grace == 600.0
    put(tmp_path, "/usr/lib/luod/luod.conf.d/other.txt", "[Luod]\nGrace=1s\n")  # not *.conf
    assert parse(tmp_path).grace == 600.0


def test_command_line_wins(tmp_path: Path) -> None:
    put(tmp_path, "/etc/luod/luod.conf", "[Luod]\nGrace=5s\nMaxSessionsPerUser=3\n")
    args = parse(tmp_path, "--grace=7s")
    assert (args.grace, args.max_sessions_per_user) == (7.0, 3)


def test_repeatable_option_accumulates_and_command_line_replaces(tmp_path: Path) -> None:
    put(tmp_path, "/etc/luod/luod.conf", "[Luod]\nUpdateVeto=0\nUpdateVeto=1,2\n")
    assert parse(tmp_path).update_veto == [frozenset({0}), frozenset({1, 2})]
    assert parse(tmp_path, "--update-veto=7").update_veto == [frozenset({7})]


def test_empty_assignment_resets(tmp_path: Path) -> None:
    put(tmp_path, "/etc/luod/luod.conf", "[Luod]\nGrace=5s\nUpdateVeto=0\n")
    put(tmp_path, "/etc/luod/luod.conf.d/z.conf", "[Luod]\nGrace=\nUpdateVeto=\n")
    args = parse(tmp_path)
    assert (args.grace, args.update_veto) == (600.0, [])


def test_socket_is_a_key(tmp_path: Path) -> None:
    put(tmp_path, "/etc/luod/luod.conf", "[Luod]\nSocket=/tmp/elsewhere\n")
    assert parse(tmp_path).socket == "/tmp/elsewhere"
    assert parse(tmp_path, f"--socket={DEFAULT_SOCKET}").socket == DEFAULT_SOCKET


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        ("[Luod]\nGrace=ten\n", 2, "Grace=ten: 'ten' is not a duration"),
        ("[Luod]\n\nCarrier=pigeon\n", 3, "Carrier=pigeon: not one of auto, "),
        ("[Luod]\nMaxFilesPerUser=-1\n", 2, "MaxFilesPerUser=-1: '-1' is not a count"),
        ("[Luod]\nUpdateVeto=no-such-user-here\n", 2, "no user named 'no-such-user-here'"),
        ("[Luod]\nGrase=1s\n", 2, "unknown key Grase="),
        ("Grace=1s\n", 1, "Grace= before any section"),
        ("[Service]\nGrace=1s\n", 1, "unknown section [Service]"),
        ("[Luod]\nGrace 1s\n", 2, "is no Key=value assignment"),
    ],
)
def test_bad_file_refused_with_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, line: int, message: str
) -> None:
    f = put(tmp_path, "/etc/luod/luod.conf.d/50-bad.conf", text)
    with pytest.raises(SystemExit) as e:
        parse(tmp_path)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"luod: {f}:{line}: ")
    assert message in err


def test_luod_refuses_to_start(tmp_path: Path) -> None:
    """The daemon itself, before it touches the kernel."""
    put(tmp_path, "/etc/luod/luod.conf", "[Luod]\nMaxConnections=many\n")
    r = subprocess.run(
        [sys.executable, "-m", "luod.daemon"],
        env={"LUOD_CONFIG_ROOT": str(tmp_path), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 2
    assert f"{tmp_path}/etc/luod/luod.conf:2: MaxConnections=many" in r.stderr


def test_help_names_files_and_keys() -> None:
    text = daemon.build_parser().format_help()
    flat = " ".join(text.split())
    assert "/etc/luod/luod.conf" in flat and "/usr/lib/luod" in flat
    for key in config.keys(daemon.build_parser()):
        assert f"{key}=" in flat


def test_vendor_file_uncommented_is_the_defaults(tmp_path: Path) -> None:
    """The package's /usr/lib/luod/luod.conf (tools/gendocs.py) lists every
    key at its built-in default."""
    from tools import gendocs

    text = gendocs.vendor_config()
    assert set(re.findall(r"^#(\w+)=", text, re.M)) == set(config.keys(daemon.build_parser()))
    put(tmp_path, "/usr/lib/luod/luod.conf", re.sub(r"^#(\w+=)", r"\1", text, flags=re.M))
    assert vars(parse(tmp_path)) == vars(daemon.build_parser().parse_args([]))
