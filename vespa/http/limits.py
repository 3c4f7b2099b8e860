"""What the front server refuses before a handler sees a request: the limits of a request head,
the answer it writes itself, and a log of refusals a hostile client cannot flood."""

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


class RefusalLog:
    """Requests refused before a handler (malformed, too many connections) are the client's
    fault: at most one WARNING line per ``interval`` seconds, with how many there were, so a
    hostile client cannot flood the log."""

    def __init__(self, interval: float = 60.0):
        self.interval = interval
        self.next_at = 0.0
        self.suppressed = 0

    def note(self, peer: str, error: HttpError) -> None:
        now = time.monotonic()
        if now < self.next_at:
            self.suppressed += 1
            return
        self.next_at = now + self.interval
        more = (f" ({self.suppressed} more in the last {self.interval:g}s)"
                if self.suppressed else "")
        self.suppressed = 0
        log.warning("refused a request from %s: %d %s%s", peer, error.status,
                    " ".join(error.message.split())[:200], more)
