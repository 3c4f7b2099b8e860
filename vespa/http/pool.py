"""Pooled keep-alive HTTP/1.1 connections to the backend, parsed by llhttp (httptools).

The lean upstream path: a request is one pre-built header block written to a pooled connection;
the response is parsed in C and handed over as status, raw headers and body chunks, with
backpressure (the backend socket stops being read while the client is slower). No per-request
session, URL or header-multidict objects. A connection whose response was not read to the end
is closed, which is how the backend learns that its client went away.

A backend's trailer fields are dropped, never turned into headers. A connection goes back to
the pool only when its response was read to its end and kept the connection alive; any byte of
another message the backend sends unasked (with the response still in hand, or while the
connection is idle) closes it, so nothing unsolicited is left for the next request. (What a
backend sends unasked after the next request went out on that connection cannot be told from
its answer: HTTP/1.1 has no request ids.)
"""

from __future__ import annotations

import asyncio
import ssl as ssl_module
from collections import deque
from typing import Any

import httptools
from mypy_extensions import mypyc_attr

from .flow import FlowControl, Inbound


@mypyc_attr(native_class=False)  # a builtin exception's subclass stays a Python class
class BackendClosed(ConnectionError):
    """The backend closed or broke the connection before the response was complete."""


@mypyc_attr(native_class=False)  # a builtin exception's subclass stays a Python class
class BackendTimeout(TimeoutError):
    """The backend sent nothing for longer than the read timeout."""


@mypyc_attr(native_class=False)  # a builtin exception's subclass stays a Python class
class MalformedResponse(ConnectionError):
    """The backend's bytes are not valid HTTP."""


class NoSlot(Exception):
    """Every connection to the backend stayed busy for as long as a request may wait."""

    def __init__(self, timeout: float | None):
        super().__init__(f"all connections to the backend stayed busy for {timeout:g}s")


class BackendResponse(Inbound):
    """One response as it arrives: head first, then body chunks until done or failed."""

    __slots__ = ("conn", "status", "reason", "raw_headers", "head_only", "head", "done", "error",
                 "head_complete", "keep_alive", "interim")

    def __init__(self, conn: BackendConnection, head_only: bool):
        Inbound.__init__(self, conn)  # (not super(): one object less a request)
        self.conn = conn
        self.status = 0
        self.reason = b""
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.head_only = head_only
        self.head: asyncio.Future[None] = conn.loop.create_future()
        self.done = False
        self.error: BaseException | None = None
        self.head_complete = False  # the final head is whole: header fields now are trailers
        self.keep_alive = False
        self.interim = False

    def finish(self) -> None:
        self.done = True
        self.wake()

    def fail(self, error: BaseException) -> None:
        if self.done:
            return
        self.error = error
        if not self.head.done():
            self.head.set_exception(error)
            self.head.exception()  # mark retrieved: the caller may already be gone
        self.wake()

    async def next_chunk(self) -> bytes | None:
        """All body bytes that arrived so far (at least one chunk), or None at the end.

        Taking everything buffered at once turns a burst of small SSE events into one write to
        the client instead of one write each.
        """
        while not self.chunks:
            if self.error is not None:
                raise self.error
            if self.done:
                return None
            await self.arrival()
        return self.take()

    def take_all(self) -> bytes | None:
        """The whole body when it has all arrived (taken out), else None."""
        if not self.done or self.error is not None:
            return None
        return self.take()

    async def read_all(self) -> bytes:
        parts = []
        while (chunk := await self.next_chunk()) is not None:
            parts.append(chunk)
        return b"".join(parts)


def ends_at_close(response: BackendResponse) -> bool:
    """A response without length or chunking is complete when the backend closes."""
    names = {name.lower() for name, _ in response.raw_headers}
    return b"content-length" not in names and b"transfer-encoding" not in names


