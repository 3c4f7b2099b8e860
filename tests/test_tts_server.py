"""The TTS HTTP server (backends/tts/server.py, stream.py, runner.py) in-process, with a tone engine.

The engine here stands in for a model (one beep per sentence, longer for longer text); the real
engines behind the real server are exercised in tests/slow/test_tts_backend.py.
"""

import asyncio
import io
import math
import struct
import threading
import time
import wave

import aiohttp
import pytest
from aiohttp import web

from backends.tts.audio import UNKNOWN_SIZE, wav_pcm
from backends.tts.engines import EngineInputError
from backends.tts.server import create_app
from backends.tts.voices import OPENAI_VOICES, AliasSettings, parse_aliases

from .conftest import wait_until

RATE = 16000


def openai_error(message: str, kind: str = "invalid_request_error") -> dict:
    """OpenAI's error object, which the server answers with (its SDKs show the message)."""
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


class ToneEngine:
    """A deterministic engine: 1 ms of a 440 Hz tone per input character."""

    name = "tone"
    sample_rate = RATE
    default_voice = "beep"
    options = frozenset({"temperature"})
    speed_range = (0.5, 2.0)

    def __init__(self, delay=0.0, fail_on=None):
        self.delay = delay
        self.fail_on = fail_on
        self.calls = []
        self.running = 0
        self.max_running = 0
        self.lock = threading.Lock()

    def voices(self):
        return ["beep", "boop"]

    def synthesize(self, text, voice, speed, **options):
        with self.lock:
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        try:
            self.calls.append((text, voice, speed, options))
            time.sleep(self.delay)
            if self.fail_on and self.fail_on in text:
                raise RuntimeError("engine exploded")
            if "unusable" in text:
                raise EngineInputError("cannot say that")
            samples = int(len(text) * RATE / 1000 / speed)
            yield struct.pack(f"<{samples}h", *(int(8000 * math.sin(i / 5)) for i in range(samples)))
        finally:
            with self.lock:
                self.running -= 1


async def ready_client(aiohttp_client, engine, max_chars=4096, aliases=AliasSettings(),
                       app=None):
    client = await aiohttp_client(app or create_app(lambda: engine, max_chars, aliases))
    for _ in range(200):
        if (await client.get("/health")).status == 200:
            return client
        await asyncio.sleep(0.01)
    raise AssertionError("engine never became ready")


async def test_health_is_503_while_loading_then_200(aiohttp_client):
    release = threading.Event()

    def slow_load():
        release.wait(5)
        return ToneEngine()

    client = await aiohttp_client(create_app(slow_load, 100))
    response = await client.get("/health")
    assert (response.status, await response.json()) == (503, {"status": "loading"})
    speech = await client.post("/v1/audio/speech", json={"input": "hi"})
    assert (speech.status, await speech.json()) == (503, openai_error("TTS engine is loading", "server_error"))
    release.set()
    for _ in range(200):
        response = await client.get("/health")
        if response.status == 200:
            break
        await asyncio.sleep(0.01)
    assert await response.json() == {"status": "ready", "engine": "tone", "sample_rate": RATE}


async def test_failed_load_is_reported(aiohttp_client):
    def broken_load():
        raise RuntimeError("weights missing")

    client = await aiohttp_client(create_app(broken_load, 100))
    for _ in range(100):
        response = await client.get("/health")
        if response.status != 503:
            break
        await asyncio.sleep(0.01)
    assert (response.status, await response.json()) == (
        500, {"status": "failed", "error": "RuntimeError: weights missing"})


async def test_voices(aiohttp_client):
    client = await ready_client(aiohttp_client, ToneEngine())
    assert await (await client.get("/voices")).json() == {
        "engine": "tone", "default": "beep", "voices": ["beep", "boop"],
        "aliases": {name: "beep" for name in sorted(OPENAI_VOICES)},
        "sample_rate": RATE, "options": ["temperature"],
    }


async def test_openai_voice_names_speak_with_the_engine_voices(aiohttp_client):
    engine = ToneEngine()
    client = await ready_client(aiohttp_client, engine, aliases=parse_aliases("nova=boop,robot=boop"))
    for voice in ("alloy", "nova", "robot", "boop"):
        response = await client.post("/v1/audio/speech", json={"input": "Hi.", "voice": voice})
        assert response.status == 200, await response.text()
    assert [call[1] for call in engine.calls] == ["beep", "boop", "boop", "boop"]
    aliases = (await (await client.get("/voices")).json())["aliases"]
    assert (aliases["alloy"], aliases["nova"], aliases["robot"]) == ("beep", "boop", "boop")
    refused = await client.post("/v1/audio/speech", json={"input": "Hi.", "voice": "nobody"})
    assert refused.status == 422
    assert (await refused.json())["error"]["message"] == (
        "unknown voice 'nobody'; available: beep, boop; aliases: "
        f"{', '.join(sorted([*OPENAI_VOICES, 'robot']))}; GET /voices lists them")


