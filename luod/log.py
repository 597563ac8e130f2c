"""Logging: one logfmt (or JSON) line per event on stderr, with the <N>
syslog priority prefix journald understands (SyslogLevelPrefix=yes)."""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog

_PRIORITY = {"critical": 2, "error": 3, "warning": 4, "info": 6, "debug": 7}


def _priority_prefix(_logger: Any, method: str, rendered: Any) -> str:
    # Runs after the renderer: `rendered` is the finished line.
    return f"<{_PRIORITY.get(method, 6)}>{rendered}"


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


def setup(level: str = "info", stream: TextIO | None = None, json: bool = False) -> None:
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if json
        else structlog.processors.LogfmtRenderer(key_order=["event"], drop_missing=True)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.format_exc_info,
            renderer,
            _priority_prefix,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(stream if stream is not None else sys.stderr),
        cache_logger_on_first_use=False,
    )
    root = logging.getLogger()
    root.handlers[:] = [_LibraryHandler()]
    root.setLevel(logging.WARNING)
