"""The worker's public HTTP/1.1 server: llhttp (httptools) parses, a task per request, bytes out.

aiohttp's server builds, for every request, a URL, a header multidict, a payload stream, a
request object, a response object and a second task; on the 2-core perf setup that machinery
cost the worker about 14 µs of its 70 µs per small request (perf/README.md). This server keeps
what the worker uses:

- HTTP/1.0 and 1.1, keep-alive, pipelined requests answered in order, chunked request bodies
  (decoded by llhttp), ``Expect: 100-continue`` (sent when the handler first reads the body;
  any other expectation gets 417);
- limits: request target 8190 bytes (414), header block 64 KiB or 128 fields (431); a repeated
  Host, Content-Length, Content-Type, Transfer-Encoding (and the rest of aiohttp's singletons),
  an Upgrade request with a body, and anything llhttp refuses get 400; each answer closes the
  connection, after the answers to the requests before it; trailer fields are dropped;
- a connection with no request in progress for ``keepalive_timeout`` seconds is closed, also
  one that never finishes its request head;
- bytes are parsed a slice at a time (16 KiB of body, 1 KiB otherwise): a request body is
  buffered up to 256 KiB and 16 pipelined requests (plus one slice's worth) wait, then
  nothing more is parsed or read until the handler catches up;
- answers are written whole (one write) or streamed (chunked when the length is unknown), with
  backpressure; a client that takes nothing of an answer for ``write_timeout`` seconds is cut;
  a client that goes away cancels its request's task;
- a body left unread when its answer is complete is read and dropped for up to 10 s before the
  connection closes, so the client gets the answer rather than a reset.

It is a protocol factory with ``pre_shutdown``/``shutdown``, which is what aiohttp's runner and
sites need of a server: listening sockets, TLS and the test server stay aiohttp's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections import deque
from email.utils import formatdate
from typing import Any

import httptools
from mypy_extensions import mypyc_attr

from . import timeouts

log = logging.getLogger("vespa.front")

MAX_TARGET = 8190
MAX_HEAD = 64 * 1024
MAX_FIELDS = 128
BODY_HIGH_WATER = 256 * 1024
MAX_PIPELINED = 16
FEED_SLICE = 16 * 1024  # bytes handed to llhttp at a time, so a pause takes effect between them
HEAD_SLICE = 1024  # ... outside bodies: one slice holds only a few dozen request heads
LINGER_SECONDS = 10.0
# repeated, these make a request ambiguous (which Host? which length?): refused, as aiohttp does
SINGLETON_FIELDS = frozenset({
    b"content-length", b"content-location", b"content-range", b"content-type", b"etag",
    b"host", b"max-forwards", b"server", b"transfer-encoding", b"user-agent",
})
BODYLESS_STATUSES = frozenset({204, 304})
JSON_TYPE = b"application/json; charset=utf-8"
REASONS = {
    100: b"Continue", 200: b"OK", 201: b"Created", 202: b"Accepted", 204: b"No Content",
    206: b"Partial Content", 301: b"Moved Permanently", 302: b"Found", 304: b"Not Modified",
    400: b"Bad Request", 401: b"Unauthorized", 403: b"Forbidden", 404: b"Not Found",
    405: b"Method Not Allowed", 408: b"Request Timeout", 413: b"Payload Too Large",
    414: b"URI Too Long", 417: b"Expectation Failed", 422: b"Unprocessable Entity",
    429: b"Too Many Requests", 431: b"Request Header Fields Too Large",
    499: b"Client Closed Request", 500: b"Internal Server Error", 502: b"Bad Gateway",
    503: b"Service Unavailable", 504: b"Gateway Timeout",
}


class HttpError(Exception):
    """A request this server refuses before any handler sees it."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class RefusalLog:
    """Requests refused as malformed are the client's fault: at most one WARNING line per
    ``interval`` seconds, with how many there were, so a hostile client cannot flood the log."""

    def __init__(self, interval: float = 60.0):
        self.interval = interval
        self.next_at = 0.0
        self.suppressed = 0

    def note(self, peer: str, error: HttpError) -> None:
        now = time.monotonic()
        if now < self.next_at:
            self.suppressed += 1
            return
        self.next_at = now + self.interval
        more = (f" ({self.suppressed} more in the last {self.interval:g}s)"
                if self.suppressed else "")
        self.suppressed = 0
        log.warning("refused a malformed request from %s: %d %s%s", peer, error.status,
                    " ".join(error.message.split())[:200], more)


