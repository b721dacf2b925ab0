"""Shared helpers for the CPU test suite: tiny configurations, toy byte tables, synthetic shards."""

import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import train_gpt  # noqa: E402

SHARED_DATA = REPO.parent / "shared" / "data"
SP1024 = SHARED_DATA / "tokenizers" / "fineweb_1024_bpe.model"

TINY = dict(
    VOCAB_SIZE=64, NUM_LAYERS=4, MODEL_DIM=32, NUM_HEADS=4, NUM_KV_HEADS=2, MLP_MULT=2,
    TRAIN_SEQ_LEN=32, TRAIN_BATCH_TOKENS=8 * 32 * 2, BIGRAM_VOCAB_SIZE=31, BIGRAM_DIM=8,
    EVAL_SEQ_LEN=32, EVAL_STRIDE=8, VAL_BATCH_SIZE=32 * 16, TTT_CHUNK_SIZE=8, TTT_CONTEXT_LEN=16,
    TTT_BATCH_SIZE=4, TTT_LORA_RANK=2, TTT_HEAD_RANK=2, WARMUP_STEPS=0, MAX_WALLCLOCK_SECONDS=0,
    COMPILE=0, GPTQ_CALIB_SEQS=4, LOOP_START=1, LOOP_END=2, NUM_LOOPS=1, PARALLEL_RESIDUAL_START=3, GATE_WINDOW=4, ROPE_DIMS=4,
    TTT_LORA_ALPHA=2, TTT_PHASE_SEQ_LEN=32, TTT_PHASE_CHUNK_TOKENS=64, EVAL_AUDIT_TOKENS=128,
)


def tiny_args(**overrides) -> train_gpt.Hyperparameters:
    """Hyperparameters of a tiny model, independent of the caller's environment."""
    env = {k: str(v) for k, v in {**TINY, **overrides}.items()}
    return train_gpt.Hyperparameters(env)


def clean_env(**extra) -> dict:
    """The current environment without the script's settings, anything it would take for a misspelt one, or torchrun's variables."""
    ours = {s.name for s in train_gpt.SETTINGS} | {"WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in ours and not train_gpt.misspelt_setting(k)}
    env.update({k: str(v) for k, v in extra.items()})
    env["OMP_NUM_THREADS"] = "1"
    return env


class Recorder(train_gpt.Logger):
    """A Logger(None) that keeps the lines."""

    def __init__(self):
        super().__init__(None)
        self.lines = []

    def __call__(self, line: str = "", console: bool = True, stream=None):
        self.lines.append(line)


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.3) -> torch.nn.Module:
    """Give every parameter (zero-initialised ones included) random values, so each feature acts."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def tiny_model(seed: int = 0, randomized: bool = True, **overrides) -> train_gpt.GPT:
    torch.manual_seed(seed)
    model = train_gpt.GPT(train_gpt.ModelConfig.from_args(tiny_args(**overrides)))
    return randomize(model, seed) if randomized else model


def toy_tables(vocab: int = 64) -> train_gpt.ByteTables:
    """Byte tables for a synthetic vocabulary: ids 0-3 are control/unknown, the rest 1-3 bytes, odd ids with a leading space."""
    ids = torch.arange(vocab)
    base = torch.where(ids < 4, 0, 1 + ids % 3).to(torch.int16)
    space = (ids % 2 == 1) & (ids >= 4)
    boundary = ids < 4
    return train_gpt.ByteTables(base, space, boundary)


def synthetic_stream(num_docs: int, vocab: int = 64, seed: int = 0, min_len: int = 5, max_len: int = 60) -> np.ndarray:
    """Documents [BOS] + tokens drawn from a few repeating patterns (learnable), concatenated."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num_docs):
        n = int(rng.integers(min_len, max_len))
        pattern = rng.integers(4, vocab, size=int(rng.integers(2, 6)))
        out.append(np.concatenate([[train_gpt.BOS_ID], np.resize(pattern, n)]))
    return np.concatenate(out).astype(np.uint16)


@pytest.fixture(autouse=True)
def one_thread():
    """The test models are tiny: one intra-op thread is faster, and immune to a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def synthetic_data(tmp_path):
    """A DATA_PATH with one train and one val shard of synthetic documents."""
    train_gpt.write_data_shard(tmp_path / "fineweb_train_000000.bin", synthetic_stream(400, seed=1))
    train_gpt.write_data_shard(tmp_path / "fineweb_val_000000.bin", synthetic_stream(30, seed=2))
    mark_synthetic(tmp_path)
    return tmp_path


def mark_synthetic(data: Path):
    """Say that the shards in `data` are token ids no tokenizer made, so train_gpt.py takes them with any tokenizer."""
    (data / train_gpt.TOKENIZER_FINGERPRINT).write_text('{"tokenizer": null, "tokenizer_sha256": null}\n')


def train_tiny_tokenizer(path: Path, seed: int = 0, vocab: int = 64) -> Path:
    """A real SentencePiece BPE model of `vocab` pieces (BOS = 1), trained in milliseconds on random
    phrases; another seed gives another tokenizer of the same size."""
    import random

    import sentencepiece as spm

    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 6))) for _ in range(30)]
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(500)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(path.with_suffix("")), model_type="bpe", vocab_size=vocab,
        pad_id=0, bos_id=train_gpt.BOS_ID, eos_id=2, unk_id=3, add_dummy_prefix=False, minloglevel=2, num_threads=1,
    )
    return path


@pytest.fixture
def tiny_tokenizer(tmp_path) -> Path:
    return train_tiny_tokenizer(tmp_path / "tiny_64.model")


@pytest.fixture
def sp1024():
    if not SP1024.is_file():
        pytest.skip("../shared/data is not beside the repository")
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(SP1024))


def assert_fails(report, check, detail=None):
    """An audit report that FAILs, its `check` among the failed ones (its detail matching `detail`)."""
    assert not report.passed and "verdict:FAIL" in report.line(), report.line()
    ok, text = report.checks[check]
    assert not ok, report.line()
    if detail:
        assert re.search(detail, text), text
