"""Response formats of the speech endpoints: streaming encoders from s16le PCM to what is sent.

wav: a WAV header, then the samples: with its sizes when the whole audio is known before the header
goes out, else with open sizes (see audio.py); pcm: the raw samples (s16le, mono, the rate in the
X-Sample-Rate header); mp3: LAME via the `lameenc` package, offered only when it is installed.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from .audio import wav_header

MP3_BIT_RATE = 64  # kbit/s, plenty for mono speech
MP3_QUALITY = 5  # LAME's 2 (best) .. 7 (fastest)


class Encoder(Protocol):
    """Turns the PCM of one request, piece by piece, into the bytes of the response body."""

    def encode(self, pcm: bytes) -> bytes: ...

    def finish(self) -> bytes: ...


class RawEncoder:
    def __init__(self, sample_rate: int, data_size: int | None = None):
        pass

    def encode(self, pcm: bytes) -> bytes:
        return pcm

    def finish(self) -> bytes:
        return b""


class WavEncoder:
    """A WAV whose header goes out with the first piece: sized when `data_size` (bytes of PCM to
    come) is given, else a streamed WAV with open sizes."""

    def __init__(self, sample_rate: int, data_size: int | None = None):
        self.header = wav_header(sample_rate, data_size)

    def encode(self, pcm: bytes) -> bytes:
        header, self.header = self.header, b""
        return header + pcm

    def finish(self) -> bytes:
        return self.encode(b"")  # the header, if no piece came


class Mp3Encoder:
    """MP3 frames as LAME completes them; `finish` flushes the last ones."""

    def __init__(self, sample_rate: int, data_size: int | None = None):
        import lameenc

        self.lame = lameenc.Encoder()
        self.lame.set_bit_rate(MP3_BIT_RATE)
        self.lame.set_in_sample_rate(sample_rate)
        self.lame.set_channels(1)
        self.lame.set_quality(MP3_QUALITY)

    def encode(self, pcm: bytes) -> bytes:
        return bytes(self.lame.encode(pcm))

    def finish(self) -> bytes:
        return bytes(self.lame.flush())


@dataclass(frozen=True)
class ResponseFormat:
    name: str
    content_type: str
    # (sample rate, bytes of PCM when known in advance) -> a new encoder for one response
    encoder: Callable[[int, int | None], Encoder]
    cpu_heavy: bool  # encode on a worker thread, not on the event loop


def available_formats(mp3: bool) -> dict[str, ResponseFormat]:
    formats = {
        "wav": ResponseFormat("wav", "audio/wav", WavEncoder, cpu_heavy=False),
        "pcm": ResponseFormat("pcm", "audio/pcm", RawEncoder, cpu_heavy=False),
    }
    if mp3:
        formats["mp3"] = ResponseFormat("mp3", "audio/mpeg", Mp3Encoder, cpu_heavy=True)
    return formats


def encode_whole(response_format: ResponseFormat, sample_rate: int, pcm: bytes) -> bytes:
    """The complete body for all of a response's PCM at once (a WAV's sizes filled in)."""
    encoder = response_format.encoder(sample_rate, len(pcm))
    return encoder.encode(pcm) + encoder.finish()


RESPONSE_FORMATS = available_formats(mp3=importlib.util.find_spec("lameenc") is not None)
