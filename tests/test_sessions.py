"""Sessions as Vast's client uses them, end to end through the emulator and a signed worker:
create, requests in the session, end (and on_close), get, health, expiry, drain, the limit, and
what the autoscaler is told: the session is one request_idx, in flight from create to end, with
one delete record. The pure session core is tested at the end."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import math

import aiohttp
import pytest

from vespa.corridor.sessions import (ID_LENGTH, SessionInputError, SessionPlan, Sessions,
                                     close_body, plan_from, same_auth)
from vespa.corridor.ledger import Entry
from vespa.corridor.refusal import Reason

from .conftest import free_port, wait_until
from .fleet import Fleet, all_reported, fleet, ready  # noqa: F401  (fixture)


async def create(f: Fleet, cost: float = 50, **plan) -> tuple[aiohttp.ClientResponse, dict]:
    """POST /session/create as Vast's client does: a routed, signed envelope."""
    route = await f.route(cost=cost)
    auth_data = dict(f.auth_data(route), __request_id="r-1")
    response = await f.session.post(f"{f.url}/session/create?api_key=",
                                    json={"auth_data": auth_data, "session_id": None,
                                          "payload": plan})
    return response, auth_data


async def in_session(f: Fleet, auth_data: dict, session_id: str, path: str = "/echo/s",
                     payload: dict | None = None) -> aiohttp.ClientResponse:
    return await f.session.post(f"{f.url}{path}", json={
        "auth_data": auth_data, "session_id": session_id, "payload": payload or {"n": 1}})


async def call(f: Fleet, route: str, body: dict, url: str | None = None
               ) -> aiohttp.ClientResponse:
    return await f.session.post(f"{url or f.url}/session/{route}?api_key=", json=body,
                                headers={"Authorization": "Bearer "})


async def test_a_session_lives_from_create_to_end_as_one_request_idx(fleet, backend):
    f = await fleet("url")
    await ready(f)
    response, auth_data = await create(f, lifetime=30, on_close_route="/echo/closed",
                                       on_close_payload={"k": 1})
    assert response.status == 201, await response.text()
    created = await response.json()
    session_id = created["session_id"]
    assert len(session_id) == ID_LENGTH and session_id.isalnum()
    assert created["expiration"] > 0
    idx = auth_data["request_idx"]
    await wait_until(lambda: any(idx in r["working_request_idxs"] and r["cur_load"] >= 50
                                 for r in f.emulator.reports))

    for n in range(3):  # the same auth data each time, as Vast's client sends it
        answer = await in_session(f, auth_data, session_id, payload={"n": n})
        assert answer.status == 200, await answer.text()
        assert json.loads((await answer.json())["body_text"]) == {"n": n}

    got = await call(f, "get", {"session_id": session_id, "session_auth": auth_data})
    assert got.status == 200
    described = await got.json()
    assert described["auth_data"] == auth_data and described["lifetime"] == 30
    assert described["on_close_route"] == "/echo/closed"
    health = await call(f, "health", {"session_id": session_id, "session_auth": auth_data})
    assert await health.json() == {"ok": True}
    assert f.emulator.deleted_request_idxs() == []  # nothing reported one by one

    ended = await call(f, "end", {"session_id": session_id, "session_auth": auth_data})
    assert ended.status == 200
    assert await ended.json() == {"ended": True, "removed_session": session_id}
    await wait_until(lambda: any(r["path"] == "/echo/closed" for r in backend.log.requests))
    closed = next(r for r in backend.log.requests if r["path"] == "/echo/closed")
    assert json.loads(closed["body_text"]) == {"k": 1, "session_id": session_id}
    await wait_until(lambda: f.emulator.deleted_request_idxs() == [idx])
    record = f.emulator.deleted[0]
    assert record["success"] is True
    assert not f.worker.ledger.in_flight

    after = await in_session(f, auth_data, session_id)
    assert after.status == 410
    assert "invalid session" in (await after.json())["error"]
    again = await call(f, "end", {"session_id": session_id, "session_auth": auth_data})
    assert again.status == 410
    gone = await call(f, "health", {"session_id": session_id, "session_auth": auth_data})
    assert await gone.json() == {"ok": False}
    status = await (await f.session.get(f"{f.url}/_vespa/status")).json()
    assert status["sessions"]["open"] == 0 and status["sessions"]["ended"]["ended"] == 1
    assert f.emulator.validation_errors == []


