"""The upstream hop: forward one request to the backend and relay its answer, streaming.

Hop-by-hop headers are stripped both ways (RFC 9110 §7.6.1 and those named in ``Connection``);
the client's forwarding headers (``Forwarded``, ``X-Forwarded-*``, ``X-Real-IP``) are replaced by
ours, ``X-Forwarded-For`` (the peer address) and ``X-Forwarded-Proto``: the worker is the edge;
bodies are relayed raw (no re-encoding, no decompression); streams are relayed chunk by chunk
with backpressure. A backend that fails before the response starts raises ``ProxyError`` (the
caller answers 502/504); a request body that cannot be read raises what ``body`` raises; a
backend that breaks after the response started makes us cut the client's connection, never fake
a clean end; a client that goes away is a cancellation. Connections come from ``BackendPool``.
"""

from __future__ import annotations

import asyncio
from time import perf_counter

from yarl import URL

from .body import SMALL_BODY, BoundedBody, upload
from .messages import BodyError, Reply, Request, http_date
from .pool import (BackendClosed, BackendConnection, BackendPool, BackendResponse, BackendTimeout,
                   MalformedResponse, NoSlot)

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization",
    b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade",
})
# Replaced by the proxy for the upstream request. The worker is the edge (on Vast, clients reach
# its port directly): what a client says about where it came from is its own word, so the
# backend gets only ours: X-Forwarded-For (the peer), X-Forwarded-Proto (the scheme it used).
FORWARDING = frozenset({b"forwarded", b"x-forwarded-for", b"x-forwarded-host",
                        b"x-forwarded-port", b"x-forwarded-proto", b"x-real-ip"})
_REQUEST_DROP = HOP_BY_HOP | FORWARDING | {b"host", b"content-length", b"expect", b"x-request-id"}
# ... and the client's credentials, when they are not the backend's (or the backend has its own)
_CREDENTIALS_DROP = _REQUEST_DROP | {b"authorization"}
# Ours replace the backend's X-Request-Id and framing.
_RELAYED_DROP = HOP_BY_HOP | {b"content-length", b"x-request-id"}
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# How long a backend may take to end a stream whose client left: an SSE client may hang up at
# its last event, before the backend's end of body; a generation nobody reads stops after it.
STREAM_END_GRACE = 0.3


class Exchange:
    """What one upstream exchange measured, for metrics and request records (times are
    ``time.perf_counter()`` readings: the loop's clock may tick in whole milliseconds)."""

    __slots__ = ("sent_at", "head_at", "bytes_in", "bytes_out", "status", "headers", "body",
                 "capture")

    def __init__(self, capture: int | None = None):
        self.sent_at = self.head_at = 0.0
        self.bytes_in = self.bytes_out = self.status = 0
        self.headers: list[tuple[str, str]] | None = None
        self.body: bytearray | None = None
        # recorded: keep the response headers and up to this many body bytes; None: not recorded
        self.capture = capture

    def note_head(self, headers: list[tuple[str, str]], content_type: str) -> None:
        """The response headers as relayed, when recorded; only a JSON body is kept (audio and
        SSE are not)."""
        if self.capture is not None:
            self.headers = headers
            if "json" not in content_type:
                self.capture = 0

    def keep(self, chunk: bytes) -> None:
        if self.body is None:
            self.body = bytearray()
        assert self.capture is not None  # kept only when recorded
        room = self.capture + 1 - len(self.body)  # one byte more shows it was cut
        if room > 0:
            self.body += chunk[:room]


class ProxyError(Exception):
    """The exchange failed before anything was sent to the client: the backend could not be
    reached, broke off or sent malformed HTTP (502), or did not answer in time (504)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


async def ends_within(response: BackendResponse, grace: float) -> bool:
    """Whether the backend ends its response within ``grace`` seconds (what still arrives is
    dropped: nobody reads it)."""
    loop = response.conn.loop
    deadline = loop.time() + grace
    timer = loop.call_later(grace, response.wake)
    try:
        while True:
            response.take()
            if response.error is not None:
                return False
            if response.done:
                return True
            if loop.time() >= deadline:
                return False
            await response.arrival()
    finally:
        timer.cancel()


class UpstreamBroken(Exception):
    """The backend failed after the response had started; the client's connection was cut."""


