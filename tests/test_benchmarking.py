"""The startup benchmark and its cache, backend readiness and start-up failure, against real
loopback servers and real benchmark modules loaded from ``module:function``."""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import os
import textwrap
import time
import uuid

import aiohttp
import pytest
from aiohttp import web

from vespa.backend.benchmarking import (BenchmarkCache, BenchmarkError, cache_key, load_benchmark,
                                run_benchmark)
from vespa.backend import lifecycle as lifecycle_module
from vespa.backend.lifecycle import Lifecycle, StartupError, StartupPlan
from vespa.state import Phase, WorkerState
from vespa.backend.logwatch import LogWatch

from .conftest import free_port, wait_until

BENCHMARK_MODULE = '''
import asyncio, math

CALLS = []

async def good(backend_url, session):
    CALLS.append(backend_url)
    async with session.get("health") as response:  # relative to the backend URL
        assert response.status == 200
    return 123.5

async def fails(backend_url, session):
    CALLS.append(backend_url)
    raise RuntimeError("the model fell over")

async def zero(backend_url, session):
    CALLS.append(backend_url)
    return 0

async def negative(backend_url, session):
    CALLS.append(backend_url)
    return -5.0

async def nan(backend_url, session):
    CALLS.append(backend_url)
    return math.nan

async def infinite(backend_url, session):
    CALLS.append(backend_url)
    return math.inf

async def boolean(backend_url, session):
    CALLS.append(backend_url)
    return True

async def text(backend_url, session):
    CALLS.append(backend_url)
    return "100"

async def slow(backend_url, session):
    CALLS.append(backend_url)
    await asyncio.sleep(30)
    return 1.0

async def paced(backend_url, session):
    CALLS.append(backend_url)
    await asyncio.sleep(0.35)
    return 42.0

def not_async(backend_url, session):
    CALLS.append(backend_url)
    return 5.0

good_too = good  # the same measurement under another name

async def models(backend_url, session):
    CALLS.append(backend_url)
    async with session.get("v1/models") as response:
        assert response.status == 200, response.status
    return 42.0

NOT_CALLABLE = 3
'''


class Health:
    """A real backend whose /health answers 503 until ``healthy`` is set (or a time has come)."""

    def __init__(self):
        self.healthy = False
        self.healthy_at: float | None = None
        self.checks = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.checks += 1
        if self.healthy_at is not None and time.monotonic() >= self.healthy_at:
            self.healthy = True
        return web.json_response({"ok": self.healthy}, status=200 if self.healthy else 503)


@pytest.fixture
async def backend(aiohttp_server):
    health = Health()
    app = web.Application()
    app.router.add_get("/health", health.handle)
    server = await aiohttp_server(app, host="127.0.0.1")
    health.url = str(server.make_url("")).rstrip("/")
    return health


