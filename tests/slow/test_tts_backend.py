"""End to end: the real TTS server (`python -m backends.tts` in .venvs/tts, piper with the
en_US-joe-medium voice) as a child process on a free port: real audio, streaming, refusals,
/voices, the startup benchmark, clean exits. Needs backends/setup_tts.sh to have run; in CI
(CI=true) its absence fails.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import io
import json
import math
import os
import shutil
import signal
import socket
import struct
import subprocess
import time
import urllib.request
import wave
from pathlib import Path

import aiohttp
import openai
import pytest

from backends.tts.voices import OPENAI_VOICES
from benchmarks import tts as tts_benchmark

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TTS_PYTHON = ROOT / ".venvs" / "tts" / "bin" / "python"
START_TIMEOUT = 180  # about 2 s alone; much more while other work shares the 2 cores
MAX_CHARS = 3000
SILENCE_RMS = 300  # int16 RMS; speech from piper is in the thousands
LONG_TEXT = " ".join(
    f"This is sentence number {i}, and it is here to make the text long." for i in range(40)
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def require_tts_venv() -> None:
    if TTS_PYTHON.exists():
        return
    problem = f"{TTS_PYTHON} is missing: run backends/setup_tts.sh"
    if os.environ.get("CI") == "true":
        pytest.fail(f"TTS backend is not set up in CI: {problem}")
    pytest.skip(problem)


class TtsServer:
    """The TTS server process, its URL and its log."""

    def __init__(self, log_path: Path, **env: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log_file = open(log_path, "wb")  # noqa: SIM115 - the server writes to it until stop()
        self.process = subprocess.Popen(
            [str(TTS_PYTHON), "-m", "backends.tts", "--port", str(self.port)],
            cwd=ROOT, env={**os.environ, "VESPA_TTS_ENGINE": "piper", **env},
            stdout=self.log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )

    def log(self) -> str:
        return self.log_path.read_bytes().decode(errors="replace")

    def health(self) -> int:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=5) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code
        except OSError:
            return 0

    def wait_healthy(self, timeout: float = START_TIMEOUT) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.process.poll() is not None:
                raise AssertionError(f"TTS server exited with {self.process.returncode}:\n{self.log()}")
            if self.health() == 200:
                return time.monotonic() - started
            time.sleep(0.2)
        raise AssertionError(f"TTS server not healthy after {timeout} s:\n{self.log()[-4000:]}")

    def stop(self, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log_file.close()
        return self.process.returncode


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    require_tts_venv()
    srv = TtsServer(tmp_path_factory.mktemp("tts") / "tts.log", VESPA_TTS_MAX_CHARS=str(MAX_CHARS))
    try:
        print(f"TTS server healthy after {srv.wait_healthy():.1f} s")
        yield srv
    finally:
        srv.stop()


@pytest.fixture
async def session(server):
    async with aiohttp.ClientSession(base_url=server.url, timeout=aiohttp.ClientTimeout(total=300)) as s:
        yield s


def read_wav(body: bytes, streamed: bool) -> tuple[int, bytes]:
    """(sample rate, samples) of a mono 16-bit PCM WAV, checking every header field: a streamed
    one has open sizes, one answered whole its true sizes."""
    riff, riff_size, wave_id, fmt, fmt_size = struct.unpack_from("<4sI4s4sI", body)
    assert (riff, wave_id, fmt, fmt_size) == (b"RIFF", b"WAVE", b"fmt ", 16)
    audio_format, channels, rate, byte_rate, block_align, bits = struct.unpack_from("<HHIIHH", body, 20)
    assert (audio_format, channels, bits, block_align, byte_rate) == (1, 1, 16, 2, 2 * rate)
    data_id, data_size = struct.unpack_from("<4sI", body, 36)
    assert data_id == b"data"
    if streamed:
        assert data_size == riff_size == 0xFFFFFFFF  # the length is not known when it is sent
    else:
        assert (riff_size, data_size) == (len(body) - 8, len(body) - 44)
    return rate, body[44:]


def wave_module_reads(body: bytes) -> tuple[int, int, bytes]:
    """(frames, rate, samples) as Python's `wave` module reads a WAV."""
    with wave.open(io.BytesIO(body)) as reader:
        assert (reader.getnchannels(), reader.getsampwidth()) == (1, 2)
        frames = reader.getnframes()
        return frames, reader.getframerate(), reader.readframes(frames)