@mypyc_attr(native_class=False)  # a builtin exception's subclass stays a Python class
class BodyError(ConnectionError):
    """The request body cannot be read to its end: malformed framing, or the client left."""


_date_second = -1
_date_value = b""


def http_date() -> bytes:
    """The current time as an HTTP date, made at most once a second."""
    global _date_second, _date_value
    now = int(time.time())
    if now != _date_second:
        _date_second, _date_value = now, formatdate(now, usegmt=True).encode()
    return _date_value


class Body:
    """A request body as it arrives; the handler takes it chunk by chunk or whole."""

    __slots__ = ("conn", "chunks", "buffered", "complete", "error", "waiter", "expects_continue",
                 "discard", "abandoned")

    def __init__(self, conn: "Connection", complete: bool, expects_continue: bool):
        self.conn = conn
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.complete = complete
        self.error: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.expects_continue = expects_continue and not complete
        self.discard = False  # the answer is done: what still arrives is dropped
        self.abandoned = False  # the client stalled: close without waiting for the rest

    def feed(self, data: bytes) -> None:
        if self.discard:
            return
        self.chunks.append(data)
        self.buffered += len(data)
        if self.buffered > BODY_HIGH_WATER:
            self.conn.pause_reading()
        self._wake()

    def finish(self) -> None:
        self.complete = True
        self._wake()

    def fail(self, error: BaseException) -> None:
        if not self.complete:
            self.error = error
            self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def take(self) -> bytes:
        """Everything buffered so far (b"" when nothing is); reading resumes."""
        chunks = self.chunks
        if not chunks:
            return b""
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.buffered = 0
        self.conn.resume_reading()
        return data

    async def read(self) -> bytes:
        """The next bytes of the body (all that is buffered), b"" at its end; ``BodyError`` when
        it cannot be read to its end."""
        if self.expects_continue:
            self.expects_continue = False
            if not self.complete:
                self.conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        while not self.chunks:
            if self.error is not None:
                raise self.error
            if self.complete:
                return b""
            if self.discard:
                raise BodyError("the answer went out before the request body was read")
            self.waiter = self.conn.loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        return self.take()


class Request:
    """One request's head and body, as the handler sees it."""

    __slots__ = ("method", "target", "version", "raw_headers", "fields", "keep_alive",
                 "content_length", "chunked", "body", "conn", "reply")

    def __init__(self, conn: "Connection"):
        self.conn = conn
        self.method = ""
        self.target = ""
        self.version = "1.1"
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.fields: dict[bytes, bytes] = {}  # lower-case name -> first value
        self.keep_alive = True
        self.content_length: int | None = None
        self.chunked = False
        self.body: Body | None = None  # set with the head: every request served has one
        self.reply: Reply | None = None  # while it is served

    def header(self, name: bytes) -> str | None:
        """The first value of a header (``name`` in lower case), or None."""
        value = self.fields.get(name)
        return None if value is None else value.decode("latin-1")

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def query_string(self) -> str:
        return self.target.partition("?")[2]

    @property
    def remote(self) -> str:
        return self.conn.peer

    @property
    def scheme(self) -> str:
        return self.conn.scheme

    def close_after(self) -> None:
        """Close the connection after this answer (its body will not be read to the end):
        what is buffered and what still arrives is dropped."""
        self.keep_alive = False
        body = self.body
        assert body is not None
        body.discard = True
        body.chunks.clear()
        body.buffered = 0

    def give_up(self) -> None:
        """The body stalled: close right after the answer, without reading the rest."""
        self.close_after()
        assert self.body is not None
        self.body.abandoned = True


