"""A whole fleet (backend, emulator, worker) in one event loop, either the test's own or a
background thread's (``BackgroundLoop``), so synchronous hypothesis tests can drive it."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import threading

import aiohttp
from aiohttp.test_utils import TestServer

from vespa.worker import Worker
from vespa.config import load_settings
from vespa.devtools.autoscaler import AutoscalerEmulator

from ..backend import make_backend
from ..conftest import free_port, wait_until
from ..serving import WorkerTestServer
from ..fleet import autoscaler_key
from .harness import MASTER_TOKEN, assert_serving
from .rawhttp import RecordingBackend


class BackgroundLoop:
    """An event loop in a daemon thread; ``run(coro)`` runs a coroutine there and waits."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fleet-loop",
                                       daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class Stack:
    """A backend (the echo test backend or a ``RecordingBackend``), an optional emulator and a
    worker (signed when there is an emulator), all on loopback in one event loop."""

    def __init__(self):
        self.backend = None
        self.recording: RecordingBackend | None = None
        self.emulator: AutoscalerEmulator | None = None
        self.worker = None
        self.server = None
        self.session: aiohttp.ClientSession | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, *, signed: bool, recording: bool, **env: str) -> "Stack":
        if recording:
            self.recording = await RecordingBackend().start()
            backend_url = self.recording.url
        else:
            app, self.backend_log = make_backend()
            self.backend = TestServer(app, host="127.0.0.1")
            await self.backend.start_server()
            backend_url = str(self.backend.make_url("")).rstrip("/")
        self.port = free_port()
        self.cache_dir = tempfile.mkdtemp(prefix="vespa-stack-")  # its own replay mark
        values = {"VESPA_BACKEND_URL": backend_url, "VESPA_HEALTHCHECK_INTERVAL": "0.2",
                  "VESPA_CACHE_DIR": self.cache_dir}
        if signed:
            self.emulator = AutoscalerEmulator(scheme="full", private_key=autoscaler_key())
            await self.emulator.start()
            values.update(REPORT_ADDR=self.emulator.url, CONTAINER_ID="7",
                          VESPA_WORKER_HTTP_PORT="0",  # in-process: no session port by 3000
                          MASTER_TOKEN=MASTER_TOKEN, VESPA_USE_SSL="false",
                          VESPA_PUBLIC_URL=self.url,
                          VESPA_MAX_THROUGHPUT="1000", VESPA_REPORT_INTERVAL="0.05")
        else:
            values["VESPA_UNSECURED"] = "true"
        values.update(env)
        settings = load_settings(values)
        self.worker = Worker(settings)
        self.server = WorkerTestServer(self.worker, host="127.0.0.1", port=self.port)
        await self.server.start_server()
        self.session = aiohttp.ClientSession()
        await wait_until(lambda: self.worker.state.ready, timeout=20)
        return self

    async def close(self) -> None:
        await self.session.close()
        await self.server.close()
        if self.emulator is not None:
            await self.emulator.stop()
        if self.backend is not None:
            await self.backend.close()
        if self.recording is not None:
            await self.recording.stop()
        shutil.rmtree(self.cache_dir, ignore_errors=True)

    async def request(self, method: str, path: str, body: bytes | None = None,
                      headers: dict | None = None) -> tuple[int, bytes]:
        async with self.session.request(method, self.url + path, data=body, headers=headers,
                                        timeout=aiohttp.ClientTimeout(total=20)) as response:
            return response.status, await response.read()

    async def settle(self, timeout: float = 20) -> None:
        ledger = self.worker.ledger
        await wait_until(lambda: not ledger.in_flight, timeout=timeout)
        reporter = self.worker.reporter  # settled: no record in the outbox or on its way
        await wait_until(lambda: reporter.settled if reporter else not ledger.outbox,
                         timeout=timeout)
        if reporter is not None:
            await reporter.report_status(force=True)

    async def check_serving(self, must: set[int] | None = None) -> None:
        signer = self.emulator.signer if self.emulator is not None else None
        path = "/echo" if self.recording is None else "/after"
        await assert_serving(self.session, self.url, signer, must, path=path)
