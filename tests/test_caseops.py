"""CaseOps (issue 14): the lossless case transform (data/caseops.py)."""

import json
import lzma
import random
import sys
from pathlib import Path

import pytest

from conftest import REPO, SHARED_DATA

sys.path.insert(0, str(REPO / "data"))
import caseops  # noqa: E402
import smoke  # noqa: E402

TITLE, ALLCAPS, CAPNEXT, ESCAPE = caseops.TITLE, caseops.ALLCAPS, caseops.CAPNEXT, caseops.ESCAPE


def utf8(text: str) -> int:
    return len(text.encode("utf-8"))


def capitals_left(encoded: str) -> list[str]:
    """Capitals that a lossless lowercase could have removed (one-letter lowercase that uppercases back)."""
    return [c for c in encoded if len(c.lower()) == 1 and c.lower() != c and c.lower().upper() == c]


def check_lossless(text: str):
    encoded = caseops.encode(text)
    assert caseops.decode(encoded) == text
    assert int(caseops.source_bytes(encoded).sum()) == utf8(text)
    assert not capitals_left(encoded)


def read_jsonl_xz(path: Path) -> list[str]:
    with lzma.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


# ----------------------------------------------------------------------------- the transform


@pytest.mark.parametrize(
    "text, encoded",
    [
        ("The NASA program", f"{TITLE}the{ALLCAPS} nasa program"),
        ("McDonald", f"{TITLE}mc{CAPNEXT}donald"),
        ("iPhone", f"i{CAPNEXT}phone"),
        ("McDONALD", f"{TITLE}mc{ALLCAPS}donald"),
        ("A I", f"{TITLE}a{TITLE} i"),
        ("end.\n\nThe", f"end.{TITLE}\n\nthe"),  # the operator goes before the whitespace
        ("x \ue000y", f"x {ESCAPE}\ue000y"),
        ("Straße ẞ İ", f"{TITLE}straße ẞ İ"),  # ß, ẞ and İ have no one-to-one case pair: left as they are
        ("ΟΔΟΣ", f"{ALLCAPS}οδοσ"),  # a letter at a time: no final-sigma rule
        ("plain text", "plain text"),
    ],
)
def test_capitals_are_spelled_as_operators(text, encoded):
    assert caseops.encode(text) == encoded
    assert caseops.decode(encoded) == text


ADVERSARIAL = [
    "",
    "\ue000\ue001\ue002\ue003",  # every operator character as text
    "\ue003" * 5 + "A" + "\ue000",
    f"{ESCAPE}{TITLE}The{ALLCAPS} NASA",
    "\ue004\uf8ff private use beyond the operators",
    "Zürich, ÉCOLE, Ærø, Ωmega, Москва, ΑΘΗΝΑ, Երևան, ᲡᲐᲥᲐᲠᲗᲕᲔᲚᲝ, ᏣᎳᎩ, 𐐀𐐨",  # mixed scripts, Deseret (4 bytes)
    "Straße STRASSE ẞ ß SS",
    "İstanbul ıi Iİ DİYARBAKIR",  # Turkish dotted and dotless i
    "E\u0301COLE e\u0301cole A\u030a\u0327 \u0301Start",  # combining marks, decomposed capitals
    "\u212a Kelvin \u2126 Ohm \u212b Angstrom",  # compatibility capitals with an ASCII/Greek lowercase
    "ǅungla ǈ Ǆ ǆ",  # title-case digraphs
    "Ⱥ ⱥ Ȿ ȿ ꞋꞌA",  # lowercasing changes the UTF-8 length
    "ſ long s, ﬁ ligature, ½, ①",
    "  Leading and trailing  \n\t",
    "Tabs\tAnd\u00a0No-Break\u2003Em\u3000Ideographic\u2028Line",
    "HTTPServer XMLHttpRequest aBC ABc AbC",
    "I",
    "😀 Emoji ANd 東京 Tōkyō",
]


@pytest.mark.parametrize("text", ADVERSARIAL)
def test_lossless_on_adversarial_strings(text):
    check_lossless(text)


def test_lossless_on_random_strings():
    alphabet = list("aAbBzZ  .\n\t-'") + ["\ue000", "\ue001", "\ue002", "\ue003", "ß", "ẞ", "İ", "ı", "i", "I",
                                          "\u0301", "\u0327", "Σ", "σ", "ς", "\u212a", "ǅ", "Ⱥ", "ⱥ", "É", "é", "😀", "𐐀", "𐐨", "\u00a0"]
    rng = random.Random(0)
    for _ in range(3000):
        check_lossless("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))))


def test_every_code_point_round_trips_alone_and_in_words():
    chars = [chr(c) for c in range(sys.maxunicode + 1) if not 0xD800 <= c <= 0xDFFF]
    check_lossless("".join(chars))
    check_lossless(" ".join(chars))  # each character a word of its own, after a space
    cased = [c for c in chars if c.lower() != c or c.upper() != c]
    check_lossless(" ".join(a + b + "x" for a, b in zip(cased, reversed(cased))))


def test_lossless_on_the_python_documentation():
    docs = smoke.topic_documents()
    assert len(docs) > 50
    for doc in docs:
        check_lossless(doc)


def test_lossless_on_the_shared_wikipedia_text():
    paths = [SHARED_DATA / "wiki_small" / "val.jsonl.xz", SHARED_DATA / "wiki_small" / "train.jsonl.xz"]
    if not all(p.is_file() for p in paths):
        pytest.skip("../shared/data is not beside the repository")
    docs = [doc for p in paths for doc in read_jsonl_xz(p)]
    non_ascii = operators = 0
    for doc in docs:
        check_lossless(doc)
        non_ascii += not doc.isascii()
        operators += sum(map(caseops.encode(doc).count, caseops.OPERATORS))
    assert len(docs) > 500 and non_ascii > 100 and operators > 100_000


def test_decode_refuses_an_operator_that_applies_to_nothing():
    for bad in (TITLE, f"{TITLE}1", f"{CAPNEXT} a", f"{ALLCAPS}.", f"x{ESCAPE}"):
        with pytest.raises(ValueError, match="applies to nothing"):
            caseops.decode(bad)
        with pytest.raises(ValueError, match="applies to nothing"):
            caseops.source_bytes(bad)
