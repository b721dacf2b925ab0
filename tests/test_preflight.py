"""No paid run lost: the preflight finds bad input before the first step (all problems at once, one
line each), a failed artifact write keeps the trained weights and prints the command that finishes
the run, and every error or signal ends the log with its reason and a distinct exit code."""

import errno
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import train_gpt
from conftest import REPO, SP1024, TINY, Recorder, clean_env, mark_synthetic, synthetic_stream, tiny_args, tiny_model, train_tiny_tokenizer

sys.path.insert(0, str(REPO / "data"))
import build_shards  # noqa: E402


def run_args(tmp_path, data, tokenizer, **overrides) -> train_gpt.Hyperparameters:
    """A tiny run on `data` that writes into tmp_path (3 steps, no TTT, 600 validation tokens)."""
    run = dict(LOG_DIR=tmp_path / "logs", ARTIFACT_PATH=tmp_path / "out" / "model.pgz", ITERATIONS=3, TRAIN_LOG_EVERY=0, VAL_MAX_TOKENS=600, TTT_ENABLED=0)
    return tiny_args(DATA_PATH=data, TOKENIZER_PATH=tokenizer, **{**run, **overrides})


def preflight_problems(args, rt=None) -> list[str]:
    """The preflight's problem lines (empty when it passes)."""
    artifact = Path(args.eval_only or args.artifact_path)
    try:
        train_gpt.preflight(args, rt or train_gpt.Runtime(), artifact, Recorder())
    except train_gpt.DataError as e:
        return str(e).splitlines()
    return []


def script_env(tmp_path, data, tokenizer, **extra) -> dict:
    env = {**TINY, "DATA_PATH": data, "TOKENIZER_PATH": tokenizer, "LOG_DIR": tmp_path / "logs", "RUN_ID": "run", "ITERATIONS": 3,
           "TRAIN_LOG_EVERY": 0, "VAL_MAX_TOKENS": 600, "TTT_ENABLED": 0, "ARTIFACT_PATH": tmp_path / "out" / "model.pgz"}
    return clean_env(**{**env, **extra})


def run_script(env: dict, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "train_gpt.py")], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture
def small_disk(tmp_path):
    """(folder, real): a 256 KiB tmpfs where this machine allows mounting (root outside most CI
    containers); otherwise a plain folder, and the tests simulate the full disk with an OSError."""
    folder = tmp_path / "small_disk"
    folder.mkdir()
    try:
        real = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)], capture_output=True).returncode == 0
    except OSError:  # no mount command
        real = False
    yield folder, real
    if real:
        subprocess.run(["umount", str(folder)], check=True)


