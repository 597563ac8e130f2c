"""Logging: one event per line.

On a terminal or in a file: logfmt (or JSON) on stderr with the <N> syslog
priority prefix journald understands (SyslogLevelPrefix=yes). Under journald
(stderr is the stream $JOURNAL_STREAM names): journald's native protocol, so
every key of the event is a field of its own (LUOD_SESSION=, LUOD_NAME=,
LUOD_OWNER=, ... in `journalctl -o verbose`) and MESSAGE is the logfmt line.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import struct
import sys
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any, TextIO

import structlog

_PRIORITY = {"critical": 2, "error": 3, "warning": 4, "info": 6, "debug": 7}
JOURNAL_SOCKET = "/run/systemd/journal/socket"
_FIELD = re.compile(r"[^A-Z0-9_]")


class _LibraryHandler(logging.Handler):
    """Libraries (asyncvarlink) log through the stdlib; their records become
    structlog events too, so every line journald sees has a priority."""

    def emit(self, record: logging.LogRecord) -> None:
        method = record.levelname.lower()
        fields: dict[str, Any] = {"logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            fields["exc_info"] = record.exc_info
        getattr(structlog.get_logger(), method if method in _PRIORITY else "error")(
            "library-log", **fields
        )


def shown(text: str, limit: int = 100) -> str:
    """`text` as luod's log shows a value a caller sent: cut to `limit`
    characters, with the length. A caller's string can be as long as a
    message (16 MiB), and every refusal is logged."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


def journal_field(key: str) -> str:
    return "LUOD_" + _FIELD.sub("_", key.upper())


def encode_journal(fields: dict[str, str]) -> bytes:
    """journald's native datagram: KEY=value lines; a value with a newline
    goes as KEY, newline, little-endian u64 length, value, newline."""
    out = bytearray()
    for key, value in fields.items():
        raw = value.encode(errors="replace")
        if b"\n" in raw:
            out += key.encode() + b"\n" + struct.pack("<Q", len(raw)) + raw + b"\n"
        else:
            out += key.encode() + b"=" + raw + b"\n"
    return bytes(out)


def stderr_is_journal() -> bool:
    """True when systemd connected stderr to journald ($JOURNAL_STREAM is
    the device:inode of that stream)."""
    want = os.environ.get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(2)
    except OSError:
        return False
    return bool(want) and want == f"{st.st_dev}:{st.st_ino}"


# Keys seen to be valid logfmt keys. They are the keyword names of luod's
# own log calls (and the library handler's), a set bounded by the code.
_VALID_KEYS: set[str] = set()


def _logfmt_value(value: Any) -> str:
    text = value if type(value) is str else str(value)
    quoted = " " in text or "=" in text or '"' in text
    if quoted and "\\" in text:
        text = text.replace("\\", "\\\\")
    if '"' in text:
        text = text.replace('"', '\\"')
    if "\n" in text:
        text = text.replace("\n", "\\n")
    return f'"{text}"' if quoted else text


def logfmt(event: Mapping[str, Any]) -> str:
    """`event` as one logfmt line, "event" first: the line structlog's
    LogfmtRenderer(key_order=["event"], drop_missing=True) makes, without
    its copy of the event and its scan of every key on every line (every
    hand-off logs a line; tests/test_log.py holds the two to the same)."""
    first = event.get("event")
    elements = [] if first is None else [f"event={_logfmt_value(first)}"]
    for key, value in event.items():
        if key == "event":
            continue
        if key not in _VALID_KEYS:
            if any(c <= " " for c in key):
                raise ValueError(f'Invalid key: "{key}"')
            _VALID_KEYS.add(key)
        kind = type(value)
        if kind is str:
            # Most values need no quotes and no escapes: said as they are.
            if " " in value or "=" in value or '"' in value or "\n" in value:
                value = _logfmt_value(value)
            elements.append(f"{key}={value}")
        elif kind is int:
            elements.append(f"{key}={value}")
        elif value is None:
            elements.append(f"{key}=")
        elif value is True:
            elements.append(key)
        elif value is False:
            elements.append(f"{key}=false")
        else:
            elements.append(f"{key}={_logfmt_value(value)}")
    return " ".join(elements)


