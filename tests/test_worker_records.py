"""Request records through a real worker: one file per request, redaction of every sensitive
header kind, body caps, audio as metadata, retention, and the token-guarded /_vespa/logs routes."""

from __future__ import annotations

import json
import os
import time

import pytest

from .conftest import wait_until
from .fleet import fleet, ready  # noqa: F401  (fixture)

TOKEN = "logs-token-0123456789"
SENSITIVE = {"Authorization": "Bearer sk-live-abc", "Proxy-Authorization": "Basic Zm9vOmJhcg==",
             "Cookie": "session=s3cr3t", "X-Api-Key": "key-123", "Api-Key": "key-456",
             "X-Vespa-Logs-Token": TOKEN, "X-Amz-Security-Token": "tok-789",
             "X-Hub-Signature-256": "sha256=abc", "X-Client-Secret": "shh"}


@pytest.fixture
async def recording(make_worker, tmp_path):
    async def start(**env: str):
        client, worker = await make_worker(VESPA_REQUEST_LOG_DIR=str(tmp_path / "records"),
                                           VESPA_LOGS_TOKEN=TOKEN, **env)
        return client, worker
    return start


async def fetch(client, path: str, token: str | None = TOKEN):
    headers = {"x-vespa-logs-token": token} if token is not None else {}
    response = await client.get(path, headers=headers)
    return response.status, await response.json()


async def written(worker, count: int) -> None:
    await wait_until(lambda: worker.recorder.written >= count, timeout=10)


async def test_a_json_exchange_is_recorded_with_every_credential_redacted(recording):
    client, worker = await recording()
    payload = {"messages": [{"role": "user", "content": "héllo"}], "n": 1}
    response = await client.post("/echo/v1/chat?stream=false", json=payload,
                                  headers={**SENSITIVE, "X-Request-Id": "rec-1",
                                           "X-Plain": "visible"})
    assert response.status == 200
    echoed = await response.json()
    await written(worker, 1)

    status, record = await fetch(client, "/_vespa/logs/rec-1")
    assert status == 200
    assert (record["id"], record["method"], record["status"]) == ("rec-1", "POST", 200)
    assert (record["path"], record["query"]) == ("/echo/v1/chat", "stream=false")
    assert record["client"] == "127.0.0.1"
    assert record["outcome"] == "success"
    headers = {name.lower(): value for name, value in record["request"]["headers"]}
    for name in SENSITIVE:
        assert headers[name.lower()] == "[redacted]", name
    assert headers["x-plain"] == "visible"
    assert record["request"]["body"]["json"] == payload
    assert record["response"]["body"]["json"] == echoed
    assert record["response"]["body"]["content_type"].startswith("application/json")
    timings = record["timings"]
    assert 0 <= timings["ttfb_seconds"] <= timings["upstream_seconds"] <= timings["total_seconds"]
    text = json.dumps(record["request"])  # (the echo backend's answer repeats the headers)
    for secret in SENSITIVE.values():
        assert secret not in text


async def test_bodies_past_the_cap_are_truncated_and_audio_is_metadata_only(recording):
    client, worker = await recording(VESPA_REQUEST_LOG_MAX_BODY_BYTES="64")
    big = {"text": "x" * 500}
    assert (await client.post("/echo/a", json=big, headers={"X-Request-Id": "big"})).status == 200
    audio = os.urandom(4000)
    assert (await client.post("/upload", data=audio, headers={
        "Content-Type": "audio/wav", "X-Request-Id": "wav"})).status == 200
    await written(worker, 2)

    _, record = await fetch(client, "/_vespa/logs/big")
    body = record["request"]["body"]
    assert body["truncated"] is True and "json" not in body
    assert len(body["text"]) == 64 and body["size"] == len(json.dumps(big))
    _, record = await fetch(client, "/_vespa/logs/wav")
    body = record["request"]["body"]
    assert body["content_type"] == "audio/wav"
    assert "json" not in body and "text" not in body


async def test_refusals_are_recorded_with_the_workers_answer(recording):
    client, worker = await recording(VESPA_BLOCKED_PATHS="/admin/*", VESPA_MAX_BODY_BYTES="100")
    assert (await client.get("/admin/x", headers={"X-Request-Id": "no"})).status == 403
    await written(worker, 1)
    _, record = await fetch(client, "/_vespa/logs/no")
    assert record["status"] == 403 and record["outcome"] == "rejected"  # counted as load
    assert "blocked" in record["response"]["body"]["json"]["error"]
    assert (await client.post("/echo", data=b"x" * 101,
                              headers={"X-Request-Id": "big"})).status == 413
    await written(worker, 2)
    _, record = await fetch(client, "/_vespa/logs/big")
    assert record["status"] == 413 and record["outcome"] == "refused"  # not load
    assert "VESPA_MAX_BODY_BYTES" in record["response"]["body"]["json"]["error"]


