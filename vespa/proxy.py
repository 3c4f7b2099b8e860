"""The upstream hop: forward one request to the backend and relay its answer, streaming.

One shared keep-alive ``ClientSession``; hop-by-hop headers stripped both ways (RFC 9110 §7.6.1
and those named in ``Connection``); bodies relayed raw (no re-encoding, no decompression);
streams relayed chunk by chunk with backpressure. Failures before the response starts raise
``ProxyError`` (the caller answers 502/504/413); a backend that breaks after the response started
makes us cut the client's connection, never fake a clean end.
"""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
    "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
})
# Recomputed for the upstream request by the client library.
_REQUEST_DROP = HOP_BY_HOP | {"host", "content-length", "expect"}
# Bodies up to this size are read whole: one write each way instead of a stream.
SMALL_BODY = 256 * 1024
STREAM_CHUNK = 64 * 1024


class ProxyError(Exception):
    """The backend could not be reached or did not answer; nothing was sent to the client yet."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class BodyTooLarge(Exception):
    """The request body grew past the configured limit while it was being streamed."""


class BoundedBody:
    """A request body streamed upstream chunk by chunk, stopped once it passes ``limit``."""

    def __init__(self, request: web.Request, limit: int):
        self.request = request
        self.limit = limit
        self.overflowed = False

    async def __aiter__(self):
        sent = 0
        async for chunk in self.request.content.iter_chunked(STREAM_CHUNK):
            sent += len(chunk)
            if sent > self.limit:
                self.overflowed = True
                raise BodyTooLarge()
            yield chunk


class UpstreamBroken(Exception):
    """The backend failed after the response had started; the client's connection was cut."""

    def __init__(self, message: str, response: web.StreamResponse):
        super().__init__(message)
        self.response = response


def _dropped(headers, base: frozenset[str]) -> frozenset[str]:
    connection = headers.get("Connection")
    if not connection:
        return base
    return base | {token.strip().lower() for token in connection.split(",")}


def request_headers(request: web.Request, request_id: str) -> CIMultiDict:
    """The headers to send upstream: the client's minus hop-by-hop, plus forwarding headers."""
    drop = _dropped(request.headers, _REQUEST_DROP)
    out = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in drop)
    peer = request.remote or ""
    prior = out.get("X-Forwarded-For")
    out["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    out["X-Forwarded-Proto"] = request.scheme
    out["X-Request-Id"] = request_id
    return out


def response_headers(upstream: aiohttp.ClientResponse) -> CIMultiDict:
    """The backend's response headers minus hop-by-hop (Content-Length is set by the relay)."""
    drop = _dropped(upstream.headers, HOP_BY_HOP | {"content-length"})
    return CIMultiDict((k, v) for k, v in upstream.headers.items() if k.lower() not in drop)


class Upstream:
    """The backend as seen through one shared, pooled, keep-alive client session."""

    def __init__(self, base_url: str, *, connection_limit: int, connect_timeout: float,
                 request_timeout: float, max_body_bytes: int):
        self.base_url = base_url.rstrip("/")
        self.connection_limit = connection_limit
        self.timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout,
                                             sock_read=request_timeout)
        self.max_body_bytes = max_body_bytes
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=self.connection_limit, limit_per_host=0,
                                         keepalive_timeout=60, ttl_dns_cache=300)
        self.session = aiohttp.ClientSession(
            connector=connector, timeout=self.timeout, auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            cookie_jar=aiohttp.DummyCookieJar())

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def forward(self, request: web.Request, request_id: str,
                      body: bytes | None = None, path_qs: str | None = None) -> web.StreamResponse:
        """Send ``request`` (or ``body`` instead of its own) upstream and relay the answer."""
        headers = request_headers(request, request_id)
        data = body if body is not None else await self._body(request, headers)
        url = URL(self.base_url + (path_qs if path_qs is not None else request.raw_path),
                  encoded=True)
        try:
            upstream = await self.session.request(
                request.method, url, headers=headers, data=data, allow_redirects=False,
                compress=None, chunked=None)
        except (aiohttp.ClientError, asyncio.TimeoutError, BodyTooLarge) as exc:
            if isinstance(data, BoundedBody) and data.overflowed:
                raise ProxyError(413, f"request body exceeds the {self.max_body_bytes}-byte "
                                      "limit (VESPA_MAX_BODY_BYTES)") from None
            if isinstance(exc, asyncio.TimeoutError):
                raise ProxyError(504, "backend did not answer within the request timeout "
                                      "(VESPA_REQUEST_TIMEOUT)") from None
            raise ProxyError(502, f"backend unreachable at {self.base_url}: {exc}") from None
        try:
            return await self._relay(request, upstream, request_id)
        finally:
            if upstream.content.is_eof():
                upstream.release()  # back to the keep-alive pool
            else:
                upstream.close()  # the backend sees its client go away and stops working

    async def _body(self, request: web.Request, headers: CIMultiDict):
        """The request body: bytes when small, else a bounded stream with its length kept."""
        if not request.body_exists:
            return None
        length = request.content_length
        if length is not None and length <= SMALL_BODY:
            return await request.content.readexactly(length)
        if length is not None:
            headers["Content-Length"] = str(length)
        return BoundedBody(request, self.max_body_bytes)

    async def _relay(self, request: web.Request, upstream: aiohttp.ClientResponse,
                     request_id: str) -> web.StreamResponse:
        headers = response_headers(upstream)
        headers["X-Request-Id"] = request_id
        length = upstream.content_length
        if length is not None and length <= SMALL_BODY and request.method != "HEAD":
            try:
                payload = await upstream.read()
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                raise ProxyError(502, f"backend broke off its response: {exc!r}") from None
            return web.Response(status=upstream.status, reason=upstream.reason,
                                headers=headers, body=payload)
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason,
                                      headers=headers)
        if length is not None:
            response.content_length = length
        await response.prepare(request)
        try:
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            if request.transport is not None:
                request.transport.abort()  # a cut, so the client cannot mistake it for the end
            raise UpstreamBroken(f"backend failed mid-response: {exc!r}", response) from None
        await response.write_eof()
        return response
