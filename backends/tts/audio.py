"""WAV containers: headers (sized, or streamed with open sizes) and reading the samples back out.

All audio inside the server is mono signed 16-bit little-endian PCM ("s16le") at the engine's rate.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

SAMPLE_WIDTH = 2  # bytes per sample: int16
CHANNELS = 1
WAV_HEADER_SIZE = 44
# Size fields of a WAV whose length is not known when its header is sent (streaming): the
# largest value, what ffmpeg itself writes when its output cannot be rewound. ffmpeg (and the
# players built on it) reads such a WAV until the stream ends; readers that take the header's word
# for the length (Python's `wave`: 0x7FFFFFFF frames) report hours. A WAV answered whole is sized.
UNKNOWN_SIZE = 0xFFFFFFFF


def wav_header(sample_rate: int, data_size: int | None = None) -> bytes:
    """The 44-byte RIFF/WAVE header of mono s16le PCM; `data_size=None` means "streaming"."""
    if sample_rate <= 0:
        raise ValueError("sample_rate must be positive")
    if data_size is None:
        riff_size = data_size = UNKNOWN_SIZE
    else:
        if not 0 <= data_size <= UNKNOWN_SIZE - 36:
            raise ValueError("data_size out of range for a WAV file")
        riff_size = 36 + data_size
    block_align = CHANNELS * SAMPLE_WIDTH
    return struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF", riff_size, b"WAVE",
        b"fmt ", 16, 1, CHANNELS, sample_rate, sample_rate * block_align, block_align,
        8 * SAMPLE_WIDTH,
        b"data", data_size,
    )


@dataclass(frozen=True)
class WavInfo:
    """What a WAV header says, and where its sample data starts."""

    sample_rate: int
    channels: int
    bits_per_sample: int
    data_offset: int
    data_size: int  # as declared; UNKNOWN_SIZE for a streamed WAV


def parse_wav(data: bytes) -> WavInfo:
    """Read the header of a PCM WAV (any chunk order); raise ValueError if it is not one."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise ValueError("not a RIFF/WAVE file")
    offset = 12
    fmt: tuple[int, int, int, int] | None = None
    while offset + 8 <= len(data):
        chunk_id, chunk_size = struct.unpack_from("<4sI", data, offset)
        body = offset + 8
        if chunk_id == b"fmt ":
            fmt = struct.unpack_from("<HHI6xH", data, body)
        elif chunk_id == b"data":
            if fmt is None:
                raise ValueError("WAV data chunk before its fmt chunk")
            audio_format, channels, sample_rate, bits = fmt
            if audio_format != 1:
                raise ValueError(f"WAV is not PCM (format {audio_format})")
            return WavInfo(sample_rate, channels, bits, body, chunk_size)
        offset = body + chunk_size + (chunk_size & 1)
    raise ValueError("WAV has no data chunk")


def wav_pcm(data: bytes) -> tuple[int, bytes]:
    """(sample rate, s16le samples) of a mono 16-bit PCM WAV, sized or streamed."""
    info = parse_wav(data)
    if info.channels != CHANNELS or info.bits_per_sample != 8 * SAMPLE_WIDTH:
        raise ValueError("expected mono 16-bit PCM WAV")
    end = len(data) if info.data_size == UNKNOWN_SIZE else info.data_offset + info.data_size
    pcm = data[info.data_offset : min(end, len(data))]
    return info.sample_rate, pcm[: len(pcm) - len(pcm) % SAMPLE_WIDTH]
