"""The worker's own routes under /_vespa/: health, readiness, metrics, status, request records;
and ``POST /pyworker/update``, Vast's platform's (update.py).

Under the prefix GET and HEAD only; any other path or method there answers a JSON 404 that lists
the routes. The request-record routes need ``x-vespa-logs-token``.
"""

from __future__ import annotations

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


class OwnRoutes:
    def __init__(self, state: WorkerState, metrics: Metrics, status: Callable[[], dict],
                 recorder: RequestRecorder | None, logs_token: str | None,
                 retention_hours: float, update: UpdateRoute):
        self.state = state
        self.metrics = metrics
        self.status_document = status
        self.recorder = recorder
        self.logs_token = logs_token
        self.retention_hours = retention_hours
        self.update = update
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
        ready = self.state.ready
        body = {"ready": ready, "phase": self.state.phase.value}
        if self.state.error_msg:
            body["error"] = self.state.error_msg
        return json_answer(200 if ready else 503, body)

    async def metrics_route(self, request: Request) -> Answer:
        body, content_type = self.metrics.exposition(request.header(b"accept"))
        return Answer(200, [("Content-Type", content_type)], body)

    async def status(self, request: Request) -> Answer:
        return json_answer(200, self.status_document())

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
