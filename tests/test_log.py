from __future__ import annotations

import io
import json
import logging
import socket
import struct
import sys
from pathlib import Path

import pytest
import structlog

from luod import log


def _parse(datagram: bytes) -> dict[str, str]:
    fields: dict[str, str] = {}
    rest = datagram
    while rest:
        line, _, after = rest.partition(b"\n")
        if b"=" in line:
            k, _, v = line.partition(b"=")
            fields[k.decode()] = v.decode()
            rest = after
        else:
            (n,) = struct.unpack("<Q", after[:8])
            fields[line.decode()] = after[8 : 8 + n].decode()
            rest = after[8 + n + 1 :]
    return fields


def test_stderr_lines_have_priority_prefix() -> None:
    out = io.StringIO()
    log.setup("info", stream=out)
    structlog.get_logger().info("fd-preserved", session="cache", name="idx", owner="app (uid 0)")
    structlog.get_logger().debug("hidden")
    structlog.get_logger().error("kexec-failed", reason="x")
    assert out.getvalue().splitlines() == [
        '<6>event=fd-preserved session=cache name=idx owner="app (uid 0)"',
        "<3>event=kexec-failed reason=x",
    ]


def test_journal_gets_one_field_per_key(tmp_path: Path) -> None:
    path = str(tmp_path / "journal")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    out = io.StringIO()
    log.setup("info", stream=out, journal=path)
    structlog.get_logger().warning(
        "unclaimed-released", session="orphan", files="a,b", detail="two\nlines"
    )
    fields = _parse(sock.recv(65536))
    assert fields["PRIORITY"] == "4"
    assert fields["SYSLOG_IDENTIFIER"] == "luod"
    assert fields["LUOD_EVENT"] == "unclaimed-released"
    assert fields["LUOD_SESSION"] == "orphan"
    assert fields["LUOD_DETAIL"] == "two\nlines"
    assert fields["MESSAGE"].startswith("event=unclaimed-released session=orphan")
    assert out.getvalue() == ""  # not twice
    sock.close()


def test_journal_gone_falls_back_to_stderr(tmp_path: Path) -> None:
    out = io.StringIO()
    log.setup("info", stream=out, journal=str(tmp_path / "nobody-listens"))
    structlog.get_logger().info("listening", pid=1)
    assert out.getvalue() == "<6>event=listening pid=1\n"


@pytest.mark.parametrize(
    "event",
    [
        {"event": "fd-preserved", "session": "s", "token": 5, "size": 4096, "owner": "a (uid 0)"},
        {"session": "no event", "event": None, "flag": True, "off": False, "gone": None},
        {"event": 'say "hi"', "path": "C:\\dir name", "plain": "back\\slash", "n": -1},
        {"event": "x", "detail": "two\nlines", "eq": "a=b", "list": ["a b"], "raw": b"x"},
        {"event": "x", "float": 1.5, "empty": "", "enum": socket.AF_UNIX},
    ],
)
def test_logfmt_is_structlogs_line(event: dict[str, object]) -> None:
    # luod renders its own lines (cheaper); they must stay what structlog's
    # renderer made, which journald users and the tests read.
    theirs = structlog.processors.LogfmtRenderer(key_order=["event"], drop_missing=True)
    assert log.logfmt(event) == theirs(None, "info", dict(event))


def test_logfmt_refuses_key_with_space() -> None:
    with pytest.raises(ValueError, match='Invalid key: "a b"'):
        log.logfmt({"event": "x", "a b": 1})


def test_traceback_logged_with_cached_loggers() -> None:
    out = io.StringIO()
    log.setup("info", stream=out, cache=True)
    try:
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            structlog.get_logger().error("kexec-failed", exc_info=True)
    finally:
        # Loggers bound from here on follow a configuration again (other
        # tests capture logs).
        log.setup("info", stream=io.StringIO())
    line = out.getvalue()
    assert line.startswith("<3>event=kexec-failed exception=")
    assert "RuntimeError: boom" in line and "\n" not in line.rstrip("\n")


