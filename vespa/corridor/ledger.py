"""The ledger: per-request accounting, the single source of truth for load (pure, no IO, no clock).

Every request that is admitted or rejected ends here exactly once. The ledger produces the load
fields of ``worker_status`` (as PROTOCOL.md defines them), counted since the last report that
reached the autoscaler, and the finished-request records that ``delete_requests`` carries.
Memory is bounded: counters, the requests in flight, a bounded outbox of finished records and the
recent reqnums that ``num_requests_recieved`` counts.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Final


class Outcome(str, Enum):
    SUCCESS = "success"
    ERROR = "error"
    CANCELLED = "cancelled"
    REJECTED = "rejected"


# Entry and FinishedRequest are made once per request. Their ``__init__`` is written out: the
# compiled build then makes them as native objects (about 500 instructions), where a dataclass's
# generated ``__init__`` is interpreted Python (2,500; 10,000 for a frozen one). The dataclass
# decorator still writes their ``__repr__`` (and FinishedRequest's ``__eq__``).

@dataclass(eq=False, init=False)
class Entry:
    """A request in flight (queued or running)."""

    workload: float
    request_idx: int | None
    received_at: float
    started_at: float | None
    closed: bool
    in_session: bool  # a request inside a session: the session is what is reported

    def __init__(self, workload: float, request_idx: int | None, received_at: float,
                 started_at: float | None = None, closed: bool = False,
                 in_session: bool = False) -> None:
        self.workload = workload
        self.request_idx = request_idx
        self.received_at = received_at
        self.started_at = started_at
        self.closed = closed
        self.in_session = in_session


# A record's status as Vast's worker writes it. Vespa's one difference: a backend answer of 500
# or more is an Error here (Vast's worker records any relayed answer as a Success).
VAST_STATUS: Final = {Outcome.SUCCESS: "Success", Outcome.ERROR: "Error",
                      Outcome.CANCELLED: "Cancelled", Outcome.REJECTED: "Rejected"}


@dataclass(init=False)
class FinishedRequest:
    """One record for ``delete_requests``: how the request ended, the HTTP status it was answered
    with, and when it was received, started (None: never) and finished. Not changed once made."""

    request_idx: int
    outcome: Outcome
    status: int
    entered_queue_at: float
    work_started_at: float | None
    work_completed_at: float

    def __init__(self, request_idx: int, outcome: Outcome, status: int, entered_queue_at: float,
                 work_started_at: float | None, work_completed_at: float) -> None:
        self.request_idx = request_idx
        self.outcome = outcome
        self.status = status
        self.entered_queue_at = entered_queue_at
        self.work_started_at = work_started_at
        self.work_completed_at = work_completed_at

    @property
    def success(self) -> bool:
        """As the autoscaler counts it: a cancelled request is a success too."""
        return self.outcome is Outcome.SUCCESS or self.outcome is Outcome.CANCELLED

    def vast_json(self) -> str:
        """The record as JSON, as Vast's worker sends it in ``delete_requests``' ``requests``:
        timestamps are floats, 0.0 when the request never started, and ``work_completed_at`` is
        0.0 for a cancelled or rejected one. Written directly, timestamps to the microsecond:
        compiled, json.dumps of a dict per record cost six times as much (mostly the ``repr``
        of its floats)."""
        outcome = self.outcome
        completed = outcome is Outcome.SUCCESS or outcome is Outcome.ERROR
        started = self.work_started_at
        return (f'{{"request_idx": {self.request_idx}, '
                f'"success": {"true" if self.success else "false"}, '
                f'"status": "{VAST_STATUS[outcome]}", '
                f'"entered_queue_at": {json_time(self.entered_queue_at)}, '
                f'"work_started_at": {"0.0" if started is None else json_time(started)}, '
                f'"work_completed_at": {json_time(self.work_completed_at if completed else 0.0)}}}')


def json_time(seconds: float) -> str:
    """A timestamp (seconds since the epoch, or 0.0) as a JSON float rounded to the microsecond
    (a half up), with no trailing zeros but one: ``1765065432.123457``, ``1001.5``, ``0.0``.
    Written from its whole microseconds, three times cheaper than ``repr`` (whose shortest
    round-trip digits, 17 of them for a timestamp, cost 7,500 instructions); outside
    0 <= seconds < 9e9 (year 2255) as json.dumps writes it."""
    if not 0.0 <= seconds < 9e9:  # NaN too
        return json.dumps(seconds)
    # Not round(seconds * 1e6): that product is rounded to the float grid first (to a quarter
    # of a microsecond today, to a whole one from 2112 on, 2**52 us) and then to the
    # microsecond, which put one in eight of today's timestamps a microsecond off. The
    # fraction is exact (the low bits of ``seconds``); its microseconds (< 1e6) come within
    # 2**-33 of their value and, from 2**14 s on, lie a multiple of 2**-32 away from a half:
    # rounded exactly. Whole numbers kept in floats: every one is below 2**53 (9e15 + 1e6),
    # exact, and mypyc multiplies an int above 2**31 as a Python object.
    whole = float(int(seconds))
    micros = float(int((seconds - whole) * 1e6 + 0.5))
    digits = str(int(whole * 1e6 + micros))
    if len(digits) > 6:
        return f"{digits[:-6]}.{digits[-6:].rstrip('0') or '0'}"
    return f"0.{digits.rjust(6, '0').rstrip('0') or '0'}"


@dataclass
class LoadWindow:
    """Counters since the last report that reached the autoscaler."""

    new_load: float = 0.0
    rej_load: float = 0.0
    cur_perf: float = 0.0

    def minus(self, other: "LoadWindow") -> "LoadWindow":
        return LoadWindow(self.new_load - other.new_load, self.rej_load - other.rej_load,
                          self.cur_perf - other.cur_perf)


class DistinctReqnums:
    """``num_requests_recieved`` as Vast's worker counts it: the distinct reqnums received since
    start (it only grows). A request without a reqnum (unsigned, in dev mode) counts once.

    Vast's worker keeps every reqnum; this remembers the last ``remember`` distinct ones, so a
    reqnum seen again after that many others counts again. Reqnums come from the autoscaler's
    counter and grow; the same one comes back only with the same envelope (a replay), and soon."""

    def __init__(self, remember: int = 10_000):
        self.count = 0
        self.remember = remember
        self.recent: set[int] = set()
        self.order: deque[int] = deque()

    def add(self, reqnum: int | None) -> None:
        if reqnum is None:
            self.count += 1
            return
        if reqnum in self.recent:
            return
        self.count += 1
        self.recent.add(reqnum)
        self.order.append(reqnum)
        if len(self.order) > self.remember:
            self.recent.discard(self.order.popleft())


@dataclass
class Totals:
    """Lifetime counts, for metrics and tests."""

    received: int = 0
    rejected: int = 0
    outcomes: dict[str, int] = field(default_factory=lambda: {o.value: 0 for o in Outcome})
    workload_served: float = 0.0


class Ledger:
    def __init__(self, outbox_limit: int = 100_000):
        self.in_flight: set[Entry] = set()
        self.window = LoadWindow()
        self.received = DistinctReqnums()
        self.totals = Totals()
        self.outbox: deque[FinishedRequest] = deque()
        self.outbox_limit = outbox_limit
        self.dropped = 0

    # -- recording ---------------------------------------------------------------------------
    def receive(self, workload: float, request_idx: int | None, now: float,
                reqnum: int | None = None) -> Entry:
        """An admitted request (running or queued) enters the ledger (``reqnum``: its auth
        data's, None when it has none)."""
        entry = Entry(workload, request_idx, now)
        self.in_flight.add(entry)
        self.window.new_load += workload
        self.received.add(reqnum)
        self.totals.received += 1
        return entry

    def receive_in_session(self, workload: float, now: float) -> Entry:
        """A request inside an open session: its workload counts as received (and served) as
        Vast's worker counts it, but it is not in flight on its own and has no record; the
        session's own entry is both."""
        self.window.new_load += workload
        self.totals.received += 1
        return Entry(workload, None, now, in_session=True)

    def start(self, entry: Entry, now: float) -> None:
        entry.started_at = now

    def finish(self, entry: Entry, outcome: Outcome, status: int, now: float) -> None:
        """An admitted request ends; a second call for the same entry is ignored."""
        if entry.closed:
            return
        entry.closed = True
        if not entry.in_session:
            self.in_flight.discard(entry)
        self.totals.outcomes[outcome._value_] += 1  # .value is a Python-level property
        if outcome is Outcome.SUCCESS:
            self.window.cur_perf += entry.workload
            self.totals.workload_served += entry.workload
        elif outcome is Outcome.CANCELLED:
            self.window.new_load -= entry.workload
        elif outcome is Outcome.REJECTED:
            self.window.new_load -= entry.workload
            self.window.rej_load += entry.workload
            self.totals.rejected += 1
        self._record(entry.request_idx, outcome, status, entry.received_at, entry.started_at, now)

    def reject(self, workload: float, request_idx: int | None, status: int, now: float,
               reqnum: int | None = None) -> None:
        """A request turned away before admission (draining, blocked path): received, too."""
        self.window.rej_load += workload
        self.received.add(reqnum)
        self.totals.received += 1
        self.totals.rejected += 1
        self.totals.outcomes[Outcome.REJECTED.value] += 1
        self._record(request_idx, Outcome.REJECTED, status, now, None, now)

    def _record(self, request_idx: int | None, outcome: Outcome, status: int,
                received_at: float, started_at: float | None, now: float) -> None:
        if request_idx is None:
            return
        if len(self.outbox) >= self.outbox_limit:
            self.outbox.popleft()
            self.dropped += 1
        self.outbox.append(FinishedRequest(request_idx, outcome, status, received_at,
                                           started_at, now))

    # -- reporting ---------------------------------------------------------------------------
    @property
    def cur_load(self) -> float:
        return sum(e.workload for e in self.in_flight)

    def working_request_idxs(self) -> list[int]:
        return sorted(e.request_idx for e in self.in_flight if e.request_idx is not None)

    def load_fields(self) -> tuple[dict, LoadWindow]:
        """The load fields of a worker_status body, and the window they report."""
        sent = replace(self.window)  # a copy
        fields = {
            "cur_load": self.cur_load,
            # received minus cancelled since the last report; a request received before it and
            # cancelled after would make it negative: sent as 0, as Vast's own worker does (the
            # window is still settled by what it held, so the next report starts from 0)
            "new_load": max(sent.new_load, 0.0),
            "rej_load": sent.rej_load,
            "cur_perf": sent.cur_perf,
            "num_requests_working": len(self.in_flight),
            "num_requests_recieved": self.received.count,  # since start, as Vast's worker
            "working_request_idxs": self.working_request_idxs(),
        }
        return fields, sent

    def reported(self, sent: LoadWindow) -> None:
        """The report carrying ``sent`` reached the autoscaler: count only what came after."""
        self.window = self.window.minus(sent)

    def take_finished(self, limit: int) -> list[FinishedRequest]:
        """Up to ``limit`` finished records, oldest first, removed from the outbox."""
        batch: list[FinishedRequest] = []
        while self.outbox and len(batch) < limit:
            batch.append(self.outbox.popleft())
        return batch

    def put_back(self, batch: list[FinishedRequest]) -> None:
        """Return records whose delivery failed to the front of the outbox, in order."""
        self.outbox.extendleft(reversed(batch))
