"""CaseOps: the lossless case transform of the CaseOps records, so the vocabulary is not spent on
"The" / "the" / "THE".

`encode(text)` lowercases the ASCII capitals and marks them with operators, private-use characters
that a CaseOps tokenizer holds as reserved pieces (ids 4-7, in this order):

    TITLE    U+E001  a capital starts the word                     "The"      -> TITLE "the"
    ALLCAPS  U+E002  a word of two or more letters, all capitals   "NASA"     -> ALLCAPS "nasa"
    CAPNEXT  U+E003  a capital inside a word (mixed case)          "McDonald" -> TITLE "mc" CAPNEXT "donald"
    ESCAPE   U+E004  the next character is text: an operator character that was already in the input

A word is a maximal run of ASCII letters A-Z a-z. Nothing else changes: digits, accented letters
and other scripts are left as they are and end a word ("Zürich" -> TITLE "z" "ü" "rich"). Each
operator stands right before the letter it marks, after any whitespace ("a The" -> "a " TITLE
"the"). This is the transform of the record's tokenizer and data (`lossless_caps_caseops_v1` of its
lossless_caps.py, whose encoder was the oracle); the tests compare the two on adversarial text.

`decode(encode(text)) == text` for every string: a lowercase ASCII letter after an operator is the
only thing encode changes, and the escaped operator characters are the only operators it keeps.

Bytes: the evaluation divides by the original UTF-8 bytes. `source_bytes(encoded)` gives, for each
character of the encoded text, the bytes of the original text it stands for: 0 for an operator and
for ESCAPE, the character's own UTF-8 length otherwise (an escaped operator character keeps its 3;
a lowercased letter is 1 byte, as its capital was).
"""

from __future__ import annotations

import re

import numpy as np

TITLE, ALLCAPS, CAPNEXT, ESCAPE = "\ue001", "\ue002", "\ue003", "\ue004"
OPERATORS = TITLE + ALLCAPS + CAPNEXT + ESCAPE  # reserved pieces of a CaseOps tokenizer, in this order

_OPERATOR_IN_TEXT = re.compile(f"[{OPERATORS}]")
_WORD_WITH_CAPITAL = re.compile("(?<![A-Za-z])[a-z]*[A-Z][A-Za-z]*")  # a whole word, at least one capital
_INNER_CAPITAL = re.compile("(?<=.)([A-Z])")
# One operator and what it applies to in encoded text; the last branch is an operator that applies
# to nothing, which encode never writes.
_OPERATION = re.compile(f"{ESCAPE}(.)|{TITLE}([a-z])|{CAPNEXT}([a-z])|{ALLCAPS}([a-z]+)|([{OPERATORS}])", re.DOTALL)
_MARK = re.compile(f"{ESCAPE}.|[{TITLE}{ALLCAPS}{CAPNEXT}]", re.DOTALL)  # what source_bytes zeroes: its first character


def _encode_word(match: re.Match) -> str:
    word = match.group()
    if len(word) > 1 and word.isupper():
        return ALLCAPS + word.lower()
    marked = _INNER_CAPITAL.sub(CAPNEXT + r"\1", word).lower()
    return TITLE + marked if word[0] <= "Z" else marked


def encode(text: str) -> str:
    """The text with its ASCII capitals lowercased and spelled as operators (see the module docstring)."""
    return _WORD_WITH_CAPITAL.sub(_encode_word, _OPERATOR_IN_TEXT.sub(ESCAPE + r"\g<0>", text))


def _operation_groups(match: re.Match) -> tuple:
    """The groups of an _OPERATION match; an operator that applies to nothing is a ValueError."""
    groups = match.groups()
    if groups[-1] is not None:
        raise ValueError(f"operator U+{ord(groups[-1]):04X} at character {match.start()} applies to nothing: not text made by caseops.encode")
    return groups[:-1]


def _decode_operation(match: re.Match) -> str:
    literal, title_letter, next_letter, caps_word = _operation_groups(match)
    if literal is not None:
        return literal
    return (title_letter or next_letter or caps_word).upper()


def decode(encoded: str) -> str:
    """The original text of `encode`'s output."""
    return _OPERATION.sub(_decode_operation, encoded)


def utf8_lengths(text: str) -> np.ndarray:
    """The UTF-8 length of each character of `text` (int64)."""
    codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
    return 1 + (codes >= 0x80).astype(np.int64) + (codes >= 0x800) + (codes >= 0x10000)


def source_bytes(encoded: str) -> np.ndarray:
    """For each character of encoded text, the UTF-8 bytes of the original text it stands for (int64)."""
    for match in _OPERATION.finditer(encoded):
        _operation_groups(match)  # refuses an operator that applies to nothing
    weights = utf8_lengths(encoded)
    weights[[m.start() for m in _MARK.finditer(encoded)]] = 0
    return weights