def fill_disk(folder: Path):
    """Write zeros into folder/filler until its filesystem is full."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, bytes(65536))
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# ----------------------------------------------------------------------------- the preflight, one case each


def test_a_clean_setup_passes_the_preflight(tmp_path, synthetic_data, tiny_tokenizer):
    log = Recorder()
    args = run_args(tmp_path, synthetic_data, tiny_tokenizer)
    train_gpt.preflight(args, train_gpt.Runtime(), Path(args.artifact_path), log)
    assert log.lines and log.lines[-1].startswith("preflight: 2 shards")


def test_a_truncated_later_train_shard_is_found_before_training(tmp_path, synthetic_data, tiny_tokenizer):
    """It used to kill the run when the loader reached it (after 14 steps of a real run)."""
    first = synthetic_data / "fineweb_train_000000.bin"
    second = synthetic_data / "fineweb_train_000001.bin"
    second.write_bytes(first.read_bytes()[:-100])
    problems = preflight_problems(run_args(tmp_path, synthetic_data, tiny_tokenizer))
    assert len(problems) == 1 and str(second) in problems[0] and "re-download or re-create it" in problems[0], problems


def test_train_token_ids_outside_the_vocabulary_are_found_before_training(tmp_path, synthetic_data, tiny_tokenizer):
    """They used to raise an IndexError in the embedding (a device-side assert on a GPU)."""
    bad = synthetic_data / "fineweb_train_000001.bin"
    train_gpt.write_data_shard(bad, np.array([1, 5, 64, 9], dtype=np.uint16))
    problems = preflight_problems(run_args(tmp_path, synthetic_data, tiny_tokenizer))
    assert len(problems) == 1 and str(bad) in problems[0] and "token id 64 >= VOCAB_SIZE=64" in problems[0], problems


def test_every_shard_is_checked_with_the_work_split_between_ranks(tmp_path, synthetic_data, tiny_tokenizer):
    """Each rank reads its share of the shards: together the ranks find every bad one."""
    for i in (1, 2, 3):
        train_gpt.write_data_shard(synthetic_data / f"fineweb_train_{i:06d}.bin", np.array([1, 5, 100 + i], dtype=np.uint16))
    args = run_args(tmp_path, synthetic_data, tiny_tokenizer)
    found = [preflight_problems(args, train_gpt.Runtime(rank=r, world_size=2)) for r in (0, 1)]
    assert all(found), "each rank must have bad shards in its share"
    assert sorted(p.split(":")[0] for p in found[0] + found[1]) == [str(synthetic_data / f"fineweb_train_{i:06d}.bin") for i in (1, 2, 3)]


def test_a_file_that_is_not_a_sentencepiece_model_is_a_problem_not_a_traceback(tmp_path, synthetic_data):
    vocab_file = tmp_path / "tokenizer.vocab"
    vocab_file.write_text("<pad>\t0\n<s>\t0\n")
    problems = preflight_problems(run_args(tmp_path, synthetic_data, vocab_file))
    assert problems == [f"TOKENIZER_PATH={vocab_file} is not a SentencePiece model; point it at the .model file the shards were made with"]


def test_a_tokenizer_of_another_size_is_a_problem(tmp_path, synthetic_data):
    other = train_tiny_tokenizer(tmp_path / "tok96.model", vocab=96)
    problems = preflight_problems(run_args(tmp_path, synthetic_data, other))
    assert len(problems) == 1 and "tokenizer has 96 pieces but VOCAB_SIZE=64" in problems[0]


def test_shards_made_with_another_tokenizer_of_the_same_size_are_refused(tmp_path):
    """build_shards.py records the tokenizer's fingerprint; without one (the official shards) the text tells."""
    import random

    maker, other = train_tiny_tokenizer(tmp_path / "a.model", seed=0), train_tiny_tokenizer(tmp_path / "b.model", seed=1)
    data = tmp_path / "data"
    rng = random.Random(0)  # phrases of the maker's own words, as train_tiny_tokenizer makes them: it merges them into long pieces
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 6))) for _ in range(30)]
    docs = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(40)]
    build_shards.write_dataset(docs[:10], docs[10:], maker, data)
    assert preflight_problems(run_args(tmp_path, data, maker)) == []
    problems = preflight_problems(run_args(tmp_path, data, other))
    assert len(problems) == 1 and "made with the tokenizer a.model" in problems[0] and f"TOKENIZER_PATH={other}" in problems[0], problems
    (data / train_gpt.TOKENIZER_FINGERPRINT).unlink()  # as the official shards: nothing recorded, the text tells
    assert preflight_problems(run_args(tmp_path, data, maker)) == []
    problems = preflight_problems(run_args(tmp_path, data, other))
    assert len(problems) == 1 and problems[0].startswith(f"the shards in DATA_PATH={data} were made with another tokenizer ("), problems
    assert problems[0].endswith(f"not TOKENIZER_PATH={other}; use TOKENIZER_PATH={maker} VOCAB_SIZE=64"), "it names the one beside it that fits"


SHARED = REPO.parent / "shared" / "data"