async def test_no_aliases_when_turned_off(aiohttp_client):
    client = await ready_client(aiohttp_client, ToneEngine(), aliases=parse_aliases("none"))
    assert (await (await client.get("/voices")).json())["aliases"] == {}
    response = await client.post("/v1/audio/speech", json={"input": "Hi.", "voice": "alloy"})
    assert response.status == 422


async def test_an_alias_to_a_voice_the_engine_lacks_fails_the_load(aiohttp_client):
    client = await aiohttp_client(create_app(ToneEngine, 100, parse_aliases("onyx=deep")))
    for _ in range(100):
        response = await client.get("/health")
        if response.status != 503:
            break
        await asyncio.sleep(0.01)
    assert response.status == 500
    assert "'onyx' is mapped to 'deep', which is not a voice of this engine" in (
        await response.json())["error"]


def wave_of(body: bytes) -> tuple[int, int]:
    """(frames, rate) as Python's wave module reads them."""
    with wave.open(io.BytesIO(body)) as reader:
        return reader.getnframes(), reader.getframerate()


async def test_one_sentence_is_answered_whole_with_sizes(aiohttp_client):
    client = await ready_client(aiohttp_client, ToneEngine())
    response = await client.post("/v1/audio/speech", json={"input": "Hello there."})
    body = await response.read()
    assert response.status == 200 and "Transfer-Encoding" not in response.headers
    assert int(response.headers["Content-Length"]) == len(body)
    assert struct.unpack_from("<I", body, 4)[0] == len(body) - 8
    assert struct.unpack_from("<I", body, 40)[0] == len(body) - 44 == 2 * 12 * 16
    assert wave_of(body) == (12 * 16, RATE)


