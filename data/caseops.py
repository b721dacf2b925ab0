"""CaseOps: a lossless case transform, so the vocabulary is not spent on "The" / "the" / "THE".

`encode(text)` lowercases the text and spells each capital as an operator, a private-use character
that the CaseOps tokenizer holds as a reserved piece; `decode(encode(text)) == text` for every string.

    TITLE    the next letter is a capital                  "The"      -> TITLE "the"
    ALLCAPS  every letter from here to the end of the word "NASA"     -> ALLCAPS "nasa"
    CAPNEXT  the next letter, inside a word, is a capital  "McDonald" -> TITLE "mc" CAPNEXT "donald"
    ESCAPE   the next character is literal text (an operator character already in the input)

TITLE and CAPNEXT decode alike; two pieces let the model tell a capitalized word from a capital
inside one.

What is lowercased: only a letter whose lowercase is one character that uppercases back to it
(C.lower().upper() == C), and only through that one-character mapping. Everything else is left as
it is: "ß" and "ẞ" (their case mappings are not one-to-one), Turkish "İ" (lowercases to two
characters), the Kelvin sign (lowercases to an ASCII "k" that uppercases to "K"), title-case digraphs
such as "ǅ", digits, marks and letters of scripts without case. So the inverse is the exact
one-character uppercase of each marked letter, and nothing can be lost. A word is a maximal run of
such case-pair letters (in either case); a combining mark or any other character ends it.

Where an operator goes: TITLE and ALLCAPS at the start of a word are written before the whitespace
that precedes the word ("a The" -> "a" TITLE " the"), so that the tokenizer still sees " the" as one
piece (whitespace before a reserved piece would be a piece of its own: on the shared Wikipedia text
with 1024 pieces, 0.429 tokens per byte instead of 0.399).

Bytes: the evaluation divides by the original UTF-8 bytes. `source_bytes(encoded)` gives, for each
character of the encoded text, the bytes of the original text it stands for: 0 for an operator and
for ESCAPE, the original capital's UTF-8 length for a lowercased letter (lowercasing can change it:
"Ⱥ" is 2 bytes, "ⱥ" 3), the character's own length otherwise. They sum to len(text.encode()).

The case tables come from the running Python's Unicode database; shards built under one Python
version are decoded with the same rules by any version that agrees on these letters.
"""

from __future__ import annotations

import re
import sys

import numpy as np

TITLE, ALLCAPS, CAPNEXT, ESCAPE = "\ue000", "\ue001", "\ue002", "\ue003"
OPERATORS = TITLE + ALLCAPS + CAPNEXT + ESCAPE  # reserved pieces of a CaseOps tokenizer, in this order


def _case_pairs() -> dict[str, str]:
    """Capital -> its lowercase letter, for the capitals whose lowercase is one letter that uppercases back."""
    pairs = {}
    for code in range(sys.maxunicode + 1):
        capital = chr(code)
        lower = capital.lower()
        if len(lower) == 1 and lower != capital and lower.upper() == capital:
            pairs[capital] = lower
    return pairs


_LOWER_OF = _case_pairs()
_UPPER_OF = {lower: capital for capital, lower in _LOWER_OF.items()}
_TO_LOWER = str.maketrans(_LOWER_OF)
_TO_UPPER = str.maketrans(_UPPER_OF)


def _char_class(chars) -> str:
    """A regex character class of `chars`, as ranges of consecutive code points."""
    codes = sorted(map(ord, chars))
    ranges, start = [], codes[0]
    for prev, code in zip(codes, codes[1:] + [None]):
        if code != prev + 1:
            ranges.append(f"\\U{start:08x}" + (f"-\\U{prev:08x}" if prev > start else ""))
            start = code
    return "[" + "".join(ranges) + "]"


_LETTER = _char_class(set(_LOWER_OF) | set(_UPPER_OF))  # case-pair letters, either case: what words are made of
_CAPITAL = _char_class(_LOWER_OF)
_SMALL = _char_class(_UPPER_OF)
_OPERATOR = _char_class(OPERATORS)
_OPERATOR_IN_TEXT = re.compile(_OPERATOR)

