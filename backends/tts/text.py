"""Splitting input text into sentence-sized pieces that are synthesized and streamed one by one.

Pure functions: no engine, no IO. A piece never exceeds `max_chars`; nothing but whitespace is lost.
"""

from __future__ import annotations

import re

DEFAULT_MAX_PIECE_CHARS = 300

# A sentence ends at . ! ? … (or their CJK forms), optionally followed by closing quotes or
# brackets, when whitespace or the end of the text follows; CJK stops need no whitespace.
_SENTENCE_END = re.compile(r"""(?:[.!?…]+["'”’)\]]*(?=\s|$)|[。！？]+["'”’）」』]*)""")
# A blank line (paragraph break) ends a sentence too.
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
# Where an over-long sentence may be cut, best first: after clause punctuation, then at spaces.
_CLAUSE_END = re.compile(r"[,;:—–]+(?=\s)")
_WHITESPACE = re.compile(r"\s+")

# Abbreviations whose period does not end a sentence ("Dr. Smith", "e.g. this").
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st vs etc e.g i.e cf fig no approx dept inc ltd co mt".split()
)


def split_sentences(text: str, max_chars: int = DEFAULT_MAX_PIECE_CHARS) -> list[str]:
    """Split `text` into stripped, non-empty pieces of at most `max_chars` characters, in order.

    Pieces are sentences where possible; longer sentences are cut at clause punctuation, then at
    spaces, and only as a last resort inside a word. Whitespace runs collapse to one space.
    """
    if max_chars < 1:
        raise ValueError("max_chars must be at least 1")
    pieces: list[str] = []
    for paragraph in _PARAGRAPH_BREAK.split(text):
        for sentence in _sentences(paragraph):
            pieces.extend(_cut_to_length(sentence, max_chars))
    return pieces


def _sentences(paragraph: str) -> list[str]:
    """Sentences of one paragraph, whitespace-normalized, empty ones dropped."""
    sentences: list[str] = []
    start = 0
    for match in _SENTENCE_END.finditer(paragraph):
        end = match.end()
        if _ends_with_abbreviation(paragraph[start:end]):
            continue
        sentences.append(paragraph[start:end])
        start = end
    sentences.append(paragraph[start:])
    normalized = (_WHITESPACE.sub(" ", sentence).strip() for sentence in sentences)
    return [sentence for sentence in normalized if sentence]


def _ends_with_abbreviation(sentence: str) -> bool:
    """True when the sentence's last word is a known abbreviation or a single initial ("J.")."""
    words = sentence.split()
    if not words or not words[-1].endswith("."):
        return False
    last_word = words[-1].rstrip(".").lower()
    return last_word in _ABBREVIATIONS or (len(last_word) == 1 and last_word.isalpha())


def _cut_to_length(sentence: str, max_chars: int) -> list[str]:
    """Cut one normalized sentence into pieces of at most `max_chars` characters."""
    pieces: list[str] = []
    rest = sentence
    while len(rest) > max_chars:
        cut = _best_cut(rest, max_chars)
        pieces.append(rest[:cut].strip())
        rest = rest[cut:].strip()
    if rest:
        pieces.append(rest)
    return [piece for piece in pieces if piece]


def _best_cut(text: str, max_chars: int) -> int:
    """Index to cut `text` at: the last clause end, else the last space, within `max_chars`."""
    window = text[: max_chars + 1]
    clause_ends = [match.end() for match in _CLAUSE_END.finditer(window) if match.end() <= max_chars]
    if clause_ends and clause_ends[-1] > max_chars // 3:
        return clause_ends[-1]
    space = window.rfind(" ")
    if space > 0:
        return space
    return max_chars
