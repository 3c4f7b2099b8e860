"""The front server as a client sees it: raw bytes over loopback sockets to ``FrontServer``,
with small handlers written here (no mocks)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from vespa.http import timeouts
from vespa.http.messages import BodyError, Request
from vespa.http.server import HEAD_SLICE, MAX_PIPELINED, FrontServer

from .conftest import left_to_the_gc, wait_until

HOST = "127.0.0.1"
WAIT = 1.0  # seconds any step may take before the test fails rather than hangs
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


# -- serving and talking ---------------------------------------------------------------------

class Served:
    """A FrontServer listening on an ephemeral loopback port."""

    def __init__(self, front: FrontServer, server: asyncio.AbstractServer):
        self.front = front
        self.server = server
        self.port = server.sockets[0].getsockname()[1]
        self.writers: list[asyncio.StreamWriter] = []

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(HOST, self.port)
        self.writers.append(writer)
        return reader, writer


@pytest.fixture
async def serve():
    """``await serve(handler, **FrontServer options)`` -> Served; all torn down afterwards."""
    served: list[Served] = []

    async def start(handler, **options) -> Served:
        front = FrontServer(handler, **options)
        server = await asyncio.get_running_loop().create_server(front, HOST, 0)
        served.append(Served(front, server))
        return served[-1]

    yield start
    for one in served:
        one.server.close()
        for writer in one.writers:
            writer.close()
        one.front.pre_shutdown()
        await one.front.shutdown(0)
        await one.server.wait_closed()


def request(method: str = "GET", target: str = "/", *, version: str = "1.1",
            headers: list[tuple[str, str]] | None = None, body: bytes = b"") -> bytes:
    """A request head (Host added on 1.1, Content-Length when there is a body) plus body."""
    lines = [f"{method} {target} HTTP/{version}"]
    fields = list(headers or [])
    if version == "1.1" and not any(n.lower() == "host" for n, _ in fields):
        fields.insert(0, ("Host", "test"))
    if body and not any(n.lower() in ("content-length", "transfer-encoding") for n, _ in fields):
        fields.append(("Content-Length", str(len(body))))
    lines += [f"{name}: {value}" for name, value in fields]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class Response:
    def __init__(self, status: int, headers: dict[str, str], head: bytes, body: bytes = b""):
        self.status = status
        self.headers = headers
        self.head = head
        self.body = body

    def json(self):
        assert self.headers.get("content-type", "").startswith("application/json"), self.head
        return json.loads(self.body)

    @property
    def closes(self) -> bool:
        return self.headers.get("connection", "").lower() == "close"

    def __repr__(self) -> str:
        return f"Response({self.status}, {self.headers!r}, {self.body[:200]!r})"


async def read_head(reader: asyncio.StreamReader, timeout: float = WAIT) -> Response:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    lines = head.decode("latin-1").split("\r\n")
    version, status, _ = (lines[0] + " ").split(" ", 2)
    assert version == "HTTP/1.1", head
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            assert name.lower() not in headers, f"{name} twice in {head!r}"
            headers[name.lower()] = value.strip()
    return Response(int(status), headers, head)


async def read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts = []
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            assert await reader.readexactly(2) == b"\r\n"  # no trailers from this server
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        assert await reader.readexactly(2) == b"\r\n"


async def read_response(reader: asyncio.StreamReader, method: str = "GET",
                        timeout: float = WAIT) -> Response:
    """One whole final response, framed as its head says."""
    response = await read_head(reader, timeout)
    headers = response.headers
    if method == "HEAD" or response.status in (204, 304) or response.status < 200:
        return response
    if headers.get("transfer-encoding", "").lower() == "chunked":
        assert "content-length" not in headers, response.head
        response.body = await asyncio.wait_for(read_chunked(reader), timeout)
    elif "content-length" in headers:
        response.body = await asyncio.wait_for(
            reader.readexactly(int(headers["content-length"])), timeout)
    else:
        response.body = await asyncio.wait_for(reader.read(), timeout)  # until the server closes
    return response


async def rest(reader: asyncio.StreamReader, timeout: float = WAIT) -> bytes:
    """Whatever the server still sends before it closes the connection (fails on a reset or
    when the connection is still open after ``timeout``)."""
    return await asyncio.wait_for(reader.read(), timeout)


async def cut(reader: asyncio.StreamReader, timeout: float = WAIT) -> bytes:
    """Like ``rest``, but the connection may end with a reset as well as with a FIN."""
    data = []
    try:
        async with timeouts.timeout(timeout):
            while chunk := await reader.read(65536):
                data.append(chunk)
    except ConnectionResetError:
        pass
    return b"".join(data)


async def still_open(reader: asyncio.StreamReader, wait: float = 0.1) -> bool:
    """True when the server neither sends anything nor closes within ``wait`` seconds."""
    try:
        data = await asyncio.wait_for(reader.read(1), wait)
    except asyncio.TimeoutError:
        return True
    assert data == b"", f"unexpected bytes from the server: {data!r}"
    return False


def recording(answer: bytes = b"served"):
    """A handler that notes each request's target and answers 200 ``answer``; and the list."""
    targets: list[str] = []

    async def handler(request: Request) -> None:
        targets.append(request.target)
        request.reply.send(200, [], answer)

    return handler, targets