# A word with at least one capital, with the whitespace before it. The match starts only where the
# text before is not whitespace and not a letter, so whitespace runs and words are scanned once.
_WORD_WITH_CAPITAL = re.compile(f"(?<!\\s)(\\s*)(?<!{_LETTER})({_LETTER}*{_CAPITAL}{_LETTER}*)")
# One operator and what it applies to in encoded text; the last branch is an operator that applies
# to nothing, which encode never writes.
_OPERATION = re.compile(
    f"{ESCAPE}(.)|{TITLE}(\\s*)({_SMALL})|{CAPNEXT}({_SMALL})|{ALLCAPS}(\\s*)({_SMALL}+)|({_OPERATOR})",
    re.DOTALL,
)


def _encode_word(match: re.Match) -> str:
    space, word = match.group(1), match.group(2)
    lowered = word.translate(_TO_LOWER)
    # capitals_from[i]: word[i:] has only capitals; it decides where ALLCAPS can take over.
    capitals_from = [False] * (len(word) + 1)
    capitals_from[len(word)] = True
    for i in range(len(word) - 1, -1, -1):
        capitals_from[i] = capitals_from[i + 1] and word[i] in _LOWER_OF
    out = []
    for i, letter in enumerate(word):
        if capitals_from[i] and len(word) - i >= 2:
            out.append(ALLCAPS + lowered[i:])
            break
        if letter in _LOWER_OF:
            out.append(TITLE if i == 0 else CAPNEXT)
        out.append(lowered[i])
    body = "".join(out)
    if word[0] in _LOWER_OF:  # body starts with TITLE or ALLCAPS: it goes before the whitespace
        return body[0] + space + body[1:]
    return space + body


def encode(text: str) -> str:
    """The lowercase text with capitals spelled as operators (see the module docstring)."""
    escaped = _OPERATOR_IN_TEXT.sub(lambda m: ESCAPE + m.group(), text)
    return _WORD_WITH_CAPITAL.sub(_encode_word, escaped)


def _operation_groups(match: re.Match) -> tuple:
    """The groups of an _OPERATION match; an operator that applies to nothing is a ValueError."""
    groups = match.groups()
    if groups[-1] is not None:
        raise ValueError(f"operator U+{ord(groups[-1]):04X} at character {match.start()} applies to nothing: not text made by caseops.encode")
    return groups[:-1]


def _decode_operation(match: re.Match) -> str:
    literal, title_space, title_letter, next_letter, caps_space, caps_word = _operation_groups(match)
    if literal is not None:
        return literal
    if title_letter is not None:
        return title_space + _UPPER_OF[title_letter]
    if next_letter is not None:
        return _UPPER_OF[next_letter]
    return caps_space + caps_word.translate(_TO_UPPER)


def decode(encoded: str) -> str:
    """The original text of `encode`'s output."""
    return _OPERATION.sub(_decode_operation, encoded)


def utf8_lengths(text: str) -> np.ndarray:
    """The UTF-8 length of each character of `text` (int64)."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
    return 1 + (codes >= 0x80).astype(np.int64) + (codes >= 0x800) + (codes >= 0x10000)


def source_bytes(encoded: str) -> np.ndarray:
    """For each character of encoded text, the UTF-8 bytes of the original text it stands for (int64)."""
    weights = utf8_lengths(encoded)
    for match in _OPERATION.finditer(encoded):
        _, _, title_letter, next_letter, _, caps_word = _operation_groups(match)
        weights[match.start()] = 0  # the operator (or ESCAPE) itself; an escaped character keeps its bytes
        letters = title_letter or next_letter or caps_word
        if letters is None or letters.isascii():
            continue
        first = match.end() - len(letters)
        for i, letter in enumerate(letters, first):
            weights[i] = len(_UPPER_OF[letter].encode("utf-8"))
    return weights
