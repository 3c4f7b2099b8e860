"""The Chatterbox adapter (backends/tts/engines/chatterbox.py) with a tiny fake model injected.

chatterbox-tts needs a GPU-sized torch install and hub weights, so it is not run here: these tests
check our side (argument mapping, voice-clip conditionals, float -> int16, sample rate, loading
path) against a fake that follows the real API (chatterbox-tts 0.1.7): `sr`, `conds`,
`generate(text, exaggeration=, cfg_weight=, temperature=)` returning a (1, samples) float tensor,
`prepare_conditionals(path, exaggeration=)`.
"""

import os
import sys
import types
from pathlib import Path

import pytest

try:
    import numpy as np
except ImportError:  # the adapter needs numpy, as chatterbox itself does
    if os.environ.get("CI") == "true":
        raise
    pytest.skip("numpy is not installed (it belongs in the test extras)", allow_module_level=True)

from backends.tts.engines import EngineInputError, chatterbox
from backends.tts.engines.chatterbox import ChatterboxEngine, float_to_pcm16


class FakeTensor:
    """The bits of torch.Tensor the adapter touches."""

    def __init__(self, array):
        self.array = np.asarray(array, dtype=np.float32)

    def detach(self):
        return self

    def cpu(self):
        return self

    def numpy(self):
        return self.array


class FakeChatterbox:
    sr = 24000

    def __init__(self, conds="builtin"):
        self.conds = conds
        self.generate_calls = []
        self.prepared = []

    def generate(self, text, **kwargs):
        self.generate_calls.append((text, self.conds, kwargs))
        return FakeTensor([[0.0, 0.5, -0.5, 1.0, -1.0, 2.0, -3.0]])

    def prepare_conditionals(self, wav_fpath, exaggeration=0.5):
        clip = Path(wav_fpath).read_bytes()
        if clip == b"garbage":
            raise RuntimeError("Format not recognised")
        self.prepared.append((clip, exaggeration))
        self.conds = ("clone", clip)


def test_float_to_pcm16_scales_clips_and_flattens():
    pcm = float_to_pcm16(FakeTensor([[0.0, 0.5, -0.5, 1.0, -1.0, 2.0, -3.0]]))
    assert np.frombuffer(pcm, dtype="<i2").tolist() == [0, 16384, -16384, 32767, -32767, 32767, -32767]
    assert float_to_pcm16(np.zeros((1, 0))) == b""


def test_sample_rate_and_voice_come_from_the_model():
    engine = ChatterboxEngine(FakeChatterbox())
    assert engine.sample_rate == 24000
    assert engine.voices() == [engine.default_voice] == ["default"]
    assert engine.options == {"exaggeration", "cfg_weight", "temperature", "reference_audio"}


def test_defaults_and_request_options_are_passed_to_generate():
    model = FakeChatterbox()
    engine = ChatterboxEngine(model)
    pcm = b"".join(engine.synthesize("Hello.", "default", 1.0))
    assert len(pcm) == 2 * 7
    b"".join(engine.synthesize("Again.", "default", 1.0, exaggeration=0.9, cfg_weight=0.0, temperature=0.3))
    assert model.generate_calls == [
        ("Hello.", "builtin", {"exaggeration": 0.5, "cfg_weight": 0.5, "temperature": 0.8}),
        ("Again.", "builtin", {"exaggeration": 0.9, "cfg_weight": 0.0, "temperature": 0.3}),
    ]


def test_reference_clip_is_prepared_once_and_builtin_voice_restored():
    model = FakeChatterbox()
    engine = ChatterboxEngine(model)
    for text in ("One.", "Two."):
        b"".join(engine.synthesize(text, "default", 1.0, reference_audio=b"clip-a", exaggeration=0.7))
    b"".join(engine.synthesize("Three.", "default", 1.0))
    assert model.prepared == [(b"clip-a", 0.7)]
    assert [conds for _, conds, _ in model.generate_calls] == [
        ("clone", b"clip-a"), ("clone", b"clip-a"), "builtin",
    ]


def test_clip_cache_is_bounded():
    model = FakeChatterbox()
    engine = ChatterboxEngine(model)
    for index in range(chatterbox.CACHED_CLIPS + 2):
        b"".join(engine.synthesize("x", "default", 1.0, reference_audio=b"clip%d" % index))
    assert len(engine.clip_conds) == chatterbox.CACHED_CLIPS
    b"".join(engine.synthesize("x", "default", 1.0, reference_audio=b"clip0"))
    assert len(model.prepared) == chatterbox.CACHED_CLIPS + 3  # clip0 had been evicted


def test_unreadable_clip_is_the_clients_error_and_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr(chatterbox.tempfile, "tempdir", str(tmp_path))
    engine = ChatterboxEngine(FakeChatterbox())
    with pytest.raises(EngineInputError, match="could not use 'reference_audio'"):
        b"".join(engine.synthesize("x", "default", 1.0, reference_audio=b"garbage"))
    assert list(tmp_path.iterdir()) == []


def test_model_without_builtin_voice_needs_a_clip():
    engine = ChatterboxEngine(FakeChatterbox(conds=None))
    with pytest.raises(EngineInputError, match="send 'reference_audio'"):
        b"".join(engine.synthesize("x", "default", 1.0))
    assert b"".join(engine.synthesize("x", "default", 1.0, reference_audio=b"clip"))


@pytest.fixture
def fake_chatterbox_package(monkeypatch):
    """`chatterbox.tts.ChatterboxTTS` as the lazy import inside load() will find it."""
    calls = []

    class ChatterboxTTS:
        @classmethod
        def from_pretrained(cls, device):
            calls.append(("from_pretrained", device))
            return FakeChatterbox()

        @classmethod
        def from_local(cls, ckpt_dir, device):
            calls.append(("from_local", ckpt_dir, device))
            return FakeChatterbox()

    package = types.ModuleType("chatterbox")
    module = types.ModuleType("chatterbox.tts")
    module.ChatterboxTTS = ChatterboxTTS
    package.tts = module
    monkeypatch.setitem(sys.modules, "chatterbox", package)
    monkeypatch.setitem(sys.modules, "chatterbox.tts", module)
    return calls


def test_load_from_hub_or_local_dir(fake_chatterbox_package):
    assert chatterbox.load(device="cuda").sample_rate == 24000
    chatterbox.load(model_dir="/models/chatterbox", device="cuda:1")
    assert fake_chatterbox_package == [
        ("from_pretrained", "cuda"), ("from_local", "/models/chatterbox", "cuda:1")]


def test_load_picks_cuda_when_torch_sees_a_gpu(fake_chatterbox_package, monkeypatch):
    fake_torch = types.SimpleNamespace(cuda=types.SimpleNamespace(is_available=lambda: True))
    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    chatterbox.load()
    fake_torch.cuda.is_available = lambda: False
    chatterbox.load()
    assert fake_chatterbox_package == [("from_pretrained", "cuda"), ("from_pretrained", "cpu")]


def test_load_refuses_other_voice_names(fake_chatterbox_package):
    with pytest.raises(ValueError, match="one built-in voice"):
        chatterbox.load(voice="alloy", device="cpu")
