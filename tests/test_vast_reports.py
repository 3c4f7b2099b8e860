"""What a worker tells the autoscaler, end to end, in the shape of Vast's current worker (vastai
1.9.1): records with a status word and float timestamps, disk_usage, loadtime in every report,
num_requests_recieved as distinct reqnums; and the backend's own key on the way to it."""

from __future__ import annotations

import asyncio

from .conftest import wait_until
from .fleet import Fleet, fleet, ready  # noqa: F401  (fixture)


def records(f: Fleet) -> dict[int, dict]:
    return {record["request_idx"]: record for record in f.emulator.deleted}


async def test_every_way_a_request_ends_is_recorded_as_vasts_worker_records_it(fleet):
    f = await fleet("full", VESPA_BLOCKED_PATHS="/blocked*", VESPA_MAX_THROUGHPUT="1",
                    VESPA_MAX_WAIT_TIME="1")
    await ready(f)
    ok = await f.route(cost=1)
    assert (await f.post("/echo", f.auth_data(ok), {})).status == 200
    failed = await f.route(cost=1)
    assert (await f.post("/status/503", f.auth_data(failed), {})).status == 503
    blocked = await f.route(cost=1)
    assert (await f.post("/blocked", f.auth_data(blocked), {})).status == 403
    hanging, also_hanging = await f.route(cost=5), await f.route(cost=5)
    hang = asyncio.gather(*(f.post("/hang", f.auth_data(route), {})
                            for route in (hanging, also_hanging)))  # 1 s of work each, at most
    await wait_until(lambda: len(f.worker.ledger.in_flight) == 2)
    turned_away = await f.route(cost=5)
    assert (await f.post("/echo", f.auth_data(turned_away), {})).status == 429
    hang.cancel()  # the client leaves
    await asyncio.gather(hang, return_exceptions=True)
    idxs = [r["request_idx"] for r in (ok, failed, blocked, hanging, turned_away)]
    await wait_until(lambda: set(idxs) <= set(records(f)))
    got = records(f)
    assert [(got[i]["status"], got[i]["success"]) for i in idxs] == [
        ("Success", True), ("Error", False), ("Rejected", False), ("Cancelled", True),
        ("Rejected", False)]
    for i in idxs:
        assert all(isinstance(got[i][name], float) for name in
                   ("entered_queue_at", "work_started_at", "work_completed_at"))
    assert got[idxs[0]]["work_started_at"] >= got[idxs[0]]["entered_queue_at"] > 0
    assert got[idxs[0]]["work_completed_at"] >= got[idxs[0]]["work_started_at"]
    assert got[idxs[2]]["work_started_at"] == 0.0 and got[idxs[4]]["work_started_at"] == 0.0
    assert got[idxs[3]]["work_started_at"] > 0 and got[idxs[3]]["work_completed_at"] == 0.0
    assert f.emulator.validation_errors == []


async def test_reports_carry_disk_usage_loadtime_once_loaded_and_reqnums_since_start(fleet):
    f = await fleet("url", VESPA_REPORT_MAX_INTERVAL="0.2")
    await ready(f)
    for _ in range(3):
        assert (await f.post("/echo", f.auth_data(await f.route()), {})).status == 200
    await wait_until(lambda: f.emulator.reports[-1]["num_requests_recieved"] == 3)
    count = len(f.emulator.reports)
    await wait_until(lambda: len(f.emulator.reports) >= count + 2)  # with nothing new
    loaded = [r for r in f.emulator.reports if r["max_perf"] > 0]
    assert len(loaded) >= 3 and loaded[0]["loadtime"] > 0
    assert {r["loadtime"] for r in loaded} == {loaded[0]["loadtime"]}  # every report, the same
    assert all(r["disk_usage"] > 0 for r in f.emulator.reports)
    assert f.emulator.reports[-1]["num_requests_recieved"] == 3  # not reset by a report
    assert f.emulator.validation_errors == []


async def test_the_same_reqnum_twice_is_one_request_received(fleet):
    """UNSECURED (nothing refuses a replay): an envelope sent twice is served twice, and counted
    once, as Vast's worker counts it."""
    f = await fleet("full", VESPA_UNSECURED="true")
    await ready(f)
    first, second = f.auth_data(await f.route()), f.auth_data(await f.route())
    for auth_data in (first, first, second):
        assert (await f.post("/echo", auth_data, {})).status == 200
    await wait_until(lambda: f.worker.ledger.totals.received == 3
                     and f.emulator.reports[-1]["num_requests_recieved"] == 2)


async def test_the_backends_own_key_replaces_the_clients(fleet, backend):
    f = await fleet("full", VESPA_BACKEND_API_KEY="bk-secret-1")
    await ready(f)
    auth_data = f.auth_data(await f.route(cost=1))
    response = await f.session.post(f"{f.url}/echo", json={"auth_data": auth_data,
                                                           "payload": {}},
                                    headers={"Authorization": "Bearer endpoint-key"})
    assert response.status == 200
    headers = [(name.lower(), value) for name, value in backend.log.requests[-1]["headers"]]
    assert [value for name, value in headers if name == "authorization"] == [
        "Bearer bk-secret-1"]
