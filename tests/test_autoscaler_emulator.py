"""The local autoscaler emulator, as a real server on loopback."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from vespa.corridor import auth
from vespa.devtools.autoscaler import WORKER_STATUS_FIELDS
from vespa.devtools.signing import Signer

from .conftest import PYTHON, free_port, worker_env
from .fleet import emulator, make_emulator, private_key  # noqa: F401  (fixtures)

WORKER_URL = "http://127.0.0.1:3999"


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


def report(worker_id: int = 1, **changes) -> dict:
    """A worker_status as Vast's worker (vastai 1.9.1) sends it."""
    body = {"id": worker_id, "mtoken": "token", "version": "1.1.0", "loadtime": 12.5,
            "cur_load": 0, "rej_load": 0.0, "new_load": 0.0, "error_msg": "", "max_perf": 100.0,
            "cur_perf": 0.0, "cur_capacity": 0, "max_capacity": 0,
            "num_requests_working": 0, "num_requests_recieved": 0,
            "additional_disk_usage": 0.0, "disk_usage": 23.5, "working_request_idxs": [],
            "url": WORKER_URL}
    assert list(body) == list(WORKER_STATUS_FIELDS)
    return dict(body, **changes)


async def post(http, emulator, path: str, body, **kwargs) -> tuple[int, dict]:
    async with http.post(f"{emulator.url}{path}", json=body, **kwargs) as response:
        return response.status, await response.json()


async def route(http, emulator, headers: dict | None = None, **body) -> tuple[int, dict]:
    return await post(http, emulator, "/route/", {"endpoint": "vespa-dev", "cost": 100.0, **body},
                      headers=headers)


async def test_listens_on_loopback_by_default(emulator):
    assert emulator.host == "127.0.0.1" and emulator.url.startswith("http://127.0.0.1:")


async def test_pubkey_is_served_and_parses(emulator, http, private_key):
    async with http.get(f"{emulator.url}/pubkey/") as response:
        assert response.status == 200
        key = auth.PublicKey.from_pem(await response.text())
    assert key.modulus == private_key.public_key().public_numbers().n


async def test_route_with_no_workers_answers_the_cold_start_shape(emulator, http):
    status, body = await route(http, emulator)
    assert status == 200 and "url" not in body and "signature" not in body
    assert body["endpoint"] == "vespa-dev"
    assert body["status"] == {"ready": 0, "loading": 0, "error": 0, "stale": 0}
    assert isinstance(body["request_idx"], int) and body["request_idx"] > 0
    _, again = await route(http, emulator, request_idx=body["request_idx"])
    assert again["request_idx"] == body["request_idx"]


async def test_loading_and_errored_workers_are_counted_not_routed(emulator, http):
    await post(http, emulator, "/worker_status/", report(1, max_perf=0.0))
    await post(http, emulator, "/worker_status/", report(2, error_msg="benchmark failed"))
    _, body = await route(http, emulator)
    assert "url" not in body
    assert body["status"] == {"ready": 0, "loading": 1, "error": 1, "stale": 0}


async def test_a_worker_whose_reports_stop_is_stale(make_emulator, http):
    emulator = await make_emulator(stale_after=0.05)
    await post(http, emulator, "/worker_status/", report())
    await asyncio.sleep(0.1)
    _, body = await route(http, emulator)
    assert "url" not in body and body["status"]["stale"] == 1


@pytest.mark.parametrize("scheme", auth.SCHEMES)
async def test_a_ready_report_makes_route_return_a_verifiable_signed_url(make_emulator, http,
                                                                         scheme):
    emulator = await make_emulator(scheme=scheme)
    _, cold = await route(http, emulator)
    status, _ = await post(http, emulator, "/worker_status/", report())
    assert status == 200
    status, body = await route(http, emulator, request_idx=cold["request_idx"])
    assert status == 200
    assert body["url"] == WORKER_URL and body["endpoint"] == "vespa-dev"
    assert body["cost"] == 100.0 and isinstance(body["cost"], float)
    assert body["request_idx"] == cold["request_idx"] and body["__request_id"]
    verdict = auth.verify(body, emulator.signer.public_key, scheme, expected_url=WORKER_URL)
    assert verdict == auth.Verdict(True, "", scheme)
    assert emulator.validation_errors == []


async def test_signs_url_only_by_default_as_vast_does(emulator, http):
    """Vast's current autoscaler signs ``{"url": ...}`` only, so every request routed to one
    worker carries the same signature (PKCS#1 v1.5 is deterministic)."""
    await post(http, emulator, "/worker_status/", report())
    (_, first), (_, second) = await route(http, emulator), await route(http, emulator, cost=7)
    assert emulator.signer.scheme == "url"
    assert auth.verify(first, emulator.signer.public_key, "url", expected_url=WORKER_URL).ok
    assert not auth.verify(first, emulator.signer.public_key, "full").ok
    assert first["signature"] == second["signature"] and first["reqnum"] != second["reqnum"]


