"""HTTP/1.1 messages as the front server hands them to its handler: a request's head and body,
and the reply that answers it (written whole, or streamed with backpressure).

The connection that parses and serves them is ``server.Connection``; a request body is an
``flow.Inbound`` buffer (the connection stops reading past its high-water mark).
"""

from __future__ import annotations

import json
import time
from email.utils import formatdate
from http import HTTPStatus
from typing import TYPE_CHECKING

from mypy_extensions import mypyc_attr

from .flow import Inbound

if TYPE_CHECKING:
    from .server import Connection

BODYLESS_STATUSES = frozenset({204, 304})
JSON_TYPE = b"application/json; charset=utf-8"
# reason phrases: the standard library's, and nginx's 499 for "the client closed the request"
REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}
REASONS[499] = b"Client Closed Request"


class HttpError(Exception):
    """A request this server refuses before any handler sees it."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message



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


class Body(Inbound):
    """A request body as it arrives; the handler takes it chunk by chunk or whole."""

    __slots__ = ("conn", "complete", "error", "expects_continue", "discard", "abandoned")

    def __init__(self, conn: Connection, complete: bool, expects_continue: bool):
        Inbound.__init__(self, conn)  # (not super(): one object less a request)
        self.conn = conn
        self.complete = complete
        self.error: BaseException | None = None
        self.expects_continue = expects_continue and not complete
        self.discard = False  # the answer is done: what still arrives is dropped
        self.abandoned = False  # the client stalled: close without waiting for the rest

    def feed(self, data: bytes) -> None:
        if not self.discard:
            self.push(data)

    def finish(self) -> None:
        self.complete = True
        self.wake()

    def fail(self, error: BaseException) -> None:
        if not self.complete:
            self.error = error
            self.wake()

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
            await self.arrival()
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
        body.drop()

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
        if conn.closed:
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