def rms(pcm: bytes) -> float:
    samples = struct.unpack(f"<{len(pcm) // 2}h", pcm[: len(pcm) // 2 * 2])
    return math.sqrt(sum(s * s for s in samples) / max(1, len(samples)))


async def speech(session, **body) -> aiohttp.ClientResponse:
    response = await session.post("/v1/audio/speech", json=body)
    await response.read()
    return response


async def test_voices_and_health(session):
    voices = await (await session.get("/voices")).json()
    assert voices["engine"] == "piper"
    assert voices["default"] == "en_US-joe-medium" and voices["voices"] == ["en_US-joe-medium"]
    assert voices["aliases"] == {name: "en_US-joe-medium" for name in OPENAI_VOICES}
    assert voices["sample_rate"] == 22050
    health = await session.get("/health")
    assert (health.status, (await health.json())["status"]) == (200, "ready")


async def test_wav_is_valid_speech_that_grows_with_the_text(session):
    short = await speech(session, model="tts-1", input="Hello there.", voice="en_US-joe-medium")
    long = await speech(session, input="Hello there. " + " ".join(["The weather is lovely today."] * 4))
    durations = []
    for response, streamed in ((short, False), (long, True)):  # one sentence is answered whole
        assert response.status == 200 and response.headers["Content-Type"] == "audio/wav"
        rate, pcm = read_wav(await response.read(), streamed)
        assert rate == 22050 == int(response.headers["X-Sample-Rate"])
        assert len(pcm) % 2 == 0 and rms(pcm) > SILENCE_RMS
        durations.append(len(pcm) / 2 / rate)
    assert 0.4 < durations[0] < 3.0
    assert durations[1] > 3 * durations[0]


@pytest.mark.parametrize("voice", ["alloy", "echo", "nova", "marin"])
async def test_openai_voice_names_give_speech(session, voice):
    response = await speech(session, model="tts-1", input="Hello from an OpenAI example.", voice=voice)
    assert response.status == 200, await response.text()
    rate, pcm = read_wav(await response.read(), streamed=False)
    assert rate == 22050 and 0.5 < len(pcm) / 2 / rate < 5 and rms(pcm) > SILENCE_RMS


async def test_unknown_voice_lists_what_is_accepted(session):
    response = await speech(session, input="hi", voice="Alloy")
    assert response.status == 422
    assert (await response.json())["error"]["message"] == (
        "unknown voice 'Alloy'; available: en_US-joe-medium; aliases: "
        f"{', '.join(OPENAI_VOICES)}; GET /voices lists them")


def test_the_openai_sdk_speaks_through_an_openai_voice_name(server, tmp_path):
    """What people paste: the real `openai` client, `voice="alloy"`, a file written and read."""
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="not-checked", max_retries=0)
    answer = client.audio.speech.create(model="tts-1", voice="alloy", response_format="wav",
                                        input="Today is a wonderful day to build something people love!")
    path = tmp_path / "speech.wav"
    answer.write_to_file(path)
    frames, rate, pcm = wave_module_reads(path.read_bytes())
    assert rate == 22050 and frames * 2 == len(pcm) == path.stat().st_size - 44
    assert 1.0 < frames / rate < 8 and rms(pcm) > SILENCE_RMS
    # the streaming form of the SDK, a long text: open sizes, every sample still there
    with client.audio.speech.with_streaming_response.create(
            model="gpt-4o-mini-tts", voice="coral", input=LONG_TEXT[:400]) as streamed:
        body = streamed.read()
    rate, pcm = read_wav(body, streamed=True)
    assert len(pcm) / 2 / rate > 5 and rms(pcm) > SILENCE_RMS
    # the same text whole, as the README says to ask for it: sizes `wave` can trust
    whole = client.audio.speech.create(model="tts-1", voice="coral", input=LONG_TEXT[:400],
                                       response_format="wav", extra_body={"stream": False})
    frames, rate, pcm = wave_module_reads(whole.content)
    assert frames * 2 == len(pcm) == len(whole.content) - 44 and frames / rate > 5
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        client.audio.speech.create(model="tts-1", voice="nobody", input="Hi.")
    # OpenAI's error object: the SDK's exception carries the server's message
    assert "unknown voice 'nobody'; available: en_US-joe-medium" in refused.value.message
    assert refused.value.body["message"].startswith(
        "unknown voice 'nobody'; available: en_US-joe-medium; aliases: alloy, ash,")
    assert refused.value.body["type"] == "invalid_request_error"


async def test_a_whole_wav_has_the_duration_python_wave_reports(session):
    """Non-streamed answers (one sentence, or `"stream": false`) carry true sizes: `wave` reads
    the real duration (with open sizes it reads 0x7FFFFFFF frames: 97,391 s at 22,050 Hz)."""
    text = "Hello there. " + " ".join(["The weather is lovely today."] * 4)
    for body in ({"input": "Just one sentence here."}, {"input": text, "stream": False},
                 {"input": text, "stream": False, "voice": "shimmer"}):
        response = await speech(session, **body)
        wav = await response.read()
        assert response.status == 200 and int(response.headers["Content-Length"]) == len(wav)
        frames, rate, pcm = wave_module_reads(wav)
        assert rate == 22050 and frames * 2 == len(pcm) == len(wav) - 44
        assert 1.0 < frames / rate < 15 and rms(pcm) > SILENCE_RMS
    streamed = await speech(session, input=text)
    assert "Content-Length" not in streamed.headers
    assert wave_module_reads(await streamed.read())[0] == 0x7FFFFFFF  # what `wave` makes of open sizes


async def test_pcm_is_raw_speech(session):
    response = await speech(session, input="Raw samples, please.", response_format="pcm")
    assert response.status == 200 and response.headers["Content-Type"] == "audio/pcm"
    pcm = await response.read()
    assert pcm[:4] != b"RIFF" and len(pcm) % 2 == 0
    assert 0.5 < len(pcm) / 2 / 22050 < 4 and rms(pcm) > SILENCE_RMS


async def test_mp3_is_mpeg_audio(session):
    response = await speech(session, input="Compressed, please. Two sentences.", response_format="mp3")
    assert response.status == 200 and response.headers["Content-Type"] == "audio/mpeg"
    mp3 = await response.read()
    assert mp3[0] == 0xFF and mp3[1] & 0xE0 == 0xE0  # an MPEG frame sync first
    assert len(mp3) > 64_000 // 8 // 2  # over half a second at 64 kbit/s


async def test_synthesize_answers_wav(session):
    response = await session.post("/synthesize", json={"text": "Plain synthesis."})
    rate, pcm = read_wav(await response.read(), streamed=False)
    assert rate == 22050 and rms(pcm) > SILENCE_RMS


async def test_speed_shortens_the_audio(session):
    slow = await speech(session, input="Counting one two three four five.", response_format="pcm", speed=0.5)
    fast = await speech(session, input="Counting one two three four five.", response_format="pcm", speed=2.0)
    assert len(await fast.read()) * 2.5 < len(await slow.read())


async def test_streaming_starts_before_synthesis_ends(session):
    started = time.monotonic()
    async with session.post("/v1/audio/speech", json={"input": LONG_TEXT}) as response:
        assert response.status == 200
        first = await response.content.readany()
        first_audio = time.monotonic() - started
        rest = await response.read()
    total = time.monotonic() - started
    rate, pcm = read_wav(first + rest, streamed=True)
    print(f"first audio after {first_audio:.2f} s, {len(LONG_TEXT)} chars in {total:.2f} s "
          f"({len(pcm) / 2 / rate:.0f} s of audio)")
    assert len(first) > 44 and first_audio < total / 4


async def test_client_disconnect_stops_synthesis(server, session):
    async with session.post("/v1/audio/speech", json={"input": LONG_TEXT}) as response:
        assert await response.content.readany()
    for _ in range(50):
        if "client went away after" in server.log():
            break
        await asyncio.sleep(0.1)
    assert "client went away after" in server.log()
    assert (await session.get("/health")).status == 200


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({"input": ""}, 422, "empty"),
        ({"input": "x" * (MAX_CHARS + 1)}, 422, f"the limit is {MAX_CHARS}"),
        ({"input": "hi", "voice": "nobody"}, 422, "unknown voice 'nobody'; available: "
                                                  "en_US-joe-medium; aliases: alloy, ash, ballad,"),
        ({"input": "hi", "response_format": "ogg"}, 422, "unsupported response_format 'ogg'"),
        ({"input": "hi", "speed": 10}, 422, "'speed' must be between"),
        ({"input": "hi", "exaggeration": 0.5}, 422, "does not support 'exaggeration'"),
        ({"text": "hi"}, 400, "missing required field 'input'"),
    ],
)
async def test_refusals(session, body, status, words):
    response = await session.post("/v1/audio/speech", json=body)
    assert response.status == status
    assert words in (await response.json())["error"]["message"]