async def test_session_calls_refuse_what_they_must(fleet):
    f = await fleet("url")
    await ready(f)
    response, auth_data = await create(f, lifetime=30)
    session_id = (await response.json())["session_id"]
    wrong = dict(auth_data, signature="x" + auth_data["signature"][1:])
    for route in ("end", "get", "health"):
        assert (await call(f, route, {"session_id": session_id, "session_auth": wrong})
                ).status == 401
        assert (await call(f, route, {"session_auth": auth_data})).status == 422
    assert (await call(f, "end", {"session_id": "nosuchsession", "session_auth": auth_data})
            ).status == 400
    assert (await call(f, "get", {"session_id": "nosuchsession", "session_auth": auth_data})
            ).status == 400
    unknown = await in_session(f, auth_data, "nosuchsession")
    assert unknown.status == 410
    for lifetime in (0, -1, "a minute", 86_401, 1e400):
        bad, _ = await create(f, lifetime=lifetime)
        assert bad.status == 422, lifetime
    assert (await create(f, lifetime=1, on_close_route="http://elsewhere/"))[0].status == 422
    route = await f.route(cost=5)
    forged = dict(f.auth_data(route), signature=f.auth_data(route)["signature"][::-1])
    unsigned = await f.session.post(f"{f.url}/session/create",
                                    json={"auth_data": forged, "payload": {"lifetime": 5}})
    assert unsigned.status == 401  # beyond Vast's worker: create is checked
    assert len(f.worker.sessions.open) == 1


async def test_the_session_limit_answers_429_counted_as_rejected(fleet):
    f = await fleet("url", VESPA_MAX_SESSIONS="2")
    await ready(f)
    for _ in range(2):
        assert (await create(f))[0].status == 201
    response, auth_data = await create(f, cost=7)
    assert response.status == 429 and response.headers["Retry-After"]
    assert "VESPA_MAX_SESSIONS" in (await response.json())["error"]
    assert f.worker.metrics.rejections[Reason.SESSION_LIMIT] == 1
    await wait_until(lambda: auth_data["request_idx"] in f.emulator.deleted_request_idxs())
    record = next(r for r in f.emulator.deleted if r["request_idx"] == auth_data["request_idx"])
    assert record["success"] is False
    await wait_until(lambda: sum(r["rej_load"] for r in f.emulator.reports) >= 7)


async def test_a_session_call_the_worker_fails_on_is_counted_as_a_500(fleet):
    f = await fleet("url")
    await ready(f)
    response, auth_data = await create(f, on_close_route="/echo/closed")
    session_id = (await response.json())["session_id"]

    def broken_on_close(route: str, body: dict):
        raise RuntimeError("a bug in the worker")

    f.worker.desk.on_close = broken_on_close
    ended = await call(f, "end", {"session_id": session_id, "session_auth": auth_data})
    assert ended.status == 500
    assert {key: n for key, n in f.worker.metrics.requests.items() if key[2] >= 500} == {
        ("POST", "other", 500): 1}


async def test_an_expired_session_is_ended_by_the_sweep(fleet, backend):
    f = await fleet("url")
    await ready(f)
    response, auth_data = await create(f, lifetime=0.3, on_close_route="/echo/expired")
    session_id = (await response.json())["session_id"]
    await wait_until(lambda: auth_data["request_idx"] in f.emulator.deleted_request_idxs(),
                     timeout=5)
    assert any(r["path"] == "/echo/expired" for r in backend.log.requests)
    assert f.worker.sessions.ends["expired"] == 1
    assert (await in_session(f, auth_data, session_id)).status == 410


