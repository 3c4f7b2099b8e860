"""eSpeak NG engine (CPU): Debian's `espeak-ng` program, one process per sentence.

Robotic but instant and tiny: a fast engine for tests and a fallback without model files.
Voices are espeak-ng's language codes (`en-us`, `de`, ...), MBROLA voices excepted.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator

from ..audio import wav_pcm

DEFAULT_VOICE = "en-us"
WORDS_PER_MINUTE = 175  # espeak-ng's default rate, used for speed 1.0
TIMEOUT_SECONDS = 60


def list_voices(program: str) -> list[str]:
    """Language codes of the voices `espeak-ng --voices` lists, without MBROLA ones."""
    listing = subprocess.run(
        [program, "--voices"], capture_output=True, text=True, check=True, timeout=TIMEOUT_SECONDS
    ).stdout
    voices = set()
    for line in listing.splitlines()[1:]:
        columns = line.split()
        if len(columns) >= 5 and not columns[4].startswith("mb/"):
            voices.add(columns[1])
    return sorted(voices)


class EspeakEngine:
    """The espeak-ng program and its voices."""

    name = "espeak"
    options: frozenset[str] = frozenset()
    speed_range = (0.5, 2.5)  # espeak-ng accepts 80..450 words per minute

    def __init__(self, program: str, voices: list[str], default_voice: str, sample_rate: int):
        self.program = program
        self.available = voices
        self.default_voice = default_voice
        self.sample_rate = sample_rate

    def voices(self) -> list[str]:
        return list(self.available)

    def synthesize(self, text: str, voice: str, speed: float, **options) -> Iterator[bytes]:
        sample_rate, pcm = self.run(text, voice, speed)
        if sample_rate != self.sample_rate:
            raise RuntimeError(f"espeak-ng answered at {sample_rate} Hz, expected {self.sample_rate}")
        yield pcm

    def run(self, text: str, voice: str, speed: float) -> tuple[int, bytes]:
        """(sample rate, PCM) of espeak-ng speaking `text`; text goes in on stdin, never as argv."""
        words_per_minute = str(round(WORDS_PER_MINUTE * speed))
        result = subprocess.run(
            [self.program, "--stdout", "--stdin", "-v", voice, "-s", words_per_minute],
            input=text.encode(), capture_output=True, check=True, timeout=TIMEOUT_SECONDS,
        )
        return wav_pcm(result.stdout)


def load(voice: str | None = None, model_dir: str | None = None, device: str | None = None) -> EspeakEngine:
    """Find espeak-ng, list its voices and learn its sample rate from a first utterance."""
    program = shutil.which("espeak-ng")
    if program is None:
        raise RuntimeError("espeak-ng is not installed (apt-get install -y espeak-ng)")
    voices = list_voices(program)
    default_voice = voice or DEFAULT_VOICE
    if default_voice not in voices:
        raise ValueError(f"unknown espeak-ng voice {default_voice!r}")
    engine = EspeakEngine(program, voices, default_voice, sample_rate=0)
    engine.sample_rate, _ = engine.run("Ready.", default_voice, 1.0)
    return engine
