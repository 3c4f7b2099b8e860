"""Wiring: the request corridor, the worker's own routes under /_vespa/, start-up, drain.

A request walks: dispatch -> size check -> envelope -> signature -> refusals (draining, request
target, blocked path) -> admission (incl. vLLM's own queue when asked) -> ledger -> proxy, and
is accounted once at the end (metrics, request record). Every request that was admitted or
rejected ends in the ledger exactly once; a request whose signature fails is not load and never
enters it. The worker is served by ``front.FrontServer`` on aiohttp's runner (``WorkerRunner``).
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import re
import time
from collections.abc import Awaitable
from urllib.parse import parse_qs

import aiohttp

from .admission import Admission, workload_of
from .auth import ReplayWindow, verify
from .config import Settings
from .answer import Answer, json_answer, json_error
from .envelope import PASSTHROUGH, BODY_METHODS, Envelope, EnvelopeError, open_envelope
from .gate import Gate, Overloaded
from .keyring import KeyRing
from .ledger import Ledger, Outcome
from .lifecycle import Lifecycle, Phase, StartupPlan, WorkerState
from .front import BodyError, FrontServer, Request
from .insight import BackendInsight
from .launch import backend_process
from .logging_setup import current_request_id
from .logwatch import LogWatch
from .metrics import DEFAULT_ROUTES, Metrics
from .proxy import (SMALL_BODY, BodyStalled, BodyTooLarge, ProxyError, Upstream, UpstreamBroken,
                    arrived_body, read_body)
from .records import RequestRecorder, check_logs_token
from .reporter import Identity, Reporter
from .request_ids import request_id
from .runner import WorkerRunner
from .status import worker_status
from .supervisor import Supervisor
from .target import origin_form, path_of, spellings
from .visit import CLIENT_CLOSED, Visit, record_entry

log = logging.getLogger("vespa")
access_log = logging.getLogger("vespa.access")
RESERVED_PREFIX = "/_vespa/"
RECORD_PREFIX = RESERVED_PREFIX + "logs/"  # + a request id: one request record
# the metrics label of each answer ``refusal()`` gives
REFUSAL_REASONS = {503: "draining", 403: "blocked"}


def compile_patterns(patterns: tuple[str, ...]) -> re.Pattern | None:
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))


class Worker:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.state = WorkerState()
        self.ledger = Ledger()
        self.admission = Admission(settings.concurrency_limit, settings.max_wait_time,
                                   settings.max_throughput)
        self.gate = Gate(self.admission)
        self.upstream = Upstream(settings.backend_url,
                                 connection_limit=settings.connection_limit,
                                 connect_timeout=settings.connect_timeout,
                                 request_timeout=settings.request_timeout,
                                 max_body_bytes=settings.max_body_bytes,
                                 body_read_timeout=settings.body_read_timeout)
        self.blocked = compile_patterns(settings.blocked_paths)
        self.replay = ReplayWindow(settings.replay_window)
        self.idle = asyncio.Event()
        self.background: list[asyncio.Task] = []
        self.session: aiohttp.ClientSession | None = None  # control plane: health, reports
        self.keyring: KeyRing | None = None
        self.reporter: Reporter | None = None
        self.supervisor: Supervisor | None = None
        self.insight: BackendInsight | None = None
        self.metrics = Metrics(settings.metrics_routes or DEFAULT_ROUTES,
                               in_flight=lambda: len(self.ledger.in_flight),
                               queued=lambda: self.admission.queued,
                               estimated_wait=lambda: self.admission.estimated_wait() or 0.0,
                               throughput=lambda: self.admission.max_throughput or 0.0)
        self.recorder: RequestRecorder | None = None
        self.capture = settings.request_log_max_body_bytes
        if settings.request_log_dir:
            self.recorder = RequestRecorder(
                settings.request_log_dir, max_body_bytes=settings.request_log_max_body_bytes,
                retention_hours=settings.request_log_retention_hours,
                cleanup_interval=settings.request_log_cleanup_interval,
                max_per_second=settings.request_log_max_per_second or None)
        # the worker's own GET routes; any other path under the prefix answers a JSON 404
        self.own_routes = {RESERVED_PREFIX + name: route for name, route in (
            ("healthz", self.healthz), ("readyz", self.readyz), ("metrics", self.metrics_route),
            ("status", self.status), ("logs", self.logs))}

    # -- the corridor --------------------------------------------------------------------------
    async def handle(self, request: Request, target: str | None) -> None:
        """Serve one request for the backend (``target``: its ``origin_form``) and account
        for it."""
        rid = request_id(request.header(b"x-request-id"))
        current_request_id.set(rid)
        recorder = self.recorder
        visit = Visit(rid, recorder is not None and recorder.wanted(), self.capture)
        try:
            answer = visit.response = await self.walk(request, target, visit)
            if answer is not None:
                answer.send(request)
        finally:
            self.account(request, visit, target)

    async def walk(self, request: Request, target: str | None, visit: Visit) -> Answer | None:
        """The worker's own answer, or None when the backend's was relayed."""
        rid = visit.rid
        if self.too_long(request):
            return self.refuse(visit, "body_size", self.too_large(
                rid, f"request body of {request.content_length} bytes"))
        if target is None:  # e.g. OPTIONS * or CONNECT host:port: nothing to forward, no load
            return self.refuse(visit, "target", json_error(
                400, f"request target {request.target[:200]!r} has no path: send /path?query",
                rid))
        try:
            envelope = visit.envelope = await self.open(request, target)
        except EnvelopeError as invalid:
            return self.refuse(visit, "envelope", json_error(422, str(invalid), rid,
                                                             problems=invalid.problems))
        except BodyTooLarge:
            return self.refuse(visit, "body_size", self.too_large(rid, "request body"))
        except BodyStalled as stalled:  # the connection closes after this answer
            return self.refuse(visit, "body_stalled", json_error(408, str(stalled), rid))
        except BodyError as broken:  # malformed framing: the connection closes after this answer
            return self.refuse(visit, "body_malformed",
                               json_error(400, f"request body cannot be read: {broken}", rid))
        if envelope.auth_data is not None and not self.settings.unsecured:
            problem = await self.check_signature(envelope.auth_data)
            if problem is not None:
                return self.refuse(visit, "signature", json_error(problem[0], problem[1], rid))
        workload = workload_of(envelope.cost, self.settings.default_cost)
        refusal = self.refusal(request, target, rid)
        if refusal is not None:
            self.ledger.reject(workload, envelope.request_idx, refusal.status, time.time())
            reason = REFUSAL_REASONS.get(refusal.status, "other")
            return self.refuse(visit, reason, refusal, Outcome.REJECTED)
        return await self.serve_admitted(request, visit, envelope, workload)

    async def serve_admitted(self, request: Request, visit: Visit, envelope: Envelope,
                             workload: float) -> Answer | None:
        rid = visit.rid
        if not self.ledger.in_flight:
            self.idle.clear()  # set again when the last request in flight ends
        entry = self.ledger.receive(workload, envelope.request_idx, visit.received_at)
        outcome, status = Outcome.CANCELLED, CLIENT_CLOSED
        try:
            if self.backend_queue_full():
                assert self.insight is not None
                outcome, status = Outcome.REJECTED, 429
                self.metrics.rejected("backend_queue")
                return json_error(429, "backend's own queue is full ("
                                  f"{self.insight.waiting} waiting, limit "
                                  f"{self.settings.backend_queue_limit}, "
                                  "VESPA_BACKEND_QUEUE_LIMIT); retry in 1s", rid,
                                  {"Retry-After": "1"})
            try:
                ticket = self.gate.admit(workload)
                if not ticket.started:
                    await self.gate.wait(ticket)
            except Overloaded as overload:
                outcome, status = Outcome.REJECTED, 429
                self.metrics.rejected(overload.rejection.reason)
                message = overload.rejection.message
                if envelope.auth_data is not None:  # its signature is spent: route again
                    message += " through the autoscaler's /route/ (a signature is good once)"
                return json_error(429, message, rid,
                                  {"Retry-After": str(overload.rejection.retry_after)})
            visit.started_at = now = time.time()
            self.ledger.start(entry, now)
            try:
                status = await self.upstream.forward(request, rid, envelope.body,
                                                     envelope.path_qs, visit.exchange)
                outcome = Outcome.SUCCESS if status < 500 else Outcome.ERROR
                return None
            except ProxyError as failure:
                outcome, status = Outcome.ERROR, failure.status
                return json_error(failure.status, failure.message, rid)
            except UpstreamBroken as broken:
                outcome, status = Outcome.ERROR, 502
                log.warning("request %s: %s", rid, broken)
                return None
            finally:
                self.gate.leave(ticket)
        finally:
            visit.outcome, visit.status = outcome, status
            self.ledger.finish(entry, outcome, status, time.time())
            if not self.ledger.in_flight:
                self.idle.set()

    def backend_queue_full(self) -> bool:
        """With VESPA_ADMIT_ON_BACKEND_QUEUE: vLLM's own waiting queue is past the limit."""
        return (self.settings.admit_on_backend_queue and self.insight is not None
                and self.insight.overloaded(self.settings.backend_queue_limit))

    def refuse(self, visit: Visit, reason: str, response: Answer,
               outcome: Outcome | None = None) -> Answer:
        """A request answered before admission: counted under ``reason``."""
        self.metrics.rejected(reason)
        visit.status, visit.outcome = response.status, outcome
        return response

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
        if visit.record and self.recorder is not None:
            self.recorder.record(record_entry(request, visit, ttfb))
        if access_log.isEnabledFor(logging.INFO):  # VESPA_LOG_LEVEL=DEBUG
            access_log.info('%s "%s %s HTTP/%s" %d %d', request.remote, request.method,
                            request.target[:200], request.version, visit.status,
                            exchange.bytes_out)

    async def open(self, request: Request, target: str) -> Envelope:
        """The envelope of ``request`` as sent to the origin-form ``target``; reads the body
        only when it may be one. An absolute-form target (``http://host/path``) is opened and
        forwarded as its path and query (``target``)."""
        envelope = self.open_without_body(request, target)
        if envelope is None:  # the body may be an envelope: read it (it is usually all here)
            body = arrived_body(request)
            if body is None:
                body = await read_body(request, self.settings.max_body_bytes,
                                       self.settings.body_read_timeout)
            envelope = open_envelope(request.method, target, body,
                                     unsecured=self.settings.unsecured)
            if envelope is PASSTHROUGH:
                envelope = Envelope(None, body=body)
        if envelope.path_qs is None and target != request.target:
            envelope = envelope._replace(path_qs=target)
        return envelope

    def open_without_body(self, request: Request, target: str) -> Envelope | None:
        """The envelope when the body cannot be one (no body, a method without an envelope
        body, or in dev mode a large or streamed body); None when the body must be read."""
        unsecured = self.settings.unsecured
        if request.method not in BODY_METHODS:
            if unsecured and "serverless_" not in target:
                return PASSTHROUGH
            return open_envelope(request.method, target, None, unsecured=unsecured)
        if not request.has_body:
            return open_envelope(request.method, target, None, unsecured=unsecured)
        length = request.content_length
        if unsecured and (length is None or length > SMALL_BODY):
            return PASSTHROUGH  # a large or streamed body is never an envelope in dev mode
        return None

    async def check_signature(self, auth_data: dict) -> tuple[int, str] | None:
        """(status, reason) when the request must be refused, None when it is signed right."""
        if self.keyring is None or self.keyring.key is None:
            return 503, ("worker has not loaded the autoscaler's public key yet; "
                         "route the request again shortly")
        expected_url = self.settings.public_url or None
        verdict = verify(auth_data, self.keyring.key, self.settings.signature_scheme,
                         expected_url=expected_url, replay=self.replay)
        if not verdict.ok and verdict.scheme is None and await self.keyring.refresh_after_failure():
            verdict = verify(auth_data, self.keyring.key, self.settings.signature_scheme,
                             expected_url=expected_url, replay=self.replay)
        return None if verdict.ok else (401, verdict.reason)

    def refusal(self, request: Request, target: str, rid: str) -> Answer | None:
        """The answer for a request refused before admission, or None to let it in
        (``target``: the request's ``origin_form``)."""
        if self.state.draining:
            return json_error(503, "worker is shutting down; send the request to another worker",
                              rid, {"Retry-After": "1"})
        if self.blocked is not None and any(map(self.blocked.match, spellings(target))):
            return json_error(403, f"path {path_of(target)} is blocked on this worker "
                                   "(VESPA_BLOCKED_PATHS)", rid)
        return None

    def too_long(self, request: Request) -> bool:
        """The request says its body is larger than the limit."""
        length = request.content_length
        return length is not None and length > self.settings.max_body_bytes

    def too_large(self, rid: str, what: str) -> Answer:
        return json_error(413, f"{what} exceeds the {self.settings.max_body_bytes}-byte limit "
                               "(VESPA_MAX_BODY_BYTES)", rid)

    # -- the worker's own routes ---------------------------------------------------------------
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
        return json_answer(200, worker_status(
            state=self.state, admission=self.admission, ledger=self.ledger,
            backend_url=self.settings.backend_url, backend=self.settings.backend,
            reporter=self.reporter, supervisor=self.supervisor, insight=self.insight,
            recorder=self.recorder))

    def logs_refusal(self, request: Request) -> Answer | None:
        """Why a request-records route must not answer, or None when it may."""
        rid = request_id(request.header(b"x-request-id"))
        if not self.settings.logs_token:
            return json_error(403, "request records are not served: set VESPA_LOGS_TOKEN and "
                                   "send it in the x-vespa-logs-token header", rid)
        if not check_logs_token(self.settings.logs_token,
                                request.fields.get(b"x-vespa-logs-token")):
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
                                   f"{self.settings.request_log_retention_hours:g} h)",
                              request_id(request.header(b"x-request-id")))
        return json_answer(200, record)

    async def unknown_own_route(self, request: Request, path: str) -> Answer:
        routes = ", ".join([*self.own_routes, RECORD_PREFIX + "{id}"])
        return json_error(404, f"no worker route {path}; the worker's own routes are "
                               f"{routes}", request_id(request.header(b"x-request-id")))

    # -- dispatch ------------------------------------------------------------------------------
    def dispatch(self, request: Request) -> Awaitable[None]:
        """The front server's handler: the worker's own routes under /_vespa/ (GET and HEAD),
        a JSON 404 for any other path under that prefix, everything else to the backend. It
        hands back the coroutine that serves the request: one level less to run through."""
        target = origin_form(request.target)  # None: no path to serve, refusal() says 400
        if target is not None and target.startswith(RESERVED_PREFIX):
            return self.answer_own(request, path_of(target))
        return self.handle(request, target)

    async def answer_own(self, request: Request, path: str) -> None:
        answer = await self.own_route(request, path)
        answer.send(request)

    async def own_route(self, request: Request, path: str) -> Answer:
        if request.method in ("GET", "HEAD"):
            route = self.own_routes.get(path)
            if route is not None:
                return await route(request)
            if path.startswith(RECORD_PREFIX) and len(path) > len(RECORD_PREFIX):
                return await self.log_record(request, path[len(RECORD_PREFIX):])
        return await self.unknown_own_route(request, path)

    # -- assembly and life ---------------------------------------------------------------------
    def runner(self, **kwargs) -> WorkerRunner:
        """The runner that serves this worker (kwargs: aiohttp runner options, keepalive_timeout)."""
        return WorkerRunner(self, **kwargs)

    def spawn(self, coroutine, name: str) -> None:
        self.background.append(asyncio.create_task(coroutine, name=name))

    async def on_startup(self) -> None:
        settings = self.settings
        await self.upstream.start()
        self.session = aiohttp.ClientSession()
        if self.recorder is not None:
            self.recorder.start()
            log.info("request records: writing to %s (up to %g a second)",
                     self.recorder.directory, settings.request_log_max_per_second)
        if settings.backend == "vllm" or settings.admit_on_backend_queue:
            self.insight = BackendInsight(settings.backend_url + "/metrics", self.session,
                                          interval=settings.insight_interval)
            self.spawn(self.insight.run(), "insight")
        if settings.report_addrs and not settings.unsecured:
            self.keyring = KeyRing(settings.report_addrs, self.session)
            self.spawn(self.keyring.run(), "pubkey")
        if settings.report_addrs:
            if settings.container_id is None:
                log.warning("no CONTAINER_ID: not on a Vast instance, reporting as worker 0")
            identity = Identity(settings.container_id or 0, settings.master_token,
                                settings.public_url)
            self.reporter = Reporter(settings.report_addrs, identity, self.ledger, self.state,
                                     self.session, interval=settings.report_interval,
                                     max_interval=settings.report_max_interval,
                                     delete_format=settings.delete_requests_format,
                                     on_report=self.metrics.report)
            self.spawn(self.reporter.run(), "reporter")
        else:
            log.info("dev mode: no REPORT_ADDR, nothing is reported to an autoscaler")
        if settings.unsecured:
            log.warning("unsecured: requests are not signature-checked (VESPA_UNSECURED)")
        if settings.backend is not None:
            await self.launch_backend()
        self.spawn(self.lifecycle().run(), "lifecycle")

    async def launch_backend(self) -> None:
        spec, problem = await backend_process(self.settings)
        if problem is not None:
            self.state.fail(problem)
            log.error(problem)
            return
        assert self.settings.backend_log is not None  # config sets it for a launched backend
        self.supervisor = Supervisor(spec, self.settings.backend_log,
                                     restarts=self.settings.backend_restarts,
                                     on_exit=self.state.fail,
                                     on_restart=self.metrics.backend_restart)
        self.spawn(self.supervisor.run(), "supervisor")

    def lifecycle(self) -> Lifecycle:
        settings = self.settings
        watch = None
        if settings.backend_log:
            watch = LogWatch(settings.backend_log, settings.backend_log_ready,
                             settings.backend_log_error)
        plan = StartupPlan(
            backend_url=settings.backend_url,
            health_url=settings.backend_url + settings.healthcheck_endpoint,
            ready_timeout_initial=settings.ready_timeout_initial,
            ready_timeout_resume=settings.ready_timeout_resume,
            benchmark=settings.benchmark, benchmark_timeout=settings.benchmark_timeout,
            benchmark_identity=settings.benchmark_identity, cache_path=settings.benchmark_cache,
            fixed_throughput=settings.max_throughput,
            throughput_required=bool(settings.report_addrs), log_watch=watch,
            poll_interval=min(1.0, settings.healthcheck_interval),
            health_interval=settings.healthcheck_interval,
            failures_to_error=settings.healthcheck_failures)

        def set_throughput(throughput: float) -> None:
            self.admission.max_throughput = throughput

        def wake_reporter() -> None:
            if self.reporter is not None:
                self.reporter.wake.set()

        assert self.session is not None  # made by on_startup
        return Lifecycle(plan, self.state, self.session,
                         key_ready=self.keyring.ready if self.keyring else None,
                         on_throughput=set_throughput, on_change=wake_reporter)

    async def on_cleanup(self) -> None:
        if self.supervisor is not None:
            await self.supervisor.stop()
        for task in self.background:
            task.cancel()
        await asyncio.gather(*self.background, return_exceptions=True)
        if self.reporter is not None:
            await self.final_report()
        if self.recorder is not None:
            await self.recorder.stop()
        await self.upstream.close()
        if self.session is not None:
            await self.session.close()

    async def final_report(self, timeout: float = 5.0) -> None:
        """Tell the autoscaler about the last finished requests before the process ends."""
        reporter = self.reporter
        assert reporter is not None
        try:
            await asyncio.wait_for(asyncio.gather(reporter.report_finished(),
                                                  reporter.report_status(force=True)),
                                   timeout)
        except asyncio.TimeoutError:
            log.warning("final report to the autoscaler timed out")

    async def drain(self) -> None:
        """Refuse new work, let what is in flight finish (up to the drain timeout)."""
        self.state.phase = Phase.DRAINING
        in_flight = len(self.ledger.in_flight)
        log.info("draining: %d request(s) in flight, waiting up to %gs", in_flight,
                 self.settings.drain_timeout)
        if in_flight:
            try:
                await asyncio.wait_for(self.idle.wait(), self.settings.drain_timeout)
            except asyncio.TimeoutError:
                log.warning("drain timeout: %d request(s) still in flight are cut",
                            len(self.ledger.in_flight))
