"""Sentence splitting of the TTS server (backends/tts/text.py)."""

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backends.tts.text import split_sentences


@pytest.mark.parametrize(
    ("text", "pieces"),
    [
        ("Hello world.", ["Hello world."]),
        ("Hello. How are you? Fine!", ["Hello.", "How are you?", "Fine!"]),
        ("  Spaces   inside\n and\tout.  ", ["Spaces inside and out."]),
        ("No final stop", ["No final stop"]),
        ('He said "stop." Then left.', ['He said "stop."', "Then left."]),
        ("Wait... really?! Yes.", ["Wait...", "really?!", "Yes."]),
        ("Pi is 3.14 today. Next.", ["Pi is 3.14 today.", "Next."]),
        ("Dr. Smith met Mr. J. Doe, e.g. here. Done.", ["Dr. Smith met Mr. J. Doe, e.g. here.", "Done."]),
        ("Title\n\nFirst paragraph. Second", ["Title", "First paragraph.", "Second"]),
        ("你好。今天好吗？好！", ["你好。", "今天好吗？", "好！"]),
        ("", []),
        (" \n\n ", []),
    ],
)
def test_splits_at_sentence_ends(text, pieces):
    assert split_sentences(text) == pieces


def test_long_sentence_is_cut_at_clauses_then_spaces():
    sentence = "one two three, four five six; seven eight nine ten eleven twelve."
    assert split_sentences(sentence, max_chars=30) == [
        "one two three, four five six;",
        "seven eight nine ten eleven",
        "twelve.",
    ]


def test_word_longer_than_limit_is_cut_hard():
    assert split_sentences("abcdefghij", max_chars=4) == ["abcd", "efgh", "ij"]


def test_rejects_nonpositive_limit():
    with pytest.raises(ValueError):
        split_sentences("text", max_chars=0)


texts = st.text(alphabet=st.sampled_from("ab ,.!?;\n\t\"'。—3"), max_size=400) | st.text(max_size=200)


@given(texts, st.integers(min_value=1, max_value=80))
def test_pieces_keep_every_character_but_whitespace(text, max_chars):
    pieces = split_sentences(text, max_chars)
    assert re.sub(r"\s", "", "".join(pieces)) == re.sub(r"\s", "", text)


@given(texts, st.integers(min_value=1, max_value=80))
def test_pieces_are_stripped_nonempty_and_short(text, max_chars):
    for piece in split_sentences(text, max_chars):
        assert piece and piece == piece.strip()
        assert len(piece) <= max_chars
        assert not re.search(r"\s\s", piece)
