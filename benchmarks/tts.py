"""Startup throughput benchmark of the TTS backend (`VESPA_BENCHMARK=benchmarks.tts:benchmark`).

Unit: **input characters synthesized per second** — `len(input)` of every request whose audio
was read to its end and is valid, over the wall time of the run. The worker's client proxy
estimates a TTS request's cost the same way, as `len(input)` characters, so the autoscaler
compares like with like. After one warm-up request, RUNS runs each send CONCURRENCY streams of
REQUESTS_PER_STREAM requests; the result is the mean of the runs' rates. Any failed, cut short
or invalid response raises BenchmarkError. About 8 s with piper on 2 busy CPU cores.
"""

from __future__ import annotations

import asyncio
import statistics
import struct

import aiohttp

from benchmarks._common import BenchmarkError

SPEECH_PATH = "/v1/audio/speech"
RUNS = 3
CONCURRENCY = 2
REQUESTS_PER_STREAM = 2
TEXT = (
    "The quick brown fox jumps over the lazy dog. "
    "Serverless workers start when requests arrive and stop when the queue is empty. "
    "Each sentence is spoken as soon as it is ready, so the first sound comes early. "
    "This benchmark measures how many characters of text become speech every second."
)  # 4 sentences, about 270 characters
WARMUP_TEXT = "Warming up the voice."
HEADER_SIZE = 44
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=300)


def check_wav(body: bytes) -> int:
    """Number of PCM bytes of a valid mono 16-bit WAV response; ValueError otherwise."""
    if len(body) < HEADER_SIZE or body[:4] != b"RIFF" or body[8:12] != b"WAVE":
        raise ValueError("response is not a WAV file")
    channels, rate = struct.unpack_from("<HI", body, 22)
    bits = struct.unpack_from("<H", body, 34)[0]
    if channels != 1 or bits != 16 or rate <= 0:
        raise ValueError(f"unexpected WAV format: {channels} channels, {bits} bits, {rate} Hz")
    pcm_bytes = len(body) - HEADER_SIZE
    if pcm_bytes <= 0 or pcm_bytes % 2:
        raise ValueError(f"WAV response has {pcm_bytes} bytes of samples")
    return pcm_bytes


async def speak(session: aiohttp.ClientSession, text: str) -> int:
    """Characters of `text` once its whole, valid audio has been received."""
    body = {"input": text, "response_format": "wav"}
    try:
        async with session.post(SPEECH_PATH, json=body, timeout=REQUEST_TIMEOUT) as response:
            audio = await response.read()
            if response.status != 200:
                raise BenchmarkError(f"POST {SPEECH_PATH} answered {response.status}: {audio[:300]!r}")
        check_wav(audio)
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as error:
        raise BenchmarkError(f"POST {SPEECH_PATH} failed: {error!r}") from error
    return len(text)


async def stream(session: aiohttp.ClientSession) -> int:
    characters = 0
    for _ in range(REQUESTS_PER_STREAM):
        characters += await speak(session, TEXT)
    return characters


async def benchmark(backend_url: str, session: aiohttp.ClientSession) -> float:
    """Mean input characters per second over RUNS runs at CONCURRENCY (session has base_url)."""
    loop = asyncio.get_running_loop()
    await speak(session, WARMUP_TEXT)
    rates = []
    for _ in range(RUNS):
        started = loop.time()
        counts = await asyncio.gather(*(stream(session) for _ in range(CONCURRENCY)))
        rates.append(sum(counts) / (loop.time() - started))
    return statistics.fmean(rates)
