"""Log set-up: text or one-JSON-object-per-line output, the current request id, secret redaction.

The handler's filters stamp every record with ``current_request_id`` (a ContextVar the request
handler sets) and replace each configured secret with a short prefix, so tokens never reach a log.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import IO, Iterable

from ..corridor.request_ids import current_request_id


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(request_tag)s: %(message)s"
MIN_SECRET_LENGTH = 4  # shorter values would garble every log line; nothing real is that short
PREFIX_SHOWN_FROM = 12  # secrets at least this long keep a 4-character prefix, shorter ones none
ELLIPSIS = "…"


def mask(secret: str) -> str:
    """What a secret becomes in the logs: its first 4 characters and an ellipsis at most."""
    return (secret[:4] if len(secret) >= PREFIX_SHOWN_FROM else "") + ELLIPSIS


class Redactor:
    """Replaces every occurrence of each secret in text, or of its UTF-8 bytes in bytes."""

    def __init__(self, secrets: Iterable[str | None]):
        kept = {s for s in secrets if s and len(s) >= MIN_SECRET_LENGTH}
        # longest first, so a secret containing another one is replaced whole
        self.pairs = [(s, mask(s)) for s in sorted(kept, key=len, reverse=True)]
        self.byte_pairs = sorted(((s.encode(), m.encode()) for s, m in self.pairs),
                                 key=lambda pair: len(pair[0]), reverse=True)

    def __call__(self, text: str) -> str:
        for secret, masked in self.pairs:
            if secret in text:
                text = text.replace(secret, masked)
        return text

    def redact_bytes(self, data: bytes) -> bytes:
        """``data`` with each secret's UTF-8 bytes replaced by its mask's; every other byte
        (valid UTF-8 or not) as it was: output kept as a process wrote it, such as a log file."""
        for secret, masked in self.byte_pairs:
            if secret in data:
                data = data.replace(secret, masked)
        return data

    @property
    def longest(self) -> int:
        """The length in bytes of the longest secret (0 when there is none)."""
        return len(self.byte_pairs[0][0]) if self.byte_pairs else 0


class RedactingFilter(logging.Filter):
    """A handler filter: renders the message (args included) and exception text, then redacts."""

    def __init__(self, redactor: Redactor):
        super().__init__()
        self.redactor = redactor
        self.exception_formatter = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.redactor.pairs:
            return True
        redact = self.redactor
        record.msg = redact(record.getMessage())
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = self.exception_formatter.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
            # the text is final; drop the live exception so no formatter renders it again
            record.exc_info = None
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


class RequestIdFilter(logging.Filter):
    """A handler filter: stamps ``record.request_id`` from ``current_request_id``."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = current_request_id.get()
        record.request_tag = f" [{record.request_id}]" if record.request_id else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id, exception."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            entry["request_id"] = request_id
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = record.stack_info
        return json.dumps(entry, ensure_ascii=False, default=str)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{seconds}.{int(record.msecs):03d}Z"


def make_handler(fmt: str = "text", secrets: Iterable[str | None] = (),
                 stream: IO[str] | None = None) -> logging.Handler:
    """A stream handler with the request-id and redaction filters and the chosen format."""
    if fmt not in ("text", "json"):
        raise ValueError(f"log format must be 'text' or 'json', not {fmt!r}")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.addFilter(RedactingFilter(Redactor(secrets)))
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    handler.vespa_handler = True  # marks ours, so set-up can run again without duplicating
    return handler


def setup_logging(level: str = "INFO", fmt: str = "text", secrets: Iterable[str | None] = (),
                  stream: IO[str] | None = None) -> logging.Handler:
    """Configure the root logger (replacing a handler installed earlier by this function).

    ``secrets``: values that must never be logged (master token, logs token, API keys); empty
    and None values are ignored. The access log (``vespa.access``) is on only at DEBUG.
    """
    handler = make_handler(fmt, secrets, stream)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "vespa_handler", False)]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level.upper())
    # an access line per request would cost as much as the proxying itself; off unless debugging
    logging.getLogger("vespa.access").setLevel(
        logging.INFO if level.upper() == "DEBUG" else logging.WARNING)
    return handler
