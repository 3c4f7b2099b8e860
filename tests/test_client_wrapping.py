"""The client proxy's pure parts: workload estimates, the worker request, headers, backoff.

The worker's own envelope parser (``vespa.corridor.envelope``) reads back what the client wraps, so the
two ends of the protocol are checked against each other, not against a copy of the spec.
"""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings, strategies as st

from vespa.client.routing import backoff, describe_workers, error_detail, retryable
from vespa.client.wrapping import (CallerRequest, WrapError, build_worker_request,
                                   estimate_workload, forward_request_headers,
                                   read_caller_request, relay_response_headers, with_query_auth)
from vespa.corridor.envelope import open_body, open_query

ROUTE = {"cost": 100, "endpoint": "my-endpoint", "reqnum": 12, "request_idx": 34,
         "signature": "ab+/cd==", "url": "http://10.0.0.5:40000", "__request_id": "r-1"}
JSON = [("Content-Type", "application/json")]


def post(path: str, payload: object, headers=JSON) -> CallerRequest:
    return read_caller_request("POST", path, list(headers), json.dumps(payload).encode())


# -- workload ----------------------------------------------------------------------------------

@pytest.mark.parametrize("path,payload,expected", [
    ("/v1/chat/completions", {"max_tokens": 64}, 64),
    ("/v1/chat/completions", {"max_completion_tokens": 80, "max_tokens": 64}, 80),
    ("/v1/completions", {"max_tokens": 10, "n": 3}, 30),
    ("/generate", {"inputs": "hi", "parameters": {"max_new_tokens": 25}}, 25),
    ("/v1/audio/speech", {"input": "Hello there.", "voice": "a"}, 12),
    ("/synthesize", {"text": "Four"}, 4),
    ("/v1/audio/speech", {"input": ""}, 1),
    ("/v1/chat/completions", {"messages": []}, 100),
    ("/v1/chat/completions", {"max_tokens": True}, 100),
    ("/v1/embeddings", ["not", "a", "dict"], 100),
])
def test_workload_estimate(path, payload, expected):
    assert estimate_workload(post(path, payload), default=100.0) == expected


def test_cost_header_wins_and_is_checked():
    request = post("/v1/chat/completions", {"max_tokens": 64},
                   [*JSON, ("X-Serverless-Cost", "250.5")])
    assert estimate_workload(request, 100.0) == 250.5
    for bad in ("-1", "nan", "inf", "lots"):
        with pytest.raises(WrapError) as error:
            estimate_workload(post("/x", {}, [("x-serverless-cost", bad)]), 100.0)
        assert error.value.status == 400 and "X-Serverless-Cost" in error.value.message


def test_requests_without_a_body_use_the_default():
    request = read_caller_request("GET", "/v1/models?limit=5", [], b"")
    assert request.payload is None and request.path == "/v1/models"
    assert estimate_workload(request, 7.0) == 7.0


# -- the caller's body ---------------------------------------------------------------------------

def test_empty_body_is_an_empty_payload():
    assert read_caller_request("POST", "/reset", [], b"").payload == {}


@pytest.mark.parametrize("headers,body", [
    ([("Content-Type", "multipart/form-data; boundary=x")], b"--x\r\nfile\r\n--x--"),
    ([("Content-Type", "application/json"), ("Content-Encoding", "gzip")], b"\x1f\x8b..."),
    ([], b"\xff\xfe"),
])
def test_bodies_the_envelope_cannot_carry_are_415(headers, body):
    with pytest.raises(WrapError) as error:
        read_caller_request("POST", "/v1/audio/transcriptions", headers, body)
    assert error.value.status == 415 and "JSON" in error.value.message


# -- the worker request: both ends of the protocol -----------------------------------------------

def test_post_becomes_an_envelope_the_worker_opens():
    payload = {"model": "m", "messages": [{"role": "user", "content": "héllo"}]}
    request = build_worker_request(post("/v1/chat/completions?x=1", payload), ROUTE)
    assert request.method == "POST"
    assert request.url == "http://10.0.0.5:40000/v1/chat/completions?x=1"
    document = json.loads(request.body)
    assert set(document) == {"auth_data", "payload"}
    assert document["auth_data"] == {k: v for k, v in ROUTE.items() if k != "__request_id"}
    envelope = open_body(request.body, unsecured=False)
    assert json.loads(envelope.body) == payload
    assert envelope.cost == 100 and envelope.request_idx == 34
    assert ("Content-Type", "application/json") in request.headers


