"""CaseOps (issues 14 and 17): the lossless case transform (data/caseops.py), the byte sidecar that
data/build_shards.py --caseops writes, and train_gpt.py charging the sidecar's bytes; all of it the
record's (its lossless_caps.py and prepare_caseops_data.py, from ../shared/fixtures/record_1855 when
present, are the oracle the parity tests run).

The byte counts here are checked against the original text itself (its UTF-8 length, less the
whitespace the tokenizer drops at a document's two ends, or the pieces' own UTF-8 where the text
needs no normalization), never against the code that attributes them.
"""

import importlib.util
import json
import lzma
import math
import random
import re
import sys
import unicodedata
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import sentencepiece as spm
import torch

from conftest import REPO, SHARED_DATA, Recorder, tiny_args, tiny_model, toy_tables, synthetic_stream

sys.path.insert(0, str(REPO / "data"))
import build_shards  # noqa: E402
import caseops  # noqa: E402
import smoke  # noqa: E402
import train_gpt as T  # noqa: E402

TITLE, ALLCAPS, CAPNEXT, ESCAPE = caseops.TITLE, caseops.ALLCAPS, caseops.CAPNEXT, caseops.ESCAPE
VOCAB = 512  # room for the 256 byte-fallback pieces
RECORD = REPO.parent / "shared" / "fixtures" / "record_1855"
RECORD_TOKENIZER = RECORD / "tokenizers" / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
RECORD_FOLDER = "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved"


def utf8(text: str) -> int:
    return len(text.encode("utf-8"))


def kept_bytes(doc: str) -> int:
    """The UTF-8 bytes of a document that some token stands for: all but the whitespace at its two ends,
    which the tokenizer's normalization drops (the record's count, through the pieces' surfaces)."""
    return utf8(doc.strip())


def check_lossless(text: str):
    encoded = caseops.encode(text)
    assert caseops.decode(encoded) == text
    assert int(caseops.source_bytes(encoded).sum()) == utf8(text)
    assert not re.search("[A-Z]", encoded)  # every ASCII capital is an operator now


def read_jsonl_xz(path: Path) -> list[str]:
    with lzma.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def load_record_module(name: str):
    """The record's own lossless_caps.py or prepare_caseops_data.py (skips without ../shared)."""
    path = RECORD / f"{name}.py"
    if not path.is_file() or not RECORD_TOKENIZER.is_file():
        pytest.skip("../shared/fixtures/record_1855 is not beside the repository")
    spec = importlib.util.spec_from_file_location(f"record_{name}", path)
    module = importlib.util.module_from_spec(spec)
    # prepare_caseops_data.py puts its folder first on sys.path to import lossless_caps; a path left
    # there would make every later `import train_gpt` (spawned ranks included) load the record's.
    with mock.patch.object(sys, "path", [str(RECORD), *sys.path]):
        spec.loader.exec_module(module)
    return module


def test_loading_the_records_data_script_leaves_sys_path_alone():
    before = list(sys.path)
    load_record_module("prepare_caseops_data")
    assert sys.path == before


@pytest.fixture(scope="module")
def record_caps():
    return load_record_module("lossless_caps")


# ----------------------------------------------------------------------------- the transform


@pytest.mark.parametrize(
    "text, encoded",
    [
        ("The NASA program", f"{TITLE}the {ALLCAPS}nasa program"),
        ("McDonald", f"{TITLE}mc{CAPNEXT}donald"),
        ("iPhone", f"i{CAPNEXT}phone"),
        ("McDONALD", f"{TITLE}mc{CAPNEXT}d{CAPNEXT}o{CAPNEXT}n{CAPNEXT}a{CAPNEXT}l{CAPNEXT}d"),  # mixed case: a CAPNEXT per capital
        ("ABc B2B", f"{TITLE}a{CAPNEXT}bc {TITLE}b2{TITLE}b"),  # a one-letter word is TITLE, not ALLCAPS
        ("A I", f"{TITLE}a {TITLE}i"),
        ("end.\n\nThe", f"end.\n\n{TITLE}the"),  # the operator goes after the whitespace, right before the letter
        ("x \ue001y \ue004", f"x {ESCAPE}\ue001y {ESCAPE}\ue004"),
        ("\ue000 is no operator", "\ue000 is no operator"),
        ("Zürich ÉCOLE", f"{TITLE}zürich É{ALLCAPS}cole"),  # ASCII letters only: a non-ASCII letter ends a word
        ("Straße ẞ İ ΟΔΟΣ Москва", "Straße ẞ İ ΟΔΟΣ Москва".replace("S", f"{TITLE}s")),  # other capitals stay
        ("plain text", "plain text"),
    ],
)
def test_capitals_are_spelled_as_operators(text, encoded):
    assert caseops.encode(text) == encoded
    assert caseops.decode(encoded) == text