class BackendConnection(FlowControl):
    """One keep-alive connection; carries one request at a time. (An asyncio protocol by its
    methods: no asyncio base class, so the compiled hot path can make it a native class.)"""

    def __init__(self, pool: BackendPool):
        super().__init__(pool.loop)
        self.pool = pool
        # None once the connection is lost (it holds our callbacks: a cycle for the GC)
        self.parser: Any = httptools.HttpResponseParser(self)
        self.response: BackendResponse | None = None  # the request in progress
        self.reused = False
        self.callback_error: MalformedResponse | None = None  # what a parser callback refused
        self.last_active = 0.0
        self.timer: asyncio.TimerHandle | None = None

    # -- asyncio protocol ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def eof_received(self) -> bool | None:
        return None  # the transport closes; connection_lost settles the response

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None:  # bytes nobody asked for: this connection is not sane
            self.close()
            return
        self.last_active = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            cause, self.callback_error = self.callback_error, None  # what a callback refused
            response.fail(cause if isinstance(cause, MalformedResponse) else
                          MalformedResponse(f"backend sent malformed HTTP: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.cancel_timer()
        response = self.response
        if response is not None and not response.done:
            if exc is None and response.head.done() and ends_at_close(response):
                response.finish()  # a body without length or chunking ends at a clean close
            else:
                response.fail(BackendClosed("backend closed the connection"
                                            + (f": {exc}" if exc else "")))
        self.fail_writers(BackendClosed("backend closed the connection"))
        self.pool.forget(self)
        self.parser = None  # it holds our callbacks: without it the connection needs no GC

    def refusing(self, error: MalformedResponse) -> MalformedResponse:
        """``error``, kept for ``data_received``: what llhttp raises for a failed callback does
        not carry it reliably (compiled, its context is lost)."""
        self.callback_error = error
        return error

    # -- llhttp callbacks (only while a response is expected: data_received checks) ------------
    def on_message_begin(self) -> None:
        response = self.response
        assert response is not None
        if response.done:  # a second message to one request: never mixed in, never left for
            # the next request on this connection (it closes; the first answer stands)
            raise self.refusing(MalformedResponse("backend sent a response nobody asked for"))

    def on_status(self, status: bytes) -> None:
        response = self.response
        assert response is not None
        response.reason += status  # llhttp hands the reason over in pieces across reads

    def on_header(self, name: bytes, value: bytes) -> None:
        response = self.response
        assert response is not None
        if response.head_complete:
            return  # a trailer field after a chunked body: never relayed, never a header
        response.raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        response = self.response
        assert response is not None
        status = self.parser.get_status_code()
        if status < 100:  # llhttp takes any three digits; 000-099 is no HTTP status
            raise self.refusing(MalformedResponse(
                f"backend sent malformed HTTP: status {status:03d} is not an HTTP status code"))
        if 100 <= status < 200:  # interim (e.g. 103 Early Hints): wait for the final response
            response.raw_headers.clear()
            response.reason = b""
            response.interim = True
            return
        response.status = status
        response.keep_alive = self.parser.should_keep_alive()
        response.head_complete = True
        response.head.set_result(None)
        self.release_writers()  # an upload waiting to write sees the answer now
        if response.head_only:
            response.finish()

    def on_body(self, body: bytes) -> None:
        response = self.response
        assert response is not None
        response.push(body)

    def on_message_complete(self) -> None:
        response = self.response
        if response is None or response.done:
            return
        if response.interim:
            response.interim = False
            return
        response.finish()

    # -- helpers -------------------------------------------------------------------------------
    def start(self, head_only: bool, read_timeout: float) -> BackendResponse:
        response = self.response = BackendResponse(self, head_only)
        self.last_active = self.loop.time()
        # One timer outlives the requests of a keep-alive connection: one that is still pending
        # from an earlier request fires early, finds the connection active and re-arms for the
        # rest of the timeout (no timer made and cancelled per request).
        if self.timer is None:
            self.timer = self.loop.call_later(read_timeout, self.check_timeout, read_timeout)
        return response

    def check_timeout(self, read_timeout: float) -> None:
        idle = self.loop.time() - self.last_active
        response = self.response
        if response is None or response.done:
            self.timer = None
            return
        if idle < read_timeout and not self.reading_paused:
            self.timer = self.loop.call_later(read_timeout - idle, self.check_timeout,
                                              read_timeout)
        elif self.reading_paused:  # the client is slow, not the backend
            self.timer = self.loop.call_later(read_timeout, self.check_timeout, read_timeout)
        else:
            response.fail(BackendTimeout(f"backend sent nothing for {read_timeout:g}s"))
            self.close()

    def cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport.get_write_buffer_size():
                # bytes the backend has not taken (it stopped reading an upload): a graceful
                # close would wait for them for ever
                self.transport.abort()
            else:
                self.transport.close()


class Slots:
    """A counting semaphore, FIFO, with a synchronous fast path (``take``).

    asyncio.Semaphore has none: its ``acquire`` is a coroutine even when a slot is free.
    """

    def __init__(self, limit: int):
        self.free = limit
        self.waiters: deque[asyncio.Future[None]] = deque()

    def take(self) -> bool:
        """Take a slot if one is free and nobody waits for one; False otherwise."""
        if self.free > 0 and not self.waiters:
            self.free -= 1
            return True
        return False

    async def acquire(self, timeout: float | None = None) -> None:
        """A slot, waiting for one in line for at most ``timeout`` seconds (``NoSlot``)."""
        if self.take():
            return
        waiter = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        try:
            if timeout is None:
                await waiter
            else:
                await asyncio.wait_for(waiter, timeout)
        except asyncio.TimeoutError:
            if waiter in self.waiters:  # cancelled by the timeout: release() would skip it
                self.waiters.remove(waiter)
            raise NoSlot(timeout) from None
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed a slot but cancelled before taking it: pass it on
            else:
                try:
                    self.waiters.remove(waiter)
                except ValueError:
                    pass
            raise

    def release(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot goes straight to the first in line
                return
        self.free += 1


class BackendPool:
    """Keep-alive connections to one backend; at most ``limit`` requests in flight upstream."""

    def __init__(self, host: str, port: int, *, use_ssl: bool, limit: int,
                 connect_timeout: float, idle_timeout: float = 4.0):
        self.host = host
        self.port = port
        self.ssl = ssl_module.create_default_context() if use_ssl else None
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.slots = Slots(limit)
        self.idle: list[BackendConnection] = []
        self.open: set[BackendConnection] = set()
        self.loop = asyncio.get_running_loop()

    async def acquire(self, slot_timeout: float | None = None) -> BackendConnection:
        await self.slots.acquire(slot_timeout)
        try:
            return await self._connection()
        except BaseException:
            self.slots.release()
            raise

    def acquire_idle(self) -> BackendConnection | None:
        """A slot and an idle keep-alive connection without waiting, or None (then ``acquire``)."""
        if not self.idle or not self.slots.take():
            return None
        conn = self._idle_connection()
        if conn is None:
            self.slots.release()
        return conn

    def _idle_connection(self) -> BackendConnection | None:
        now = self.loop.time()
        while self.idle:
            conn = self.idle.pop()
            if conn.closed:
                continue
            if now - conn.last_active > self.idle_timeout:
                conn.close()  # the backend may be closing it right now (uvicorn: 5 s)
                continue
            conn.reused = True
            return conn
        return None

    async def _connection(self) -> BackendConnection:
        conn = self._idle_connection()
        if conn is not None:
            return conn
        _, made = await asyncio.wait_for(
            self.loop.create_connection(  # type: ignore[type-var]  # a protocol by its methods
                lambda: BackendConnection(self), self.host, self.port, ssl=self.ssl),
            self.connect_timeout)
        self.open.add(made)
        return made

    def release(self, conn: BackendConnection, reusable: bool) -> None:
        """Give the connection back: into the idle pool when its response was read to the end."""
        response, conn.response = conn.response, None
        if reusable and not conn.closed and response is not None and response.done \
                and response.error is None and response.keep_alive \
                and not response.head_only:
            conn.last_active = self.loop.time()
            self.idle.append(conn)  # its read timer, if pending, lapses or serves the next one
        else:
            conn.cancel_timer()
            conn.close()
        self.slots.release()

    def forget(self, conn: BackendConnection) -> None:
        self.open.discard(conn)

    def close(self) -> None:
        for conn in list(self.open):
            conn.close()
        self.idle.clear()
