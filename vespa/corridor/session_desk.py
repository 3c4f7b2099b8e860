"""The session desk: Vast's ``/session/create``, ``/end``, ``/get`` and ``/health`` routes, and
the ending of sessions (by ``end``, by the expiry sweep, by the drain).

``create`` takes a signed envelope like any request (the signature is checked, unlike Vast's
worker) and puts the session in the ledger: its workload is the create's cost, in flight until
it ends, and it gets one delete record then. The other routes take ``{"session_id",
"session_auth"}``, where ``session_auth`` is the auth data the session was created with. Ending
a session cuts its requests in flight and POSTs its ``on_close_route`` to the backend.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable

from ..http.body import BodyStalled, BodyTooLarge, read_body
from ..http.messages import BodyError, Request
from ..observability.metrics import Metrics
from ..state import WorkerState
from .admission import Admission, workload_of
from .answer import Answer, json_answer, json_error, refusal_answer
from .doorway import Doorway
from .envelope import Envelope
from .ledger import Ledger, Outcome
from .refusal import Reason, Refused
from .request_ids import request_id
from .sessions import Session, SessionInputError, Sessions, close_body, plan_from

ROUTES = ("/session/create", "/session/end", "/session/get", "/session/health")
CALL_BODY_LIMIT = 64 * 1024  # {"session_id", "session_auth"}: small
# (backend path, JSON body) -> the POST on its way (best effort, bounded), to wait for or not
OnClose = Callable[[str, dict], Awaitable[None]]


class SessionDesk:
    def __init__(self, sessions: Sessions, doorway: Doorway, ledger: Ledger, metrics: Metrics,
                 state: WorkerState, default_cost: float, body_read_timeout: float,
                 on_close: OnClose, admission: Admission):
        self.sessions = sessions
        self.admission = admission
        self.doorway = doorway
        self.ledger = ledger
        self.metrics = metrics
        self.state = state
        self.default_cost = default_cost
        self.body_read_timeout = body_read_timeout
        self.on_close = on_close
        self.calls: dict[str, Callable[[Request, str], Awaitable[Answer]]] = {
            "/session/create": self.create, "/session/end": self.end,
            "/session/get": self.get, "/session/health": self.health}

    # -- requests in a session -----------------------------------------------------------------
    def member(self, envelope: Envelope) -> Session:
        """The open session a request names; ``Refused`` (410) when it is unknown or ended."""
        assert envelope.session_id is not None
        session = self.sessions.get(envelope.session_id)
        if session is None:
            raise Refused(Reason.SESSION_GONE, "invalid session: it ended, expired or never "
                                               "existed; create a new one")
        return session

    # -- the routes ----------------------------------------------------------------------------
    async def serve(self, request: Request, path: str) -> None:
        """Answer one of ``ROUTES`` (POST only) and count it."""
        rid = request_id(request.header(b"x-request-id"))
        try:
            if request.method != "POST":
                answer = json_error(405, f"{path} takes POST", rid, {"Allow": "POST"})
            else:
                answer = await self.calls[path](request, rid)
        except Exception:  # a bug: counted as the 500 the front server answers (and logs)
            self.metrics.request_done(request.method, path, 500, None, None, 0, 0)
            raise
        answer.send(request)
        self.metrics.request_done(request.method, path, answer.status, None, None, 0,
                                  len(answer.body))

    def serve_end_only(self, request: Request) -> Awaitable[None]:
        """The plain-HTTP session port's handler (``VESPA_WORKER_HTTP_PORT``): only
        ``POST /session/end``."""
        path = request.path
        if path != "/session/end":
            return self.not_here(request, path)
        return self.serve(request, path)

    @staticmethod
    async def not_here(request: Request, path: str) -> None:
        json_error(404, f"no route {path} on the session port: it serves POST /session/end",
                   request_id(request.header(b"x-request-id"))).send(request)

    async def create(self, request: Request, rid: str) -> Answer:
        try:
            envelope = await self.doorway.open(request, "/session/create")
            if envelope.auth_data is None:
                raise Refused(Reason.ENVELOPE, 'a session is created with an envelope {"auth_data":'
                                               ' ..., "payload": {"lifetime": seconds}}')
            if self.doorway.must_verify(envelope):
                await self.doorway.check_signature(envelope)
            try:
                plan = plan_from(json.loads(envelope.body or b"null"))
            except SessionInputError as invalid:
                raise Refused(Reason.ENVELOPE, str(invalid)) from None
            route = plan.on_close_route
            if route is not None and self.doorway.refusal(route, False) is not None:
                raise Refused(Reason.BLOCKED, f"on_close_route {route[:200]} is blocked on this "
                                              "worker (VESPA_BLOCKED_PATHS)")
            now = time.time()
            workload = self.admission.bounded(workload_of(envelope.cost, self.default_cost))
            refused = self.refusal()
            if refused is not None:  # received and rejected at once
                self.ledger.reject(workload, envelope.request_idx, refused.status, now,
                                   envelope.reqnum)
                raise refused
            entry = self.ledger.receive(workload, envelope.request_idx, now, envelope.reqnum)
            self.ledger.start(entry, now)
            session = self.sessions.create(envelope.auth_data, plan, entry, now)
        except Refused as refused:
            self.metrics.rejected(refused.reason)
            return refusal_answer(refused, rid)
        return json_answer(201, {"session_id": session.session_id,
                                 "expiration": session.expiration})

    def refusal(self) -> Refused | None:
        if self.state.draining:
            return Refused(Reason.DRAINING, "worker is shutting down; create the session on "
                                            "another worker", {"Retry-After": "1"})
        if self.sessions.full:
            return Refused(Reason.SESSION_LIMIT, f"worker holds its maximum of "
                                                 f"{self.sessions.limit} sessions "
                                                 "(VESPA_MAX_SESSIONS); route again",
                           {"Retry-After": "1"})
        return None

    async def end(self, request: Request, rid: str) -> Answer:
        call = await self.call(request, rid)
        if isinstance(call, Answer):
            return call
        closing = self.close(call.session_id, "ended")
        if closing is not None:  # as Vast's worker: the backend has heard before the answer
            await asyncio.shield(closing)  # a client that leaves does not cancel it
        return json_answer(200, {"ended": True, "removed_session": call.session_id})

    async def get(self, request: Request, rid: str) -> Answer:
        call = await self.call(request, rid)
        return call if isinstance(call, Answer) else json_answer(200, call.describe())

    async def health(self, request: Request, rid: str) -> Answer:
        call = await self.call(request, rid, unknown_is_closed=True)
        return call if isinstance(call, Answer) else json_answer(200, {"ok": True})

    async def call(self, request: Request, rid: str, unknown_is_closed: bool = False
                   ) -> Session | Answer:
        """The open session a call names with the right ``session_auth``, or the answer that
        says why not."""
        try:
            body = json.loads(await read_body(
                request, CALL_BODY_LIMIT, self.body_read_timeout,
                self.doorway.limits.read_timeout, "VESPA_ENVELOPE_READ_TIMEOUT"))
        except BodyTooLarge:
            return json_error(413, f"a session call is at most {CALL_BODY_LIMIT} bytes", rid)
        except BodyStalled as stalled:
            return json_error(408, str(stalled), rid)
        except BodyError as unreadable:
            return json_error(400, f"request body cannot be read: {unreadable}", rid)
        except (ValueError, RecursionError):
            return json_error(422, 'body must be JSON {"session_id": ..., "session_auth": ...}',
                              rid)
        session_id = body.get("session_id") if isinstance(body, dict) else None
        if not isinstance(session_id, str) or not session_id:
            return json_error(422, "missing session_id", rid)
        session = self.sessions.get(session_id)
        if session is None:
            if unknown_is_closed:
                return json_answer(200, {"ok": False})
            if self.sessions.was_ended(session_id):
                return json_error(410, f"session {session_id} already ended", rid)
            return json_error(400, f"session with id {session_id} not found", rid)
        if not session.vouches_for(body.get("session_auth")):
            return json_error(401, "session_auth is not the auth_data the session was created "
                                   "with", rid)
        return session

    # -- ending --------------------------------------------------------------------------------
    def close(self, session_id: str, how: str) -> Awaitable[None] | None:
        """End a session: cut its requests in flight, give it its one delete record (a
        success) and POST its on_close_route; returns that POST on its way, if any."""
        session = self.sessions.end(session_id, how)
        if session is None:
            return None
        for cut in list(session.requests):
            cut.conn.abort()
        self.ledger.finish(session.entry, Outcome.SUCCESS, 200, time.time())
        if session.plan.on_close_route is None:
            return None
        return self.on_close(session.plan.on_close_route, close_body(session))

    def sweep(self, now: float) -> int:
        """End the sessions whose time is up; how many."""
        expired = self.sessions.expired(now)
        for session_id in expired:
            self.close(session_id, "expired")
        return len(expired)

    def close_all(self) -> None:
        """The worker drains: every open session ends now."""
        for session_id in list(self.sessions.open):
            self.close(session_id, "drained")
