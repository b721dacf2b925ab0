"""Tests of data/build_shards.py and data/smoke.py (CPU, no network, no ../shared data)."""

import gzip
import hashlib
import json
import lzma
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "data"))
import build_shards  # noqa: E402
import smoke  # noqa: E402
import train_gpt  # noqa: E402

VOCAB = 300
WORDS = ("the of and to in is was for on that with as by at from his her an which were are this be "
         "river mountain city station library garden harbor winter summer north south village bridge "
         "engine signal record market council school island forest valley castle tower museum").split()


def make_text(rng: random.Random) -> str:
    """A few ASCII sentences with digits, punctuation and line breaks.

    Lower case only: in a corpus this small, a character seen a few times (a capital letter) falls
    outside character_coverage 0.999, becomes <unk> and does not decode back."""
    sentences = []
    for _ in range(rng.randint(2, 6)):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 14))]
        sentences.append(" ".join(words) + f", in {rng.randint(1000, 2024)}.")
    return " ".join(sentences[:2]) + "\n" + " ".join(sentences[2:])


def normalized(text: str) -> str:
    """What nmt_nfkc makes of ASCII text: whitespace runs and newlines become one space, ends stripped."""
    return " ".join(text.split())


def write_jsonl(path: Path, texts: list[str], opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"id": i, "text": text}) + "\n")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[list[str], list[str]]:
    """(input arguments, documents in reading order) over .xz, .gz, plain JSONL and .txt files."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    texts = [make_text(rng) for _ in range(60)]
    write_jsonl(root / "a.jsonl.xz", texts[:20], lzma.open)
    write_jsonl(root / "b.jsonl.gz", texts[20:35], gzip.open)
    write_jsonl(root / "c.jsonl", texts[35:50])
    (root / "d.txt").write_text(texts[50])
    (root / "e.txt").write_text("\n@@\n".join(texts[51:]) + "\n@@\n")  # trailing separator: no empty document
    inputs = [str(root / n) for n in ("a.jsonl.xz", "b.jsonl.gz", "c.jsonl", "d.txt", "e.txt")]
    return inputs, texts


@pytest.fixture(scope="module")
def built(corpus, tmp_path_factory):
    """One build with a trained tokenizer, 2 workers and 3 documents per batch (many batches to reorder)."""
    inputs, _ = corpus
    out = tmp_path_factory.mktemp("out")
    argv = [*inputs, "--train-tokenizer", "--vocab-size", str(VOCAB), "--val-docs", "7",
            "--output-dir", str(out), "--workers", "2", "--txt-doc-separator", r"\n@@\n"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(build_shards, "DOCS_PER_BATCH", 3)
        assert build_shards.main(argv) == 0
    return out


def dataset_dir(out: Path) -> Path:
    return out / "datasets" / f"fineweb10B_sp{VOCAB}"


def split_tokens(out: Path, split: str) -> np.ndarray:
    files = sorted(dataset_dir(out).glob(f"fineweb_{split}_*.bin"))
    assert files, f"no {split} shards"
    return np.concatenate([train_gpt.load_data_shard(f) for f in files])


def documents_of(tokens: np.ndarray) -> list[np.ndarray]:
    starts = np.flatnonzero(tokens == train_gpt.BOS_ID)
    return [tokens[s + 1 : e] for s, e in zip(starts, [*starts[1:], tokens.size])]


def tokenizer(out: Path) -> spm.SentencePieceProcessor:
    return spm.SentencePieceProcessor(model_file=str(out / "tokenizers" / f"fineweb_{VOCAB}_bpe.model"))


def test_trained_tokenizer_follows_the_official_spec(built):
    sp = tokenizer(built)
    assert sp.vocab_size() == VOCAB
    assert (sp.pad_id(), sp.bos_id(), sp.eos_id(), sp.unk_id()) == (0, 1, 2, 3)
    assert all(len(p) == 1 for p in sp.encode("20245", out_type=str))  # split_digits
    assert not sp.encode("river", out_type=str)[0].startswith("\u2581")  # no dummy prefix
    assert sp.decode(sp.encode("ﬁve\tmen")) == "five men"  # nmt_nfkc: ligature unfolded, tab -> space


def test_shard_header_and_size(built):
    for path in dataset_dir(built).glob("fineweb_*.bin"):
        header = np.fromfile(path, dtype="<i4", count=256)
        assert (header[0], header[1]) == (20240520, 1)
        assert not header[3:].any()
        assert path.stat().st_size == 1024 + 2 * int(header[2])


def test_the_shards_record_the_tokenizer_that_made_them(built):
    record = json.loads((dataset_dir(built) / train_gpt.TOKENIZER_FINGERPRINT).read_text())
    model = built / "tokenizers" / f"fineweb_{VOCAB}_bpe.model"
    assert record == {"tokenizer": model.name, "tokenizer_sha256": train_gpt.file_sha256(model), "written_by": "data/build_shards.py"}
    assert train_gpt.tokenizer_mismatch(str(dataset_dir(built)), str(model)) is None


def test_split_by_val_docs_and_exact_tokens(built, corpus):
    _, texts = corpus
    sp = tokenizer(built)
    for split, docs in (("val", texts[:7]), ("train", texts[7:])):
        tokens = split_tokens(built, split)
        expected = np.concatenate([np.array([1] + sp.encode(t), dtype=np.uint16) for t in docs])
        assert tokens[0] == train_gpt.BOS_ID
        assert tokens.size == expected.size and np.array_equal(tokens, expected)  # order kept across workers


def test_val_documents_decode_to_the_original_texts(built, corpus):
    _, texts = corpus
    sp = tokenizer(built)
    decoded = [sp.decode(doc.tolist()) for doc in documents_of(split_tokens(built, "val"))]
    assert decoded == [normalized(t) for t in texts[:7]]


def test_txt_files_give_one_or_separated_documents(built, corpus):
    _, texts = corpus
    sp = tokenizer(built)
    decoded = [sp.decode(doc.tolist()) for doc in documents_of(split_tokens(built, "train"))]
    assert len(decoded) == len(texts) - 7  # d.txt = 1 document, e.txt = 9, no empty one after the last @@
    assert decoded[-10:] == [normalized(t) for t in texts[50:]]


def test_small_shards_cut_the_same_stream(built, corpus, tmp_path):
    inputs, _ = corpus
    model = built / "tokenizers" / f"fineweb_{VOCAB}_bpe.model"
    argv = [*inputs, "--tokenizer", str(model), "--val-docs", "7", "--output-dir", str(tmp_path),
            "--shard-tokens", "700", "--workers", "1", "--txt-doc-separator", r"\n@@\n"]
    assert build_shards.main(argv) == 0
    files = sorted(dataset_dir(tmp_path).glob("fineweb_train_*.bin"))
    sizes = [train_gpt.load_data_shard(f).size for f in files]
    assert len(files) > 2 and set(sizes[:-1]) == {700} and 0 < sizes[-1] <= 700
    assert np.array_equal(split_tokens(tmp_path, "train"), split_tokens(built, "train"))


def test_val_file_and_max_docs(built, corpus, tmp_path):
    inputs, _ = corpus
    model = built / "tokenizers" / f"fineweb_{VOCAB}_bpe.model"
    argv = [inputs[2], "--tokenizer", str(model), "--val-file", inputs[1], "--max-docs", "4",
            "--output-dir", str(tmp_path), "--workers", "1"]
    assert build_shards.main(argv) == 0
    assert len(documents_of(split_tokens(tmp_path, "val"))) == 15  # all of b.jsonl.gz
    assert len(documents_of(split_tokens(tmp_path, "train"))) == 4


def test_missing_input_is_a_one_line_error(tmp_path):
    script = REPO / "data" / "build_shards.py"
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "nope.jsonl"), "--train-tokenizer",
                             "--vocab-size", "300", "--val-docs", "1", "--output-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip() == f"build_shards: error: input not found: {tmp_path / 'nope.jsonl'}"


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"text": "fine"}', '{"body": "no text here"}'], 'bad.jsonl:2: no "text" field'),
        (['{"text": "fine"}', "not json"], "bad.jsonl:2: not valid JSON"),
        ([], "no validation documents"),
    ],
)
def test_bad_jsonl_is_a_one_line_error(tmp_path, capsys, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(line + "\n" for line in lines))
    argv = [str(path), "--train-tokenizer", "--vocab-size", "300", "--val-docs", "1", "--output-dir", str(tmp_path)]
    assert build_shards.main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("bad_line", [3, 20])  # in the validation split (--val-docs 5), in the training split
@pytest.mark.parametrize("tokenizer_option", ["train", "given"])
def test_a_lone_surrogate_is_refused_with_its_file_and_line(built, corpus, tmp_path, capsys, bad_line, tokenizer_option):
    """A JSON escape of half a surrogate pair ("\\ud800") is not Unicode: SentencePiece raised a bare traceback,
    while training the tokenizer or while encoding. Refused, naming the line, and no half dataset is left."""
    rng = random.Random(1)
    lines = [json.dumps({"text": make_text(rng)}) for _ in range(30)]
    lines[bad_line - 1] = '{"text": "a river \\ud800 in winter"}'
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines) + "\n")
    given = ["--tokenizer", str(built / "tokenizers" / f"fineweb_{VOCAB}_bpe.model")]
    # --tokenizer-train-docs 5: line 20 is read after the tokenizer is trained (line 3 while skipping the validation documents)
    option = ["--train-tokenizer", "--vocab-size", "60", "--tokenizer-train-docs", "5"] if tokenizer_option == "train" else given
    argv = [str(path), *option, "--val-docs", "5", "--output-dir", str(tmp_path / "out"), "--workers", "2"]
    assert build_shards.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after any progress line
    assert err.startswith(f"build_shards: error: {path}:{bad_line}: the text holds a lone surrogate ('\\ud800' at character 8"), err
    assert "repair or remove that document" in err
    assert not list((tmp_path / "out").glob("datasets/*/*")) and not list((tmp_path / "out").glob("tokenizers/*"))


def test_non_utf8_input_says_how_to_convert_it(tmp_path, capsys):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\u00e9 au lait".encode("latin-1"))
    argv = [str(path), "--train-tokenizer", "--vocab-size", "300", "--val-docs", "1", "--output-dir", str(tmp_path)]
    assert build_shards.main(argv) == 1
    err = capsys.readouterr().err
    assert f"{path}: not UTF-8 text" in err and "iconv -f latin1 -t utf-8" in err and err.count("\n") == 1


def test_a_truncated_xz_leaves_no_half_dataset(built, corpus, tmp_path, capsys):
    """The validation split used to stay on disk without its training split, which train_gpt.py then
    reported as missing official data."""
    good = Path(corpus[0][0]).read_bytes()
    truncated = tmp_path / "cut.jsonl.xz"
    truncated.write_bytes(good[: len(good) // 2])
    model = built / "tokenizers" / f"fineweb_{VOCAB}_bpe.model"
    argv = [str(truncated), "--tokenizer", str(model), "--val-docs", "2", "--output-dir", str(tmp_path), "--workers", "1"]
    assert build_shards.main(argv) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the validation split's progress line
    assert last.startswith(f"build_shards: error: {truncated}: the compressed file is truncated or corrupt") and "download or compress it again" in last
    assert list(dataset_dir(tmp_path).iterdir()) == []


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def official_layout(built: Path, out: Path, fingerprint: dict | None = None) -> dict[str, bytes]:
    """out/ as the official download leaves it (shards with no fingerprint of ours, the tokenizer); returns its files."""
    shards = out / "datasets" / f"fineweb10B_sp{VOCAB}"
    shards.mkdir(parents=True)
    for f in dataset_dir(built).glob("fineweb_*.bin"):
        (shards / f.name).write_bytes(f.read_bytes())
    if fingerprint is not None:
        (shards / train_gpt.TOKENIZER_FINGERPRINT).write_text(json.dumps(fingerprint))
    (out / "tokenizers").mkdir()
    (out / "tokenizers" / f"fineweb_{VOCAB}_bpe.model").write_bytes(b"the official tokenizer")
    (out / "manifest.json").write_text("{}")
    return snapshot(out)


@pytest.mark.parametrize("fingerprint", [None, {"tokenizer": "fineweb_300_bpe.model", "tokenizer_sha256": "ab" * 32,
                                                "written_by": "data/cached_challenge_fineweb.py"}])
def test_a_build_never_replaces_files_it_did_not_write(built, corpus, tmp_path, capsys, fingerprint):
    """--output-dir holding the official download: the shards used to be deleted and the tokenizer overwritten, exit 0."""
    inputs, _ = corpus
    out = tmp_path / "data"
    before = official_layout(built, out, fingerprint)
    model = built / "tokenizers" / f"fineweb_{VOCAB}_bpe.model"
    common = [*inputs, "--val-docs", "7", "--output-dir", str(out), "--workers", "1", "--txt-doc-separator", r"\n@@\n"]
    theirs = out / "tokenizers" / f"fineweb_{VOCAB}_bpe.model"
    for option, foreign in ((["--train-tokenizer", "--vocab-size", str(VOCAB)], f"{dataset_dir(out)} and {theirs} were"),
                            (["--tokenizer", str(model)], f"{dataset_dir(out)} was")):
        assert build_shards.main([*common, *option]) == 1
        err = capsys.readouterr().err
        assert err == (f"build_shards: error: {foreign} not written by build_shards.py (the official download, say) and this build would "
                       f"replace {'them' if ' and ' in foreign else 'it'}; give another --output-dir, or add --overwrite to replace "
                       f"{'them' if ' and ' in foreign else 'it'}\n")
        assert snapshot(out) == before, "nothing touched"
    assert build_shards.main([*common, "--train-tokenizer", "--vocab-size", str(VOCAB), "--overwrite"]) == 0
    assert np.array_equal(split_tokens(out, "train"), split_tokens(built, "train"))
    assert build_shards.main([*common, "--train-tokenizer", "--vocab-size", str(VOCAB)]) == 0, "its own earlier build it replaces"


def test_a_foreign_tokenizer_alone_is_refused_too(corpus, tmp_path, capsys):
    inputs, _ = corpus
    model = tmp_path / "tokenizers" / f"fineweb_{VOCAB}_bpe.model"
    model.parent.mkdir()
    model.write_bytes(b"someone else's tokenizer")
    assert build_shards.main([*inputs[:3], "--train-tokenizer", "--vocab-size", str(VOCAB), "--val-docs", "7", "--output-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"{model} was not written by build_shards.py" in err and err.count("\n") == 1
    assert model.read_bytes() == b"someone else's tokenizer" and not (tmp_path / "datasets").exists()


def test_vocab_too_large_for_uint16_is_an_error(corpus, tmp_path, capsys):
    inputs, _ = corpus
    argv = [inputs[2], "--train-tokenizer", "--vocab-size", "65537", "--val-docs", "1", "--output-dir", str(tmp_path)]
    assert build_shards.main(argv) == 1
    assert "--vocab-size must be in [5, 65536]" in capsys.readouterr().err
    assert not (tmp_path / "tokenizers").exists()


def test_val_docs_taking_the_whole_corpus_is_an_error(tmp_path, capsys):
    path = tmp_path / "two.jsonl"
    write_jsonl(path, ["one document", "another document"])
    argv = [str(path), "--train-tokenizer", "--vocab-size", "300", "--val-docs", "2", "--output-dir", str(tmp_path)]
    assert build_shards.main(argv) == 1
    assert "no training documents" in capsys.readouterr().err
    assert not (tmp_path / "datasets").exists()  # checked before anything is written


def test_smoke_corpus_is_real_english():
    val, train = smoke.smoke_corpus()
    text = "\n".join(val + train)
    assert len(text.encode("utf-8")) > 300_000
    assert len(val) + len(train) > 50 and len(val) >= 5
    words = text.lower().split()
    for common in ("the", "and", "is", "of", "to"):
        assert words.count(common) > 500, common
    assert all(doc.strip() for doc in val + train)


def test_smoke_prepare_only_writes_loadable_shards(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(smoke, "TOKENIZER_PATH", tmp_path / "tokenizers" / "fineweb_1024_bpe.model")
    monkeypatch.setattr(smoke, "DATASET_DIR", tmp_path / "datasets" / "fineweb10B_sp1024")
    monkeypatch.setattr(smoke, "BUILD_INFO", tmp_path / "build_info.json")
    assert smoke.main(["--prepare-only"]) == 0
    val = train_gpt.load_data_shard(smoke.DATASET_DIR / "fineweb_val_000000.bin")
    train = train_gpt.load_data_shard(smoke.DATASET_DIR / "fineweb_train_000000.bin")
    assert val[0] == train[0] == train_gpt.BOS_ID
    assert 20_000 <= val.size <= 40_000 and train.size > 200_000
    assert int(max(val.max(), train.max())) < 1024
    mtime = smoke.BUILD_INFO.stat().st_mtime_ns
    assert smoke.main(["--prepare-only"]) == 0  # second time: data reused, not rebuilt
    assert smoke.BUILD_INFO.stat().st_mtime_ns == mtime
    assert "using the existing data" in capsys.readouterr().err


def test_smoke_env_precedence(monkeypatch):
    monkeypatch.setenv("MODEL_DIM", "96")
    monkeypatch.setenv("ITERATIONS", "7")
    env = smoke.training_env(steps=None)
    assert env["MODEL_DIM"] == "96" and env["ITERATIONS"] == "7" and env["NUM_LAYERS"] == smoke.SMOKE_ENV["NUM_LAYERS"]
    assert smoke.training_env(steps=3)["ITERATIONS"] == "3"  # --steps wins over the environment


def test_smoke_env_names_are_train_gpt_settings():
    known = {s.name for s in train_gpt.SETTINGS}
    assert set(smoke.SMOKE_ENV) <= known, set(smoke.SMOKE_ENV) - known


# ----------------------------------------------------------------------------- the official documents and the record's CaseOps data


def test_the_official_validation_documents_are_never_trained_on(tmp_path, capsys):
    """docs_selected.jsonl's first 50,000 documents are the validation set: a smaller --val-docs (the record's
    prepare_caseops_data.py defaults to 10,000) or another validation file would train on them."""
    path = tmp_path / "docs_selected.jsonl"
    write_jsonl(path, ["one document", "another document", "a third"])
    for extra in (["--val-docs", "10000"], ["--val-file", str(path)]):
        argv = [str(path), "--train-tokenizer", "--vocab-size", "300", "--output-dir", str(tmp_path / "out"), *extra]
        assert build_shards.main(argv) == 1
        err = capsys.readouterr().err
        assert "first 50,000 documents are the official validation set" in err and "--val-docs 50000" in err and err.count("\n") == 1
        assert not (tmp_path / "out").exists()
    args = build_shards.build_parser().parse_args([str(path), "--train-tokenizer", "--vocab-size", "300", "--output-dir", "x", "--val-docs", "50000"])
    build_shards.check_official_validation(args)  # accepted
    args.inputs, args.val_docs = [str(tmp_path / "other.jsonl")], 1
    build_shards.check_official_validation(args)  # any other corpus: any split


@pytest.mark.parametrize("tokenizer, caseops, folder, beside", [
    ("fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model", True, "fineweb10B_sp8192_lossless_caps_caseops_v1_reserved", True),  # the record's
    ("fineweb_1024_bpe_caseops.model", True, "fineweb10B_sp1024_caseops", True),  # trained here with --caseops
    ("my_caseops.model", True, "fineweb10B_sp1024_caseops", False),
    ("fineweb_1024_bpe.model", False, "fineweb10B_sp1024", True),
    ("fineweb_1024_bpe_custom.model", False, "fineweb10B_sp1024", False),
])
def test_dataset_folder_follows_the_tokenizer(tokenizer, caseops, folder, beside):
    vocab = int(folder.removeprefix("fineweb10B_sp").split("_")[0])
    assert build_shards.dataset_name(Path(tokenizer), vocab, caseops) == folder
    found = train_gpt.tokenizer_beside(str(Path("root") / "datasets" / folder))  # what train_gpt.py takes from DATA_PATH alone
    assert (found == str(Path("root") / "tokenizers" / tokenizer)) == beside


def test_plain_sp8192_is_one_setting_away():
    plain = train_gpt.Hyperparameters({"DATA_PATH": "./data/datasets/fineweb10B_sp8192"})
    assert plain.tokenizer_path == "data/tokenizers/fineweb_8192_bpe.model"
    assert train_gpt.Hyperparameters({"DATA_PATH": "/d/mine", "TOKENIZER_PATH": "/t/x.model"}).tokenizer_path == "/t/x.model"
    with pytest.raises(train_gpt.DataError, match="TOKENIZER_PATH is empty"):
        train_gpt.load_tokenizer_tables(train_gpt.Hyperparameters({"DATA_PATH": "/d/mine"}).tokenizer_path, 8192)


import cached_challenge_fineweb as downloader  # noqa: E402

CASEOPS_REPO = "romeerp/parameter-golf-caseops-v1"
CASEOPS_TOKENIZER = "tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
RECORD_TOKENIZER = REPO.parent / "shared" / "fixtures" / "record_1855" / "tokenizers" / "fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"


def shard(n: int) -> bytes:
    header = np.zeros(256, dtype="<i4")
    header[:3] = (20240520, 1, n)
    return header.tobytes() + np.arange(n, dtype="<u2").tobytes()


def caseops_hub(root: Path, tokenizer: bytes, docs: bytes) -> Path:
    """A folder laid out like the hub: the CaseOps dataset (a manifest with counts only) and the official documents."""
    name = "fineweb10B_" + downloader.CASEOPS_VARIANT
    caseops = {f"datasets/{name}/fineweb_val_000000.bin": shard(30), f"datasets/{name}/fineweb_val_bytes_000000.bin": shard(30),
               f"datasets/{name}/fineweb_train_000000.bin": shard(40), CASEOPS_TOKENIZER: tokenizer,
               "manifest.json": json.dumps({"datasets": [{"name": name, "tokenizer_name": "caseops", "stats": {"files_train": 1, "files_val": 1}}],
                                            "tokenizers": [{"name": "caseops", "model_path": CASEOPS_TOKENIZER}]}).encode()}
    for repo, files in ((CASEOPS_REPO, caseops), (downloader.DEFAULT_REPO, {"docs_selected.jsonl": docs})):
        for rel, data in files.items():
            path = root / "datasets" / repo / "resolve" / "main" / "datasets" / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    return root


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    for name in ("MATCHED_FINEWEB_REPO_ID", "MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", "HF_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    tokenizer, docs = b"the record's tokenizer", b'{"text": "a document"}\n'
    monkeypatch.setattr(downloader, "PINNED_SHA256", {CASEOPS_TOKENIZER: hashlib.sha256(tokenizer).hexdigest()})
    monkeypatch.setenv("HF_ENDPOINT", str(caseops_hub(tmp_path / "hub", tokenizer, docs)))
    return tmp_path / "hub", tokenizer, docs


def test_download_the_records_tokenizer_and_the_official_documents(fake_hub, tmp_path):
    hub, tokenizer, docs = fake_hub
    out = tmp_path / "data"
    args = ["--variant", downloader.CASEOPS_VARIANT, "--output-dir", str(out)]
    assert downloader.main([*args, "--tokenizer-only", "--with-docs"]) == 0
    assert (out / CASEOPS_TOKENIZER).read_bytes() == tokenizer and (out / "docs_selected.jsonl").read_bytes() == docs
    assert not (out / "datasets").exists()  # no shards: build_shards.py makes them
    assert downloader.main([*args, "--train-shards", "1"]) == 0  # or the record's published shards, sidecar included
    folder = out / "datasets" / ("fineweb10B_" + downloader.CASEOPS_VARIANT)
    assert sorted(p.name for p in folder.iterdir()) == ["fineweb_train_000000.bin", "fineweb_val_000000.bin", "fineweb_val_bytes_000000.bin", "tokenizer_fingerprint.json"]


def test_a_tokenizer_that_is_not_the_records_is_refused(fake_hub, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(downloader, "PINNED_SHA256", {CASEOPS_TOKENIZER: "0" * 64})
    out = tmp_path / "data"
    assert downloader.main(["--variant", downloader.CASEOPS_VARIANT, "--output-dir", str(out), "--tokenizer-only"]) == 1
    err = capsys.readouterr().err
    assert "not " + "0" * 64 + " (the record's)" in err and err.count("\n") == 1
    assert not (out / CASEOPS_TOKENIZER).exists() and not list(out.rglob("*.part"))


def test_the_pinned_sha256_is_the_records_tokenizer():
    if not RECORD_TOKENIZER.is_file():
        pytest.skip("../shared/fixtures/record_1855 is not beside the repository")
    assert downloader.PINNED_SHA256[CASEOPS_TOKENIZER] == hashlib.sha256(RECORD_TOKENIZER.read_bytes()).hexdigest()
    assert build_shards.dataset_name(RECORD_TOKENIZER, 8192, True) == "fineweb10B_" + downloader.CASEOPS_VARIANT
    assert train_gpt.Hyperparameters({}).data_path.endswith("fineweb10B_" + downloader.CASEOPS_VARIANT)
