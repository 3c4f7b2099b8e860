"""GET /_vespa/status in front of a fake vLLM: state, throughput, in-flight and queued workload,
vLLM's own queue; and admission that refuses work while vLLM's waiting queue is past the limit."""

from __future__ import annotations

import asyncio

from .conftest import wait_until
from .fake_vllm import VLLM_METRICS, vllm_server  # noqa: F401  (fixture)
from .fleet import fleet, ready  # noqa: F401  (fixture)
from .test_worker_metrics import scrape, value

IDLE_VLLM = VLLM_METRICS.replace("} 12.0\n", "} 0.0\n").replace("} 3.0\n", "} 0.0\n")


async def status_of(client) -> dict:
    response = await client.get("/_vespa/status")
    assert response.status == 200
    return await response.json()


async def test_status_shows_state_workload_and_vllms_queue(make_worker, vllm_server):
    client, worker = await make_worker(vllm_server.root, VESPA_MAX_THROUGHPUT="50",
                                       VESPA_ADMIT_ON_BACKEND_QUEUE="true",
                                       VESPA_INSIGHT_INTERVAL="0.05",
                                       VESPA_HEALTHCHECK_INTERVAL="0.1")
    await wait_until(lambda: worker.state.ready and worker.insight.scrapes > 0)
    status = await status_of(client)
    assert status["state"] == "ready" and status["ready"] is True and status["error"] is None
    assert status["throughput"] == 50
    assert status["in_flight"] == {"requests": 0, "workload": 0}
    assert status["queued"] == {"requests": 0, "workload": 0}
    queue = status["backend"]["queue"]
    assert (queue["num_requests_running"], queue["num_requests_waiting"]) == (42, 15)
    assert 0.15 < queue["kv_cache_usage"] < 0.16
    assert queue["error"] is None and queue["last_scrape_at"] > 0
    assert status["backend"]["url"] == vllm_server.root
    assert status["last_report"] is None  # dev mode: no autoscaler
    assert "request_records" not in status


async def test_admission_refuses_work_while_vllms_queue_is_past_the_limit(make_worker,
                                                                          vllm_server):
    client, worker = await make_worker(vllm_server.root, VESPA_ADMIT_ON_BACKEND_QUEUE="true",
                                       VESPA_BACKEND_QUEUE_LIMIT="10",
                                       VESPA_INSIGHT_INTERVAL="0.05")
    await wait_until(lambda: worker.insight.waiting == 15)
    refused = await client.post("/v1/completions", json={"prompt": "hi"})
    assert refused.status == 429
    assert refused.headers["Retry-After"] == "1"
    assert "15 waiting" in (await refused.json())["error"]
    vllm_server.text = IDLE_VLLM
    await wait_until(lambda: worker.insight.waiting == 0)
    served = await client.post("/v1/completions", json={"prompt": "hi"})
    assert served.status == 200
    samples = await scrape(client)
    assert value(samples, "vespa_rejected_total", reason="backend_queue") == 1
    assert worker.ledger.totals.outcomes["rejected"] == 1


async def test_without_the_setting_vllms_queue_is_shown_but_never_refuses(make_worker,
                                                                        vllm_server):
    client, worker = await make_worker(vllm_server.root, VESPA_BACKEND_QUEUE_LIMIT="1",
                                       VESPA_INSIGHT_INTERVAL="0.05")
    assert worker.insight is None  # VESPA_BACKEND is not vllm and no admission on its queue
    assert (await client.post("/v1/completions", json={})).status == 200
    assert (await status_of(client))["backend"]["queue"] is None


async def test_status_counts_running_and_queued_work(make_worker):
    client, worker = await make_worker(VESPA_ALLOW_PARALLEL="false", VESPA_DEFAULT_COST="7")
    first = asyncio.ensure_future(client.get("/hang?name=a"))
    await wait_until(lambda: worker.admission.running == 1)
    second = asyncio.ensure_future(client.get("/hang?name=b"))
    await wait_until(lambda: worker.admission.queued == 1)
    status = await status_of(client)
    assert status["in_flight"] == {"requests": 2, "workload": 14}
    assert status["running"] == {"requests": 1, "workload": 7}
    assert status["queued"] == {"requests": 1, "workload": 7}
    first.cancel()
    second.cancel()
    await wait_until(lambda: not worker.ledger.in_flight)
    assert (await status_of(client))["totals"]["cancelled"] == 2


async def test_status_shows_the_last_report_without_the_master_token(fleet):
    f = await fleet("full")
    await ready(f)
    async with f.session.get(f.url + "/_vespa/status") as response:
        text = await response.text()
        status = await response.json()
    assert "mtoken-secret" not in text
    report = status["last_report"]
    assert report["sent"] >= 1 and report["failed"] == 0 and report["sent_at"] > 0
    assert report["body"]["id"] == 7 and report["body"]["max_perf"] == 1000
    assert "mtoken" not in report["body"]
