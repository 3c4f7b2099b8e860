"""Request bodies: the one place a request's body is read, whole or streamed, within bounds.

A body is read whole when it is small (``SMALL_BODY``) or when its bytes are needed (an
envelope), streamed upstream otherwise. Each read is bounded: past ``limit`` bytes it is
``BodyTooLarge`` (413), a pause of ``idle_timeout`` seconds is ``BodyStalled`` (408), broken
framing or a client that left is ``messages.BodyError`` (400).
"""

from __future__ import annotations

import asyncio

from . import timeouts
from .messages import Request

# Bodies up to this size are read whole: one write each way instead of a stream.
SMALL_BODY = 256 * 1024


class BodyTooLarge(Exception):
    """The request body is, or grew, past the configured limit (``setting`` names it)."""

    def __init__(self, limit: int, size: int | None = None,
                 setting: str = "VESPA_MAX_BODY_BYTES"):
        what = "request body" if size is None else f"request body of {size} bytes"
        super().__init__(f"{what} exceeds the {limit}-byte limit ({setting})")
        self.limit = limit


class BodyStalled(Exception):
    """The client sent nothing of its request body for longer than the body read timeout, or
    not all of it within a whole read's deadline."""

    def __init__(self, timeout: float, setting: str = "VESPA_BODY_READ_TIMEOUT"):
        what = "nothing arrived for" if setting == "VESPA_BODY_READ_TIMEOUT" else \
            "it did not arrive whole within"
        super().__init__(f"the request body stalled: {what} {timeout:g}s ({setting}); send "
                         "the whole body without pausing")
        self.timeout = timeout


class BodyTooSlow(BodyStalled):
    """A streamed body arrived slower on average than the minimum rate (not just paused)."""

    def __init__(self, rate: float, waited: float):
        Exception.__init__(self, f"the request body came at {rate:.0f} bytes/s over "
                                 f"{waited:.0f}s, slower than VESPA_MIN_UPLOAD_RATE allows")
        self.timeout = waited


def check_length(request: Request, limit: int, setting: str = "VESPA_MAX_BODY_BYTES") -> None:
    """``BodyTooLarge`` when the request says its body is larger than ``limit``."""
    length = request.content_length
    if length is not None and length > limit:
        raise BodyTooLarge(limit, length, setting)


def is_small(request: Request) -> bool:
    """The body's length is known and small enough to be read whole."""
    length = request.content_length
    return length is not None and length <= SMALL_BODY


async def read_chunk(request: Request, timeout: float) -> bytes:
    """More bytes of the request body (whatever has arrived), b"" at its end. When none arrive
    for ``timeout`` seconds the connection is given up (closed after the answer, the rest of
    the body ignored) and ``BodyStalled`` is raised."""
    body = request.body
    assert body is not None  # a request is served once its head is whole
    try:
        async with timeouts.timeout(timeout):
            return await body.read()
    except asyncio.TimeoutError:
        request.give_up()
        raise BodyStalled(timeout) from None


def arrived_body(request: Request) -> bytes | None:
    """The whole request body when all of it arrived with the head (taken out), else None."""
    body = request.body
    assert body is not None
    if body.complete and body.error is None and not body.expects_continue:
        return body.take()
    return None


async def read_body(request: Request, limit: int, idle_timeout: float,
                    deadline: float | None = None, deadline_setting: str = "") -> bytes:
    """The whole request body, refused past ``limit`` bytes even without a Content-Length;
    with a ``deadline`` (seconds, named by ``deadline_setting`` in the refusal) all of it must
    arrive within it, however it trickles."""
    whole = arrived_body(request)
    if whole is not None:  # no timer, no await
        return whole
    if deadline is None:
        return await _read_parts(request, limit, idle_timeout)
    try:
        async with timeouts.timeout(deadline):
            return await _read_parts(request, limit, idle_timeout)
    except asyncio.TimeoutError:
        request.give_up()
        raise BodyStalled(deadline, deadline_setting) from None


async def _read_parts(request: Request, limit: int, idle_timeout: float) -> bytes:
    parts, size = [], 0
    while chunk := await read_chunk(request, idle_timeout):
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(limit)
        parts.append(chunk)
    return b"".join(parts)


class BoundedBody:
    """A request body streamed upstream chunk by chunk, stopped once it passes ``limit``, stalls
    for ``idle_timeout`` seconds, or arrives slower on average than ``min_rate`` bytes/s once
    it has been waited for longer than ``idle_timeout`` (only the time spent waiting for the
    client counts: a slow backend is not the client's fault)."""

    def __init__(self, request: Request, limit: int, idle_timeout: float,
                 min_rate: float = 0.0):
        self.request = request
        self.limit = limit
        self.idle_timeout = idle_timeout
        self.min_rate = min_rate
        self.length = request.content_length
        self.read = 0
        self.waited = 0.0  # seconds spent waiting for the client's bytes

    def __aiter__(self) -> BoundedBody:
        return self

    async def __anext__(self) -> bytes:  # a class, not an async generator: mypyc has none
        loop = self.request.conn.loop
        started = loop.time()
        chunk = await read_chunk(self.request, self.idle_timeout)
        self.waited += loop.time() - started
        if not chunk:
            raise StopAsyncIteration
        self.read += len(chunk)
        if self.read > self.limit:
            raise BodyTooLarge(self.limit)
        if self.min_rate and self.waited > self.idle_timeout \
                and self.read < self.min_rate * self.waited:
            self.request.give_up()
            raise BodyTooSlow(self.read / self.waited, self.waited)
        return chunk


async def upload(request: Request, limit: int, idle_timeout: float, min_rate: float = 0.0
                 ) -> bytes | BoundedBody | None:
    """The body to send upstream: None when there is none, bytes when it is small, else a
    bounded stream."""
    if not request.has_body:
        return None
    if is_small(request):
        return await read_body(request, limit, idle_timeout)
    return BoundedBody(request, limit, idle_timeout, min_rate)
