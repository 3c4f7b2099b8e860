"""A backend process for supervisor tests: serves /health and /echo, and misbehaves on request.

--child-pidfile F   start a grandchild (sleep) and write "<own pid> <grandchild pid>" to F
--crash-after S     exit with code 3 S seconds after start
--crash-once F      crash only if marker file F does not exist yet (then create it)
--access-log        print a line per request, as uvicorn (vLLM's server) logs it
"""

import argparse
import asyncio
import os
import subprocess
import sys

from aiohttp import web


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--child-pidfile")
    parser.add_argument("--crash-after", type=float)
    parser.add_argument("--crash-once")
    parser.add_argument("--access-log", action="store_true")
    args = parser.parse_args()
    print("backend starting", flush=True)
    if args.child_pidfile:
        child = subprocess.Popen(["sleep", "300"])
        with open(args.child_pidfile, "w") as file:
            file.write(f"{os.getpid()} {child.pid}")

    async def health(request):
        return web.Response(text="ok")

    async def echo(request):
        return web.json_response({"pid": os.getpid(), "body": (await request.read()).decode()})

    @web.middleware
    async def access_log(request, handler):
        response = await handler(request)
        peer = request.transport.get_extra_info("peername") or ("?", 0)
        print(f'INFO:     {peer[0]}:{peer[1]} - "{request.method} {request.path_qs} '
              f'HTTP/{request.version.major}.{request.version.minor}" {response.status} OK',
              flush=True)
        return response

    app = web.Application(middlewares=[access_log] if args.access_log else [])
    app.router.add_get("/health", health)
    app.router.add_route("*", "/echo", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", args.port).start()
    print(f"backend ready on {args.port}", flush=True)
    crash = args.crash_after is not None
    if args.crash_once:
        crash = not os.path.exists(args.crash_once)
        open(args.crash_once, "a").close()
    if crash:
        await asyncio.sleep(args.crash_after or 0.5)
        print("backend: something terrible happened", flush=True)
        sys.exit(3)
    await asyncio.Event().wait()


asyncio.run(main())
