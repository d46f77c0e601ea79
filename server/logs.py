"""Log set-up: plain text, or one JSON object a line (BEYOND_LOG_FORMAT=json) for log shippers.

Every process logs in the one format: the API, uvicorn's own loggers and the worker. uvicorn's
access log is off; `server/http/middleware.py` writes ours (route template, never the query string).
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import threading
import time

# Fields the access log attaches to its records; bodies (and so base64 images) and keys never are.
FIELDS = ("event", "method", "route", "status", "request_id", "seconds", "caller")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


class TextFormatter(logging.Formatter):
    """The text format, with the date part of the time formatted once a second (a line per request)."""

    _second: int | None = None
    _date = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        second = int(record.created)
        if second != self._second:
            self._second, self._date = second, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        return f"{self._date},{int(record.msecs):03d}"


class JsonFormatter(TextFormatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({name: getattr(record, name) for name in FIELDS if hasattr(record, name)})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure(level: str, fmt: str) -> None:
    # No record needs its caller's file and line, thread or process: finding them walks the stack on
    # every line (the logging documentation's own advice for a hot path).
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    logging.captureWarnings(True)  # library warnings in the same format, not raw on stderr
    # uvicorn's loggers carry handlers of their own; through ours they keep one format.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    logging.getLogger("uvicorn.access").disabled = True
    buffer_access_log(handler)
    # httpx logs every request's full URL at info: an input URL's query can carry a signature.
    logging.getLogger("httpx").setLevel(logging.WARNING)


ACCESS_FLUSH = 0.5  # seconds an access line may wait in memory


def buffer_access_log(target: logging.Handler) -> None:
    """The access log (a line per request) is written in batches, at least every ACCESS_FLUSH seconds:
    a write and flush per request cost a polled status endpoint a third of its throughput. Other
    loggers write at once; logging's exit handler flushes what is left."""
    access = logging.getLogger("beyond.access")
    buffered = logging.handlers.MemoryHandler(capacity=512, flushLevel=logging.ERROR, target=target)
    access.handlers = [buffered]
    access.propagate = False

    def flush_often() -> None:
        while True:
            time.sleep(ACCESS_FLUSH)
            buffered.flush()

    threading.Thread(target=flush_often, name="access-log", daemon=True).start()


class RateLimitedLog:
    """One line per distinct message per `every` seconds: a broken store must not flood the log."""

    def __init__(self, logger: logging.Logger, every: float = 60.0) -> None:
        self.logger, self.every = logger, every
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def _due(self, key: str) -> bool:
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(key, -self.every) < self.every:
                return False
            self._last[key] = now
            return True

    def error(self, message: str, *args: object) -> None:
        if self._due(message % args):
            self.logger.error(message, *args)

    def exception(self, message: str, *args: object) -> None:
        if self._due(message % args):
            self.logger.exception(message, *args)
