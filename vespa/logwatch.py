"""Watch a backend's log file for its "ready" and "error" lines, following rotation."""

from __future__ import annotations

import asyncio
import os
import re


class LogWatch:
    """Reads what is appended to ``path``; remembers the first ready and error line it sees.

    Rotation (the file replaced, or truncated) starts reading the new file from its beginning.
    Reads run in a thread: the event loop never waits on the disk.
    """

    def __init__(self, path: str, ready: str | None, error: str | None):
        self.path = path
        self.ready_pattern = re.compile(ready) if ready else None
        self.error_pattern = re.compile(error) if error else None
        self.ready_line: str | None = None
        self.error_line: str | None = None
        self.inode: int | None = None
        self.offset = 0
        self.partial = b""

    def _read_new(self) -> bytes:
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return b""
        if stat.st_ino != self.inode or stat.st_size < self.offset:
            self.inode, self.offset, self.partial = stat.st_ino, 0, b""
        if stat.st_size == self.offset:
            return b""
        with open(self.path, "rb") as file:
            file.seek(self.offset)
            data = file.read(1 << 20)
        self.offset += len(data)
        return data

    def feed(self, data: bytes) -> None:
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()[-65536:]
        for raw in lines:
            line = raw.decode("utf-8", "replace").rstrip("\r")
            if self.error_line is None and self.error_pattern and self.error_pattern.search(line):
                self.error_line = line
            if self.ready_line is None and self.ready_pattern and self.ready_pattern.search(line):
                self.ready_line = line

    async def poll(self) -> None:
        self.feed(await asyncio.to_thread(self._read_new))

    async def run(self, interval: float = 0.5) -> None:
        while True:
            await self.poll()
            await asyncio.sleep(interval)
