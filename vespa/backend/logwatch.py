"""Watch a backend's log file for its "ready" and "error" lines, following rotation."""

from __future__ import annotations

import asyncio
import os
import re
from typing import BinaryIO

CHUNK = 1 << 20  # the most one poll reads


class LogWatch:
    """Reads what is appended to ``path``; remembers the first ready and error line it sees.

    Rotation: a file renamed away is read to its end (it stays open), then the new file from its
    beginning; a truncated file is read again from its beginning. Reads run in a thread: the
    event loop never waits on the disk. ``close()`` when done watching.
    """

    def __init__(self, path: str, ready: str | None, error: str | None):
        self.path = path
        self.ready_pattern = re.compile(ready) if ready else None
        self.error_pattern = re.compile(error) if error else None
        self.ready_line: str | None = None
        self.error_line: str | None = None
        self.file: BinaryIO | None = None  # kept open: a renamed file is read to its end
        self.partial = b""

    def _read_new(self) -> bytes:
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            stat = None
        tail = b""
        if self.file is not None:
            current = os.fstat(self.file.fileno())
            if stat is not None and (stat.st_ino, stat.st_dev) == (current.st_ino,
                                                                   current.st_dev):
                if stat.st_size < self.file.tell():  # truncated: start over
                    self.file.seek(0)
                    self.partial = b""
                return self.file.read(CHUNK)
            tail = self.file.read(CHUNK)  # replaced or removed: the rest of the old file first
            if len(tail) == CHUNK:
                return tail
            self.close()
            tail += b"\n"  # the old file's last line ends with it
        if stat is None:
            return tail
        try:
            self.file = open(self.path, "rb")
        except FileNotFoundError:
            return tail
        return tail + self.file.read(CHUNK)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

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
        try:
            while True:
                await self.poll()
                await asyncio.sleep(interval)
        finally:
            self.close()