def test_luods_logger_writes_what_structlogs_path_writes() -> None:
    """luod's logger writes its lines itself (no structlog on luod's start);
    they are the lines structlog's path makes, and anything unusual still
    takes that path."""
    out = io.StringIO()
    log.setup("debug", stream=out)
    logger = log.get_logger()
    general = structlog.make_filtering_bound_logger(logging.DEBUG)
    bound = structlog.get_logger().bind()
    for method in ("debug", "info", "warning", "error", "critical"):
        getattr(logger, method)("fd-preserved", session="s x", token=5)
        getattr(general, method)(bound, "fd-preserved", session="s x", token=5)
    lines = out.getvalue().splitlines()
    assert lines[0::2] == lines[1::2] and len(lines) == 10
    assert lines[2] == '<6>event=fd-preserved session="s x" token=5'
    out.truncate(0)
    out.seek(0)
    logger.info("%s-%d", "args", 2)  # positional arguments: structlog's path
    assert out.getvalue().splitlines() == ["<6>event=args-2"]
    with structlog.testing.capture_logs() as captured:  # other processors
        logger.warning("captured", n=1)
    assert captured == [{"event": "captured", "n": 1, "log_level": "warning"}]
    logger.info("after")  # structlog's configuration is luod's again
    assert out.getvalue().splitlines()[-1] == "<6>event=after"
    try:
        log.setup("warning", stream=out)
        logger.info("below the level")
        structlog.get_logger().info("below the level")
    finally:
        log.setup("info", stream=io.StringIO())
    assert "below" not in out.getvalue()


def test_luods_logger_traceback_and_json() -> None:
    out = io.StringIO()
    log.setup("info", stream=out, json=True)
    try:
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.get_logger().exception("preserve-again-failed", session="s")
        log.get_logger().info("fd-preserved", session="s", token=5)
    finally:
        log.setup("info", stream=io.StringIO())
    first, second = out.getvalue().splitlines()
    assert first.startswith("<3>{") and second.startswith("<6>{")
    failed = json.loads(first[3:])
    assert failed["event"] == "preserve-again-failed" and failed["session"] == "s"
    assert "RuntimeError: boom" in failed["exception"]
    theirs = structlog.processors.JSONRenderer()
    assert second[3:] == theirs(None, "info", {"session": "s", "token": 5, "event": "fd-preserved"})


def test_traceback_logged_when_structlog_cannot_be_imported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """At luod's open-file limit structlog's files cannot be opened: a line
    with a traceback (an asyncio error, through the library handler) still
    gets written, with the standard library's traceback, and nothing
    raises into asyncio's event loop (which ended luod)."""
    out = io.StringIO()
    log.setup("info", stream=out)
    monkeypatch.delitem(sys.modules, "structlog")
    monkeypatch.setattr(log, "_structlog", _no_structlog)
    try:
        try:
            raise OSError(24, "Too many open files")
        except OSError:
            logging.getLogger("asyncio").exception("Exception in callback")
            log.get_logger().exception("call-failed")
        lines = out.getvalue().splitlines()
        assert lines[0].startswith("<3>event=library-log logger=asyncio")
        assert lines[1].startswith("<3>event=call-failed exception=")
        for line in lines:
            assert "OSError: [Errno 24] Too many open files" in line
    finally:
        log.setup("info", stream=io.StringIO())


def _no_structlog() -> None:
    raise OSError(24, "Too many open files", "structlog/__init__.py")


def test_lines_callers_cause_are_held_to_a_budget_per_uid_and_in_all() -> None:
    """journald drops every line of a unit past its rate limit: a caller
    other than root may cause `per_uid` lines a window, all of them
    together `total`; root's lines, luod's own and errors are written. A
    caller's next line written says how many of its lines were not."""
    now = [0.0]
    budget = log.CallerBudget(per_uid=3, total=5, window=10.0, clock=lambda: now[0])
    assert [budget.allow(1000) for _ in range(4)] == [0, 0, 0, None]
    assert [budget.allow(1001) for _ in range(3)] == [0, 0, None]  # 5 in all
    now[0] = 10.0
    assert budget.allow(1000) == 1  # the one line over its budget
    assert budget.allow(1001) == 1
    assert budget.allow(1002) == 0

    out = io.StringIO()
    previous = log.caller_budget
    log.caller_budget = log.CallerBudget(per_uid=2, total=2, window=60.0)
    log.setup("info", stream=out)
    logger = log.get_logger()
    serving: list[int | None] = [65534]
    source = log.serving_uid_from(lambda: serving[0])
    try:
        for n in range(4):
            logger.info("fd-preserved", n=n)
        logger.error("manifest-write-failed")  # errors always
        serving[0] = None
        logger.info("luods-own")
        serving[0] = 0
        logger.info("roots")
    finally:
        log.serving_uid_from(source)
        log.caller_budget = previous
        log.setup("info", stream=io.StringIO())
    assert out.getvalue().splitlines() == [
        "<6>event=fd-preserved n=0",
        "<6>event=fd-preserved n=1",
        "<3>event=manifest-write-failed",
        "<6>event=luods-own",
        "<6>event=roots",
    ]
