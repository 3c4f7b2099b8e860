"""benchmarks.tgi against a loopback server speaking TGI's /generate (no TGI server can be
installed here): the rate is the generated tokens over the wall time, and a server that reports
no tokens or fails is an error, never a number."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from aiohttp import web

from benchmarks import tgi
from benchmarks._common import BenchmarkError


class TgiServer:
    """A loopback server answering POST /generate with ``answer(body)`` after 50 ms."""

    def __init__(self, answer):
        self.answer, self.seen = answer, []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def generate(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.seen.append(body)
        await asyncio.sleep(0.05)
        return self.answer(body)

    async def __aenter__(self) -> "TgiServer":
        app = web.Application()
        app.router.add_post("/generate", self.generate)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc) -> None:
        await self.runner.cleanup()

    async def measure(self, **options) -> float:
        async with aiohttp.ClientSession(base_url=self.url) as session:
            return await tgi.benchmark(self.url, session, **options)


async def test_generated_tokens_per_second():
    async with TgiServer(lambda body: web.json_response({
            "generated_text": "x",
            "details": {"generated_tokens": body["parameters"]["max_new_tokens"]}})) as server:
        started = time.perf_counter()
        rate = await server.measure(runs=2, concurrency=4, max_tokens=20)
        elapsed = time.perf_counter() - started
    # 2 runs of 4 concurrent requests of 20 tokens, each request ~50 ms: ~80 tokens per ~50 ms
    assert 80 / elapsed < rate < 80 / 0.05, rate
    assert len(server.seen) == 1 + 2 * 4  # a warm-up, then the timed runs
    assert server.seen[0]["parameters"]["details"] is True
    assert server.seen[0]["inputs"]


@pytest.mark.parametrize("answer,problem", [
    (lambda body: web.json_response({"generated_text": "x"}), "no generated tokens"),
    (lambda body: web.json_response({"details": {"generated_tokens": 0}}), "no generated tokens"),
    (lambda body: web.json_response({"error": "overloaded"}, status=503), "answered 503"),
    (lambda body: web.Response(text="not json"), "failed"),
])
async def test_a_server_without_tokens_is_an_error(answer, problem):
    async with TgiServer(answer) as server:
        with pytest.raises(BenchmarkError, match=problem):
            await server.measure(runs=1, concurrency=2, max_tokens=8)
