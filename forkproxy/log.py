"""A tiny logger for the supervisor and its children: one `os.write` per line to stderr.

The `logging` module imports `threading` and registers at-fork hooks, which makes every
fork of the supervisor dearer (see docs/benchmarks.md); this writes the same lines
without either. One write per line keeps lines whole when children share stderr.
"""

from __future__ import annotations

import json
import os
import time

DEBUG, INFO, WARNING, ERROR = 10, 20, 30, 40
_NAMES = {DEBUG: "debug", INFO: "info", WARNING: "warning", ERROR: "error"}


class Logger:
    """`log.info("open", link=..., client=...)` -> `... info open link=... client=...`."""

    def __init__(self, level: int = INFO, fmt: str = "text", fd: int = 2) -> None:
        self.level = level
        self.fmt = fmt
        self.fd = fd

    def enabled(self, level: int) -> bool:
        return level >= self.level

    def emit(self, level: int, event: str, fields: dict[str, object]) -> None:
        if level < self.level:
            return
        now = time.time()
        millis = int(now % 1 * 1000)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{millis:03d}Z"
        if self.fmt == "json":
            record: dict[str, object] = {"ts": stamp, "level": _NAMES[level], "pid": os.getpid()}
            record["event"] = event
            record.update(fields)
            line = json.dumps(record, default=str)
        else:
            parts = [stamp, f"forkproxy[{os.getpid()}]", _NAMES[level], event]
            parts += [f"{key}={_text_value(value)}" for key, value in fields.items()]
            line = " ".join(parts)
        data = (line + "\n").encode("utf-8", "backslashreplace")
        try:
            os.write(self.fd, data)
        except OSError:
            pass  # stderr gone (closed pipe): logging must never take the proxy down

    def debug(self, event: str, **fields: object) -> None:
        self.emit(DEBUG, event, fields)

    def info(self, event: str, **fields: object) -> None:
        self.emit(INFO, event, fields)

    def warning(self, event: str, **fields: object) -> None:
        self.emit(WARNING, event, fields)

    def error(self, event: str, **fields: object) -> None:
        self.emit(ERROR, event, fields)


def _text_value(value: object) -> str:
    text = f"{value:.3f}" if isinstance(value, float) else str(value)
    if not text or any(c in text for c in ' "=\n\\'):
        return json.dumps(text)
    return text


def level_for(verbosity: int) -> int:
    """-q -> warnings only, default -> info (one line per connection open/close), -v -> debug."""
    return {-1: WARNING, 0: INFO}.get(verbosity, DEBUG if verbosity > 0 else ERROR)


log = Logger()
