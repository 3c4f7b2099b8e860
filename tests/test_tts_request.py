"""Validation of TTS speech requests (backends/tts/speech_request.py)."""

import base64

import pytest

from backends.tts.speech_request import (
    Capabilities,
    RequestError,
    SpeechRequest,
    parse_openai_speech,
    parse_synthesize,
)

PIPER_LIKE = Capabilities(
    voices=frozenset({"joe", "amy"}), default_voice="joe", options=frozenset(),
    speed_range=(0.25, 4.0), max_chars=100,
)
WITH_ALIASES = Capabilities(
    voices=frozenset({"joe", "amy"}), default_voice="joe", options=frozenset(),
    speed_range=(0.25, 4.0), max_chars=100, aliases={"alloy": "joe", "nova": "amy"},
)
CLONING = Capabilities(
    voices=frozenset({"default"}), default_voice="default",
    options=frozenset({"exaggeration", "cfg_weight", "temperature", "reference_audio"}),
    speed_range=(1.0, 1.0), max_chars=100,
)


def refused(parse, body, caps=PIPER_LIKE) -> RequestError:
    with pytest.raises(RequestError) as caught:
        parse(body, caps)
    return caught.value


def test_openai_defaults():
    assert parse_openai_speech({"model": "tts-1", "input": "Hi."}, PIPER_LIKE) == SpeechRequest(
        text="Hi.", voice="joe", speed=1.0, response_format="wav", options={}
    )


def test_openai_fields_are_taken():
    body = {"input": "Hi.", "voice": "amy", "response_format": "pcm", "speed": 2}
    speech = parse_openai_speech(body, PIPER_LIKE)
    assert (speech.voice, speech.response_format, speech.speed) == ("amy", "pcm", 2.0)


def test_synthesize_takes_text_and_answers_wav():
    speech = parse_synthesize({"text": "Hello", "voice": "amy"}, PIPER_LIKE)
    assert (speech.text, speech.voice, speech.response_format) == ("Hello", "amy", "wav")


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ([], 400, "JSON object"),
        ({}, 400, "missing required field 'input'"),
        ({"input": 5}, 400, "must be a string"),
        ({"input": ""}, 422, "empty"),
        ({"input": " \n\t"}, 422, "empty"),
        ({"input": "x" * 101}, 422, "101 characters long; the limit is 100"),
        ({"input": "hi", "voice": "alloy"}, 422, "unknown voice 'alloy'; available: amy, joe"),
        ({"input": "hi", "voice": 3}, 400, "'voice' must be a string"),
        ({"input": "hi", "response_format": "flac"}, 422, "unsupported response_format 'flac'"),
        ({"input": "hi", "model": 1}, 400, "'model' must be a string"),
        ({"input": "hi", "speed": "fast"}, 400, "'speed' must be a number"),
        ({"input": "hi", "speed": True}, 400, "'speed' must be a number"),
        ({"input": "hi", "speed": 4.5}, 422, "between 0.25 and 4"),
        ({"input": "hi", "temperature": 0.7}, 422, "does not support 'temperature'"),
        ({"input": "hi", "reference_audio": "AAAA"}, 422, "does not support 'reference_audio'"),
    ],
)
def test_openai_refusals(body, status, words):
    error = refused(parse_openai_speech, body)
    assert error.status == status
    assert words in error.message


def test_an_alias_speaks_with_the_voice_it_names():
    assert parse_openai_speech({"input": "Hi.", "voice": "nova"}, WITH_ALIASES).voice == "amy"
    assert parse_synthesize({"text": "Hi.", "voice": "alloy"}, WITH_ALIASES).voice == "joe"
    assert parse_openai_speech({"input": "Hi.", "voice": "amy"}, WITH_ALIASES).voice == "amy"


def test_an_openai_voice_object_is_looked_up_by_its_id():
    body = {"input": "Hi.", "voice": {"id": "nova"}}
    assert parse_openai_speech(body, WITH_ALIASES).voice == "amy"


def test_unknown_voice_lists_voices_and_aliases():
    error = refused(parse_openai_speech, {"input": "hi", "voice": "Alloy"}, WITH_ALIASES)
    assert error.status == 422
    assert error.message == ("unknown voice 'Alloy'; available: amy, joe; aliases: alloy, nova; "
                             "GET /voices lists them")


def test_stream_is_on_unless_turned_off():
    assert parse_openai_speech({"input": "Hi."}, PIPER_LIKE).stream is True
    assert parse_openai_speech({"input": "Hi.", "stream": None}, PIPER_LIKE).stream is True
    assert parse_openai_speech({"input": "Hi.", "stream": False}, PIPER_LIKE).stream is False
    assert parse_synthesize({"text": "Hi.", "stream": False}, PIPER_LIKE).stream is False
    assert refused(parse_openai_speech, {"input": "Hi.", "stream": "no"}).message == (
        "'stream' must be true or false")


def test_only_audio_stream_format_is_accepted():
    assert parse_openai_speech({"input": "Hi.", "stream_format": "audio"}, PIPER_LIKE).text == "Hi."
    error = refused(parse_openai_speech, {"input": "Hi.", "stream_format": "sse"})
    assert (error.status, error.message) == (422, "unsupported stream_format 'sse'; supported: audio")


def test_input_at_the_limit_is_accepted():
    assert len(parse_openai_speech({"input": "x" * 100}, PIPER_LIKE).text) == 100


def test_synthesize_requires_text():
    assert refused(parse_synthesize, {"input": "hi"}).message == "missing required field 'text'"


def test_long_voice_lists_are_shortened():
    caps = Capabilities(frozenset(f"v{i:02}" for i in range(30)), "v00", frozenset(), (0.5, 2), 10)
    message = refused(parse_openai_speech, {"input": "hi", "voice": "x"}, caps).message
    assert "v09 (and 20 more)" in message and "v10" not in message


def test_engine_speed_range_narrows_openai_range():
    error = refused(parse_openai_speech, {"input": "hi", "speed": 1.5}, CLONING)
    assert error.message == "'speed' must be 1: this engine has no speed control"
    assert parse_openai_speech({"input": "hi", "speed": 1}, CLONING).speed == 1.0


def test_cloning_options_are_validated_and_decoded():
    clip = b"RIFF fake clip"
    body = {"input": "hi", "exaggeration": 0.7, "cfg_weight": 0, "temperature": 1,
            "reference_audio": base64.b64encode(clip).decode()}
    assert parse_openai_speech(body, CLONING).options == {
        "exaggeration": 0.7, "cfg_weight": 0.0, "temperature": 1.0, "reference_audio": clip,
    }


def test_reference_audio_may_be_a_data_url():
    body = {"input": "hi", "reference_audio": "data:audio/wav;base64," + base64.b64encode(b"abc").decode()}
    assert parse_openai_speech(body, CLONING).options["reference_audio"] == b"abc"


@pytest.mark.parametrize(
    ("field", "value", "status", "words"),
    [
        ("exaggeration", 2.5, 422, "'exaggeration' must be between 0 and 2"),
        ("temperature", 0, 422, "'temperature' must be between 0.05 and 5"),
        ("cfg_weight", "high", 400, "'cfg_weight' must be a number"),
        ("reference_audio", "not base64!", 400, "not valid base64"),
        ("reference_audio", 12, 400, "base64 string"),
        ("reference_audio", "", 422, "empty"),
    ],
)
def test_cloning_refusals(field, value, status, words):
    error = refused(parse_openai_speech, {"input": "hi", field: value}, CLONING)
    assert (error.status, words in error.message) == (status, True)
