"""Backend insight: vLLM's own queue (running, waiting, KV-cache use) scraped from its /metrics.

A background loop scrapes every few seconds; readers (``/_vespa/status``, optional admission
gating) only read plain attributes. Values are cleared on a failed scrape, so nothing stale gates.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger("vespa.insight")

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
# vLLM >= 0.10 (V1 engine) calls it kv_cache_usage_perc; older releases gpu_cache_usage_perc.
# Either way it is a fraction: 1.0 means the cache is full.
KV_CACHE_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
# Only the sample lines we need go to the (slow, pure-Python) parser: vLLM's full exposition
# is ~600 lines and takes ~10 ms to parse, these few take microseconds.
WANTED_SAMPLES = re.compile(
    r"^vllm:(?:num_requests_running|num_requests_waiting|kv_cache_usage_perc"
    r"|gpu_cache_usage_perc)[{ ].*$", re.MULTILINE)


def parse_vllm_metrics(text: str) -> dict:
    """``num_requests_running`` and ``num_requests_waiting`` (summed over engines) and
    ``kv_cache_usage`` (mean over engines, a 0..1 fraction); keys absent when vLLM has none."""
    sums: dict[str, list[float]] = {}
    wanted = "\n".join(WANTED_SAMPLES.findall(text))
    if wanted:
        for family in text_string_to_metric_families(wanted + "\n"):
            for sample in family.samples:
                sums.setdefault(sample.name, []).append(sample.value)
    result: dict = {}
    for key, name in (("num_requests_running", RUNNING), ("num_requests_waiting", WAITING)):
        if name in sums:
            result[key] = int(sum(sums[name]))
    for name in KV_CACHE_USAGE:
        if name in sums:
            result["kv_cache_usage"] = sum(sums[name]) / len(sums[name])
            break
    return result


class BackendInsight:
    """Scrapes ``metrics_url`` every ``interval`` seconds while ``run()`` runs."""

    def __init__(self, metrics_url: str, session: aiohttp.ClientSession | None = None,
                 interval: float = 5.0, timeout: float = 2.0):
        self.metrics_url = metrics_url
        self.session = session
        self.interval = interval
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self.running: int | None = None
        self.waiting: int | None = None
        self.kv_cache_usage: float | None = None
        self.last_scrape_at: float | None = None  # epoch seconds of the last good scrape
        self.error: str | None = None
        self.scrapes = 0
        self.failures = 0

    def overloaded(self, limit: int) -> bool:
        """True when the backend's own waiting queue is longer than ``limit`` (False when
        unknown: a backend we cannot see is not a reason to refuse work)."""
        waiting = self.waiting
        return waiting is not None and waiting > limit

    def snapshot(self) -> dict:
        """For ``/_vespa/status``."""
        return {"num_requests_running": self.running, "num_requests_waiting": self.waiting,
                "kv_cache_usage": self.kv_cache_usage, "last_scrape_at": self.last_scrape_at,
                "error": self.error}

    async def run(self) -> None:
        """Scrape until cancelled."""
        own = self.session is None
        session = aiohttp.ClientSession() if own else self.session
        try:
            while True:
                await self.scrape(session)
                await asyncio.sleep(self.interval)
        finally:
            if own:
                await session.close()

    async def scrape(self, session: aiohttp.ClientSession | None = None) -> bool:
        """One scrape; updates the fields, never raises (except cancellation)."""
        session = session or self.session
        try:
            async with session.get(self.metrics_url, timeout=self.timeout) as response:
                if response.status != 200:
                    raise ScrapeError(f"{self.metrics_url} answered HTTP {response.status}")
                text = await response.text()
            values = parse_vllm_metrics(text)
            if not values:
                raise ScrapeError(f"{self.metrics_url} has no vLLM queue metrics")
        except (aiohttp.ClientError, asyncio.TimeoutError, ScrapeError, ValueError) as exc:
            self.fail(str(exc) or type(exc).__name__)
            return False
        self.running = values.get("num_requests_running")
        self.waiting = values.get("num_requests_waiting")
        self.kv_cache_usage = values.get("kv_cache_usage")
        self.last_scrape_at = time.time()
        self.error = None
        self.scrapes += 1
        return True

    def fail(self, reason: str) -> None:
        if self.error != reason:
            log.info("backend insight: %s", reason)
        self.running = self.waiting = self.kv_cache_usage = None
        self.error = reason
        self.failures += 1


class ScrapeError(Exception):
    """The backend's metrics could not be read."""
