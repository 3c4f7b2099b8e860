"""Assembly: the worker's rooms built from its settings, and its life in four steps.

``Worker(settings)`` builds the corridor, the upstream, the metrics and the own routes (no IO);
``start`` starts the background rooms (key ring, reporter, backend, its insight and lifecycle);
``listen`` opens the public socket; ``drain`` refuses new work and lets what is in flight finish;
``stop`` closes the socket, the connections and every room, telling the autoscaler last.
``main.serve`` runs them in that order.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time

import aiohttp

from .autoscaler.keyring import KeyRing
from .autoscaler.replay_mark import ReplayMark
from .autoscaler.reporter import Identity, Reporter
from .backend.insight import BackendInsight
from .backend.launch import backend_process
from .backend.lifecycle import Lifecycle, StartupPlan
from .backend.logwatch import LogWatch
from .backend.supervisor import Supervisor, polls_pattern
from .config import Settings
from .corridor.admission import Admission
from .corridor.auth import PublicKey
from .corridor.doorway import Doorway, EnvelopeLimits
from .corridor.gate import Gate
from .corridor.handler import Corridor
from .corridor.ledger import Ledger
from .corridor.session_desk import SessionDesk
from .corridor.sessions import Sessions
from .corridor.visit import Visit
from .http.messages import Request
from .http.server import FrontServer
from .http.upstream import Upstream
from .observability.metrics import DEFAULT_ROUTES, Metrics
from .observability.logs import Redactor
from .observability.recording import record_entry
from .observability.records import RequestRecorder
from .observability.routes import OpsAccess, OwnRoutes
from .observability.status import worker_status
from .observability.update import UpdateRoute
from .state import Phase, WorkerState

log = logging.getLogger("vespa")


def health_url(backend_url: str, endpoint: str) -> str:
    """The backend's health check: a path on the backend, or a whole URL as given."""
    return endpoint if endpoint.startswith(("http://", "https://")) else backend_url + endpoint