class Reply:
    """The answer to one request: written whole, or streamed with a head first (held until the
    first piece of body or ``flush``, so a stream whose body is already there starts in one
    write)."""

    __slots__ = ("request", "started", "ended", "chunked", "bodyless", "held")

    def __init__(self, request: Request):
        self.request = request
        self.started = False
        self.ended = False
        self.chunked = False
        self.bodyless = False
        self.held = b""  # a streamed answer's head, not written yet

    def _head(self, status: int, reason: bytes, headers, framing: bytes) -> list[bytes]:
        request = self.request
        self.started = True
        self.bodyless = request.method == "HEAD" or status in BODYLESS_STATUSES \
            or status < 200
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason or REASONS.get(status, b""))]
        for name, value in headers:
            lines += (name, b": ", value, b"\r\n")
        body = request.body
        assert body is not None
        if not body.complete:
            request.close_after()  # the rest of an unread body is dropped, then we close
        if not request.keep_alive or request.conn.server.closing:
            request.keep_alive = False
            lines.append(b"Connection: close\r\n")
        elif request.version == "1.0":
            lines.append(b"Connection: keep-alive\r\n")
        lines += (framing, b"\r\n")
        return lines

    def send(self, status: int, headers, body: bytes = b"", reason: bytes = b"") -> None:
        """The whole answer in one write (``headers``: bytes pairs; framing is added here)."""
        framing = b"" if status in BODYLESS_STATUSES or status < 200 else \
            b"Content-Length: %d\r\n" % len(body)
        lines = self._head(status, reason, headers, framing)
        if not self.bodyless:
            lines.append(body)
        self.ended = True
        self.request.conn.write(b"".join(lines))

    def send_json(self, status: int, document, headers=()) -> None:
        body = json.dumps(document).encode()
        self.send(status, [(b"Content-Type", JSON_TYPE),
                           (b"Date", http_date()), *headers], body)

    def start(self, status: int, headers, length: int | None, reason: bytes = b"") -> None:
        """The head of a streamed answer; ``length`` None streams chunked (HTTP/1.1) or until
        the connection closes (HTTP/1.0)."""
        if status in BODYLESS_STATUSES or status < 200:
            framing = b""
        elif length is not None:
            framing = b"Content-Length: %d\r\n" % length
        elif self.request.method == "HEAD":
            framing = b""
        elif self.request.version == "1.1":
            framing = b"Transfer-Encoding: chunked\r\n"
            self.chunked = True
        else:
            framing = b""
            self.request.keep_alive = False  # the end of the body is the end of the connection
        self.held = b"".join(self._head(status, reason, headers, framing))

    def flush(self) -> None:
        """Write the held head now (its body is not there yet)."""
        if self.held:
            self.request.conn.write(self.held)
            self.held = b""

    async def write(self, data: bytes) -> None:
        """One piece of a streamed body; waits while the client is slow. ConnectionError when
        the client is gone."""
        if self.bodyless or not data:
            return
        conn = self.request.conn
        if conn.lost:
            raise ConnectionResetError("client closed the connection")
        if self.chunked:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        if self.held:
            data, self.held = self.held + data, b""
        conn.write(data)
        await conn.drain()

    def end(self) -> None:
        if not self.ended:
            self.ended = True
            tail = b"0\r\n\r\n" if self.chunked else b""
            if self.held or tail:
                self.request.conn.write(self.held + tail)
                self.held = b""

    def abort(self) -> None:
        """Cut the connection: the client must not take a broken answer for a whole one."""
        self.request.keep_alive = False
        self.request.conn.abort()


def error_answer(status: int, message: str) -> bytes:
    body = json.dumps({"error": message}).encode()
    return b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nDate: %s\r\n" \
           b"Connection: close\r\n\r\n%s" % (
               status, REASONS.get(status, b""), JSON_TYPE, len(body), http_date(), body)