ADVERSARIAL = [
    "",
    "\ue000\ue001\ue002\ue003\ue004\ue005",  # every operator character (and its neighbours) as text
    "\ue004" * 5 + "A" + "\ue001",
    f"{ESCAPE}{TITLE}The{ALLCAPS} NASA{CAPNEXT}x",
    "\uf8ff private use beyond the operators",
    "Zürich, ÉCOLE, Ærø, Ωmega, Москва, ΑΘΗΝΑ, Երևան, ᲡᲐᲥᲐᲠᲗᲕᲔᲚᲝ, ᏣᎳᎩ, 𐐀𐐨",  # mixed scripts, Deseret (4 bytes)
    "Straße STRASSE ẞ ß SS",
    "İstanbul ıi Iİ DİYARBAKIR",  # Turkish dotted and dotless i
    "E\u0301COLE e\u0301cole A\u030a\u0327 \u0301Start",  # combining marks, decomposed capitals
    "\u212a Kelvin \u2126 Ohm \u212b Angstrom",  # compatibility capitals with an ASCII/Greek lowercase
    "ǅungla ǈ Ǆ ǆ",  # title-case digraphs
    "Ⱥ ⱥ Ȿ ȿ ꞋꞌA",
    "ſ long s, ﬁ ligature, ½, ①, ＡＢＣ full width",
    "  Leading and trailing  \n\t",
    "Tabs\tAnd\u00a0No-Break\u2003Em\u3000Ideographic\u2028Line",
    "HTTPServer XMLHttpRequest aBC ABc AbC a1B2c3D",
    "I",
    "😀 Emoji ANd 東京 Tōkyō",
]
# characters that exercise every branch, for the random and property tests
TRICKY = list("aAbBzZ  .\n\t-'1_") + ["\ue000", "\ue001", "\ue002", "\ue003", "\ue004", "\ue005", "ß", "ẞ", "İ", "ı", "\u0301",
                                      "\u0327", "Σ", "ς", "\u212a", "ǅ", "Ⱥ", "É", "é", "😀", "𐐀", "\u00a0", "Ａ", "ﬁ", "\x00"]


def random_strings(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(TRICKY) for _ in range(rng.randint(0, 30))) for _ in range(count)]


@pytest.mark.parametrize("text", ADVERSARIAL)
def test_lossless_on_adversarial_strings(text):
    check_lossless(text)


def test_lossless_on_random_strings():
    for text in random_strings(5000):
        check_lossless(text)


def test_lossless_property():
    """decode(encode(s)) == s for any string (hypothesis, when installed, searches for a counterexample)."""
    hypothesis = pytest.importorskip("hypothesis")
    strategies = hypothesis.strategies

    @hypothesis.settings(max_examples=400, deadline=None, derandomize=True)
    @hypothesis.given(strategies.text(strategies.sampled_from(TRICKY) | strategies.characters(codec="utf-8")))  # any text a document can hold
    def lossless(text):
        check_lossless(text)

    lossless()


def test_every_code_point_round_trips_alone_and_in_words():
    chars = [chr(c) for c in range(sys.maxunicode + 1) if not 0xD800 <= c <= 0xDFFF]
    check_lossless("".join(chars))
    check_lossless(" ".join(chars))  # each character a word of its own, after a space
    check_lossless(" ".join(a + b + "x" for a, b in zip(chars, reversed(chars))))


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
    for bad in (TITLE, f"{TITLE}1", f"{TITLE}A", f"{CAPNEXT} a", f"{ALLCAPS}.", f"x{ESCAPE}"):
        with pytest.raises(ValueError, match="applies to nothing"):
            caseops.decode(bad)
        with pytest.raises(ValueError, match="applies to nothing"):
            caseops.source_bytes(bad)


def test_train_gpt_knows_the_same_operators():
    assert T.CASEOPS_OPERATORS == caseops.OPERATORS == "\ue001\ue002\ue003\ue004"
    assert all(unicodedata.category(op) == "Co" for op in caseops.OPERATORS)  # private use: never real text


