"""The client proxy end to end: the real ``openai`` SDK -> client proxy -> autoscaler emulator
-> real Vespa workers -> an OpenAI-shaped loopback backend. Nothing of ours is mocked.
"""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from vespa.worker import Worker
from vespa.client import RoutePolicy, VastClient
from vespa.client.keys import KeyLookupError
from vespa.config import load_settings
from vespa.devtools.autoscaler import AutoscalerEmulator

from .conftest import PYTHON, REPO, free_port, wait_until, worker_env
from .serving import WorkerTestServer
from .fleet import autoscaler_key
from .openai_backend import make_openai_backend, wav

ENDPOINT_KEY = "endpoint-key-3f9a1c"
ACCOUNT_KEY = "account-key-77c1e0"
FAST = RoutePolicy(poll_base=0.1, poll_cap=0.5, retry_base=0.02)
HI = [{"role": "user", "content": "hello there friend"}]


def openai_sdk():
    import openai  # a test extra: scripts/test.sh installs it
    return openai


class Stack:
    """One emulator; workers, client proxies and SDK clients started on demand, all stopped."""

    def __init__(self, emulator: AutoscalerEmulator, tmp_path: Path):
        self.emulator, self.tmp_path = emulator, tmp_path
        self.servers: list[TestServer] = []
        self.clients: list[VastClient] = []
        self.sdks: list = []
        self.processes: list[asyncio.subprocess.Process] = []

    def worker_env(self, backend: TestServer, container_id: int, url: str, **env) -> dict:
        return {"VESPA_BACKEND_URL": str(backend.make_url("")).rstrip("/"),
                "REPORT_ADDR": self.emulator.url, "CONTAINER_ID": str(container_id),
                "MASTER_TOKEN": "mtoken", "VESPA_PUBLIC_URL": url, "VESPA_USE_SSL": "false",
                "VESPA_MAX_THROUGHPUT": "1000", "VESPA_REPORT_INTERVAL": "0.05",
                "VESPA_HEALTHCHECK_INTERVAL": "0.2",
                "VESPA_CACHE_DIR": str(self.tmp_path / f"cache-{container_id}-{len(self.servers)}"),
                **env}

    async def worker(self, backend: TestServer, container_id: int = 7,
                     ssl_context: ssl.SSLContext | None = None, **env: str) -> Worker:
        port = free_port()
        scheme = "https" if ssl_context else "http"
        worker = Worker(load_settings(self.worker_env(
            backend, container_id, f"{scheme}://127.0.0.1:{port}", **env)))
        server = WorkerTestServer(worker, host="127.0.0.1", port=port)
        await server.start_server(ssl=ssl_context)
        self.servers.append(server)
        return worker

    async def worker_process(self, backend: TestServer,
                             container_id: int) -> asyncio.subprocess.Process:
        """A worker as a real process, so that a test can kill it (SIGKILL)."""
        port = free_port()
        env = worker_env(VESPA_WORKER_PORT=str(port), VESPA_WORKER_HOST="127.0.0.1",
                         **self.worker_env(backend, container_id, f"http://127.0.0.1:{port}"))
        with open(self.tmp_path / f"worker-{container_id}.log", "wb") as output:
            process = await asyncio.create_subprocess_exec(
                PYTHON, "-m", "vespa", cwd=REPO, env=env, stdout=output, stderr=output)
        self.processes.append(process)
        return process

    async def ready(self, container_id: int, timeout: float = 20) -> None:
        def is_ready() -> bool:
            view = self.emulator.workers.get(container_id)
            return view is not None and view.state(time.monotonic(), 30) == "ready"
        await wait_until(is_ready, timeout=timeout)

    async def client(self, **fields) -> VastClient:
        options = dict(endpoint=self.emulator.endpoint, api_key=ENDPOINT_KEY,
                       api_key_source="--api-key", autoscaler_url=self.emulator.url, port=0)
        options.update(fields)
        client = VastClient(route_policy=FAST, **options)
        await client.start()
        self.clients.append(client)
        return client

    def sdk(self, client: VastClient, api_key: str = ENDPOINT_KEY):
        """The real openai SDK pointed at the proxy (its own retries off: ours are tested)."""
        sdk = openai_sdk().AsyncOpenAI(base_url=client.url + "/v1", api_key=api_key,
                                       max_retries=0, timeout=30)
        self.sdks.append(sdk)
        return sdk

    async def close(self) -> None:
        for sdk in self.sdks:
            await sdk.close()
        for client in self.clients:
            await client.close()
        for process in self.processes:
            if process.returncode is None:
                process.kill()
                await process.wait()
        for server in self.servers:
            await server.close()
        await self.emulator.stop()


