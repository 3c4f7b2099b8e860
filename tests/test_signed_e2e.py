"""Signed requests end to end: the autoscaler emulator routes and signs, the worker verifies,
proxies and reports; what the emulator received is checked against what the clients saw."""

from __future__ import annotations

import asyncio
import json
from urllib.parse import urlencode

import pytest

from .conftest import wait_until
from .fleet import Fleet, all_reported, fleet, ready  # noqa: F401  (fixture)
from .test_auth import spellings


@pytest.mark.parametrize("scheme", ["full", "url", "legacy"])
async def test_signed_request_through_the_emulator(fleet, scheme):
    f = await fleet(scheme)
    await ready(f)
    route = await f.route(cost=42)
    assert route["url"] == f.url
    response = await f.post("/echo/chat", f.auth_data(route), {"prompt": "héllo", "n": 1})
    assert response.status == 200
    seen = await response.json()
    assert json.loads(seen["body_text"]) == {"prompt": "héllo", "n": 1}
    assert seen["path"] == "/echo/chat"
    await wait_until(lambda: route["request_idx"] in f.emulator.deleted_request_idxs())
    assert f.emulator.validation_errors == []


async def test_a_legacy_request_without_request_idx_is_served_and_counted(fleet):
    """A 2024 autoscaler signs (cost, endpoint, reqnum, url) and sends no request_idx: the
    request is served and counted as load; there is no record to delete for it."""
    f = await fleet("legacy")
    await ready(f)
    auth_data = f.auth_data(await f.route(cost=42))
    del auth_data["request_idx"]
    response = await f.post("/echo", auth_data, {"n": 1})
    assert response.status == 200, await response.text()
    await wait_until(lambda: sum(r["cur_perf"] for r in f.emulator.reports) == 42)
    assert f.worker.ledger.totals.outcomes["success"] == 1
    assert not f.worker.ledger.outbox
    assert f.emulator.validation_errors == []


async def test_a_signed_request_turned_away_for_overload_is_told_to_route_again(fleet):
    """Its signature is spent (a replay is refused): the 429 says to route it again."""
    f = await fleet("full", VESPA_MAX_THROUGHPUT="1", VESPA_MAX_WAIT_TIME="1")
    await ready(f)
    routes = [f.auth_data(await f.route(cost=5)) for _ in range(2)]
    slow = asyncio.gather(*(f.post("/hang", auth_data, {}) for auth_data in routes))
    # each counts for at most 1 s of work (max wait x throughput): two fill the line
    await wait_until(lambda: len(f.worker.ledger.in_flight) == 2)
    response = await f.post("/echo", f.auth_data(await f.route(cost=5)), {})
    assert response.status == 429 and response.headers["Retry-After"]
    assert "through the autoscaler's /route/" in (await response.json())["error"]
    slow.cancel()
    await asyncio.gather(slow, return_exceptions=True)


@pytest.mark.parametrize("field,value", [
    ("cost", 43), ("cost", 42.0), ("endpoint", "other"), ("reqnum", 999999),
    ("request_idx", 123456), ("url", "http://127.0.0.1:1"), ("signature", "AAAA"),
])
async def test_every_tampered_field_is_refused(fleet, field, value):
    f = await fleet("full")
    await ready(f)
    auth_data = f.auth_data(await f.route(cost=42))
    auth_data[field] = value
    response = await f.post("/echo", auth_data, {"x": 1})
    assert response.status == 401
    assert (await response.json())["error"]
    assert f.backend.log.requests == []


async def test_request_signed_for_another_worker_is_refused(fleet):
    f = await fleet("full")
    await ready(f)
    auth_data = f.emulator.signer.auth_data("http://10.0.0.9:40000", cost=5)
    response = await f.post("/echo", auth_data, {})
    assert response.status == 401
    assert "another worker" in (await response.json())["error"]