async def test_listing_is_newest_first_metadata_only_and_limited(recording):
    client, worker = await recording()
    for i in range(5):
        assert (await client.get(f"/echo/{i}", headers={"X-Request-Id": f"r{i}"})).status == 200
    await written(worker, 5)
    status, listing = await fetch(client, "/_vespa/logs?limit=3")
    assert status == 200
    assert [r["id"] for r in listing["records"]] == ["r4", "r3", "r2"]
    assert all("request" not in r and "response" not in r for r in listing["records"])
    assert {r["path"] for r in listing["records"]} == {"/echo/4", "/echo/3", "/echo/2"}
    status, listing = await fetch(client, "/_vespa/logs")
    assert len(listing["records"]) == 5
    status, body = await fetch(client, "/_vespa/logs?limit=zero")
    assert status == 400 and "limit" in body["error"]
    status, body = await fetch(client, "/_vespa/logs/nope")
    assert status == 404 and "nope" in body["error"]


async def test_logs_routes_without_with_a_wrong_and_with_the_right_token(recording, make_worker):
    client, worker = await recording()
    assert (await client.get("/echo/1", headers={"X-Request-Id": "t1"})).status == 200
    await written(worker, 1)
    for path in ("/_vespa/logs", "/_vespa/logs/t1"):
        assert (await fetch(client, path, token=None))[0] == 401
        assert (await fetch(client, path, token="wrong"))[0] == 401
        assert (await fetch(client, path, token=TOKEN[:-1]))[0] == 401
        assert (await fetch(client, path))[0] == 200
    # no token configured: the routes are off whatever the client sends
    plain, _ = await make_worker(VESPA_REQUEST_LOG_DIR=str(worker.recorder.directory))
    status, body = await fetch(plain, "/_vespa/logs")
    assert status == 403 and "VESPA_LOGS_TOKEN" in body["error"]
    # token but no records
    norecords, _ = await make_worker(VESPA_LOGS_TOKEN=TOKEN)
    status, body = await fetch(norecords, "/_vespa/logs")
    assert status == 404 and "VESPA_REQUEST_LOG_DIR" in body["error"]


async def test_old_records_are_removed_on_the_cleanup_interval(recording, tmp_path):
    directory = tmp_path / "records"
    directory.mkdir()
    old = directory / f"{time.time_ns() - 10**13:020d}-old.json"
    old.write_text("{}")
    two_hours_ago = time.time() - 7200
    os.utime(old, (two_hours_ago, two_hours_ago))
    foreign = directory / "notes.txt"
    foreign.write_text("not a record")
    os.utime(foreign, (two_hours_ago, two_hours_ago))
    client, worker = await recording(VESPA_REQUEST_LOG_RETENTION_HOURS="1",
                                     VESPA_REQUEST_LOG_CLEANUP_INTERVAL_SECONDS="0.2")
    assert (await client.get("/echo/new", headers={"X-Request-Id": "new"})).status == 200
    await written(worker, 1)
    await wait_until(lambda: not old.exists(), timeout=5)
    assert foreign.exists()
    assert (await fetch(client, "/_vespa/logs/new"))[0] == 200


async def test_signed_requests_are_recorded_with_the_signature_redacted(fleet, tmp_path):
    f = await fleet("full", VESPA_REQUEST_LOG_DIR=str(tmp_path), VESPA_LOGS_TOKEN=TOKEN)
    await ready(f)
    auth_data = f.auth_data(await f.route(cost=12))
    assert (await f.post("/echo/signed", auth_data, {"prompt": "hi"})).status == 200
    await wait_until(lambda: f.worker.recorder.written >= 1)
    async with f.session.get(f.url + "/_vespa/logs?limit=1",
                             headers={"x-vespa-logs-token": TOKEN}) as response:
        [summary] = (await response.json())["records"]
    async with f.session.get(f.url + f"/_vespa/logs/{summary['id']}",
                             headers={"x-vespa-logs-token": TOKEN}) as response:
        record = await response.json()
    assert record["path"] == "/echo/signed"
    assert record["request"]["body"]["json"] == {"prompt": "hi"}
    assert record["extra"]["auth_data"]["signature"] == "[redacted]"
    assert record["extra"]["auth_data"]["request_idx"] == auth_data["request_idx"]
    assert auth_data["signature"] not in json.dumps(record)


