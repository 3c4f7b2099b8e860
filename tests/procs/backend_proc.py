"""A backend process for supervisor tests: serves /health and /echo, and misbehaves on request.

--child-pidfile F   start a grandchild (sleep) and write "<own pid> <grandchild pid>" to F
--crash-after S     exit with code 3 S seconds after start
--crash-once F      crash only if marker file F does not exist yet (then create it)
--access-log        print a line per request, as uvicorn (vLLM's server) logs it
--sigwait-child F   start a child that waits for SIGTERM and writes who sent it (the sender's pid)
                    to F; it writes its own pid to F.ready once it waits
--stop-child-on-sigterm  on SIGTERM, stop that child first (SIGTERM, wait), then exit 0: as vLLM's
                    API server stops its engine processes
--ignore-sigterm    SIGTERM does nothing
"""

import argparse
import asyncio
import os
import signal
import subprocess
import sys

SIGWAIT_CHILD = """
import os, signal, sys
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
with open(sys.argv[1] + ".ready", "w") as file:
    file.write(str(os.getpid()))
info = signal.sigwaitinfo({signal.SIGTERM})
with open(sys.argv[1], "w") as file:
    file.write(str(info.si_pid))
"""

from aiohttp import web


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--child-pidfile")
    parser.add_argument("--crash-after", type=float)
    parser.add_argument("--crash-once")
    parser.add_argument("--access-log", action="store_true")
    parser.add_argument("--sigwait-child")
    parser.add_argument("--stop-child-on-sigterm", action="store_true")
    parser.add_argument("--ignore-sigterm", action="store_true")
    args = parser.parse_args()
    print("backend starting", flush=True)
    loop = asyncio.get_running_loop()
    if args.ignore_sigterm:
        loop.add_signal_handler(signal.SIGTERM, lambda: print("backend ignores SIGTERM", flush=True))
    if args.sigwait_child:
        waiter = subprocess.Popen([sys.executable, "-c", SIGWAIT_CHILD, args.sigwait_child])
        if args.stop_child_on_sigterm:
            done = asyncio.Event()
            loop.add_signal_handler(signal.SIGTERM, done.set)

            async def stop_child_then_exit():
                await done.wait()
                print("backend: stopping its child", flush=True)
                waiter.terminate()
                await asyncio.to_thread(waiter.wait, 10)
                print("backend: stopped", flush=True)
                os._exit(0)

            stopper = asyncio.ensure_future(stop_child_then_exit())  # noqa: F841 - kept alive
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
