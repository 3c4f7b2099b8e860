"""A tiny OpenAI-shaped loopback backend for the client proxy tests.

Routes: ``POST /v1/chat/completions`` (JSON, or SSE with ``stream``; it echoes the last user
message), ``GET /v1/models``, ``POST /v1/audio/speech`` (a WAV, 100 samples per input
character), ``GET /v1/compressed`` (gzip when accepted), ``GET /health``. ``OpenAILog`` records
every request and can make chats hang (``hold_chat``, ``hold_stream``) so that a test can kill
the worker meanwhile.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import struct
import time
from dataclasses import dataclass, field

from aiohttp import web

MODEL = "vespa-test-model"


@dataclass
class OpenAILog:
    requests: list[dict] = field(default_factory=list)
    hold_chat: bool = False  # chat completions wait until the connection dies
    hold_stream: bool = False  # streamed chats send one chunk, then wait until it dies
    chat_arrived: asyncio.Event = field(default_factory=asyncio.Event)
    chat_gate: asyncio.Event | None = None  # an Event: chat completions wait until it is set


def wav(samples: int, rate: int = 16000) -> bytes:
    """A mono 16-bit PCM WAV of ``samples`` samples of a simple ramp."""
    pcm = b"".join(struct.pack("<h", (i * 97) % 30000) for i in range(samples))
    header = struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", 36 + len(pcm), b"WAVE", b"fmt ", 16, 1,
                         1, rate, rate * 2, 2, 16, b"data", len(pcm))
    return header + pcm


def completion(content: str, max_tokens: int | None) -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": int(time.time()),
            "model": MODEL, "choices": [{"index": 0, "finish_reason": "stop",
                                         "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 3, "completion_tokens": max_tokens or 1,
                      "total_tokens": 3 + (max_tokens or 1)}}


def chunk(content: str | None, finish: str | None = None) -> bytes:
    delta = {"content": content} if content is not None else {}
    event = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": MODEL,
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return f"data: {json.dumps(event)}\n\n".encode()


def make_openai_backend() -> tuple[web.Application, OpenAILog]:
    log = OpenAILog()
    routes = web.RouteTableDef()

    async def record(request: web.Request) -> bytes:
        body = await request.read()
        log.requests.append({"method": request.method, "path": request.path,
                             "query": request.raw_path.partition("?")[2],
                             "headers": dict(request.headers),
                             "body": body.decode("utf-8", "replace")})
        return body

    @routes.get("/health")
    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    @routes.post("/v1/chat/completions")
    async def chat(request: web.Request) -> web.StreamResponse:
        body = json.loads(await record(request))
        log.chat_arrived.set()
        if log.chat_gate is not None:
            await asyncio.wait_for(log.chat_gate.wait(), 30)
        if log.hold_chat:
            await asyncio.sleep(3600)
        await asyncio.sleep(float(body.get("delay", 0)))
        said = body["messages"][-1]["content"]
        if not body.get("stream"):
            return web.json_response(completion(f"echo: {said}", body.get("max_tokens")))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for word in ["echo:", *said.split()]:
            await response.write(chunk(word + " "))
            if log.hold_stream:
                await asyncio.sleep(3600)
            await asyncio.sleep(0.02)
        await response.write(chunk(None, "stop") + b"data: [DONE]\n\n")
        await asyncio.sleep(float(body.get("linger", 0)))  # vLLM ends its body a moment later
        return response

    @routes.get("/v1/models")
    async def models(request: web.Request) -> web.Response:
        await record(request)
        return web.json_response({"object": "list", "data": [
            {"id": MODEL, "object": "model", "created": 0, "owned_by": "vespa"}]})

    @routes.post("/v1/audio/speech")
    async def speech(request: web.Request) -> web.Response:
        body = json.loads(await record(request))
        return web.Response(body=wav(len(body["input"]) * 100), content_type="audio/wav")

    @routes.get("/v1/compressed")
    async def compressed(request: web.Request) -> web.Response:
        await record(request)
        body = b'{"compressed": true}'
        if "gzip" not in request.headers.get("Accept-Encoding", ""):
            return web.Response(body=body, content_type="application/json")
        return web.Response(body=gzip.compress(body), headers={
            "Content-Encoding": "gzip", "Content-Type": "application/json"})

    app = web.Application()
    app.add_routes(routes)
    return app, log
