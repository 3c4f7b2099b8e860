"""Speech engines behind one small interface, and the choice of which one to load.

Engine modules import their heavy libraries (onnxruntime, torch, ...) only inside `load`, so
importing this package stays cheap and works in any environment.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import shutil
import subprocess
from collections.abc import Iterator
from typing import Protocol

log = logging.getLogger(__name__)

ENGINE_MODULES = {
    "piper": "backends.tts.engines.piper",
    "chatterbox": "backends.tts.engines.chatterbox",
    "espeak": "backends.tts.engines.espeak",
}


class EngineInputError(ValueError):
    """The engine cannot use what the client sent (e.g. an unreadable reference clip): a 422."""


class Engine(Protocol):
    """A loaded text-to-speech engine. Calls may block: the server runs them in a worker thread,
    one at a time per engine, so implementations need not be thread-safe."""

    name: str
    sample_rate: int  # Hz of the mono s16le PCM that `synthesize` yields
    default_voice: str
    options: frozenset[str]  # engine-specific request fields it accepts (see speech_request)
    speed_range: tuple[float, float]

    def voices(self) -> list[str]:
        """Names accepted as `voice`."""
        ...

    def synthesize(self, text: str, voice: str, speed: float, **options) -> Iterator[bytes]:
        """Chunks of mono s16le PCM at `sample_rate` speaking `text` (one sentence or so)."""
        ...


def choose_engine(requested: str | None, chatterbox_installed: bool, gpu_present: bool) -> str:
    """The engine to load: the requested one, else chatterbox on a GPU where it is installed,
    else piper."""
    if requested:
        if requested not in ENGINE_MODULES:
            raise ValueError(
                f"unknown TTS engine {requested!r}; choose one of {', '.join(ENGINE_MODULES)}"
            )
        return requested
    return "chatterbox" if chatterbox_installed and gpu_present else "piper"


def default_engine(requested: str | None) -> str:
    """`choose_engine` with the facts of this machine (runs `nvidia-smi` only when needed)."""
    if requested:
        return choose_engine(requested, False, False)
    installed = importlib.util.find_spec("chatterbox") is not None
    return choose_engine(None, installed, installed and nvidia_gpu_present())


def nvidia_gpu_present() -> bool:
    """True when `nvidia-smi -L` lists at least one GPU. Blocking: call it off the event loop."""
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        listing = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return listing.returncode == 0 and "GPU" in listing.stdout


def load_engine(name: str, voice: str | None, model_dir: str | None, device: str | None) -> Engine:
    """Import the engine's module and load it (slow: model weights). Blocking."""
    module = importlib.import_module(ENGINE_MODULES[name])
    log.info("loading TTS engine %s (voice=%s, model_dir=%s, device=%s)", name, voice, model_dir, device)
    return module.load(voice=voice, model_dir=model_dir, device=device)
