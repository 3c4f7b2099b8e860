"""The corridor: one request from the front server to the backend and back, accounted once.

    envelope (413 400 408 422) -> signature (503 401) -> door (503 403) -> ledger.receive
      -> admission (429) -> upstream proxy (502 504, and body errors) -> ledger.finish

Every "no" is a ``refusal.Refused``, answered and counted in ``handle``; a request that got past
the door ends in the ledger exactly once (``serve``); a request whose signature fails is not
load and never enters it. Any other exception is a bug: counted as a 500 (an error in the
ledger), then left to the front server, which answers 500 and logs its traceback (once a minute
at most). Paths under ``/_vespa/``, Vast's sessions and ``/pyworker/update`` (Vast's platform
calls it) are the worker's own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from ..http.messages import Request
from ..http.target import origin_form, path_of
from ..http.upstream import Upstream, UpstreamBroken
from ..observability.metrics import Metrics
from ..state import WorkerState
from .admission import Admission, Ticket, workload_of
from .answer import refusal_answer
from .doorway import Doorway, log_access
from .envelope import Envelope, EnvelopeError
from .gate import Gate, Overloaded
from .ledger import Entry, Ledger, Outcome
from .refusal import REFUSING, Reason, Refused, refusal_for
from .request_ids import current_request_id, request_id
from .session_desk import ROUTES as SESSION_ROUTES
from .session_desk import SessionDesk
from .sessions import Session
from .visit import CLIENT_CLOSED, Visit

log = logging.getLogger("vespa")
RESERVED_PREFIX = "/_vespa/"
OWN_PREFIXES = (RESERVED_PREFIX, "/session/", "/pyworker/")  # the worker's own paths
# Vast's platform calls these on a worker (Vast's own worker serves them): the worker's own too
UPDATE_ROUTE = "/pyworker/update"
PLATFORM_ROUTES = frozenset({UPDATE_ROUTE})

OwnRoutes = Callable[[Request, str], Awaitable[None]]  # (request, path): the worker's own routes
Recorder = Callable[[Request, Visit, "float | None"], None]  # keeps a request record


class Corridor:
    def __init__(self, doorway: Doorway, ledger: Ledger, admission: Admission, gate: Gate,
                 upstream: Upstream, metrics: Metrics, state: WorkerState, own: OwnRoutes,
                 desk: SessionDesk, default_cost: float):
        self.doorway = doorway  # envelope, signature and the door's refusals
        self.desk = desk  # Vast's sessions
        self.ledger = ledger
        self.admission = admission
        self.gate = gate
        self.upstream = upstream
        self.metrics = metrics
        self.state = state
        self.own = own
        self.default_cost = default_cost
        self.record: Recorder | None = None  # set when request records are on
        self.wants_record: Callable[[], bool] | None = None
        self.capture = 0  # body bytes a request record keeps
        self.backend_queue_full: Callable[[], str | None] | None = None  # why vLLM is too busy
        self.idle = asyncio.Event()  # set when the last request in flight ends

    def dispatch(self, request: Request) -> Awaitable[None]:
        """The front server's handler: the worker's own routes (under /_vespa/, Vast's sessions
        and /pyworker/update), everything else to the backend. It hands back the coroutine that
        serves the request (one level less)."""
        target = origin_form(request.target)  # None: no path to serve, the envelope says 400
        if target is not None and target.startswith(OWN_PREFIXES):
            path = path_of(target)
            if path in SESSION_ROUTES:
                return self.desk.serve(request, path)
            if target.startswith(RESERVED_PREFIX) or path in PLATFORM_ROUTES:
                return self.own(request, path)
        return self.handle(request, target)

    async def handle(self, request: Request, target: str | None) -> None:
        """Serve one request for the backend (``target``: its origin form) and account for it."""
        rid = request_id(request.header(b"x-request-id"))
        current_request_id.set(rid)
        wants = self.wants_record
        visit = Visit(rid, wants is not None and wants(), self.capture)
        try:
            envelope = visit.envelope = await self.doorway.open(request, target)
            session = None if envelope.session_id is None else self.desk.member(envelope)  # 410
            if self.doorway.must_verify(envelope) and \
                    (session is None or not session.vouches_for(envelope.auth_data)):
                verdict = self.doorway.first_verdict(envelope)  # no await when signed right
                if not verdict.ok:
                    await self.doorway.settle(envelope, verdict)
            workload = self.admission.bounded(workload_of(envelope.cost, self.default_cost))
            self.at_the_door(request, target, envelope, workload, visit, session)
            await self.serve(request, envelope, workload, visit, session)
        except Refused as refused:
            self.metrics.rejected(refused.reason)
            visit.status = refused.status
            answer = visit.response = refusal_answer(refused, rid)
            answer.send(request)
        except Exception:  # a bug: counted as the 500 the front server answers (and logs)
            if visit.status == CLIENT_CLOSED:  # nothing was answered before it
                visit.status = 500
            raise
        finally:
            self.account(request, visit, target)

    def at_the_door(self, request: Request, target: str | None, envelope: Envelope,
                    workload: float, visit: Visit, session: Session | None) -> None:
        """Refuse a signed-right request the worker will not take (draining, a blocked path):
        received and rejected in the ledger at once (in a session: no record of its own, the
        session's request_idx is the session's)."""
        refused = self.doorway.refusal(target, self.state.draining)
        if refused is not None:
            if session is None:
                self.ledger.reject(workload, envelope.request_idx, refused.status, time.time(),
                                   envelope.reqnum)
            else:
                self.ledger.reject(workload, None, refused.status, time.time())
            visit.outcome = Outcome.REJECTED
            raise refused

    async def serve(self, request: Request, envelope: Envelope, workload: float,
                    visit: Visit, session: Session | None) -> None:
        """Admit, queue and proxy a request that is in the ledger from here on; it is finished
        there exactly once, with how it ended (a client that left: cancelled, 499; a backend
        that failed: an error, its status or 502 when it broke off mid-answer)."""
        entry = self.enter(request, envelope, workload, visit, session)
        visit.outcome = Outcome.CANCELLED
        ticket = None
        try:
            ticket = self.admit(workload, envelope)
            if not ticket.started:
                await self.wait_turn(ticket, envelope)
            visit.started_at = now = time.time()
            self.ledger.start(entry, now)
            status = await self.upstream.forward(request, visit.rid, envelope.body,
                                                 envelope.path_qs, visit.exchange,
                                                 envelope.auth_data is not None)
            visit.outcome = Outcome.SUCCESS if status < 500 else Outcome.ERROR
            visit.status = status
        except UpstreamBroken as broken:  # its answer had started: the client's connection is cut
            visit.outcome, visit.status = Outcome.ERROR, 502
            log.warning("request %s: %s", visit.rid, broken)
        except REFUSING as failure:  # refused, or the backend or the request body failed
            refused = refusal_for(failure)
            visit.outcome, visit.status = refused.outcome, refused.status
            raise refused from None
        except Exception:  # a bug: an error (500), not a client that left
            visit.outcome, visit.status = Outcome.ERROR, 500
            raise
        finally:
            if ticket is not None:
                self.gate.leave(ticket)
            self.ledger.finish(entry, visit.outcome, visit.status, time.time())
            if session is not None:
                session.requests.discard(request)
            elif not self.ledger.in_flight:
                self.idle.set()

    def enter(self, request: Request, envelope: Envelope, workload: float, visit: Visit,
              session: Session | None) -> Entry:
        """The request's ledger entry; in a session, the session is what is reported, and the
        request can be cut when it ends."""
        if session is None:
            self.idle.clear()  # set again when the last request in flight ends
            return self.ledger.receive(workload, envelope.request_idx, visit.received_at,
                                       envelope.reqnum)
        session.requests.add(request)
        self.desk.sessions.extend(session, visit.received_at)
        return self.ledger.receive_in_session(workload, visit.received_at)

    def admit(self, workload: float, envelope: Envelope) -> Ticket:
        """A ticket to run now or to wait in line; ``Refused`` (429) when there is none."""
        why = self.backend_queue_full() if self.backend_queue_full is not None else None
        if why is not None:
            raise Refused(Reason.BACKEND_QUEUE, why, {"Retry-After": "1"})
        try:
            return self.gate.admit(workload)
        except Overloaded as overload:
            raise self.overloaded(overload, envelope) from None

    async def wait_turn(self, ticket: Ticket, envelope: Envelope) -> None:
        try:
            await self.gate.wait(ticket)
        except Overloaded as overload:
            raise self.overloaded(overload, envelope) from None

    @staticmethod
    def overloaded(overload: Overloaded, envelope: Envelope) -> Refused:
        rejection = overload.rejection
        message = rejection.message
        if envelope.auth_data is not None:  # its signature is spent: route again
            message += " through the autoscaler's /route/ (a signature is good once)"
        return Refused(rejection.reason, message, {"Retry-After": str(rejection.retry_after)})

    def account(self, request: Request, visit: Visit, target: str | None) -> None:
        """Metrics (and, when on, a request record) for one answered request (``target``: its
        origin form, so ``http://host/path`` counts under the route of ``/path``)."""
        exchange = visit.exchange
        upstream = ttfb = None
        if exchange.sent_at:
            upstream = time.perf_counter() - exchange.sent_at
            if exchange.head_at:
                ttfb = exchange.head_at - exchange.sent_at
        path = path_of(target) if target is not None and target != request.target \
            else request.path
        self.metrics.request_done(request.method, path, visit.status, upstream, ttfb,
                                  exchange.bytes_in, exchange.bytes_out)
        if visit.record and self.record is not None:
            self.record(request, visit, ttfb)
        log_access(request, visit)