@pytest.fixture
async def backends():
    servers = []

    async def start() -> TestServer:
        app, log = make_openai_backend()
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        server.log = log
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
async def stack(tmp_path):
    emulator = AutoscalerEmulator(api_key=ENDPOINT_KEY, private_key=autoscaler_key())
    emulator.account_key = ACCOUNT_KEY
    await emulator.start()
    stack = Stack(emulator, tmp_path)
    yield stack
    await stack.close()


def leaked(backend: TestServer, *secrets: str) -> list[str]:
    """Vast keys found anywhere in what the backend received."""
    seen = " ".join(f"{r['headers']} {r['query']} {r['body']}" for r in backend.log.requests)
    return [secret for secret in secrets if secret in seen]


async def serving(stack: Stack, backend: TestServer, worker_env: dict | None = None,
                  **client_fields) -> VastClient:
    """One ready worker in front of ``backend`` and a client proxy."""
    await stack.worker(backend, **(worker_env or {}))
    await stack.ready(7)
    return await stack.client(**client_fields)


# -- the SDK's calls ---------------------------------------------------------------------------

async def test_chat_completion(stack, backends):
    backend = await backends()
    sdk = stack.sdk(await serving(stack, backend))  # the SDK's key is the endpoint key
    answer = await sdk.chat.completions.create(model="m", messages=HI, max_tokens=7)
    assert answer.choices[0].message.content == "echo: hello there friend"
    [seen] = backend.log.requests
    assert seen["path"] == "/v1/chat/completions" and '"max_tokens":7' in seen["body"]
    assert "auth_data" not in seen["body"]
    assert leaked(backend, ENDPOINT_KEY, ACCOUNT_KEY) == []
    [route] = stack.emulator.routes
    assert route["cost"] == 7
    await wait_until(lambda: route["request_idx"] in stack.emulator.deleted_request_idxs())
    assert stack.emulator.validation_errors == []


async def test_streaming_chat_arrives_chunk_by_chunk(stack, backends):
    sdk = stack.sdk(await serving(stack, await backends()))
    stream = await sdk.chat.completions.create(model="m", messages=HI, stream=True)
    pieces, times = [], []
    async for event in stream:
        if event.choices[0].delta.content:
            pieces.append(event.choices[0].delta.content)
            times.append(time.monotonic())
    assert "".join(pieces) == "echo: hello there friend "
    assert times[-1] - times[0] > 0.04  # the backend paces its chunks: nothing was buffered


async def test_get_route_keeps_the_callers_query(stack, backends):
    backend = await backends()
    client = await serving(stack, backend)
    models = [model.id async for model in stack.sdk(client).models.list()]
    assert models == ["vespa-test-model"]
    async with aiohttp.ClientSession() as session:
        async with session.get(client.url + "/v1/models?limit=5&q=a%20b") as response:
            assert response.status == 200
    assert [r["query"] for r in backend.log.requests] == ["", "limit=5&q=a%20b"]
    assert stack.emulator.routes[-1]["cost"] == 100.0  # nothing to estimate: the default


async def test_binary_speech_response(stack, backends):
    backend = await backends()
    sdk = stack.sdk(await serving(stack, backend))
    text = "Serverless speech, byte for byte."
    response = await sdk.audio.speech.create(model="tts", voice="a", input=text,
                                             response_format="wav")
    assert await response.aread() == wav(len(text) * 100)
    assert stack.emulator.routes[-1]["cost"] == len(text)  # characters: the TTS benchmark unit


async def test_compressed_answer_is_relayed_untouched(stack, backends):
    client = await serving(stack, await backends())
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        async with session.get(client.url + "/v1/compressed",
                               headers={"Accept-Encoding": "gzip"}) as response:
            raw = await response.read()
            assert response.headers["Content-Encoding"] == "gzip" and raw[:2] == b"\x1f\x8b"
    async with aiohttp.ClientSession() as session:
        async with session.get(client.url + "/v1/compressed") as response:
            assert await response.json() == {"compressed": True}
    async with aiohttp.ClientSession(auto_decompress=False,
                                     skip_auto_headers=("Accept-Encoding",)) as session:
        async with session.get(client.url + "/v1/compressed") as response:
            assert "Content-Encoding" not in response.headers  # we asked for none: none added
            assert await response.read() == b'{"compressed": true}'


# -- cold start, retries -----------------------------------------------------------------------

