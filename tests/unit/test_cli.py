"""Unit tests of luod.cli (luoctl): output formatting, the parser, and
main()'s mapping of failures to messages and exit statuses. luoctl against
a running luod is tests/test_luoctl.py."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest

from luod.cli import main
from luod.cli.common import format_bytes, format_time, table
from luod.cli.main import build_parser
from luod.cli.status import crash_cost_lines

COMMANDS = [
    "status",
    "list",
    "push",
    "adopt",
    "retrieve",
    "retrieve-session",
    "handback",
    "check",
    "discard",
    "finish",
    "reclaim",
    "load",
    "unload",
    "update",
    "kexec",
    "subscribe",
]


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (123_456, "120.6 KiB"),
        (5 * 1024**2, "5.0 MiB"),
        (3 * 1024**4, "3072.0 GiB"),  # no TiB: GiB is the last unit
    ],
)
def test_format_bytes(n: int, text: str) -> None:
    assert format_bytes(n) == text


def test_format_time() -> None:
    assert format_time(None) == "-"
    when = datetime.datetime(2031, 2, 3, 4, 5, 6)
    assert format_time(int(when.timestamp() * 1e6)) == "2031-02-03 04:05:06"


def test_table_pads_columns_and_strips_trailing_blanks() -> None:
    rows = [["app", "managed", ""], ["  file", "memfd", "#1"]]
    assert table(rows, ["SESSION", "KIND", "X"]).split("\n") == [
        "SESSION  KIND     X",
        "app      managed",
        "  file   memfd    #1",
    ]


def test_every_command_is_in_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "exit status: 0 success" in out
    # In this order, each on a line of its own.
    commands = out.split("examples:")[0].splitlines()
    indent = [(len(line) - len(line.lstrip()), line.split()) for line in commands]
    listed = [words[0] for n, words in indent if n == 4]  # deeper: wrapped help
    assert [c for c in listed if c in COMMANDS] == COMMANDS


def test_finish_is_discard_and_kexec_is_load_plus_update() -> None:
    p = build_parser()
    finish = p.parse_args(["finish", "s"])
    assert finish.func is p.parse_args(["discard", "s"]).func
    kexec = p.parse_args(["kexec", "/k", "--reuse-cmdline", "--force"])
    assert (kexec.kernel, kexec.reuse_cmdline, kexec.force) == ("/k", True, True)
    assert p.parse_args(["kexec"]).kernel is None  # update into what is loaded
    retrieve = p.parse_args(["retrieve", "s", "f", "--exec", "sh", "-c", "x"])
    assert (retrieve.names, retrieve.exec) == (["f"], ["sh", "-c", "x"])
    # No NAME: every fd of the session; several: one call for all.
    assert p.parse_args(["retrieve", "s"]).names == []
    assert p.parse_args(["retrieve", "s", "a", "b", "-o", "d"]).names == ["a", "b"]


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["load", "/k", "--append", "x", "--reuse-cmdline"])
    assert e.value.code == 2
    assert "not allowed with argument --append" in capsys.readouterr().err
    assert main(["push", "s", "name"]) == 2  # neither FILE nor --fd
    assert capsys.readouterr().err == (
        "luoctl: push needs either FILE (copied into a new memfd) or --fd N\n"
    )


def test_unreachable_luod_exits_3(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([f"--socket={tmp_path}/absent", "status"]) == 3
    assert capsys.readouterr().err.startswith(f"luoctl: cannot reach luod at {tmp_path}/absent: ")


def test_an_unreadable_file_is_refused_before_luod_is_asked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main([f"--socket={tmp_path}/absent", "push", "s", "n", str(tmp_path / "none")])
    assert code == 1
    err = capsys.readouterr().err
    assert err == f"luoctl: cannot read {tmp_path / 'none'}: No such file or directory\n"


def test_handback_needs_a_service_manager(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert main([f"--socket={tmp_path}/absent", "handback", "s"]) == 1
    assert "handback: $NOTIFY_SOCKET is not set" in capsys.readouterr().err
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    monkeypatch.setenv("FDSTORE", "0")
    assert main([f"--socket={tmp_path}/absent", "handback", "s"]) == 1
    assert "the unit has no fd store" in capsys.readouterr().err


def _cost(
    sessions: int, files: int, size: int, everything: bool, **more: object
) -> dict[str, object]:
    return {
        "sessions": sessions,
        "files": files,
        "bytesPinned": size,
        "everything": everything,
        "reason": "WHY",
        "problems": [],
        **more,
    }


def test_crash_cost_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    assert crash_cost_lines(_cost(0, 0, 0, False)) == [
        "a luod crash now would release nothing: WHY"
    ]
    assert crash_cost_lines(_cost(0, 0, 0, True)) == ["a luod crash now would release nothing: WHY"]
    monkeypatch.setattr("os.geteuid", lambda: 0)
    assert crash_cost_lines(_cost(3, 1, 4096, True)) == [
        "a luod crash now would release 3 sessions, 1 file, 4.0 KiB (everything luod holds): WHY"
    ]
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    assert crash_cost_lines(_cost(1, 2, 10, True)) == [
        "a luod crash now would release 1 session, 2 files, 10 B (everything luod holds for you): WHY"
    ]
    problems = [{"session": "app", "name": None, "reason": "not in the store"}]
    assert crash_cost_lines(_cost(1, 2, 10, False, problems=problems)) == [
        "a luod crash now would release 1 session, 2 files, 10 B: WHY",
        "  app: not in the store",
    ]
