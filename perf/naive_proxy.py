"""The "obvious" aiohttp reverse proxy: a reference row and a stand-in for Vespa.

What most people write first: an aiohttp + uvloop server, one shared keep-alive
``ClientSession`` to the backend, hop-by-hop header filtering, the request body read whole,
and the response relayed with ``iter_any()`` as it arrives. No auth, no admission, no metrics.

    python perf/naive_proxy.py --port 8002 --backend http://127.0.0.1:8001
"""

from __future__ import annotations

import argparse
import asyncio

import aiohttp
from aiohttp import web

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "transfer-encoding", "upgrade", "host", "content-length",
})


def filter_headers(headers) -> dict[str, str]:
    """Headers minus hop-by-hop ones and those named in ``Connection``."""
    named = {h.strip().lower() for h in headers.get("Connection", "").split(",") if h.strip()}
    return {k: v for k, v in headers.items()
            if k.lower() not in HOP_BY_HOP and k.lower() not in named}


class Proxy:
    def __init__(self, backend: str):
        self.backend = backend.rstrip("/")
        self.session: aiohttp.ClientSession | None = None

    async def start(self, app: web.Application) -> None:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256, keepalive_timeout=60),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
            auto_decompress=False,
        )

    async def stop(self, app: web.Application) -> None:
        await self.session.close()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        async with self.session.request(request.method, self.backend + request.path_qs,
                                        headers=filter_headers(request.headers),
                                        data=body or None, allow_redirects=False) as upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason,
                                          headers=filter_headers(upstream.headers))
            if upstream.content_length is not None:
                response.content_length = upstream.content_length
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response


async def serve(host: str, port: int, backend: str) -> None:
    proxy = Proxy(backend)
    app = web.Application()
    app.on_startup.append(proxy.start)
    app.on_cleanup.append(proxy.stop)
    app.router.add_route("*", "/{tail:.*}", proxy.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=2048).start()
    print(f"naive proxy on http://{host}:{port} -> {backend}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backend", required=True, help="e.g. http://127.0.0.1:8001")
    args = parser.parse_args()
    try:
        import uvloop
        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        runner(serve(args.host, args.port, args.backend))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
