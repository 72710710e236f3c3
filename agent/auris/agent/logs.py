"""Logging set-up for the daemons: human lines on a terminal, one JSON object per line otherwise
(journald, files, log shippers), or either one by choice (``log_format``). A log line written
while a gRPC call is served carries the call's request id (``REQUEST_ID``), which the collector
also returns to the caller in the ``x-request-id`` trailing metadata."""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import sys

__all__ = ["LOG_FORMATS", "REQUEST_ID", "JsonFormatter", "configure_logging"]

# "auto": JSON unless standard error is a terminal.
LOG_FORMATS = ("auto", "text", "json")
# The id of the gRPC call being served, for the log lines it causes ("" outside a call).
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("auris_request_id", default="")


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        rid = REQUEST_ID.get()
        record.request_id = rid
        record.request_suffix = f" (request {rid})" if rid else ""
        return True


class JsonFormatter(logging.Formatter):
    """{"time", "level", "logger", "message"} (+ "error" with the traceback's last line) per record."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        rid = getattr(record, "request_id", "")
        if rid:
            entry["request_id"] = rid
        if record.exc_info and record.exc_info[1] is not None:
            entry["error"] = f"{type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str, fmt: str = "auto") -> None:
    """Root logging to stderr: ``fmt`` "text", "json", or "auto" (JSON unless stderr is a terminal)."""
    if fmt == "auto":
        fmt = "text" if sys.stderr.isatty() else "json"
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestIdFilter())
    handler.setFormatter(
        JsonFormatter()
        if fmt == "json"
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s%(request_suffix)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
