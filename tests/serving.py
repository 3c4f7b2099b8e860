"""A test server for an in-process worker, served the way ``python -m vespa`` serves it."""

from __future__ import annotations

from aiohttp.test_utils import BaseTestServer

from vespa.app import Worker
from vespa.runner import WorkerRunner


class WorkerTestServer(BaseTestServer):
    """Like aiohttp's ``TestServer(app)``, for a ``Worker`` on its ``WorkerRunner``."""

    def __init__(self, worker: Worker, **kwargs):
        self.worker = worker
        super().__init__(**kwargs)

    async def _make_runner(self, debug: bool = True, **kwargs) -> WorkerRunner:
        return WorkerRunner(self.worker, **kwargs)