async def test_cold_start_waits_for_a_worker(stack, backends):
    backend = await backends()
    sdk = stack.sdk(await stack.client())
    call = asyncio.create_task(sdk.chat.completions.create(model="m", messages=HI))
    # asked for a worker and got none, then asked again: it polls, the call waits
    await wait_until(lambda: len(stack.emulator.route_requests) >= 2, timeout=10)
    assert not call.done() and stack.emulator.routes == []
    await stack.worker(backend)
    answer = await asyncio.wait_for(call, 15)
    assert answer.choices[0].message.content.startswith("echo:")
    # Every poll sent back the request_idx of the first answer: one request, one index.
    assert stack.emulator.signer.last_request_idx == 1
    assert stack.emulator.routes[0]["request_idx"] == 1


async def test_no_ready_worker_within_the_route_timeout_is_503(stack):
    openai = openai_sdk()
    sdk = stack.sdk(await stack.client(route_timeout=0.5))
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as error:
        await sdk.chat.completions.create(model="m", messages=HI)
    assert error.value.status_code == 503
    message = error.value.response.json()["error"]
    assert "has no ready worker" in message and "--route-timeout" in message
    assert 0.5 <= time.monotonic() - started < 5  # the 0.5 s route timeout, generously


async def test_worker_429_is_routed_again(stack, backends):
    backend = await backends()
    # One request at a time; 0.1 s of admitted work already exceeds the 0.05 s wait limit.
    client = await serving(stack, backend, {"VESPA_MAX_CONCURRENCY": "1",
                                            "VESPA_MAX_WAIT_TIME": "0.05"}, max_attempts=6)
    sdk = stack.sdk(client)
    backend.log.chat_gate = asyncio.Event()  # the first chat holds the slot until released
    busy = asyncio.create_task(sdk.chat.completions.create(
        model="m", messages=HI, max_tokens=100))
    await asyncio.wait_for(backend.log.chat_arrived.wait(), 5)
    second = asyncio.create_task(sdk.chat.completions.create(model="m", messages=HI,
                                                             max_tokens=100))
    # turned away by the busy worker twice, routed again each time: busy once, the second 3 times
    await wait_until(lambda: len(stack.emulator.routes) >= 4, timeout=10)
    backend.log.chat_gate.set()
    answer = await asyncio.wait_for(second, 15)
    assert answer.choices[0].message.content.startswith("echo:")
    await busy
    assert len(backend.log.requests) == 2  # the refused attempts never reached the backend
    refused = len(stack.emulator.routes) - 2  # all but busy's route and the second's last
    # each refusal is rejected load: its cost of 100, capped at max wait x throughput (50)
    await wait_until(lambda: sum(r["rej_load"] for r in stack.emulator.reports) == 50 * refused)


async def test_last_429_is_relayed_when_attempts_run_out(stack, backends):
    openai = openai_sdk()
    backend = await backends()
    sdk = stack.sdk(await serving(stack, backend, {"VESPA_MAX_CONCURRENCY": "1",
                                                   "VESPA_MAX_WAIT_TIME": "0.05"},
                                  max_attempts=1))
    backend.log.chat_gate = asyncio.Event()  # the first chat holds the slot until released
    busy = asyncio.create_task(sdk.chat.completions.create(
        model="m", messages=HI, max_tokens=100))
    await asyncio.wait_for(backend.log.chat_arrived.wait(), 5)
    with pytest.raises(openai.RateLimitError) as error:
        await sdk.chat.completions.create(model="m", messages=HI, max_tokens=100)
    # turned away in line (one request counts for at most max wait x throughput: it queues)
    assert "retry in" in error.value.response.json()["error"]
    assert error.value.response.headers["Retry-After"]
    backend.log.chat_gate.set()
    await busy


async def test_worker_killed_before_answering_is_retried_on_another(stack, backends):
    doomed_backend, backend = await backends(), await backends()
    doomed_backend.log.hold_chat = True
    doomed = await stack.worker_process(doomed_backend, container_id=11)
    await stack.ready(11)
    sdk = stack.sdk(await stack.client())
    call = asyncio.create_task(sdk.chat.completions.create(model="m", messages=HI))
    await asyncio.wait_for(doomed_backend.log.chat_arrived.wait(), 10)
    await stack.worker(backend, container_id=7)
    await stack.ready(7)
    doomed.kill()
    await doomed.wait()
    answer = await asyncio.wait_for(call, 15)
    assert answer.choices[0].message.content == "echo: hello there friend"
    routes = [route["worker_id"] for route in stack.emulator.routes]
    # until the autoscaler learns that 11 is gone it may route there once more (refused)
    assert routes[0] == 11 and routes[-1] == 7 and set(routes) == {11, 7}, routes
    assert len(doomed_backend.log.requests) == len(backend.log.requests) == 1