async def test_replay_is_refused_and_bad_signatures_are_not_load(fleet):
    f = await fleet("full")
    await ready(f)
    auth_data = f.auth_data(await f.route(cost=30))
    assert (await f.post("/echo", auth_data, {"n": 1})).status == 200
    replay = await f.post("/echo", auth_data, {"n": 1})
    assert replay.status == 401
    assert "replayed" in (await replay.json())["error"]
    forged = dict(f.auth_data(await f.route(cost=30)), cost=31)
    assert (await f.post("/echo", forged, {})).status == 401
    await all_reported(f)
    assert f.worker.ledger.totals.received == 1
    assert f.emulator.deleted_request_idxs() == [auth_data["request_idx"]]
    assert sum(r["rej_load"] for r in f.emulator.reports) == 0
    assert sum(r["new_load"] for r in f.emulator.reports) == 30


async def test_a_replay_in_another_base64_spelling_is_refused_and_reported_once(fleet):
    """Issue #17: base64 ignores the unused low bits of the last character, so one signature
    has 16 spellings; keyed on the text, the replay window served (and reported) each once."""
    f = await fleet("full")
    await ready(f)
    auth_data = f.auth_data(await f.route(cost=30))
    statuses = []
    for text in spellings(auth_data["signature"]):
        response = await f.post("/echo", dict(auth_data, signature=text), {"n": 1})
        statuses.append(response.status)
    assert sorted(statuses) == [200] + [401] * 15
    await all_reported(f)
    assert f.worker.ledger.totals.received == 1
    assert f.emulator.deleted_request_idxs() == [auth_data["request_idx"]]
    assert len(f.backend.log.requests) == 1


async def test_get_with_query_auth_keeps_other_parameters(fleet):
    f = await fleet("full")
    await ready(f)
    route = await f.route(cost=100.0)
    query = {f"serverless_{k}": v for k, v in f.auth_data(route).items()}
    url = f"{f.url}/echo/models?limit=5&" + urlencode(query) + "&q=a%20b"
    async with f.session.get(url) as response:
        assert response.status == 200
        seen = await response.json()
    assert seen["raw_path"] == "/echo/models?limit=5&q=a%20b"


async def test_envelope_errors_are_422_with_one_message_per_field(fleet):
    f = await fleet("full")
    await ready(f)
    response = await f.post("/echo", {"cost": "x", "reqnum": 1}, {})
    assert response.status == 422
    problems = (await response.json())["problems"]
    assert "auth_data.cost must be a finite number >= 0" in problems
    assert "auth_data.signature is missing" in problems
    assert len(problems) == 4  # endpoint, signature, url missing; cost mistyped
    not_json = await f.session.post(f"{f.url}/echo", data=b"plain text")
    assert not_json.status == 422
    assert "not JSON" in (await not_json.json())["error"]


async def test_a_lone_surrogate_in_the_payload_reaches_the_backend_as_sent(fleet, caplog):
    """JSON can escape a lone surrogate ("\\ud800"), which has no UTF-8: the payload goes on
    with that same escape (the rest as UTF-8, as ever), not as a 500 with a traceback."""
    f = await fleet("full")
    await ready(f)
    route = await f.route()
    payload = {"prompt": "\ud800 then h\u00e9llo", "\udfff": ["😀"]}
    response = await f.post("/echo", f.auth_data(route), payload)
    assert response.status == 200, await response.text()
    body = (await response.json())["body_text"]
    assert json.loads(body) == payload
    assert "\\ud800 then h" in body and "\\udfff" in body  # as the client wrote them
    await wait_until(lambda: route["request_idx"] in f.emulator.deleted_request_idxs())
    assert [d["success"] for d in f.emulator.deleted] == [True]
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


async def test_public_key_server_down_at_start_then_up(fleet, caplog):
    f = await fleet("full", pubkey_down=True)
    await wait_until(lambda: f.worker.state.phase.value == "benchmarking", timeout=10)
    await wait_until(lambda: "public key from" in caplog.text and "HTTP 500" in caplog.text,
                     timeout=10)  # it asked for the key and was refused
    auth_data = f.emulator.signer.auth_data(f.url, cost=5)
    refused = await f.post("/echo", auth_data, {})
    assert refused.status == 503
    assert "public key" in (await refused.json())["error"]
    assert not f.worker.state.ready
    async with f.session.get(f"{f.url}/_vespa/readyz") as readyz:
        assert readyz.status == 503
    assert all(r["max_perf"] == 0 for r in f.emulator.reports)
    f.emulator.fail_pubkey = False
    await wait_until(lambda: f.worker.state.ready, timeout=10)
    auth_data = f.emulator.signer.auth_data(f.url, cost=5)
    assert (await f.post("/echo", auth_data, {})).status == 200