@pytest.fixture
def bench(tmp_path, monkeypatch):
    """A fresh benchmark module on sys.path; returns its module object's name and the module."""
    name = f"bench_{uuid.uuid4().hex[:12]}"
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / f"{name}.py").write_text(textwrap.dedent(BENCHMARK_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    return name


@pytest.fixture
async def session():
    async with aiohttp.ClientSession() as http:
        yield http


def counted_health_checks(monkeypatch) -> list[bool]:
    """The outcome of every health check the lifecycle makes from now on, in order."""
    outcomes: list[bool] = []
    check = lifecycle_module.backend_healthy

    async def counted(*args, **kwargs) -> bool:
        outcomes.append(await check(*args, **kwargs))
        return outcomes[-1]

    monkeypatch.setattr(lifecycle_module, "backend_healthy", counted)
    return outcomes


def make_plan(backend_url: str, tmp_path, **changes) -> StartupPlan:
    values = dict(backend_url=backend_url, health_url=backend_url + "/health",
                  ready_timeout_initial=5.0, ready_timeout_resume=5.0, benchmark=None,
                  benchmark_timeout=5.0, benchmark_identity={"MODEL_NAME": "model-a"},
                  cache_path=str(tmp_path / "cache" / "benchmark.json"), fixed_throughput=None,
                  throughput_required=True, poll_interval=0.02, health_interval=0.02,
                  failures_to_error=3)
    values.update(changes)
    return StartupPlan(**values)


def calls(module_name: str) -> list:
    return importlib.import_module(module_name).CALLS


def cached(plan: StartupPlan) -> dict:
    try:
        with open(plan.cache_path, encoding="utf-8") as file:
            return json.load(file)
    except FileNotFoundError:
        return {}


# -- loading ---------------------------------------------------------------------------------

def test_load_benchmark_from_module_function(bench):
    function = load_benchmark(f"{bench}:good")
    assert function.__name__ == "good"


@pytest.mark.parametrize("target,message", [
    ("no_such_module_xyz:run", "cannot import benchmark module 'no_such_module_xyz'"),
    ("{bench}:missing", "has no function 'missing'"),
    ("{bench}:NOT_CALLABLE", "has no function 'NOT_CALLABLE'"),
    ("{bench}", "has no function ''"),
    ("{bench}:", "has no function ''"),
])
def test_load_benchmark_errors_say_what_is_wrong(bench, target, message):
    with pytest.raises(BenchmarkError, match=message.replace("(", r"\(")):
        load_benchmark(target.format(bench=bench))


def test_a_module_failing_as_it_imports_is_not_a_missing_function(tmp_path, monkeypatch):
    """An AttributeError raised by the module's own code is an import failure, not a name the
    module lacks."""
    name = f"broken_{uuid.uuid4().hex[:12]}"
    (tmp_path / f"{name}.py").write_text("import math\nmath.no_such_constant\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(BenchmarkError, match=f"cannot import benchmark module '{name}': "
                                             "module 'math' has no attribute 'no_such_constant'"):
        load_benchmark(f"{name}:benchmark")


# -- measuring and caching -------------------------------------------------------------------

async def test_benchmark_measured_then_cached(backend, bench, tmp_path, session):
    backend.healthy = True
    plan = make_plan(backend.url, tmp_path, benchmark=f"{bench}:good")
    throughput = await Lifecycle(plan, WorkerState(), session).throughput()
    assert throughput == 123.5
    assert calls(bench) == [backend.url]
    [(key, entry)] = cached(plan).items()
    assert entry["throughput"] == 123.5
    assert entry["benchmark"] == f"{bench}:good"
    assert entry["backend"] == {"MODEL_NAME": "model-a"}
    assert isinstance(entry["gpu"], str) and entry["gpu"]
    assert key == cache_key(f"{bench}:good", {"MODEL_NAME": "model-a"}, entry["gpu"])
    # a restart: the cache answers, the function is not called again
    again = await Lifecycle(plan, WorkerState(), session).throughput()
    assert again == 123.5
    assert len(calls(bench)) == 1


@pytest.mark.parametrize("change", [{"benchmark_identity": {"MODEL_NAME": "model-b"}},
                                    {"benchmark_identity": {"MODEL_NAME": "model-a",
                                                            "VLLM_ARGS": "--max-model-len 4096"}},
                                    {"benchmark_identity": {}},
                                    {"benchmark": "good_too"}])
async def test_changed_identity_measures_again(backend, bench, tmp_path, session, change):
    backend.healthy = True
    plan = make_plan(backend.url, tmp_path, benchmark=f"{bench}:good")
    assert await Lifecycle(plan, WorkerState(), session).throughput() == 123.5
    if "benchmark" in change:
        change = {"benchmark": f"{bench}:{change['benchmark']}"}
    changed = make_plan(backend.url, tmp_path, **{"benchmark": f"{bench}:good", **change})
    assert await Lifecycle(changed, WorkerState(), session).throughput() == 123.5
    assert len(calls(bench)) == 2  # measured again
    assert len(cached(changed)) == 2  # both measurements kept, each under its own key
    assert await Lifecycle(plan, WorkerState(), session).throughput() == 123.5
    assert len(calls(bench)) == 2  # the first one is still a hit


@pytest.mark.parametrize("function,message", [
    ("fails", "failed: RuntimeError('the model fell over')"),
    ("zero", "returned 0, not a positive throughput"),
    ("negative", "returned -5.0, not a positive throughput"),
    ("nan", "returned nan, not a positive throughput"),
    ("infinite", "returned inf, not a positive throughput"),
    ("boolean", "returned True, not a positive throughput"),
    ("text", "returned '100', not a positive throughput"),
    ("not_async", "failed"),
])
async def test_failed_benchmark_is_an_error_and_nothing_is_cached(
        backend, bench, tmp_path, session, function, message):
    backend.healthy = True
    plan = make_plan(backend.url, tmp_path, benchmark=f"{bench}:{function}")
    with pytest.raises(StartupError) as info:
        await Lifecycle(plan, WorkerState(), session).throughput()
    assert f"benchmark {bench}:{function}" in str(info.value)
    assert message in str(info.value)
    assert calls(bench) == [backend.url]
    assert cached(plan) == {}
    # the next start measures again rather than using any fallback number
    with pytest.raises(StartupError):
        await Lifecycle(plan, WorkerState(), session).throughput()
    assert len(calls(bench)) == 2


async def test_benchmark_timeout_is_an_error(backend, bench, tmp_path, session):
    backend.healthy = True
    plan = make_plan(backend.url, tmp_path, benchmark=f"{bench}:slow", benchmark_timeout=0.1)
    started = time.monotonic()
    with pytest.raises(StartupError, match=r"took longer than 0\.1s \(VESPA_BENCHMARK_TIMEOUT\)"):
        await Lifecycle(plan, WorkerState(), session).throughput()
    assert time.monotonic() - started < 2.0
    assert cached(plan) == {}


async def test_a_running_benchmark_says_so_every_few_seconds(backend, bench, tmp_path, session,
                                                             caplog):
    """A first vLLM benchmark takes about 40 s: a line with the time so far, not silence."""
    backend.healthy = True
    plan = make_plan(backend.url, tmp_path, benchmark=f"{bench}:paced")
    lifecycle = Lifecycle(plan, WorkerState(), session)
    lifecycle.progress_interval = 0.1
    with caplog.at_level("INFO", logger="vespa.lifecycle"):
        assert await lifecycle.throughput() == 42.0
    ticks = [r.getMessage() for r in caplog.records
             if r.getMessage().startswith(f"benchmark {bench}:paced running: ")]
    assert len(ticks) >= 2, caplog.text


async def test_run_benchmark_directly(backend, bench):
    backend.healthy = True
    assert await run_benchmark(f"{bench}:good", backend.url + "/", 5.0) == 123.5
    with pytest.raises(BenchmarkError, match="not a positive throughput"):
        await run_benchmark(f"{bench}:zero", backend.url, 5.0)


async def test_the_benchmark_sends_the_backends_own_key(aiohttp_server, bench, tmp_path,
                                                        session):
    """A backend that asks for a key on /v1 (vLLM with VLLM_API_KEY): the benchmark's session
    carries VESPA_BACKEND_API_KEY; its health check needs none."""
    seen = []

    async def v1_models(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        if request.headers.get("Authorization") != "Bearer bk-secret":
            return web.json_response({"error": "Unauthorized"}, status=401)
        return web.json_response({"data": []})

    app = web.Application()
    app.router.add_get("/v1/models", v1_models)
    server = await aiohttp_server(app, host="127.0.0.1")
    url = str(server.make_url("")).rstrip("/")
    with pytest.raises(BenchmarkError, match="401"):
        await run_benchmark(f"{bench}:models", url, 5.0)
    plan = make_plan(url, tmp_path, benchmark=f"{bench}:models", backend_api_key="bk-secret")
    assert await Lifecycle(plan, WorkerState(), session).throughput() == 42.0
    assert seen == [None, "Bearer bk-secret"]


async def test_unwritable_cache_warns_and_goes_on(backend, bench, tmp_path, session, caplog):
    backend.healthy = True
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("a file where the cache directory should be")
    plan = make_plan(backend.url, tmp_path, benchmark=f"{bench}:good",
                     cache_path=str(blocker / "benchmark.json"))
    with caplog.at_level("WARNING", logger="vespa.benchmark"):
        assert await Lifecycle(plan, WorkerState(), session).throughput() == 123.5
    assert any("could not write the benchmark cache" in r.getMessage() for r in caplog.records)
    assert blocker.read_text().startswith("a file")
    # and the whole start-up goes on to ready
    state = WorkerState()
    task = asyncio.create_task(Lifecycle(plan, state, session).run())
    try:
        await wait_until(lambda: state.phase is Phase.READY)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert state.max_perf == 123.5 and state.error_msg == ""


async def test_corrupt_cache_is_a_miss_and_is_rewritten(backend, bench, tmp_path, session):
    backend.healthy = True
    plan = make_plan(backend.url, tmp_path, benchmark=f"{bench}:good")
    os.makedirs(os.path.dirname(plan.cache_path))
    with open(plan.cache_path, "w") as file:
        file.write("{not json")
    assert await Lifecycle(plan, WorkerState(), session).throughput() == 123.5
    assert len(calls(bench)) == 1
    assert [e["throughput"] for e in cached(plan).values()] == [123.5]


@pytest.mark.parametrize("entry", [{"throughput": 0}, {"throughput": -3},
                                   {"throughput": "9"}, {"throughput": None}, "12", 12])
async def test_unusable_cache_entries_are_ignored(tmp_path, entry):
    cache = BenchmarkCache(str(tmp_path / "benchmark.json"))
    (tmp_path / "benchmark.json").write_text(json.dumps({"k": entry}))
    assert await cache.get("k") is None
    assert cache.exists()


async def test_cache_round_trip(tmp_path):
    cache = BenchmarkCache(str(tmp_path / "deep" / "dir" / "benchmark.json"))
    assert not cache.exists() and await cache.get("k") is None
    await cache.put("k", 42.0, {"benchmark": "m:f"})
    await cache.put("j", 7.0, {"benchmark": "m:g"})
    assert cache.exists()
    assert await cache.get("k") == 42.0 and await cache.get("j") == 7.0
    assert not [p for p in os.listdir(tmp_path / "deep" / "dir") if p.endswith(".tmp")]


def test_cache_key_depends_on_every_part():
    base = cache_key("m:f", {"MODEL_NAME": "a"}, "RTX 4090")
    assert base == cache_key("m:f", {"MODEL_NAME": "a"}, "RTX 4090")
    assert len({base, cache_key("m:g", {"MODEL_NAME": "a"}, "RTX 4090"),
                cache_key("m:f", {"MODEL_NAME": "b"}, "RTX 4090"),
                cache_key("m:f", {"MODEL_NAME": "a"}, "H100"),
                cache_key("m:f", {}, "RTX 4090")}) == 5


async def test_fixed_throughput_skips_the_benchmark(bench, tmp_path, session):
    plan = make_plan("http://127.0.0.1:1", tmp_path, benchmark=f"{bench}:good",
                     fixed_throughput=77.0)
    assert await Lifecycle(plan, WorkerState(), session).throughput() == 77.0
    assert calls(bench) == []


async def test_no_throughput_configured(tmp_path, session):
    plan = make_plan("http://127.0.0.1:1", tmp_path)
    with pytest.raises(StartupError, match="VESPA_BENCHMARK"):
        await Lifecycle(plan, WorkerState(), session).throughput()
    optional = make_plan("http://127.0.0.1:1", tmp_path, throughput_required=False)
    assert await Lifecycle(optional, WorkerState(), session).throughput() is None


# -- readiness and start-up failure ------------------------------------------------------------

async def test_wait_for_backend_until_healthy(backend, tmp_path, session):
    backend.healthy_at = time.monotonic() + 0.3
    plan = make_plan(backend.url, tmp_path)
    started = time.monotonic()
    await Lifecycle(plan, WorkerState(), session).wait_for_backend()
    assert time.monotonic() - started >= 0.3
    assert backend.healthy and backend.checks >= 3


async def test_wait_for_backend_that_is_not_listening_yet(tmp_path, session, monkeypatch):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    plan = make_plan(url, tmp_path)
    checks = counted_health_checks(monkeypatch)
    waiting = asyncio.create_task(Lifecycle(plan, WorkerState(), session).wait_for_backend())
    await wait_until(lambda: len(checks) >= 2)  # refused twice, and it goes on waiting
    assert not any(checks) and not waiting.done()
    app = web.Application()
    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app.router.add_get("/health", health)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        await asyncio.wait_for(waiting, 2.0)
    finally:
        await runner.cleanup()


async def test_backend_never_healthy_is_a_startup_error(backend, tmp_path, session):
    plan = make_plan(backend.url, tmp_path, ready_timeout_initial=0.2)
    state = WorkerState()
    started = time.monotonic()
    await asyncio.wait_for(Lifecycle(plan, state, session).run(), 3.0)  # returns: errored
    assert time.monotonic() - started < 2.0
    assert state.phase is Phase.ERRORED
    assert "not healthy" in state.error_msg and "/health" in state.error_msg
    assert "0.2s" in state.error_msg
    assert not state.ready and state.loadtime is None


async def test_errored_while_waiting_ends_start_up(backend, tmp_path, session):
    """Something else (the backend process exiting) fails the worker while it waits."""
    plan = make_plan(backend.url, tmp_path, ready_timeout_initial=30.0)
    state, changes = WorkerState(), []
    task = asyncio.create_task(Lifecycle(plan, state, session,
                                         on_change=lambda: changes.append(state.phase)).run())
    await wait_until(lambda: backend.checks >= 2)  # it waits for the backend
    assert not task.done()
    state.fail("backend exited with code 1")
    await asyncio.wait_for(task, 2.0)
    assert state.phase is Phase.ERRORED and state.error_msg == "backend exited with code 1"
    assert changes == [Phase.ERRORED]  # the reporter is told at once


async def test_resume_timeout_used_when_a_cache_exists(backend, tmp_path, session):
    plan = make_plan(backend.url, tmp_path, ready_timeout_initial=60.0,
                     ready_timeout_resume=0.2)
    os.makedirs(os.path.dirname(plan.cache_path))
    with open(plan.cache_path, "w") as file:
        file.write("{}")
    with pytest.raises(StartupError, match="after 0.2s"):
        await asyncio.wait_for(Lifecycle(plan, WorkerState(), session).wait_for_backend(), 3.0)


async def test_backend_log_error_line_fails_start_up(backend, tmp_path, session):
    log_file = tmp_path / "backend.log"
    log_file.write_text("loading weights\nCUDA out of memory: tried to allocate 2 GiB\n")
    plan = make_plan(backend.url, tmp_path,
                     log_watch=LogWatch(str(log_file), r"Application startup complete",
                                        r"out of memory"))
    state = WorkerState()
    await asyncio.wait_for(Lifecycle(plan, state, session).run(), 3.0)
    assert state.phase is Phase.ERRORED
    assert "backend log reports an error" in state.error_msg
    assert "CUDA out of memory" in state.error_msg


async def test_failed_benchmark_fails_start_up(backend, bench, tmp_path, session):
    backend.healthy = True
    plan = make_plan(backend.url, tmp_path, benchmark=f"{bench}:zero")
    state = WorkerState()
    await asyncio.wait_for(Lifecycle(plan, state, session).run(), 3.0)
    assert state.phase is Phase.ERRORED
    assert "not a positive throughput" in state.error_msg
    assert state.max_perf == 0


async def test_start_up_to_ready_then_health_watch(backend, bench, tmp_path, session, caplog):
    caplog.set_level(logging.INFO, logger="vespa.lifecycle")
    backend.healthy_at = time.monotonic() + 0.1
    plan = make_plan(backend.url, tmp_path, benchmark=f"{bench}:good")
    state, seen, ready = WorkerState(), [], []
    key_ready = asyncio.Event()
    lifecycle = Lifecycle(plan, state, session, key_ready=key_ready, on_throughput=seen.append,
                          on_change=lambda: ready.append(state.phase))
    task = asyncio.create_task(lifecycle.run())
    try:
        await wait_until(lambda: seen == [123.5])
        await wait_until(lambda: "waiting for the autoscaler's public key" in caplog.text)
        assert not state.ready and ready == []  # no public key yet: not ready
        key_ready.set()
        await wait_until(lambda: state.ready)
        assert ready == [Phase.READY] and state.max_perf == 123.5  # the reporter is woken
        assert state.loadtime is not None and state.loadtime > 0
        backend.healthy, backend.healthy_at = False, None
        await wait_until(lambda: state.error_msg != "")
        assert "failed 3 times in a row" in state.error_msg and not state.ready
        backend.healthy = True
        await wait_until(lambda: state.error_msg == "")
        assert state.ready
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_ready_pattern_is_required_besides_the_health_check(backend, tmp_path, session):
    """Some servers answer /health before their model is loaded: with a ready pattern set, the
    worker also waits for the backend to log it."""
    backend.healthy = True
    log_file = tmp_path / "backend.log"
    log_file.write_text("loading weights\n")
    watch = LogWatch(str(log_file), r"model loaded", None)
    polls = []
    poll = watch.poll

    async def counted_poll() -> None:
        await poll()
        polls.append(watch.ready_line)

    watch.poll = counted_poll
    plan = make_plan(backend.url, tmp_path, fixed_throughput=10.0, log_watch=watch)
    state = WorkerState()
    task = asyncio.create_task(Lifecycle(plan, state, session).run())
    # it read the log (no ready line), decided, and looked again: a worker that did not wait for
    # the line would be ready by then, with the backend healthy
    await wait_until(lambda: len(polls) >= 2 or state.ready)
    assert polls[:2] == [None, None]
    assert not state.ready
    with open(log_file, "a") as file:
        file.write("model loaded in 3.2s\n")
    await wait_until(lambda: state.ready, timeout=3)
    assert plan.log_watch.file is None  # closed once start-up no longer needs it
    task.cancel()