async def test_worker_killed_mid_stream_is_not_retried(stack, backends):
    openai = openai_sdk()
    doomed_backend, backend = await backends(), await backends()
    doomed_backend.log.hold_stream = True
    doomed = await stack.worker_process(doomed_backend, container_id=11)
    await stack.ready(11)
    await stack.worker(backend, container_id=7)
    await stack.ready(7)
    sdk = stack.sdk(await stack.client())
    stream = await sdk.chat.completions.create(model="m", messages=HI, stream=True)
    events = stream.__aiter__()
    first = await asyncio.wait_for(events.__anext__(), 10)
    assert first.choices[0].delta.content == "echo: "
    doomed.kill()
    with pytest.raises(openai.APIConnectionError):  # a cut, not a clean end
        await asyncio.wait_for(events.__anext__(), 10)
    assert len(stack.emulator.routes) == 1 and backend.log.requests == []


# -- keys and errors ---------------------------------------------------------------------------

async def test_autoscaler_401_explains_which_key_is_needed(stack, backends):
    openai = openai_sdk()
    await stack.worker(await backends())
    sdk = stack.sdk(await stack.client(api_key=ACCOUNT_KEY))  # the wrong kind of key
    with pytest.raises(openai.AuthenticationError) as error:
        await sdk.chat.completions.create(model="m", messages=HI)
    assert error.value.status_code == 401
    message = error.value.response.json()["error"]
    assert "endpoint's own API key" in message and "not your account key" in message
    assert "--api-key" in message and "--account-key" in message


async def test_account_key_looks_up_the_endpoint_key(stack, backends):
    backend = await backends()
    client = await serving(stack, backend, api_key=None, account_key=ACCOUNT_KEY,
                           account_key_source="--account-key", console_url=stack.emulator.url)
    assert client.key.looked_up and client.key.value == ENDPOINT_KEY
    answer = await stack.sdk(client, api_key=ACCOUNT_KEY).chat.completions.create(
        model="m", messages=HI)
    assert answer.choices[0].message.content.startswith("echo:")
    assert leaked(backend, ENDPOINT_KEY, ACCOUNT_KEY) == []
    with pytest.raises(KeyLookupError, match="refused the account key"):
        await stack.client(api_key=None, account_key="not-my-account",
                           console_url=stack.emulator.url)


async def test_unreachable_autoscaler_is_502_naming_it(stack):
    address = f"http://127.0.0.1:{free_port()}"
    client = await stack.client(autoscaler_url=address)
    async with aiohttp.ClientSession() as session:
        async with session.post(client.url + "/v1/chat/completions", json={}) as response:
            assert response.status == 502
            assert f"autoscaler unreachable at {address}/route/" in (await response.json())[
                "error"]


async def test_proxy_health_and_bodies_it_cannot_carry(stack):
    client = await stack.client()
    async with aiohttp.ClientSession() as session:
        async with session.get(client.url + "/health") as response:
            assert response.status == 200
            assert (await response.json())["endpoint"] == stack.emulator.endpoint
        async with session.post(client.url + "/v1/audio/transcriptions", data=b"RIFF....",
                                headers={"Content-Type": "audio/wav"}) as response:
            assert response.status == 415
            assert "JSON bodies only" in (await response.json())["error"]
        small = await stack.client(max_body_bytes=1000)
        async with session.post(small.url + "/v1/chat/completions", data=b"{}" * 1000) as response:
            assert response.status == 413
            assert "exceeds 1000 bytes" in (await response.json())["error"]
    assert stack.emulator.routes == []


# -- HTTPS workers -----------------------------------------------------------------------------

def worker_certificates(directory: Path, name: str = "ca") -> tuple[Path, Path, Path]:
    """A root CA without keyUsage (like Vast's) and a 127.0.0.1 certificate it signed."""
    def openssl(*argv: str) -> None:
        subprocess.run(["openssl", *argv], check=True, capture_output=True)
    ca, ca_key = directory / f"{name}.pem", directory / f"{name}.key"
    cert, key, csr = directory / "worker.pem", directory / "worker.key", directory / "worker.csr"
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
            f"/CN={name} root", "-keyout", str(ca_key), "-out", str(ca))
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout",
            str(key), "-out", str(csr))
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
            "-CAcreateserial", "-days", "1", "-out", str(cert), "-extfile",
            str(directory / "san.ext"))
    return ca, cert, key


