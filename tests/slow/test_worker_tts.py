"""The product path with TTS: ``python -m vespa`` with VESPA_BACKEND=tts launches the TTS server
(piper, en_US-joe-medium) from .venvs/tts, benchmarks it in characters/s, reports to an autoscaler
emulator and serves signed speech; audio streams through the worker; SIGTERM leaves no orphan.

One worker for the whole module. Needs backends/setup_tts.sh to have run; in CI (CI=true) its
absence fails.
"""

from __future__ import annotations

import asyncio
import collections
import math
import os
import struct
import time

import aiohttp
import pytest
import pytest_asyncio

from vespa.devtools.autoscaler import AutoscalerEmulator

from tests.slow.worker_proc import (ROOT, WorkerProcess, benchmark_cache,
                                    check_sigterm_leaves_nothing, ready_reports, require_setup,
                                    wait_for)

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

READY_TIMEOUT = 240  # ~12 s alone (start + benchmark); more while other work shares the cores
VOICE = "en_US-joe-medium"
RATE = 22050
SILENCE_RMS = 300  # int16 RMS; speech from piper is in the thousands
LONG_TEXT = " ".join(
    f"This is sentence number {i}, and it is here to make the text long." for i in range(24))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def emulator():
    async with AutoscalerEmulator(scheme="full") as autoscaler:
        yield autoscaler


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def session():
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as client:
        yield client


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def worker(tmp_path_factory, emulator, session):
    venv = os.environ.get("VESPA_TTS_VENV") or str(ROOT / ".venvs" / "tts")
    python = os.path.join(venv, "bin", "python")
    require_setup(None if os.path.exists(python) else
                  f"{python} is missing: run backends/setup_tts.sh")
    proc = WorkerProcess(tmp_path_factory.mktemp("worker-tts"), "tts", emulator.url,
                         VESPA_TTS_VENV=venv, VESPA_TTS_ENGINE="piper")
    proc.backend_python = python
    try:
        print(f"worker ready after {await proc.wait_ready(session, READY_TIMEOUT):.1f} s")
        yield proc
    finally:
        proc.kill_everything()


def read_wav(body: bytes, streamed: bool) -> tuple[int, bytes]:
    """(sample rate, samples) of a mono 16-bit PCM WAV, checking every header field: a streamed
    one has open sizes, one answered whole (a single sentence) its true sizes."""
    assert len(body) >= 44, body[:200]
    riff, riff_size, wave_id, fmt, fmt_size = struct.unpack_from("<4sI4s4sI", body)
    assert (riff, wave_id, fmt, fmt_size) == (b"RIFF", b"WAVE", b"fmt ", 16)
    audio_format, channels, rate, byte_rate, block_align, bits = struct.unpack_from("<HHIIHH", body, 20)
    assert (audio_format, channels, bits, block_align, byte_rate) == (1, 1, 16, 2, 2 * rate)
    data_id, data_size = struct.unpack_from("<4sI", body, 36)
    assert data_id == b"data"
    if streamed:
        assert data_size == riff_size == 0xFFFFFFFF  # the length is not known when it is sent
    else:
        assert (riff_size, data_size) == (len(body) - 8, len(body) - 44)
    return rate, body[44:]


