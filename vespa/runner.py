"""aiohttp's runner for the worker: its sites (listening sockets, TLS) serve ``front.FrontServer``.

Kept out of the compiled request path: it subclasses aiohttp's ``BaseRunner``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from .front import FrontServer

if TYPE_CHECKING:
    from .app import Worker


class WorkerRunner(web.BaseRunner):
    """Serves a ``Worker`` with ``front.FrontServer`` on aiohttp's runner and sites (listening
    sockets, TLS). The worker's start-up and clean-up run where an AppRunner would run the
    app's signals. Of aiohttp's server options only ``keepalive_timeout`` applies; a client that
    goes away always cancels its request, one that takes nothing of an answer for
    VESPA_REQUEST_TIMEOUT seconds is cut.
    """

    def __init__(self, worker: Worker, *, handle_signals: bool = False, **kwargs):
        super().__init__(handle_signals=handle_signals, **kwargs)
        self.worker = worker

    async def _make_server(self) -> FrontServer:  # type: ignore[override]  # its own server
        await self.worker.on_startup()
        settings = self.worker.settings
        return FrontServer(self.worker.dispatch,
                           keepalive_timeout=self._kwargs.get("keepalive_timeout",
                                                              settings.keepalive_timeout),
                           write_timeout=settings.request_timeout)

    async def shutdown(self) -> None:
        pass

    async def _cleanup_server(self) -> None:
        await self.worker.on_cleanup()