async def test_invalid_json(session):
    response = await session.post("/v1/audio/speech", data=b"not json")
    assert (response.status, await response.json()) == (400, {"error": {
        "message": "request body is not valid JSON", "type": "invalid_request_error",
        "param": None, "code": None}})


async def test_benchmark_measures_characters_per_second(server, session):
    started = time.monotonic()
    rate = await tts_benchmark.benchmark(server.url, session)
    print(f"TTS benchmark: {rate:.0f} input characters/s in {time.monotonic() - started:.1f} s")
    assert rate > 0


def test_sigterm_exits_cleanly(tmp_path):
    require_tts_venv()
    srv = TtsServer(tmp_path / "tts.log")
    srv.wait_healthy()
    assert srv.stop(timeout=30) == 0


def test_failed_engine_load_exits_nonzero(tmp_path):
    require_tts_venv()
    srv = TtsServer(tmp_path / "tts.log", VESPA_TTS_VOICE=str(tmp_path / "missing.onnx"))
    assert srv.process.wait(START_TIMEOUT) == 1
    srv.stop()
    assert "unknown Piper voice" in srv.log()


def test_unknown_engine_exits_at_once(tmp_path):
    require_tts_venv()
    srv = TtsServer(tmp_path / "tts.log", VESPA_TTS_ENGINE="kokoro")
    assert srv.process.wait(60) == 2
    srv.stop()
    assert "unknown TTS engine 'kokoro'" in srv.log()


