"""The worker's life: wait for the backend, become ready, watch its health, drain at the end.

``WorkerState`` is what the routes and the reporter read; ``Lifecycle.run`` is the background task
that moves it along: loading -> ready, with periodic health checks after that.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from enum import Enum

import aiohttp

log = logging.getLogger("vespa.lifecycle")


class Phase(str, Enum):
    LOADING = "loading"
    BENCHMARKING = "benchmarking"
    READY = "ready"
    ERRORED = "errored"
    DRAINING = "draining"


@dataclass
class WorkerState:
    phase: Phase = Phase.LOADING
    error_msg: str = ""
    backend_healthy: bool = False
    started_at: float = field(default_factory=time.monotonic)
    ready_at: float | None = None

    @property
    def draining(self) -> bool:
        return self.phase is Phase.DRAINING

    @property
    def ready(self) -> bool:
        """Ready for work: the backend answers its health check and we are not shutting down."""
        return self.phase is Phase.READY and self.backend_healthy and not self.error_msg

    def become_ready(self, now: float) -> None:
        self.phase = Phase.READY
        self.backend_healthy = True
        self.ready_at = now

    def fail(self, message: str) -> None:
        self.phase = Phase.ERRORED
        self.error_msg = message


async def backend_healthy(session: aiohttp.ClientSession, url: str, timeout: float) -> bool:
    """True when ``url`` answers 200 within ``timeout`` seconds."""
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as response:
            await response.read()
            return response.status == 200
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
        return False


class Lifecycle:
    def __init__(self, state: WorkerState, session: aiohttp.ClientSession, health_url: str, *,
                 ready_timeout: float, poll_interval: float = 1.0,
                 health_interval: float = 10.0, failures_to_error: int = 3):
        self.state = state
        self.session = session
        self.health_url = health_url
        self.ready_timeout = ready_timeout
        self.poll_interval = poll_interval
        self.health_interval = health_interval
        self.failures_to_error = failures_to_error

    async def run(self) -> None:
        if not await self.wait_for_backend():
            self.state.fail(f"backend not healthy at {self.health_url} after "
                            f"{self.ready_timeout:g}s")
            log.error(self.state.error_msg)
            return
        if self.state.draining:
            return
        self.state.become_ready(time.monotonic())
        log.info("backend ready after %.1fs", self.state.ready_at - self.state.started_at)
        await self.watch_health()

    async def wait_for_backend(self) -> bool:
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline and not self.state.draining:
            if await backend_healthy(self.session, self.health_url, self.poll_interval * 5):
                return True
            await asyncio.sleep(self.poll_interval)
        return self.state.draining

    async def watch_health(self) -> None:
        failures = 0
        while not self.state.draining:
            await asyncio.sleep(self.health_interval)
            if await backend_healthy(self.session, self.health_url, self.health_interval):
                if failures >= self.failures_to_error:
                    log.info("backend healthy again")
                    self.state.error_msg = ""
                failures = 0
                self.state.backend_healthy = True
                continue
            failures += 1
            if failures == self.failures_to_error:
                self.state.backend_healthy = False
                self.state.error_msg = (f"backend health check {self.health_url} failed "
                                        f"{failures} times in a row")
                log.error(self.state.error_msg)
