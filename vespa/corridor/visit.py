"""One request's walk through the worker: what metrics and request records need of it.

A ``Visit`` is filled in along the corridor (envelope, admission, upstream exchange) and read
once when the request is answered (``observability.recording`` turns it into a request record).
"""

from __future__ import annotations

import time

from ..http.upstream import Exchange
from .answer import Answer
from .envelope import PASSTHROUGH, Envelope
from .ledger import Outcome

CLIENT_CLOSED = 499  # nginx's code for "client closed the request"


class Visit:
    __slots__ = ("rid", "record", "received_at", "started_at", "envelope", "exchange",
                 "status", "outcome", "response")

    def __init__(self, rid: str, record: bool, capture: int):
        self.rid = rid
        self.record = record  # a request record is wanted
        self.received_at = time.time()
        self.started_at: float | None = None
        self.envelope: Envelope = PASSTHROUGH
        self.exchange = Exchange(capture if record else None)
        self.status = CLIENT_CLOSED  # until something is answered
        self.outcome: Outcome | None = None  # None: refused before admission
        self.response: Answer | None = None  # the worker's own answer; None: relayed