def test_the_transform_is_the_records(record_caps):
    """Our encoder writes what the record's encode_lossless_caps_v2 writes, its decoder reads ours back, and our
    per-character bytes are what its byte counter gives for pieces cut anywhere."""
    texts = ADVERSARIAL + random_strings(20_000, seed=1) + smoke.topic_documents()
    rng = random.Random(2)
    for text in texts:
        encoded = caseops.encode(text)
        assert encoded == record_caps.encode_lossless_caps_v2(text), text
        assert record_caps.decode_lossless_caps_v2(encoded) == text
        cuts = sorted(rng.sample(range(1, len(encoded)), min(len(encoded) - 1, 6))) if len(encoded) > 1 else []
        pieces = [encoded[a:b] for a, b in zip([0, *cuts], [*cuts, len(encoded)])]
        weights = np.cumsum(np.concatenate([[0], caseops.source_bytes(encoded)]))
        ours = [int(weights[b] - weights[a]) for a, b in zip([0, *cuts], [*cuts, len(encoded)])]
        assert ours == record_caps.surface_piece_original_byte_counts(pieces, text_transform_name=record_caps.LOSSLESS_CAPS_CASEOPS_V1)


# ----------------------------------------------------------------------------- build_shards --caseops and the byte sidecar

SYLLABLES = "ka lo mi ne ru sa ti vo pe da gu fi ho je ly zo ba".split()
WORDS = sorted({"".join(random.Random(n).choices(SYLLABLES, k=1 + n % 3)) for n in range(400)})  # enough pairs to merge into VOCAB pieces
ODD = ["Zürich", "ÉCOLE", "Straße", "ẞ", "İstanbul", "Ⱥb", "ΟΔΟΣ", "ﬁne", "½", "E\u0301cole", "\ue000", "😀", "Москва", "McDonald", "NASA"]


def clean_document(rng: random.Random) -> str:
    """ASCII with single spaces: text the tokenizer's normalization leaves exactly as it is."""
    words = [rng.choice(WORDS) for _ in range(rng.randint(15, 40))]
    words = [w.title() if rng.random() < 0.2 else w.upper() if rng.random() < 0.05 else w for w in words]
    return " ".join(words) + "."


def odd_document(rng: random.Random) -> str:
    """Non-ASCII, operator characters, whitespace runs and ends that normalization collapses or drops."""
    words = [rng.choice(WORDS + ODD) for _ in range(rng.randint(15, 40))] + [f"{TITLE}Escaped"]
    return "  " + "   ".join(words[:10]) + "\n\n" + " ".join(words[10:]) + " \t\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    rng = random.Random(1)
    docs = [clean_document(rng) if i % 2 else odd_document(rng) for i in range(120)]
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path, docs


VAL_DOCS = 20


def build(corpus_path: Path, out: Path, *extra: str) -> int:
    argv = [str(corpus_path), "--val-docs", str(VAL_DOCS), "--output-dir", str(out), "--workers", "1", *extra]
    return build_shards.main(argv)


@pytest.fixture(scope="module", params=[True, False], ids=["byte_fallback", "unk"])
def caseops_build(request, corpus, tmp_path_factory) -> Path:
    """A CaseOps build with small shards (several validation shards), with byte fallback or <unk> pieces."""
    out = tmp_path_factory.mktemp("caseops")
    extra = ["--byte-fallback"] if request.param else []
    assert build(corpus[0], out, "--caseops", "--train-tokenizer", "--vocab-size", str(VOCAB), "--shard-tokens", "250", *extra) == 0
    return out


def dataset(out: Path) -> Path:
    return out / "datasets" / f"fineweb10B_sp{VOCAB}_caseops"


def caseops_tokenizer(out: Path) -> Path:
    return out / "tokenizers" / f"fineweb_{VOCAB}_bpe_caseops.model"


def val_stream(out: Path) -> tuple[np.ndarray, np.ndarray]:
    shards = T.shard_files(str(dataset(out)), "val")
    tokens = np.concatenate([T.load_data_shard(f) for f in shards])
    sidecar = np.concatenate([T.load_data_shard(T.byte_sidecar_path(f)) for f in shards])
    return tokens, sidecar


def document_slices(tokens: np.ndarray) -> list[slice]:
    starts = [*np.flatnonzero(tokens == T.BOS_ID), tokens.size]
    return [slice(a, b) for a, b in zip(starts, starts[1:])]


def test_a_sidecar_beside_each_validation_shard_only(caseops_build):
    folder = dataset(caseops_build)
    val = T.shard_files(str(folder), "val")
    assert len(val) > 2  # the sidecar is cut where its shard is
    for shard in val:
        assert T.load_data_shard(T.byte_sidecar_path(shard)).size == T.load_data_shard(shard).size
    assert not list(folder.glob("fineweb_train_bytes_*.bin"))
    assert all("bytes" not in Path(f).name for f in val + T.shard_files(str(folder), "train"))