async def test_reqnums_are_fresh_and_increasing(emulator, http):
    await post(http, emulator, "/worker_status/", report())
    reqnums = [(await route(http, emulator))[1]["reqnum"] for _ in range(5)]
    assert reqnums == sorted(set(reqnums))
    assert [r["reqnum"] for r in emulator.routes] == reqnums


async def test_integer_cost_stays_integer_in_the_signature(make_emulator, http):
    emulator = await make_emulator(scheme="full")  # the full scheme signs the cost
    await post(http, emulator, "/worker_status/", report())
    _, body = await route(http, emulator, cost=100)
    assert body["cost"] == 100 and isinstance(body["cost"], int)
    assert auth.verify(body, emulator.signer.public_key, "full").ok
    assert not auth.verify(dict(body, cost=100.0), emulator.signer.public_key, "full").ok


async def test_route_picks_the_least_loaded_ready_worker(emulator, http):
    await post(http, emulator, "/worker_status/", report(1, cur_load=500.0, url="http://a:1"))
    await post(http, emulator, "/worker_status/", report(2, cur_load=100.0, url="http://b:1"))
    await post(http, emulator, "/worker_status/", report(3, max_perf=0.0, url="http://c:1"))
    urls = [(await route(http, emulator))[1]["url"] for _ in range(6)]
    # b has 4 s of work queued, a 5 s: b until its routed load catches up, then both.
    assert urls[0] == "http://b:1" and set(urls) == {"http://a:1", "http://b:1"}


async def test_api_key_is_checked_when_configured(make_emulator, http):
    emulator = await make_emulator(api_key="secret")
    await post(http, emulator, "/worker_status/", report())
    status, body = await route(http, emulator)
    assert status == 401 and "api key" in body["error"]
    status, _ = await route(http, emulator, headers={"Authorization": "Bearer wrong"})
    assert status == 401
    status, body = await route(http, emulator, headers={"Authorization": "Bearer secret"})
    assert status == 200 and body["url"] == WORKER_URL
    status, _ = await route(http, emulator, api_key="secret")
    assert status == 200


@pytest.mark.parametrize("body,status,message", [
    ({"endpoint": "other", "cost": 1}, 404, "no endpoint named 'other'"),
    ({"endpoint": "vespa-dev", "cost": "1"}, 400, "cost must be"),
    ({"endpoint": "vespa-dev"}, 400, "cost must be"),
    ({"endpoint": "vespa-dev", "cost": 1, "request_idx": -1}, 400, "request_idx must be"),
    ([1, 2], 400, "JSON object"),
])
async def test_bad_route_requests_get_a_json_error(emulator, http, body, status, message):
    got_status, got = await post(http, emulator, "/route/", body)
    assert got_status == status and message in got["error"]


async def test_delete_requests_both_formats_are_recorded(emulator, http):
    legacy_ok = {"worker_id": 1, "mtoken": "t", "request_idxs": [1, 2], "success": True}
    legacy_failed = {"worker_id": 1, "mtoken": "t", "request_idxs": [3], "success": False}
    records = [{"request_idx": 4, "success": True, "status": "Success",
                "entered_queue_at": 1.0, "work_started_at": 1.5, "work_completed_at": 2.0},
               {"request_idx": 5, "success": False, "status": "Rejected",
                "entered_queue_at": 3.0, "work_started_at": 0.0, "work_completed_at": 0.0}]
    for body in (legacy_ok, legacy_failed, {"worker_id": 1, "mtoken": "t", "requests": records}):
        assert (await post(http, emulator, "/delete_requests/", body))[0] == 200
    assert emulator.deleted_request_idxs() == [1, 2, 3, 4, 5]
    assert [r["success"] for r in emulator.deleted] == [True, True, False, True, False]
    assert [r["format"] for r in emulator.deleted] == ["legacy"] * 3 + ["requests"] * 2
    assert emulator.deleted[4]["status"] == "Rejected" and len(emulator.delete_bodies) == 3
    assert emulator.validation_errors == []


async def test_reports_are_recorded_with_no_validation_errors_when_well_typed(emulator, http):
    await post(http, emulator, "/worker_status/", report(cur_perf=3, new_load=2.0))
    assert emulator.reports == [report(cur_perf=3, new_load=2.0)]
    assert emulator.validation_errors == []


@pytest.mark.parametrize("changes,flagged", [
    ({"cur_load": "3"}, "cur_load must be a finite number >= 0, got '3'"),
    ({"new_load": -2.0}, "new_load must be a finite number >= 0, got -2.0"),
    ({"id": True}, "id must be an integer"),
    ({"num_requests_recieved": 1.5}, "num_requests_recieved must be an integer >= 0"),
    ({"working_request_idxs": [1, "2"]}, "working_request_idxs must be a list of integers"),
    ({"rej_load": -1.0}, "rej_load must be a finite number >= 0"),
    ({"error_msg": None}, "error_msg must be a string"),
    ({"disk_usage": -1.0}, "disk_usage must be a finite number >= 0"),
])
async def test_worker_status_field_types_are_validated(emulator, http, changes, flagged):
    await post(http, emulator, "/worker_status/", report(**changes))
    assert len(emulator.validation_errors) == 1 and flagged in emulator.validation_errors[0]


