"""GET /_vespa/metrics after known sequences of requests: counts by method, route template and
status; rejections by reason; latency histograms; bytes relayed; gauges; autoscaler reports."""

from __future__ import annotations

import asyncio
import json

import pytest

from prometheus_client.parser import text_string_to_metric_families

from .conftest import wait_until
from .fleet import fleet, ready  # noqa: F401  (fixture)

ROUTES = "/echo/*,/status/*,/sse"


async def scrape(client) -> dict:
    """{(sample name, frozenset of labels): value} from the worker's metrics route."""
    response = await client.get("/_vespa/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    samples = {}
    for family in text_string_to_metric_families(await response.text()):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def requests(samples: dict, method: str, route: str, status: int) -> float:
    return value(samples, "vespa_requests_total", method=method, route=route, status=str(status))


async def test_counts_after_a_known_sequence(make_worker):
    client, worker = await make_worker(VESPA_METRICS_ROUTES=ROUTES, VESPA_MAX_BODY_BYTES="1000",
                                       VESPA_BLOCKED_PATHS="/blocked/*",
                                       VESPA_MAX_THROUGHPUT="250")
    body = json.dumps({"prompt": "x" * 100}).encode()
    for i in range(3):
        assert (await client.post(f"/echo/chat/{i}", data=body)).status == 200
    assert (await client.get("/status/503")).status == 503
    sse = await client.get("/sse")
    sse_bytes = len(await sse.read())
    assert (await client.get("/blocked/secret")).status == 403
    assert (await client.post("/echo/big", data=b"x" * 2000)).status == 413
    assert (await client.get("/not/a/template")).status == 404  # the backend's own 404

    samples = await scrape(client)
    assert requests(samples, "POST", "/echo/*", 200) == 3
    assert requests(samples, "GET", "/status/*", 503) == 1
    assert requests(samples, "GET", "/sse", 200) == 1
    assert requests(samples, "GET", "other", 403) == 1
    assert requests(samples, "POST", "/echo/*", 413) == 1
    assert requests(samples, "GET", "other", 404) == 1
    assert sum(v for (name, _), v in samples.items() if name == "vespa_requests_total") == 8
    assert value(samples, "vespa_rejected_total", reason="blocked") == 1
    assert value(samples, "vespa_rejected_total", reason="body_size") == 1
    assert value(samples, "vespa_rejected_total", reason="overload") == 0
    # six requests reached the backend: three echoes, the 503, the stream, the 404
    assert value(samples, "vespa_upstream_latency_seconds_count") == 6
    assert value(samples, "vespa_upstream_ttfb_seconds_count") == 6
    assert value(samples, "vespa_upstream_latency_seconds_sum") > 0
    assert value(samples, "vespa_upstream_latency_seconds_bucket", le="+Inf") == 6
    assert value(samples, "vespa_bytes_relayed_total", direction="in") == 3 * len(body)
    assert value(samples, "vespa_bytes_relayed_total", direction="out") > sse_bytes
    assert value(samples, "vespa_requests_in_flight") == 0
    assert value(samples, "vespa_requests_queued") == 0
    assert value(samples, "vespa_benchmark_throughput") == 250
    # the worker's own routes are not requests to the backend
    assert not any(dict(labels).get("route", "").startswith("/_vespa")
                   for (_, labels) in samples)


async def test_overload_and_queue_timeout_are_counted_apart(make_worker):
    client, worker = await make_worker(VESPA_MAX_THROUGHPUT="1", VESPA_DEFAULT_COST="5",
                                       VESPA_MAX_WAIT_TIME="3")
    slow = asyncio.gather(client.get("/slow?delay=1"), client.get("/slow?delay=1"))
    await wait_until(lambda: len(worker.ledger.in_flight) == 2)
    refused = await client.get("/echo/x")  # 2 x 3 (5, at most 3 s of work each) / 1 a s > 3 s
    assert refused.status == 429
    assert [r.status for r in await slow] == [200, 200]
    samples = await scrape(client)
    assert value(samples, "vespa_rejected_total", reason="overload") == 1
    assert requests(samples, "GET", "other", 429) == 1

    client, worker = await make_worker(VESPA_ALLOW_PARALLEL="false", VESPA_MAX_WAIT_TIME="0.3")
    slow = asyncio.ensure_future(client.get("/slow?delay=1"))
    await wait_until(lambda: worker.ledger.in_flight)
    queued = asyncio.ensure_future(client.get("/echo/y"))
    await wait_until(lambda: worker.admission.queued == 1)
    samples = await scrape(client)
    assert value(samples, "vespa_requests_queued") == 1
    assert value(samples, "vespa_requests_in_flight") == 2
    assert (await queued).status == 429
    assert (await slow).status == 200
    samples = await scrape(client)
    assert value(samples, "vespa_rejected_total", reason="queue_timeout") == 1
    assert value(samples, "vespa_rejected_total", reason="overload") == 0


async def test_a_client_that_leaves_is_counted_as_499(make_worker):
    client, worker = await make_worker()
    request = asyncio.ensure_future(client.get("/hang"))
    await wait_until(lambda: worker.ledger.in_flight)
    request.cancel()
    await wait_until(lambda: not worker.ledger.in_flight)
    samples = await scrape(client)
    assert requests(samples, "GET", "other", 499) == 1


class BrokenKeys:
    """A key source that fails: a bug in the signature check (before the ledger)."""

    @property
    def key(self):
        raise RuntimeError("a bug in the worker")


def broken_queue_check() -> str | None:
    raise RuntimeError("a bug in the worker")  # a bug in admission (in the ledger)


@pytest.mark.parametrize("where", ["signature-check", "admission"])
async def test_an_unexpected_exception_is_a_500_counted_as_one_and_logged_once_a_minute(
        fleet, caplog, where):
    """A request the worker fails on is a 500 in the metrics and an error in the ledger (not a
    499, a client that left), and its traceback is logged once a minute at most."""
    caplog.set_level("ERROR", logger="vespa.front")
    f = await fleet("full")
    await ready(f)
    if where == "signature-check":
        f.worker.doorway.keys = BrokenKeys()
    else:
        f.worker.corridor.backend_queue_full = broken_queue_check
    idxs = []
    for n in range(6):
        if n == 5:
            f.worker.server.failures.next_at = 0.0  # a minute later
        auth_data = f.auth_data(await f.route(cost=5))
        idxs.append(auth_data["request_idx"])
        response = await f.post("/echo", auth_data, {"n": n})
        assert response.status == 500
        assert "internal error" in (await response.json())["error"]
    tracebacks = [r for r in caplog.records if r.name == "vespa.front" and r.exc_info]
    assert len(tracebacks) == 2, [r.getMessage() for r in tracebacks]
    assert "a bug in the worker" in caplog.text
    assert tracebacks[0].getMessage() == "request POST /echo failed"
    assert tracebacks[1].getMessage() == "request POST /echo failed (4 more since the last such line)"
    async with f.session.get(f.url + "/_vespa/metrics") as response:
        text = await response.text()
    samples = {(s.name, frozenset(s.labels.items())): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert requests(samples, "POST", "other", 500) == 6
    assert requests(samples, "POST", "other", 499) == 0
    outcomes = f.worker.ledger.totals.outcomes
    assert outcomes["cancelled"] == 0
    if where == "admission":  # in the ledger: errors, reported as failed
        assert outcomes["error"] == 6
        await wait_until(lambda: sorted(f.emulator.deleted_request_idxs()) == sorted(idxs))
        assert not any(d["success"] for d in f.emulator.deleted)
    else:  # refused before the ledger: never load
        assert f.worker.ledger.totals.received == 0


async def test_signed_worker_counts_reports_and_signature_refusals(fleet):
    f = await fleet("full")
    await ready(f)
    auth_data = f.auth_data(await f.route(cost=20))
    assert (await f.post("/echo", auth_data, {"n": 1})).status == 200
    assert (await f.post("/echo", dict(auth_data, cost=21), {"n": 1})).status == 401
    await wait_until(lambda: f.emulator.deleted_request_idxs() == [auth_data["request_idx"]])

    async with f.session.get(f.url + "/_vespa/metrics") as response:
        text = await response.text()
    samples = {(s.name, frozenset(s.labels.items())): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert value(samples, "vespa_rejected_total", reason="signature") == 1
    assert value(samples, "vespa_autoscaler_reports_total", kind="worker_status",
                 result="ok") >= 1
    assert value(samples, "vespa_autoscaler_reports_total", kind="delete_requests",
                 result="ok") == 1
    assert value(samples, "vespa_autoscaler_reports_total", kind="worker_status",
                 result="failed") == 0
    assert "mtoken-secret" not in text
