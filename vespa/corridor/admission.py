"""Admission: who starts now, who waits in line, who is turned away (pure, no IO, no clock).

Two rules. The wait rule: the estimated wait (workload already admitted ÷ max throughput) must not
exceed the max wait time, else the request is rejected with a Retry-After; the rule is off until a
throughput is known. The concurrency rule: at most ``limit`` requests run at once, the rest wait
in strict FIFO order. ``vespa.gate`` is the asyncio face of this state machine.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from .refusal import Reason


@dataclass(eq=False, init=False)
class Ticket:
    """One admitted request: its workload and whether it has started running. (Made once per
    request: ``__init__`` written out makes it a native object in the compiled build, as
    ledger.Entry.)"""

    workload: float
    started: bool
    done: bool

    def __init__(self, workload: float, started: bool = False, done: bool = False) -> None:
        self.workload = workload
        self.started = started
        self.done = done


@dataclass(frozen=True)
class Rejection:
    """Why a request was turned away and when the client should try again."""

    reason: Reason
    retry_after: int
    message: str


# The most workload one request counts for. The autoscaler signs whatever cost a client asked
# /route/ for, 1e308 included; sums of such costs overflow to inf and then NaN, which would
# poison the admitted workload and every report after it. A billion units (tokens, for an LLM)
# is far beyond any real request and keeps every sum finite and exact enough.
MAX_WORKLOAD = 1e9


def workload_of(cost: float | None, default_cost: float) -> float:
    """A request's workload: its cost, or the default when there is none or it is <= 1 (or not a
    finite number); at most ``MAX_WORKLOAD``."""
    if cost is None or not (cost > 1.0) or math.isinf(cost):
        return default_cost
    return min(float(cost), MAX_WORKLOAD)


class Admission:
    """The admission state: running count, FIFO line, admitted workload."""

    def __init__(self, limit: int | None, max_wait_time: float,
                 max_throughput: float | None = None):
        if limit is not None and limit < 1:
            raise ValueError("limit must be >= 1 or None")
        self.limit = limit
        self.max_wait_time = max_wait_time
        self.max_throughput = max_throughput
        self.running = 0
        self.line: deque[Ticket] = deque()
        self.workload = 0.0

    @property
    def queued(self) -> int:
        return len(self.line)

    @property
    def queued_workload(self) -> float:
        return sum(t.workload for t in self.line)

    def estimated_wait(self) -> float | None:
        """Seconds a new request would wait behind the admitted workload; None if unknown."""
        if not self.max_throughput:
            return None
        return self.workload / self.max_throughput

    def bounded(self, workload: float) -> float:
        """``workload``, at most what the worker accepts to queue (max wait × throughput, once
        the throughput is known): under url-only signatures the cost is the client's choice,
        and one request must neither block every other nor inflate the reports."""
        if self.max_throughput:
            return min(workload, self.max_wait_time * self.max_throughput)
        return workload

    def admit(self, workload: float) -> Ticket | Rejection:
        """Admit a request (running or in line) or reject it for overload."""
        wait = self.estimated_wait()
        if wait is not None and wait > self.max_wait_time:
            retry_after = max(1, math.ceil(wait - self.max_wait_time))
            return Rejection(
                Reason.OVERLOAD, retry_after,
                f"worker overloaded: estimated wait {wait:.1f}s exceeds the "
                f"{self.max_wait_time:g}s limit; retry in {retry_after}s")
        ticket = Ticket(workload)
        self.workload += workload
        if self.limit is None or (self.running < self.limit and not self.line):
            ticket.started = True
            self.running += 1
        else:
            self.line.append(ticket)
        return ticket

    def finish(self, ticket: Ticket) -> list[Ticket]:
        """Release a ticket (finished, or left the line); returns the tickets that start now."""
        if ticket.done:
            return []
        ticket.done = True
        self.workload -= ticket.workload
        if self.workload < 1e-9:
            self.workload = 0.0
        if ticket.started:
            self.running -= 1
        else:
            self.line.remove(ticket)
        return self._start_next()

    def _start_next(self) -> list[Ticket]:
        started = []
        while self.line and (self.limit is None or self.running < self.limit):
            ticket = self.line.popleft()
            ticket.started = True
            self.running += 1
            started.append(ticket)
        return started

    def queue_timeout(self) -> Rejection:
        """The rejection for a request that waited in line for the whole max wait time."""
        retry_after = max(1, math.ceil(self.estimated_wait() or self.max_wait_time))
        return Rejection(
            Reason.QUEUE_TIMEOUT, retry_after,
            f"worker busy: request waited {self.max_wait_time:g}s in line without starting; "
            f"retry in {retry_after}s")
