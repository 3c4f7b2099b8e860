"""The worker as a real process: readiness, drain on SIGTERM, flat memory on huge streams."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time

import aiohttp
import psutil
import pytest

from .conftest import PYTHON, REPO, free_port, wait_until, worker_env


class WorkerProcess:
    def __init__(self, backend_url: str, **env: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "vespa"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env=worker_env(VESPA_UNSECURED="true", VESPA_BACKEND_URL=backend_url,
                           VESPA_WORKER_PORT=str(self.port), VESPA_WORKER_HOST="127.0.0.1",
                           VESPA_HEALTHCHECK_INTERVAL="0.2", **env))

    async def status(self, session: aiohttp.ClientSession, path: str) -> int | None:
        try:
            async with session.get(self.url + path) as response:
                return response.status
        except aiohttp.ClientError:
            return None

    async def wait_ready(self, session: aiohttp.ClientSession, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while await self.status(session, "/_vespa/readyz") != 200:
            assert self.proc.poll() is None, self.proc.stdout.read().decode()
            assert time.monotonic() < deadline, "worker never became ready"
            await asyncio.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.proc.stdout.close()


@pytest.fixture
async def session():
    async with aiohttp.ClientSession() as client_session:
        yield client_session


@pytest.fixture
def spawn():
    procs = []

    def factory(backend_url: str, **env: str) -> WorkerProcess:
        proc = WorkerProcess(backend_url, **env)
        procs.append(proc)
        return proc

    yield factory
    for proc in procs:
        proc.stop()


def backend_url(backend) -> str:
    return str(backend.make_url("")).rstrip("/")


async def test_readyz_follows_backend_health(spawn, backend, session):
    backend.log.healthy = False
    worker = spawn(backend_url(backend))
    await wait_until(lambda: worker.proc.poll() is None, 5)
    deadline = time.monotonic() + 10
    while await worker.status(session, "/_vespa/healthz") != 200:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert await worker.status(session, "/_vespa/readyz") == 503
    backend.log.healthy = True
    await worker.wait_ready(session)
    assert await worker.status(session, "/_vespa/nope") == 404


async def test_python_server_py_is_the_same_entry(backend, session):
    port = free_port()
    proc = subprocess.Popen([PYTHON, "server.py"], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL,
                            env=worker_env(VESPA_UNSECURED="true", VESPA_WORKER_PORT=str(port),
                                           VESPA_BACKEND_URL=backend_url(backend)))
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                async with session.post(f"http://127.0.0.1:{port}/echo", data=b"{}") as response:
                    assert response.status == 200
                    assert (await response.json())["method"] == "POST"
                    break
            except aiohttp.ClientConnectionError:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
    finally:
        proc.terminate()
        assert proc.wait(15) == 0


async def test_sigterm_drains_streams_in_flight_then_exits_0(spawn, backend, session):
    worker = spawn(backend_url(backend), VESPA_DRAIN_TIMEOUT="10")
    await worker.wait_ready(session)
    streams = [await session.get(f"{worker.url}/slow-stream?name=s{i}&n=15&delay=0.05")
               for i in range(5)]
    for stream in streams:
        assert await stream.content.readline() == b"data: 0\n"
    worker.proc.send_signal(signal.SIGTERM)

    async def draining() -> bool:
        return await worker.status(session, "/_vespa/readyz") == 503

    await wait_until(draining, timeout=5)  # it took the signal: not ready any more
    async with session.get(f"{worker.url}/echo") as refused:
        assert refused.status == 503
        assert "shutting down" in (await refused.json())["error"]
    bodies = [await stream.read() for stream in streams]
    for body in bodies:
        assert body.endswith(b"data: 14\n\n")
    assert await asyncio.to_thread(worker.proc.wait, 10) == 0
    assert sorted(backend.log.finished) == [f"s{i}" for i in range(5)]


async def test_drain_timeout_cuts_what_is_still_running(spawn, backend, session):
    worker = spawn(backend_url(backend), VESPA_DRAIN_TIMEOUT="0.5")
    await worker.wait_ready(session)
    stream = await session.get(f"{worker.url}/slow-stream?name=long&n=200&delay=0.05")
    assert await stream.content.readline() == b"data: 0\n"
    started = time.monotonic()
    worker.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(worker.proc.wait, 10) == 0
    assert time.monotonic() - started < 4
    with pytest.raises(aiohttp.ClientPayloadError):
        await stream.read()


async def test_200_mb_stream_keeps_worker_memory_flat(spawn, backend, session):
    worker = spawn(backend_url(backend))
    await worker.wait_ready(session)
    process = psutil.Process(worker.proc.pid)
    async with session.get(f"{worker.url}/echo") as warm:
        await warm.read()
    baseline = process.memory_info().rss
    peak = baseline
    received = 0
    total = 200 * 1024 * 1024
    async with session.get(f"{worker.url}/big?bytes={total}&length=1") as response:
        assert response.headers["Content-Type"] == "audio/wav"
        assert int(response.headers["Content-Length"]) == total
        async for chunk in response.content.iter_chunked(1 << 20):
            received += len(chunk)
            peak = max(peak, process.memory_info().rss)
    assert received == total
    growth_mb = (peak - baseline) / 2**20
    assert growth_mb < 40, f"worker RSS grew {growth_mb:.0f} MB while relaying 200 MB"


def self_signed(tmp_path) -> tuple[str, str]:
    cert, key = tmp_path / "instance.crt", tmp_path / "instance.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return str(cert), str(key)


async def test_https_with_instance_certificate(spawn, backend, session, tmp_path):
    import ssl
    cert, key = self_signed(tmp_path)
    worker = spawn(backend_url(backend), USE_SSL="true", VESPA_SSL_CERT=cert,
                   VESPA_SSL_KEY=key)
    worker.url = worker.url.replace("http://", "https://")
    trust = ssl.create_default_context(cafile=cert)
    deadline = time.monotonic() + 20
    while True:
        try:
            async with session.post(f"{worker.url}/echo", data=b"{}", ssl=trust) as response:
                assert response.status == 200
                headers = dict((await response.json())["headers"])
                assert headers["X-Forwarded-Proto"] == "https"
                break
        except aiohttp.ClientConnectionError:
            assert time.monotonic() < deadline and worker.proc.poll() is None
            await asyncio.sleep(0.1)


def test_https_without_certificate_stops_with_one_line(tmp_path):
    result = subprocess.run([PYTHON, "-m", "vespa"], cwd=REPO, capture_output=True, text=True,
                            timeout=30, env=worker_env(VESPA_USE_SSL="true",
                                                       VESPA_SSL_CERT=str(tmp_path / "no.crt")))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "VESPA_SSL_CERT" in lines[0] and "no.crt" in lines[0]


async def test_connections_that_send_nothing_are_closed_and_others_served(spawn, backend, session):
    worker = spawn(backend_url(backend), VESPA_KEEPALIVE_TIMEOUT="1")
    await worker.wait_ready(session)
    idle = [await asyncio.open_connection("127.0.0.1", worker.port) for _ in range(200)]
    idle[0][1].write(b"GET /echo HTTP/1.1\r\nHost: x\r\n")  # a request that never ends
    async with session.post(f"{worker.url}/echo", data=b"{}") as response:
        assert response.status == 200
    closed = 0
    for reader, writer in idle:
        try:
            if await asyncio.wait_for(reader.read(), 5) == b"":
                closed += 1
        except (asyncio.TimeoutError, ConnectionError):
            pass
        writer.close()
    assert closed == len(idle)


async def test_json_logs_carry_the_request_id_and_never_the_tokens(spawn, backend, session):
    master, logs_token = "mt-0123456789abcdef0123", "lt-abcdef0123456789"
    # an autoscaler address that refuses connections: the reporter logs its failures
    worker = spawn(backend_url(backend), VESPA_LOG_FORMAT="json", MASTER_TOKEN=master,
                   VESPA_LOGS_TOKEN=logs_token, REPORT_ADDR=f"http://127.0.0.1:{free_port()}",
                   VESPA_MAX_THROUGHPUT="10", VESPA_REPORT_INTERVAL="0.1",
                   VESPA_MAX_WAITTIME="5")  # a typo: warned about at start
    await worker.wait_ready(session)
    async with session.get(worker.url + "/crash", headers={"X-Request-Id": "json-rid-1"}) as r:
        with pytest.raises(aiohttp.ClientPayloadError):
            await r.read()  # the backend died mid-stream: the worker logs a warning
    worker.proc.send_signal(signal.SIGTERM)
    worker.proc.wait(10)
    output = worker.proc.stdout.read().decode()
    lines = [json.loads(line) for line in output.splitlines()]  # every line is one JSON object
    assert {"time", "level", "logger", "message"} <= set(lines[0])
    crash = [line for line in lines if line.get("request_id") == "json-rid-1"]
    assert crash and "mid-response" in crash[0]["message"], output
    assert any("127.0.0.1" in line["message"] for line in lines)  # the reporter's complaints
    assert master not in output and logs_token not in output
    assert any(line["level"] == "WARNING" and line["message"].startswith(
        "VESPA_MAX_WAITTIME is not a Vespa setting") for line in lines), output


async def test_a_launched_backend_printing_its_token_never_leaks_it_to_the_log(session, tmp_path):
    """Neither to the worker's log nor to the backend's own log file, which keeps every other
    byte as the backend wrote it (not UTF-8 included)."""
    hf_token = "hf_0123456789abcdefghijklmnop"
    plain = b"caf\xe9 au lait: no secret on this line\n"
    script = (f"import os, runpy, sys; print('loading with token', os.environ['HF_TOKEN'], "
              f"flush=True); sys.stdout.buffer.write({plain!r}); sys.stdout.flush(); "
              f"sys.argv = ['backend', '--port', sys.argv[1]]; "
              f"runpy.run_path('perf/backend.py', run_name='__main__')")
    port, backend_log = free_port(), tmp_path / "backend.log"
    worker = WorkerProcess(f"http://127.0.0.1:{port}", VESPA_BACKEND="command",
                           VESPA_BACKEND_COMMAND=f'{PYTHON} -c "{script}" {{port}}',
                           VESPA_BACKEND_PORT=str(port), VESPA_LOG_FORMAT="json",
                           VESPA_CACHE_DIR=str(tmp_path), VESPA_BACKEND_LOG=str(backend_log),
                           HF_TOKEN=hf_token)
    try:
        await worker.wait_ready(session)
    finally:
        worker.proc.send_signal(signal.SIGTERM)
        worker.proc.wait(10)
    output = worker.proc.stdout.read().decode()
    worker.proc.stdout.close()
    printed = [json.loads(line)["message"] for line in output.splitlines()
               if "print(" not in line and "loading with token" in line]
    assert printed == ["python: loading with token hf_0…"], output
    assert hf_token not in output
    written = backend_log.read_bytes()
    assert hf_token.encode() not in written
    lines = written.splitlines(keepends=True)
    assert lines[:2] == ["loading with token hf_0…\n".encode(), plain], written[:300]
