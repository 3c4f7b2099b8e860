"""Flow control, one mechanism for both sides of the proxy: the client's connection and the
backend's.

``Inbound`` is the buffer of bytes a peer sent that nobody has taken yet (a request body, a
response body): past ``HIGH_WATER`` bytes its connection stops reading the socket, and taking
the bytes lets it read again. ``FlowControl`` is the connection's half: reading paused or not,
and the write drain (the transport says when its buffer is full; a writer waits until it empties).
"""

from __future__ import annotations

import asyncio
from collections import deque

from . import timeouts

HIGH_WATER = 256 * 1024  # bytes buffered before a connection stops reading


class FlowControl:
    """A connection's flow control (an asyncio protocol's half of it): reading paused while its
    peer's bytes wait to be taken, and writes that wait while the transport's buffer is full."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.transport: asyncio.Transport  # set by connection_made, before anything else
        self.closed = False  # lost or closed: no more reading, no more writing
        self.reading_paused = False
        self.writable: asyncio.Future[None] | None = None  # set while writes must wait

    # -- asyncio protocol ----------------------------------------------------------------------
    def pause_writing(self) -> None:
        if self.writable is None:
            self.writable = self.loop.create_future()

    def resume_writing(self) -> None:
        self.release_writers()
        self.writable = None

    def release_writers(self) -> None:
        """Writers waiting for the drain go on now (the peer answered, or the buffer emptied)."""
        writable = self.writable
        if writable is not None and not writable.done():
            writable.set_result(None)

    def fail_writers(self, error: BaseException) -> None:
        """The connection is gone: writers waiting for the drain get ``error``."""
        writable = self.writable
        if writable is not None and not writable.done():
            writable.set_exception(error)
            writable.exception()  # retrieved: nobody may be waiting

    # -- reading -------------------------------------------------------------------------------
    def pause_reading(self) -> None:
        if not self.reading_paused and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()

    # -- writing -------------------------------------------------------------------------------
    async def writable_again(self, timeout: float | None = None) -> None:
        """Wait while the transport's buffer is full; ``asyncio.TimeoutError`` after
        ``timeout`` seconds of it (None: no limit)."""
        if self.writable is not None:
            if timeout is None:
                await self.writable
            else:
                async with timeouts.timeout(timeout):
                    await self.writable


class Inbound:
    """Bytes a peer sent that wait to be taken, chunk by chunk; past ``HIGH_WATER`` the
    connection (``flow``) stops reading until they are taken."""

    __slots__ = ("flow", "chunks", "buffered", "waiter")

    def __init__(self, flow: FlowControl):
        self.flow = flow
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.waiter: asyncio.Future[None] | None = None

    def push(self, data: bytes) -> None:
        self.chunks.append(data)
        self.buffered += len(data)
        if self.buffered > HIGH_WATER:
            self.flow.pause_reading()
        self.wake()

    def wake(self) -> None:
        """Whoever waits for bytes looks again (more came, the end came, or an error)."""
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def arrival(self) -> None:
        """Wait until ``wake``."""
        self.waiter = self.flow.loop.create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None

    def take(self) -> bytes:
        """Everything buffered (b"" when nothing is), taken out; the connection reads again."""
        chunks = self.chunks
        if not chunks:
            return b""
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.buffered = 0
        self.flow.resume_reading()
        return data

    def drop(self) -> None:
        """Forget what is buffered (nobody will read it)."""
        self.chunks.clear()
        self.buffered = 0
