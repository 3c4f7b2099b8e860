"""The upstream hop: forward one request to the backend and relay its answer, streaming.

Hop-by-hop headers are stripped both ways (RFC 9110 §7.6.1 and those named in ``Connection``);
bodies are relayed raw (no re-encoding, no decompression); streams are relayed chunk by chunk
with backpressure. Failures before the response starts raise ``ProxyError`` (the caller answers
502/504/413/408); a backend that breaks after the response started makes us cut the client's
connection, never fake a clean end; a client that goes away is a cancellation. Request bodies
are read with an idle timeout (``BodyStalled``). Connections come from ``BackendPool``.
"""

from __future__ import annotations

import asyncio
import re
from time import perf_counter

from aiohttp import web
from aiohttp.helpers import must_be_empty_body, rfc822_formatted_time
from aiohttp.http import SERVER_SOFTWARE, HttpVersion11
from aiohttp.web_response import REASON_PHRASES
from multidict import CIMultiDict
from yarl import URL

from .backend_pool import (BackendClosed, BackendConnection, BackendPool, BackendResponse,
                           BackendTimeout, MalformedResponse)

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization",
    b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade",
})
# Replaced by the proxy for the upstream request.
_REQUEST_DROP = HOP_BY_HOP | {b"host", b"content-length", b"expect", b"x-forwarded-for",
                              b"x-forwarded-proto", b"x-request-id"}
_RESPONSE_DROP = HOP_BY_HOP | {b"content-length"}
# A response written whole: ours replace the backend's X-Request-Id and Content-Length.
_DIRECT_DROP = _RESPONSE_DROP | {b"x-request-id"}
_DIRECT_SEEN = {b"content-type": 1, b"date": 2, b"server": 4}
_SERVER = SERVER_SOFTWARE.encode()
# what aiohttp refuses in a header it writes (a 500 instead): left to its path to refuse
_FORBIDDEN_HEADER_BYTES = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# Bodies up to this size are read whole: one write each way instead of a stream.
SMALL_BODY = 256 * 1024
STREAM_CHUNK = 64 * 1024


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
        room = self.capture + 1 - len(self.body)  # one byte more shows it was cut
        if room > 0:
            self.body += chunk[:room]


class ProxyError(Exception):
    """The exchange failed before anything was sent to the client: the backend could not be
    reached or did not answer (502/504), or the client's body was too large (413) or stalled
    (408)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class BodyTooLarge(Exception):
    """The request body grew past the configured limit while it was being streamed."""


class UpstreamBroken(Exception):
    """The backend failed after the response had started; the client's connection was cut."""

    def __init__(self, message: str, response: web.StreamResponse):
        super().__init__(message)
        self.response = response


class BodyStalled(Exception):
    """The client sent nothing of its request body for longer than the body read timeout."""

    def __init__(self, timeout: float):
        super().__init__(f"the request body stalled: nothing arrived for {timeout:g}s "
                         "(VESPA_BODY_READ_TIMEOUT); send the whole body without pausing")
        self.timeout = timeout


async def read_chunk(request: web.Request, size: int, timeout: float) -> bytes:
    """Up to ``size`` more bytes of the request body, b"" at its end. When none arrive for
    ``timeout`` seconds the connection is given up (closed after the answer, the rest of the
    body ignored, no lingering read) and ``BodyStalled`` is raised."""
    try:
        async with asyncio.timeout(timeout):
            return await request.content.read(size)
    except TimeoutError:
        request.protocol.close()  # no keep-alive after this answer; later bytes are dropped
        request.content.feed_eof()  # nothing left to linger for before closing
        raise BodyStalled(timeout) from None


async def read_body(request: web.Request, limit: int, idle_timeout: float) -> bytes:
    """The whole request body, refused past ``limit`` bytes even without a Content-Length;
    ``BodyStalled`` when the client pauses for ``idle_timeout`` seconds before its end."""
    content, length = request.content, request.content_length
    if length is not None and content.is_eof() and content.total_bytes == length:
        return content.read_nowait()  # all of it arrived with the head: no timer, no await
    parts, size = [], 0
    while chunk := await read_chunk(request, STREAM_CHUNK, idle_timeout):
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge()
        parts.append(chunk)
    body = b"".join(parts)
    if length is not None and size < length:
        raise asyncio.IncompleteReadError(body, length)
    return body


class BoundedBody:
    """A request body streamed upstream chunk by chunk, stopped once it passes ``limit`` or
    stalls for ``idle_timeout`` seconds."""

    def __init__(self, request: web.Request, limit: int, idle_timeout: float):
        self.request = request
        self.limit = limit
        self.idle_timeout = idle_timeout
        self.length = request.content_length

    async def __aiter__(self):
        sent = 0
        while chunk := await read_chunk(self.request, STREAM_CHUNK, self.idle_timeout):
            sent += len(chunk)
            if sent > self.limit:
                raise BodyTooLarge()
            yield chunk


