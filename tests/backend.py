"""A real loopback backend for the tests: echoes what it received, streams, fails on purpose.

It records what it saw in ``BackendLog`` so tests can assert on the backend's side of the proxy
(cancellations, timings, request counts).
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import time
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class BackendLog:
    requests: list[dict] = field(default_factory=list)
    cancelled: list[tuple[str, float]] = field(default_factory=list)
    hanging: list[str] = field(default_factory=list)  # /hang requests that arrived
    finished: list[str] = field(default_factory=list)
    sse_last_event_at: float | None = None
    healthy: bool = True
    cancel_seen: asyncio.Event = field(default_factory=asyncio.Event)


def make_backend() -> tuple[web.Application, BackendLog]:
    log = BackendLog()
    routes = web.RouteTableDef()

    @routes.route("*", "/echo{tail:.*}")
    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        await asyncio.sleep(float(request.query.get("echo_delay", "0")))
        seen = {
            "method": request.method,
            "path": request.path,
            "raw_path": request.raw_path,
            "query_string": request.query_string,
            "headers": [[k, v] for k, v in request.headers.items()],
            "body_len": len(body),
            "body_sha256": hashlib.sha256(body).hexdigest(),
            "body_text": body.decode("utf-8", "replace") if len(body) < 4096 else None,
            "peer_port": request.transport.get_extra_info("peername")[1],
        }
        log.requests.append(seen)
        return web.json_response(seen, headers={"X-Backend": "echo"})

    @routes.get("/health")
    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok", status=200 if log.healthy else 503)

    @routes.get("/sse")
    async def sse(request: web.Request) -> web.StreamResponse:
        n = int(request.query.get("n", "5"))
        delay = float(request.query.get("delay", "0"))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)
        for i in range(n):
            await response.write(f"data: {json.dumps({'i': i})}\n\n".encode())
            if delay:
                await asyncio.sleep(delay)
        log.sse_last_event_at = time.monotonic()
        await response.write(b"data: [DONE]\n\n")
        linger = float(request.query.get("linger", "0"))  # vLLM ends its body a moment later
        if linger:
            try:
                await asyncio.sleep(linger)
            except asyncio.CancelledError:
                log.cancelled.append(("sse", time.monotonic()))
                log.cancel_seen.set()
                raise
        return response

    @routes.get("/ndjson")
    async def ndjson(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        for i in range(int(request.query.get("n", "3"))):
            await response.write(json.dumps({"i": i}).encode() + b"\n")
        return response

    @routes.get("/gzip")
    async def gzipped(request: web.Request) -> web.Response:
        payload = gzip.compress(b'{"compressed": true}' * 100)
        return web.Response(body=payload, headers={"Content-Encoding": "gzip",
                                                   "Content-Type": "application/json"})

    @routes.get("/big")
    async def big(request: web.Request) -> web.StreamResponse:
        total = int(request.query["bytes"])
        response = web.StreamResponse(headers={"Content-Type": "audio/wav"})
        if request.query.get("length") == "1":
            response.content_length = total
        await response.prepare(request)
        chunk = b"\x01" * 65536
        sent = 0
        while sent < total:
            piece = chunk[: min(len(chunk), total - sent)]
            await response.write(piece)
            sent += len(piece)
        return response

    @routes.post("/upload")
    async def upload(request: web.Request) -> web.Response:
        digest, size = hashlib.sha256(), 0
        async for chunk in request.content.iter_chunked(65536):
            digest.update(chunk)
            size += len(chunk)
        return web.json_response({"size": size, "sha256": digest.hexdigest(),
                                  "content_length": request.headers.get("Content-Length"),
                                  "chunked": "chunked" in request.headers.get(
                                      "Transfer-Encoding", "")})

    @routes.route("*", "/hang")
    async def hang(request: web.Request) -> web.Response:
        name = request.query.get("name", "hang")
        log.hanging.append(name)
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            log.cancelled.append((name, time.monotonic()))
            log.cancel_seen.set()
            raise
        return web.Response(text="never")

    @routes.get("/slow")
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query.get("delay", "1")))
        log.finished.append(request.query.get("name", "slow"))
        return web.json_response({"slept": float(request.query.get("delay", "1")),
                                  "name": request.query.get("name")})

    @routes.get("/slow-stream")
    async def slow_stream(request: web.Request) -> web.StreamResponse:
        name = request.query.get("name", "stream")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            for i in range(int(request.query.get("n", "20"))):
                await response.write(f"data: {i}\n\n".encode())
                await asyncio.sleep(float(request.query.get("delay", "0.05")))
        except asyncio.CancelledError:
            log.cancelled.append((name, time.monotonic()))
            log.cancel_seen.set()
            raise
        log.finished.append(name)
        return response

    @routes.get("/crash")
    async def crash(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: first\n\n")
        await asyncio.sleep(0.05)
        request.transport.abort()
        return response

    @routes.route("*", "/status/{code}")
    async def status(request: web.Request) -> web.Response:
        code = int(request.match_info["code"])
        return web.json_response({"error": f"backend says {code}"}, status=code,
                                 headers={"Retry-After": "7", "X-Backend-Error": "yes"})

    @routes.get("/hop")
    async def hop(request: web.Request) -> web.Response:
        return web.Response(text="hop", headers={
            "Connection": "X-Private", "X-Private": "secret", "Keep-Alive": "timeout=5",
            "Proxy-Authenticate": "Basic", "Trailer": "X-Checksum", "X-Kept": "yes",
            "Set-Cookie": "a=1"})

    @routes.get("/cookies")
    async def cookies(request: web.Request) -> web.Response:
        response = web.Response(text="two cookies")
        response.headers.add("Set-Cookie", "a=1")
        response.headers.add("Set-Cookie", "b=2")
        return response

    app = web.Application(client_max_size=1024 ** 3)
    app.add_routes(routes)
    return app, log
