"""Ground truth: 1,000 mixed signed requests; what the autoscaler was told must match exactly
what the clients saw (workload served, rejected, every request_idx finished once)."""

from __future__ import annotations

import asyncio
import math
import random
from collections import Counter
from urllib.parse import urlencode

import aiohttp

from .conftest import wait_until
from .fleet import Fleet, fleet, ready  # noqa: F401  (fixture)

KINDS = ["ok", "ok", "ok", "slow", "stream", "cancel", "error", "forged"]


async def one_request(f: Fleet, kind: str, cost: float) -> dict:
    auth_data = f.emulator.signer.auth_data(f.url, cost=cost)
    record = {"kind": kind, "idx": auth_data["request_idx"], "cost": cost, "status": None}
    if kind == "forged":
        auth_data["cost"] = cost + 1
    try:
        if kind in ("ok", "forged", "error"):
            path = "/status/500" if kind == "error" else "/echo"
            async with f.session.post(f.url + path, json={"auth_data": auth_data,
                                                          "payload": {"k": kind}}) as response:
                await response.read()
                record["status"] = response.status
        else:
            query = {f"serverless_{k}": v for k, v in auth_data.items()}
            path = {"slow": "/slow?delay=0.05&", "stream": "/slow-stream?n=5&delay=0.01&",
                    "cancel": "/slow-stream?n=200&delay=0.05&"}[kind]
            async with f.session.get(f.url + path + urlencode(query)) as response:
                record["status"] = response.status
                if kind == "cancel" and response.status == 200:
                    await response.content.readline()
                    record["status"] = "cancelled"
                    return record  # leaving the block closes the connection mid-stream
                await response.read()
    except aiohttp.ClientError as exc:
        record["status"] = f"error: {exc!r}"
    return record


async def test_reports_match_what_clients_saw_under_1000_mixed_requests(fleet):
    f = await fleet("full", VESPA_MAX_CONCURRENCY="16", VESPA_MAX_WAIT_TIME="0.4",
                    VESPA_MAX_THROUGHPUT="2000", VESPA_DEFAULT_COST="2")
    await ready(f)
    rng = random.Random(7)
    plan = [(rng.choice(KINDS), rng.choice([0.5, 1, 3, 10.0, 25, 80])) for _ in range(1000)]
    limit = asyncio.Semaphore(64)

    async def run(kind, cost):
        async with limit:
            return await one_request(f, kind, cost)

    records = await asyncio.gather(*(run(kind, cost) for kind, cost in plan))
    statuses = Counter(str(r["status"]) for r in records)
    assert not [s for s in statuses if s.startswith("error")], statuses
    assert statuses["429"] > 0, statuses  # the test must exercise rejections
    assert statuses["cancelled"] > 0 and statuses["401"] > 0 and statuses["500"] > 0

    ledger = f.worker.ledger
    await wait_until(lambda: not ledger.in_flight, timeout=20)
    await wait_until(lambda: not ledger.outbox, timeout=20)
    await f.worker.reporter.report_status(force=True)
    assert ledger.window.new_load == 0 and ledger.window.cur_perf == 0

    def workload(r):
        return r["cost"] if r["cost"] > 1 else 2.0

    served = [r for r in records if r["status"] == 200]
    failed = [r for r in records if r["status"] == 500]
    rejected = [r for r in records if r["status"] == 429]
    cancelled = [r for r in records if r["status"] == "cancelled"]
    forged = [r for r in records if r["status"] == 401]
    assert len(forged) == sum(1 for kind, _ in plan if kind == "forged")

    reports = f.emulator.reports
    assert f.emulator.validation_errors == []
    assert math.isclose(sum(r["cur_perf"] for r in reports), sum(map(workload, served)))
    assert math.isclose(sum(r["rej_load"] for r in reports), sum(map(workload, rejected)))
    # new_load is received minus cancelled per report, never below 0 (as Vast's own worker):
    # a cancel or queue timeout after the report that carried its receipt is not subtracted
    # from a later one, so the total is at least what was served or failed, and at most that
    # plus what was cancelled or rejected
    total_new = sum(r["new_load"] for r in reports)
    net = sum(map(workload, served + failed))
    assert net - 1e-6 <= total_new <= net + sum(map(workload, cancelled + rejected)) + 1e-6, \
        (total_new, net)
    # distinct reqnums since start, in the last report: every request but the forged ones
    assert reports[-1]["num_requests_recieved"] == len(records) - len(forged)

    deleted = Counter(f.emulator.deleted_request_idxs())
    assert all(count == 1 for count in deleted.values()), "a request was reported twice"
    expected = {r["idx"] for r in served + failed + rejected + cancelled}
    assert set(deleted) == expected
    success = {d["request_idx"]: d["success"] for d in f.emulator.deleted}
    assert all(success[r["idx"]] for r in served + cancelled)
    assert not any(success[r["idx"]] for r in failed + rejected)


async def test_autoscaler_down_for_a_while_then_back_nothing_lost_nothing_doubled(fleet):
    f = await fleet("full")
    await ready(f)
    f.emulator.fail_reports = f.emulator.fail_deletes = True
    reports_before = len(f.emulator.reports)
    reporter = f.worker.reporter
    failed_before = reporter.failed
    first = await asyncio.gather(*(one_request(f, "ok", 10) for _ in range(100)))
    # the reporter keeps trying and failing meanwhile
    await wait_until(lambda: reporter.failed >= failed_before + 3)
    assert len(f.emulator.reports) == reports_before
    # a failing delivery holds its batch outside the outbox while it tries: look between tries
    await wait_until(lambda: reporter.delivery is None or reporter.delivery.done())
    assert len(f.worker.ledger.outbox) == 100
    f.emulator.fail_reports = f.emulator.fail_deletes = False
    second = await asyncio.gather(*(one_request(f, "ok", 10) for _ in range(100)))
    await wait_until(lambda: not f.worker.ledger.outbox, timeout=20)
    await f.worker.reporter.report_status(force=True)
    deleted = Counter(f.emulator.deleted_request_idxs())
    assert set(deleted) == {r["idx"] for r in first + second}
    assert max(deleted.values()) == 1
    assert sum(r["cur_perf"] for r in f.emulator.reports) == 2000
    assert f.emulator.reports[-1]["num_requests_recieved"] == 200  # since start
