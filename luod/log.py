"""Logging: one event per line.

On a terminal or in a file: logfmt (or JSON) on stderr with the <N> syslog
priority prefix journald understands (SyslogLevelPrefix=yes). Under journald
(stderr is the stream $JOURNAL_STREAM names): journald's native protocol, so
every key of the event is a field of its own (LUOD_SESSION=, LUOD_NAME=,
LUOD_OWNER=, ... in `journalctl -o verbose`) and MESSAGE is the logfmt line.

Lines a caller other than root causes (while luod serves its call) are
held to a budget per uid and for all of them together (CallerBudget):
journald drops every line of a unit past its rate limit (10,000 per 30 s by
default), and one uid's hand-offs and discards wrote 2,000 lines a second.
Root's lines, luod's own and every error are always written.

luod's modules log with `get_logger()`. The lines are structlog's (logfmt,
JSONRenderer, format_exc_info; tests/test_log.py holds them to it), but
luod writes its own lines itself and imports structlog only for what it
needs it for: a traceback, JSON, positional arguments, or a process that
configured structlog otherwise (tests' capture_logs).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import struct
import sys
import time
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any, TextIO

_PRIORITY = {"critical": 2, "error": 3, "warning": 4, "info": 6, "debug": 7}
JOURNAL_SOCKET = "/run/systemd/journal/socket"
_FIELD = re.compile(r"[^A-Z0-9_]")


class _LibraryHandler(logging.Handler):
    """Libraries (asyncvarlink) log through the stdlib; their records become
    luod's events too, so every line journald sees has a priority."""

    def emit(self, record: logging.LogRecord) -> None:
        method = record.levelname.lower()
        fields: dict[str, Any] = {"logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            fields["exc_info"] = record.exc_info
        try:
            getattr(_LOGGER, method if method in _PRIORITY else "error")("library-log", **fields)
        except Exception:
            # The stdlib's way (a line on stderr): a line that cannot be
            # written must not raise into the caller, asyncio's event loop.
            self.handleError(record)


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
    """Writes an event: luod's logger hands it its events directly, and it
    is structlog's one processor when structlog is in use (what it returns
    goes to structlog's ReturnLogger, which does nothing with it)."""

    def __init__(self, stream: TextIO, journal: str | None, json: bool, min_level: int) -> None:
        self.stream = stream
        self.journal = journal
        self.sock: socket.socket | None = None
        self.json = json
        self.min_level = min_level
        self._render_json: Any = None

    def __call__(self, logger: Any, method: str, event: MutableMapping[str, Any]) -> str:
        if "exc_info" in event:
            # A traceback, as the exception key: asked for by a few lines
            # only, so not a processor of every line.
            event = _format_exc_info(logger, method, event)
        priority = _PRIORITY.get(method, 6)
        line = logfmt(event)
        if self.journal is not None and self._send(priority, line, event):
            return ""
        if self.json:
            if self._render_json is None:
                self._render_json = _structlog().processors.JSONRenderer()
            line = str(self._render_json(logger, method, event))
        self.stream.write(f"<{priority}>{line}\n")
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


def _format_exc_info(logger: Any, method: str, event: MutableMapping[str, Any]) -> Any:
    """structlog's format_exc_info; the standard library's traceback when
    structlog cannot be imported: at luod's open-file limit its files
    cannot be opened, and an error logged then (EMFILE, of all errors)
    must still be logged, not raise out of the event loop and end luod."""
    try:
        structlog = _structlog()
    except (ImportError, OSError):
        # Imported already in luod (by asyncio): no file to open.
        import traceback

        exc_info = event.pop("exc_info")
        if exc_info is True:
            exc_info = sys.exc_info()
        elif isinstance(exc_info, BaseException):
            exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
        if isinstance(exc_info, tuple) and exc_info[0] is not None:
            event["exception"] = "".join(traceback.format_exception(*exc_info)).rstrip("\n")
        return event
    return structlog.processors.format_exc_info(logger, method, event)


# What setup() made; None before (events then go through structlog).
_emitter: _Emitter | None = None
_cache = False


def _structlog() -> Any:
    """structlog, imported when first needed: importing it cost 68 M of the
    562 M instructions of luod's imports (issue 12, goal 2), and luod's own
    lines do not need it. When luod imports it, it is set up as luod is."""
    if "structlog" not in sys.modules:
        import structlog

        if _emitter is not None:
            _configure(structlog, _emitter)
        return structlog
    return sys.modules["structlog"]


def _configure(structlog: Any, emitter: _Emitter) -> None:
    # One processor: luod binds nothing to structlog's context variables
    # (no merge_contextvars), and a processor costs every line.
    structlog.configure(
        processors=[emitter],
        wrapper_class=structlog.make_filtering_bound_logger(emitter.min_level),
        logger_factory=structlog.ReturnLoggerFactory(),
        cache_logger_on_first_use=_cache,
    )


def _direct() -> _Emitter | None:
    """The emitter luod's events go to directly; None: through structlog.
    Directly once setup() is done, unless structlog was configured since
    with anything else (tests' capture_logs)."""
    emitter = _emitter
    if emitter is None:
        return None
    structlog = sys.modules.get("structlog")
    if structlog is not None:
        processors = structlog.get_config()["processors"]
        if len(processors) != 1 or processors[0] is not emitter:
            return None
    return emitter


class Logger:
    """What luod's modules log with (`log = get_logger()`):
    `log.info("fd-preserved", session=..., ...)`, an event and its keys. In
    luod an event goes straight to the emitter setup() made, which writes
    the line structlog would; anything unusual (positional arguments, no
    setup(), structlog configured otherwise, as by capture_logs) goes
    through structlog, with its own rules."""

    __slots__ = ()

    def _log(self, method: str, level: int, event: str, args: tuple[Any, ...], kw: Any) -> None:
        uid = _serving_uid()
        if uid and level < logging.ERROR:
            held = caller_budget.allow(uid)
            if held is None:
                return
            if held:
                kw["suppressed"] = held
        emitter = _direct()
        if emitter is None or args:
            getattr(_structlog().get_logger("luod"), method)(event, *args, **kw)
        elif level >= emitter.min_level:
            # The event dict as structlog makes it: the keywords, then "event".
            kw["event"] = event
            emitter(None, method, kw)

    def debug(self, event: str, *args: Any, **kw: Any) -> None:
        self._log("debug", logging.DEBUG, event, args, kw)

    def info(self, event: str, *args: Any, **kw: Any) -> None:
        self._log("info", logging.INFO, event, args, kw)

    def warning(self, event: str, *args: Any, **kw: Any) -> None:
        self._log("warning", logging.WARNING, event, args, kw)

    def error(self, event: str, *args: Any, **kw: Any) -> None:
        self._log("error", logging.ERROR, event, args, kw)

    def critical(self, event: str, *args: Any, **kw: Any) -> None:
        self._log("critical", logging.CRITICAL, event, args, kw)

    def exception(self, event: str, *args: Any, **kw: Any) -> None:
        """An error with the exception being handled (its traceback)."""
        kw.setdefault("exc_info", True)
        self._log("error", logging.ERROR, event, args, kw)


_LOGGER = Logger()


def _luods_own() -> int | None:
    return None


# Whose call luod is serving when a line is logged: the caller's uid, None
# for luod's own work. Asked of the call luod.varlink.transport serves
# (serving_uid_from) when a line is logged, so that a call costs nothing
# more: a context variable set per call cost 3 K instructions of a
# GetInfo's 142 K.
_serving_uid: Callable[[], int | None] = _luods_own


def serving_uid_from(source: Callable[[], int | None]) -> Callable[[], int | None]:
    """Ask `source` whose call a line is logged in; the source before it."""
    global _serving_uid
    previous, _serving_uid = _serving_uid, source
    return previous


class CallerBudget:
    """How many lines (errors aside) callers other than root may cause in
    a window of `window` seconds: `per_uid` each, `total` all of them
    together; the rest of journald's rate limit is root's and luod's own. A
    line over the budget is not written but counted, and the caller's next
    line that is written says how many were not (`suppressed=N`)."""

    def __init__(
        self,
        per_uid: int = 100,
        total: int = 1000,
        window: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_uid, self.total, self.window = per_uid, total, window
        self._clock = clock
        self._start = self._clock()
        self._lines: dict[int, int] = {}
        self._all = 0
        self._held: dict[int, int] = {}

    def allow(self, uid: int) -> int | None:
        """None: `uid`'s line is over the budget (and counted); else how
        many of its lines were not written since its last one that was."""
        now = self._clock()
        if now - self._start >= self.window:
            self._start, self._all = now, 0
            self._lines.clear()
        n = self._lines.get(uid, 0)
        if n >= self.per_uid or self._all >= self.total:
            self._held[uid] = self._held.get(uid, 0) + 1
            return None
        self._lines[uid] = n + 1
        self._all += 1
        return self._held.pop(uid, 0)


caller_budget = CallerBudget()


def get_logger() -> Logger:
    return _LOGGER


def setup(
    level: str = "info",
    stream: TextIO | None = None,
    json: bool = False,
    journal: str | None = None,
    cache: bool = False,
) -> None:
    """`journal`: the socket to send native entries to; by default the
    system journal when stderr is connected to it, else none. `cache`:
    structlog's loggers bind to this configuration at their first line and
    keep it (saves binding on every line); for a process that sets logging
    up once, before its first line, as luod does. In-process tests configure
    structlog again (capture_logs) and need loggers that follow it."""
    global _emitter, _cache
    if journal is None and stream is None and stderr_is_journal():
        journal = JOURNAL_SOCKET
    _emitter = _Emitter(
        stream if stream is not None else sys.stderr,
        journal,
        json,
        logging.getLevelNamesMapping()[level.upper()],
    )
    _cache = cache
    if "structlog" in sys.modules:
        _configure(sys.modules["structlog"], _emitter)
    root = logging.getLogger()
    root.handlers[:] = [_LibraryHandler()]
    root.setLevel(logging.WARNING)
