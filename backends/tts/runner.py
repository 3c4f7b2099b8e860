"""The engine's own worker thread: loading it off the event loop and running its calls one at a time.

Holds the engine's state for /health: loading, ready (with the engine) or failed (with the error).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from .engines import Engine
from .speech_request import Capabilities, SpeechRequest
from .voices import AliasSettings

log = logging.getLogger(__name__)

LOADING, READY, FAILED = "loading", "ready", "failed"


class EngineRunner:
    """One engine and the single thread every engine call runs on (engines need not be
    thread-safe; queued calls of concurrent requests interleave sentence by sentence)."""

    def __init__(self, load: Callable[[], Engine], max_chars: int,
                 voice_aliases: AliasSettings = AliasSettings()):
        self.load_engine = load
        self.max_chars = max_chars
        self.voice_aliases = voice_aliases
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tts-engine")
        self.engine: Engine | None = None
        self.capabilities: Capabilities | None = None
        self.error: str | None = None

    @property
    def state(self) -> str:
        if self.engine is not None:
            return READY
        return FAILED if self.error is not None else LOADING

    async def load(self) -> None:
        """Load the engine on its thread; on failure keep the error and raise it."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            engine = await loop.run_in_executor(self.executor, self.load_engine)
            voices = frozenset(engine.voices())
            aliases = self.voice_aliases.resolve(voices, engine.default_voice)
        except Exception as error:
            self.error = f"{type(error).__name__}: {error}"
            raise
        self.capabilities = Capabilities(
            voices=voices,
            default_voice=engine.default_voice,
            options=frozenset(engine.options),
            speed_range=tuple(engine.speed_range),
            max_chars=self.max_chars,
            aliases=aliases,
        )
        self.engine = engine
        log.info("engine %s ready in %.1f s (%d Hz, %d voices, %d aliases)",
                 engine.name, loop.time() - started, engine.sample_rate, len(voices), len(aliases))

    async def synthesize(self, text: str, speech: SpeechRequest) -> bytes:
        """PCM of one piece of text, computed on the engine thread."""
        assert self.engine is not None, "engine not loaded"
        call = functools.partial(
            synthesize_piece, self.engine, text, speech.voice, speech.speed, speech.options
        )
        return await asyncio.get_running_loop().run_in_executor(self.executor, call)

    def close(self) -> None:
        """Drop queued calls and let the thread end after the current one."""
        self.executor.shutdown(wait=False, cancel_futures=True)


def synthesize_piece(engine: Engine, text: str, voice: str, speed: float, options: dict) -> bytes:
    """All PCM chunks of one engine call, joined (runs on the engine thread)."""
    return b"".join(engine.synthesize(text, voice, speed, **options))
