"""WAV headers and response formats of the TTS server (backends/tts/audio.py)."""

import io
import struct
import wave

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backends.tts.audio import (
    UNKNOWN_SIZE,
    WAV_HEADER_SIZE,
    parse_wav,
    wav_header,
    wav_pcm,
)


def test_streaming_header_fields():
    header = wav_header(22050)
    assert len(header) == WAV_HEADER_SIZE
    riff, riff_size, wave_id, fmt, fmt_size = struct.unpack_from("<4sI4s4sI", header)
    assert (riff, wave_id, fmt, fmt_size) == (b"RIFF", b"WAVE", b"fmt ", 16)
    audio_format, channels, rate, byte_rate, block_align, bits = struct.unpack_from("<HHIIHH", header, 20)
    assert (audio_format, channels, rate, byte_rate, block_align, bits) == (1, 1, 22050, 44100, 2, 16)
    assert header[36:40] == b"data"
    assert riff_size == UNKNOWN_SIZE == struct.unpack_from("<I", header, 40)[0]


def test_sized_header_is_read_by_the_standard_library():
    samples = struct.pack("<5h", 0, 1000, -1000, 32767, -32768)
    with wave.open(io.BytesIO(wav_header(24000, len(samples)) + samples)) as reader:
        assert (reader.getnchannels(), reader.getsampwidth(), reader.getframerate()) == (1, 2, 24000)
        assert reader.readframes(10) == samples


def test_streaming_wav_is_readable_to_its_end():
    samples = bytes(range(200))
    assert wav_pcm(wav_header(16000) + samples) == (16000, samples)


@given(st.integers(1, 384000), st.binary(max_size=300))
def test_header_round_trips(rate, samples):
    samples = samples[: len(samples) // 2 * 2]
    info = parse_wav(wav_header(rate, len(samples)) + samples)
    assert (info.sample_rate, info.channels, info.bits_per_sample) == (rate, 1, 16)
    assert (info.data_offset, info.data_size) == (WAV_HEADER_SIZE, len(samples))


def test_parse_skips_extra_chunks_and_trims_odd_bytes():
    header = wav_header(8000, 3)
    with_list_chunk = header[:36] + b"LIST" + struct.pack("<I", 3) + b"abc\x00" + header[36:]
    assert wav_pcm(with_list_chunk + b"\x01\x02\x03") == (8000, b"\x01\x02")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not a RIFF/WAVE"),
        (b"RIFF\x00\x00\x00\x00WAVEdata\x00\x00\x00\x00", "before its fmt"),
        (wav_header(8000)[:36], "no data chunk"),
        (wav_header(8000)[:20] + struct.pack("<H", 3) + wav_header(8000)[22:], "not PCM"),
    ],
)
def test_parse_rejects_non_pcm_wav(data, message):
    with pytest.raises(ValueError, match=message):
        parse_wav(data)


def test_invalid_header_arguments():
    with pytest.raises(ValueError):
        wav_header(0)
    with pytest.raises(ValueError):
        wav_header(8000, -1)