def official_layout(root: Path, vocab: int, texts: list[str]) -> Path:
    """root/datasets/fineweb10B_sp{vocab} with no fingerprint (as the official download before it wrote one) beside
    root/tokenizers/ holding both official tokenizers; returns the dataset folder."""
    import sentencepiece as spm

    (root / "tokenizers").mkdir(parents=True, exist_ok=True)
    for v in (1024, 8192):
        (root / "tokenizers" / f"fineweb_{v}_bpe.model").write_bytes((SHARED / "tokenizers" / f"fineweb_{v}_bpe.model").read_bytes())
    sp = spm.SentencePieceProcessor(model_file=str(root / "tokenizers" / f"fineweb_{vocab}_bpe.model"))
    data = root / "datasets" / f"fineweb10B_sp{vocab}"
    data.mkdir(parents=True)
    stream = np.concatenate([np.array([train_gpt.BOS_ID, *sp.encode(t)], dtype=np.uint16) for t in texts])
    for split in ("val", "train"):
        train_gpt.write_data_shard(data / f"fineweb_{split}_000000.bin", stream)
    return data


@pytest.fixture(scope="module")
def wiki_texts() -> list[str]:
    """Wikipedia articles cut into paragraphs (FineWeb documents are short web pages)."""
    import json
    import lzma

    if not (SHARED / "wiki_small" / "val.jsonl.xz").is_file() or not (SHARED / "tokenizers" / "fineweb_8192_bpe.model").is_file():
        pytest.skip("../shared/data is not beside the repository")
    with lzma.open(SHARED / "wiki_small" / "val.jsonl.xz", "rt") as f:
        articles = [json.loads(line)["text"] for line in f]
    return [p for a in articles for p in a.split("\n\n") if p.strip()][:400]


def test_official_shards_without_a_fingerprint_refuse_another_official_tokenizer(tmp_path, wiki_texts):
    """sp1024 shards (no byte fallback: <unk> in many documents) with the sp8192 tokenizer and VOCAB_SIZE=8192 passed every
    check and scored with the wrong byte table; sp8192 shards (byte fallback) with their own tokenizer pass."""
    sp1024 = official_layout(tmp_path, 1024, wiki_texts)
    tokenizers = tmp_path / "tokenizers"
    assert preflight_problems(run_args(tmp_path, sp1024, tokenizers / "fineweb_1024_bpe.model", VOCAB_SIZE=1024)) == []
    problems = preflight_problems(run_args(tmp_path, sp1024, tokenizers / "fineweb_8192_bpe.model", VOCAB_SIZE=8192))
    assert problems == [
        f"the shards in DATA_PATH={sp1024} were made with another tokenizer (decoded with this one and encoded again, 0% of the first "
        f"validation tokens come back), not TOKENIZER_PATH={tokenizers / 'fineweb_8192_bpe.model'}; use "
        f"TOKENIZER_PATH={tokenizers.resolve() / 'fineweb_1024_bpe.model'} VOCAB_SIZE=1024"]
    sp8192 = official_layout(tmp_path / "b", 8192, wiki_texts)
    assert preflight_problems(run_args(tmp_path, sp8192, tmp_path / "b" / "tokenizers" / "fineweb_8192_bpe.model", VOCAB_SIZE=8192)) == []
    assert train_gpt.reencoded_share(str(sp8192), str(tmp_path / "b" / "tokenizers" / "fineweb_8192_bpe.model")) == 1.0