def waits_to_be_cancelled():
    """A handler that waits (10 s) without answering, and events: it started, it was cancelled."""
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def handler(request: Request) -> None:
        started.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        request.reply.send(200, [], b"too late")

    return handler, started, cancelled


async def echo_target(request: Request) -> None:
    request.reply.send(200, [(b"Content-Type", b"text/plain")], request.target.encode())


# -- 1. keep-alive ---------------------------------------------------------------------------

async def test_two_requests_on_one_connection_are_both_answered(serve):
    served = await serve(echo_target)
    reader, writer = await served.connect()
    writer.write(request(target="/one"))
    first = await read_response(reader)
    writer.write(request(target="/two"))
    second = await read_response(reader)
    assert (first.status, first.body) == (200, b"/one")
    assert (second.status, second.body) == (200, b"/two")
    assert not first.closes and not second.closes
    assert await still_open(reader)


async def test_http10_without_keep_alive_is_answered_then_closed(serve):
    served = await serve(echo_target)
    reader, writer = await served.connect()
    writer.write(request(target="/old", version="1.0"))
    response = await read_response(reader)
    assert (response.status, response.body) == (200, b"/old")
    assert response.closes
    assert await rest(reader) == b""


async def test_http10_with_keep_alive_stays_open(serve):
    served = await serve(echo_target)
    reader, writer = await served.connect()
    for target in ("/a", "/b"):
        writer.write(request(target=target, version="1.0", headers=[("Connection", "keep-alive")]))
        response = await read_response(reader)
        assert (response.status, response.body) == (200, target.encode())
        assert response.headers.get("connection", "").lower() == "keep-alive"
    assert await still_open(reader)


async def test_connection_close_on_http11_closes_after_the_answer(serve):
    served = await serve(echo_target)
    reader, writer = await served.connect()
    writer.write(request(target="/bye", headers=[("Connection", "close")]))
    response = await read_response(reader)
    assert (response.status, response.body) == (200, b"/bye")
    assert response.closes
    assert await rest(reader) == b""


# -- 2. pipelining ---------------------------------------------------------------------------

async def test_pipelined_requests_are_answered_in_request_order(serve):
    delays = {"/a": 0.15, "/b": 0.0, "/c": 0.05}
    served_order = []

    async def handler(request: Request) -> None:
        body = await request.body.read()
        await asyncio.sleep(delays[request.path])
        served_order.append(request.path)
        request.reply.send(200, [], request.path.encode() + b":" + body)

    served = await serve(handler)
    reader, writer = await served.connect()
    writer.write(request(target="/a") + request("POST", "/b", body=b"hello")
                 + request(target="/c"))
    answers = [await read_response(reader) for _ in range(3)]
    assert [a.body for a in answers] == [b"/a:", b"/b:hello", b"/c:"]
    assert served_order == ["/a", "/b", "/c"]
    assert await still_open(reader)


# -- 3. chunked request bodies ---------------------------------------------------------------

async def test_chunked_request_body_is_decoded_and_handed_over_whole(serve):
    bodies = []
    got_some = asyncio.Event()

    async def handler(request: Request) -> None:
        parts = []
        while chunk := await request.body.read():
            parts.append(chunk)
            got_some.set()
        bodies.append(b"".join(parts))
        request.reply.send(200, [], b"got %d" % len(bodies[-1]))

    served = await serve(handler)
    reader, writer = await served.connect()
    head = request("POST", "/up", headers=[("Transfer-Encoding", "chunked")])
    writer.write(head + b"5\r\nhello\r\n1;ext=1\r\n \r\n")
    await asyncio.wait_for(got_some.wait(), WAIT)  # the rest comes once the handler has a part
    writer.write(b"5\r\nworld\r\n0\r\n\r\n")
    response = await read_response(reader)
    assert bodies == [b"hello world"]
    assert (response.status, response.body) == (200, b"got 11")
    assert not response.closes
    writer.write(request(target="/next"))  # the connection serves on after a chunked body
    assert (await read_response(reader)).status == 200


