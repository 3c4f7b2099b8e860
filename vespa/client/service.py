"""``VastClient``: the local proxy as an object, ``await start()``, use ``url``, ``await close()``.

It owns the two HTTP sessions (control: autoscaler, Vast API, CA download; workers: raw bytes,
no decompression, no added headers), the endpoint key (looked up with the account key when only
that was given) and the aiohttp server.
"""

from __future__ import annotations

import dataclasses
import logging

import aiohttp
from aiohttp import web

from .keys import endpoint_key
from .options import ClientOptions
from .proxy import Relay, make_app
from .routing import EndpointKey, RoutePolicy, Router
from .tls import WorkerTLS

log = logging.getLogger("vespa.client")
WORKER_CONNECTIONS = 256
SHUTDOWN_TIMEOUT = 2.0  # seconds close() lets answers in flight finish


class VastClient:
    """``async with VastClient(endpoint="my-endpoint", api_key=KEY) as client:`` then send
    requests to ``client.url``; ``port=0`` picks a free port."""

    def __init__(self, options: ClientOptions | None = None, *,
                 route_policy: RoutePolicy | None = None, **fields):
        self.options = options if options is not None else ClientOptions(**fields)
        self.route_policy = dataclasses.replace(route_policy or RoutePolicy(),
                                                timeout=self.options.route_timeout)
        self.port = self.options.port
        self.control: aiohttp.ClientSession | None = None
        self.workers: aiohttp.ClientSession | None = None
        self.runner: web.AppRunner | None = None
        self.key: EndpointKey | None = None

    @property
    def url(self) -> str:
        host = self.options.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}"

    async def start(self) -> "VastClient":
        """Resolve the endpoint key, then listen. Raises KeyLookupError, TLSSetupError, OSError."""
        options = self.options
        self.control = aiohttp.ClientSession()
        self.workers = aiohttp.ClientSession(
            auto_decompress=False, skip_auto_headers=("Accept-Encoding", "User-Agent"),
            connector=aiohttp.TCPConnector(limit=WORKER_CONNECTIONS),
            timeout=aiohttp.ClientTimeout(total=None))
        try:
            self.key = await self.resolve_key()
            tls = WorkerTLS(self.control, options.ca_file)
            if options.ca_file:
                await tls.context()  # a bad CA file fails now, not on the first HTTPS worker
            router = Router(self.control, options.autoscaler_url, options.endpoint, self.key,
                            self.route_policy)
            secrets = tuple({*options.secrets, self.key.value})
            relay = Relay(options, router, self.workers, tls, secrets)
            await self.listen(make_app(relay, options))
        except BaseException:
            await self.close()
            raise
        log.info("endpoint %r is served on %s (autoscaler %s)", options.endpoint, self.url,
                 options.autoscaler_url)
        return self

    async def resolve_key(self) -> EndpointKey:
        options = self.options
        if options.api_key:
            return EndpointKey(options.api_key, options.api_key_source)
        value = await endpoint_key(self.control, options.console_url, options.account_key,
                                   options.endpoint)
        log.info("looked up the key of endpoint %r with the account key (%s)",
                 options.endpoint, options.account_key_source)
        return EndpointKey(value, options.account_key_source, looked_up=True)

    async def listen(self, app: web.Application) -> None:
        self.runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                                    shutdown_timeout=SHUTDOWN_TIMEOUT)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.options.host, self.options.port)
        await site.start()
        self.port = self.runner.addresses[0][1]

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        for session in (self.workers, self.control):
            if session is not None and not session.closed:
                await session.close()

    async def __aenter__(self) -> "VastClient":
        return await self.start()

    async def __aexit__(self, *exc_info) -> None:
        await self.close()