def test_sidecar_sums_to_each_original_document(caseops_build, corpus):
    tokens, sidecar = val_stream(caseops_build)
    docs = corpus[1][:VAL_DOCS]
    slices = document_slices(tokens)
    assert len(slices) == len(docs)
    sp = spm.SentencePieceProcessor(model_file=str(caseops_tokenizer(caseops_build)))
    operator_ids = [sp.piece_to_id(op) for op in caseops.OPERATORS]
    for doc, part in zip(docs, slices):
        assert int(sidecar[part].sum()) == kept_bytes(doc)
        assert sidecar[part][0] == 0  # BOS
    assert sum(doc != doc.strip() for doc in docs) >= 5  # documents whose end whitespace no token stands for
    is_operator = np.isin(tokens, operator_ids)
    escaped = np.roll(tokens == sp.piece_to_id(ESCAPE), 1)  # the corpus escapes only TITLE characters of its text
    assert (sidecar[is_operator & ~escaped] == 0).all() and (is_operator & ~escaped).sum() > 50
    assert (sidecar[escaped] == utf8(TITLE)).all() and escaped.sum() > 3  # an operator character that was text: its 3 bytes


def test_sidecar_entries_are_the_text_of_each_piece(caseops_build, corpus):
    """Where normalization changes nothing, a token stands for exactly its piece's text: the official
    count of that piece (its UTF-8, plus the space of a leading "▁"), and 0 for an operator."""
    tokens, sidecar = val_stream(caseops_build)
    sp = spm.SentencePieceProcessor(model_file=str(caseops_tokenizer(caseops_build)))
    checked = 0
    for doc, part in zip(corpus[1][:VAL_DOCS], document_slices(tokens)):
        if not doc.isascii() or "  " in doc:
            continue
        ids = tokens[part][1:].tolist()
        expected = [0 if sp.id_to_piece(i) in caseops.OPERATORS else utf8(sp.id_to_piece(i).replace("\u2581", " ")) for i in ids]
        assert sidecar[part][1:].tolist() == expected
        assert caseops.decode(sp.decode(ids)) == doc
        checked += 1
    assert checked >= 5


def test_tokenizer_reserves_the_operators(caseops_build):
    sp = spm.SentencePieceProcessor(model_file=str(caseops_tokenizer(caseops_build)))
    assert [sp.id_to_piece(i) for i in range(4, 8)] == list(caseops.OPERATORS)
    pieces = sp.encode(caseops.encode(f"{WORDS[0]} {WORDS[1].title()}"), out_type=str)
    assert pieces.count(TITLE) == 1 and pieces[pieces.index(TITLE) - 1] == "\u2581"  # the operator never merges
    assert T.is_caseops_tokenizer(str(caseops_tokenizer(caseops_build)))


def test_our_tokenizer_has_the_records_operator_pieces(caseops_build):
    """So the same train_gpt.py runs both: ids 4-7 are the same four pieces, each alone, in either tokenizer."""
    if not RECORD_TOKENIZER.is_file():
        pytest.skip("../shared/fixtures/record_1855 is not beside the repository")
    ours = spm.SentencePieceProcessor(model_file=str(caseops_tokenizer(caseops_build)))
    record = spm.SentencePieceProcessor(model_file=str(RECORD_TOKENIZER))
    assert [ours.id_to_piece(i) for i in range(4, 8)] == [record.id_to_piece(i) for i in range(4, 8)]
    text = caseops.encode(f"x The {caseops.OPERATORS} NASA iPhone")
    for path, sp in ((caseops_tokenizer(caseops_build), ours), (RECORD_TOKENIZER, record)):
        pieces = sp.encode(text, out_type=str)
        assert [p for p in pieces if set(p) & set(caseops.OPERATORS)] == [TITLE, ESCAPE, TITLE, ESCAPE, ALLCAPS, ESCAPE, CAPNEXT, ESCAPE, ESCAPE, ALLCAPS, CAPNEXT]
        assert T.is_caseops_tokenizer(str(path))


def test_caseops_on_real_wikipedia_text(tmp_path):
    """Real text (accents, other scripts, every kind of whitespace): sums per document stay exact."""
    path = SHARED_DATA / "wiki_small" / "val.jsonl.xz"
    if not path.is_file():
        pytest.skip("../shared/data is not beside the repository")
    argv = [str(path), "--caseops", "--train-tokenizer", "--vocab-size", "1024", "--byte-fallback", "--val-docs", "25",
            "--max-docs", "45", "--output-dir", str(tmp_path), "--workers", "1"]
    assert build_shards.main(argv) == 0
    folder = tmp_path / "datasets" / "fineweb10B_sp1024_caseops"
    tokens = T.load_data_shard(folder / "fineweb_val_000000.bin")
    sidecar = T.load_data_shard(folder / "fineweb_val_bytes_000000.bin")
    docs = read_jsonl_xz(path)[:25]
    assert sum(not d.isascii() for d in docs) > 10
    assert [int(sidecar[s].sum()) for s in document_slices(tokens)] == [kept_bytes(d) for d in docs]


