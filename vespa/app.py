"""Wiring: the request corridor, the worker's own routes under /_vespa/, start-up, drain, main().

A request walks: screen (draining, blocked path, body size) -> admission -> ledger -> proxy.
Every request that was admitted or rejected ends in the ledger exactly once.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import re
import signal
import sys
import time

import aiohttp
from aiohttp import web

from .admission import Admission, workload_of
from .config import ConfigError, Settings, load_settings
from .gate import Gate, Overloaded
from .ledger import Ledger, Outcome
from .lifecycle import Lifecycle, Phase, WorkerState
from .observability import request_id, setup_logging
from .proxy import ProxyError, Upstream, UpstreamBroken

log = logging.getLogger("vespa")
RESERVED_PREFIX = "/_vespa/"
CLIENT_CLOSED = 499  # nginx's code for "client closed the request", used in records only


def json_error(status: int, message: str, rid: str, headers: dict | None = None) -> web.Response:
    response = web.json_response({"error": message}, status=status, headers=headers)
    response.headers["X-Request-Id"] = rid
    return response


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
                                 max_body_bytes=settings.max_body_bytes)
        self.blocked = compile_patterns(settings.blocked_paths)
        self.idle = asyncio.Event()
        self.background: list[asyncio.Task] = []
        self.session: aiohttp.ClientSession | None = None  # control plane: health, reports

    # -- the corridor --------------------------------------------------------------------------
    async def handle(self, request: web.Request) -> web.StreamResponse:
        rid = request_id(request.headers.get("X-Request-Id"))
        refusal = self.screen(request, rid)
        if refusal is not None:
            return refusal
        workload = workload_of(None, self.settings.default_cost)
        entry = self.ledger.receive(workload, None, time.time())
        self.idle.clear()
        outcome, status = Outcome.CANCELLED, CLIENT_CLOSED
        try:
            try:
                ticket = await self.gate.enter(workload)
            except Overloaded as exc:
                outcome, status = Outcome.REJECTED, 429
                return json_error(429, exc.rejection.message, rid,
                                  {"Retry-After": str(exc.rejection.retry_after)})
            self.ledger.start(entry, time.time())
            try:
                response = await self.upstream.forward(request, rid)
                outcome = Outcome.SUCCESS if response.status < 500 else Outcome.ERROR
                status = response.status
                return response
            except ProxyError as exc:
                outcome, status = Outcome.ERROR, exc.status
                return json_error(exc.status, exc.message, rid)
            except UpstreamBroken as exc:
                outcome, status = Outcome.ERROR, 502
                log.warning("request %s: %s", rid, exc)
                return exc.response
            finally:
                self.gate.leave(ticket)
        finally:
            self.ledger.finish(entry, outcome, status, time.time())
            if not self.ledger.in_flight:
                self.idle.set()

    def screen(self, request: web.Request, rid: str) -> web.Response | None:
        """The answer for a request refused before admission, or None to let it in."""
        if self.state.draining:
            return json_error(503, "worker is shutting down; send the request to another worker",
                              rid, {"Retry-After": "1"})
        if self.blocked is not None and self.blocked.match(request.path):
            return json_error(403, f"path {request.path} is blocked on this worker "
                                   "(VESPA_BLOCKED_PATHS)", rid)
        length = request.content_length
        if length is not None and length > self.settings.max_body_bytes:
            return json_error(413, f"request body of {length} bytes exceeds the "
                                   f"{self.settings.max_body_bytes}-byte limit "
                                   "(VESPA_MAX_BODY_BYTES)", rid)
        return None

    # -- the worker's own routes ---------------------------------------------------------------
    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "alive", "phase": self.state.phase.value})

    async def readyz(self, request: web.Request) -> web.Response:
        ready = self.state.ready
        body = {"ready": ready, "phase": self.state.phase.value}
        if self.state.error_msg:
            body["error"] = self.state.error_msg
        return web.json_response(body, status=200 if ready else 503)

    async def unknown_own_route(self, request: web.Request) -> web.Response:
        return json_error(404, f"no worker route {request.path}; the worker's own routes are "
                               f"{RESERVED_PREFIX}healthz and {RESERVED_PREFIX}readyz",
                          request_id(request.headers.get("X-Request-Id")))

    # -- assembly and life ---------------------------------------------------------------------
    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=self.settings.max_body_bytes)
        app.router.add_get(RESERVED_PREFIX + "healthz", self.healthz)
        app.router.add_get(RESERVED_PREFIX + "readyz", self.readyz)
        app.router.add_route("*", RESERVED_PREFIX + "{rest:.*}", self.unknown_own_route)
        app.router.add_route("*", "/{path:.*}", self.handle)
        app.on_startup.append(self.on_startup)
        app.on_cleanup.append(self.on_cleanup)
        return app

    async def on_startup(self, app: web.Application) -> None:
        await self.upstream.start()
        self.session = aiohttp.ClientSession()
        health_url = self.settings.backend_url + self.settings.healthcheck_endpoint
        lifecycle = Lifecycle(self.state, self.session, health_url,
                              ready_timeout=self.settings.ready_timeout_initial,
                              health_interval=self.settings.healthcheck_interval)
        self.background.append(asyncio.create_task(lifecycle.run(), name="lifecycle"))

    async def on_cleanup(self, app: web.Application) -> None:
        for task in self.background:
            task.cancel()
        await asyncio.gather(*self.background, return_exceptions=True)
        await self.upstream.close()
        await self.session.close()

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


async def serve(settings: Settings, stop: asyncio.Event) -> None:
    """Run the worker until ``stop`` is set, then drain and shut down."""
    worker = Worker(settings)
    runner = web.AppRunner(worker.make_app(), handler_cancellation=True,
                           access_log=log if settings.log_level == "DEBUG" else None,
                           shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.worker_port, backlog=2048)
    await site.start()
    log.info("vespa listening on %s:%d, backend %s%s", settings.host, settings.worker_port,
             settings.backend_url, " (unsecured)" if settings.unsecured else "")
    try:
        await stop.wait()
        await worker.drain()
    finally:
        await runner.cleanup()


def run(settings: Settings) -> None:
    async def _main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(settings, stop)

    try:
        import uvloop
    except ImportError:  # pragma: no cover - platforms without uvloop
        asyncio.run(_main())
    else:
        uvloop.run(_main())


def main(argv: list[str] | None = None) -> None:
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"vespa: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    setup_logging(settings.log_level)
    run(settings)
