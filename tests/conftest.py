"""Shared fixtures: a real loopback backend and a Vespa worker in front of it."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import inspect
import os
import socket
import sys
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from vespa.worker import Worker
from vespa.config import load_settings

from .backend import make_backend
from .serving import WorkerTestServer

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
async def backend():
    app, log = make_backend()
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    server.log = log
    yield server
    await server.close()


@pytest.fixture
async def make_worker(backend):
    """Build a worker in front of ``backend`` from VESPA_* settings; returns (client, worker)."""
    clients = []

    async def factory(backend_url: str | None = None, **env: str):
        values = {"VESPA_UNSECURED": "true",
                  "VESPA_BACKEND_URL": backend_url or str(backend.make_url("")).rstrip("/"),
                  **env}
        worker = Worker(load_settings(values))
        client = TestClient(WorkerTestServer(worker, host="127.0.0.1"))
        await client.start_server()
        clients.append(client)
        return client, worker

    yield factory
    for client in clients:
        await client.close()


async def wait_until(predicate, timeout: float = 5.0, interval: float = 0.01,
                     what: str | None = None) -> None:
    """Wait for an event the test cannot await directly: until ``predicate()`` is true (it may
    return an awaitable, e.g. an HTTP call's outcome), looked at every ``interval`` seconds.
    Fails after ``timeout`` seconds, saying what it waited for (``what``, else the predicate's
    source). The timeout only bounds a hang: it is never what the test measures."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        met = predicate()
        if inspect.isawaitable(met):
            met = await met
        if met:
            return
        if loop.time() > deadline:
            raise AssertionError(f"not within {timeout:g}s: {what or describe(predicate)}")
        await asyncio.sleep(interval)


def describe(predicate) -> str:
    try:
        return " ".join(inspect.getsource(predicate).split())
    except (OSError, TypeError):
        return repr(predicate)


def worker_env(**extra: str) -> dict[str, str]:
    """An environment for a worker subprocess: no inherited VESPA_* settings, no .env surprises;
    VESPA_PURE_PYTHON is kept, so a plain-Python run of the suite runs plain workers too."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("VESPA_") or k == "VESPA_PURE_PYTHON"}
    env.update(extra)
    env["PYTHONPATH"] = str(REPO)
    return env


PYTHON = sys.executable


@pytest.fixture(autouse=True, scope="session")
def no_replay_mark_in_the_checkout():
    """A signed test worker keeps its replay mark in its own cache dir: one left in the
    checkout's .cache would make later tests' reqnums (the emulator starts at 1) too old."""
    mark = REPO / ".cache" / "replay-mark"
    existed = mark.exists()
    yield
    assert existed or not mark.exists(), (
        f"a test wrote {mark}: give its signed worker VESPA_CACHE_DIR under tmp_path")


@contextlib.contextmanager
def left_to_the_gc():
    """Objects of Vespa's own types that what runs inside the block left in reference cycles
    (only the cyclic GC can free them), counted by type name once the block ends:
    ``with left_to_the_gc() as left: ...`` then ``assert not left``."""
    left: collections.Counter[str] = collections.Counter()
    gc.collect()
    gc.disable()
    try:
        yield left
        gc.set_debug(gc.DEBUG_SAVEALL)  # keep what a collection finds unreachable, to look at
        gc.collect()
        left.update(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.garbage
                    if type(o).__module__.startswith("vespa"))
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()