async def test_a_zero_body_cap_keeps_headers_and_metadata_only(recording):
    client, worker = await recording(VESPA_REQUEST_LOG_MAX_BODY_BYTES="0")
    assert (await client.post("/echo/z", json={"a": 1},
                              headers={"X-Request-Id": "zero"})).status == 200
    await written(worker, 1)
    _, record = await fetch(client, "/_vespa/logs/zero")
    headers = {name.lower(): value for name, value in record["response"]["headers"]}
    assert headers["x-backend"] == "echo" and headers["x-request-id"] == "zero"
    for side in ("request", "response"):
        body = record[side]["body"]
        assert "json" not in body and not body.get("text"), body


async def test_a_signature_in_the_query_is_redacted_even_when_the_request_is_refused(fleet,
                                                                                    tmp_path):
    f = await fleet("full", VESPA_REQUEST_LOG_DIR=str(tmp_path), VESPA_LOGS_TOKEN=TOKEN)
    await ready(f)
    query = ("serverless_cost=abc&serverless_signature=SIGNATURE-BYTES&serverless_reqnum=1"
             "&keep=1")
    async with f.session.get(f"{f.url}/echo/q?{query}",
                             headers={"X-Request-Id": "sig"}) as response:
        assert response.status == 422  # the cost is not a number
    await wait_until(lambda: f.worker.recorder.written >= 1)
    async with f.session.get(f.url + "/_vespa/logs/sig",
                             headers={"x-vespa-logs-token": TOKEN}) as response:
        record = await response.json()
    assert "SIGNATURE-BYTES" not in json.dumps(record)
    assert "serverless_signature=[redacted]" in record["query"] and "keep=1" in record["query"]


async def test_a_lone_surrogate_in_a_body_keeps_its_record(recording):
    """JSON may escape a lone surrogate, which has no UTF-8: the record keeps it as the escape."""
    client, worker = await recording()
    response = await client.post("/echo/s", data=b'{"text": "\\ud800 and h\xc3\xa9llo"}',
                                 headers={"Content-Type": "application/json",
                                          "X-Request-Id": "lone"})
    assert response.status == 200
    await written(worker, 1)
    assert worker.recorder.failures == 0
    status, record = await fetch(client, "/_vespa/logs/lone")
    assert status == 200
    assert record["request"]["body"]["json"] == {"text": "\ud800 and héllo"}


async def test_a_request_refused_before_its_signature_is_kept_as_metadata_only(fleet, tmp_path):
    """Issue #17 item 8: what anyone may send (a 401-bound request) never fills the disk with
    its headers and body: the record keeps what happened, not what was sent."""
    f = await fleet("full", VESPA_REQUEST_LOG_DIR=str(tmp_path), VESPA_LOGS_TOKEN=TOKEN)
    await ready(f)
    forged = dict(f.auth_data(await f.route()), signature="AAAA")
    async with f.session.post(f"{f.url}/echo", json={"auth_data": forged,
                                                     "payload": {"big": "x" * 5000}},
                              headers={"X-Request-Id": "forged", "X-Junk": "y" * 500}) as answer:
        assert answer.status == 401
    await wait_until(lambda: f.worker.recorder.written >= 1)
    async with f.session.get(f.url + "/_vespa/logs/forged",
                             headers={"x-vespa-logs-token": TOKEN}) as response:
        record = await response.json()
    assert record["status"] == 401 and record["outcome"] == "refused"
    assert "x" * 100 not in json.dumps(record) and "y" * 100 not in json.dumps(record)
    assert record["request"]["headers"] == []


async def test_records_take_at_most_their_disk_limit_the_oldest_going_first(recording, tmp_path):
    client, worker = await recording(VESPA_REQUEST_LOG_MAX_BYTES="20000",
                                     VESPA_REQUEST_LOG_MAX_PER_SECOND="0")
    # the writer's CPU share (2 % of a core) would skip records on a slow or busy machine, and
    # this test would wait for them in vain: that budget is test_records' (a share of 0)
    worker.recorder.cpu.share = None
    for n in range(40):
        async with client.post("/echo", json={"n": n, "pad": "p" * 600},
                               headers={"X-Request-Id": f"r{n:02d}"}) as response:
            assert response.status == 200
    await written(worker, 40)
    on_disk = [entry for entry in os.scandir(worker.recorder.directory)
               if entry.name.endswith(".json")]
    assert sum(entry.stat().st_size for entry in on_disk) <= 20000
    assert worker.recorder.removed_over_disk > 0
    names = sorted(entry.name for entry in on_disk)
    assert names[-1].endswith("-r39.json")  # the newest is kept
