"""Shared loop of the OpenAI-style startup benchmarks: find the served model, warm up, then timed
runs of concurrent requests; throughput = completion tokens of fully read responses / wall time.

A failed request or a run without tokens raises BenchmarkError: never a made-up number.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Awaitable, Callable

import aiohttp

RUNS = 3
CONCURRENCY = 8
MAX_TOKENS = 64
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=300)

PROMPTS = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a bicycle stays upright, step by step.",
    "Describe a busy market in a coastal town at dawn.",
    "List ten ideas for a weekend project with a child, with one sentence each.",
    "Tell the history of the printing press as if to a curious teenager.",
    "Write a letter from a cat to its owner about the new sofa.",
    "Explain what a compiler does, with an everyday analogy.",
    "Describe the water cycle in a poem of several stanzas.",
)

MakeBody = Callable[[str, str, int], dict[str, Any]]


class BenchmarkError(RuntimeError):
    """The benchmark could not measure a throughput."""


async def served_model(session: aiohttp.ClientSession) -> str:
    """The first model id in GET /v1/models."""
    async with session.get("/v1/models", timeout=REQUEST_TIMEOUT) as resp:
        if resp.status != 200:
            raise BenchmarkError(f"GET /v1/models answered {resp.status}: {(await resp.text())[:300]}")
        models = (await resp.json()).get("data") or []
    if not models or not models[0].get("id"):
        raise BenchmarkError("GET /v1/models lists no model")
    return models[0]["id"]


async def post_json(session: aiohttp.ClientSession, path: str, body: dict[str, Any]) -> Any:
    """POSTs one request, reads the answer to the end, returns its JSON (BenchmarkError when it
    fails or is not a 200 with JSON)."""
    try:
        async with session.post(path, json=body, timeout=REQUEST_TIMEOUT) as resp:
            text = await resp.text()
            if resp.status != 200:
                raise BenchmarkError(f"POST {path} answered {resp.status}: {text[:300]}")
            return await resp.json(content_type=None)
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        raise BenchmarkError(f"POST {path} failed: {exc!r}") from exc


async def completion_tokens(session: aiohttp.ClientSession, path: str, body: dict[str, Any]) -> int:
    """Sends one request, reads the response to the end, returns its usage.completion_tokens."""
    data = await post_json(session, path, body)
    usage = data.get("usage") if isinstance(data, dict) else None
    tokens = (usage or {}).get("completion_tokens")
    if not isinstance(tokens, int) or tokens <= 0:
        raise BenchmarkError(f"POST {path} returned no completion tokens (usage={usage!r})")
    return tokens


async def run_benchmark(session: aiohttp.ClientSession, path: str, make_body: MakeBody, *,
                        runs: int = RUNS, concurrency: int = CONCURRENCY, max_tokens: int = MAX_TOKENS) -> float:
    """Mean tokens/s over `runs` timed runs of `concurrency` simultaneous requests, after a warm-up."""
    if runs < 1 or concurrency < 1 or max_tokens < 1:
        raise ValueError("runs, concurrency and max_tokens must be positive")
    model = await served_model(session)

    async def generate(prompt: str) -> int:
        return await completion_tokens(session, path, make_body(model, prompt, max_tokens))

    return await timed_runs(generate, runs=runs, concurrency=concurrency)


async def timed_runs(generate: Callable[[str], Awaitable[int]], *, runs: int,
                     concurrency: int) -> float:
    """Mean tokens/s over `runs` runs of `concurrency` simultaneous `generate(prompt)` calls (each
    returns the tokens it generated), after one warm-up call."""
    await generate(PROMPTS[0])
    rates = []
    for _ in range(runs):
        started = time.perf_counter()
        tokens = await asyncio.gather(*(generate(PROMPTS[i % len(PROMPTS)])
                                        for i in range(concurrency)))
        rates.append(sum(tokens) / (time.perf_counter() - started))
    return sum(rates) / len(rates)