def test_caseops_and_tokenizer_must_match(caseops_build, corpus, tmp_path, capsys):
    assert build(corpus[0], tmp_path / "a", "--tokenizer", str(caseops_tokenizer(caseops_build))) == 1
    assert "is a CaseOps tokenizer; add --caseops" in capsys.readouterr().err
    assert build(corpus[0], tmp_path / "b", "--train-tokenizer", "--vocab-size", str(VOCAB)) == 0
    plain = tmp_path / "b" / "tokenizers" / f"fineweb_{VOCAB}_bpe.model"
    assert not T.is_caseops_tokenizer(str(plain))
    capsys.readouterr()
    assert build(corpus[0], tmp_path / "c", "--caseops", "--tokenizer", str(plain)) == 1
    err = capsys.readouterr().err
    assert "no CaseOps operator pieces" in err and err.count("\n") == 1


# ----------------------------------------------------------------------------- parity with the record's prepare_caseops_data.py

TRICKY_DOCS = [
    "The NASA program. McDonald's iPhone, HTTPServer; XMLHttpRequest, aBC ABc A I.",
    "Zürich ÉCOLE Straße STRASSE ẞ ß İstanbul DİYARBAKIR ıi ΟΔΟΣ Москва Երևան ᏣᎳᎩ 𐐀𐐨 東京 Tōkyō",
    "E\u0301COLE e\u0301cole A\u030a\u0327 \u0301Start \u212a Kelvin ǅungla Ⱥ ⱥ",  # combining marks, compatibility capitals
    "😀 Emoji ANd 🇫🇷 flags 👩‍👩‍👧 ZWJ \u200bzero width",
    "operators in the text: \ue000 \ue001 \ue002\ue003 \ue004\ue001The \ue004",  # U+E000 and the four operators
    "  Leading and trailing whitespace  \n\t",
    "Tabs\tAnd\u00a0No-Break\u2003Em\u3000Ideographic\u2028Line\r\nCRLF",
    "ﬁ ligature, ½, ①, ＡＢＣ full width, ㎏, ſ long s",  # NFKC changes these
    "\x00\x01 control \x02 characters \x7f",
    "",
    "   ",
    "A",
    "digits 1234567890 and 3.14159 and 2024-05-01",
    "Ⱥ ⱥ Ȿ ȿ ꞋꞌA Ω ω Ω",
    "i" * 300 + " " + "I" * 300 + " " + "Ab" * 200,  # long words, longer than a small shard
] * 2 + ["Mixed \ue004\ue004 ESC ESC and MiXeD CaSe at the end"]


class _Surfaces:
    """sentencepiece >= 0.2.1 has no encode_as_immutable_proto, which the record's script calls; its offsets
    are the same alignment (checked against 0.2.0 by hand), so this gives the record's script its pieces."""

    def __init__(self, model_file: str):
        self.sp = spm.SentencePieceProcessor(model_file=model_file)
        self.vocab_size, self.encode = self.sp.vocab_size, self.sp.encode

    def encode_as_immutable_proto(self, text: str):
        result = self.sp.encode(text, out_type="offset_mapping")
        return SimpleNamespace(pieces=[SimpleNamespace(surface=text[b:e]) for b, e in result["offsets"]])


def record_prepare(docs: Path, out: Path, val_docs: int, monkeypatch, shard_tokens: int | None = None) -> Path:
    """Run the record's prepare_caseops_data.py on `docs`; returns its dataset folder."""
    module = load_record_module("prepare_caseops_data")
    if not hasattr(spm.SentencePieceProcessor, "encode_as_immutable_proto"):
        monkeypatch.setattr(module, "spm", SimpleNamespace(SentencePieceProcessor=_Surfaces))
    if shard_tokens:
        monkeypatch.setattr(module, "SHARD_TOKENS", shard_tokens)
    monkeypatch.setattr(sys, "argv", ["prepare_caseops_data.py", "--docs", str(docs), "--out", str(out), "--sp", str(RECORD_TOKENIZER),
                                      "--val-docs", str(val_docs)])
    module.main()
    return out / "datasets" / RECORD_FOLDER


