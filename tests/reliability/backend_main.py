"""The test backend (``tests.backend``) plus the reliability routes, as a process of its own:
``python -m tests.reliability.backend_main --port N``. A process can be SIGKILLed mid-stream and
started again on the same port, and keeps the load test's backend off the test client's core."""

from __future__ import annotations

import argparse
import asyncio

from aiohttp import web

from ..backend import make_backend


async def trickle(request: web.Request) -> web.StreamResponse:
    """``n`` bytes, one every ``interval`` seconds: slow, but never silent for long."""
    n, interval = int(request.query.get("n", "5")), float(request.query.get("interval", "1"))
    response = web.StreamResponse(headers={"Content-Type": "text/plain"})
    response.content_length = n
    await response.prepare(request)
    for i in range(n):
        await response.write(b"%d" % (i % 10))
        if i + 1 < n:
            await asyncio.sleep(interval)
    return response


def make_app() -> web.Application:
    app, _ = make_backend()
    app.router.add_get("/trickle", trickle)
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    try:
        import uvloop
        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    web.run_app(make_app(), host="127.0.0.1", port=args.port, access_log=None, print=None,
                backlog=2048)


if __name__ == "__main__":
    main()
