"""memserve's log: one line per request and per pool event, as text for a person or JSON for a collector.

A line's structured fields travel in ``extra={"fields": {...}}`` (the request's model, key, status,
tokens, timings; a pool event's JSON). The text format shows the message alone, which already names
them; ``log_format: json`` writes one JSON object per line — ``time`` (ISO 8601, UTC), ``level``,
``logger``, ``message``, then the fields — which Loki, Vector or ``jq`` read as they are. It is a few
lines of ``logging.Formatter`` rather than a dependency (python-json-logger does the same with more
options than one fixed shape needs).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, Literal

__all__ = ["FIELDS", "LOG_FORMATS", "JsonFormatter", "LogFormat", "configure", "say"]

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")
FIELDS = "fields"
"""The ``extra`` key that carries a line's structured fields."""


_format: LogFormat = "text"
_say = logging.getLogger("memserve.serve")


def say(message: str, *, level: int = logging.INFO, **fields: Any) -> None:
    """A line for the person who started the server (its banner, a start-up error): on stderr as it is
    in the text format, a log line with ``fields`` in the JSON one (so that a collector reads every line)."""
    if _format == "json":
        _say.log(level, message, extra={FIELDS: fields})
    else:
        print(message, file=sys.stderr, flush=True)


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, the record's fields, and any traceback."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, FIELDS, None)
        if isinstance(fields, dict):
            line.update((k, v) for k, v in fields.items() if k not in line)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def configure(level: str, log_format: LogFormat = "text") -> None:
    """memserve's own lines (requests, lifecycle events) on stderr at ``level``, in ``log_format``; uvicorn's
    only from warnings up (its access log would repeat each request line without the model, tokens or
    timings), in the same format: uvicorn is then started with ``log_config=None``. Calling it again
    replaces what an earlier call set."""
    global _format
    _format = log_format
    # The Logging HOWTO's "Optimization": neither format shows the caller's file and line, a thread or a
    # process, and finding them is most of what a request's log line costs (a py-spy put it at 6 % of the
    # gateway's time per request).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    handler._memserve = True  # type: ignore[attr-defined]  # marks the handler a later call replaces
    for name, name_level in (("memserve", level.upper()), ("uvicorn", "WARNING")):
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if getattr(h, "_memserve", False)]:
            logger.removeHandler(old)
        logger.addHandler(handler)
        logger.setLevel(name_level)
        logger.propagate = False
