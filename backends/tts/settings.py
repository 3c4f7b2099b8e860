"""The TTS server's settings: `VESPA_TTS_*` environment variables, read once at start-up.

VESPA_TTS_ENGINE     piper | chatterbox | espeak (default: chatterbox on a GPU where installed, else piper)
VESPA_TTS_VOICE      default voice: piper en_US-joe-medium or a .onnx path; espeak en-us; chatterbox default
VESPA_TTS_MODEL_DIR  chatterbox: local folder with its weights (from_local) instead of the model hub
VESPA_TTS_DEVICE     chatterbox: torch device (default cuda when available, else cpu)
VESPA_TTS_MAX_CHARS  longest accepted input, in characters (default 4096)
VESPA_TTS_VOICE_ALIASES  other names for the engine's voices, `name=voice,...` (default: OpenAI's voice
                     names, alloy ... verse, speak with the default voice; `none` turns that off;
                     see voices.py)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .voices import AliasSettings, parse_aliases

DEFAULT_MAX_CHARS = 4096


@dataclass(frozen=True)
class Settings:
    engine: str | None = None
    voice: str | None = None
    model_dir: str | None = None
    device: str | None = None
    max_chars: int = DEFAULT_MAX_CHARS
    voice_aliases: AliasSettings = field(default_factory=AliasSettings)


def settings_from_env(env: Mapping[str, str]) -> Settings:
    """Settings from an environment mapping; ValueError with the variable's name if one is bad."""
    raw_max = env.get("VESPA_TTS_MAX_CHARS", "").strip()
    try:
        max_chars = int(raw_max) if raw_max else DEFAULT_MAX_CHARS
    except ValueError:
        raise ValueError(f"VESPA_TTS_MAX_CHARS must be a whole number, got {raw_max!r}") from None
    if max_chars < 1:
        raise ValueError(f"VESPA_TTS_MAX_CHARS must be at least 1, got {max_chars}")
    return Settings(
        engine=env.get("VESPA_TTS_ENGINE", "").strip().lower() or None,
        voice=env.get("VESPA_TTS_VOICE", "").strip() or None,
        model_dir=env.get("VESPA_TTS_MODEL_DIR", "").strip() or None,
        device=env.get("VESPA_TTS_DEVICE", "").strip() or None,
        max_chars=max_chars,
        voice_aliases=parse_aliases(env.get("VESPA_TTS_VOICE_ALIASES", "")),
    )