class Worker:
    def __init__(self, settings: Settings):
        self.settings = settings
        # masks the secrets where the log's own filter does not: the error a launched backend
        # printed (kept in the state) and the backend's log file
        self.redactor = Redactor(settings.log_secrets)
        self.state = WorkerState(redact=self.redactor)
        self.ledger = Ledger()
        self.admission = Admission(settings.concurrency_limit, settings.max_wait_time,
                                   settings.max_throughput)
        self.upstream = Upstream(settings.backend_url,
                                 connection_limit=settings.connection_limit,
                                 connect_timeout=settings.connect_timeout,
                                 request_timeout=settings.request_timeout,
                                 max_body_bytes=settings.max_body_bytes,
                                 body_read_timeout=settings.body_read_timeout,
                                 authorization=settings.backend_api_key,
                                 slot_timeout=settings.max_wait_time,
                                 min_upload_rate=settings.min_upload_rate)
        self.background: list[asyncio.Task] = []
        self.session: aiohttp.ClientSession | None = None  # control plane: health, reports
        self.keyring: KeyRing | None = None
        self.replay_mark: ReplayMark | None = None
        self.reporter: Reporter | None = None
        self.supervisor: Supervisor | None = None
        self.insight: BackendInsight | None = None
        self.server: FrontServer | None = None
        self.listener: asyncio.Server | None = None
        self.metrics = Metrics(settings.metrics_routes or DEFAULT_ROUTES,
                               in_flight=lambda: len(self.ledger.in_flight),
                               queued=lambda: self.admission.queued,
                               estimated_wait=lambda: self.admission.estimated_wait() or 0.0,
                               throughput=lambda: self.admission.max_throughput or 0.0)
        self.recorder: RequestRecorder | None = None
        if settings.request_log_dir:
            self.recorder = RequestRecorder(
                settings.request_log_dir, max_body_bytes=settings.request_log_max_body_bytes,
                retention_hours=settings.request_log_retention_hours,
                cleanup_interval=settings.request_log_cleanup_interval,
                max_per_second=settings.request_log_max_per_second or None,
                max_disk_bytes=settings.request_log_max_bytes)
        self.own_routes = OwnRoutes(self.state, self.metrics, self.status, self.recorder,
                                    settings.logs_token, settings.request_log_retention_hours,
                                    UpdateRoute(settings.master_token, settings.update_flag),
                                    OpsAccess(settings.ops_token, settings.ops_open_on_loopback))
        self.doorway = Doorway(unsecured=settings.unsecured,
                               max_body_bytes=settings.max_body_bytes,
                               body_read_timeout=settings.body_read_timeout,
                               signature_scheme=settings.signature_scheme,
                               public_url=settings.public_url,
                               replay_window=settings.replay_window,
                               blocked_paths=settings.blocked_paths,
                               envelope_limits=EnvelopeLimits(
                                   settings.max_envelope_bytes, settings.max_envelope_values,
                                   settings.envelope_read_timeout))
        if settings.report_addrs and not settings.unsecured:  # the file is opened on first use
            self.replay_mark = ReplayMark(
                os.path.join(settings.cache_dir, "replay-mark"),
                settings.public_url if settings.check_signed_url else "")
            self.doorway.replay.on_new_max = self.replay_mark.save
        self.sessions = Sessions(settings.max_sessions)
        self.metrics.sessions = self.sessions
        self.desk = SessionDesk(self.sessions, self.doorway, self.ledger, self.metrics,
                                self.state, settings.default_cost, settings.body_read_timeout,
                                on_close=self.on_session_close, admission=self.admission)
        self.corridor = Corridor(self.doorway, self.ledger, self.admission,
                                 Gate(self.admission), self.upstream, self.metrics, self.state,
                                 self.own_routes, self.desk, settings.default_cost)
        self.session_server: FrontServer | None = None  # VESPA_WORKER_HTTP_PORT
        self.session_listener: asyncio.Server | None = None
        self.closing: set[asyncio.Task] = set()  # on_close POSTs on their way
        self.closing_slots = asyncio.Semaphore(4)  # ... at most this many at once
        if self.recorder is not None:
            self.corridor.wants_record = self.recorder.wanted
            self.corridor.record = self.keep_record
            self.corridor.capture = settings.request_log_max_body_bytes
        if settings.admit_on_backend_queue:
            self.corridor.backend_queue_full = self.backend_queue_full

    # -- what the rooms ask of each other ------------------------------------------------------
    def status(self) -> dict:
        """The document of GET /_vespa/status."""
        return worker_status(
            state=self.state, admission=self.admission, ledger=self.ledger,
            backend_url=self.settings.backend_url, backend=self.settings.backend,
            reporter=self.reporter, supervisor=self.supervisor, insight=self.insight,
            recorder=self.recorder, sessions=self.sessions)

    def keep_record(self, request: Request, visit: Visit, ttfb: float | None) -> None:
        assert self.recorder is not None  # set as the corridor's recorder only then
        self.recorder.record(record_entry(request, visit, ttfb))

    def backend_queue_full(self) -> str | None:
        """With VESPA_ADMIT_ON_BACKEND_QUEUE: why vLLM's own waiting queue is too long."""
        limit = self.settings.backend_queue_limit
        if self.insight is None or not self.insight.overloaded(limit):
            return None
        return (f"backend's own queue is full ({self.insight.waiting} waiting, limit {limit}, "
                "VESPA_BACKEND_QUEUE_LIMIT); retry in 1s")

    def on_session_close(self, path: str, body: dict) -> asyncio.Task:
        """POST an ended session's on_close_route to the backend, in the background (a few at
        a time: each create and end is one more backend call outside admission)."""
        task = asyncio.get_running_loop().create_task(self.post_session_close(path, body))
        self.closing.add(task)
        task.add_done_callback(self.closing.discard)
        return task

    async def post_session_close(self, path: str, body: dict, timeout: float = 10.0) -> None:
        if self.session is None:
            return
        url = self.settings.backend_url + path
        key = self.settings.backend_api_key
        headers = {"Authorization": f"Bearer {key}"} if key else None
        try:
            async with self.closing_slots, self.session.post(
                    url, json=body, headers=headers,
                    timeout=aiohttp.ClientTimeout(total=timeout)) as answer:
                await answer.read()
                if answer.status >= 400:
                    log.warning("session %s: on_close_route %s answered %d",
                                body.get("session_id"), path, answer.status)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as failure:
            log.warning("session %s: on_close_route %s failed: %s", body.get("session_id"), path,
                        failure or type(failure).__name__)

    async def sweep_sessions(self, interval: float = 1.0) -> None:
        """End the sessions whose time is up (Vast's worker looks every 5 s)."""
        while True:
            await asyncio.sleep(interval)
            self.desk.sweep(time.time())

    # -- life ----------------------------------------------------------------------------------
    def spawn(self, coroutine, name: str) -> None:
        self.background.append(asyncio.create_task(coroutine, name=name))

    async def cancel_background(self, *names: str) -> None:
        tasks = [task for task in self.background if task.get_name() in names]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def start(self) -> None:
        """Start every background room; the backend is launched when the settings say so."""
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
            self.keyring = self.doorway.keys = KeyRing(settings.report_addrs, self.session,
                                                       on_key=self.on_key)
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
        self.spawn(self.sweep_sessions(), "sessions")

    async def listen(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None,
                     backlog: int = 2048) -> None:
        """Serve the corridor on ``host:port`` (TLS with ``ssl_context``)."""
        settings = self.settings
        self.server = FrontServer(self.corridor.dispatch,
                                  keepalive_timeout=settings.keepalive_timeout,
                                  write_timeout=settings.request_timeout,
                                  max_per_client=settings.max_client_connections)
        loop = asyncio.get_running_loop()
        # a TLS handshake comes before the per-client count (connection_made): keep it short
        self.listener = await loop.create_server(
            self.server, host, port, ssl=ssl_context, backlog=backlog,  # type: ignore[arg-type]
            reuse_address=True, ssl_handshake_timeout=10.0 if ssl_context else None)
        if settings.http_port:  # Vast's platform ends sessions over plain HTTP here
            self.session_server = FrontServer(self.desk.serve_end_only,
                                              keepalive_timeout=settings.keepalive_timeout,
                                              write_timeout=settings.request_timeout,
                                              max_per_client=settings.max_client_connections)
            try:
                self.session_listener = await loop.create_server(
                    self.session_server, host, settings.http_port,  # type: ignore[arg-type]
                    reuse_address=True)
            except OSError as taken:  # the worker itself is served: say so, go on
                log.warning("session port %d (VESPA_WORKER_HTTP_PORT): %s; POST /session/end "
                            "is served on the worker port only", settings.http_port, taken)
                self.session_server = None

    async def drain(self) -> None:
        """Refuse new work, let what is in flight finish (up to the drain timeout)."""
        self.state.phase = Phase.DRAINING
        self.desk.close_all()  # each session gets its record; its requests are cut
        in_flight = len(self.ledger.in_flight)
        log.info("draining: %d request(s) in flight, waiting up to %gs", in_flight,
                 self.settings.drain_timeout)
        if in_flight:
            try:
                await asyncio.wait_for(self.corridor.idle.wait(), self.settings.drain_timeout)
            except asyncio.TimeoutError:
                log.warning("drain timeout: %d request(s) still in flight are cut",
                            len(self.ledger.in_flight))

    async def stop(self, shutdown_timeout: float = 1.0, report_timeout: float = 5.0) -> None:
        """Close the socket and the connections, then every room; the last report goes out
        (within ``report_timeout``)."""
        for listener, server in ((self.listener, self.server),
                                 (self.session_listener, self.session_server)):
            if listener is not None:
                listener.close()
            if server is not None:
                server.pre_shutdown()
                await server.shutdown(shutdown_timeout)
            if listener is not None:
                await listener.wait_closed()
        self.desk.close_all()  # stopped without a drain (a test, an error): records all the same
        if self.closing:  # what is still on its way then is cancelled before the session closes
            _, late = await asyncio.wait(self.closing, timeout=shutdown_timeout)
            if late:
                log.warning("%d session on_close_route call(s) still waiting at shutdown: "
                            "cancelled", len(late))
                for task in late:
                    task.cancel()
                await asyncio.gather(*late, return_exceptions=True)
        if self.supervisor is not None:
            # no health checks or metrics scrapes of a backend on its way out (the supervisor's
            # own task runs on: it logs the backend's last words)
            await self.cancel_background("insight", "lifecycle")
            await self.supervisor.stop()
        for task in self.background:
            task.cancel()
        await asyncio.gather(*self.background, return_exceptions=True)
        if self.reporter is not None:
            await self.final_report(report_timeout)
        if self.recorder is not None:
            await self.recorder.stop()
        await self.upstream.close()
        if self.session is not None:
            await self.session.close()
        if self.replay_mark is not None:
            self.replay_mark.close()

    def on_key(self, key: PublicKey) -> None:
        """A new autoscaler key: the reqnums it signed before a restart stay spent."""
        assert self.replay_mark is not None
        if self.replay_mark.fingerprint not in ("", key.fingerprint):
            self.doorway.replay.reset()  # what the old key signed no longer verifies
        high_water = self.replay_mark.load(key.fingerprint)
        self.replay_mark.bind(key.fingerprint)
        if high_water is not None:
            self.doorway.replay.restore(high_water)
            log.info("replay window: reqnums up to %d were signed before a restart and are "
                     "refused as too old", high_water)

    async def final_report(self, timeout: float = 5.0) -> None:
        """Tell the autoscaler about the last finished requests before the process ends; what
        is still on its way after ``timeout`` is given up, before the session closes."""
        reporter = self.reporter
        assert reporter is not None
        try:
            await asyncio.wait_for(asyncio.gather(reporter.report_finished(),
                                                  reporter.report_status(force=True)),
                                   timeout)
        except asyncio.TimeoutError:
            log.warning("final report to the autoscaler timed out after %gs: given up", timeout)
        await reporter.abandon()

    # -- the backend ---------------------------------------------------------------------------
    async def launch_backend(self) -> None:
        spec, problem = await backend_process(self.settings)
        if problem is not None:
            self.state.fail(problem)
            log.error(problem)
            return
        assert self.settings.backend_log is not None  # config sets it for a launched backend
        polls = [self.settings.healthcheck_endpoint]  # the worker's own: kept out of its log
        if self.insight is not None:
            polls.append("/metrics")
        self.supervisor = Supervisor(spec, self.settings.backend_log,
                                     restarts=self.settings.backend_restarts,
                                     on_exit=self.state.fail,
                                     on_restart=self.metrics.backend_restart,
                                     quiet=polls_pattern(polls), secrets=self.redactor)
        self.spawn(self.supervisor.run(), "supervisor")

    def lifecycle(self) -> Lifecycle:
        settings = self.settings
        watch = None
        if settings.backend_log:
            watch = LogWatch(settings.backend_log, settings.backend_log_ready,
                             settings.backend_log_error)
        plan = StartupPlan(
            backend_url=settings.backend_url,
            health_url=health_url(settings.backend_url, settings.healthcheck_endpoint),
            ready_timeout_initial=settings.ready_timeout_initial,
            ready_timeout_resume=settings.ready_timeout_resume,
            benchmark=settings.benchmark, benchmark_timeout=settings.benchmark_timeout,
            backend_api_key=settings.backend_api_key,
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

        assert self.session is not None  # made by start
        return Lifecycle(plan, self.state, self.session,
                         key_ready=self.keyring.ready if self.keyring else None,
                         on_throughput=set_throughput, on_change=wake_reporter)
