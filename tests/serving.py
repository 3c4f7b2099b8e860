"""A test server for an in-process worker, served the way ``python -m vespa`` serves it:
``worker.start`` -> ``worker.listen`` -> ``worker.stop``. It is an aiohttp ``BaseTestServer`` so
that aiohttp's ``TestClient`` takes it; aiohttp's runner is not used."""

from __future__ import annotations

from typing import Any

from aiohttp.test_utils import BaseTestServer
from yarl import URL

from vespa.worker import Worker


class WorkerTestServer(BaseTestServer):
    def __init__(self, worker: Worker, **kwargs: Any):
        self.worker = worker
        super().__init__(**kwargs)

    async def start_server(self, loop: Any = None, ssl: Any = None, **_: Any) -> None:
        """Start the worker and listen (TLS with ``ssl``, an ``ssl.SSLContext``)."""
        if self.worker.listener is not None:
            return
        await self.worker.start()
        await self.worker.listen(self.host, self.port or 0, ssl)
        assert self.worker.listener is not None
        self.port = self.worker.listener.sockets[0].getsockname()[1]
        self._root = URL(f"{self.scheme or 'http'}://{self.host}:{self.port}")

    async def _make_runner(self, **kwargs: Any) -> Any:  # never used: no aiohttp runner
        raise NotImplementedError

    @property
    def started(self) -> bool:
        return self.worker.listener is not None

    async def close(self) -> None:
        if self.started and not self.closed:
            await self.worker.stop()
            self._root = None
            self.port = None
            self._closed = True
