"""The TTS HTTP server: routes, JSON errors, engine loading at start-up, and `serve()`.

POST /v1/audio/speech (OpenAI-compatible), POST /synthesize ({"text"} -> WAV), GET /voices,
GET /health (200 once the engine is loaded, 503 while loading, 500 if loading failed).
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from collections.abc import Callable

from aiohttp import web

from .engines import Engine, EngineInputError
from .runner import FAILED, READY, EngineRunner
from .speech_request import RequestError, parse_openai_speech, parse_synthesize
from .stream import answer_speech
from .voices import AliasSettings

log = logging.getLogger(__name__)

RUNNER = web.AppKey("runner", EngineRunner)
SHUTDOWN = web.AppKey("shutdown", asyncio.Event)
# Room for a base64 reference clip (voice cloning) next to the text.
MAX_BODY_BYTES = 16 * 1024 * 1024


def error_response(status: int, message: str) -> web.Response:
    """OpenAI's error object, so that its SDKs show the message (with a bare string they show
    only "Error code: 422")."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return web.json_response({"error": {"message": message, "type": kind, "param": None,
                                        "code": None}}, status=status)


@web.middleware
async def json_errors(request: web.Request, handler) -> web.StreamResponse:
    """Refusals and failures before a response started become OpenAI's error object,
    `{"error": {"message": ..., "type": ...}}`."""
    try:
        return await handler(request)
    except RequestError as error:
        return error_response(error.status, error.message)
    except EngineInputError as error:
        return error_response(422, str(error))
    except web.HTTPException:
        raise
    except Exception as error:
        log.exception("request failed: %s %s", request.method, request.path)
        return error_response(500, f"synthesis failed: {type(error).__name__}: {error}")


def ready_runner(request: web.Request) -> EngineRunner:
    runner = request.app[RUNNER]
    if runner.state != READY:
        raise RequestError(503, f"TTS engine is {runner.state}")
    return runner


async def json_body(request: web.Request) -> object:
    try:
        return await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RequestError(400, "request body is not valid JSON") from None


async def speech(request: web.Request) -> web.StreamResponse:
    runner = ready_runner(request)
    speech_request = parse_openai_speech(await json_body(request), runner.capabilities)
    return await answer_speech(request, runner, speech_request)


async def synthesize(request: web.Request) -> web.StreamResponse:
    runner = ready_runner(request)
    speech_request = parse_synthesize(await json_body(request), runner.capabilities)
    return await answer_speech(request, runner, speech_request)


async def voices(request: web.Request) -> web.Response:
    runner = ready_runner(request)
    engine = runner.engine
    return web.json_response({
        "engine": engine.name,
        "default": engine.default_voice,
        "voices": sorted(runner.capabilities.voices),
        "aliases": dict(sorted(runner.capabilities.aliases.items())),
        "sample_rate": engine.sample_rate,
        "options": sorted(runner.capabilities.options),
    })


async def health(request: web.Request) -> web.Response:
    runner = request.app[RUNNER]
    if runner.state == READY:
        return web.json_response({"status": READY, "engine": runner.engine.name,
                                  "sample_rate": runner.engine.sample_rate})
    if runner.state == FAILED:
        return web.json_response({"status": FAILED, "error": runner.error}, status=500)
    return web.json_response({"status": runner.state}, status=503)


async def engine_lifecycle(app: web.Application):
    """Load the engine in the background while the server already answers /health with 503;
    a failed load asks `serve` to stop. At cleanup, drop the engine thread's queue."""
    runner = app[RUNNER]

    async def load() -> None:
        try:
            await runner.load()
        except Exception:
            log.exception("TTS engine failed to load")
            app[SHUTDOWN].set()

    task = asyncio.create_task(load())
    yield
    task.cancel()
    runner.close()


def create_app(load: Callable[[], Engine], max_chars: int,
               voice_aliases: AliasSettings = AliasSettings()) -> web.Application:
    """The application; `load` builds the engine (blocking, run on the engine thread)."""
    app = web.Application(middlewares=[json_errors], client_max_size=MAX_BODY_BYTES)
    app[RUNNER] = EngineRunner(load, max_chars, voice_aliases)
    app[SHUTDOWN] = asyncio.Event()
    app.cleanup_ctx.append(engine_lifecycle)
    app.router.add_post("/v1/audio/speech", speech)
    app.router.add_post("/synthesize", synthesize)
    app.router.add_get("/voices", voices)
    app.router.add_get("/health", health)
    return app


async def serve(app: web.Application, host: str, port: int) -> int:
    """Run `app` until SIGTERM/SIGINT (exit code 0) or a failed engine load (exit code 1).
    On SIGTERM, streams under way are finished (aiohttp's shutdown timeout, 60 s) before exit."""
    loop = asyncio.get_running_loop()
    shutdown = app[SHUTDOWN]
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signal_number, shutdown.set)
    app_runner = web.AppRunner(app, handle_signals=False)
    await app_runner.setup()
    try:
        await web.TCPSite(app_runner, host, port).start()
        log.info("TTS server listening on http://%s:%d (engine loading)", host, port)
        await shutdown.wait()
        log.info("TTS server stopping")
    finally:
        await app_runner.cleanup()
    return 1 if app[RUNNER].state == FAILED else 0