def test_the_refusal_is_the_logs_last_line_before_anything_is_built(tmp_path, wiki_texts):
    data = official_layout(tmp_path, 1024, wiki_texts[:40])
    env = script_env(tmp_path, data, tmp_path / "tokenizers" / "fineweb_8192_bpe.model", VOCAB_SIZE=8192)
    done = run_script(env, tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    log = (tmp_path / "logs" / "run.txt").read_text().splitlines()
    assert log[-1].startswith("error: the shards in DATA_PATH=") and log[-1].endswith("fineweb_1024_bpe.model VOCAB_SIZE=1024")
    assert not any(line.startswith(("model_params", "step:", "bpb_bytes")) for line in log)


@pytest.fixture(scope="module")
def caseops_build(tmp_path_factory) -> Path:
    """out/caseops: CaseOps shards with byte sidecars and their tokenizer; out/plain: a plain tokenizer of the same size."""
    import random

    out = tmp_path_factory.mktemp("caseops")
    rng = random.Random(0)
    words = "the river City north Station NASA market Engine of and to in".split()
    corpus = out / "corpus.jsonl"
    corpus.write_text("".join('{"text": "%s"}\n' % " ".join(rng.choice(words) for _ in range(40)) for _ in range(200)))
    for flags, name in ((["--caseops"], "caseops"), ([], "plain")):
        assert build_shards.main([str(corpus), *flags, "--train-tokenizer", "--vocab-size", "120", "--val-docs", "20",
                                  "--output-dir", str(out / name), "--workers", "1"]) == 0
    return out


def caseops_dataset(root: Path) -> tuple[Path, int]:
    """The CaseOps shard folder under `root` and its vocabulary (the trainer may give fewer pieces than asked)."""
    folder = next((root / "datasets").glob("fineweb10B_sp*_caseops"))
    return folder, int(folder.name.removeprefix("fineweb10B_sp").removesuffix("_caseops"))


def caseops_copy(caseops_build: Path, tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    for f in caseops_dataset(caseops_build / "caseops")[0].iterdir():
        (data / f.name).write_bytes(f.read_bytes())
    return data


CASEOPS_TOKENIZER = Path("caseops") / "tokenizers" / "fineweb_120_bpe_caseops.model"


def test_caseops_shards_without_a_fingerprint_take_only_their_tokenizer(tmp_path, caseops_build):
    """The operators are pieces of their own and the sidecars beside the shards change nothing: the CaseOps tokenizer
    gives the text back; a plain tokenizer of the same size does not."""
    import shutil

    shutil.copytree(caseops_build / "caseops", tmp_path / "caseops")  # the official layout: datasets/ beside tokenizers/
    data, vocab = caseops_dataset(tmp_path / "caseops")
    (data / train_gpt.TOKENIZER_FINGERPRINT).unlink()
    caseops = tmp_path / CASEOPS_TOKENIZER
    assert train_gpt.reencoded_share(str(data), str(caseops)) == 1.0
    assert train_gpt.tokenizer_mismatch(str(data), str(caseops)) is None
    problem = train_gpt.tokenizer_mismatch(str(data), str(caseops_build / "plain" / "tokenizers" / "fineweb_120_bpe.model"))
    assert problem is not None and problem.endswith(f"use TOKENIZER_PATH={caseops.resolve()} VOCAB_SIZE={vocab}")


@pytest.mark.parametrize("zeroed", ["all", "most"])
def test_sidecars_that_charge_no_bytes_stop_the_run_before_training(tmp_path, caseops_build, zeroed):
    """All-zero sidecars passed every check and the run died after training dividing by zero bytes; sidecars that
    charge far fewer bytes than the pieces spell (most tokens 0) do not describe these shards either."""
    data, vocab = caseops_copy(caseops_build, tmp_path), caseops_dataset(caseops_build / "caseops")[1]
    tokenizer = str(caseops_build / CASEOPS_TOKENIZER)
    tables = train_gpt.load_tokenizer_tables(tokenizer, vocab)
    val = train_gpt.load_validation_tokens(str(data), vocab)
    assert train_gpt.attach_byte_sidecar(tables, val, str(data), tokenizer).sidecar_bytes is not None  # the real ones pass
    sidecar = data / "fineweb_val_bytes_000000.bin"
    counts = train_gpt.load_data_shard(sidecar).copy()
    if zeroed == "all":
        counts[:] = 0
    else:
        counts[np.flatnonzero(counts)[: int(0.7 * np.count_nonzero(counts))]] = 0
    train_gpt.write_data_shard(sidecar, counts)
    with pytest.raises(train_gpt.DataError) as info:
        train_gpt.attach_byte_sidecar(tables, val, str(data), tokenizer)
    message = str(info.value)
    assert message.startswith(f"the byte sidecars in DATA_PATH={data} charge {int(counts.sum())} bytes to validation tokens whose pieces spell ")
    assert message.endswith("rebuild the data with `python3 data/build_shards.py ... --caseops`") and "\n" not in message
    log = Recorder()
    args = run_args(tmp_path, data, tokenizer, VOCAB_SIZE=vocab, VAL_MAX_TOKENS=0)
    with pytest.raises(train_gpt.DataError, match="charge"):
        train_gpt.run(args, train_gpt.Runtime(), "zero", log)
    assert not any(line.startswith(("model_params", "step:")) for line in log.lines)


def test_synthetic_token_ids_say_so_in_their_fingerprint(tmp_path, sp1024):
    """Test shards of made-up ids are no text any tokenizer gives back; a fingerprint with a null sha256 says no
    tokenizer made them, the one way past the check (conftest's synthetic_data writes it)."""
    data = tmp_path / "data"
    data.mkdir()
    for split, seed in (("train", 1), ("val", 2)):
        train_gpt.write_data_shard(data / f"fineweb_{split}_000000.bin", synthetic_stream(30, vocab=1024, seed=seed))
    args = run_args(tmp_path, data, SP1024, VOCAB_SIZE=1024)
    problems = preflight_problems(args)
    assert len(problems) == 1 and "were made with another tokenizer" in problems[0] and "the TOKENIZER_PATH and VOCAB_SIZE that made them" in problems[0]
    mark_synthetic(data)
    assert preflight_problems(args) == []


def test_an_unusable_log_dir_is_a_problem(tmp_path, synthetic_data, tiny_tokenizer):
    log_dir = tmp_path / "a_file"
    log_dir.write_text("")
    problems = preflight_problems(run_args(tmp_path, synthetic_data, tiny_tokenizer, LOG_DIR=log_dir))
    assert problems == [f"LOG_DIR: cannot create or write the folder {log_dir} (File exists); set LOG_DIR to a writable place"]
    assert train_gpt.Logger(log_dir / "run.txt").file is None  # the log goes to the console only, instead of a traceback


def test_an_artifact_path_that_is_a_folder_is_a_problem(tmp_path, synthetic_data, tiny_tokenizer):
    folder = tmp_path / "out"
    folder.mkdir()
    problems = preflight_problems(run_args(tmp_path, synthetic_data, tiny_tokenizer, ARTIFACT_PATH=folder))
    assert problems == [f"ARTIFACT_PATH={folder} is a folder; give a file name such as {folder / 'model.pgz'}"]


def test_a_disk_without_room_for_the_artifact_is_a_problem(tmp_path, synthetic_data, tiny_tokenizer, small_disk, monkeypatch):
    folder, real = small_disk
    if not real:
        monkeypatch.setattr(train_gpt.shutil, "disk_usage", lambda path: SimpleNamespace(free=256 * 1024))
    args = run_args(tmp_path, synthetic_data, tiny_tokenizer, ARTIFACT_PATH=folder / "model.pgz")
    room = args.size_cap_bytes  # an artifact may take up to the whole cap
    assert preflight_problems(args) == [
        f"ARTIFACT_PATH: 262144 bytes free in {folder}, but the artifact may take {room}; free space or set ARTIFACT_PATH to another disk"
    ]
    assert preflight_problems(run_args(tmp_path, synthetic_data, tiny_tokenizer, ARTIFACT_PATH=folder / "model.pgz", SIZE_CAP_BYTES=200_000)) == []


def test_a_compressor_that_is_not_installed_is_a_problem(tmp_path, synthetic_data, tiny_tokenizer, monkeypatch):
    find_spec = train_gpt.importlib.util.find_spec
    monkeypatch.setattr(train_gpt.importlib.util, "find_spec", lambda name, *a: None if name == "zstandard" else find_spec(name, *a))
    problems = preflight_problems(run_args(tmp_path, synthetic_data, tiny_tokenizer, ARTIFACT_COMPRESSOR="zstd"))
    assert problems == ["ARTIFACT_COMPRESSOR=zstd needs the zstandard module: pip install zstandard"]
    assert preflight_problems(run_args(tmp_path, synthetic_data, tiny_tokenizer, ARTIFACT_COMPRESSOR="lzma")) == []
    assert preflight_problems(run_args(tmp_path, synthetic_data, tiny_tokenizer, ARTIFACT_COMPRESSOR="auto")) == [], "auto takes what is installed"


def test_every_problem_is_reported_at_once_one_line_each(tmp_path, synthetic_data):
    (synthetic_data / "fineweb_train_000001.bin").write_bytes(b"\0" * 10)
    train_gpt.write_data_shard(synthetic_data / "fineweb_val_000001.bin", np.array([1, 70], dtype=np.uint16))
    (tmp_path / "out").mkdir()
    args = run_args(tmp_path, synthetic_data, tmp_path / "missing.model", ARTIFACT_PATH=tmp_path / "out", LOG_DIR=REPO / "README.md" / "logs")
    problems = preflight_problems(args)
    assert len(problems) == 5, problems
    for words in ("fineweb_train_000001.bin: 10 bytes", "fineweb_val_000001.bin: token id 70", "tokenizer not found", "LOG_DIR", "ARTIFACT_PATH"):
        assert sum(words in p for p in problems) == 1, (words, problems)


def test_a_bad_shard_stops_the_script_before_training_with_the_reason_in_the_log(tmp_path, synthetic_data, tiny_tokenizer):
    (synthetic_data / "fineweb_train_000001.bin").write_bytes((synthetic_data / "fineweb_train_000000.bin").read_bytes()[:-2])
    done = run_script(script_env(tmp_path, synthetic_data, tiny_tokenizer), tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("error: ") and "fineweb_train_000001.bin" in done.stderr
    log = (tmp_path / "logs" / "run.txt").read_text().splitlines()
    assert log[-1] == done.stderr.strip(), "the reason must be the log's last line"
    assert not any(line.startswith(("model_params", "step:")) for line in log), "nothing may be built or trained"


def test_every_rank_stops_when_another_rank_finds_a_problem(tmp_path, synthetic_data, tiny_tokenizer):
    """2 CPU processes under torchrun: the bad shard is in rank 1's share, rank 0 logs it, both exit before training."""
    train_gpt.write_data_shard(synthetic_data / "fineweb_train_000001.bin", np.array([1, 5, 99], dtype=np.uint16))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(REPO / "train_gpt.py")]
    done = subprocess.run(command, env=script_env(tmp_path, synthetic_data, tiny_tokenizer), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    log = (tmp_path / "logs" / "run.txt").read_text().splitlines()
    assert log[-1].startswith("error: ") and "fineweb_train_000001.bin: token id 99 >= VOCAB_SIZE=64" in log[-1]
    assert not any(line.startswith(("model_params", "step:")) for line in log)


# ----------------------------------------------------------------------------- EVAL_ONLY and QUANTIZE_ONLY inputs


def write_tiny_artifact(path, **overrides) -> Path:
    model = tiny_model(**overrides)
    args = tiny_args(**overrides)
    train_gpt.write_artifact(train_gpt.quantize_state_dict(model.state_dict(), args, None), model.cfg, args, path, 0, lambda line: None)
    return path


@pytest.mark.parametrize("vocab", [32, 128])
def test_eval_only_refuses_an_artifact_of_another_vocabulary(tmp_path, synthetic_data, tiny_tokenizer, vocab):
    """A larger vocabulary used to be scored anyway (a wrong number), a smaller one to crash with an IndexError."""
    artifact = write_tiny_artifact(tmp_path / f"v{vocab}.pgz", VOCAB_SIZE=vocab)
    problems = preflight_problems(run_args(tmp_path, synthetic_data, tiny_tokenizer, EVAL_ONLY=artifact))
    assert problems == [
        f"EVAL_ONLY={artifact} holds a model of vocabulary {vocab}, but VOCAB_SIZE=64 (the data and tokenizer); "
        "score it with the VOCAB_SIZE, DATA_PATH and TOKENIZER_PATH it was trained with"
    ]
    good = write_tiny_artifact(tmp_path / "v64.pgz")
    assert preflight_problems(run_args(tmp_path, synthetic_data, tiny_tokenizer, EVAL_ONLY=good)) == []


def test_eval_only_refuses_an_artifact_whose_tensors_do_not_fit_its_config(tmp_path, synthetic_data, tiny_tokenizer):
    narrow, wide = tiny_model(MLP_MULT=2), tiny_model(MLP_MULT=3)
    blob, _ = train_gpt.encode_artifact(train_gpt.quantize_state_dict(narrow.state_dict(), tiny_args(), None), wide.cfg, train_gpt.Packing.from_args(tiny_args()))
    artifact = tmp_path / "mixed.pgz"
    artifact.write_bytes(blob)
    problems = preflight_problems(run_args(tmp_path, synthetic_data, tiny_tokenizer, EVAL_ONLY=artifact))
    assert len(problems) == 1 and "its tensors do not fit the model its config describes" in problems[0] and "mlp.fc.weight" in problems[0]


def test_quantize_only_refuses_weights_of_another_model(tmp_path, synthetic_data, tiny_tokenizer):
    weights = tmp_path / "w.pt"
    torch.save(tiny_model(MLP_MULT=3).state_dict(), weights)
    problems = preflight_problems(run_args(tmp_path, synthetic_data, tiny_tokenizer, QUANTIZE_ONLY=weights))
    assert len(problems) == 1 and problems[0].startswith(f"QUANTIZE_ONLY={weights} cannot be loaded into the model these settings build")
    assert preflight_problems(run_args(tmp_path, synthetic_data, tiny_tokenizer, QUANTIZE_ONLY=weights, MLP_MULT=3)) == []
    missing = preflight_problems(run_args(tmp_path, synthetic_data, tiny_tokenizer, QUANTIZE_ONLY=tmp_path / "none.pt"))
    assert len(missing) == 1 and "No such file" in missing[0]
    with pytest.raises(train_gpt.SettingsError, match="EVAL_ONLY"):
        tiny_args(QUANTIZE_ONLY=weights, EVAL_ONLY=tmp_path / "a.pgz")


# ----------------------------------------------------------------------------- writes that fail


def test_write_atomic_leaves_no_temporary_file_when_the_disk_is_full(small_disk, monkeypatch):
    folder, real = small_disk
    if not real:
        monkeypatch.setattr(train_gpt.os, "fsync", disk_full)  # the data is written, then the flush to disk fails
    with pytest.raises(OSError) as info:
        train_gpt.write_atomic(folder / "model.pgz", bytes(1_000_000))
    assert info.value.errno == errno.ENOSPC
    assert list(folder.iterdir()) == [], "a partial temporary file would fill the disk further"


def test_write_atomic_onto_a_folder_leaves_no_temporary_file(tmp_path):
    (tmp_path / "model.pgz").mkdir()
    with pytest.raises(OSError):
        train_gpt.write_atomic(tmp_path / "model.pgz", b"data")
    assert [p.name for p in tmp_path.iterdir()] == ["model.pgz"]


def test_a_failed_artifact_write_keeps_the_weights_and_the_printed_command_finishes_the_run(tmp_path, synthetic_data, tiny_tokenizer, small_disk, monkeypatch):
    """The disk fills up while the model trains: the write fails, the averaged weights are saved as a
    plain state dict, and the command in the message quantizes, writes and evaluates them unchanged."""
    folder, real = small_disk
    args = run_args(tmp_path, synthetic_data, tiny_tokenizer, ARTIFACT_PATH=folder / "model.pgz", SIZE_CAP_BYTES=200_000)
    train = train_gpt.train_model

    def train_while_the_disk_fills(*a, **k):
        result = train(*a, **k)
        if real:
            fill_disk(folder)
        else:
            monkeypatch.setattr(train_gpt, "write_artifact", disk_full)
        return result

    monkeypatch.setattr(train_gpt, "train_model", train_while_the_disk_fills)
    log = Recorder()
    with pytest.raises(train_gpt.RunStopped) as info:
        train_gpt.run(args, train_gpt.Runtime(), "full", log)
    message = str(info.value)
    weights = tmp_path / "logs" / "full.weights.pt"
    assert "No space left on device" in message and f"the trained weights are saved in {weights}" in message, message
    assert [p.name for p in folder.iterdir()] == (["filler"] if real else []), "no partial artifact or temporary file"
    (folder / "filler").unlink(missing_ok=True)  # the user frees space

    command = shlex.split(message.split("without retraining: ", 1)[1])
    assert command[-2:] == ["python3", os.path.relpath(REPO / "train_gpt.py")]
    env = dict(word.split("=", 1) for word in command[:-2])
    assert env["QUANTIZE_ONLY"] == str(weights) and env["RUN_ID"] == "full"
    done = subprocess.run([sys.executable, command[-1]], env=clean_env(**env), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "quantize_only weights:" in done.stdout and "model_params" not in done.stdout, "no retraining"
    assert (folder / "model.pgz").is_file() and "submission_valid:yes" in done.stdout

    def pre_quant(lines):
        return next(line.split(" ", 2)[2] for line in lines if line.startswith("pre_quant"))

    assert pre_quant(log.lines) == pre_quant(done.stdout.splitlines()), "the saved weights are the trained, averaged ones"


# ----------------------------------------------------------------------------- the log's last line and the exit code


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_ends_the_log_with_its_name(tmp_path, synthetic_data, tiny_tokenizer, sig, code):
    env = script_env(tmp_path, synthetic_data, tiny_tokenizer, ITERATIONS=1_000_000, TRAIN_LOG_EVERY=1)
    proc = subprocess.Popen([sys.executable, str(REPO / "train_gpt.py")], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "logs" / "run.txt"
    deadline = time.time() + 120
    while not (log.is_file() and "step:2/" in log.read_text()):
        assert proc.poll() is None and time.time() < deadline, "the run did not start training"
        time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code
    last = log.read_text().splitlines()[-1]
    assert last == err.strip() and last.startswith(f"interrupted: {sig.name}; the run stopped here; training stopped after step "), last
    weights = tmp_path / "logs" / "run.weights.pt"
    assert f"the trained weights are saved in {weights}: " in last and weights.is_file(), "the averaged weights of the last step are kept"


def test_an_unexpected_crash_ends_the_log_with_its_reason(tmp_path, synthetic_data, tiny_tokenizer, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(train_gpt, "train_model", crash)
    monkeypatch.setattr(os, "environ", script_env(tmp_path, synthetic_data, tiny_tokenizer))
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(RuntimeError, match="illegal memory access"):
            train_gpt.main()
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    log = (tmp_path / "logs" / "run.txt").read_text().splitlines()
    assert log[-1] == "error: RuntimeError: CUDA error: an illegal memory access was encountered"
    assert log[-2].startswith("RuntimeError") and "Traceback (most recent call last):" in log


def test_an_invalid_submission_exits_with_its_own_code(tmp_path, synthetic_data, tiny_tokenizer):
    """Seed loops must notice a run over the cap: exit 3, not 0."""
    env = script_env(tmp_path, synthetic_data, tiny_tokenizer, SIZE_CAP_BYTES=20_000, QUANT_FIT_TO_CAP=0, EVAL_STRIDE=0)
    done = run_script(env, tmp_path)
    assert done.returncode == train_gpt.EXIT_INVALID_SUBMISSION == 3, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "submission_valid:no reason:over_size_cap"
