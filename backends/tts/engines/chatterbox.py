"""Chatterbox engine (GPU): Resemble AI's `chatterbox-tts`, with voice cloning from a client clip.

`ChatterboxTTS.generate(text, audio_prompt_path=..., exaggeration, cfg_weight, temperature)`
returns a float tensor of shape (1, samples) at `model.sr` Hz. Cloning stores the clip's
"conditionals" on the model (`model.conds`), so this adapter computes them once per clip, keeps a
few, and sets the right ones before every call; the built-in voice's are kept aside at load.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import numpy as np

from . import EngineInputError

log = logging.getLogger(__name__)

DEFAULT_VOICE = "default"
DEFAULTS = {"exaggeration": 0.5, "cfg_weight": 0.5, "temperature": 0.8}
CACHED_CLIPS = 8


def float_to_pcm16(wav: Any) -> bytes:
    """s16le bytes of a float waveform in [-1, 1] (torch tensor or array, any shape)."""
    if hasattr(wav, "detach"):
        wav = wav.detach().cpu().numpy()
    samples = np.asarray(wav, dtype=np.float32).reshape(-1)
    return (np.clip(samples, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


class ChatterboxEngine:
    """A loaded ChatterboxTTS model. Not thread-safe (generate mutates `model.conds`)."""

    name = "chatterbox"
    default_voice = DEFAULT_VOICE
    options = frozenset({*DEFAULTS, "reference_audio"})
    speed_range = (1.0, 1.0)  # the model has no speed control

    def __init__(self, model: Any):
        self.model = model
        self.sample_rate = int(model.sr)
        self.builtin_conds = model.conds
        self.clip_conds: OrderedDict[str, Any] = OrderedDict()

    def voices(self) -> list[str]:
        return [DEFAULT_VOICE]

    def synthesize(self, text: str, voice: str, speed: float, **options) -> Iterator[bytes]:
        settings = {name: options.get(name, default) for name, default in DEFAULTS.items()}
        self.model.conds = self.conditionals(options.get("reference_audio"), settings["exaggeration"])
        wav = self.model.generate(text, **settings)
        yield float_to_pcm16(wav)

    def conditionals(self, clip: bytes | None, exaggeration: float) -> Any:
        """The model conditionals for a reference clip (cached by content), or the built-in ones."""
        if clip is None:
            if self.builtin_conds is None:
                raise EngineInputError(
                    "this Chatterbox model has no built-in voice: send 'reference_audio'"
                )
            return self.builtin_conds
        key = hashlib.sha256(clip).hexdigest()
        if key in self.clip_conds:
            self.clip_conds.move_to_end(key)
            return self.clip_conds[key]
        conds = self.prepare_clip(clip, exaggeration)
        self.clip_conds[key] = conds
        if len(self.clip_conds) > CACHED_CLIPS:
            self.clip_conds.popitem(last=False)
        return conds

    def prepare_clip(self, clip: bytes, exaggeration: float) -> Any:
        """Run the model's own `prepare_conditionals` on the clip (it reads a file path)."""
        with tempfile.NamedTemporaryFile(suffix=".audio", delete=False) as file:
            file.write(clip)
        try:
            self.model.prepare_conditionals(file.name, exaggeration=exaggeration)
        except Exception as error:  # an unreadable or too short clip is the client's input
            raise EngineInputError(f"could not use 'reference_audio': {error}") from error
        finally:
            os.unlink(file.name)
        return self.model.conds


def pick_device(device: str | None) -> str:
    """The requested device, else "cuda" when torch sees a GPU, else "cpu"."""
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load(
    voice: str | None = None, model_dir: str | None = None, device: str | None = None
) -> ChatterboxEngine:
    """Load weights from `model_dir` (from_local) or from the model hub (from_pretrained)."""
    if voice not in (None, "", DEFAULT_VOICE):
        raise ValueError(f"Chatterbox has one built-in voice, {DEFAULT_VOICE!r}; clone others "
                         "per request with 'reference_audio'")
    from chatterbox.tts import ChatterboxTTS

    device = pick_device(device)
    if model_dir:
        model = ChatterboxTTS.from_local(model_dir, device)
    else:
        model = ChatterboxTTS.from_pretrained(device)
    log.info("chatterbox loaded on %s (%d Hz, from %s)", device, model.sr, model_dir or "the hub")
    return ChatterboxEngine(model)