class Connection:
    """One client connection: parses requests and serves them one at a time, in order. (An
    asyncio protocol by its methods: no base class, so the compiled hot path can make it a
    native class.)"""

    def __init__(self, server: "FrontServer"):
        self.server = server
        self.loop = server.loop
        # None once the connection is lost (it holds our callbacks: a cycle for the GC)
        self.parser: Any = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport  # set by connection_made, before anything else
        self.peer = ""
        self.scheme = "http"
        self.parsing: Request | None = None  # the request whose head or body is arriving
        self.head_size = 0
        self.url = b""
        self.backlog = b""  # bytes received but not parsed yet (parsing paused)
        self.unclaimed = 0  # bytes given to llhttp that no callback has taken yet
        self.progress = False  # a callback took bytes during the current feed
        self.waiting: deque[Request] = deque()  # heads complete, not yet served
        self.task: asyncio.Task | None = None  # serving the first request in line
        self.lost = False
        self.refused: HttpError | None = None  # answered once the requests before it are
        self.reading_paused = False
        self.writable: asyncio.Future[None] | None = None
        self.idle_since = 0.0
        self.timer: asyncio.TimerHandle | None = None

    # -- asyncio protocol ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if isinstance(peer, (tuple, list)) else str(peer or "")
        if transport.get_extra_info("sslcontext") is not None:
            self.scheme = "https"
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)  # a peer gone silently
        self.server.connections.add(self)
        self.go_idle()

    def data_received(self, data: bytes) -> None:
        if self.refused is not None:
            return
        if self.backlog:
            self.backlog += data
        else:
            self.backlog = data
        self.feed()

    def feed(self) -> None:
        """Parse what has arrived, a slice at a time; what is left when parsing must pause
        (too much buffered or waiting) stays in ``backlog`` until the handler catches up."""
        data, self.backlog = self.backlog, b""
        view = memoryview(data) if len(data) > HEAD_SLICE else data
        at = 0
        while at < len(data):
            if self.refused is not None or self.lost:
                return
            if self.reading_paused:
                self.backlog = bytes(view[at:])
                return
            size = HEAD_SLICE if self.parsing is None or self.parsing.body is None \
                else FEED_SLICE
            piece = view[at:at + size]
            at += size
            self.progress = False
            try:
                self.parser.feed_data(piece)
            except httptools.HttpParserUpgrade:
                # an Upgrade/CONNECT head: served as an ordinary request (the backend sees no
                # Upgrade header), and nothing after it is read
                self.refuse(None)
                return
            except httptools.HttpParserError as exc:
                cause = exc.__context__
                self.refuse(cause if isinstance(cause, HttpError) else
                            HttpError(400, f"malformed HTTP request: {exc}"))
                return
            # httptools hands a header (or trailer) field over only once it is whole and holds
            # the pieces until then: count the bytes fed since a callback last took some
            self.unclaimed = len(piece) if self.progress else self.unclaimed + len(piece)
            if self.unclaimed > MAX_TARGET + MAX_HEAD:
                self.refuse(HttpError(431, f"request header field larger than {MAX_HEAD} bytes"))
                return

    def eof_received(self) -> bool | None:
        return None  # a half-closed client is gone: the transport closes, its request cancels

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.parser = None  # it holds our callbacks: without it the connection needs no GC
        self.server.connections.discard(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        gone = BodyError("client closed the connection")
        if self.parsing is not None and self.parsing.body is not None:
            self.parsing.body.fail(gone)
        for request in self.waiting:
            assert request.body is not None  # its head is whole
            request.body.fail(gone)
        self.parsing = None
        self.waiting.clear()  # requests point back at us: drop them, no cycle is left behind
        if self.task is not None and not self.task.done():
            self.task.cancel()
        if self.writable is not None and not self.writable.done():
            self.writable.set_exception(ConnectionResetError("client closed the connection"))
            self.writable.exception()

    def pause_writing(self) -> None:
        if self.writable is None:
            self.writable = self.loop.create_future()

    def resume_writing(self) -> None:
        if self.writable is not None and not self.writable.done():
            self.writable.set_result(None)
        self.writable = None

    # -- llhttp callbacks ----------------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.refused is not None:  # the connection is closing: nothing more is served
            raise HttpError(0, "")
        self.parsing = Request(self)
        self.head_size = 0
        self.url = b""
        self.progress = True

    def on_url(self, url: bytes) -> None:
        self.head_size += len(url)
        if self.head_size > MAX_TARGET:
            raise HttpError(414, f"request target longer than {MAX_TARGET} bytes")
        self.url += url  # it may come in pieces
        self.progress = True

    def on_header(self, name: bytes, value: bytes) -> None:
        request = self.parsing
        assert request is not None  # llhttp calls back between on_message_begin and its end
        self.progress = True
        self.head_size += len(name) + len(value) + 4
        if self.head_size > MAX_HEAD or len(request.raw_headers) >= MAX_FIELDS:
            raise HttpError(431, f"request head larger than {MAX_HEAD} bytes or "
                                 f"{MAX_FIELDS} header fields")
        if request.body is not None:
            return  # a trailer field after a chunked body: never merged into the head
        lowered = name.lower()
        if lowered in request.fields and lowered in SINGLETON_FIELDS:
            raise HttpError(400, f"repeated {name.decode('latin-1')} header")
        request.raw_headers.append((name, value))
        request.fields.setdefault(lowered, value)

    def on_headers_complete(self) -> None:
        request, parser = self.parsing, self.parser
        assert request is not None
        request.target = self.url.decode("utf-8", "surrogateescape")  # as aiohttp's parser does
        request.method = parser.get_method().decode("ascii")
        request.version = parser.get_http_version()
        request.keep_alive = parser.should_keep_alive()
        fields = request.fields
        length = fields.get(b"content-length")
        if length is not None:
            request.content_length = int(length)  # llhttp has checked it is digits
        coding = fields.get(b"transfer-encoding")
        if coding is not None:
            # llhttp refuses a request whose last coding is not chunked only after this callback
            if coding.rsplit(b",", 1)[-1].strip().lower() != b"chunked":
                raise HttpError(400, "Transfer-Encoding of a request must end with chunked")
            request.chunked = True
        if parser.should_upgrade() and request.has_body:
            # llhttp would not parse the body of an Upgrade/CONNECT request: refuse it whole
            raise HttpError(400, "an Upgrade or CONNECT request cannot carry a body here")
        expect = fields.get(b"expect") if request.version == "1.1" else None  # 1.0: ignored
        if expect is not None and expect.lower() != b"100-continue":
            raise HttpError(417, f"unknown Expect: {expect.decode('latin-1')!r}")
        request.body = Body(self, not request.has_body, expect is not None)
        self.waiting.append(request)
        if self.task is None:
            self.serve_next()
        elif len(self.waiting) > MAX_PIPELINED:
            self.pause_reading()

    def on_body(self, data: bytes) -> None:
        self.progress = True
        assert self.parsing is not None and self.parsing.body is not None
        self.parsing.body.feed(data)

    def on_message_complete(self) -> None:
        request, self.parsing = self.parsing, None
        assert request is not None and request.body is not None
        request.body.finish()
        if request.body.discard and self.task is None:
            self.refused = HttpError(0, "")  # its answer is out: close, serve nothing more
            self.close()

    # -- serving -------------------------------------------------------------------------------
    def serve_next(self) -> None:
        if self.lost:
            return
        if self.waiting:
            self.idle_since = 0.0  # busy: the idle timer lapses, go_idle arms it again
            self.task = self.loop.create_task(self.serve(self.waiting[0]))
        elif self.refused is not None:
            self.answer_refusal()
        else:
            self.go_idle()

    async def serve(self, request: Request) -> None:
        # the request and its reply point at each other only while it is served: the finally
        # below breaks the cycle, so neither needs the GC (a request never served has no reply)
        reply = request.reply = Reply(request)
        try:
            await self.server.handler(request)
            if not reply.started:
                raise RuntimeError("the handler returned without answering")
            if not reply.ended:
                reply.abort()  # the handler left a stream unfinished: cut, never fake an end
        except asyncio.CancelledError:
            if self.lost:  # the client went away: nothing left to answer
                return
            raise
        except Exception:
            log.exception("request %s %s failed", request.method, request.target[:200])
            if reply.ended:
                pass  # the answer went out whole: the failure came after it
            elif reply.started:
                reply.abort()
            else:
                reply.send_json(500, {"error": "internal error in the worker; see its log"})
        finally:
            request.reply = None
        if self.writable is not None:  # a slow client takes the answer before the next request
            try:
                await self.drain()
            except ConnectionError:
                return
        self.finished(request)

    def finished(self, request: Request) -> None:
        self.task = None
        if self.lost:
            return
        self.waiting.popleft()
        if not request.keep_alive:
            body = request.body
            assert body is not None
            if body.complete or body.abandoned or body.error is not None \
                    or self.refused is not None or self.transport.is_closing():
                self.close()
            else:  # drop the rest of the body for a while so the client reads the answer
                self.resume_reading()  # on_message_complete closes at its end
                self.loop.call_later(LINGER_SECONDS, self.close)
            return
        self.resume_reading()
        self.serve_next()

    def refuse(self, error: HttpError | None) -> None:
        """Nothing more is read from this connection; ``error`` is answered after the requests
        already in line (None: they are answered, then the connection closes)."""
        parsing, self.parsing = self.parsing, None
        if parsing is not None and parsing.body is not None:
            # the head was whole: the fault is in the body, which its own handler answers
            parsing.body.fail(BodyError(error.message if error else "request cut short"))
            error = None
        if error is not None and error.status:
            self.server.refusals.note(self.peer, error)
        elif self.waiting:
            self.waiting[-1].keep_alive = False  # the last answer on this connection
        if error is not None:
            error.__traceback__ = None  # its frames (a parser callback's) hold this connection
        self.refused = error or HttpError(0, "")
        self.backlog = b""
        if self.task is None and not self.waiting:
            self.answer_refusal()

    def answer_refusal(self) -> None:
        error = self.refused
        if error is not None and error.status:
            self.write(error_answer(error.status, error.message))
        self.close()

    # -- idle timeout --------------------------------------------------------------------------
    def go_idle(self) -> None:
        self.idle_since = self.loop.time()
        if self.timer is None:
            self.timer = self.loop.call_later(self.server.keepalive_timeout, self.check_idle)

    def check_idle(self) -> None:
        self.timer = None
        if self.lost or not self.idle_since:
            return  # busy: the timer is armed again when the connection is idle
        left = self.idle_since + self.server.keepalive_timeout - self.loop.time()
        if left > 0:
            self.timer = self.loop.call_later(left, self.check_idle)
        else:
            self.close()

    @property
    def idle(self) -> bool:
        return self.task is None and not self.waiting

    # -- transport -----------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        transport = self.transport
        if not self.lost and not transport.is_closing():
            transport.write(data)

    async def drain(self) -> None:
        """Wait while the client is slow to take what was written; a client that takes nothing
        for ``write_timeout`` seconds is cut (ConnectionResetError)."""
        if self.writable is not None:
            try:
                async with timeouts.timeout(self.server.write_timeout):
                    await self.writable
            except asyncio.TimeoutError:
                self.abort()
                raise ConnectionResetError(f"client took nothing for "
                                           f"{self.server.write_timeout:g}s") from None

    def pause_reading(self) -> None:
        if not self.reading_paused and not self.lost:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and not self.lost:
            parsing = self.parsing
            if parsing is not None and parsing.body is not None \
                    and parsing.body.buffered > BODY_HIGH_WATER:
                return
            if len(self.waiting) > MAX_PIPELINED:
                return
            self.reading_paused = False
            self.transport.resume_reading()
            if self.backlog:
                self.loop.call_soon(self.feed)  # before anything newer arrives

    def close(self) -> None:
        if not self.lost:
            self.transport.close()

    def abort(self) -> None:
        if not self.lost:
            self.transport.abort()


class FrontServer:
    """The protocol factory aiohttp's sites listen with, and the connections it made."""

    def __init__(self, handler, *, keepalive_timeout: float = 75.0,
                 write_timeout: float = 600.0):
        self.handler = handler  # (Request) -> awaitable; answers through request.reply
        self.keepalive_timeout = keepalive_timeout
        self.write_timeout = write_timeout
        self.loop = asyncio.get_running_loop()
        self.connections: set[Connection] = set()
        self.closing = False
        self.refusals = RefusalLog()

    def __call__(self) -> Connection:
        return Connection(self)

    def pre_shutdown(self) -> None:
        """No new requests: idle connections close, busy ones close after their answer."""
        self.closing = True
        for conn in list(self.connections):
            if conn.idle:
                conn.close()

    async def shutdown(self, timeout: float | None = None) -> None:
        """Wait up to ``timeout`` for answers in progress, then cut what is left."""
        deadline = self.loop.time() + (timeout or 0)
        while any(not conn.idle for conn in self.connections) and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            if conn.task is not None:
                conn.task.cancel()
            conn.abort()
