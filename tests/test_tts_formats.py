"""Response formats of the TTS server (backends/tts/formats.py): wav, pcm and, with lameenc, mp3."""

import importlib.util
import io
import math
import struct
import wave

import pytest

from backends.tts.audio import wav_header
from backends.tts.formats import RESPONSE_FORMATS, available_formats, encode_whole

TONE = struct.pack("<22050h", *(int(8000 * math.sin(i / 7)) for i in range(22050)))


def body(name: str, pieces: list[bytes], sample_rate: int = 22050) -> bytes:
    encoder = available_formats(mp3=True)[name].encoder(sample_rate, None)
    return b"".join(encoder.encode(piece) for piece in pieces) + encoder.finish()


def test_wav_sends_its_header_once_before_the_samples():
    assert body("wav", [b"ab", b"cd"]) == wav_header(22050) + b"abcd"
    assert body("wav", []) == wav_header(22050)


def test_a_whole_wav_is_sized_and_python_wave_reads_its_length():
    whole = encode_whole(available_formats(mp3=False)["wav"], 22050, TONE)
    assert whole == wav_header(22050, len(TONE)) + TONE
    riff_size, data_size = struct.unpack_from("<I", whole, 4)[0], struct.unpack_from("<I", whole, 40)[0]
    assert (riff_size, data_size) == (len(whole) - 8, len(TONE))
    with wave.open(io.BytesIO(whole)) as reader:
        assert (reader.getnframes(), reader.getframerate()) == (22050, 22050)  # 1 s, not 97,391 s
        assert reader.readframes(reader.getnframes()) == TONE


def test_whole_pcm_and_mp3_are_what_streaming_sends():
    formats = available_formats(mp3=importlib.util.find_spec("lameenc") is not None)
    assert encode_whole(formats["pcm"], 22050, TONE) == TONE
    if "mp3" in formats:
        assert encode_whole(formats["mp3"], 22050, TONE) == body("mp3", [TONE])


def test_pcm_is_the_samples():
    assert body("pcm", [b"ab", b"cd"]) == b"abcd"


def test_content_types():
    formats = available_formats(mp3=True)
    assert {name: f.content_type for name, f in formats.items()} == {
        "wav": "audio/wav", "pcm": "audio/pcm", "mp3": "audio/mpeg"}
    assert [name for name, f in formats.items() if f.cpu_heavy] == ["mp3"]
    assert list(available_formats(mp3=False)) == ["wav", "pcm"]


def test_mp3_is_offered_exactly_when_lameenc_is_installed():
    assert ("mp3" in RESPONSE_FORMATS) == (importlib.util.find_spec("lameenc") is not None)


def mp3_frames(data: bytes) -> list[tuple[int, int]]:
    """(sample rate, samples) of each MPEG-2 layer III frame, walking frame headers."""
    rates = {0: 22050, 1: 24000, 2: 16000}
    bitrates = [0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160]
    frames, offset = [], 0
    while offset + 4 <= len(data):
        header = int.from_bytes(data[offset:offset + 4], "big")
        assert header >> 21 == 0x7FF, f"no frame sync at {offset}"
        assert (header >> 19) & 3 == 2 and (header >> 17) & 3 == 1  # MPEG-2, layer III
        rate = rates[(header >> 10) & 3]
        size = 72 * bitrates[(header >> 12) & 15] * 1000 // rate + ((header >> 9) & 1)
        frames.append((rate, 576))
        offset += size
    assert offset == len(data)
    return frames


@pytest.mark.skipif(importlib.util.find_spec("lameenc") is None, reason="lameenc not installed")
@pytest.mark.parametrize("rate", [22050, 24000, 16000])
def test_mp3_frames_carry_the_audio(rate):
    frames = mp3_frames(body("mp3", [TONE[: len(TONE) // 2], TONE[len(TONE) // 2:]], rate))
    assert {frame_rate for frame_rate, _ in frames} == {rate}
    duration = sum(samples for _, samples in frames) / rate
    assert 22050 / rate <= duration < 22050 / rate + 0.2
