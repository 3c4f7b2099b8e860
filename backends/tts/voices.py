"""Voice aliases: OpenAI's voice names (and any other names configured) mapped onto the engine's voices.

Code written for OpenAI sends `voice="alloy"`; no engine here has a voice of that name. By default
every OpenAI voice name speaks with the engine's default voice (piper: `en_US-joe-medium` or the
VESPA_TTS_VOICE file; espeak: `en-us` or VESPA_TTS_VOICE; chatterbox: its built-in `default`),
since piper and chatterbox load one voice each. VESPA_TTS_VOICE_ALIASES changes or extends that:

    VESPA_TTS_VOICE_ALIASES="fable=en-gb,onyx=en-us,narrator=de"   # name=engine voice, comma-separated
    VESPA_TTS_VOICE_ALIASES="none"                                 # no OpenAI names at all
    VESPA_TTS_VOICE_ALIASES="none,narrator=de"                     # only the names given

The engine's own voice names always win: an alias never hides one.
"""

from __future__ import annotations

from dataclasses import dataclass

# The built-in voices of OpenAI's speech API (`voice` of POST /v1/audio/speech), as listed by the
# API reference and the openai SDK's `speech_create_params.Voice`.
OPENAI_VOICES = (
    "alloy", "ash", "ballad", "cedar", "coral", "echo", "fable", "marin", "nova", "onyx", "sage",
    "shimmer", "verse",
)
SETTING = "VESPA_TTS_VOICE_ALIASES"
NONE = "none"


@dataclass(frozen=True)
class AliasSettings:
    """What VESPA_TTS_VOICE_ALIASES asks for; resolved against the engine once it is loaded."""

    openai: bool = True  # OpenAI's voice names speak with the engine's default voice
    mapped: tuple[tuple[str, str], ...] = ()  # (alias, engine voice), in the order given

    def resolve(self, voices: frozenset[str], default_voice: str) -> dict[str, str]:
        """alias -> engine voice; ValueError naming the setting if a mapping does not fit the engine."""
        aliases = {name: default_voice for name in OPENAI_VOICES if self.openai and name not in voices}
        for name, voice in self.mapped:
            if name in voices:
                raise ValueError(f"{SETTING}: {name!r} is already a voice of this engine; "
                                 "an alias cannot replace it")
            if voice not in voices:
                raise ValueError(f"{SETTING}: {name!r} is mapped to {voice!r}, which is not a "
                                 f"voice of this engine; its voices: {shown(voices)}")
            aliases[name] = voice
        return aliases


def parse_aliases(raw: str) -> AliasSettings:
    """The value of VESPA_TTS_VOICE_ALIASES (see the module's doc); ValueError if malformed."""
    openai = True
    mapped: dict[str, str] = {}
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        if item.lower() == NONE:
            openai = False
            continue
        name, equals, voice = (part.strip() for part in item.partition("="))
        if not equals or not name or not voice:
            raise ValueError(f"{SETTING}: expected name=voice pairs separated by commas "
                             f"(or {NONE!r}), got {item!r}")
        if name in mapped:
            raise ValueError(f"{SETTING}: {name!r} is mapped twice")
        mapped[name] = voice
    return AliasSettings(openai, tuple(mapped.items()))


def shown(names: frozenset[str] | set[str], limit: int = 10) -> str:
    """Up to `limit` names, sorted, and how many more there are."""
    ordered = sorted(names)
    more = f" (and {len(ordered) - limit} more)" if len(ordered) > limit else ""
    return ", ".join(ordered[:limit]) + more
