"""A fleet on loopback for signed end-to-end tests: the autoscaler emulator, a backend, a worker."""

from __future__ import annotations

import collections
import functools

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives.asymmetric import rsa

from vespa.worker import Worker
from vespa.config import load_settings
from vespa.corridor.ledger import LoadWindow
from vespa.devtools.autoscaler import AutoscalerEmulator

from .conftest import free_port, wait_until
from .serving import WorkerTestServer


@functools.lru_cache(maxsize=1)
def autoscaler_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="session")
def private_key() -> rsa.RSAPrivateKey:
    return autoscaler_key()


class WatchedEmulator(AutoscalerEmulator):
    """The emulator, also telling what it has received and not answered yet: ``arrived`` counts
    the requests per path as soon as their body is in (before any ``delay``), ``answering`` is
    how many it is still answering. Events for tests: a POST is on its way (arrived, not yet
    answered); every POST that reached it has its answer (nothing left to record late)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.arrived: collections.Counter[str] = collections.Counter()
        self.answering = 0

    @web.middleware
    async def faults(self, request: web.Request, handler):
        self.answering += 1
        try:
            await request.read()  # kept: the handler reads it again
            self.arrived[request.path] += 1
            return await AutoscalerEmulator.faults(self, request, handler)
        finally:
            self.answering -= 1


@pytest.fixture
async def make_emulator(private_key):
    """``await make_emulator(**options)``: a started (watched) emulator, stopped at the end."""
    emulators = []

    async def factory(**options) -> WatchedEmulator:
        emulator = WatchedEmulator(private_key=private_key, **options)
        await emulator.start()
        emulators.append(emulator)
        return emulator

    yield factory
    for emulator in emulators:
        await emulator.stop()


@pytest.fixture
async def emulator(make_emulator):
    return await make_emulator()


class Fleet:
    """One emulator, one backend, one worker on loopback."""

    def __init__(self, emulator: AutoscalerEmulator, backend, worker: Worker, server: TestServer,
                 session: aiohttp.ClientSession):
        self.emulator, self.backend, self.worker = emulator, backend, worker
        self.server, self.session = server, session
        self.url = f"http://127.0.0.1:{server.port}"

    async def route(self, cost: float = 10.0) -> dict:
        async with self.session.post(f"{self.emulator.url}/route/",
                                     json={"endpoint": self.emulator.endpoint, "cost": cost,
                                           "request_idx": 0}) as response:
            assert response.status == 200, await response.text()
            return await response.json()

    @staticmethod
    def auth_data(route: dict) -> dict:
        return {k: route[k] for k in ("cost", "endpoint", "reqnum", "request_idx", "signature",
                                      "url")}

    async def post(self, path: str, auth_data: dict, payload: dict) -> aiohttp.ClientResponse:
        return await self.session.post(f"{self.url}{path}",
                                       json={"auth_data": auth_data, "payload": payload})


@pytest.fixture
async def fleet(backend, tmp_path):
    fleets = []

    async def start(scheme: str = "full", pubkey_down: bool = False, **env: str) -> Fleet:
        emulator = AutoscalerEmulator(scheme=scheme, private_key=autoscaler_key())
        emulator.fail_pubkey = pubkey_down
        await emulator.start()
        port = free_port()
        # a launched backend (VESPA_BACKEND) has its own URL; otherwise the test backend
        fronted = {} if {"VESPA_BACKEND", "VESPA_BACKEND_COMMAND"} & set(env) else {
            "VESPA_BACKEND_URL": str(backend.make_url("")).rstrip("/")}
        settings = load_settings({
            **fronted,
            "REPORT_ADDR": emulator.url, "CONTAINER_ID": "7", "MASTER_TOKEN": "mtoken-secret",
            "VESPA_WORKER_HTTP_PORT": "0",  # in-process: no session port next to 3000
            "VESPA_USE_SSL": "false", "VESPA_CACHE_DIR": str(tmp_path / f"cache-{port}"),
            "VESPA_PUBLIC_URL": f"http://127.0.0.1:{port}", "VESPA_MAX_THROUGHPUT": "1000",
            "VESPA_REPORT_INTERVAL": "0.05", "VESPA_HEALTHCHECK_INTERVAL": "0.2", **env})
        worker = Worker(settings)
        server = WorkerTestServer(worker, host="127.0.0.1", port=port)
        await server.start_server()
        fleet = Fleet(emulator, backend, worker, server, aiohttp.ClientSession())
        fleets.append(fleet)
        return fleet

    yield start
    for fleet in fleets:
        await fleet.session.close()
        await fleet.server.close()
        await fleet.emulator.stop()


async def all_reported(fleet: Fleet, timeout: float = 10) -> None:
    """Until the autoscaler has all the worker knows: nothing in flight, every finished record
    delivered (none waits, none on its way) and every load count in a report that arrived. What
    the emulator holds then is final: nothing more is on its way."""
    worker = fleet.worker
    await wait_until(lambda: not worker.ledger.in_flight and worker.reporter.settled
                     and worker.ledger.window == LoadWindow(), timeout,
                     what="everything the worker knows reported")


async def ready(fleet: Fleet) -> None:
    await wait_until(lambda: fleet.worker.state.ready, timeout=10)
    await wait_until(lambda: any(r["max_perf"] > 0 for r in fleet.emulator.reports), timeout=10)
