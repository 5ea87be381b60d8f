"""Log output of the command and the daemon: text or JSON lines, library messages tagged with the slide.

`configure` sets up the root logger once per process (the CLI, and each analysis child process
with the parent's settings). Every JSON line is one object with an ISO 8601 time in milliseconds
and zone. Python warnings are logged, not printed; gRPC's C core is silenced unless -vv (it
writes to stderr itself, outside logging); the per-event debug lines of watchdog and pyvips stay out of -vv.
While a slide is read (`slide_context`), warnings from libraries (tifffile: "invalid page
offset") get " [slide PATH]" appended, so an operator knows which file they are about.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

from edge.logsafe import escape_control

__all__ = ["LogSettings", "configure", "current_settings", "slide_context"]

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Libraries that narrate every file event or object at DEBUG (watchdog: each inotify event; pyvips:
# each image object): -vv is about mitosis-edge, so they stay at INFO.
CHATTY_LOGGERS = ("watchdog", "pyvips", "numcodecs", "PIL", "asyncio")
OWN_LOGGER = "edge"

_slides: list[str] = []
_slides_lock = threading.Lock()


@dataclass(frozen=True)
class LogSettings:
    """What `configure` set: passed to the analysis child processes so their lines look the same."""

    level: int = logging.WARNING
    format: LogFormat = "text"


_current = [LogSettings()]  # the one entry is replaced by configure


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (ISO 8601, ms, zone), level, logger, message[, exception]."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": _dt.datetime.fromtimestamp(record.created).astimezone().isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """One record, one line: control characters in the message (a file name with a newline) are escaped,
    so nobody can forge log lines; a traceback still follows on its own lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_control(record.message)
        return super().formatMessage(record)


class _SlideTag(logging.Filter):
    """Appends the slide being read to warnings of other libraries that do not name it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or record.name.split(".")[0] == OWN_LOGGER:
            return True
        with _slides_lock:
            slides = list(_slides)
        if slides:
            message = record.getMessage()
            if not any(s in message for s in slides):
                record.msg, record.args = f"{message} [slide {', '.join(slides)}]", None
        return True


@contextmanager
def slide_context(path: object) -> Iterator[None]:
    """While inside, library warnings are tagged with this slide (several at once are all named)."""
    name = str(path)
    with _slides_lock:
        _slides.append(name)
    try:
        yield
    finally:
        with _slides_lock:
            _slides.remove(name)


def configure(level: int = logging.WARNING, fmt: LogFormat = "text") -> LogSettings:
    """Route every log line (ours, libraries', Python warnings) to stderr in ``fmt``; returns the settings."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(TEXT_FORMAT))
    handler.addFilter(_SlideTag())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.captureWarnings(True)
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(max(level, logging.INFO))
    # gRPC's C core prints to stderr on its own, in its own format: off unless debugging (-vv).
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR" if level <= logging.DEBUG else "NONE")
    _current[0] = LogSettings(level, fmt)
    return _current[0]


def current_settings() -> LogSettings:
    return _current[0]