async def test_failed_benchmark_is_reported_as_error_and_keeps_reporting(fleet, tmp_path,
                                                                        monkeypatch):
    (tmp_path / "broken_bench.py").write_text(
        "async def benchmark(url, session):\n    raise RuntimeError('GPU fell off')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    f = await fleet("full", VESPA_MAX_THROUGHPUT="", VESPA_BENCHMARK="broken_bench:benchmark",
                    VESPA_CACHE_DIR=str(tmp_path / "cache"), VESPA_REPORT_MAX_INTERVAL="0.2")
    await wait_until(lambda: any(r["error_msg"] for r in f.emulator.reports), timeout=10)
    errors = [r["error_msg"] for r in f.emulator.reports if r["error_msg"]]
    assert "GPU fell off" in errors[0]
    assert all(r["max_perf"] == 0 for r in f.emulator.reports)
    count = len(errors)
    await wait_until(lambda: len([r for r in f.emulator.reports if r["error_msg"]]) > count + 1,
                     timeout=5)
    assert not (tmp_path / "cache" / "benchmark.json").exists()
    async with f.session.get(f"{f.url}/_vespa/readyz") as readyz:
        assert readyz.status == 503
        assert "GPU fell off" in (await readyz.json())["error"]


async def test_benchmark_result_is_used_and_cached(fleet, tmp_path, monkeypatch):
    (tmp_path / "counting_bench.py").write_text(
        "calls = 0\nasync def benchmark(url, session):\n"
        "    global calls\n    calls += 1\n"
        "    async with session.get('/health') as r:\n        assert r.status == 200\n"
        "    return 123.5\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    env = dict(VESPA_MAX_THROUGHPUT="", VESPA_BENCHMARK="counting_bench:benchmark",
               VESPA_CACHE_DIR=str(tmp_path / "cache"), MODEL_NAME="model-a")
    first = await fleet("full", **env)
    await ready(first)
    assert first.worker.admission.max_throughput == 123.5
    assert max(r["max_perf"] for r in first.emulator.reports) == 123.5
    import counting_bench
    second = await fleet("full", **env)
    await ready(second)
    assert counting_bench.calls == 1  # the second worker read the cache
    third = await fleet("full", **{**env, "MODEL_NAME": "model-b"})
    await ready(third)
    assert counting_bench.calls == 2  # another model measures again


ENDPOINT_KEY = "endpoint-key-0123456789abcdef"


@pytest.mark.parametrize("scheme", ["full", "url"])
async def test_the_endpoint_key_never_reaches_the_backend_a_log_or_a_record(
        fleet, backend, scheme, caplog, tmp_path):
    """Vast's client sends its endpoint key as ``?api_key=`` and ``Authorization: Bearer``: the
    key spends the endpoint owner's money. The backend gets neither; the access log and the
    request record show no key; the other query parameters pass byte for byte."""
    caplog.set_level("INFO", logger="vespa.access")
    f = await fleet(scheme, VESPA_LOG_LEVEL="DEBUG", VESPA_REQUEST_LOG_DIR=str(tmp_path),
                    VESPA_LOGS_TOKEN="logs-token-for-the-test")
    await ready(f)
    auth_data = f.auth_data(await f.route(cost=5))
    response = await f.session.post(
        f"{f.url}/echo/chat?stream=1&api_key={ENDPOINT_KEY}&x=%20y",
        json={"auth_data": auth_data, "payload": {"n": 1}},
        headers={"Authorization": f"Bearer {ENDPOINT_KEY}", "X-Other": "kept"})
    assert response.status == 200, await response.text()
    seen = backend.log.requests[-1]
    assert seen["raw_path"] == "/echo/chat?stream=1&x=%20y"
    assert ("X-Other", "kept") in [tuple(pair) for pair in seen["headers"]]
    assert ENDPOINT_KEY not in json.dumps(seen)
    assert "authorization" not in {name.lower() for name, _ in seen["headers"]}
    await wait_until(lambda: f.worker.recorder.written >= 1)
    records = await f.session.get(f"{f.url}/_vespa/logs?limit=5",
                                  headers={"x-vespa-logs-token": "logs-token-for-the-test"})
    listed = await records.json()
    one = await f.session.get(f"{f.url}/_vespa/logs/{listed['records'][0]['id']}",
                              headers={"x-vespa-logs-token": "logs-token-for-the-test"})
    assert ENDPOINT_KEY not in await one.text()
    access = [r.getMessage() for r in caplog.records if r.name == "vespa.access"]
    assert access and not any(ENDPOINT_KEY in line for line in access)