@pytest.mark.parametrize("together", [False, True], ids=["after-the-head", "with-the-head"])
async def test_malformed_chunked_body_raises_body_error_promptly_and_closes(serve, together):
    """FrontServer has no body-read timeout: a handler left waiting for more of the body would
    wait for ever, so any answer at all means the bad bytes ended the read at once."""
    errors = []
    reading = asyncio.Event()

    async def handler(request: Request) -> None:
        try:
            while await request.body.read():
                reading.set()  # it has the first bytes: its next read() waits for more
        except BodyError as exc:
            errors.append(exc)
            request.reply.send_json(400, {"handler": "bad body"})
            return
        request.reply.send(200, [], b"whole")

    served = await serve(handler)
    reader, writer = await served.connect()
    head = request("POST", "/up", headers=[("Transfer-Encoding", "chunked")])
    if together:
        writer.write(head + b"5\r\nhello\r\nzz\r\n")
    else:
        writer.write(head + b"5\r\nhello\r\n")
        await asyncio.wait_for(reading.wait(), WAIT)  # the handler is waiting in read()
        writer.write(b"zz\r\n")
    response = await read_response(reader)
    assert len(errors) == 1 and isinstance(errors[0], BodyError)
    assert response.status == 400 and response.json() == {"handler": "bad body"}
    assert response.closes
    assert await rest(reader) == b""  # closed, and no second response after the handler's


# -- 4. Expect: 100-continue -----------------------------------------------------------------

async def test_100_continue_is_sent_only_once_the_handler_reads(serve):
    gate = asyncio.Event()

    async def handler(request: Request) -> None:
        await gate.wait()
        body = await request.body.read()
        while more := await request.body.read():
            body += more
        request.reply.send(200, [], b"read " + body)

    served = await serve(handler)
    reader, writer = await served.connect()
    writer.write(request("POST", "/up", headers=[("Expect", "100-continue"),
                                                 ("Content-Length", "5")]))
    assert await still_open(reader, 0.15)  # the handler has not read: no 100 yet
    gate.set()
    assert await asyncio.wait_for(reader.readexactly(len(CONTINUE)), WAIT) == CONTINUE
    writer.write(b"hello")
    response = await read_response(reader)
    assert (response.status, response.body) == (200, b"read hello")
    assert not response.closes


async def test_an_answer_without_reading_gets_no_100_and_closes(serve):
    async def handler(request: Request) -> None:
        request.reply.send_json(413, {"error": "too large"})

    served = await serve(handler)
    reader, writer = await served.connect()
    writer.write(request("POST", "/up", headers=[("Expect", "100-continue"),
                                                 ("Content-Length", "100000")]))
    response = await read_response(reader)
    assert response.status == 413, response  # not 100 first
    assert response.json() == {"error": "too large"}
    assert response.closes
    writer.write(b"x" * 100000)  # a client that sends its body anyway: dropped, then closed
    assert await rest(reader) == b""


# -- 5. limits and garbage -------------------------------------------------------------------

