"""Structured logging on the ``imagerouter`` logger, with secrets redacted.

The router logs one record per request outcome (INFO on success, WARNING on failure)
and one per failed attempt (INFO), each with these ``extra`` fields: ``request_id``,
``provider``, ``model``, ``outcome``, ``cost_usd``, ``latency_s`` (and ``error``,
``retry``, ``policy``, ``attempts`` where they apply). Prompts are never logged unless
prompt recording is switched on (``record_prompts=True`` /
``IMAGEROUTER_OTEL_RECORD_PROMPTS=1``), which adds a ``prompt`` field.

:class:`RedactingFilter` is installed on the ``imagerouter`` logger when this module
is imported (the router imports it), so it applies whatever handler the app adds.
:class:`JsonFormatter` writes JSON lines for apps that want them::

    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    logging.getLogger("imagerouter").addHandler(handler)
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

from router.errors import redact

LOGGER = "imagerouter"
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime", "taskName"}


class RedactingFilter(logging.Filter):
    """Masks API keys and bearer tokens in a record's message, string extras and traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message or record.args:
            record.msg, record.args = clean, None
        for key, value in record.__dict__.items():
            if key not in _STANDARD and isinstance(value, str):
                record.__dict__[key] = redact(value)
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, every ``extra`` field, and the exception."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exception"] = record.exc_text
        return json.dumps(out, default=str, ensure_ascii=False)


def install_redaction(logger: logging.Logger | str = LOGGER) -> logging.Logger:
    """Put a :class:`RedactingFilter` on ``logger`` (once); return the logger."""
    log = logging.getLogger(logger) if isinstance(logger, str) else logger
    if not any(isinstance(f, RedactingFilter) for f in log.filters):
        log.addFilter(RedactingFilter())
    return log


install_redaction()

__all__ = ["LOGGER", "JsonFormatter", "RedactingFilter", "install_redaction"]