async def test_in_dev_mode_the_key_passes_but_is_never_logged(make_worker, backend, caplog):
    """Unsecured, the request is the backend's as it is; the access log still hides the key."""
    caplog.set_level("INFO", logger="vespa.access")
    client, worker = await make_worker(VESPA_LOG_LEVEL="DEBUG")
    response = await client.get(f"/echo?api_key={ENDPOINT_KEY}&token=t0ken-secret-value")
    assert response.status == 200
    assert backend.log.requests[-1]["query_string"] == \
        f"api_key={ENDPOINT_KEY}&token=t0ken-secret-value"
    access = [r.getMessage() for r in caplog.records if r.name == "vespa.access"]
    assert access and not any(ENDPOINT_KEY in line or "t0ken" in line for line in access)


async def test_signatures_that_verify_under_no_scheme_are_logged_once_a_minute(fleet, caplog):
    """vast-cli#493: production signatures that match no documented message. The operator gets
    one line a minute (not one per request) saying how many since the line before, with the
    schemes tried and the key's fingerprint."""
    caplog.set_level("WARNING", logger="vespa.auth")
    f = await fleet("full")
    await ready(f)

    async def tampered() -> None:
        auth_data = f.auth_data(await f.route(cost=5))
        auth_data["endpoint"] = "tampered"  # the signature matches no message any more
        assert (await f.post("/echo", auth_data, {})).status == 401

    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.name == "vespa.auth"]

    for _ in range(3):
        await tampered()
    assert len(lines()) == 1, lines()
    assert lines()[0].startswith("1 signed request(s) since the last such line ")
    fingerprint = f.worker.keyring.key.fingerprint
    assert fingerprint.startswith("sha256:") and fingerprint in lines()[0]
    assert "full, url, legacy" in lines()[0]
    malformed = dict(f.auth_data(await f.route(cost=5)), signature="not base64!")
    assert (await f.post("/echo", malformed, {})).status == 401
    assert len(lines()) == 1, lines()
    f.worker.doorway.alarm.throttle.next_at = 0.0  # a minute later
    await tampered()
    # the two held back and this one; a malformed signature is no mismatch
    assert len(lines()) == 2, lines()
    assert lines()[1].startswith("3 signed request(s) since the last such line ")
    assert fingerprint in lines()[1] and "full, url, legacy" in lines()[1]
    await tampered()
    assert len(lines()) == 2, lines()


async def test_one_request_cannot_claim_more_work_than_the_worker_queues(fleet):
    """Under url-only signatures the cost is the client's word: a cost of 1e9 counts for at
    most max wait × throughput, so it neither blocks every later request (429 for 10^6 s) nor
    inflates what the autoscaler is told by orders of magnitude."""
    f = await fleet("url", VESPA_MAX_THROUGHPUT="1000", VESPA_MAX_WAIT_TIME="10")
    await ready(f)
    greedy = dict(f.auth_data(await f.route(cost=5)), cost=1e9)  # url-only: not signed
    hanging = asyncio.create_task(f.post("/hang", greedy, {}))
    await wait_until(lambda: f.worker.ledger.in_flight)
    assert f.worker.admission.workload == 10_000
    response = await f.post("/echo", f.auth_data(await f.route(cost=5)), {})
    assert response.status == 200, await response.text()
    await wait_until(lambda: any(r["cur_load"] >= 10_000 for r in f.emulator.reports))
    assert max(r["cur_load"] for r in f.emulator.reports) <= 10_005
    hanging.cancel()
    await asyncio.gather(hanging, return_exceptions=True)