class _Emitter:
    """The last processor: writes the event. What it returns goes to
    structlog's ReturnLogger, which does nothing with it."""

    def __init__(self, stream: TextIO, journal: str | None, json: bool) -> None:
        self.stream = stream
        self.journal = journal
        self.sock: socket.socket | None = None
        self.json = structlog.processors.JSONRenderer() if json else None

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> str:
        if "exc_info" in event:
            # A traceback, as the exception key (format_exc_info): asked
            # for by a few lines only, so not a processor of every line.
            event = structlog.processors.format_exc_info(logger, method, event)
        priority = _PRIORITY.get(method, 6)
        line = logfmt(event)
        if self.journal is not None and self._send(priority, line, event):
            return ""
        text = line if self.json is None else str(self.json(logger, method, event))
        self.stream.write(f"<{priority}>{text}\n")
        self.stream.flush()
        return ""

    def _send(self, priority: int, line: str, event: MutableMapping[str, Any]) -> bool:
        fields = {
            "MESSAGE": line,
            "PRIORITY": str(priority),
            "SYSLOG_IDENTIFIER": "luod",
        }
        for key, value in event.items():
            fields[journal_field(key)] = str(value)
        try:
            if self.sock is None:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            assert self.journal is not None
            self.sock.sendto(encode_journal(fields), self.journal)
        except OSError:
            return False  # too large or journald gone: the stderr line still tells
        return True


def _direct(method: str, general: Callable[..., Any]) -> Callable[..., Any]:
    """A logger method that gives the event straight to luod's one
    processor (the _Emitter). The general path (`general`: structlog's
    _proxy_to_logger, _process_event and ReturnLogger) cost 17 K of the
    495 K instructions of a hand-off (bench/RESULTS.md); it is taken
    whenever anything is unusual: positional arguments, a bound context,
    other processors (structlog.testing.capture_logs)."""

    def log(self: Any, event: str, *args: Any, **kw: Any) -> Any:
        processors = self._processors
        if args or self._context or len(processors) != 1 or type(processors[0]) is not _Emitter:
            return general(self, event, *args, **kw)
        # The event dict as _process_event makes it: the keywords, then "event".
        kw["event"] = event
        processors[0](self._logger, method, kw)
        return None

    log.__name__ = method
    return log


def _bound_logger_class(min_level: int) -> type[Any]:
    """structlog's filtering bound logger for `min_level` (a level below
    it stays a no-op), with the methods at or above it direct (_direct)."""
    base = structlog.make_filtering_bound_logger(min_level)
    levels = logging.getLevelNamesMapping()
    direct = {
        name: _direct(name, getattr(base, name))
        for name in _PRIORITY
        if levels[name.upper()] >= min_level
    }
    return type(base.__name__, (base,), direct)


def setup(
    level: str = "info",
    stream: TextIO | None = None,
    json: bool = False,
    journal: str | None = None,
    cache: bool = False,
) -> None:
    """`journal`: the socket to send native entries to; by default the
    system journal when stderr is connected to it, else none. `cache`: each
    module's logger binds to this configuration at its first line and keeps
    it (saves binding on every line); for a process that sets logging up
    once, before its first line, as luod does. In-process tests configure
    structlog again (capture_logs) and need loggers that follow it."""
    if journal is None and stream is None and stderr_is_journal():
        journal = JOURNAL_SOCKET
    # One processor: luod binds nothing to structlog's context variables
    # (no merge_contextvars), and a processor costs every line.
    structlog.configure(
        processors=[_Emitter(stream if stream is not None else sys.stderr, journal, json)],
        wrapper_class=_bound_logger_class(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.ReturnLoggerFactory(),
        cache_logger_on_first_use=cache,
    )
    root = logging.getLogger()
    root.handlers[:] = [_LibraryHandler()]
    root.setLevel(logging.WARNING)
