"""The local proxy: every request to it becomes a routed, signed request to a Vast worker.

Per request: estimate the workload, route (waiting out cold starts), wrap, send, relay the answer
chunk by chunk. A worker 429/502/503 or a connection error before any byte reached the caller is
routed again (bounded); once bytes went out nothing is retried, and a worker that breaks off
mid-answer makes us cut the caller's connection rather than fake a clean end.
"""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from .options import ClientOptions
from .routing import RouteError, Router, backoff
from .tls import TLSSetupError, WorkerTLS
from .wrapping import (CallerRequest, WorkerRequest, WrapError, build_worker_request,
                       estimate_workload, read_caller_request, relay_response_headers)

log = logging.getLogger("vespa.client")
RETRY_STATUSES = frozenset({429, 502, 503})
RETRY_BASE, RETRY_CAP = 0.25, 2.0
CONNECT_TIMEOUT = 10.0


def json_error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


class WorkerTimeout(Exception):
    """The worker took the request but did not answer within the request timeout."""


class Relay:
    """The request corridor: caller -> workload -> route -> worker -> caller."""

    def __init__(self, options: ClientOptions, router: Router, session: aiohttp.ClientSession,
                 tls: WorkerTLS, secrets: tuple[str, ...]):
        self.options, self.router, self.session, self.tls = options, router, session, tls
        self.secrets = secrets
        self.timeout = aiohttp.ClientTimeout(total=options.request_timeout,
                                             sock_connect=CONNECT_TIMEOUT)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = time.monotonic()
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return json_error(413, f"request body exceeds {self.options.max_body_bytes} bytes")
        try:
            caller = read_caller_request(request.method, request.raw_path,
                                         list(request.headers.items()), body)
            workload = estimate_workload(caller, self.options.default_cost)
        except WrapError as exc:
            return json_error(exc.status, exc.message)
        response = await self.serve(request, caller, workload)
        log.info("%s %s -> %d (workload %g, %.2fs)", request.method, caller.path,
                 response.status, workload, time.monotonic() - started)
        return response

    async def serve(self, request: web.Request, caller: CallerRequest,
                    workload: float) -> web.StreamResponse:
        """Route and send until a worker answers; relay that answer."""
        attempts, failure = self.options.max_attempts, "none"
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(backoff(attempt - 1, RETRY_BASE, RETRY_CAP))
            try:
                route = await self.router.route(workload)
            except RouteError as exc:
                return json_error(exc.status, exc.message)
            worker = str(route["url"])
            log.debug("attempt %d/%d: routed to %s (request_idx %s, workload %g)", attempt + 1,
                      attempts, worker, route.get("request_idx"), workload)
            try:
                upstream = await self.send(build_worker_request(caller, route, self.secrets))
            except TLSSetupError as exc:
                return json_error(502, f"cannot check HTTPS worker {worker}: {exc}")
            except aiohttp.ClientSSLError as exc:
                return json_error(502, f"TLS check of worker {worker} failed: {exc}; is "
                                       "--ca-file (VAST_CA_FILE) Vast's root CA?")
            except WorkerTimeout:
                return json_error(504, f"worker {worker} did not answer within "
                                       f"{self.options.request_timeout:g}s (--request-timeout)")
            except (aiohttp.ClientConnectionError, OSError) as exc:
                failure = f"worker {worker} unreachable: {exc or type(exc).__name__}"
                log.warning("attempt %d/%d: %s", attempt + 1, attempts, failure)
                continue
            if upstream.status in RETRY_STATUSES and attempt + 1 < attempts:
                failure = f"worker {worker} answered {upstream.status}"
                log.info("attempt %d/%d: %s; routing again", attempt + 1, attempts, failure)
                upstream.release()
                continue
            return await self.relay(request, upstream)
        return json_error(502, f"no worker answered after {attempts} attempts; last: {failure}")

    async def send(self, worker_request: WorkerRequest) -> aiohttp.ClientResponse:
        """The worker's response head; raises before any byte of it reached the caller."""
        https = worker_request.url.startswith("https://")
        ssl_setting = await self.tls.context() if https else True
        try:
            return await self.session.request(
                worker_request.method, URL(worker_request.url, encoded=True),
                headers=CIMultiDict(worker_request.headers), data=worker_request.body,
                timeout=self.timeout, allow_redirects=False, ssl=ssl_setting)
        except aiohttp.ConnectionTimeoutError:
            raise
        except (aiohttp.ServerTimeoutError, asyncio.TimeoutError):
            raise WorkerTimeout() from None

    async def relay(self, request: web.Request,
                    upstream: aiohttp.ClientResponse) -> web.StreamResponse:
        """Stream the worker's answer to the caller as it comes: raw bytes, no re-encoding."""
        async with upstream:
            raw = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in upstream.raw_headers]
            headers, length = relay_response_headers(raw)
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason,
                                          headers=CIMultiDict(headers))
            if length is not None:
                response.content_length = length
            await response.prepare(request)
            try:
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
            except (aiohttp.ClientError, ConnectionError, asyncio.TimeoutError) as exc:
                log.warning("answer from the worker cut short: %r", exc)
                if request.transport is not None:
                    request.transport.abort()  # the caller must not take it for the end
                return response
            await response.write_eof()
            return response


def make_app(relay: Relay, options: ClientOptions) -> web.Application:
    """The proxy's routes: its own ``GET /health``, everything else relayed."""
    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "endpoint": options.endpoint,
                                  "autoscaler": options.autoscaler_url})

    app = web.Application(client_max_size=options.max_body_bytes)
    app.router.add_get("/health", health)
    app.router.add_route("*", "/{path:.*}", relay.handle)
    return app
