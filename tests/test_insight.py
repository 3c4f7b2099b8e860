"""Backend insight: vLLM /metrics text parsed (names and labels as vLLM 0.32 writes them), a real
loopback server scraped, and a backend without /metrics recorded as an error without a crash."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from vespa.backend.insight import BackendInsight, parse_vllm_metrics

from .conftest import free_port, wait_until
from .fake_vllm import OLD_VLLM_METRICS, VLLM_METRICS, vllm_server  # noqa: F401  (fixture)


def test_parse_vllm_metrics_sums_engines_and_ignores_look_alikes():
    values = parse_vllm_metrics(VLLM_METRICS)
    assert values["num_requests_running"] == 42
    assert values["num_requests_waiting"] == 15  # not the 900 of waiting_by_reason
    assert values["kv_cache_usage"] == pytest.approx((0.20441988950276246 + 0.1) / 2)


def test_parse_older_vllm_cache_gauge_name():
    assert parse_vllm_metrics(OLD_VLLM_METRICS) == {
        "num_requests_running": 2, "num_requests_waiting": 0, "kv_cache_usage": 0.75}


def test_parse_text_without_vllm_metrics():
    assert parse_vllm_metrics("# TYPE up gauge\nup 1.0\n") == {}
    assert parse_vllm_metrics("") == {}


async def test_scraper_picks_up_values_and_follows_changes(vllm_server):
    insight = BackendInsight(vllm_server.url, interval=0.02)
    task = asyncio.create_task(insight.run())
    try:
        await wait_until(lambda: insight.last_scrape_at is not None)
        assert insight.running == 42 and insight.waiting == 15
        assert insight.kv_cache_usage == pytest.approx(0.1522, abs=1e-4)
        assert insight.error is None
        assert insight.overloaded(10) is True and insight.overloaded(15) is False
        vllm_server.text = VLLM_METRICS.replace("} 12.0\nvllm:num_requests_waiting{engine=\"1\"",
                                                "} 0.0\nvllm:num_requests_waiting{engine=\"1\"")
        await wait_until(lambda: insight.waiting == 3)
        assert insight.overloaded(10) is False
        snapshot = insight.snapshot()
        assert snapshot["num_requests_running"] == 42 and snapshot["num_requests_waiting"] == 3
        assert snapshot["error"] is None and snapshot["last_scrape_at"] > 0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert vllm_server.scrapes >= 2


async def test_a_failing_backend_clears_values_and_recovers(vllm_server):
    async with aiohttp.ClientSession() as session:
        insight = BackendInsight(vllm_server.url, session)
        assert await insight.scrape() is True and insight.waiting == 15
        vllm_server.status = 500
        assert await insight.scrape() is False
        assert insight.waiting is None and insight.overloaded(0) is False
        assert "HTTP 500" in insight.error
        last_good = insight.last_scrape_at
        vllm_server.status = 200
        assert await insight.scrape() is True
        assert insight.error is None and insight.waiting == 15
        assert insight.last_scrape_at >= last_good and insight.failures == 1


async def test_backend_without_metrics_route_records_an_error(vllm_server):
    async with aiohttp.ClientSession() as session:
        missing = BackendInsight(vllm_server.root + "/no-metrics-here", session)
        assert await missing.scrape() is False
        assert "HTTP 404" in missing.error and missing.last_scrape_at is None
        not_vllm = BackendInsight(vllm_server.url, session)
        vllm_server.text = "# TYPE up gauge\nup 1.0\n"
        assert await not_vllm.scrape() is False
        assert "no vLLM queue metrics" in not_vllm.error


async def test_unreachable_backend_keeps_the_loop_alive():
    port = free_port()  # nothing listens there
    insight = BackendInsight(f"http://127.0.0.1:{port}/metrics", interval=0.01, timeout=0.5)
    task = asyncio.create_task(insight.run())
    await wait_until(lambda: insight.failures >= 3)
    assert not task.done()  # still scraping
    assert insight.error and insight.running is None
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
