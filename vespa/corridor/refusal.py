"""The refusal model: every answer the worker gives instead of the backend's is one ``Refused``.

A refusal carries a ``Reason`` (also the ``reason`` label of ``vespa_rejected_total``), the
message the client reads and any extra headers; its status and its ledger outcome come from the
one table below, so a reason that is not in it cannot be written. The corridor handler catches
``Refused`` in one place, answers it and accounts for it.
"""

from __future__ import annotations

from enum import Enum

from ..http.body import BodyStalled, BodyTooLarge
from ..http.messages import BodyError
from ..http.upstream import ProxyError
from .ledger import Outcome


class Reason(str, Enum):
    """Why the worker answered itself; the value is the metrics label."""

    BODY_SIZE = "body_size"
    BODY_STALLED = "body_stalled"
    BODY_MALFORMED = "body_malformed"
    TARGET = "target"
    ENVELOPE = "envelope"
    NO_KEY = "no_key"
    SIGNATURE = "signature"
    DRAINING = "draining"
    BLOCKED = "blocked"
    BACKEND_QUEUE = "backend_queue"
    OVERLOAD = "overload"
    QUEUE_TIMEOUT = "queue_timeout"
    BACKEND_FAILED = "backend_failed"
    BACKEND_TIMEOUT = "backend_timeout"
    BACKEND_BUSY = "backend_busy"
    SESSION_GONE = "session_gone"
    SESSION_LIMIT = "session_limit"


# reason -> (status, outcome in the ledger when the request is in it: received and counted)
RULES: dict[Reason, tuple[int, Outcome]] = {
    Reason.BODY_SIZE: (413, Outcome.ERROR),
    Reason.BODY_STALLED: (408, Outcome.ERROR),
    Reason.BODY_MALFORMED: (400, Outcome.ERROR),
    Reason.TARGET: (400, Outcome.ERROR),
    Reason.ENVELOPE: (422, Outcome.ERROR),
    Reason.NO_KEY: (503, Outcome.ERROR),
    Reason.SIGNATURE: (401, Outcome.ERROR),
    Reason.DRAINING: (503, Outcome.REJECTED),
    Reason.BLOCKED: (403, Outcome.REJECTED),
    Reason.BACKEND_QUEUE: (429, Outcome.REJECTED),
    Reason.OVERLOAD: (429, Outcome.REJECTED),
    Reason.QUEUE_TIMEOUT: (429, Outcome.REJECTED),
    Reason.BACKEND_FAILED: (502, Outcome.ERROR),
    Reason.BACKEND_TIMEOUT: (504, Outcome.ERROR),
    Reason.BACKEND_BUSY: (503, Outcome.REJECTED),
    Reason.SESSION_GONE: (410, Outcome.ERROR),
    Reason.SESSION_LIMIT: (429, Outcome.REJECTED),
}


class Refused(Exception):
    """The worker's own answer to a request: ``status`` and ``outcome`` follow from ``reason``."""

    def __init__(self, reason: Reason, message: str, headers: dict[str, str] | None = None,
                 **extra: object):
        super().__init__(message)
        self.reason = reason
        self.status, self.outcome = RULES[reason]
        self.message = message
        self.headers = headers
        self.extra = extra  # more fields of the JSON answer


def refusal_for(error: Exception) -> Refused:
    """The refusal for one of ``REFUSING``: a ``Refused`` as it is, a request body that could
    not be read (``http.body``'s errors), or a backend that failed before its answer started."""
    if isinstance(error, Refused):
        return error
    if isinstance(error, ProxyError):
        if error.status == 503:  # every connection stayed busy: it may go elsewhere
            return Refused(Reason.BACKEND_BUSY, error.message, {"Retry-After": "1"})
        return Refused(Reason.BACKEND_TIMEOUT if error.status == 504 else Reason.BACKEND_FAILED,
                       error.message)
    if isinstance(error, BodyTooLarge):
        return Refused(Reason.BODY_SIZE, str(error))
    if isinstance(error, BodyStalled):  # the connection closes after this answer
        return Refused(Reason.BODY_STALLED, str(error))
    # malformed framing, or the client left mid-body: the connection closes after this answer
    return Refused(Reason.BODY_MALFORMED, f"request body cannot be read: {error}")


BODY_ERRORS = (BodyTooLarge, BodyStalled, BodyError)
REFUSING = (Refused, ProxyError, *BODY_ERRORS)  # what ``refusal_for`` turns into a refusal
