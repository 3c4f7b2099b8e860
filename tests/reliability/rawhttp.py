"""Raw HTTP on loopback sockets: crafted requests in, strictly parsed responses out, and
backends that record exactly what arrived (``RecordingBackend``) or answer with canned, possibly
malformed bytes (``CannedBackend``)."""

from __future__ import annotations

import asyncio
import json
import socket
from dataclasses import dataclass

import httptools


def raw_request(target: bytes, *headers: bytes, method: bytes = b"GET",
                body: bytes = b"") -> bytes:
    """One request, byte for byte; ``Connection: close`` so the worker hangs up after it."""
    lines = [method + b" " + target + b" HTTP/1.1", b"Host: worker", b"Connection: close",
             *headers]
    if body:
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)


class _ResponseCollector:
    def __init__(self):
        self.responses: list[RawResponse] = []
        self.parser = httptools.HttpResponseParser(self)
        self.current: RawResponse | None = None
        self.complete = 0

    def on_message_begin(self):
        self.current = RawResponse(0, [], b"")

    def on_header(self, name, value):
        self.current.headers.append((name, value))

    def on_headers_complete(self):
        self.current.status = self.parser.get_status_code()

    def on_body(self, body):
        self.current.body += body

    def on_message_complete(self):
        self.responses.append(self.current)
        self.complete += 1


async def raw_exchange(port: int, data: bytes | list[bytes], *, read_timeout: float = 5.0,
                       gap: float = 0.0) -> tuple[list[RawResponse], bytes]:
    """Send raw bytes (a list: pieces with ``gap`` seconds between them) and read until the
    worker closes or goes quiet; returns the responses parsed strictly and the raw bytes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    pieces = data if isinstance(data, list) else [data]
    raw = b""
    try:
        for n, piece in enumerate(pieces):
            writer.write(piece)
            await writer.drain()
            if gap and n + 1 < len(pieces):
                await asyncio.sleep(gap)
        while True:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), read_timeout)
            except asyncio.TimeoutError:
                break
            if not chunk:
                break
            raw += chunk
    except ConnectionError:
        pass
    finally:
        writer.close()
    collector = _ResponseCollector()
    try:
        collector.parser.feed_data(raw)
    except httptools.HttpParserError:
        pass
    return collector.responses, raw


# -- misbehaving backends on raw sockets ---------------------------------------------------------

@dataclass
class SeenRequest:
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    seq: int = 0  # 1-based arrival order at the backend, sent back as X-Backend-Seq


class RecordingBackend:
    """A strict HTTP/1.1 backend (llhttp) recording every request it parses: what the worker
    really sent upstream. Replies 200 with ``X-Backend-Seq``; closes on a parse error."""

    def __init__(self):
        self.requests: list[SeenRequest] = []
        self.parse_errors: list[str] = []
        self.connections = 0
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self) -> "RecordingBackend":
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        self.server.close()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        backend = self

        class Handler:
            def __init__(self):
                self.parser = httptools.HttpRequestParser(self)
                self.headers, self.body, self.target = [], b"", b""
                self.done: list[SeenRequest] = []

            def on_url(self, url):
                self.target += url

            def on_header(self, name, value):
                self.headers.append((name, value))

            def on_body(self, body):
                self.body += body

            def on_message_complete(self):
                seen = SeenRequest(self.parser.get_method(), self.target, self.headers, self.body)
                self.done.append(seen)
                self.headers, self.body, self.target = [], b"", b""

        handler = Handler()
        try:
            while chunk := await reader.read(65536):
                try:
                    handler.parser.feed_data(chunk)
                except httptools.HttpParserUpgrade:
                    pass
                except httptools.HttpParserError as exc:
                    backend.parse_errors.append(f"{exc}: {chunk[:200]!r}")
                    break
                for seen in handler.done:
                    backend.requests.append(seen)
                    seen.seq = len(backend.requests)
                    if seen.target == b"/health":
                        body = b"ok"
                    else:
                        body = json.dumps({"seq": len(backend.requests),
                                           "target": seen.target.decode("latin-1"),
                                           "body_len": len(seen.body)}).encode()
                    writer.write(b"HTTP/1.1 200 OK\r\nX-Backend-Seq: %d\r\nContent-Length: %d"
                                 b"\r\nContent-Type: application/json\r\n\r\n%s"
                                 % (len(backend.requests), len(body), body))
                handler.done.clear()
        except ConnectionError:
            pass
        finally:
            writer.close()

    def real_requests(self) -> list[SeenRequest]:
        """What reached the backend, minus the worker's own health checks."""
        return [r for r in self.requests if r.target != b"/health"]


class CannedBackend:
    """A backend answering ``/m/<name>`` with canned raw bytes (malformed HTTP, trickles, hangs)
    and everything else (health, ``/ok``) with a plain 200. A reply is a list of
    (bytes, seconds to wait after) steps; ``None`` as bytes closes the connection."""

    def __init__(self, replies: dict[str, list[tuple[bytes | None, float]]]):
        self.replies = replies
        self.server: asyncio.AbstractServer | None = None
        self.port = 0
        self.tasks: set[asyncio.Task] = set()

    async def start(self) -> "CannedBackend":
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        self.server.close()
        for task in self.tasks:
            task.cancel()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.tasks.add(asyncio.current_task())
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                target = head.split(b" ", 2)[1].decode("latin-1")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await reader.readexactly(length)
                name = target.split("?")[0].removeprefix("/m/")
                if target.startswith("/m/") and name in self.replies:
                    for data, wait in self.replies[name]:
                        if data is None:
                            writer.transport.abort()
                            return
                        writer.write(data)
                        if wait:
                            await asyncio.sleep(wait)
                    continue
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError,
                asyncio.CancelledError):
            pass
        finally:
            writer.close()
            self.tasks.discard(asyncio.current_task())


def raw_exchange_sync(port: int, data: bytes, read_timeout: float = 1.0,
                      max_bytes: int = 1 << 20) -> tuple[list[RawResponse], bytes]:
    """``raw_exchange`` for synchronous (hypothesis) tests: one connection, raw bytes in, every
    byte until the worker closes or is quiet for ``read_timeout``."""
    raw = b""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        try:
            sock.sendall(data)
        except OSError:
            pass
        sock.settimeout(read_timeout)
        while len(raw) < max_bytes:
            try:
                chunk = sock.recv(65536)
            except (socket.timeout, OSError):
                break
            if not chunk:
                break
            raw += chunk
    collector = _ResponseCollector()
    try:
        collector.parser.feed_data(raw)
    except httptools.HttpParserError:
        pass
    return collector.responses, raw
