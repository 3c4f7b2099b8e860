"""A cheap local backend for the performance harness (aiohttp + uvloop).

Routes:
  POST /v1/chat/completions  -> a small (~300 byte) OpenAI-shaped JSON body
  GET|POST /sse              -> an SSE stream of 50 small JSON events, then ``data: [DONE]``
  GET|POST /sse/stamped      -> the same 50 events paced (a pause before each), each carrying
                                the CLOCK_MONOTONIC time it was written (``"sent_ns"``), for
                                perf/sse_latency.py's per-event latency
  GET /health                -> 200 "ok"

Every body is built once at start-up so the backend costs as little as possible per request;
each SSE event is written separately (no sleeps on /sse) so a proxy has real chunks to relay.

    python perf/backend.py --port 8001
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from aiohttp import web

SSE_EVENTS = 50

CHAT_BODY = json.dumps({
    "id": "chatcmpl-perf0000000000000000000000",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "perf-model",
    "choices": [{
        "index": 0,
        "message": {"role": "assistant", "content": "Hello! This is a short reply from the perf backend."},
        "finish_reason": "stop",
    }],
    "usage": {"prompt_tokens": 12, "completion_tokens": 11, "total_tokens": 23},
}, separators=(",", ":")).encode()


def _sse_event(index: int) -> bytes:
    chunk = {"id": "chatcmpl-perf", "object": "chat.completion.chunk", "created": 1700000000,
             "choices": [{"index": 0, "delta": {"content": f"tok{index}"}, "finish_reason": None}]}
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


SSE_CHUNKS = [_sse_event(i) for i in range(SSE_EVENTS)] + [b"data: [DONE]\n\n"]
# /sse/stamped: each event's JSON after its opening brace, for b'data: {"sent_ns":N,' + tail
STAMPED_TAILS = [chunk.removeprefix(b"data: {") for chunk in SSE_CHUNKS[:-1]]
EVENT_INTERVAL_S = 0.002  # perf/sse_latency.py's EVENT_INTERVAL_S


async def chat(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=CHAT_BODY, content_type="application/json")


async def event_stream(request: web.Request) -> web.StreamResponse:
    """The request read, an SSE response started."""
    await request.read()
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
    await response.prepare(request)
    return response


async def sse(request: web.Request) -> web.StreamResponse:
    response = await event_stream(request)
    for chunk in SSE_CHUNKS:
        await response.write(chunk)
    await response.write_eof()
    return response


async def sse_stamped(request: web.Request) -> web.StreamResponse:
    response = await event_stream(request)
    for tail in STAMPED_TAILS:
        await asyncio.sleep(EVENT_INTERVAL_S)
        await response.write(b'data: {"sent_ns":%d,%s' % (time.monotonic_ns(), tail))
    await response.write(SSE_CHUNKS[-1])
    await response.write_eof()
    return response


async def health(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def make_app() -> web.Application:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/sse", sse)
    app.router.add_post("/sse", sse)
    app.router.add_get("/sse/stamped", sse_stamped)
    app.router.add_post("/sse/stamped", sse_stamped)
    app.router.add_get("/health", health)
    return app


async def serve(host: str, port: int) -> None:
    runner = web.AppRunner(make_app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=2048).start()
    print(f"backend listening on http://{host}:{port}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def run(coro) -> None:
    """Run ``coro`` on uvloop when it is installed, else on asyncio's default loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
    else:
        uvloop.run(coro)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    try:
        run(serve(args.host, args.port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