def write_docs(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return path


@pytest.fixture
def tricky_docs(tmp_path) -> Path:
    return write_docs(tmp_path / "docs.jsonl", TRICKY_DOCS)


def build_like_the_record(docs: Path, tmp_path: Path, monkeypatch, val_docs: int) -> Path:
    """The record's build and ours of `docs`: the same files, in the record's folder; returns ours."""
    record = record_prepare(docs, tmp_path / "record", val_docs, monkeypatch)
    argv = [str(docs), "--caseops", "--tokenizer", str(RECORD_TOKENIZER), "--val-docs", str(val_docs), "--output-dir", str(tmp_path / "ours"), "--workers", "2"]
    assert build_shards.main(argv) == 0
    ours = tmp_path / "ours" / "datasets" / RECORD_FOLDER
    names = sorted(p.name for p in record.glob("*.bin"))
    assert names == ["fineweb_train_000000.bin", "fineweb_val_000000.bin", "fineweb_val_bytes_000000.bin"]
    assert sorted(p.name for p in ours.glob("*.bin")) == names
    for name in names:
        assert (ours / name).read_bytes() == (record / name).read_bytes(), name
    return ours


def test_the_records_data_byte_for_byte(tricky_docs, tmp_path, monkeypatch, capsys):
    """build_shards.py --caseops with the record's tokenizer writes the record's validation tokens, byte sidecar
    and training tokens (the same files), in the record's folder."""
    ours = build_like_the_record(tricky_docs, tmp_path, monkeypatch, 16)
    assert f"DATA_PATH={ours} " in capsys.readouterr().out
    sidecar = T.load_data_shard(ours / "fineweb_val_bytes_000000.bin")
    tokens = T.load_data_shard(ours / "fineweb_val_000000.bin")
    sums = [int(sidecar[s].sum()) for s in document_slices(tokens)]
    plain_ends = [i for i, d in enumerate(TRICKY_DOCS[:16]) if not re.search("[\x00-\x08\x7f]", d)]  # control characters at an end are dropped too
    assert [sums[i] for i in plain_ends] == [kept_bytes(TRICKY_DOCS[i]) for i in plain_ends] and len(plain_ends) == 15


def test_the_records_data_on_real_text(tmp_path, monkeypatch):
    path = SHARED_DATA / "wiki_small" / "val.jsonl.xz"
    if not path.is_file():
        pytest.skip("../shared/data is not beside the repository")
    build_like_the_record(write_docs(tmp_path / "wiki.jsonl", read_jsonl_xz(path)[:24]), tmp_path, monkeypatch, 8)


def test_train_gpt_reads_the_records_own_folder(tricky_docs, tmp_path, monkeypatch):
    """The record's script cuts smaller shards (10**7 tokens) with a sidecar each, and writes no tokenizer
    fingerprint: train_gpt.py pairs the sidecars by name and charges them, and the streams are ours."""
    record = record_prepare(tricky_docs, tmp_path / "record", 16, monkeypatch, shard_tokens=300)
    argv = [str(tricky_docs), "--caseops", "--tokenizer", str(RECORD_TOKENIZER), "--val-docs", "16", "--output-dir", str(tmp_path / "ours"),
            "--workers", "1", "--shard-tokens", "300"]
    assert build_shards.main(argv) == 0
    ours = tmp_path / "ours" / "datasets" / RECORD_FOLDER
    assert len(list(record.glob("fineweb_val_bytes_*.bin"))) > 2
    for split in ("val", "train"):
        streams = [np.concatenate([T.load_data_shard(f) for f in T.shard_files(str(d), split)]) for d in (record, ours)]
        assert np.array_equal(*streams), split
    val = T.load_validation_tokens(str(record), 8192)
    tables = T.load_tokenizer_tables(str(RECORD_TOKENIZER), 8192)
    tables = T.attach_byte_sidecar(tables, val, str(record), str(RECORD_TOKENIZER))
    record_sidecar = np.concatenate([T.load_data_shard(f) for f in sorted(record.glob("fineweb_val_bytes_*.bin"))])
    assert np.array_equal(T.ScoreLedger(val, tables).bytes.numpy(), record_sidecar[1:])
    assert T.tokenizer_mismatch(str(record), str(RECORD_TOKENIZER)) is None


# ----------------------------------------------------------------------------- train_gpt.py: bytes from the sidecar


def caseops_args(out: Path, tmp_path: Path, **overrides) -> T.Hyperparameters:
    return tiny_args(DATA_PATH=str(dataset(out)), TOKENIZER_PATH=str(caseops_tokenizer(out)), VOCAB_SIZE=VOCAB,
                     LOG_DIR=str(tmp_path / "logs"), RUN_ID="caseops", **overrides)


def test_every_evaluation_path_charges_the_original_bytes(caseops_build, corpus, tmp_path):
    """The bpb of each path (standard, sliding window, phased TTT) is its nll over the original text's UTF-8 bytes."""
    args = caseops_args(caseops_build, tmp_path)
    tables = T.load_tokenizer_tables(args.tokenizer_path, VOCAB)
    val = T.load_validation_tokens(args.data_path, VOCAB)
    tables = T.attach_byte_sidecar(tables, val, args.data_path, args.tokenizer_path)
    original_bytes = sum(kept_bytes(d) for d in corpus[1][:VAL_DOCS])
    model = tiny_model(0, VOCAB_SIZE=VOCAB)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    official = int(T.target_bytes(val[:-1], val[1:], tables).sum())
    assert official != original_bytes  # the operators' 3 bytes, collapsed whitespace: the tables would be wrong
    assert T.evaluation_paths(args) == ["standard", "sliding_window", "ttt"]
    for name in T.evaluation_paths(args):
        ledger = T.ScoreLedger(val, tables)
        T.score_path(name, model, weights, val, ledger, args, T.Runtime())
        result = ledger.result()
        assert result.byte_sum == original_bytes, name
        assert result.val_bpb == pytest.approx(result.nll_sum / math.log(2) / original_bytes, rel=1e-12), name


def test_the_run_logs_the_byte_source_and_scores_the_original_bytes(caseops_build, corpus, tmp_path):
    args = caseops_args(caseops_build, tmp_path, ITERATIONS=2, EVAL_STRIDE=0, TTT_ENABLED=0, EVAL_AUDIT=0, GPTQ_ENABLED=0, EVAL_DUMP=str(tmp_path / "dump"))
    log = Recorder()
    T.run(args, T.Runtime(), "caseops", log)
    log = "\n".join(log.lines).split("=" * 100)[-1]  # after the script's source
    original_bytes = sum(kept_bytes(d) for d in corpus[1][:VAL_DOCS])
    assert f"bpb_bytes:{original_bytes} source:sidecar" in log
    dump = np.load(tmp_path / "dump.standard.npz")
    assert int(dump["bytes"].sum()) == original_bytes
    logged = float(re.search(r"final_\w+_roundtrip_exact val_loss:\S+ val_bpb:(\S+)", log).group(1))
    assert logged == pytest.approx(dump["nll"].sum() / math.log(2) / original_bytes, abs=1e-8)


def test_without_sidecars_nothing_changes(corpus, tmp_path):
    assert build(corpus[0], tmp_path, "--train-tokenizer", "--vocab-size", str(VOCAB)) == 0
    data, tokenizer = tmp_path / "datasets" / f"fineweb10B_sp{VOCAB}", tmp_path / "tokenizers" / f"fineweb_{VOCAB}_bpe.model"
    tables = T.load_tokenizer_tables(str(tokenizer), VOCAB)
    val = T.load_validation_tokens(str(data), VOCAB)
    assert T.attach_byte_sidecar(tables, val, str(data), str(tokenizer)) is tables
    assert torch.equal(T.ScoreLedger(val, tables).bytes, T.target_bytes(val[:-1], val[1:], tables))
    args = tiny_args(DATA_PATH=str(data), TOKENIZER_PATH=str(tokenizer), VOCAB_SIZE=VOCAB, LOG_DIR=str(tmp_path / "logs"), RUN_ID="plain",
                     ITERATIONS=1, EVAL_STRIDE=0, TTT_ENABLED=0, EVAL_AUDIT=0, GPTQ_ENABLED=0)
    log = Recorder()
    T.run(args, T.Runtime(), "plain", log)
    official = int(T.target_bytes(val[:-1], val[1:], tables).sum())
    assert any(line.startswith(f"bpb_bytes:{official} source:official") for line in log.lines)


def test_ledger_takes_the_sidecar_for_the_validation_stream_and_its_start_only():
    tokens = torch.from_numpy(synthetic_stream(20).astype(np.int64))
    g = torch.Generator().manual_seed(0)
    sidecar = torch.where(tokens == T.BOS_ID, 0, torch.randint(0, 9, tokens.shape, generator=g)).to(torch.int32)
    plain = toy_tables()
    tables = T.ByteTables(plain.base_bytes, plain.has_leading_space, plain.is_boundary, tokens, sidecar)
    assert torch.equal(T.ScoreLedger(tokens, tables).bytes, sidecar[1:])
    assert torch.equal(T.ScoreLedger(tokens[:50], tables).bytes, sidecar[1:50])  # the audit's probe
    other = T.perturb_after(tokens, 20, 64)  # the audit's perturbed copy: no text behind it, official count
    assert torch.equal(T.ScoreLedger(other, tables).bytes, T.target_bytes(other[:-1], other[1:], plain))


def copy_dataset(out: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    for f in dataset(out).glob("*.bin"):
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


def sidecar_error(folder: Path, tokenizer: Path) -> str:
    val = T.load_validation_tokens(str(folder), VOCAB)
    with pytest.raises(T.DataError) as info:
        T.attach_byte_sidecar(T.load_tokenizer_tables(str(tokenizer), VOCAB), val, str(folder), str(tokenizer))
    message = str(info.value)
    assert "\n" not in message and "build_shards.py" in message
    return message


def test_a_caseops_tokenizer_without_sidecars_is_refused(caseops_build, tmp_path):
    folder = copy_dataset(caseops_build, tmp_path)
    for f in folder.glob("fineweb_val_bytes_*.bin"):
        f.unlink()
    assert "is a CaseOps tokenizer but" in sidecar_error(folder, caseops_tokenizer(caseops_build))


def test_a_sidecar_of_another_length_is_refused(caseops_build, tmp_path):
    folder = copy_dataset(caseops_build, tmp_path)
    sidecar = folder / "fineweb_val_bytes_000001.bin"
    T.write_data_shard(sidecar, T.load_data_shard(sidecar)[:-1])
    message = sidecar_error(folder, caseops_tokenizer(caseops_build))
    assert "fineweb_val_bytes_000001.bin holds" in message and "different builds" in message


@pytest.mark.parametrize("case", ["missing", "stray", "charges_bos"])
def test_sidecars_that_do_not_pair_with_the_shards_are_refused(caseops_build, tmp_path, case):
    folder = copy_dataset(caseops_build, tmp_path)
    if case == "missing":
        (folder / "fineweb_val_bytes_000001.bin").unlink()
        assert "fineweb_val_bytes_000001.bin: every validation shard" in sidecar_error(folder, caseops_tokenizer(caseops_build))
    elif case == "stray":
        (folder / "fineweb_val_bytes_000999.bin").write_bytes((folder / "fineweb_val_bytes_000000.bin").read_bytes())
        assert "fineweb_val_bytes_000999.bin: every validation shard" in sidecar_error(folder, caseops_tokenizer(caseops_build))
    else:
        sidecar = folder / "fineweb_val_bytes_000000.bin"
        T.write_data_shard(sidecar, T.load_data_shard(sidecar) + 1)
        assert "charge bytes to a BOS" in sidecar_error(folder, caseops_tokenizer(caseops_build))


def test_the_run_refuses_before_training(caseops_build, tmp_path):
    folder = copy_dataset(caseops_build, tmp_path)
    (folder / "fineweb_val_bytes_000000.bin").unlink()
    args = tiny_args(DATA_PATH=str(folder), TOKENIZER_PATH=str(caseops_tokenizer(caseops_build)), VOCAB_SIZE=VOCAB,
                     LOG_DIR=str(tmp_path / "logs"))
    log = Recorder()
    with pytest.raises(T.DataError, match="byte sidecar"):
        T.run(args, T.Runtime(), "refused", log)
    assert any(line.startswith("attention_backend") for line in log.lines)
    assert not any(line.startswith("model_params") for line in log.lines)


# ----------------------------------------------------------------------------- smoke --caseops


def test_smoke_caseops_builds_its_own_folder_with_sidecars(tmp_path, monkeypatch):
    root = tmp_path / "smoke_caseops"
    monkeypatch.setattr(smoke, "CASEOPS_TOKENIZER_PATH", root / "tokenizers" / "fineweb_1024_bpe_caseops.model")
    monkeypatch.setattr(smoke, "CASEOPS_DATASET_DIR", root / "datasets" / "fineweb10B_sp1024_caseops")
    monkeypatch.setattr(smoke, "CASEOPS_BUILD_INFO", root / "build_info.json")
    monkeypatch.setattr(smoke, "BUILD_INFO", tmp_path / "plain" / "build_info.json")  # must stay untouched
    assert smoke.main(["--caseops", "--prepare-only"]) == 0
    assert not smoke.BUILD_INFO.exists()
    tokens = T.load_data_shard(smoke.CASEOPS_DATASET_DIR / "fineweb_val_000000.bin")
    sidecar = T.load_data_shard(smoke.CASEOPS_DATASET_DIR / "fineweb_val_bytes_000000.bin")
    val_docs, _ = smoke.smoke_corpus()
    assert [int(sidecar[s].sum()) for s in document_slices(tokens)] == [kept_bytes(d) for d in val_docs]
    env = smoke.training_env(steps=None, caseops_text=True)
    assert env["DATA_PATH"].endswith("fineweb10B_sp1024_caseops") and env["TOKENIZER_PATH"].endswith("_caseops.model")
    assert set(smoke.CASEOPS_ENV) <= {s.name for s in T.SETTINGS}