async def test_missing_report_fields_are_flagged(emulator, http):
    body = report()
    del body["num_requests_recieved"], body["loadtime"], body["disk_usage"]
    await post(http, emulator, "/worker_status/", body)
    assert sorted(e.split(": ", 1)[1] for e in emulator.validation_errors) == [
        "disk_usage is missing", "loadtime is missing", "num_requests_recieved is missing"]


async def test_the_start_up_scripts_error_body_is_a_valid_report(emulator, http):
    """Vast's start_server.sh reports a worker that cannot start with five fields only."""
    failed = {"id": 7, "mtoken": "token", "version": "0", "error_msg": "PyWorker exited with "
              "status 1", "url": ""}
    assert (await post(http, emulator, "/worker_status/", failed))[0] == 200
    assert emulator.validation_errors == []
    assert emulator.state_counts()["error"] == 1
    await post(http, emulator, "/worker_status/", dict(failed, error_msg=""))
    await post(http, emulator, "/worker_status/", dict(failed, cur_load=0.0))  # neither form
    joined = "\n".join(emulator.validation_errors)
    assert "(start-up error): error_msg must be a non-empty string" in joined
    assert "disk_usage is missing" in joined and len(emulator.validation_errors) > 2


async def test_delete_requests_field_types_are_validated(emulator, http):
    await post(http, emulator, "/delete_requests/",
               {"worker_id": "1", "mtoken": "t", "request_idxs": [1], "success": "yes"})
    await post(http, emulator, "/delete_requests/",
               {"worker_id": 1, "mtoken": "t", "requests": [{"request_idx": 2, "success": True}]})
    joined = "\n".join(emulator.validation_errors)
    assert "worker_id must be an integer" in joined and "success must be a boolean" in joined
    assert "requests[0]: status is missing" in joined


@pytest.mark.parametrize("changes,flagged", [
    ({"status": 200}, "status must be one of Success, Error, Cancelled, Rejected"),
    ({"status": "success"}, "status must be one of"),
    ({"work_started_at": None}, "work_started_at must be a float >= 0"),
    ({"work_completed_at": 2}, "work_completed_at must be a float"),
    ({"entered_queue_at": -1.0}, "entered_queue_at must be a float >= 0"),
])
async def test_delete_records_are_held_to_vasts_shape(emulator, http, changes, flagged):
    record = {"request_idx": 2, "success": True, "status": "Cancelled", "entered_queue_at": 1.0,
              "work_started_at": 0.0, "work_completed_at": 0.0, **changes}
    await post(http, emulator, "/delete_requests/",
               {"worker_id": 1, "mtoken": "t", "requests": [record]})
    assert len(emulator.validation_errors) == 1 and flagged in emulator.validation_errors[0]


async def test_faults_answer_500_and_record_nothing(emulator, http):
    emulator.fail_reports = emulator.fail_deletes = emulator.fail_routes = True
    assert (await post(http, emulator, "/worker_status/", report()))[0] == 500
    finished = {"worker_id": 1, "mtoken": "t", "request_idxs": [1], "success": True}
    assert (await post(http, emulator, "/delete_requests/", finished))[0] == 500
    assert (await route(http, emulator))[0] == 500
    emulator.fail_pubkey = True
    async with http.get(f"{emulator.url}/pubkey/") as response:
        assert response.status == 500
    assert emulator.reports == [] and emulator.deleted == [] and emulator.workers == {}


async def test_delay_slows_every_answer(emulator, http):
    emulator.delay = 0.3
    started = time.monotonic()
    assert (await post(http, emulator, "/worker_status/", report()))[0] == 200
    assert time.monotonic() - started >= 0.3


async def test_status_page_shows_the_fleet(emulator, http):
    await post(http, emulator, "/worker_status/", report(7, error_msg="<oom>"))
    async with http.get(emulator.url + "/") as response:
        page = await response.text()
    assert response.status == 200 and "text/html" in response.content_type
    assert "<td>7</td>" in page and "&lt;oom&gt;" in page and "<td>error</td>" in page


def test_signer_signs_auth_data_for_any_url(private_key):
    signer = Signer(private_key, scheme="legacy")
    first, second = signer.auth_data("http://x:1"), signer.auth_data("http://x:1", cost=5)
    assert second["reqnum"] == first["reqnum"] + 1
    assert auth.verify(second, signer.public_key, "legacy", expected_url="http://x:1").ok
    with pytest.raises(ValueError):
        Signer(private_key, scheme="sha1")


async def test_runs_as_a_module(http):
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        PYTHON, "-m", "vespa.devtools.autoscaler", "--port", str(port),
        env=worker_env(PYTHONUNBUFFERED="1"), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    try:
        pem = await fetch_when_up(http, f"http://127.0.0.1:{port}/pubkey/")
        assert auth.PublicKey.from_pem(pem).size_bytes == 256
    finally:
        process.terminate()
        output, _ = await process.communicate()
    assert b"(endpoint 'vespa-dev', url signatures)" in output  # the default, as Vast's


async def fetch_when_up(http, url: str, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            async with http.get(url) as response:
                return await response.text()
        except aiohttp.ClientConnectionError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)