async def test_a_request_extends_its_session(fleet):
    f = await fleet("url")
    await ready(f)
    response, auth_data = await create(f, lifetime=1.5)
    session_id = (await response.json())["session_id"]
    for _ in range(4):  # 2 s in all, past the first lifetime
        await asyncio.sleep(0.5)
        assert (await in_session(f, auth_data, session_id)).status == 200
    assert session_id in f.worker.sessions.open


async def test_ending_a_session_cuts_its_requests_in_flight(fleet, backend):
    f = await fleet("url")
    await ready(f)
    response, auth_data = await create(f, lifetime=30)
    session_id = (await response.json())["session_id"]
    hanging = asyncio.create_task(in_session(f, auth_data, session_id, path="/hang"))
    await wait_until(lambda: f.worker.sessions.open[session_id].requests)
    ended = await call(f, "end", {"session_id": session_id, "session_auth": auth_data})
    assert ended.status == 200
    with pytest.raises(aiohttp.ClientError):
        await asyncio.wait_for(hanging, 5)
    await asyncio.wait_for(backend.log.cancel_seen.wait(), 5)  # the backend's work stopped
    await wait_until(lambda: f.worker.ledger.totals.outcomes["cancelled"] == 1)


async def test_the_drain_ends_every_session_with_its_record(fleet):
    f = await fleet("url")
    await ready(f)
    ids = []
    for _ in range(2):
        response, auth_data = await create(f)
        ids.append(auth_data["request_idx"])
    late = f.auth_data(await f.route(cost=5))  # routed before the drain, sent after it
    await f.worker.drain()
    assert f.worker.sessions.ends["drained"] == 2
    await wait_until(lambda: set(ids) <= set(f.emulator.deleted_request_idxs()))
    refused = await f.session.post(f"{f.url}/session/create",
                                   json={"auth_data": late, "payload": {"lifetime": 5}})
    assert refused.status == 503
    assert not f.worker.sessions.open


async def test_on_close_calls_still_waiting_at_shutdown_are_cancelled_before_the_session_closes(
        fleet, backend, caplog):
    """Five sessions expire with an on_close_route the backend never answers: four calls hang
    there, the fifth waits for a slot. Stopping cancels what is still waiting before the HTTP
    session closes, so no call runs on under a closed session (the fifth raised "Session is
    closed" in a task nobody awaited, logged at ERROR when collected)."""
    f = await fleet("url")
    await ready(f)
    for _ in range(5):
        assert (await create(f, lifetime=0.2, on_close_route="/hang"))[0].status == 201
    await wait_until(lambda: len(backend.log.hanging) == 4, what="four on_close calls hanging")
    assert len(f.worker.closing) == 5
    await f.server.close()  # the worker's stop: on_close calls get a second, then no more
    assert not f.worker.closing
    gc.collect()  # a task's exception nobody retrieved is logged when it is collected
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []
    assert "5 session on_close_route call(s) still waiting at shutdown" in caplog.text


async def test_the_session_port_serves_session_end_only(fleet):
    port = free_port()
    f = await fleet("url", VESPA_WORKER_HTTP_PORT=str(port))
    await ready(f)
    response, auth_data = await create(f)
    session_id = (await response.json())["session_id"]
    plain = f"http://127.0.0.1:{port}"
    other = await f.session.post(f"{plain}/session/get",
                                 json={"session_id": session_id, "session_auth": auth_data})
    assert other.status == 404
    ended = await call(f, "end", {"session_id": session_id, "session_auth": auth_data}, plain)
    assert ended.status == 200
    assert session_id not in f.worker.sessions.open


# -- the pure core ---------------------------------------------------------------------------
def test_a_plan_is_read_strictly():
    assert plan_from({}) == SessionPlan(60.0, None, None)
    assert plan_from({"lifetime": 5, "on_close_route": "/x", "on_close_payload": [1]}) == \
        SessionPlan(5.0, "/x", [1])
    assert plan_from({"lifetime": 5, "on_close_payload": {"dropped": True}}).on_close_payload \
        is None  # no route: nothing to send it to
    for bad in ({"lifetime": 0}, {"lifetime": math.nan}, {"lifetime": True},
                {"lifetime": 86_400.5}, {"on_close_route": "x"}, [], "60"):
        with pytest.raises(SessionInputError):
            plan_from(bad)


