"""The proxy as a client sees it: faithful requests and responses, streaming, failures."""

from __future__ import annotations

import asyncio
import re
import socket
import gzip
import hashlib
import json
import logging
import time
import weakref

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from vespa.http import timeouts
from vespa.corridor.refusal import Reason
from vespa.http.upstream import STREAM_END_GRACE
from vespa.worker import Worker
from vespa.config import load_settings

from .conftest import free_port, left_to_the_gc, wait_until

METHODS_WITH_BODY = ["POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
async def test_every_method_path_and_query_arrive_exactly(make_worker, backend, method):
    client, _ = await make_worker()
    raw = "/echo/a%2Fb/c%20d?x=1&x=2&empty=&q=caf%C3%A9&plus=a+b"
    body = b'{"hello": "world"}' if method in METHODS_WITH_BODY else None
    response = await client.request(method, raw, data=body,
                                    headers={"Content-Type": "application/json"})
    assert response.status == 200
    if method == "HEAD":
        assert await response.read() == b""
        assert int(response.headers["Content-Length"]) > 0
        seen = backend.log.requests[-1]
    else:
        seen = await response.json()
    assert seen["method"] == method
    assert seen["raw_path"] == raw
    if body:
        assert seen["body_text"] == body.decode()


@pytest.mark.parametrize("body,content_type", [
    (json.dumps({"messages": [{"role": "user", "content": "héllo"}]}).encode(), "application/json"),
    (bytes(range(256)) * 1000, "application/octet-stream"),
    (b"--XyZ\r\nContent-Disposition: form-data; name=\"f\"; filename=\"a.wav\"\r\n"
     b"Content-Type: audio/wav\r\n\r\nRIFF\x00\x01\x02\r\n--XyZ--\r\n", "multipart/form-data; boundary=XyZ"),
])
async def test_bodies_are_forwarded_raw(make_worker, body, content_type):
    client, _ = await make_worker()
    response = await client.post("/echo", data=body, headers={"Content-Type": content_type})
    seen = await response.json()
    assert seen["body_len"] == len(body)
    assert seen["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert dict(seen["headers"])["Content-Type"] == content_type


async def test_request_headers_hop_by_hop_stripped_and_forwarding_set(make_worker, backend):
    client, _ = await make_worker()
    response = await client.get("/echo", headers={
        "Connection": "keep-alive, X-Drop-Me",
        "X-Drop-Me": "1",
        "Keep-Alive": "timeout=5",
        "TE": "trailers",
        "Proxy-Authorization": "Basic Zm9v",
        "Trailer": "X-Checksum",
        "X-Custom": "kept",
        "Authorization": "Bearer for-the-backend",
        "X-Forwarded-For": "203.0.113.7",
        "Host": "client-facing.example",
    })
    headers = CIMultiDict((await response.json())["headers"])
    for gone in ("X-Drop-Me", "Keep-Alive", "TE", "Proxy-Authorization", "Trailer"):
        assert gone not in headers, gone
    assert headers["X-Custom"] == "kept"
    assert headers["Authorization"] == "Bearer for-the-backend"
    assert headers["Host"] == f"127.0.0.1:{backend.port}"
    assert headers["X-Forwarded-For"] == "127.0.0.1"  # the peer, not what the client claims
    assert headers["X-Forwarded-Proto"] == "http"
    assert headers["X-Request-Id"] == response.headers["X-Request-Id"]


async def test_the_clients_forwarding_headers_are_replaced_by_the_workers_own(make_worker):
    """The worker is the edge: the backend may trust X-Forwarded-For (the peer address) and
    X-Forwarded-Proto (the scheme it used), and sees no forwarding header a client wrote."""
    client, _ = await make_worker()
    response = await client.get("/echo", headers=CIMultiDict([
        ("X-Forwarded-For", "198.51.100.1"), ("X-Forwarded-For", "203.0.113.7, 10.0.0.2"),
        ("Forwarded", "for=198.51.100.1;proto=https;host=admin.example"),
        ("X-Real-IP", "10.0.0.1"), ("X-Forwarded-Host", "admin.example"),
        ("X-Forwarded-Port", "443"), ("X-Forwarded-Proto", "https"), ("X-Custom", "kept")]))
    headers = CIMultiDict((await response.json())["headers"])
    assert headers.getall("X-Forwarded-For") == ["127.0.0.1"]
    assert headers.getall("X-Forwarded-Proto") == ["http"]
    for gone in ("Forwarded", "X-Real-IP", "X-Forwarded-Host", "X-Forwarded-Port"):
        assert gone not in headers, gone
    assert headers["X-Custom"] == "kept"


async def test_response_headers_hop_by_hop_stripped_others_kept(make_worker):
    client, _ = await make_worker()
    response = await client.get("/hop")
    assert await response.text() == "hop"
    for gone in ("X-Private", "Keep-Alive", "Proxy-Authenticate", "Trailer"):
        assert gone not in response.headers, gone
    assert response.headers["X-Kept"] == "yes"
    cookies = await client.get("/cookies")
    assert cookies.headers.getall("Set-Cookie") == ["a=1", "b=2"]


async def test_gzip_is_relayed_as_sent_not_decompressed(make_worker):
    client, _ = await make_worker()
    async with client.session.get(client.make_url("/gzip"), auto_decompress=False) as response:
        raw = await response.read()
        assert response.headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(raw) == b'{"compressed": true}' * 100
    assert int(response.headers["Content-Length"]) == len(raw)


async def test_request_id_is_the_clients_or_a_new_one(make_worker):
    client, _ = await make_worker()
    mine = await client.get("/echo", headers={"X-Request-Id": "trace-42"})
    assert mine.headers["X-Request-Id"] == "trace-42"
    a = (await client.get("/echo")).headers["X-Request-Id"]
    b = (await client.get("/status/404")).headers["X-Request-Id"]
    assert a and b and a != b


async def test_error_responses_keep_status_headers_and_body(make_worker):
    client, _ = await make_worker()
    response = await client.post("/status/503", data=b"{}")
    assert response.status == 503
    assert response.headers["Retry-After"] == "7"
    assert response.headers["X-Backend-Error"] == "yes"
    assert await response.json() == {"error": "backend says 503"}


async def test_sse_first_event_arrives_before_backend_finishes(make_worker, backend):
    client, _ = await make_worker()
    async with client.get("/sse?n=10&delay=0.1") as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        first = await response.content.readline()
        assert backend.log.sse_last_event_at is None  # the backend is still writing its events
        assert first == b'data: {"i": 0}\n'
        rest = await response.read()
    assert backend.log.sse_last_event_at is not None
    assert rest.count(b"data: ") == 10  # nine more events and [DONE]
    assert rest.endswith(b"data: [DONE]\n\n")


async def test_ndjson_stream_relayed(make_worker):
    client, _ = await make_worker()
    response = await client.get("/ndjson?n=4")
    lines = (await response.read()).splitlines()
    assert [json.loads(line)["i"] for line in lines] == [0, 1, 2, 3]


async def test_large_upload_streams_with_its_length(make_worker):
    client, _ = await make_worker()
    body = b"\x07" * (5 * 1024 * 1024)
    result = await (await client.post("/upload", data=body)).json()
    assert result["size"] == len(body)
    assert result["sha256"] == hashlib.sha256(body).hexdigest()
    assert result["content_length"] == str(len(body))


async def test_chunked_upload_is_forwarded(make_worker):
    client, _ = await make_worker()

    async def chunks():
        for _ in range(10):
            yield b"x" * 100_000

    result = await (await client.post("/upload", data=chunks())).json()
    assert result["size"] == 1_000_000
    assert result["chunked"] is True


async def test_client_disconnect_cancels_backend_request_quickly(make_worker, backend):
    client, worker = await make_worker()
    task = asyncio.create_task(client.get("/hang?name=gone"))
    await wait_until(lambda: backend.log.hanging == ["gone"])  # parked at the backend
    assert len(worker.ledger.in_flight) == 1
    left_at = time.monotonic()
    task.cancel()
    await asyncio.wait_for(backend.log.cancel_seen.wait(), 10)
    name, cancelled_at = backend.log.cancelled[0]
    assert name == "gone"
    assert cancelled_at - left_at < 2  # the client's leaving did it: the backend waits an hour
    await wait_until(lambda: not worker.ledger.in_flight)
    assert worker.ledger.totals.outcomes["cancelled"] == 1


async def test_client_disconnect_mid_stream_cancels_backend(make_worker, backend):
    client, worker = await make_worker()
    response = await client.get("/slow-stream?name=s&n=400&delay=0.05")  # 20 s unless cut
    assert await response.content.readline() == b"data: 0\n"
    left_at = time.monotonic()
    response.close()
    await asyncio.wait_for(backend.log.cancel_seen.wait(), 10)
    # after the grace a stream gets to end after its client left (issue #18 item 1), generously
    assert backend.log.cancelled[0][1] - left_at < STREAM_END_GRACE + 2
    await wait_until(lambda: worker.ledger.totals.outcomes["cancelled"] == 1)


async def test_backend_crash_mid_stream_cuts_the_client(make_worker):
    client, worker = await make_worker()
    response = await client.get("/crash")
    assert response.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()
    await wait_until(lambda: worker.ledger.totals.outcomes["error"] == 1)


async def test_backend_unreachable_is_502_with_json_error(make_worker):
    client, worker = await make_worker(backend_url=f"http://127.0.0.1:{free_port()}")
    response = await client.post("/v1/chat/completions", json={})
    assert response.status == 502
    error = (await response.json())["error"]
    assert "backend unreachable" in error and "127.0.0.1" in error
    assert worker.ledger.totals.outcomes["error"] == 1


async def test_backend_past_request_timeout_is_504(make_worker):
    client, _ = await make_worker(VESPA_REQUEST_TIMEOUT="0.3")
    started = time.monotonic()
    response = await client.get("/slow?delay=5")
    assert response.status == 504
    assert "VESPA_REQUEST_TIMEOUT" in (await response.json())["error"]
    assert time.monotonic() - started < 4  # the 0.3 s timeout (the backend answers at 5 s)


async def test_body_over_limit_is_413_declared_or_streamed(make_worker, backend):
    client, _ = await make_worker(VESPA_MAX_BODY_BYTES="1000")
    declared = await client.post("/upload", data=b"x" * 1001)
    assert declared.status == 413
    assert "VESPA_MAX_BODY_BYTES" in (await declared.json())["error"]

    async def chunks():
        for _ in range(5):
            yield b"y" * 400

    streamed = await client.post("/upload", data=chunks())
    assert streamed.status == 413
    ok = await client.post("/upload", data=b"x" * 1000)
    assert (await ok.json())["size"] == 1000


async def test_blocked_paths_are_403(make_worker, backend):
    client, _ = await make_worker(VESPA_BLOCKED_PATHS="/admin/*, /echo/secret")
    for path in ("/admin/reset", "/echo/secret"):
        response = await client.post(path, data=b"{}")
        assert response.status == 403
        assert path in (await response.json())["error"]
    assert (await client.get("/echo/public")).status == 200
    assert all(r["path"] == "/echo/public" for r in backend.log.requests)


async def test_upstream_connections_are_reused(make_worker, backend):
    client, worker = await make_worker()
    for _ in range(20):
        assert (await client.post("/echo", data=b"{}")).status == 200
    assert len(backend.log.requests) == 20
    # the start-up health check may hold a second pooled connection, never more
    assert len({r["peer_port"] for r in backend.log.requests}) <= 2


@pytest.fixture
async def behind_raw(make_worker):
    """``await behind_raw(backend, **env)``: (client, worker) in front of a raw loopback backend;
    ``backend`` is the bytes it answers every request with, or its own stream handler."""
    servers = []

    async def start(backend, **env: str):
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(backend)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(answer if isinstance(backend, bytes) else backend,
                                            "127.0.0.1", 0)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        return await make_worker(backend_url=f"http://127.0.0.1:{port}", **env)

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def test_a_second_response_to_one_request_never_mixes_into_the_first(behind_raw):
    client, worker = await behind_raw(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-First: 1\r\n\r\nok"
                                      b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nX-Evil: 1\r\n\r\nevil")
    response = await client.get("/anything")
    assert response.status == 200 and await response.read() == b"ok"
    assert response.headers["X-First"] == "1" and "X-Evil" not in response.headers
    assert not worker.upstream.pool.idle  # that connection is not sane: never reused


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def keeping_alive(tricky: list[tuple[bytes, float]], sent: asyncio.Event):
    """A raw keep-alive backend: ``/tricky`` gets the ``tricky`` steps (bytes, then seconds to
    wait; ``sent`` is set after the last), every other request a plain 200 ``ok``, on the same
    connection."""
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if head.split(b" ", 2)[1] != b"/tricky":
                    writer.write(OK)
                    continue
                for data, wait in tricky:
                    writer.write(data)
                    await asyncio.sleep(wait)
                sent.set()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    return serve


@pytest.mark.parametrize("tricky", [
    [(OK + b"HTTP/1.1 200 OK\r\nX-Stale", 0)],
    [(OK + b"HTTP/1.1 100 Continue\r\n\r\n", 0)],
    [(OK + b"HTTP/1.1 204 No Content\r\n\r\n", 0)],
    [(OK, 0.05), (b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil", 0)],
], ids=["start-of-a-second-response", "interim-after-the-answer", "second-response-no-fields",
        "second-response-later-while-idle"])
async def test_bytes_a_backend_sends_unasked_never_reach_the_next_request(behind_raw, tricky):
    """What a backend sends after its answer is complete closes the connection, whenever the
    worker sees it: in the same read, or later while the connection is idle in the pool."""
    sent = asyncio.Event()
    client, worker = await behind_raw(keeping_alive(tricky, sent))
    response = await client.get("/tricky")
    assert (response.status, await response.read()) == (200, b"ok")
    assert response.headers["Content-Length"] == "2"  # its head as the backend sent it
    await asyncio.wait_for(sent.wait(), 5)  # all of it sent (the later one: while idle) ...
    pool = worker.upstream.pool  # ... and the worker has closed that connection
    await wait_until(lambda: all(conn.closed for conn in pool.idle))
    for _ in range(2):
        response = await client.get("/next")
        assert (response.status, await response.read()) == (200, b"ok")


async def test_backend_trailer_fields_never_become_response_headers(behind_raw):
    client, _ = await behind_raw(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Head: 1"
                                 b"\r\n\r\n2\r\nok\r\n0\r\nSet-Cookie: session=stolen\r\n"
                                 b"Location: https://evil.example/\r\n\r\n")
    response = await client.get("/anything")
    assert (response.status, await response.read()) == (200, b"ok")
    assert response.headers["X-Head"] == "1"
    for never in ("Set-Cookie", "Location"):
        assert never not in response.headers, never


async def test_interim_103_is_skipped_and_the_final_response_relayed(behind_raw):
    client, _ = await behind_raw(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
                                 b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Final: 1\r\n\r\nfinal")
    response = await client.get("/anything")
    assert response.status == 200
    assert response.headers["X-Final"] == "1"
    assert await response.text() == "final"


@pytest.mark.parametrize("answer,problem", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\nxx", "malformed"),
    (b"HTTP/1.1 099 Low\r\nContent-Length: 2\r\n\r\nok", "status 099"),  # no HTTP status
])
async def test_malformed_backend_response_is_502(behind_raw, answer, problem):
    client, worker = await behind_raw(answer)
    response = await client.get("/anything")
    assert response.status == 502
    assert problem in (await response.json())["error"]
    assert worker.ledger.totals.outcomes["error"] == 1


async def test_response_without_length_ends_when_backend_closes(behind_raw):
    client, _ = await behind_raw(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n"
                                 b"streamed until close")
    response = await client.get("/anything")
    assert response.status == 200
    assert await response.text() == "streamed until close"


# -- request targets -----------------------------------------------------------------------------

async def raw_call(port: int, data: bytes, timeout: float = 10.0) -> tuple[bytes, float]:
    """Send raw bytes to the worker; returns all it answered until it closed, and how long that
    took (``timeout``: it did not close)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    writer.write(data)
    try:
        answer = await asyncio.wait_for(reader.read(), timeout)
    except asyncio.TimeoutError:
        answer = b""
    finally:
        writer.close()
    return answer, time.monotonic() - started


async def test_absolute_form_target_is_forwarded_as_its_path_and_query(make_worker, backend):
    client, worker = await make_worker()
    answer, _ = await raw_call(client.port, b"GET http://evil.example/echo/x?a=1 HTTP/1.1\r\n"
                                            b"Host: worker\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    [seen] = backend.log.requests
    assert seen["raw_path"] == "/echo/x?a=1"
    answer, _ = await raw_call(client.port, b"GET http://evil.example/health?a=1 HTTP/1.1\r\n"
                                            b"Host: worker\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert worker.metrics.requests.get(("GET", "/health", 200)) == 1  # its route, not "other"


async def test_target_without_a_path_is_400_and_no_load(make_worker, backend):
    client, worker = await make_worker()
    for line in (b"GET ftp://evil.example/x", b"OPTIONS *"):  # *: a load balancer's probe
        answer, _ = await raw_call(client.port, line + b" HTTP/1.1\r\n"
                                                b"Host: worker\r\nConnection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
        assert b'"error"' in answer and b"has no path" in answer
    assert backend.log.requests == []
    assert worker.ledger.totals.received == 0  # not load: never reported to the autoscaler


@pytest.mark.parametrize("target", [b"/echo/../admin/reset", b"/echo/%2e%2e/admin/reset",
                                    b"//admin/reset", b"/admin//reset", b"/./admin/reset",
                                    b"/admin%2freset", b"http://x/admin/reset"])
async def test_blocked_paths_are_403_however_spelled(make_worker, backend, target):
    client, _ = await make_worker(VESPA_BLOCKED_PATHS="/admin/*")
    answer, _ = await raw_call(client.port, b"GET " + target + b" HTTP/1.1\r\nHost: worker\r\n"
                                            b"Connection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 403"), answer[:200]
    assert b"VESPA_BLOCKED_PATHS" in answer
    assert backend.log.requests == []


# -- stalled request bodies and clients that go away ----------------------------------------------

@pytest.mark.parametrize("length", [100, 1_000_000], ids=["read-whole", "streamed-upstream"])
async def test_stalled_request_body_is_408_and_the_connection_closes(make_worker, length):
    client, worker = await make_worker(VESPA_BODY_READ_TIMEOUT="0.3")
    head = b"POST /upload HTTP/1.1\r\nHost: w\r\nContent-Length: %d\r\n\r\n" % length
    answer, took = await raw_call(client.port, head + b"x" * 10)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
    assert b"VESPA_BODY_READ_TIMEOUT" in answer
    # the 0.3 s body-read timeout closed it (generously bounded; raw_call gives up after 10 s)
    assert took < 5, f"the worker kept the stalled connection open for {took:.1f}s"
    if length > 100:  # admitted and streamed upstream: it counts as a failed request
        await wait_until(lambda: worker.ledger.totals.outcomes["error"] == 1)
    assert not worker.ledger.in_flight
    assert (await client.post("/upload", data=b"y" * 100)).status == 200


@pytest.mark.parametrize("path", ["/echo", "/upload"], ids=["read-whole", "streamed-upstream"])
async def test_malformed_chunked_body_is_400_at_once(make_worker, backend, path):
    client, worker = await make_worker(VESPA_BODY_READ_TIMEOUT="10")
    head = b"POST %s HTTP/1.1\r\nHost: w\r\nTransfer-Encoding: chunked\r\n\r\n" % path.encode()
    answer, took = await raw_call(client.port, head + b"5\r\nhello\r\nzz\r\nmore\r\n")
    assert answer.startswith(b"HTTP/1.1 400"), answer[:300]
    assert b"request body cannot be read" in answer
    assert answer.count(b"HTTP/1.1") == 1, answer  # one answer, then the connection closes
    assert took < 5, f"a malformed body waited {took:.1f}s for the 10 s body-read timeout"
    assert not worker.ledger.in_flight
    assert (await client.post(path, data=b"y" * 100)).status == 200


@pytest.mark.parametrize("length", [1000, 300_000], ids=["read-whole", "streamed-upstream"])
async def test_an_upgrade_request_with_a_body_cannot_desync_the_backend(make_worker, backend,
                                                                       length):
    client, _ = await make_worker(VESPA_REQUEST_TIMEOUT="3")
    answer, _ = await raw_call(client.port, b"GET /echo HTTP/1.1\r\nHost: w\r\n"
                                            b"Connection: Upgrade\r\nUpgrade: x\r\n"
                                            b"Content-Length: %d\r\n\r\n" % length)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert backend.log.requests == []
    for n in range(3):  # the pooled backend connections are all sane: a desynced one would
        # take this request for the rest of a body (504 after the 3 s request timeout)
        response = await client.get(f"/echo/next{n}")
        assert response.status == 200
        assert (await response.json())["path"] == f"/echo/next{n}"
    assert [seen["path"] for seen in backend.log.requests] == [f"/echo/next{n}"
                                                                for n in range(3)]


async def test_a_body_sent_in_slow_pieces_is_not_a_stall(make_worker):
    client, _ = await make_worker(VESPA_BODY_READ_TIMEOUT="0.5", VESPA_MIN_UPLOAD_RATE="0")

    async def pieces():
        for _ in range(4):
            await asyncio.sleep(0.25)  # 1 s in all, never 0.5 s without a byte
            yield b"z" * 100

    for path in ("/upload", "/echo"):  # streamed upstream / read whole first (chunked, small)
        response = await client.post(path, data=pieces())
        assert response.status == 200, await response.text()


async def test_client_gone_mid_stream_is_a_cancellation_without_error_log(backend, caplog):
    """The front server cancels the request of a lost connection, or, when a write to the
    client comes first, the proxy finds the client gone itself. Either way: cancelled, no
    error traceback."""
    worker = Worker(load_settings({"VESPA_UNSECURED": "true",
                                   "VESPA_BACKEND_URL": str(backend.make_url("")).rstrip("/")}))
    await worker.start()
    port = free_port()
    await worker.listen("127.0.0.1", port)
    try:
        async with aiohttp.ClientSession() as session:
            response = await session.get(f"http://127.0.0.1:{port}/slow-stream?name=s&n=100"
                                         "&delay=0.02")
            assert await response.content.readline() == b"data: 0\n"
            response.close()
            await wait_until(lambda: worker.ledger.totals.outcomes["cancelled"] == 1)
            await asyncio.wait_for(backend.log.cancel_seen.wait(), 10)
    finally:
        await worker.stop()  # what is still unwinding logs before this returns
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]
    assert not worker.ledger.in_flight


async def test_a_client_that_does_not_read_a_small_answer_holds_no_slot(make_worker):
    """A whole small answer is handed to the client's socket; waiting for a client that does not
    read it happens after the request is finished, so the slot and the ledger are free."""
    client, worker = await make_worker(VESPA_MAX_CONCURRENCY="1", VESPA_MAX_WAIT_TIME="2")
    for sock in worker.listener.sockets:  # accepted sockets inherit a tiny send buffer
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF,
                                                         4096)
    writer.write(b"GET /big?bytes=250000&length=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    await wait_until(lambda: worker.ledger.totals.outcomes["success"] == 1)
    assert not worker.ledger.in_flight and worker.admission.running == 0
    response = await client.get("/echo/next")  # not stuck behind the reader that never reads
    assert response.status == 200
    writer.close()


@pytest.mark.parametrize("method,sent_times,status", [("GET", 2, 200), ("POST", 1, 502)])
async def test_a_closed_keep_alive_connection_replays_only_idempotent_requests(
        behind_raw, method, sent_times, status):
    """The backend reads the second request on a kept-alive connection, then drops it without
    an answer: a GET is sent again on a new connection, a POST (which the backend may have
    started on) never is."""
    seen: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            length = re.search(rb"(?i)content-length: (\d+)", head)
            if length:
                await reader.readexactly(int(length.group(1)))
            seen.append(head.split(b" ", 2)[1])
            if seen[-1] == b"/second" and seen.count(b"/second") == 1:
                break  # drop the connection without answering
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
        writer.close()

    client, worker = await behind_raw(serve)
    assert (await client.get("/first")).status == 200
    response = await client.request(method, "/second", data=b"{}")
    assert response.status == status
    assert seen.count(b"/second") == sent_times


async def test_a_reason_phrase_split_across_reads_is_relayed_whole(behind_raw):
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 404 Not Fo")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"und Here\r\nContent-Length: 2\r\n\r\nno")
        await writer.drain()
        writer.close()

    client, _ = await behind_raw(serve)
    response = await client.get("/x")
    assert (response.status, response.reason) == (404, "Not Found Here")


@pytest.mark.parametrize("length,first_answer", [(10, b"HTTP/1.1 100 Continue"),
                                                 (2000, b"HTTP/1.1 413")])
async def test_expect_100_continue_is_answered_after_the_size_check(make_worker, length,
                                                                    first_answer):
    client, _ = await make_worker(VESPA_MAX_BODY_BYTES="1000")
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                 b"Content-Length: %d\r\n\r\n" % length)
    assert (await reader.readuntil(b"\r\n")).startswith(first_answer)
    if length == 10:  # the client sends its body only now, and gets the real answer
        assert await reader.readexactly(2) == b"\r\n"  # the end of the interim answer
        writer.write(b"x" * 10)
        assert (await reader.readuntil(b"\r\n")).startswith(b"HTTP/1.1 200")
    writer.close()


async def test_a_slow_upload_longer_than_the_request_timeout_is_not_cut(make_worker):
    """The request timeout counts the backend's silence from the end of the upload."""
    client, _ = await make_worker(VESPA_REQUEST_TIMEOUT="0.5")

    async def pieces():
        for _ in range(6):
            yield b"x" * 1000
            await asyncio.sleep(0.2)

    response = await client.post("/upload", data=pieces())
    assert response.status == 200, await response.text()
    assert (await response.json())["size"] == 6000


async def test_a_backend_that_answers_early_and_closes_during_an_upload_is_relayed(
        behind_raw):
    async def pieces():
        for _ in range(20):
            yield b"x" * 1000
            await asyncio.sleep(0.05)

    client, worker = await behind_raw(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 4\r\n"
                                      b"Connection: close\r\n\r\nnope")
    response = await client.post("/upload", data=pieces())
    assert response.status == 413
    assert await response.read() == b"nope"
    assert worker.ledger.totals.outcomes["success"] == 1  # the backend's answer, relayed


async def test_access_log_line_per_request_only_when_debugging(make_worker, caplog):
    client, _ = await make_worker()
    access = logging.getLogger("vespa.access")
    saved = access.level
    try:
        access.setLevel(logging.WARNING)  # what setup_logging sets below DEBUG
        assert (await client.get("/echo/quiet")).status == 200
        access.setLevel(logging.INFO)  # VESPA_LOG_LEVEL=DEBUG
        with caplog.at_level(logging.INFO, logger="vespa.access"):
            assert (await client.get("/echo/loud?x=1")).status == 200
    finally:
        access.setLevel(saved)
    lines = [r.getMessage() for r in caplog.records if r.name == "vespa.access"]
    assert len(lines) == 1 and '"GET /echo/loud?x=1 HTTP/1.1" 200' in lines[0], lines


async def test_nothing_a_relayed_request_leaves_behind_needs_the_gc(make_worker, backend):
    """The corridor, the upstream exchange and a closed backend connection are freed by
    reference counting alone: cycles left to the GC cost CPU on every request under load."""
    client, worker = await make_worker()
    with left_to_the_gc() as left:
        for _ in range(3):
            assert (await client.post("/echo", json={"a": 1})).status == 200
        assert b"data: " in await (await client.get("/sse")).read()
        assert len(await (await client.get("/big?bytes=300000")).read()) == 300_000
        assert (await client.get("/status/503")).status == 503
        assert (await client.get("/_vespa/healthz")).status == 200
        with pytest.raises(aiohttp.ClientPayloadError):  # the backend dies mid-stream
            await (await client.get("/crash")).read()
        task = asyncio.create_task(client.get("/hang"))  # the client leaves
        await wait_until(lambda: backend.log.hanging)  # parked at the backend
        [serving] = [weakref.ref(conn.task) for conn in worker.server.connections
                     if conn.task is not None]  # (a weak reference: it holds nothing alive)
        task.cancel()
        await asyncio.wait_for(backend.log.cancel_seen.wait(), 10)
        await wait_until(lambda: not worker.ledger.in_flight)
        await wait_until(lambda: serving() is None or serving().done())  # it has unwound
    assert not left, left



async def post_raw(client, length: int, *, seconds: float) -> bytes:
    """POST a ``length``-byte body to the worker on a raw socket (the upload is fed in the
    background and may stall); what came back within ``seconds``."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(b"POST /upload HTTP/1.1\r\nHost: w\r\nContent-Type: application/octet-stream\r\n"
                 b"Content-Length: %d\r\n\r\n" % length)

    async def feed() -> None:
        piece = b"x" * 65536
        for _ in range(length // len(piece)):
            writer.write(piece)
            await writer.drain()

    feeding = asyncio.create_task(feed())
    try:
        async with timeouts.timeout(seconds):
            return await reader.readuntil(b"\r\n\r\n")
    except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
        return b""
    finally:
        feeding.cancel()
        writer.close()


@pytest.mark.parametrize("answers_first,request_timeout,status", [
    (False, "1", b"504"),  # wedged: the request timeout ends it (the connection is cut, not
                           # closed gracefully behind unsent bytes)
    (True, "60", b"413"),  # it refused the upload at once: that answer goes out now
])
async def test_a_backend_that_stops_reading_an_upload_does_not_hang_the_request(
        behind_raw, answers_first, request_timeout, status):
    """The backend reads the head, then nothing more of a 64 MB upload, and keeps the
    connection open."""
    async def stops_reading(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        if answers_first:
            writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 4\r\n\r\nnope")
            await writer.drain()
        await asyncio.sleep(10)  # reads nothing more, closes nothing
        writer.close()

    client, worker = await behind_raw(stops_reading, VESPA_REQUEST_TIMEOUT=request_timeout)
    started = time.monotonic()
    head = await post_raw(client, 64 * 1024 * 1024, seconds=10)
    assert head.startswith(b"HTTP/1.1 " + status), head
    assert time.monotonic() - started < 5
    await wait_until(lambda: not worker.ledger.in_flight)
    assert not worker.upstream.pool.idle  # a connection with half an upload on it is not reused


async def test_a_backend_reset_in_a_body_that_ends_at_close_cuts_the_client(behind_raw):
    """A body without length or chunking ends when the backend closes; a reset is a crash, not
    that end, and the client must not get a clean end."""
    relayed = asyncio.Event()

    async def resets(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: audio/wav\r\n\r\n" + b"A" * 1000)
        await writer.drain()
        await asyncio.wait_for(relayed.wait(), 10)  # the client has the head: now the crash
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        writer.transport.abort()  # RST

    client, worker = await behind_raw(resets)
    response = await client.get("/audio")
    assert response.status == 200
    relayed.set()
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()
    await wait_until(lambda: worker.ledger.totals.outcomes["error"] == 1)
    assert worker.ledger.totals.outcomes["success"] == 0


async def test_a_streamed_upload_slower_than_the_minimum_rate_is_cut(make_worker, backend):
    """Issue #17 item 7: never pausing long enough to stall, 10 bytes every 0.1 s would hold a
    backend connection for ever; past the idle timeout it must average VESPA_MIN_UPLOAD_RATE."""
    client, worker = await make_worker(VESPA_BODY_READ_TIMEOUT="0.5", VESPA_MIN_UPLOAD_RATE="1000")

    async def trickle():
        for _ in range(100):  # 10 s at most
            await asyncio.sleep(0.1)
            yield b"z" * 10

    started = asyncio.get_running_loop().time()
    response = await client.post("/upload", data=trickle(),
                                 headers={"Content-Length": "1000000"})
    assert response.status == 408 and "VESPA_MIN_UPLOAD_RATE" in (await response.json())["error"]
    assert asyncio.get_running_loop().time() - started < 6  # the trickle would go on for 10 s


async def test_a_request_waits_for_a_backend_connection_at_most_the_max_wait(make_worker):
    """Issue #17 item 7: with every connection to the backend held (slow uploads, hung
    generations), the others get 503 + Retry-After after the max wait time, never wait for
    ever."""
    client, worker = await make_worker(VESPA_CONNECTION_LIMIT="1", VESPA_MAX_WAIT_TIME="0.5")
    hung = asyncio.ensure_future(client.get("/hang"))
    await wait_until(lambda: worker.ledger.in_flight)
    started = asyncio.get_running_loop().time()
    response = await client.get("/echo")
    assert response.status == 503 and response.headers["Retry-After"] == "1"
    assert "VESPA_CONNECTION_LIMIT" in (await response.json())["error"]
    assert 0.4 < asyncio.get_running_loop().time() - started < 3
    assert worker.metrics.rejections[Reason.BACKEND_BUSY] == 1
    hung.cancel()


async def test_headers_named_in_any_connection_line_never_reach_the_backend(make_worker, backend):
    """Issue #18 item 2: RFC 9110 §7.6.1 — every Connection line counts, not only the last."""
    client, _ = await make_worker()
    response = await client.get("/echo", headers=[("Connection", "x-first"),
                                                  ("Connection", "x-second"),
                                                  ("X-First", "1"), ("X-Second", "2"),
                                                  ("X-Kept", "3")])
    assert response.status == 200
    seen = {name.lower() for name, _ in backend.log.requests[-1]["headers"]}
    assert "x-kept" in seen and not {"x-first", "x-second"} & seen


async def read_until_done_then_leave(port: int, path: str) -> bytes:
    """What an SSE client such as the openai SDK does: read to "data: [DONE]", hang up."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: w\r\n\r\n".encode())
    seen = await asyncio.wait_for(reader.readuntil(b"data: [DONE]\n\n"), 10)
    writer.close()
    return seen


async def test_a_stream_whose_client_left_at_its_last_event_counts_as_complete(make_worker,
                                                                                backend):
    """Issue #18 item 1: the client leaves at [DONE], the backend ends its body 50 ms later
    (as vLLM does): a success, not a cancellation."""
    client, worker = await make_worker()
    for _ in range(5):
        seen = await read_until_done_then_leave(client.port, "/sse?n=3&linger=0.05")
        assert seen.startswith(b"HTTP/1.1 200")
    await wait_until(lambda: worker.ledger.totals.outcomes["success"] == 5)
    assert worker.ledger.totals.outcomes["cancelled"] == 0
    assert not backend.log.cancelled


async def test_a_stream_nobody_reads_still_stops_soon_after_its_client_left(make_worker, backend):
    """The grace is short: a backend that goes on after its client left is cut (vLLM aborts the
    generation), and the request is a cancellation."""
    client, worker = await make_worker()
    started = asyncio.get_running_loop().time()
    await read_until_done_then_leave(client.port, "/sse?n=3&linger=30")
    await asyncio.wait_for(backend.log.cancel_seen.wait(), 15)
    assert asyncio.get_running_loop().time() - started < STREAM_END_GRACE + 5  # not the 30 s
    await wait_until(lambda: worker.ledger.totals.outcomes["cancelled"] == 1)
