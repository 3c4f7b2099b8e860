"""The worker's own routes under /_vespa/: health, readiness, metrics, status, request records;
and ``POST /pyworker/update``, Vast's platform's (update.py).

Under the prefix GET and HEAD only; any other path or method there answers a JSON 404 that lists
the routes. The request-record routes need ``x-vespa-logs-token``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qs

from ..corridor.answer import Answer, json_answer, json_error
from ..corridor.handler import RESERVED_PREFIX, UPDATE_ROUTE
from ..corridor.request_ids import request_id
from ..http.messages import Request
from ..state import WorkerState
from .metrics import Metrics
from .records import RequestRecorder, check_logs_token
from .update import UpdateRoute

RECORD_PREFIX = RESERVED_PREFIX + "logs/"  # + a request id: one request record


class OpsAccess:
    """Who may read the worker's operational routes (status, metrics: its backend, identity,
    load and traffic): loopback clients when ``open_on_loopback``, others with ``token``."""

    def __init__(self, token: str | None, open_on_loopback: bool = True):
        self.token = token
        self.open_on_loopback = open_on_loopback

    def refusal(self, request: Request) -> Answer | None:
        if self.open_on_loopback and is_loopback(request.remote):
            return None
        rid = request_id(request.header(b"x-request-id"))
        if not self.token:
            return json_error(403, "served to loopback clients only: set VESPA_OPS_TOKEN and "
                                   "send it as x-vespa-ops-token or Authorization: Bearer", rid)
        given = request.fields.get(b"x-vespa-ops-token")
        if given is None:
            bearer = request.fields.get(b"authorization", b"")
            given = bearer[7:] if bearer[:7].lower() == b"bearer " else None
        if not check_logs_token(self.token, given):
            return json_error(401, "missing or wrong x-vespa-ops-token", rid)
        return None


def is_loopback(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


class OwnRoutes:
    def __init__(self, state: WorkerState, metrics: Metrics, status: Callable[[], dict],
                 recorder: RequestRecorder | None, logs_token: str | None,
                 retention_hours: float, update: UpdateRoute, ops: OpsAccess | None = None):
        self.state = state
        self.metrics = metrics
        self.status_document = status
        self.recorder = recorder
        self.logs_token = logs_token
        self.retention_hours = retention_hours
        self.update = update
        self.ops = ops or OpsAccess(None)
        self.routes: dict[str, Callable[[Request], Awaitable[Answer]]] = {
            RESERVED_PREFIX + name: route for name, route in (
                ("healthz", self.healthz), ("readyz", self.readyz),
                ("metrics", self.metrics_route), ("status", self.status),
                ("logs", self.logs))}

    async def __call__(self, request: Request, path: str) -> None:
        """Answer ``request`` for ``path`` (under the prefix)."""
        answer = await self.route(request, path)
        answer.send(request)

    async def route(self, request: Request, path: str) -> Answer:
        if path == UPDATE_ROUTE:
            return await self.update(request)
        if request.method in ("GET", "HEAD"):
            route = self.routes.get(path)
            if route is not None:
                return await route(request)
            if path.startswith(RECORD_PREFIX) and len(path) > len(RECORD_PREFIX):
                return await self.log_record(request, path[len(RECORD_PREFIX):])
        routes = ", ".join([*self.routes, RECORD_PREFIX + "{id}"])
        return json_error(404, f"no worker route {path}; the worker's own routes are "
                               f"{routes}", request_id(request.header(b"x-request-id")))

    async def healthz(self, request: Request) -> Answer:
        return json_answer(200, {"status": "alive", "phase": self.state.phase.value})

    async def readyz(self, request: Request) -> Answer:
        """Public: whether the worker takes work, never why not (the error is for operators:
        /_vespa/status)."""
        ready = self.state.ready
        body = {"ready": ready, "phase": self.state.phase.value}
        if self.state.error_msg and self.ops.refusal(request) is None:
            body["error"] = self.state.error_msg
        return json_answer(200 if ready else 503, body)

    async def metrics_route(self, request: Request) -> Answer:
        refusal = self.ops.refusal(request)
        if refusal is not None:
            return refusal
        body, content_type = self.metrics.exposition(request.header(b"accept"))
        return Answer(200, [("Content-Type", content_type)], body)

    async def status(self, request: Request) -> Answer:
        refusal = self.ops.refusal(request)
        return refusal if refusal is not None else json_answer(200, self.status_document())

    def logs_refusal(self, request: Request) -> Answer | None:
        """Why a request-records route must not answer, or None when it may."""
        rid = request_id(request.header(b"x-request-id"))
        if not self.logs_token:
            return json_error(403, "request records are not served: set VESPA_LOGS_TOKEN and "
                                   "send it in the x-vespa-logs-token header", rid)
        if not check_logs_token(self.logs_token, request.fields.get(b"x-vespa-logs-token")):
            return json_error(401, "missing or wrong x-vespa-logs-token header", rid)
        if self.recorder is None:
            return json_error(404, "request records are off: set VESPA_REQUEST_LOG_DIR", rid)
        return None

    async def logs(self, request: Request) -> Answer:
        refusal = self.logs_refusal(request)
        if refusal is not None:
            return refusal
        raw_limit = parse_qs(request.query_string).get("limit", ["50"])[0]
        try:
            limit = int(raw_limit)
            if limit < 1:
                raise ValueError
        except ValueError:
            return json_error(400, f"limit must be a whole number from 1 up, not {raw_limit!r}",
                              request_id(request.header(b"x-request-id")))
        assert self.recorder is not None  # logs_refusal said so
        return json_answer(200, {"records": await self.recorder.list(limit)})

    async def log_record(self, request: Request, wanted: str) -> Answer:
        refusal = self.logs_refusal(request)
        if refusal is not None:
            return refusal
        assert self.recorder is not None  # logs_refusal said so
        record = await self.recorder.get(wanted)
        if record is None:
            return json_error(404, f"no request record with id {wanted!r} (records are kept "
                                   f"{self.retention_hours:g} h)",
                              request_id(request.header(b"x-request-id")))
        return json_answer(200, record)