def test_sessions_end_once_and_remember_ended_ids():
    sessions = Sessions(limit=2)
    one = sessions.create({"a": 1}, SessionPlan(10), Entry(1.0, 1, 0.0), now=100.0)
    two = sessions.create({"a": 2}, SessionPlan(1), Entry(1.0, 2, 0.0), now=100.0)
    assert sessions.full and one.session_id != two.session_id
    assert sessions.expired(100.5) == [] and sessions.expired(101.0) == [two.session_id]
    Sessions.extend(two, now=100.9)
    assert two.expiration == pytest.approx(101.9)
    Sessions.extend(two, now=100.0)  # never shortened
    assert two.expiration == pytest.approx(101.9)
    assert sessions.end(one.session_id, "ended") is one
    assert sessions.end(one.session_id, "ended") is None
    assert sessions.was_ended(one.session_id) and not sessions.was_ended("other")
    assert sessions.ends == {"ended": 1, "expired": 0, "drained": 0}


def test_session_auth_and_the_close_body():
    assert same_auth({"b": 2, "a": 1}, {"a": 1, "b": 2})
    assert not same_auth({"a": 1}, {"a": 1, "b": 2}) and not same_auth(None, {})
    sessions = Sessions(limit=1)
    session = sessions.create({}, SessionPlan(5, "/c", "text"), Entry(1.0, 1, 0.0), now=0.0)
    assert close_body(session) == {"payload": "text", "session_id": session.session_id}


# -- found by a review: each fails without its fix --------------------------------------------
async def test_a_blocked_request_in_a_session_gives_the_session_no_second_record(fleet):
    f = await fleet("url", VESPA_BLOCKED_PATHS="/admin*")
    await ready(f)
    response, auth_data = await create(f, lifetime=30)
    session_id = (await response.json())["session_id"]
    assert (await in_session(f, auth_data, session_id, path="/admin/x")).status == 403
    await call(f, "end", {"session_id": session_id, "session_auth": auth_data})
    idx = auth_data["request_idx"]
    await all_reported(f)  # a second record would have been delivered too
    assert f.emulator.deleted_request_idxs().count(idx) == 1
    assert f.emulator.deleted[0]["success"] is True


async def test_an_on_close_route_on_a_blocked_path_is_refused_at_create(fleet):
    f = await fleet("url", VESPA_BLOCKED_PATHS="/admin*")
    await ready(f)
    response, _ = await create(f, on_close_route="/admin/shutdown")
    assert response.status == 403 and "VESPA_BLOCKED_PATHS" in (await response.json())["error"]
    assert not f.worker.sessions.open


async def test_a_session_call_nested_too_deep_is_422_not_a_500(fleet):
    f = await fleet("url")
    await ready(f)
    async with f.session.post(f"{f.url}/session/get",
                              data=b"[" * 5000 + b"]" * 5000) as answer:
        assert answer.status == 422


async def test_a_session_does_not_expire_under_a_request_in_flight(fleet, backend):
    f = await fleet("url")
    await ready(f)
    response, auth_data = await create(f, lifetime=0.3)
    session_id = (await response.json())["session_id"]
    answer = await in_session(f, auth_data, session_id, path="/echo/slow?echo_delay=1.6")
    assert answer.status == 200  # 1.6 s, past its lifetime with the sweep going on: not cut
    await wait_until(lambda: f.worker.sessions.ends["expired"] == 1, timeout=5)


async def test_the_session_port_caps_connections_per_client(fleet):
    port = free_port()
    f = await fleet("url", VESPA_WORKER_HTTP_PORT=str(port), VESPA_MAX_CLIENT_CONNECTIONS="2")
    await ready(f)
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answer = await asyncio.wait_for(reader.read(), 5)
    assert answer.startswith(b"HTTP/1.1 429")
    writer.close()
    for _, w in held:
        w.close()