REFUSED = {
    "target-over-8190": (request(target="/" + "a" * 9000), 414),
    "head-over-64KiB": (request(headers=[(f"X-Big-{i}", "v" * 700) for i in range(100)]), 431),
    "129-fields": (request(headers=[(f"X-F{i}", "v") for i in range(128)]), 431),
    "garbage": (b"NOT HTTP\r\n\r\n", 400),
    "bad-content-length": (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1x\r\n\r\n", 400),
    "transfer-encoding-not-chunked":
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nabc", 400),
    "unknown-expectation": (request("POST", "/up", headers=[("Expect", "something"),
                                                            ("Content-Length", "5")]), 417),
}


@pytest.mark.parametrize("name", list(REFUSED))
async def test_refused_requests_get_a_json_error_and_the_connection_closes(serve, name):
    data, status = REFUSED[name]
    handler, calls = recording()

    served = await serve(handler)
    reader, writer = await served.connect()
    writer.write(data)
    response = await read_response(reader)
    assert response.status == status, response
    error = response.json()
    assert list(error) == ["error"] and isinstance(error["error"], str) and error["error"]
    assert response.closes
    assert await rest(reader) == b""
    assert calls == []


async def test_limits_are_inclusive(serve):
    served = await serve(echo_target)
    reader, writer = await served.connect()
    target = "/" + "a" * 8189  # 8190 bytes
    writer.write(request(target=target))
    response = await read_response(reader)
    assert (response.status, response.body) == (200, target.encode())
    writer.write(request(target="/fields", headers=[(f"X-F{i}", "v") for i in range(127)]))
    response = await read_response(reader)  # 127 + Host = 128 fields
    assert (response.status, response.body) == (200, b"/fields")


async def test_requests_before_garbage_are_answered_then_the_connection_closes(serve):
    served = await serve(echo_target)
    reader, writer = await served.connect()
    writer.write(request(target="/ok") + request(target="/ok2") + b"NOT HTTP\r\n\r\n")
    for target in (b"/ok", b"/ok2"):  # the requests before the garbage are all answered
        response = await read_response(reader)
        assert (response.status, response.body) == (200, target)
    refusal = await read_response(reader)
    assert refusal.status == 400 and "error" in refusal.json() and refusal.closes
    assert await rest(reader) == b""


async def test_an_upgrade_request_is_served_plainly_and_nothing_after_it_is_read(serve):
    handler, targets = recording(b"plain")

    served = await serve(handler)
    reader, writer = await served.connect()
    writer.write(request(target="/ws", headers=[("Connection", "Upgrade"),
                                                ("Upgrade", "websocket")])
                 + request(target="/smuggled"))
    response = await read_response(reader)
    assert (response.status, response.body) == (200, b"plain")
    assert response.closes
    assert await rest(reader) == b""
    assert targets == ["/ws"]


# -- 6. idle timeout -------------------------------------------------------------------------

# (The upper bounds below say the timeout closed the connection, not something else: nothing
# else would. They are generous; no test here measures how fast the server is.)

async def test_an_idle_connection_is_closed_after_the_keepalive_timeout(serve):
    served = await serve(echo_target, keepalive_timeout=0.2)
    reader, writer = await served.connect()
    started = time.monotonic()
    assert await rest(reader, 5) == b""
    assert 0.15 < time.monotonic() - started < 3


async def test_a_keep_alive_connection_is_closed_once_idle_after_its_answers(serve):
    served = await serve(echo_target, keepalive_timeout=0.6)
    reader, writer = await served.connect()
    for _ in range(4):  # busy for longer than the timeout in all, idle for less each time
        await asyncio.sleep(0.2)
        writer.write(request(target="/x"))
        assert (await read_response(reader)).status == 200
    started = time.monotonic()
    assert await rest(reader, 5) == b""
    assert 0.5 < time.monotonic() - started < 3


async def test_a_handler_slower_than_the_keepalive_timeout_still_answers(serve):
    async def handler(request: Request) -> None:
        await asyncio.sleep(0.4)
        request.reply.send(200, [], b"slow")

    served = await serve(handler, keepalive_timeout=0.2)
    reader, writer = await served.connect()
    writer.write(request())
    response = await read_response(reader)
    assert (response.status, response.body) == (200, b"slow")


async def test_a_partial_request_head_is_closed_after_the_keepalive_timeout(serve):
    served = await serve(echo_target, keepalive_timeout=0.2)
    reader, writer = await served.connect()
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
    started = time.monotonic()
    assert await rest(reader, 5) == b""
    assert time.monotonic() - started < 3


async def test_a_trickled_request_head_is_closed_after_the_keepalive_timeout(serve):
    calls = []

    async def handler(request: Request) -> None:
        calls.append(request)
        request.reply.send(200, [], b"")

    served = await serve(handler, keepalive_timeout=0.2)
    reader, writer = await served.connect()
    head = request(headers=[("X-Slow", "y" * 400)])

    async def trickle():
        for byte in head[:-4]:  # never the end of the head (8 s of it)
            writer.write(bytes([byte]))
            await asyncio.sleep(0.02)

    dripping = asyncio.create_task(trickle())
    try:
        started = time.monotonic()
        assert await cut(reader, 5) == b""
        assert time.monotonic() - started < 3
        assert not dripping.done()  # it was still sending when it was closed
    finally:
        dripping.cancel()
    assert calls == []


# -- 7. a client that leaves cancels its request ----------------------------------------------

@pytest.mark.parametrize("how", ["close", "half-close"])
async def test_a_client_that_leaves_cancels_its_handler(serve, how):
    handler, started, cancelled = waits_to_be_cancelled()

    served = await serve(handler)
    reader, writer = await served.connect()
    writer.write(request())
    await asyncio.wait_for(started.wait(), WAIT)
    if how == "close":
        writer.close()
    else:
        writer.write_eof()
    await asyncio.wait_for(cancelled.wait(), WAIT)


# -- 8. streamed answers ---------------------------------------------------------------------

async def stream_hello_world(request: Request) -> None:
    reply = request.reply
    reply.start(200, [(b"Content-Type", b"text/plain")], None)
    await reply.write(b"hello")
    await asyncio.sleep(0.01)
    await reply.write(b" world")
    reply.end()


async def test_a_stream_of_unknown_length_is_chunked_on_http11(serve):
    served = await serve(stream_hello_world)
    reader, writer = await served.connect()
    writer.write(request())
    response = await read_head(reader)
    assert response.status == 200
    assert response.headers["transfer-encoding"] == "chunked"
    assert "content-length" not in response.headers and not response.closes
    expected = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    assert await asyncio.wait_for(reader.readexactly(len(expected)), WAIT) == expected
    writer.write(request(target="/again"))  # the connection serves on after the stream
    assert (await read_response(reader)).body == b"hello world"


async def test_a_stream_of_unknown_length_ends_with_the_connection_on_http10(serve):
    served = await serve(stream_hello_world)
    reader, writer = await served.connect()
    writer.write(request(version="1.0", headers=[("Connection", "keep-alive")]))
    response = await read_head(reader)
    assert response.status == 200
    assert "transfer-encoding" not in response.headers
    assert "content-length" not in response.headers
    assert response.closes
    assert await rest(reader) == b"hello world"


async def test_a_stream_of_known_length_is_sent_as_is(serve):
    async def handler(request: Request) -> None:
        request.reply.start(200, [], 11)
        await request.reply.write(b"hello")
        await request.reply.write(b" world")
        request.reply.end()

    served = await serve(handler)
    reader, writer = await served.connect()
    writer.write(request() + request())
    for _ in range(2):
        response = await read_response(reader)
        assert response.headers["content-length"] == "11"
        assert "transfer-encoding" not in response.headers
        assert response.body == b"hello world"


@pytest.mark.parametrize("streamed", [False, True], ids=["send", "start"])
async def test_a_head_request_gets_the_head_and_no_body(serve, streamed):
    async def handler(request: Request) -> None:
        if streamed:
            request.reply.start(200, [], 5)
            await request.reply.write(b"hello")
            request.reply.end()
        else:
            request.reply.send(200, [], b"hello")

    served = await serve(handler)
    reader, writer = await served.connect()
    writer.write(request("HEAD", "/") + request("GET", "/"))
    head = await read_response(reader, "HEAD")
    assert head.status == 200 and head.headers["content-length"] == "5"
    assert not head.closes
    # what follows the HEAD answer's head is the next answer, not a body
    after = await read_response(reader)
    assert (after.status, after.body) == (200, b"hello")


@pytest.mark.parametrize("status", [204, 304])
@pytest.mark.parametrize("streamed", [False, True], ids=["send", "start"])
async def test_bodyless_statuses_get_no_length_and_no_body(serve, status, streamed):
    async def handler(request: Request) -> None:
        if request.path == "/next":
            request.reply.send(200, [], b"next")
        elif streamed:
            request.reply.start(status, [], None)
            await request.reply.write(b"ignored")
            request.reply.end()
        else:
            request.reply.send(status, [], b"")

    served = await serve(handler)
    reader, writer = await served.connect()
    writer.write(request() + request(target="/next"))
    response = await read_response(reader)
    assert response.status == status
    assert "content-length" not in response.headers
    assert "transfer-encoding" not in response.headers
    after = await read_response(reader)
    assert (after.status, after.body) == (200, b"next")


# -- 9. handlers that fail -------------------------------------------------------------------

async def test_a_handler_that_raises_gets_a_500_and_the_server_serves_on(serve):
    async def handler(request: Request) -> None:
        if request.path == "/boom":
            raise ValueError("boom")
        request.reply.send(200, [], b"fine")

    served = await serve(handler)
    reader, writer = await served.connect()
    writer.write(request(target="/boom"))
    response = await read_response(reader)
    assert response.status == 500
    assert isinstance(response.json()["error"], str)
    writer.write(request(target="/ok"))  # the same connection
    assert (await read_response(reader)).body == b"fine"
    other_reader, other_writer = await served.connect()  # and another one
    other_writer.write(request(target="/ok"))
    assert (await read_response(other_reader)).body == b"fine"


async def test_a_handler_that_returns_without_answering_gets_a_500(serve):
    async def handler(request: Request) -> None:
        return None

    served = await serve(handler)
    reader, writer = await served.connect()
    writer.write(request())
    response = await read_response(reader)
    assert response.status == 500
    assert isinstance(response.json()["error"], str)


@pytest.mark.parametrize("how", ["returns", "raises"])
async def test_a_stream_left_unfinished_cuts_the_connection(serve, how):
    async def handler(request: Request) -> None:
        request.reply.start(200, [], None)
        await request.reply.write(b"partial")
        if how == "raises":
            raise RuntimeError("mid-stream")

    served = await serve(handler)
    reader, writer = await served.connect()
    writer.write(request() + request(target="/second"))
    response = await read_head(reader)
    assert response.status == 200 and response.headers["transfer-encoding"] == "chunked"
    rest_of_it = await cut(reader)
    assert rest_of_it.startswith(b"7\r\npartial\r\n") or rest_of_it == b""
    assert not rest_of_it.endswith(b"0\r\n\r\n")
    assert b"HTTP/1.1" not in rest_of_it  # no 500 and no answer to the second request


# -- 10. an early answer to a body still arriving --------------------------------------------

async def send_body(writer: asyncio.StreamWriter, size: int, piece: int = 64 * 1024,
                    pause: float = 0.002) -> None:
    sent = 0
    while sent < size:
        writer.write(b"x" * min(piece, size - sent))
        sent += min(piece, size - sent)
        await writer.drain()
        await asyncio.sleep(pause)


@pytest.mark.parametrize("delay", [0.0, 0.2], ids=["answer-at-once", "answer-after-a-wait"])
async def test_an_early_answer_reaches_a_client_still_sending_its_body(serve, delay):
    """The handler answers without reading the body (at once, or after awaiting something
    while more than the 256 KiB buffer of body arrives); the client keeps sending its body,
    gets the whole answer and then a clean close, not a reset."""
    size = 4 * 1024 * 1024

    async def handler(request: Request) -> None:
        await asyncio.sleep(delay)
        request.reply.send_json(413, {"error": "too large"})

    served = await serve(handler)
    reader, writer = await served.connect()
    writer.write(request("POST", "/up", headers=[("Content-Length", str(size))]))
    sending = asyncio.create_task(send_body(writer, size))
    try:
        response = await read_response(reader, timeout=2)
        assert response.status == 413 and response.json() == {"error": "too large"}
        assert response.closes
        await asyncio.wait_for(sending, 3)  # the server reads (and drops) the whole body
        assert await rest(reader, 1) == b""  # then closes cleanly, long before its 10 s linger
    finally:
        sending.cancel()


# -- 11. backpressure ------------------------------------------------------------------------

def writes_wait(served: Served) -> bool:
    """The server's transport to the client is full: its writers wait (pause_writing)."""
    return any(conn.writable is not None for conn in served.front.connections)


async def test_a_stream_to_a_client_that_does_not_read_waits_in_write(serve):
    size, piece = 20 * 1024 * 1024, 64 * 1024
    progress = {"written": 0, "done": False}

    async def handler(request: Request) -> None:
        request.reply.start(200, [], size)
        data = b"z" * piece
        while progress["written"] < size:
            await request.reply.write(data)
            progress["written"] += piece
        request.reply.end()
        progress["done"] = True

    served = await serve(handler)
    reader, writer = await served.connect()
    writer.write(request())
    response = await read_head(reader)
    assert response.headers["content-length"] == str(size)
    await wait_until(lambda: writes_wait(served), WAIT)  # the transport's buffer is full
    assert not progress["done"]
    assert progress["written"] < size
    received = 0
    async with timeouts.timeout(5):
        while received < size:
            received += len(await reader.read(1024 * 1024))
    assert received == size
    await wait_until(lambda: progress["done"], WAIT)


async def test_a_client_that_leaves_during_backpressure_ends_its_handler(serve):
    outcome = asyncio.get_running_loop().create_future()

    async def handler(request: Request) -> None:
        request.reply.start(200, [], None)
        try:
            while True:
                await request.reply.write(b"z" * 65536)
        except BaseException as exc:
            outcome.set_result(type(exc))
            raise

    served = await serve(handler)
    reader, writer = await served.connect()
    writer.write(request())
    await read_head(reader)
    await wait_until(lambda: writes_wait(served), WAIT)  # the handler's writes wait now
    assert not outcome.done()
    writer.transport.abort()
    ended = await asyncio.wait_for(outcome, WAIT)
    assert issubclass(ended, (asyncio.CancelledError, ConnectionError))


# -- 12. shutdown ----------------------------------------------------------------------------

async def test_pre_shutdown_closes_idle_connections_and_busy_ones_after_their_answer(serve):
    gate, busy = asyncio.Event(), asyncio.Event()

    async def handler(request: Request) -> None:
        if request.path == "/slow":
            busy.set()
            await gate.wait()
        request.reply.send(200, [], request.path.encode())

    served = await serve(handler)
    idle_reader, idle_writer = await served.connect()
    idle_writer.write(request(target="/quick"))
    assert not (await read_response(idle_reader)).closes  # a kept-alive, now idle connection
    fresh_reader, _ = await served.connect()  # a connection that never sent anything
    busy_reader, busy_writer = await served.connect()
    busy_writer.write(request(target="/slow"))
    await asyncio.wait_for(busy.wait(), WAIT)

    served.front.pre_shutdown()
    assert await rest(idle_reader) == b""
    assert await rest(fresh_reader) == b""
    assert await still_open(busy_reader)  # busy: not cut
    gate.set()
    response = await read_response(busy_reader)
    assert (response.status, response.body) == (200, b"/slow")
    assert response.closes
    assert await rest(busy_reader) == b""
    started = time.monotonic()
    await served.front.shutdown(10.0)
    assert time.monotonic() - started < 5  # nothing left in progress: no wait for the timeout
    assert served.front.connections == set()


async def test_shutdown_cuts_a_handler_that_does_not_finish_in_time(serve):
    handler, started, cancelled = waits_to_be_cancelled()

    served = await serve(handler)
    reader, writer = await served.connect()
    writer.write(request())
    await asyncio.wait_for(started.wait(), WAIT)
    served.front.pre_shutdown()
    begun = time.monotonic()
    await served.front.shutdown(0.2)
    assert 0.15 < time.monotonic() - begun < 3  # the timeout cut it, generously bounded
    await asyncio.wait_for(cancelled.wait(), WAIT)
    assert b"HTTP/1.1" not in await cut(reader)


# -- 13. what a review found: desync, unbounded buffering, trailers, slow readers ------------

async def test_an_upgrade_request_with_a_body_is_refused_whole(serve):
    """llhttp does not parse the body of an Upgrade request: forwarding its Content-Length
    without the body would leave the backend connection waiting for bytes of the next
    request."""
    handler, seen = recording()

    served = await serve(handler)
    reader, writer = await served.connect()
    writer.write(request(target="/health", headers=[("Connection", "Upgrade"), ("Upgrade", "x"),
                                                    ("Content-Length", "300000")]))
    response = await read_response(reader)
    assert response.status == 400 and "Upgrade" in response.json()["error"]
    assert response.closes and await rest(reader) == b""
    assert seen == []


async def test_one_endless_header_line_is_431_without_buffering_it(serve, caplog):
    """llhttp hands a header over only once it is whole, so the server counts what it fed."""
    served = await serve(echo_target)
    reader, writer = await served.connect()
    writer.write(b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: ")
    try:
        for _ in range(64):  # up to 4 MiB of one header value, never ended
            writer.write(b"a" * 65536)
            await writer.drain()
    except ConnectionError:
        pass  # refused and closed before all of it went out
    answer = await cut(reader)  # the 431, or a reset when it closed on bytes still coming
    assert answer == b"" or answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert "431 request header field larger" in caplog.text
    assert not served.front.connections


async def test_pipelined_requests_wait_in_a_bounded_line(serve):
    release = asyncio.Event()

    async def blocked(request: Request) -> None:
        await release.wait()
        request.reply.send(200, [], b"ok")

    served = await serve(blocked)
    reader, writer = await served.connect()
    one = request(target="/a")
    writer.write(one * (1024 * 1024 // len(one)))  # 1 MiB of pipelined requests
    await wait_until(lambda: any(c.reading_paused for c in served.front.connections), WAIT)
    [conn] = served.front.connections
    # the one served, 16 more, and what one slice of heads held
    assert len(conn.waiting) <= 1 + MAX_PIPELINED + HEAD_SLICE // len(one), len(conn.waiting)
    assert len(conn.backlog) > 0  # the rest is still bytes, not parsed requests
    release.set()
    for _ in range(40):  # and they are all answered in turn
        assert (await read_response(reader)).status == 200


async def test_trailer_fields_are_not_merged_into_the_head(serve):
    seen = []

    async def handler(request: Request) -> None:
        body = b""
        while chunk := await request.body.read():
            body += chunk
        seen.append((body, [name for name, _ in request.raw_headers]))
        request.reply.send(200, [], b"ok")

    served = await serve(handler)
    reader, writer = await served.connect()
    writer.write(request("POST", "/t", headers=[("Transfer-Encoding", "chunked")])
                 + b"3\r\nabc\r\n0\r\nX-From-Trailer: injected\r\nAuthorization: x\r\n\r\n")
    assert (await read_response(reader)).status == 200
    [(body, names)] = seen
    assert body == b"abc"
    assert b"X-From-Trailer" not in names and b"Authorization" not in names


@pytest.mark.parametrize("name", ["Host", "Content-Length", "Transfer-Encoding", "Content-Type"])
async def test_a_repeated_singleton_header_is_400(serve, name):
    served = await serve(echo_target)
    reader, writer = await served.connect()
    value = {"Content-Length": "0", "Transfer-Encoding": "chunked"}.get(name, "a")
    writer.write(b"POST / HTTP/1.1\r\nHost: x\r\n" + f"{name}: {value}\r\n".encode() * 2
                 + (b"" if name == "Host" else f"{name}: {value}\r\n".encode()) + b"\r\n")
    response = await read_response(reader)
    assert response.status == 400 and response.closes


async def test_expect_on_http10_is_ignored(serve):
    served = await serve(echo_target)
    reader, writer = await served.connect()
    writer.write(request(target="/old", version="1.0", headers=[("Expect", "something")]))
    response = await read_response(reader)
    assert (response.status, response.body) == (200, b"/old")


async def test_a_client_that_takes_nothing_for_the_write_timeout_is_cut(serve):
    cut_off = asyncio.get_running_loop().create_future()

    async def flood(request: Request) -> None:
        request.reply.start(200, [], None)
        try:
            for _ in range(400):
                await request.reply.write(b"x" * 65536)
        except ConnectionError as exc:
            cut_off.set_result(exc)
            raise

    served = await serve(flood, write_timeout=0.3)
    reader, writer = await served.connect()
    started = time.monotonic()
    writer.write(request(target="/flood"))
    error = await asyncio.wait_for(cut_off, 10)
    assert "took nothing" in str(error), error
    assert time.monotonic() - started < 5  # the 0.3 s write timeout, generously bounded


async def test_a_failure_after_a_whole_answer_leaves_the_answer_intact(serve):
    async def handler(request: Request) -> None:
        request.reply.send(200, [], b"done")
        raise RuntimeError("bookkeeping failed after the answer")

    served = await serve(handler)
    reader, writer = await served.connect()
    writer.write(request(target="/a") + request(target="/b"))
    for _ in range(2):
        response = await read_response(reader)
        assert (response.status, response.body) == (200, b"done")


async def test_an_endless_trailer_field_fails_the_body_without_buffering_it(serve):
    errors = []

    async def handler(request: Request) -> None:
        try:
            while await request.body.read():
                pass
        except BodyError as exc:
            errors.append(str(exc))
            request.reply.send(400, [], b"bad body")
            return
        request.reply.send(200, [], b"whole")

    served = await serve(handler)
    reader, writer = await served.connect()
    writer.write(request("POST", "/t", headers=[("Transfer-Encoding", "chunked")])
                 + b"3\r\nabc\r\n0\r\nX-Trailer: ")
    try:
        for _ in range(64):  # up to 4 MiB of one trailer value, never ended
            writer.write(b"a" * 65536)
            await writer.drain()
    except ConnectionError:
        pass
    answer = await cut(reader)
    assert answer == b"" or answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert errors and "header field larger" in errors[0], errors
    assert not served.front.connections


# -- memory ----------------------------------------------------------------------------------

async def test_nothing_a_request_leaves_behind_needs_the_gc(serve):
    """A request, its reply, its body and a closed connection are freed by reference counting
    alone: left in reference cycles, they cost about 9 µs of CPU a request at 32 connections
    (the GC walking them) and pauses of several ms."""
    waits, started, cancelled = waits_to_be_cancelled()

    async def handler(request: Request) -> None:
        await request.body.read()
        if request.target == "/stream":
            await stream_hello_world(request)
        elif request.target == "/wait":
            await waits(request)
        else:
            request.reply.send(200, [], b"whole")

    served = await serve(handler)
    before = asyncio.all_tasks()
    with left_to_the_gc() as left:
        reader, writer = await served.connect()
        for target in ("/a", "/stream", "/b", "/stream"):  # one keep-alive connection
            writer.write(request("POST", target, body=b"{}"))
            assert (await read_response(reader)).status == 200
        reader, writer = await served.connect()
        writer.write(request(version="1.0"))  # answered, then closed by the server
        assert (await read_response(reader)).closes and await rest(reader) == b""
        reader, writer = await served.connect()
        writer.write(request(target="/wait"))  # the client leaves while it is served
        await asyncio.wait_for(started.wait(), WAIT)
        writer.close()
        await asyncio.wait_for(cancelled.wait(), WAIT)
        await wait_until(lambda: asyncio.all_tasks() <= before, WAIT)  # the handler unwound
        assert len(served.front.connections) == 1  # the keep-alive one
    assert not left, left


@pytest.mark.parametrize("sent,status,served_first", [
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, False),  # refused head
    (b"POST / HTTP/1.1\r\nHost: a\r\nExpect: x\r\nContent-Length: 1\r\n\r\nx", 417, False),
    (b"GET /x HTTP/1.1\r\nHost: a\r\n", None, False),  # the client leaves mid-head
    (request(target="/1") + request(target="/2") + request(target="/3"), None, True),  # leaves
], ids=["refused", "unknown-expect", "left-mid-head", "left-with-requests-in-line"])
async def test_requests_never_served_leave_nothing_for_the_gc(serve, sent, status, served_first):
    waits, started, cancelled = waits_to_be_cancelled()
    served = await serve(waits)
    with left_to_the_gc() as left:
        reader, writer = await served.connect()
        writer.write(sent)
        if status is not None:
            assert (await read_response(reader)).status == status
            assert await rest(reader) == b""
        else:
            if served_first:  # the first request is being served, the others wait in line
                await asyncio.wait_for(started.wait(), WAIT)
                await wait_until(lambda: any(len(c.waiting) == 3
                                             for c in served.front.connections), WAIT)
            else:  # the server is reading the head
                await wait_until(lambda: any(c.parsing is not None
                                             for c in served.front.connections), WAIT)
            writer.close()
            if served_first:
                await asyncio.wait_for(cancelled.wait(), WAIT)
        await wait_until(lambda: not served.front.connections, WAIT)  # the server saw it end
    assert not left, left
