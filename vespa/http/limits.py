"""What the front server refuses before a handler sees a request: the limits of a request head,
the answer it writes itself, and logs of refusals and failures a hostile client cannot
flood."""

from __future__ import annotations

import json
import logging
import time

from .messages import JSON_TYPE, REASONS, HttpError, http_date

log = logging.getLogger("vespa.front")

MAX_TARGET = 8190
MAX_HEAD = 64 * 1024
MAX_FIELDS = 128
# repeated, these make a request ambiguous (which Host? which length?): refused, as aiohttp does
SINGLETON_FIELDS = frozenset({
    b"content-length", b"content-location", b"content-range", b"content-type", b"etag",
    b"host", b"max-forwards", b"server", b"transfer-encoding", b"user-agent",
})


def error_answer(status: int, message: str) -> bytes:
    """A refusal the server writes itself (then closes the connection)."""
    body = json.dumps({"error": message}).encode()
    return b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nDate: %s\r\n" \
           b"Connection: close\r\n\r\n%s" % (
               status, REASONS.get(status, b""), JSON_TYPE, len(body), http_date(), body)


class Throttle:
    """At most one log line per ``interval`` seconds, each saying how many were held back since
    the one before: a hostile client cannot flood the log, and nothing goes uncounted."""

    def __init__(self, interval: float = 60.0):
        self.interval = interval
        self.next_at = 0.0
        self.suppressed = 0

    def due(self) -> str | None:
        """None: no line now (this one is counted); else a line is due, and this is what ends
        it: how many were held back ("" when none)."""
        now = time.monotonic()
        if now < self.next_at:
            self.suppressed += 1
            return None
        self.next_at = now + self.interval
        # held back since the line before, which is at least ``interval`` ago (maybe far more)
        more = f" ({self.suppressed} more since the last such line)" if self.suppressed else ""
        self.suppressed = 0
        return more


class RefusalLog(Throttle):
    """Requests refused before a handler (malformed, too many connections) are the client's
    fault: one WARNING line a minute at most."""

    def note(self, peer: str, error: HttpError) -> None:
        more = self.due()
        if more is not None:
            log.warning("refused a request from %s: %d %s%s", peer, error.status,
                        " ".join(error.message.split())[:200], more)


class FailureLog(Throttle):
    """Requests a handler failed on (a bug, or input the code did not foresee; answered 500):
    one ERROR line with its traceback a minute at most, so a client that can trigger one
    cannot fill the disk with tracebacks."""

    def note(self, what: str, error: BaseException) -> None:
        more = self.due()
        if more is not None:
            log.error("%s failed%s", what, more, exc_info=error)
