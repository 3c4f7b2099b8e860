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
  buffered up to ``flow.HIGH_WATER`` and 16 pipelined requests (plus one slice's worth) wait,
  then nothing more is parsed or read until the handler catches up;
- answers are written whole (one write) or streamed (chunked when the length is unknown), with
  backpressure; a client that takes nothing of an answer for ``write_timeout`` seconds is cut;
  a client that goes away cancels its request's task;
- a body left unread when its answer is complete is read and dropped for up to 10 s before the
  connection closes, so the client gets the answer rather than a reset;
- a handler that raises gets a 500 (or a cut, when its answer had started); its traceback is
  logged once a minute at most, with how many more there were.

``FrontServer`` is the protocol factory for ``loop.create_server`` (which brings the listening
socket and TLS); its ``pre_shutdown``/``shutdown`` stop it gracefully.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from typing import Any

import httptools

from .flow import HIGH_WATER, FlowControl
from .limits import (MAX_FIELDS, MAX_HEAD, MAX_TARGET, SINGLETON_FIELDS, FailureLog,
                     RefusalLog, error_answer)
from .messages import Body, BodyError, HttpError, Reply, Request
from .target import redacted

MAX_PIPELINED = 16
FEED_SLICE = 16 * 1024  # bytes handed to llhttp at a time, so a pause takes effect between them
HEAD_SLICE = 1024  # ... outside bodies: one slice holds only a few dozen request heads
LINGER_SECONDS = 10.0


class Connection(FlowControl):
    """One client connection: parses requests and serves them one at a time, in order. (An
    asyncio protocol by its methods: no asyncio base class, so the compiled hot path can make it
    a native class.)"""

    def __init__(self, server: FrontServer):
        super().__init__(server.loop)
        self.server = server
        # None once the connection is lost (it holds our callbacks: a cycle for the GC)
        self.parser: Any = httptools.HttpRequestParser(self)
        self.peer = ""
        self.counted = True  # in the server's count of its client's connections
        self.callback_error: HttpError | None = None  # what a parser callback refused
        self.scheme = "http"
        self.parsing: Request | None = None  # the request whose head or body is arriving
        self.head_size = 0
        self.url = b""
        self.backlog = b""  # bytes received but not parsed yet (parsing paused)
        self.unclaimed = 0  # bytes given to llhttp that no callback has taken yet
        self.progress = False  # a callback took bytes during the current feed
        self.waiting: deque[Request] = deque()  # heads complete, not yet served
        self.task: asyncio.Task | None = None  # serving the first request in line
        self.refused: HttpError | None = None  # answered once the requests before it are
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
        if not self.server.admit(self.peer):
            self.counted = False
            self.refuse(HttpError(429, f"too many connections from {self.peer} (at most "
                                       f"{self.server.max_per_client}, "
                                       "VESPA_MAX_CLIENT_CONNECTIONS)"))
            return
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
            if self.refused is not None or self.closed:
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
                cause, self.callback_error = self.callback_error, None
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
        self.closed = True
        self.parser = None  # it holds our callbacks: without it the connection needs no GC
        self.server.connections.discard(self)
        if self.counted:
            self.server.leave(self.peer)
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
        self.fail_writers(ConnectionResetError("client closed the connection"))

    def refusing(self, error: HttpError) -> HttpError:
        """``error``, kept for ``feed``: what llhttp raises for a failed callback does not
        carry it reliably (compiled, its context is lost)."""
        self.callback_error = error
        return error

    # -- llhttp callbacks ----------------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.refused is not None:  # the connection is closing: nothing more is served
            raise self.refusing(HttpError(0, ""))
        self.parsing = Request(self)
        self.head_size = 0
        self.url = b""
        self.progress = True

    def on_url(self, url: bytes) -> None:
        self.head_size += len(url)
        if self.head_size > MAX_TARGET:
            raise self.refusing(HttpError(414, f"request target longer than {MAX_TARGET} bytes"))
        self.url += url  # it may come in pieces
        self.progress = True

    def on_header(self, name: bytes, value: bytes) -> None:
        request = self.parsing
        assert request is not None  # llhttp calls back between on_message_begin and its end
        self.progress = True
        self.head_size += len(name) + len(value) + 4
        if self.head_size > MAX_HEAD or len(request.raw_headers) >= MAX_FIELDS:
            raise self.refusing(HttpError(431, f"request head larger than {MAX_HEAD} bytes or "
                                 f"{MAX_FIELDS} header fields"))
        if request.body is not None:
            return  # a trailer field after a chunked body: never merged into the head
        lowered = name.lower()
        if lowered in request.fields and lowered in SINGLETON_FIELDS:
            raise self.refusing(HttpError(400, f"repeated {name.decode('latin-1')} header"))
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
                raise self.refusing(HttpError(400, "Transfer-Encoding of a request must end with chunked"))
            request.chunked = True
        if parser.should_upgrade() and request.has_body:
            # llhttp would not parse the body of an Upgrade/CONNECT request: refuse it whole
            raise self.refusing(HttpError(400, "an Upgrade or CONNECT request cannot carry a body here"))
        expect = fields.get(b"expect") if request.version == "1.1" else None  # 1.0: ignored
        if expect is not None and expect.lower() != b"100-continue":
            raise self.refusing(HttpError(417, f"unknown Expect: {expect.decode('latin-1')!r}"))
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
        if self.closed:
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
            if self.closed:  # the client went away: nothing left to answer
                return
            raise
        except Exception as failure:  # a bug, or input nobody foresaw: answered 500
            self.server.failures.note(
                f"request {request.method} {redacted(request.target)[:200]}", failure)
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
        if self.closed:
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
        if self.closed or not self.idle_since:
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
        if not self.closed and not transport.is_closing():
            transport.write(data)

    async def drain(self) -> None:
        """Wait while the client is slow to take what was written; a client that takes nothing
        for ``write_timeout`` seconds is cut (ConnectionResetError)."""
        try:
            await self.writable_again(self.server.write_timeout)
        except asyncio.TimeoutError:
            self.abort()
            raise ConnectionResetError(f"client took nothing for "
                                       f"{self.server.write_timeout:g}s") from None

    def resume_reading(self) -> None:
        """Read again, unless a request body is still over the high-water mark or too many
        requests wait; parse what was held back first."""
        if self.reading_paused and not self.closed:
            parsing = self.parsing
            if parsing is not None and parsing.body is not None \
                    and parsing.body.buffered > HIGH_WATER:
                return
            if len(self.waiting) > MAX_PIPELINED:
                return
            super().resume_reading()
            if self.backlog:
                self.loop.call_soon(self.feed)  # before anything newer arrives

    def close(self) -> None:
        if not self.closed:
            self.transport.close()

    def abort(self) -> None:
        if not self.closed:
            self.transport.abort()


class FrontServer:
    """The protocol factory aiohttp's sites listen with, and the connections it made."""

    def __init__(self, handler, *, keepalive_timeout: float = 75.0,
                 write_timeout: float = 600.0, max_per_client: int | None = None):
        self.handler = handler  # (Request) -> awaitable; answers through request.reply
        self.keepalive_timeout = keepalive_timeout
        self.write_timeout = write_timeout
        self.max_per_client = max_per_client  # open connections one client address may hold
        self.per_client: dict[str, int] = {}
        self.loop = asyncio.get_running_loop()
        self.connections: set[Connection] = set()
        self.closing = False
        self.refusals = RefusalLog()
        self.failures = FailureLog()  # handlers' unexpected exceptions: tracebacks, throttled

    def admit(self, peer: str) -> bool:
        """Count a new connection from ``peer``; False when it already holds its maximum."""
        held = self.per_client.get(peer, 0)
        if self.max_per_client is not None and held >= self.max_per_client:
            return False
        self.per_client[peer] = held + 1
        return True

    def leave(self, peer: str) -> None:
        held = self.per_client.pop(peer, 1) - 1
        if held > 0:
            self.per_client[peer] = held

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