def _connection_tokens(raw_headers) -> frozenset[bytes]:
    tokens = set()
    for name, value in raw_headers:
        if name.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b","))
    return frozenset(tokens)


def request_head(request: web.Request, target: str, host: bytes, request_id: str,
                 framing: bytes) -> bytes:
    """The upstream request line and headers: the client's minus hop-by-hop, plus ours."""
    raw = request.raw_headers
    tokens = _connection_tokens(raw)
    drop = _REQUEST_DROP | tokens if tokens else _REQUEST_DROP
    lines = [f"{request.method} {target} HTTP/1.1\r\n".encode(), b"Host: ", host, b"\r\n"]
    forwarded_for = None
    for name, value in raw:
        lowered = name.lower()
        if lowered in drop:
            if lowered == b"x-forwarded-for":
                forwarded_for = value
            continue
        lines += (name, b": ", value, b"\r\n")
    peer = (request.remote or "").encode()
    lines += (b"X-Forwarded-For: ", forwarded_for + b", " + peer if forwarded_for else peer,
              b"\r\nX-Forwarded-Proto: ", request.scheme.encode(),
              b"\r\nX-Request-Id: ", request_id.encode(), b"\r\n", framing, b"\r\n")
    return b"".join(lines)


class SentResponse:
    """A small response already written to the client in one piece (head and body).

    It stands where aiohttp expects a ``StreamResponse`` once the handler returns: ``prepare``
    has nothing left to do, ``write_eof`` waits for a slow client to take the bytes (after the
    handler, so a client that reads slowly holds no admission or backend slot). The bytes are what aiohttp would have written for
    the same ``web.Response`` (status line, the backend's headers minus hop-by-hop, our
    X-Request-Id and Content-Length, Content-Type/Date/Server defaults), only built from the
    backend's raw header bytes without a header multidict round trip.
    """

    __slots__ = ("status", "reason", "raw_headers", "body_length", "writer")
    keep_alive = True  # only keep-alive HTTP/1.1 requests are answered this way
    prepared = True

    def __init__(self, status: int, reason: str, raw_headers: list[tuple[bytes, bytes]],
                 body_length: int, writer):
        self.writer = writer  # the client's aiohttp StreamWriter
        self.status = status
        self.reason = reason
        self.raw_headers = raw_headers  # as sent to the client, ours included
        self.body_length = body_length

    @property
    def headers(self) -> CIMultiDict:
        return CIMultiDict((n.decode("latin-1"), v.decode("latin-1"))
                           for n, v in self.raw_headers)

    async def prepare(self, request: web.BaseRequest) -> None:
        return None

    async def write_eof(self, data: bytes = b"") -> None:
        """Wait while the client's transport holds too much, as aiohttp's own write_eof does
        (a client gone raises ConnectionError: aiohttp counts that as a reset)."""
        transport = self.writer.transport
        if transport is not None and transport.get_write_buffer_size():
            await self.writer.drain()


def response_headers(raw_headers: list[tuple[bytes, bytes]]) -> tuple[CIMultiDict, int | None]:
    """The backend's headers minus hop-by-hop, and its Content-Length if it sent one."""
    drop = _RESPONSE_DROP | _connection_tokens(raw_headers)
    headers: CIMultiDict = CIMultiDict()
    length = None
    for name, value in raw_headers:
        lowered = name.lower()
        if lowered in drop:
            if lowered == b"content-length":
                length = int(value)
            continue
        headers.add(name.decode("latin-1"), value.decode("latin-1"))
    return headers, length


