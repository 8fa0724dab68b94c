"""Logging for ``timer-sdk serve``: plain text for people, JSON lines for machines.

Every module logs to a logger of its own (``timer_sdk.server``,
``timer_sdk.connection``, ...: the names from before the modules moved into
folders, kept so that log filters keep working); an app that embeds the
server configures them as it configures its own.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

__all__ = ["JsonFormatter", "configure"]

_TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, pid, message, and exc if any."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": os.getpid(),  # tells the workers of serve --workers apart
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure(fmt: str = "text", level: str = "warning") -> None:
    """Send the ``timer_sdk`` loggers to stderr, as ``text`` or ``json``, from ``level`` up."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(_TEXT))
    root = logging.getLogger("timer_sdk")
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False  # a process of its own: the root logger adds nothing