def end_to_end(raw_headers: list[tuple[bytes, bytes]], drop: frozenset[bytes]
               ) -> tuple[list[tuple[bytes, bytes]], dict[bytes, bytes]]:
    """The headers to pass on: all but those in ``drop`` (which must hold ``connection``) and
    those the Connection header names; and the dropped ones (lower-case name -> last value)."""
    kept = []
    dropped = {}
    tokens = None
    for pair in raw_headers:
        lowered = pair[0].lower()
        if lowered in drop:
            dropped[lowered] = pair[1]
            if lowered == b"connection":
                tokens = (tokens or set()) | {t.strip().lower() for t in pair[1].split(b",")}
            continue
        kept.append(pair)
    if tokens and tokens - drop:  # "Connection: keep-alive" names nothing still kept
        kept = [pair for pair in kept if pair[0].lower() not in tokens]
    return kept, dropped


def request_head(request: Request, target: str, host: bytes, request_id: str,
                 framing: bytes, drop: frozenset[bytes] = _REQUEST_DROP) -> bytes:
    """The upstream request line and headers: the client's minus hop-by-hop (and ``drop``:
    the client's forwarding headers too), plus ours (``framing`` included): X-Forwarded-For is
    the client's address as this worker sees it, never a value the client sent."""
    kept, _ = end_to_end(request.raw_headers, drop)
    lines = [b"%s %s HTTP/1.1\r\nHost: %s\r\n" % (
        request.method.encode(), target.encode("utf-8", "surrogateescape"), host)]
    for name, value in kept:
        lines += (name, b": ", value, b"\r\n")
    lines += (b"X-Forwarded-For: ", request.conn.peer.encode(),
              b"\r\nX-Forwarded-Proto: ", request.conn.scheme.encode(),
              b"\r\nX-Request-Id: ", request_id.encode("latin-1"), b"\r\n", framing, b"\r\n")
    return b"".join(lines)


def relayed_headers(raw_headers: list[tuple[bytes, bytes]]
                    ) -> tuple[list[tuple[bytes, bytes]], int | None, bool]:
    """The backend's headers minus hop-by-hop ones (and its X-Request-Id, replaced by ours),
    its Content-Length if it sent one, and whether it sent a Date."""
    kept, dropped = end_to_end(raw_headers, _RELAYED_DROP)
    length = dropped.get(b"content-length")
    has_date = False
    for name, _ in kept:  # a plain loop: any() over a generator costs more, once a response
        if name.lower() == b"date":
            has_date = True
            break
    return kept, None if length is None else int(length), has_date  # llhttp checked the length