class Upstream:
    """The backend, reached through a pool of keep-alive connections."""

    def __init__(self, base_url: str, *, connection_limit: int, connect_timeout: float,
                 request_timeout: float, max_body_bytes: int,
                 body_read_timeout: float = 30.0):
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
        self.pool: BackendPool | None = None

    async def start(self) -> None:
        self.pool = BackendPool(self.host, self.port, use_ssl=self.use_ssl,
                                limit=self.connection_limit, connect_timeout=self.connect_timeout)

    async def close(self) -> None:
        if self.pool is not None:
            self.pool.close()

    async def forward(self, request: web.Request, request_id: str, body: bytes | None = None,
                      path_qs: str | None = None, exchange: Exchange | None = None
                      ) -> web.StreamResponse:
        """Send ``request`` (or ``body`` instead of its own) upstream and relay the answer."""
        exchange = exchange if exchange is not None else Exchange()
        if body is None:
            try:
                body = await self._body(request)
            except BodyStalled as exc:
                raise ProxyError(408, str(exc)) from None
        target = self.base_path + (path_qs if path_qs is not None else request.raw_path)
        if isinstance(body, bytes):
            framing = b"Content-Length: %d\r\n" % len(body)
        elif body is None:
            framing = b"Content-Length: 0\r\n" if request.method in _BODY_METHODS else b""
        elif body.length is not None:
            framing = b"Content-Length: %d\r\n" % body.length
        else:
            framing = b"Transfer-Encoding: chunked\r\n"
        head = request_head(request, target, self.host_header, request_id, framing)
        exchange.sent_at = perf_counter()
        conn, response = await self._exchange(request.method, head, body, exchange)
        exchange.head_at = perf_counter()
        exchange.status = response.status
        try:
            return await self._relay(request, response, request_id, exchange)
        finally:
            self.pool.release(conn, reusable=True)

    async def _body(self, request: web.Request):
        """The request body: bytes when small, else a bounded stream."""
        if not request.body_exists:
            return None
        length = request.content_length
        if length is not None and length <= SMALL_BODY:
            return await read_body(request, self.max_body_bytes, self.body_read_timeout)
        return BoundedBody(request, self.max_body_bytes, self.body_read_timeout)

    async def _exchange(self, method: str, head: bytes, body, exchange: Exchange
                        ) -> tuple[BackendConnection, BackendResponse]:
        """Write the request and wait for the response head; an idempotent request is sent
        once more when a reused keep-alive connection turns out closed (RFC 9110 §9.2.2: a
        POST the backend may have started on is never sent twice)."""
        head_only = method == "HEAD"
        replayable = method in IDEMPOTENT_METHODS and not isinstance(body, BoundedBody)
        for attempt in (1, 2):
            conn = self.pool.acquire_idle()
            if conn is None:
                try:
                    conn = await self.pool.acquire()
                except (OSError, asyncio.TimeoutError) as exc:
                    raise ProxyError(502, f"backend unreachable at {self.base_url}: "
                                          f"{exc or type(exc).__name__}") from None
            response = conn.start(head_only, self.read_timeout)
            try:
                exchange.bytes_in = await self._send(conn, head, body)
                await response.head
                return conn, response
            except BackendClosed as exc:
                answered = response.head
                if answered.done() and not answered.cancelled() \
                        and answered.exception() is None:
                    return conn, response  # it answered before taking the whole upload: relay
                self.pool.release(conn, reusable=False)
                if attempt == 1 and conn.reused and replayable:
                    continue  # the backend closed an idle keep-alive connection: try a new one
                raise ProxyError(502, f"backend at {self.base_url} closed the connection "
                                      f"without answering: {exc}") from None
            except BodyStalled as exc:  # the backend got part of a body: cut it off
                self.pool.release(conn, reusable=False)
                raise ProxyError(408, str(exc)) from None
            except BodyTooLarge:
                self.pool.release(conn, reusable=False)
                raise ProxyError(413, f"request body exceeds the {self.max_body_bytes}-byte "
                                      "limit (VESPA_MAX_BODY_BYTES)") from None
            except BackendTimeout:
                self.pool.release(conn, reusable=False)
                raise ProxyError(504, f"backend did not answer within {self.read_timeout:g}s "
                                      "(VESPA_REQUEST_TIMEOUT)") from None
            except MalformedResponse as exc:
                self.pool.release(conn, reusable=False)
                raise ProxyError(502, str(exc)) from None
            except BaseException:
                self.pool.release(conn, reusable=False)
                raise
        raise AssertionError("unreachable")

    @staticmethod
    async def _send(conn: BackendConnection, head: bytes, body) -> int:
        """Write the request; returns the body bytes sent."""
        transport = conn.transport
        if body is None:
            transport.write(head)
            return 0
        if isinstance(body, bytes):
            transport.write(head + body)
            return len(body)
        transport.write(head)
        chunked = body.length is None
        sent = 0
        async for chunk in body:
            if conn.closed:
                raise BackendClosed("backend closed the connection during the upload")
            transport.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
            sent += len(chunk)
            conn.last_active = conn.loop.time()  # silence is counted from the end of the upload
            await conn.drain()
        if chunked:
            transport.write(b"0\r\n\r\n")
        return sent

    @staticmethod
    def _whole_head(request: web.BaseRequest, upstream: BackendResponse
                    ) -> tuple[list[tuple[bytes, bytes]], int] | None:
        """The backend's headers to relay and the flags of those seen, when the response can be
        written straight to the client in one piece; None sends it aiohttp's way.

        Only the plain case: a keep-alive HTTP/1.1 request, a response with a Content-Length
        within SMALL_BODY and a body that may be sent, no header that aiohttp would refuse.
        """
        if (upstream.head_only or request.version != HttpVersion11 or not request.keep_alive
                or must_be_empty_body(request.method, upstream.status)):
            return None
        raw = upstream.raw_headers
        tokens = _connection_tokens(raw)
        drop = _DIRECT_DROP | tokens if tokens else _DIRECT_DROP
        kept = []
        seen = 0
        length = None
        for pair in raw:
            lowered = pair[0].lower()
            if lowered in drop:
                if lowered == b"content-length":
                    length = int(pair[1])
                continue
            seen |= _DIRECT_SEEN.get(lowered, 0)
            kept.append(pair)
        if length is None or length > SMALL_BODY:
            return None
        if _FORBIDDEN_HEADER_BYTES.search(b"".join([v for _, v in kept]) + upstream.reason):
            return None
        return kept, seen

    @staticmethod
    def _write_whole(request: web.BaseRequest, upstream: BackendResponse, request_id: str,
                     kept: list[tuple[bytes, bytes]], seen: int, payload: bytes,
                     exchange: Exchange) -> SentResponse:
        """Write status line, headers and body to the client's transport in one write.

        A client already gone gets nothing (aiohttp would drop the write the same way, its
        connection ends either way).
        """
        status = upstream.status
        size = len(payload)
        kept.append((b"X-Request-Id", request_id.encode()))
        kept.append((b"Content-Length", b"%d" % size))
        if size and not seen & 1:
            kept.append((b"Content-Type", b"application/octet-stream"))
        if not seen & 2:
            kept.append((b"Date", rfc822_formatted_time().encode()))
        if not seen & 4:
            kept.append((b"Server", _SERVER))
        reason = upstream.reason or REASON_PHRASES.get(status, "").encode()
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, reason)]
        for name, value in kept:
            lines += (name, b": ", value, b"\r\n")
        lines += (b"\r\n", payload)
        data = b"".join(lines)
        transport = request.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)
        request.writer.output_size += len(data)  # a response went out: no error page after it
        exchange.bytes_out = size
        if exchange.capture is not None:  # recorded
            headers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in kept]
            exchange.note_head(headers, next(
                (v for n, v in headers if n.lower() == "content-type"), ""))
            if exchange.capture:
                exchange.keep(payload)
        return SentResponse(status, reason.decode("latin-1"), kept, size, request.writer)

    @staticmethod
    async def _payload(upstream: BackendResponse) -> bytes:
        """A small response's whole body (502 when the backend breaks it off)."""
        payload = upstream.take_all()
        if payload is not None:  # all of it has arrived
            return payload
        try:
            return await upstream.read_all()
        except (ConnectionError, TimeoutError) as exc:
            raise ProxyError(502, f"backend broke off its response: {exc}") from None

    async def _relay(self, request: web.Request, upstream: BackendResponse,
                     request_id: str, exchange: Exchange) -> web.StreamResponse:
        whole = self._whole_head(request, upstream)
        if whole is not None:
            payload = await self._payload(upstream)
            return self._write_whole(request, upstream, request_id, *whole, payload, exchange)
        headers, length = response_headers(upstream.raw_headers)
        headers["X-Request-Id"] = request_id
        exchange.note_head(list(headers.items()), headers.get("Content-Type", ""))
        reason = upstream.reason.decode("latin-1") or None
        if length is not None and length <= SMALL_BODY and not upstream.head_only:
            payload = await self._payload(upstream)
            exchange.bytes_out = len(payload)
            if exchange.capture:
                exchange.keep(payload)
            return web.Response(status=upstream.status, reason=reason, headers=headers,
                                body=payload)
        response = web.StreamResponse(status=upstream.status, reason=reason, headers=headers)
        if length is not None:
            response.content_length = length
        try:
            await response.prepare(request)
            while (chunk := await upstream.next_chunk()) is not None:
                exchange.bytes_out += len(chunk)
                if exchange.capture:
                    exchange.keep(chunk)
                await response.write(chunk)
            await response.write_eof()
        except (BackendClosed, BackendTimeout, MalformedResponse) as exc:
            if request.transport is not None:
                request.transport.abort()  # a cut: the client cannot mistake it for the end
            raise UpstreamBroken(f"backend failed mid-response: {exc}", response) from None
        except ConnectionError:
            # The client went away while we wrote to it (ClientConnectionResetError). That is a
            # cancellation, the same as aiohttp cancelling the handler of a lost connection:
            # the request ends as cancelled, and aiohttp logs no error traceback for it.
            raise asyncio.CancelledError() from None
        return response