async def test_https_worker_is_verified_with_the_ca_file(stack, backends, tmp_path):
    ca, cert, key = await asyncio.to_thread(worker_certificates, tmp_path)
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    other_ca, _, _ = await asyncio.to_thread(worker_certificates, other_dir, "other")
    server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_side.load_cert_chain(cert, key)
    await stack.worker(await backends(), ssl_context=server_side)
    await stack.ready(7)
    worker_url = stack.emulator.workers[7].report["url"]
    assert worker_url.startswith("https://")
    strict = ssl.create_default_context(cafile=str(ca))
    strict.verify_flags |= ssl.VERIFY_X509_STRICT
    async with aiohttp.ClientSession() as session:  # why the strict flag must go
        with pytest.raises(aiohttp.ClientConnectorCertificateError, match="key usage"):
            await session.get(worker_url + "/_vespa/healthz", ssl=strict)
    sdk = stack.sdk(await stack.client(ca_file=str(ca)))
    answer = await sdk.chat.completions.create(model="m", messages=HI)
    assert answer.choices[0].message.content.startswith("echo:")
    untrusting = await stack.client(ca_file=str(other_ca))
    async with aiohttp.ClientSession() as session:
        async with session.get(untrusting.url + "/v1/models") as response:
            assert response.status == 502
            assert "TLS check of worker" in (await response.json())["error"]


# -- the command line --------------------------------------------------------------------------

def cli_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAST_", "VESPA_"))}
    env.update(HOME=str(home), PYTHONPATH=str(REPO))
    return env


async def run_cli(home: Path, *argv: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        PYTHON, "client.py", *argv, cwd=REPO, env=cli_env(home), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output, _ = await asyncio.wait_for(process.communicate(), 30)
    return process.returncode, output.decode()


async def test_command_line_serves_lists_and_explains(stack, backends, tmp_path):
    await stack.worker(await backends())
    await stack.ready(7)
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        PYTHON, "client.py", "--endpoint", stack.emulator.endpoint, "--api-key", ENDPOINT_KEY,
        "--autoscaler-url", stack.emulator.url, "--port", str(port), cwd=REPO,
        env=cli_env(tmp_path), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL)
    stack.processes.append(process)
    banner = await asyncio.wait_for(process.stdout.readline(), 20)
    assert f"http://127.0.0.1:{port}" in banner.decode()
    async with aiohttp.ClientSession() as session:
        async with session.post(f"http://127.0.0.1:{port}/v1/chat/completions",
                                json={"model": "m", "messages": HI}) as response:
            assert response.status == 200
            assert (await response.json())["choices"][0]["message"]["content"].startswith("echo")
    process.send_signal(signal.SIGINT)
    assert await asyncio.wait_for(process.wait(), 10) == 0
    code, output = await run_cli(tmp_path, "--list", "--account-key", ACCOUNT_KEY,
                                 "--console-url", stack.emulator.url)
    assert code == 0 and f"1. {stack.emulator.endpoint}  id 1  active" in output
    code, output = await run_cli(tmp_path, "--endpoint", "x")
    assert code == 2 and "--api-key ENDPOINT_KEY or --account-key" in output


async def test_streams_the_openai_sdk_finishes_are_successes_not_cancellations(stack, backends):
    """Issue #18 item 1: the openai SDK (sync and async) stops reading at "data: [DONE]" and
    hangs up; the backend (as vLLM does) ends its body a moment later. Through client.py and
    straight to a dev-mode worker, every one of them must count, and be reported, as a success."""
    backend = await backends()
    client = await serving(stack, backend)
    worker = stack.servers[-1].worker
    openai = openai_sdk()
    linger = {"linger": 0.05}
    for _ in range(3):
        stream = await stack.sdk(client).chat.completions.create(
            model="m", messages=HI, stream=True, extra_body=linger)
        assert "".join([e.choices[0].delta.content or "" async for e in stream])

    def sync_streams(base_url: str, n: int) -> list[str]:
        with openai.OpenAI(base_url=base_url, api_key=ENDPOINT_KEY, max_retries=0,
                           timeout=30) as sdk:
            return ["".join(e.choices[0].delta.content or "" for e in sdk.chat.completions.create(
                model="m", messages=HI, stream=True, extra_body=linger)) for _ in range(n)]

    assert all(await asyncio.to_thread(sync_streams, client.url + "/v1", 3))
    done = worker.ledger.totals.outcomes
    await wait_until(lambda: done["success"] == 6)
    assert done["cancelled"] == 0
    idxs = [r["request_idx"] for r in stack.emulator.routes]
    await wait_until(lambda: set(idxs) <= set(stack.emulator.deleted_request_idxs()))
    assert all(r["success"] and r.get("status", "Success") == "Success"
               for r in stack.emulator.deleted)