def rms(pcm: bytes) -> float:
    samples = struct.unpack(f"<{len(pcm) // 2}h", pcm[: len(pcm) // 2 * 2])
    return math.sqrt(sum(s * s for s in samples) / max(1, len(samples)))


async def test_ready_with_a_benchmarked_max_perf(worker, emulator):
    await wait_for(lambda: ready_reports(emulator), 10, "a worker_status with max_perf > 0")
    first = ready_reports(emulator)[0]
    assert (first["id"], first["url"], first["error_msg"]) == (41, worker.url, "")
    assert first["loadtime"] > 0
    [entry] = benchmark_cache(worker)  # measured now, in the worker's private cache
    assert entry["benchmark"] == "benchmarks.tts:benchmark"
    assert entry["measured_at"] >= worker.started
    assert first["max_perf"] == pytest.approx(entry["throughput"])
    assert 5 < first["max_perf"] < 1_000_000, first["max_perf"]  # input characters per second
    print(f"max_perf {first['max_perf']:.0f} chars/s, loadtime {first['loadtime']:.1f} s")
    [server] = [p for p in worker.on_backend_port() if p.ppid() == worker.proc.pid]
    assert server.cmdline()[0] == worker.backend_python
    assert emulator.validation_errors == []


async def speak(worker, emulator, session, text: str) -> tuple[aiohttp.ClientResponse, bytes]:
    payload = {"model": "tts-1", "input": text, "voice": "alloy", "response_format": "wav"}
    async with session.post(f"{worker.url}/v1/audio/speech",
                            json=worker.envelope(emulator, payload, cost=len(text))) as response:
        return response, await response.read()


async def test_signed_speech_is_a_valid_wav_that_grows_with_the_text(worker, emulator, session):
    durations = []
    for text, streamed in (("Hello there.", False),
                           ("Hello there. " + " ".join(["The weather is lovely today."] * 4), True)):
        response, body = await speak(worker, emulator, session, text)
        assert response.status == 200, body[:300]
        assert response.headers["Content-Type"] == "audio/wav"
        rate, pcm = read_wav(body, streamed)
        assert rate == RATE == int(response.headers["X-Sample-Rate"])
        assert len(pcm) % 2 == 0 and rms(pcm) > SILENCE_RMS, "silence"
        durations.append(len(pcm) / 2 / rate)
    print(f"durations {durations[0]:.2f} s and {durations[1]:.2f} s")
    assert 0.4 < durations[0] < 3.0
    assert durations[1] > 3 * durations[0]


async def test_streaming_of_a_long_text_starts_before_synthesis_ends(worker, emulator, session):
    payload = {"input": LONG_TEXT, "voice": VOICE}
    started = time.monotonic()
    first_audio = None
    body = b""
    async with session.post(f"{worker.url}/v1/audio/speech",
                            json=worker.envelope(emulator, payload, cost=len(LONG_TEXT))) as response:
        assert response.status == 200
        async for chunk in response.content.iter_any():
            body += chunk
            if first_audio is None and len(body) > 44 + 4096:  # the header and real samples
                first_audio = time.monotonic() - started
    total = time.monotonic() - started
    rate, pcm = read_wav(body, streamed=True)
    print(f"first audio after {first_audio:.2f} s, {len(LONG_TEXT)} chars in {total:.2f} s "
          f"({len(pcm) / 2 / rate:.0f} s of audio)")
    assert len(pcm) / 2 / rate > 20 and rms(pcm) > SILENCE_RMS
    assert first_audio < total / 4, "the audio was not streamed as it was made"


async def test_voices_with_query_auth(worker, emulator, session):
    url = f"{worker.url}/voices?{worker.query_auth(emulator, cost=1.0)}"
    async with session.get(url) as response:
        assert response.status == 200, await response.text()
        voices = await response.json()
    assert voices["engine"] == "piper" and voices["default"] == VOICE
    assert voices["voices"] == [VOICE] and voices["sample_rate"] == RATE
    async with session.get(f"{worker.url}/voices") as unsigned:  # signed mode: no open proxy
        assert unsigned.status == 422
        assert "serverless_signature" in await unsigned.text()


async def test_each_finished_request_is_deleted_exactly_once(worker, emulator, session):
    response, _ = await speak(worker, emulator, session, "One more.")
    assert response.status == 200
    sent = worker.request_idxs
    await wait_for(lambda: set(sent) <= set(emulator.deleted_request_idxs()), 10,
                   "every request_idx in delete_requests")
    await asyncio.sleep(0.5)
    assert collections.Counter(emulator.deleted_request_idxs()) == collections.Counter(sent)
    assert all(r["success"] and r["status"] == "Success" for r in emulator.deleted)
    assert emulator.validation_errors == []


async def test_sigterm_exits_0_and_leaves_no_orphan(worker):
    """Last: SIGTERM stops the worker, which stops the TTS server."""
    took = await check_sigterm_leaves_nothing(worker)
    print(f"worker and TTS server stopped in {took:.1f} s")
    assert took < 20
