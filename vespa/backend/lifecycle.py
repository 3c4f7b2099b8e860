"""The worker's life: wait for the backend, benchmark it (cached), become ready, watch its health.

``Lifecycle.run`` is the background task that moves the worker's ``state.WorkerState`` along. A start-up failure leaves the worker alive in the errored phase, so the
reporter keeps telling the autoscaler why (it must not wait in silence).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, TypeVar

import aiohttp

from ..state import Phase, WorkerState
from .benchmarking import BenchmarkCache, BenchmarkError, cache_key, gpu_name, run_benchmark
from .logwatch import LogWatch

log = logging.getLogger("vespa.lifecycle")
T = TypeVar("T")


class StartupError(RuntimeError):
    """The worker cannot become ready; the message is what the autoscaler is told."""


async def backend_healthy(session: aiohttp.ClientSession, url: str, timeout: float) -> bool:
    """True when ``url`` answers 200 within ``timeout`` seconds."""
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as response:
            await response.read()
            return response.status == 200
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
        return False


async def with_progress(work: Awaitable[T], what: str, every: float) -> T:
    """``await work``, logging "<what>: Ns" every ``every`` seconds until it is done."""
    task = asyncio.ensure_future(work)
    started = time.monotonic()
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=every)
            if done:
                return task.result()
            log.info("%s: %.0fs", what, time.monotonic() - started)
    finally:
        if not task.done():  # cancelled while waiting: the work goes too
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


@dataclass
class StartupPlan:
    """What start-up needs to know, taken from the settings."""

    backend_url: str
    health_url: str
    ready_timeout_initial: float
    ready_timeout_resume: float
    benchmark: str | None
    benchmark_timeout: float
    benchmark_identity: dict
    cache_path: str
    fixed_throughput: float | None
    throughput_required: bool
    log_watch: LogWatch | None = None
    poll_interval: float = 1.0
    health_interval: float = 10.0
    failures_to_error: int = 3
    backend_api_key: str | None = None  # the benchmark sends it (vLLM's health needs none)


class Lifecycle:
    def __init__(self, plan: StartupPlan, state: WorkerState, session: aiohttp.ClientSession, *,
                 key_ready: asyncio.Event | None = None,
                 on_throughput: Callable[[float], None] = lambda _: None,
                 on_change: Callable[[], None] = lambda: None):
        self.plan = plan
        self.state = state
        self.session = session
        self.key_ready = key_ready
        self.on_throughput = on_throughput
        self.on_change = on_change
        self.cache = BenchmarkCache(plan.cache_path)
        self.progress_interval = 5.0  # a line this often while the benchmark runs

    async def run(self) -> None:
        try:
            await self.start()
        except StartupError as exc:
            self.state.fail(str(exc))
            self.on_change()  # tell the autoscaler at once
            log.error("start-up failed: %s", exc)
            return
        if self.state.draining:
            return
        self.state.become_ready(time.monotonic())
        log.info("ready after %.1fs (max_perf %.3g)", self.state.ready_at - self.state.started_at,
                 self.state.max_perf)
        self.on_change()
        await self.watch_health()

    async def start(self) -> None:
        await self.wait_for_backend()
        if self.state.draining:  # shutting down before the backend came up: nothing to measure
            return
        self.state.phase = Phase.BENCHMARKING
        throughput = await self.throughput()
        if throughput is not None:
            self.state.max_perf = throughput
            self.on_throughput(throughput)
        if self.key_ready is not None and not self.key_ready.is_set():
            log.info("waiting for the autoscaler's public key")
            await self.key_ready.wait()

    async def wait_for_backend(self) -> None:
        """Until the backend answers its health check (and, with a ready pattern, logged it)."""
        plan = self.plan
        timeout = plan.ready_timeout_resume if self.cache.exists() else plan.ready_timeout_initial
        deadline = time.monotonic() + timeout
        watch = plan.log_watch
        try:
            while not self.state.draining:
                if self.state.phase is Phase.ERRORED:  # e.g. the backend process exited
                    raise StartupError(self.state.error_msg)
                if watch is not None:
                    await watch.poll()
                    if watch.error_line is not None:
                        raise StartupError(f"backend log reports an error: "
                                           f"{watch.error_line[:500]}")
                logged_ready = watch is None or watch.ready_pattern is None \
                    or watch.ready_line is not None
                if logged_ready and await backend_healthy(self.session, plan.health_url,
                                                          plan.poll_interval * 5):
                    return
                if time.monotonic() > deadline:
                    raise StartupError(f"backend not healthy at {plan.health_url} after "
                                       f"{timeout:g}s (VESPA_READY_TIMEOUT_INITIAL / _RESUME)")
                await asyncio.sleep(plan.poll_interval)
        finally:
            if watch is not None:
                watch.close()

    async def throughput(self) -> float | None:
        """The max throughput: fixed, cached, or measured now; None if none is configured."""
        plan = self.plan
        if plan.fixed_throughput is not None:
            return plan.fixed_throughput
        if plan.benchmark is None:
            if plan.throughput_required:
                raise StartupError(
                    "no throughput to report: set VESPA_BENCHMARK=module:function (for an "
                    "OpenAI-compatible server benchmarks.openai_chat:benchmark; also "
                    "benchmarks.openai_completions, benchmarks.tgi, benchmarks.tts) or "
                    "VESPA_MAX_THROUGHPUT=<workload units a second>")
            return None
        gpu = await gpu_name()
        key = cache_key(plan.benchmark, plan.benchmark_identity, gpu)
        cached = await self.cache.get(key)
        if cached is not None:
            log.info("benchmark cache hit: %.4g units/s", cached)
            return cached
        log.info("running benchmark %s (at most %gs, VESPA_BENCHMARK_TIMEOUT)", plan.benchmark,
                 plan.benchmark_timeout)
        try:
            measured = await with_progress(
                run_benchmark(plan.benchmark, plan.backend_url, plan.benchmark_timeout,
                              plan.backend_api_key),
                f"benchmark {plan.benchmark} running", self.progress_interval)
        except BenchmarkError as exc:
            raise StartupError(str(exc)) from None
        log.info("benchmark: %.4g units/s", measured)
        await self.cache.put(key, measured, {"benchmark": plan.benchmark, "gpu": gpu,
                                             "backend": plan.benchmark_identity,
                                             "measured_at": time.time()})
        return measured

    async def watch_health(self) -> None:
        plan = self.plan
        failures = 0
        while not self.state.draining:
            await asyncio.sleep(plan.health_interval)
            if await backend_healthy(self.session, plan.health_url, plan.health_interval):
                if failures >= plan.failures_to_error:
                    log.info("backend healthy again")
                    self.state.error_msg = ""
                failures = 0
                self.state.backend_healthy = True
                continue
            failures += 1
            if failures == plan.failures_to_error:
                self.state.backend_healthy = False
                self.state.error_msg = (f"backend health check {plan.health_url} failed "
                                        f"{failures} times in a row")
                log.error(self.state.error_msg)
