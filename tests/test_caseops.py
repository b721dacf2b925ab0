"""CaseOps (issue 14): the lossless case transform (data/caseops.py), the byte sidecar that
data/build_shards.py --caseops writes, and train_gpt.py charging the sidecar's bytes.

The byte counts here are checked against the original text itself (len(text.encode("utf-8")) per
document, or the pieces' own UTF-8 where the text needs no normalization), never against the
code that attributes them.
"""

import json
import lzma
import math
import random
import re
import sys
import unicodedata
from pathlib import Path

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


def test_train_gpt_knows_the_same_operators():
    assert T.CASEOPS_OPERATORS == caseops.OPERATORS
    assert all(unicodedata.category(op) == "Co" for op in caseops.OPERATORS)  # private use: never real text


# ----------------------------------------------------------------------------- build_shards --caseops and the byte sidecar

SYLLABLES = "ka lo mi ne ru sa ti vo pe da gu fi ho je ly zo ba".split()
WORDS = sorted({"".join(random.Random(n).choices(SYLLABLES, k=1 + n % 3)) for n in range(400)})  # enough pairs to merge into VOCAB pieces
ODD = ["Zürich", "ÉCOLE", "Straße", "ẞ", "İstanbul", "Ⱥb", "ΟΔΟΣ", "ﬁne", "½", "E\u0301cole", "\ue000", "😀", "Москва"]


def clean_document(rng: random.Random) -> str:
    """ASCII with single spaces: text the tokenizer's normalization leaves exactly as it is."""
    words = [rng.choice(WORDS) for _ in range(rng.randint(15, 40))]
    words = [w.title() if rng.random() < 0.2 else w.upper() if rng.random() < 0.05 else w for w in words]
    return " ".join(words) + "."


def odd_document(rng: random.Random) -> str:
    """Non-ASCII, operator characters, whitespace runs and ends that normalization collapses or drops."""
    words = [rng.choice(WORDS + ODD) for _ in range(rng.randint(15, 40))] + ["\ue000Escaped"]
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
        assert int(sidecar[part].sum()) == utf8(doc)
        assert sidecar[part][0] == 0  # BOS
    is_operator = np.isin(tokens, operator_ids)
    escaped = np.roll(tokens == sp.piece_to_id(ESCAPE), 1)  # the corpus escapes only TITLE characters of its text
    assert (sidecar[is_operator & ~escaped] == 0).all() and (is_operator & ~escaped).sum() > 50
    # an operator character that was text: its 3 bytes (and any leading whitespace of a document it opens)
    assert (sidecar[escaped] >= utf8(TITLE)).all() and escaped.sum() > 3


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
    pieces = sp.encode(f"{WORDS[0]}{TITLE} {WORDS[1]}", out_type=str)
    assert pieces.count(TITLE) == 1 and pieces[pieces.index(TITLE) + 1].startswith("\u2581")  # the operator never merges
    assert T.is_caseops_tokenizer(str(caseops_tokenizer(caseops_build)))


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
    assert [int(sidecar[s].sum()) for s in document_slices(tokens)] == [utf8(d) for d in docs]


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
    original_bytes = sum(utf8(d) for d in corpus[1][:VAL_DOCS])
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
    original_bytes = sum(utf8(d) for d in corpus[1][:VAL_DOCS])
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
    assert [int(sidecar[s].sum()) for s in document_slices(tokens)] == [utf8(d) for d in val_docs]
    env = smoke.training_env(steps=None, caseops_text=True)
    assert env["DATA_PATH"].endswith("fineweb10B_sp1024_caseops") and env["TOKENIZER_PATH"].endswith("_caseops.model")
    assert set(smoke.CASEOPS_ENV) <= {s.name for s in T.SETTINGS}
