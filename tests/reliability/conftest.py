"""Reliability suite fixtures: signed in-process fleets in front of any backend, worker and
backend processes, the ``soak`` marker, a hard time limit per test, and RESULTS.md at the end."""

from __future__ import annotations

import faulthandler
import os
import time

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from vespa.worker import Worker
from vespa.config import load_settings
from vespa.devtools.autoscaler import AutoscalerEmulator

from ..conftest import free_port
from ..serving import WorkerTestServer
from ..fleet import Fleet, WatchedEmulator, autoscaler_key
from .harness import MASTER_TOKEN, BackendProcess, WorkerProcess
from .stack import BackgroundLoop, Stack
from .results import RESULTS_PATH, RUN

SOAK_ENV = "VESPA_SOAK_SECONDS"
# A test that runs longer than this (seconds) is a hang: the run is stopped with a traceback.
DEFAULT_TIME_LIMIT = 120.0


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"soak: long soak test, runs only when {SOAK_ENV} is set")
    config.addinivalue_line("markers", "time_limit(seconds): hard per-test limit (default "
                                       f"{DEFAULT_TIME_LIMIT:g} s)")


@pytest.hookimpl(tryfirst=True)  # before -k/-m deselection: remember the whole suite
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    RUN.collected = {item.nodeid for item in items if _ours(item.nodeid)}
    for item in items:
        reason = KNOWN_BUGS.get(getattr(item, "originalname", None) or item.name)
        if reason:
            item.add_marker(pytest.mark.xfail(reason=f"known bug: {reason}", strict=False))
    if os.environ.get(SOAK_ENV):
        return
    skip = pytest.mark.skip(reason=f"soak test: set {SOAK_ENV}=1800 to run it")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def time_limit(request: pytest.FixtureRequest):
    """Every test stops by itself: past its limit the whole run ends with every thread's stack."""
    marker = request.node.get_closest_marker("time_limit")
    limit = marker.args[0] if marker else DEFAULT_TIME_LIMIT
    faulthandler.dump_traceback_later(limit, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture
def measure(request: pytest.FixtureRequest):
    """``measure(inputs=120, ...)``: numbers this test contributes to RESULTS.md."""
    case = RUN.case(request.node.nodeid)

    def add(**numbers) -> None:
        for name, value in numbers.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and name in case.numbers and name in ("inputs", "5xx"):
                case.numbers[name] += value
            else:
                case.numbers[name] = value
    return add


# -- results -------------------------------------------------------------------------------------

def _ours(nodeid: str) -> bool:
    return "reliability/" in nodeid


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if not _ours(report.nodeid):
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed") \
            or (report.when == "teardown" and report.outcome == "failed"):
        outcome = "error" if report.when != "call" and report.outcome == "failed" \
            else report.outcome
        RUN.outcome(report.nodeid, outcome, report.duration)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Rewrite RESULTS.md after a run of the whole suite (VESPA_RELIABILITY_RESULTS=always: after
    any run of reliability tests), so that running one test does not clobber the table."""
    ran = {nodeid for nodeid, case in RUN.cases.items() if case.outcome != "not run"}
    if not ran:
        return
    modules = {path.name for path in RESULTS_PATH.parent.glob("test_*.py")}
    collected = {nodeid.split("::", 1)[0].rsplit("/", 1)[-1] for nodeid in RUN.collected}
    whole = modules <= collected and RUN.collected <= ran
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if whole or os.environ.get("VESPA_RELIABILITY_RESULTS") == "always":
        RESULTS_PATH.write_text(RUN.render())
        message = f"reliability results written to {RESULTS_PATH}"
    else:
        message = (f"reliability: {len(ran)} of the suite's tests ran, {RESULTS_PATH.name} left "
                   f"as it was (VESPA_RELIABILITY_RESULTS=always writes it anyway)")
    if reporter is not None:
        reporter.ensure_newline()
        reporter.write_line(message)


# -- fleets --------------------------------------------------------------------------------------

@pytest.fixture
async def signed(tmp_path):
    """``await signed(backend_url, **env)``: emulator + signed in-process worker in front of any
    backend; returns a ``Fleet`` (``.emulator``, ``.worker``, ``.url``, ``.session``)."""
    fleets: list[Fleet] = []

    async def start(backend_url: str, *, emulator: AutoscalerEmulator | None = None,
                    start_emulator: bool = True, **env: str) -> Fleet:
        if emulator is None:
            emulator = WatchedEmulator(scheme="full", private_key=autoscaler_key())
        if not start_emulator and not emulator.port:
            emulator.port = free_port()  # nothing listens there yet
        if start_emulator:
            await emulator.start()
        port = free_port()
        settings = load_settings({
            "VESPA_BACKEND_URL": backend_url, "REPORT_ADDR": emulator.url, "CONTAINER_ID": "7",
            "VESPA_WORKER_HTTP_PORT": "0",  # in-process: no session port next to 3000
            "MASTER_TOKEN": MASTER_TOKEN, "VESPA_USE_SSL": "false",
            "VESPA_PUBLIC_URL": f"http://127.0.0.1:{port}",
            "VESPA_MAX_THROUGHPUT": "1000", "VESPA_REPORT_INTERVAL": "0.05",
            "VESPA_HEALTHCHECK_INTERVAL": "0.2",
            "VESPA_CACHE_DIR": str(tmp_path / f"cache-{port}"), **env})
        worker = Worker(settings)
        server = WorkerTestServer(worker, host="127.0.0.1", port=port)
        await server.start_server()
        fleet = Fleet(emulator, None, worker, server, aiohttp.ClientSession())
        fleets.append(fleet)
        return fleet

    yield start
    for fleet in fleets:
        await fleet.session.close()
        await fleet.server.close()
        await fleet.emulator.stop()


@pytest.fixture
async def emulator():
    emulator = WatchedEmulator(scheme="full", private_key=autoscaler_key())
    await emulator.start()
    yield emulator
    await emulator.stop()


@pytest.fixture
def worker_process(tmp_path):
    """``worker_process(backend_url, emulator_or_None, port=None, **env)``: ``python -m vespa``
    (on ``port``, e.g. a stopped worker's, or a free one), killed at the end if still running;
    every worker of a test shares one cache dir."""
    procs: list[WorkerProcess] = []

    def start(backend_url: str, emulator: AutoscalerEmulator | None, port: int | None = None,
              **env: str) -> WorkerProcess:
        proc = WorkerProcess(tmp_path, backend_url, emulator, port, **env)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.kill()


@pytest.fixture
def backend_process(tmp_path):
    procs: list[BackendProcess] = []

    def start(port: int | None = None) -> BackendProcess:
        proc = BackendProcess(tmp_path, port)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.kill()


@pytest.fixture
def stacks():
    """``stacks(signed=True, recording=False, **env)``: a ``Stack`` on a background event loop,
    for synchronous hypothesis tests; ``stack.sync(coro)`` runs a coroutine on that loop."""
    loop = BackgroundLoop()
    made: list[Stack] = []

    def start(signed: bool = True, recording: bool = False, **env: str) -> Stack:
        stack = loop.run(Stack().start(signed=signed, recording=recording, **env))
        stack.sync = loop.run
        made.append(stack)
        return stack

    yield start
    for stack in made:
        loop.run(stack.close())
    loop.close()


@pytest.fixture
async def astack():
    """``await astack(signed=..., recording=..., **env)``: a ``Stack`` in the test's own loop."""
    made: list[Stack] = []

    async def start(signed: bool = True, recording: bool = False, **env: str) -> Stack:
        stack = await Stack().start(signed=signed, recording=recording, **env)
        made.append(stack)
        return stack

    yield start
    for stack in made:
        await stack.close()


@pytest.fixture
async def session():
    async with aiohttp.ClientSession() as client_session:
        yield client_session


def elapsed_since(started: float) -> float:
    return time.monotonic() - started


# Known bugs these tests found, not fixed yet (see the issue notes). They stay in the suite and
# run every time; an xfail that starts passing shows up as XPASS in the summary.
# Example: "test_name": "what is wrong, in one line".
KNOWN_BUGS: dict[str, str] = {}
