"""Startup benchmark for OpenAI-compatible chat servers (vLLM): completion tokens/s through
POST /v1/chat/completions. Load as VESPA_BENCHMARK=benchmarks.openai_chat:benchmark.
"""

from __future__ import annotations

from typing import Any

import aiohttp

from benchmarks._common import CONCURRENCY, MAX_TOKENS, RUNS, run_benchmark

PATH = "/v1/chat/completions"


def request_body(model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    # ignore_eos (a vLLM extension) makes every request generate max_tokens: the same work each run.
    return {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0.7,
        "ignore_eos": True,
    }


async def benchmark(backend_url: str, session: aiohttp.ClientSession, *, runs: int = RUNS,
                    concurrency: int = CONCURRENCY, max_tokens: int = MAX_TOKENS) -> float:
    """Mean completion tokens/s of the chat server that `session` (base_url=backend_url) talks to."""
    return await run_benchmark(session, PATH, request_body, runs=runs, concurrency=concurrency,
                               max_tokens=max_tokens)