def require_espeak() -> None:
    require_tts_venv()
    if shutil.which("espeak-ng") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("espeak-ng is missing in CI: run backends/setup_tts.sh --with-espeak")
        pytest.skip("espeak-ng is missing: run backends/setup_tts.sh --with-espeak")


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


def post_speech(url: str, body: dict) -> tuple[int, bytes]:
    request = urllib.request.Request(url + "/v1/audio/speech", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def test_espeak_with_configured_aliases(tmp_path):
    """The espeak engine, VESPA_TTS_VOICE_ALIASES mapping one OpenAI name elsewhere and adding one:
    the others keep the default voice, and each name speaks with the voice it is mapped to."""
    require_espeak()
    srv = TtsServer(tmp_path / "espeak.log", VESPA_TTS_ENGINE="espeak",
                    VESPA_TTS_VOICE_ALIASES="fable=en-gb-x-rp,narrator=de")
    try:
        srv.wait_healthy()
        voices = get_json(srv.url + "/voices")
        assert voices["engine"] == "espeak" and voices["default"] == "en-us"
        assert voices["aliases"] == {**{name: "en-us" for name in OPENAI_VOICES},
                                     "fable": "en-gb-x-rp", "narrator": "de"}
        text = "Good morning, this is the news."
        spoken = {}
        for voice in ("alloy", "en-us", "fable", "en-gb-x-rp", "narrator"):
            status, body = post_speech(srv.url, {"model": "tts-1", "input": text, "voice": voice})
            assert status == 200, body[:300]
            frames, rate, spoken[voice] = wave_module_reads(body)
            assert frames * 2 == len(body) - 44 and rms(spoken[voice]) > SILENCE_RMS
        assert spoken["alloy"] == spoken["en-us"]  # espeak-ng is deterministic
        assert spoken["fable"] == spoken["en-gb-x-rp"] != spoken["en-us"]
        assert spoken["narrator"] != spoken["en-us"]
        status, body = post_speech(srv.url, {"input": "hi", "voice": "onyx2"})
        assert status == 422
        error = json.loads(body)["error"]["message"]
        assert error.startswith("unknown voice 'onyx2'; available: af, am, an,") and "(and " in error
        assert "; aliases: alloy, ash, ballad, cedar, coral, echo, fable, marin, narrator," in error
    finally:
        assert srv.stop() == 0


def test_an_alias_to_a_missing_voice_stops_the_server(tmp_path):
    require_espeak()
    srv = TtsServer(tmp_path / "espeak.log", VESPA_TTS_ENGINE="espeak",
                    VESPA_TTS_VOICE_ALIASES="onyx=klingon")
    assert srv.process.wait(START_TIMEOUT) == 1
    srv.stop()
    assert "VESPA_TTS_VOICE_ALIASES: 'onyx' is mapped to 'klingon', which is not a voice" in srv.log()


def test_a_malformed_alias_setting_exits_at_once(tmp_path):
    require_tts_venv()
    srv = TtsServer(tmp_path / "tts.log", VESPA_TTS_VOICE_ALIASES="alloy")
    assert srv.process.wait(60) == 2
    srv.stop()
    assert "VESPA_TTS_VOICE_ALIASES: expected name=voice pairs" in srv.log()


@functools.cache
def chatterbox_ready() -> str | None:
    """Why the chatterbox test cannot run here, or None when it can (a GPU and chatterbox-tts)."""
    if not TTS_PYTHON.exists():
        return "no .venvs/tts"
    probe = ("import importlib.util, sys; from backends.tts.engines import nvidia_gpu_present; "
             "sys.exit(0 if importlib.util.find_spec('chatterbox') and nvidia_gpu_present() else 1)")
    if subprocess.run([str(TTS_PYTHON), "-c", probe], cwd=ROOT).returncode != 0:
        return "needs a CUDA GPU and chatterbox-tts in .venvs/tts (setup_tts.sh installs it on a GPU)"
    return None


@pytest.mark.skipif(chatterbox_ready() is not None, reason=str(chatterbox_ready()))
async def test_chatterbox_on_a_gpu(server, session, tmp_path):
    """GPU instances only: real Chatterbox (weights from the hub or VESPA_TTS_MODEL_DIR), built-in
    voice (asked for by an OpenAI voice name) and a voice cloned from a clip that piper speaks."""
    clip = await (await speech(session, input="This is the voice to clone, speaking clearly.")).read()
    gpu = TtsServer(tmp_path / "chatterbox.log", VESPA_TTS_ENGINE="chatterbox")
    try:
        gpu.wait_healthy(timeout=1200)  # a first run downloads about 3 GB of weights
        async with aiohttp.ClientSession(base_url=gpu.url) as client:
            builtin = await speech(client, input="Hello from Chatterbox. Two sentences.", voice="alloy",
                                   exaggeration=0.6)
            cloned = await speech(client, input="Now in the cloned voice.", temperature=0.7,
                                  reference_audio=base64.b64encode(clip).decode())
            for response, streamed in ((builtin, True), (cloned, False)):
                assert response.status == 200, await response.text()
                rate, pcm = read_wav(await response.read(), streamed)
                assert rate == int(response.headers["X-Sample-Rate"]) == 24000
                assert len(pcm) / 2 / rate > 0.5 and rms(pcm) > SILENCE_RMS
    finally:
        gpu.stop()