async def test_stream_false_answers_many_sentences_whole(aiohttp_client):
    engine = ToneEngine()
    client = await ready_client(aiohttp_client, engine)
    for path, field in (("/v1/audio/speech", "input"), ("/synthesize", "text")):
        response = await client.post(path, json={field: "One two. Three four five!", "stream": False})
        body = await response.read()
        assert response.status == 200 and "Transfer-Encoding" not in response.headers
        assert int(response.headers["Content-Length"]) == len(body)
        frames, rate = wave_of(body)
        assert (frames, rate) == ((len(body) - 44) // 2, RATE)
        assert frames == 8 * 16 + 16 * 16
    assert [call[0] for call in engine.calls] == ["One two.", "Three four five!"] * 2


async def test_stream_false_failure_in_a_later_sentence_is_a_500(aiohttp_client):
    client = await ready_client(aiohttp_client, ToneEngine(fail_on="kaboom"))
    response = await client.post("/v1/audio/speech",
                                 json={"input": "Fine. Still fine. kaboom.", "stream": False})
    assert (response.status, await response.json()) == (
        500, openai_error("synthesis failed: RuntimeError: engine exploded", "server_error"))


async def test_wav_is_streamed_sentence_by_sentence(aiohttp_client):
    engine = ToneEngine()
    client = await ready_client(aiohttp_client, engine)
    response = await client.post("/v1/audio/speech", json={
        "model": "tts-1", "input": "One two. Three four five!", "voice": "boop", "speed": 2,
        "temperature": 0.5})
    assert response.status == 200
    assert response.headers["Content-Type"] == "audio/wav"
    assert response.headers["Transfer-Encoding"] == "chunked"
    assert response.headers["X-Sample-Rate"] == str(RATE)
    body = await response.read()
    assert struct.unpack_from("<I", body, 40)[0] == UNKNOWN_SIZE
    rate, pcm = wav_pcm(body)
    assert rate == RATE
    assert [call[0] for call in engine.calls] == ["One two.", "Three four five!"]
    assert engine.calls[0][1:] == ("boop", 2.0, {"temperature": 0.5})
    assert len(pcm) == 2 * (int(8 * 16 / 2) + int(16 * 16 / 2))


async def test_pcm_is_raw_samples(aiohttp_client):
    client = await ready_client(aiohttp_client, ToneEngine())
    for text in ("Hello.", "Hello. Hello."):  # whole, then streamed
        response = await client.post("/v1/audio/speech", json={"input": text, "response_format": "pcm"})
        assert response.headers["Content-Type"] == "audio/pcm"
        assert len(await response.read()) == 2 * len(text.split()) * 6 * 16


async def test_synthesize_answers_wav(aiohttp_client):
    client = await ready_client(aiohttp_client, ToneEngine())
    response = await client.post("/synthesize", json={"text": "Hello."})
    assert wav_pcm(await response.read())[0] == RATE


@pytest.mark.parametrize(
    ("path", "body", "status", "words"),
    [
        ("/v1/audio/speech", {"input": ""}, 422, "empty"),
        ("/v1/audio/speech", {"input": "x" * 51}, 422, "limit is 50"),
        ("/v1/audio/speech", {"input": "hi", "voice": "Alloy"}, 422, "unknown voice 'Alloy'"),
        ("/v1/audio/speech", {"input": "hi", "response_format": "flac"}, 422, "response_format"),
        ("/v1/audio/speech", {"input": "hi", "exaggeration": 1}, 422, "does not support"),
        ("/synthesize", {"input": "hi"}, 400, "'text'"),
        ("/v1/audio/speech", {"input": "unusable words"}, 422, "cannot say that"),
        ("/v1/audio/speech", {"input": "kaboom"}, 500, "engine exploded"),
    ],
)
async def test_refusals_are_json(aiohttp_client, path, body, status, words):
    client = await ready_client(aiohttp_client, ToneEngine(fail_on="kaboom"), max_chars=50)
    response = await client.post(path, json=body)
    assert response.status == status
    assert words in (await response.json())["error"]["message"]


async def test_invalid_json_is_400(aiohttp_client):
    client = await ready_client(aiohttp_client, ToneEngine())
    response = await client.post("/v1/audio/speech", data=b"{nope",
                                 headers={"Content-Type": "application/json"})
    assert (response.status, await response.json()) == (400, openai_error("request body is not valid JSON"))


async def test_failure_mid_stream_cuts_the_response(aiohttp_client):
    client = await ready_client(aiohttp_client, ToneEngine(fail_on="kaboom"))
    response = await client.post("/v1/audio/speech", json={"input": "Fine. Still fine. kaboom. Never."})
    assert response.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await response.read()


def speech_ends(app: web.Application) -> list[str]:
    """How each speech request's handler ended, as the server saw it: "returned", "raised" or
    "cancelled" (a middleware of the test's, around the app's own)."""
    ends: list[str] = []

    @web.middleware
    async def note_end(request: web.Request, handler):
        if request.path != "/v1/audio/speech":
            return await handler(request)
        try:
            response = await handler(request)
        except asyncio.CancelledError:
            ends.append("cancelled")
            raise
        except BaseException:
            ends.append("raised")
            raise
        ends.append("returned")
        return response

    app.middlewares.insert(0, note_end)
    return ends


async def test_disconnect_stops_synthesis(aiohttp_client):
    engine = ToneEngine(delay=0.05)
    app = create_app(lambda: engine, 4096)
    ends = speech_ends(app)
    client = await ready_client(aiohttp_client, engine, app=app)
    text = " ".join(f"Sentence {i}." for i in range(40))
    response = await client.post("/v1/audio/speech", json={"input": text})
    assert await response.content.readany()
    response.close()
    await wait_until(lambda: ends)  # the server is done with the request: nothing more starts
    assert len(engine.calls) <= 3  # the first, and at most the ones already under way


async def test_disconnect_stops_a_whole_answer_being_made(aiohttp_client):
    engine = ToneEngine(delay=0.05)
    client = await ready_client(aiohttp_client, engine)
    text = " ".join(f"Sentence {i}." for i in range(40))
    with pytest.raises(asyncio.TimeoutError):
        await client.post("/v1/audio/speech", json={"input": text, "stream": False},
                          timeout=aiohttp.ClientTimeout(total=0.3))
    await asyncio.sleep(1.0)  # time for 20 more sentences, had synthesis gone on
    assert len(engine.calls) <= 10


async def test_engine_calls_never_overlap_and_loop_stays_free(aiohttp_client):
    engine = ToneEngine(delay=0.02)
    client = await ready_client(aiohttp_client, engine)
    text = "First one. Second one. Third one."
    requests = [client.post("/v1/audio/speech", json={"input": text}) for _ in range(4)]
    started = time.monotonic()
    health = asyncio.ensure_future(client.get("/health"))
    responses = await asyncio.gather(*requests)
    health_response = await health
    assert health_response.status == 200
    bodies = [await response.read() for response in responses]
    assert all(len(wav_pcm(body)[1]) > 0 for body in bodies)
    assert engine.max_running == 1
    assert len(engine.calls) == 12
    assert time.monotonic() - started >= 12 * 0.02