class Upstream:
    """The backend, reached through a pool of keep-alive connections."""

    def __init__(self, base_url: str, *, connection_limit: int, connect_timeout: float,
                 request_timeout: float, max_body_bytes: int,
                 body_read_timeout: float = 30.0, authorization: str | None = None,
                 slot_timeout: float | None = None, min_upload_rate: float = 0.0):
        url = URL(base_url)
        self.base_url = base_url.rstrip("/")
        self.base_path = url.raw_path.rstrip("/")
        self.host = url.raw_host or "localhost"
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.host_header = (f"{self.host}:{self.port}" if url.explicit_port else self.host).encode()
        self.use_ssl = url.scheme == "https"
        self.connection_limit = connection_limit
        self.connect_timeout = connect_timeout
        self.read_timeout = request_timeout
        self.max_body_bytes = max_body_bytes
        self.body_read_timeout = body_read_timeout
        self.slot_timeout = slot_timeout  # how long a request may wait for a connection
        self.min_upload_rate = min_upload_rate  # bytes/s a streamed upload must average
        # the backend's own credentials, sent instead of any client's (e.g. vLLM's --api-key)
        self.authorization = None if authorization is None else \
            b"Authorization: Bearer %s\r\n" % authorization.encode("latin-1")
        self.pool: BackendPool | None = None

    async def start(self) -> None:
        self.pool = BackendPool(self.host, self.port, use_ssl=self.use_ssl,
                                limit=self.connection_limit, connect_timeout=self.connect_timeout)

    async def close(self) -> None:
        if self.pool is not None:
            self.pool.close()

    async def forward(self, request: Request, request_id: str, body: bytes | None = None,
                      path_qs: str | None = None, exchange: Exchange | None = None,
                      strip_credentials: bool = False) -> int:
        """Send ``request`` (or ``body`` instead of its own, to ``path_qs``) upstream and relay
        the answer; returns the backend's status. ``strip_credentials``: the client's
        ``Authorization`` is not for the backend."""
        exchange = exchange if exchange is not None else Exchange()
        pool, reply = self.pool, request.reply
        assert pool is not None and reply is not None
        sent = body if body is not None else await upload(
            request, self.max_body_bytes, self.body_read_timeout, self.min_upload_rate)
        target = self.base_path + (path_qs if path_qs is not None else request.target)
        if isinstance(sent, bytes):
            framing = b"Content-Length: %d\r\n" % len(sent)
        elif sent is None:
            framing = b"Content-Length: 0\r\n" if request.method in _BODY_METHODS else b""
        elif sent.length is not None:
            framing = b"Content-Length: %d\r\n" % sent.length
        else:
            framing = b"Transfer-Encoding: chunked\r\n"
        if self.authorization is not None:  # the backend's own key replaces the client's
            framing += self.authorization
            strip_credentials = True
        head = request_head(request, target, self.host_header, request_id, framing,
                            _CREDENTIALS_DROP if strip_credentials else _REQUEST_DROP)
        exchange.sent_at = perf_counter()
        conn, response = await self._exchange(request.method, head, sent, exchange)
        exchange.head_at = perf_counter()
        exchange.status = response.status
        try:
            headers, length = self._relayed_head(response, request_id, exchange)
            if length is not None and length <= SMALL_BODY and not response.head_only:
                # a small answer goes whole, in one write
                payload = response.take_all()  # None: not all of it has arrived yet
                if payload is None:
                    payload = await self._payload(response)
                exchange.bytes_out = len(payload)
                if exchange.capture:
                    exchange.keep(payload)
                reply.send(response.status, headers, payload, response.reason)
            else:
                await self._stream(reply, response, headers, length, exchange)
            return response.status
        finally:
            pool.release(conn, reusable=True)

    async def _exchange(self, method: str, head: bytes, body: bytes | BoundedBody | None,
                        exchange: Exchange) -> tuple[BackendConnection, BackendResponse]:
        """Write the request and wait for the response head; an idempotent request is sent
        once more when a reused keep-alive connection turns out closed (RFC 9110 §9.2.2: a
        POST the backend may have started on is never sent twice)."""
        pool = self.pool
        assert pool is not None, "Upstream.start() was not awaited"
        head_only = method == "HEAD"
        replayable = method in IDEMPOTENT_METHODS and not isinstance(body, BoundedBody)
        for attempt in (1, 2):
            conn = pool.acquire_idle()
            if conn is None:
                try:
                    conn = await pool.acquire(self.slot_timeout)
                except NoSlot as busy:
                    raise ProxyError(503, f"{busy} (VESPA_CONNECTION_LIMIT "
                                          f"{self.connection_limit}); retry shortly") from None
                except (OSError, asyncio.TimeoutError) as unreachable:
                    raise ProxyError(502, f"backend unreachable at {self.base_url}: "
                                          f"{unreachable or type(unreachable).__name__}") from None
            response = conn.start(head_only, self.read_timeout)
            try:
                if body is None or isinstance(body, bytes):  # one write, nothing to wait for
                    conn.transport.write(head if body is None else head + body)
                    exchange.bytes_in = 0 if body is None else len(body)
                else:
                    exchange.bytes_in = await self._upload(conn, response, head, body)
                await response.head
                return conn, response
            except BackendClosed as closed:
                answered = response.head
                problem = answered.exception() if answered.done() and not answered.cancelled() \
                    else closed
                if problem is None:
                    return conn, response  # it answered before taking the whole upload: relay
                pool.release(conn, reusable=False)
                if isinstance(problem, BackendTimeout):  # it stopped reading the upload
                    raise self._timed_out() from None
                if attempt == 1 and conn.reused and replayable:
                    continue  # the backend closed an idle keep-alive connection: try a new one
                raise ProxyError(502, f"backend at {self.base_url} closed the connection "
                                      f"without answering: {closed}") from None
            except BackendTimeout:
                pool.release(conn, reusable=False)
                raise self._timed_out() from None
            except MalformedResponse as malformed:
                pool.release(conn, reusable=False)
                raise ProxyError(502, str(malformed)) from None
            except BaseException:
                pool.release(conn, reusable=False)
                raise
        raise AssertionError("unreachable")

    def _timed_out(self) -> ProxyError:
        return ProxyError(504, f"backend did not answer within {self.read_timeout:g}s "
                               "(VESPA_REQUEST_TIMEOUT)")

    @staticmethod
    async def _upload(conn: BackendConnection, response: BackendResponse, head: bytes,
                      body: BoundedBody) -> int:
        """Write the request with a streamed body; returns the body bytes sent."""
        transport = conn.transport
        transport.write(head)
        chunked = body.length is None
        sent = 0
        answered = response.head
        async for chunk in body:
            if conn.closed:
                raise BackendClosed("backend closed the connection during the upload")
            transport.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
            sent += len(chunk)
            conn.last_active = conn.loop.time()  # silence is counted from the end of the upload
            await conn.writable_again()  # also returns when the backend answers
            if answered.done():
                # It answered before taking the whole body (e.g. a 413) and may never read the
                # rest: stop here, relay the answer, and never reuse this connection.
                response.keep_alive = False
                return sent
        if chunked:
            transport.write(b"0\r\n\r\n")
        elif sent != body.length:  # never leave the backend waiting for bytes that won't come
            raise BodyError(f"request body ended after {sent} of {body.length} bytes")
        return sent

    @staticmethod
    async def _payload(upstream: BackendResponse) -> bytes:
        """A small response's whole body, read to its end (502 when the backend breaks it
        off)."""
        try:
            return await upstream.read_all()
        except (ConnectionError, TimeoutError) as exc:
            raise ProxyError(502, f"backend broke off its response: {exc}") from None

    @staticmethod
    def _relayed_head(upstream: BackendResponse, request_id: str, exchange: Exchange
                      ) -> tuple[list[tuple[bytes, bytes]], int | None]:
        """The headers the client gets (the backend's minus hop-by-hop, plus our X-Request-Id
        and a Date if it sent none) and the backend's Content-Length."""
        headers, length, has_date = relayed_headers(upstream.raw_headers)
        headers.append((b"X-Request-Id", request_id.encode("latin-1")))
        if not has_date:
            headers.append((b"Date", http_date()))
        if exchange.capture is not None:  # recorded
            decoded = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in headers]
            exchange.note_head(decoded, next(
                (v for n, v in decoded if n.lower() == "content-type"), ""))
        return headers, length

    @staticmethod
    async def _stream(reply: Reply, upstream: BackendResponse,
                      headers: list[tuple[bytes, bytes]], length: int | None,
                      exchange: Exchange) -> None:
        """The backend's answer streamed to the client chunk by chunk as it arrives."""
        reply.start(upstream.status, headers, length, upstream.reason)
        if not upstream.chunks:
            reply.flush()  # no body yet (a generation may take a while): the head goes now
        try:
            while (chunk := await upstream.next_chunk()) is not None:
                exchange.bytes_out += len(chunk)
                if exchange.capture:
                    exchange.keep(chunk)
                await reply.write(chunk)
            reply.end()
        except (BackendClosed, BackendTimeout, MalformedResponse) as exc:
            reply.abort()  # a cut: the client cannot mistake it for the end
            raise UpstreamBroken(f"backend failed mid-response: {exc}") from None
        except (ConnectionError, asyncio.CancelledError):
            # The client went away: the front server cancels the request of a lost connection,
            # or a write found it gone. A client often leaves as soon as it has read the last
            # event (the openai SDK at "data: [DONE]") while the backend ends its body a moment
            # later: the answer is complete if the backend ends it within a short grace, else
            # the backend's work is cancelled (its connection is closed).
            if await ends_within(upstream, STREAM_END_GRACE):
                return
            raise asyncio.CancelledError() from None
