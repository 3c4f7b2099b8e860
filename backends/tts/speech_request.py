"""Validation of speech requests: a JSON body in, a `SpeechRequest` or a `RequestError` out.

Pure: the engine's capabilities come in as a `Capabilities` value. 400 = malformed body or wrong
field type; 422 = well-formed but unacceptable value (empty/too long input, unknown voice, ...).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .formats import RESPONSE_FORMATS
from .voices import shown

OPENAI_SPEED_RANGE = (0.25, 4.0)
# Largest decoded reference clip for voice cloning (a few seconds of audio is what engines use).
MAX_REFERENCE_AUDIO_BYTES = 10 * 1024 * 1024

# Engine-specific request fields: name -> (min, max) for numbers; reference_audio is base64 text.
NUMERIC_OPTIONS = {
    "exaggeration": (0.0, 2.0),
    "cfg_weight": (0.0, 2.0),
    "temperature": (0.05, 5.0),
}
REFERENCE_AUDIO = "reference_audio"


class RequestError(Exception):
    """A request the server refuses; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Capabilities:
    """What the loaded engine accepts."""

    voices: frozenset[str]
    default_voice: str
    options: frozenset[str]
    speed_range: tuple[float, float]
    max_chars: int
    aliases: Mapping[str, str] = field(default_factory=dict)  # other name -> one of `voices`


@dataclass(frozen=True)
class SpeechRequest:
    """A validated request: what to say, how, and in which container."""

    text: str
    voice: str  # the engine's own voice name (an alias is resolved)
    speed: float
    response_format: str
    options: dict[str, Any] = field(default_factory=dict)
    # False: the whole audio in one sized answer (Content-Length; a WAV's sizes filled in) rather
    # than streamed sentence by sentence. A one-sentence input is always answered whole.
    stream: bool = True


def parse_openai_speech(body: Any, caps: Capabilities) -> SpeechRequest:
    """Validate a `POST /v1/audio/speech` body (OpenAI fields plus the engine's options)."""
    body = _require_object(body)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError(400, "'model' must be a string")
    response_format = _optional_str(body, "response_format") or "wav"
    if response_format not in RESPONSE_FORMATS:
        supported = ", ".join(RESPONSE_FORMATS)
        raise RequestError(
            422, f"unsupported response_format {response_format!r}; supported: {supported}"
        )
    stream_format = _optional_str(body, "stream_format")
    if stream_format not in (None, "audio"):
        raise RequestError(422, f"unsupported stream_format {stream_format!r}; supported: audio")
    return _speech(body, "input", response_format, caps)


def parse_synthesize(body: Any, caps: Capabilities) -> SpeechRequest:
    """Validate a `POST /synthesize` body: `text` (required), `voice`, `speed`, engine options."""
    return _speech(_require_object(body), "text", "wav", caps)


def _speech(body: dict, text_field: str, response_format: str, caps: Capabilities) -> SpeechRequest:
    return SpeechRequest(
        text=_text(body, text_field, caps.max_chars),
        voice=_voice(body, caps),
        speed=_speed(body, caps.speed_range),
        response_format=response_format,
        options=_options(body, caps.options),
        stream=_stream(body),
    )


def _require_object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise RequestError(400, "request body must be a JSON object")
    return body


def _optional_str(body: dict, name: str) -> str | None:
    value = body.get(name)
    if value is not None and not isinstance(value, str):
        raise RequestError(400, f"{name!r} must be a string")
    return value


def _text(body: dict, name: str, max_chars: int) -> str:
    if name not in body:
        raise RequestError(400, f"missing required field {name!r}")
    text = _optional_str(body, name) or ""
    if not text.strip():
        raise RequestError(422, f"{name!r} is empty: nothing to synthesize")
    if len(text) > max_chars:
        raise RequestError(
            422, f"{name!r} is {len(text)} characters long; the limit is {max_chars}"
        )
    return text


def _voice(body: dict, caps: Capabilities) -> str:
    """The engine voice to speak with: the one named, the one an alias names, or the default."""
    voice = body.get("voice")
    if isinstance(voice, dict) and isinstance(voice.get("id"), str):
        voice = voice["id"]  # OpenAI's custom voice reference, {"id": "..."}
    elif voice is not None and not isinstance(voice, str):
        raise RequestError(400, "'voice' must be a string")
    voice = voice or caps.default_voice
    if voice in caps.voices:
        return voice
    if voice in caps.aliases:
        return caps.aliases[voice]
    aliases = f"; aliases: {', '.join(sorted(caps.aliases))}" if caps.aliases else ""
    raise RequestError(
        422, f"unknown voice {voice!r}; available: {shown(caps.voices)}{aliases}; "
             "GET /voices lists them"
    )


def _stream(body: dict) -> bool:
    stream = body.get("stream", True)
    if stream is None:
        return True
    if not isinstance(stream, bool):
        raise RequestError(400, "'stream' must be true or false")
    return stream


def _number(body: dict, name: str) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(400, f"{name!r} must be a number")
    return float(value)


def _speed(body: dict, engine_range: tuple[float, float]) -> float:
    speed = _number(body, "speed")
    if speed is None:
        return 1.0
    low, high = max(OPENAI_SPEED_RANGE[0], engine_range[0]), min(OPENAI_SPEED_RANGE[1], engine_range[1])
    if low == high != speed:
        raise RequestError(422, f"'speed' must be {low:g}: this engine has no speed control")
    if not low <= speed <= high:
        raise RequestError(422, f"'speed' must be between {low:g} and {high:g} for this engine")
    return speed


def _options(body: dict, supported: frozenset[str]) -> dict[str, Any]:
    given = [name for name in (*NUMERIC_OPTIONS, REFERENCE_AUDIO) if body.get(name) is not None]
    unsupported = [name for name in given if name not in supported]
    if unsupported:
        raise RequestError(
            422, f"this engine does not support {', '.join(map(repr, unsupported))}"
        )
    options: dict[str, Any] = {}
    for name in given:
        if name == REFERENCE_AUDIO:
            options[name] = _reference_audio(body[name])
            continue
        value = _number(body, name)
        low, high = NUMERIC_OPTIONS[name]
        if not low <= value <= high:
            raise RequestError(422, f"{name!r} must be between {low:g} and {high:g}")
        options[name] = value
    return options


def _reference_audio(value: Any) -> bytes:
    if not isinstance(value, str):
        raise RequestError(400, "'reference_audio' must be a base64 string")
    if value.startswith("data:") and "," in value:  # a data: URL is accepted too
        value = value.split(",", 1)[1]
    if len(value) > MAX_REFERENCE_AUDIO_BYTES * 4 // 3 + 4:
        raise RequestError(422, f"'reference_audio' is over {MAX_REFERENCE_AUDIO_BYTES} bytes")
    try:
        clip = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, "'reference_audio' is not valid base64") from None
    if not clip:
        raise RequestError(422, "'reference_audio' is empty")
    return clip
