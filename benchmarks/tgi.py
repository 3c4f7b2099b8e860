"""Startup benchmark for Hugging Face text-generation-inference (TGI): generated tokens/s through
its native POST /generate. Load as VESPA_BENCHMARK=benchmarks.tgi:benchmark.

TGI reports what it generated in ``details.generated_tokens`` when asked for details; a request
that fails or reports no tokens is a BenchmarkError, never a made-up number.
"""

from __future__ import annotations

import aiohttp

from benchmarks._common import CONCURRENCY, MAX_TOKENS, RUNS, BenchmarkError, post_json, timed_runs

PATH = "/generate"


def request_body(prompt: str, max_tokens: int) -> dict:
    return {"inputs": prompt, "parameters": {"max_new_tokens": max_tokens, "details": True,
                                             "do_sample": True, "temperature": 0.7}}


async def generated_tokens(session: aiohttp.ClientSession, body: dict) -> int:
    """Sends one /generate request, reads it to the end, returns details.generated_tokens."""
    data = await post_json(session, PATH, body)
    details = data.get("details") if isinstance(data, dict) else None
    tokens = details.get("generated_tokens") if isinstance(details, dict) else None
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens <= 0:
        raise BenchmarkError(f"POST {PATH} reported no generated tokens (details={details!r})")
    return tokens


async def benchmark(backend_url: str, session: aiohttp.ClientSession, *, runs: int = RUNS,
                    concurrency: int = CONCURRENCY, max_tokens: int = MAX_TOKENS) -> float:
    """Mean generated tokens/s of the TGI server that `session` (base_url=backend_url) talks to."""
    if runs < 1 or concurrency < 1 or max_tokens < 1:
        raise ValueError("runs, concurrency and max_tokens must be positive")

    async def generate(prompt: str) -> int:
        return await generated_tokens(session, request_body(prompt, max_tokens))

    return await timed_runs(generate, runs=runs, concurrency=concurrency)