def test_get_carries_auth_in_the_query_and_keeps_the_callers():
    caller = read_caller_request("GET", "/v1/models?limit=5&q=a%20b", [], b"")
    request = build_worker_request(caller, ROUTE)
    assert request.body is None
    path_qs = request.url.removeprefix("http://10.0.0.5:40000")
    envelope = open_query(path_qs, unsecured=False)
    assert envelope.path_qs == "/v1/models?limit=5&q=a%20b"
    assert envelope.auth_data == {k: v for k, v in ROUTE.items() if k != "__request_id"}


@pytest.mark.parametrize("cost", [100, 100.0, 0.5, 12345678901])
def test_query_auth_keeps_the_json_type_of_numbers(cost):
    auth = dict(ROUTE, cost=cost)
    envelope = open_query(with_query_auth("/x", auth), unsecured=False)
    assert envelope.auth_data["cost"] == cost
    assert type(envelope.auth_data["cost"]) is type(cost)


@settings(max_examples=200, deadline=None)
@given(path=st.text(st.sampled_from("abz/-_.~%20"), max_size=20),
       query=st.lists(st.tuples(st.text("abcxyz", min_size=1, max_size=5),
                                st.text("ab1 &=+/?%", max_size=6)), max_size=4),
       signature=st.text(min_size=1, max_size=30),
       endpoint=st.text(min_size=1, max_size=20),
       cost=st.one_of(st.integers(0, 10**9), st.floats(0, 1e9, allow_nan=False)),
       request_idx=st.integers(0, 10**12))
def test_query_auth_round_trips_through_the_worker(path, query, signature, endpoint, cost,
                                                   request_idx):
    from urllib.parse import quote
    raw_query = "&".join(f"{k}={quote(v, safe='')}" for k, v in query)
    path_qs = "/" + path + ("?" + raw_query if raw_query else "")
    auth = {"cost": cost, "endpoint": endpoint, "reqnum": 1, "request_idx": request_idx,
            "signature": signature, "url": "https://1.2.3.4:5"}
    envelope = open_query(with_query_auth(path_qs, auth), unsecured=False)
    assert envelope.auth_data == auth
    assert envelope.path_qs == path_qs


# -- headers ------------------------------------------------------------------------------------

def test_request_headers_lose_hop_by_hop_ours_and_vast_keys():
    headers = [("Host", "127.0.0.1:8010"), ("Connection", "keep-alive, X-Private"),
               ("X-Private", "1"), ("Keep-Alive", "timeout=5"), ("TE", "trailers"),
               ("Transfer-Encoding", "chunked"), ("Upgrade", "h2c"), ("Content-Length", "10"),
               ("Proxy-Authorization", "Basic x"), ("X-Serverless-Cost", "5"),
               ("Authorization", "Bearer ENDPOINT-KEY"), ("X-Api-Key", "ACCOUNT-KEY"),
               ("Accept", "text/event-stream"), ("Accept-Encoding", "gzip"),
               ("X-Custom", "kept"), ("X-Custom", "twice")]
    kept = forward_request_headers(headers, ("ENDPOINT-KEY", "ACCOUNT-KEY"))
    assert kept == [("Accept", "text/event-stream"), ("Accept-Encoding", "gzip"),
                    ("X-Custom", "kept"), ("X-Custom", "twice")]


def test_callers_own_authorization_passes_when_it_is_no_vast_key():
    kept = forward_request_headers([("Authorization", "Bearer backend-token")], ("vast",))
    assert kept == [("Authorization", "Bearer backend-token")]


def test_response_headers_lose_hop_by_hop_and_report_the_length():
    headers = [("Content-Type", "audio/wav"), ("Content-Length", "1044"),
               ("Connection", "X-Hop"), ("X-Hop", "1"), ("Transfer-Encoding", "chunked"),
               ("Content-Encoding", "gzip"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")]
    kept, length = relay_response_headers(headers)
    assert length == 1044
    assert kept == [("Content-Type", "audio/wav"), ("Content-Encoding", "gzip"),
                    ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")]


# -- routing helpers -----------------------------------------------------------------------------

def test_backoff_is_jittered_exponential_and_capped():
    rng = random.Random(4)
    for attempt in range(12):
        ceiling = min(5.0, 0.5 * 2 ** attempt)
        for _ in range(50):
            assert ceiling / 2 <= backoff(attempt, 0.5, 5.0, rng) <= ceiling
    assert backoff(10_000, 0.5, 5.0, rng) <= 5.0


def test_route_retry_rules_and_messages():
    assert all(retryable(s) for s in (408, 429, 500, 502, 503, 504))
    assert not any(retryable(s) for s in (200, 400, 401, 403, 404))
    assert describe_workers({"ready": 0, "loading": 2}) == "0 ready, 2 loading"
    assert describe_workers(None) == "no worker information"
    assert error_detail('{"error": "no such endpoint"}') == "no such endpoint"
    assert error_detail("<html>bad gateway</html>") == "<html>bad gateway</html>"
