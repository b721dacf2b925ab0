#!/usr/bin/env python3
"""Offline smoke run: build a tiny dataset from text bundled with Python, then train on it.

    python3 data/smoke.py                  # prepare the data (first time only), then train
    python3 data/smoke.py --prepare-only   # only build data/smoke/
    python3 data/smoke.py --steps 50       # shorter training
    python3 data/smoke.py --rebuild        # rebuild the data even if it exists
    python3 data/smoke.py --caseops        # the same with CaseOps text and byte sidecars, in data/smoke_caseops/

Needs no download: the corpus is the English documentation shipped with the interpreter (the
pydoc topics, one document per topic) plus the docstrings of the standard-library modules (one
document per module). A 1024-piece tokenizer is trained on it with the official spec, shards are
written in the official layout under data/smoke/, and train_gpt.py runs a tiny model on them with
the settings in SMOKE_ENV; any of them set in your environment wins. The exit code is train_gpt.py's.
The numbers mean nothing for the leaderboard: this checks that the whole pipeline runs.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import json
import os
import random
import subprocess
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build_shards  # noqa: E402
import caseops  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SMOKE_DIR = REPO / "data" / "smoke"
VOCAB_SIZE = 1024
TOKENIZER_PATH = SMOKE_DIR / "tokenizers" / f"fineweb_{VOCAB_SIZE}_bpe.model"
DATASET_DIR = SMOKE_DIR / "datasets" / f"fineweb10B_sp{VOCAB_SIZE}"
BUILD_INFO = SMOKE_DIR / "build_info.json"  # written last: its presence means the data is complete
# --caseops: the same corpus as CaseOps text, in a folder of its own so both builds can coexist
CASEOPS_DIR = REPO / "data" / "smoke_caseops"
CASEOPS_TOKENIZER_PATH = CASEOPS_DIR / "tokenizers" / f"fineweb_{VOCAB_SIZE}_bpe_caseops.model"
CASEOPS_DATASET_DIR = CASEOPS_DIR / "datasets" / f"fineweb10B_sp{VOCAB_SIZE}_caseops"
CASEOPS_BUILD_INFO = CASEOPS_DIR / "build_info.json"
VAL_TEXT_BYTES = 90_000  # about 30k validation tokens at ~3 bytes/token

# A tiny model that trains in a few minutes on 2 CPU cores. Paths are relative to the repo root.
SMOKE_ENV = {
    "DATA_PATH": f"./data/smoke/datasets/fineweb10B_sp{VOCAB_SIZE}",
    "TOKENIZER_PATH": f"./data/smoke/tokenizers/fineweb_{VOCAB_SIZE}_bpe.model",
    "RUN_ID": "smoke",
    "VOCAB_SIZE": str(VOCAB_SIZE),
    "NUM_LAYERS": "3",
    "LOOP_START": "1",  # the record stack at small scale: block 1 runs twice (4 virtual layers) from 35 % of the steps,
    "LOOP_END": "1",
    "NUM_LOOPS": "1",
    "PARALLEL_RESIDUAL_START": "2",  # and block 2 on two residual lanes
    "MODEL_DIM": "64",
    "NUM_HEADS": "4",
    "NUM_KV_HEADS": "2",
    "MLP_MULT": "2",
    "TRAIN_SEQ_LEN": "128",
    "TRAIN_BATCH_TOKENS": "8192",
    "ITERATIONS": "150",
    "MAX_WALLCLOCK_SECONDS": "0",
    "WARMUP_STEPS": "2",
    "VAL_BATCH_SIZE": "8192",
    "TRAIN_LOG_EVERY": "25",
    "EVAL_SEQ_LEN": "128",
    "EVAL_STRIDE": "32",
    "TTT_CHUNK_SIZE": "32",
    "TTT_CONTEXT_LEN": "128",
    "TTT_BATCH_SIZE": "8",
    "TTT_LORA_RANK": "8",  # phased TTT at small scale: rank 8 (alpha 14.4 keeps the record's 1.8 scale),
    "TTT_HEAD_RANK": "8",
    "TTT_LORA_ALPHA": "14.4",
    "TTT_LR": "0.001",
    "TTT_PHASE_DOCS": "6,12",  # global SGD after 6 and 12 of the validation documents,
    "TTT_PHASE_SEQ_LEN": "128",
    "TTT_PHASE_CHUNK_TOKENS": "2048",
    "TTT_REPORT_BASE": "1",  # and the base model on the same chunks, to log the TTT gain
    "BIGRAM_VOCAB_SIZE": "512",
    "BIGRAM_DIM": "32",
    "GPTQ_CALIB_SEQS": "8",
    "EMA_DECAY": "0.95",  # a 150-step run: the record decay (0.997) would export mostly the initial weights
    "QUANT_FLOAT_MAX_NUMEL": "1024",  # quantize the tiny matrices too, as the full-size ones are
}

CASEOPS_ENV = {
    "DATA_PATH": f"./data/smoke_caseops/datasets/fineweb10B_sp{VOCAB_SIZE}_caseops",
    "TOKENIZER_PATH": f"./data/smoke_caseops/tokenizers/fineweb_{VOCAB_SIZE}_bpe_caseops.model",
    "RUN_ID": "smoke_caseops",
}

# Modules whose import has visible side effects (a browser, a terminal escape) or needs a display.
SKIP_MODULES = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "readline"}


# ----------------------------------------------------------------------------- corpus


def topic_documents() -> list[str]:
    """The pydoc help topics (language reference prose), sorted by name so the split is stable."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def import_quietly(name: str):
    """The module, or None if importing it fails or prints anything."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            module = importlib.import_module(name)
    except Exception:
        return None
    return None if captured.getvalue() else module


def module_document(module) -> str:
    """The module's docstring followed by those of its public classes and functions."""
    parts = [inspect.cleandoc(module.__doc__)] if isinstance(module.__doc__, str) else []
    for name, obj in vars(module).items():
        defined_here = getattr(obj, "__module__", None) == module.__name__
        if name.startswith("_") or not defined_here or not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        if isinstance(obj.__doc__, str) and obj.__doc__.strip():  # own docstring only, not an inherited one
            parts.append(f"{name}: {inspect.cleandoc(obj.__doc__)}")
    return "\n\n".join(parts)


def stdlib_documents() -> list[str]:
    names = sorted(n for n in sys.stdlib_module_names if not n.startswith("_") and n not in SKIP_MODULES)
    with warnings.catch_warnings():  # deprecated modules warn on import and on attribute access
        warnings.simplefilter("ignore")
        modules = [import_quietly(name) for name in names]
        docs = [module_document(m) for m in modules if m is not None]
    return [doc for doc in docs if doc.strip()]


def smoke_corpus() -> tuple[list[str], list[str]]:
    """(validation, training) documents of one pool shuffled with a fixed seed (pydoc topics and module
    docstrings): the first up to VAL_TEXT_BYTES, then the rest. Validation and training text are
    alike, as FineWeb's are: the audit's memorization check compares the two."""
    docs = topic_documents() + stdlib_documents()
    random.Random(0).shuffle(docs)
    val_count, size = 0, 0
    while size < VAL_TEXT_BYTES:
        size += len(docs[val_count].encode("utf-8"))
        val_count += 1
    return docs[:val_count], docs[val_count:]


# ----------------------------------------------------------------------------- steps


def data_paths(caseops_text: bool) -> tuple[Path, Path, Path]:
    """(tokenizer, dataset folder, build info) of the plain or the CaseOps smoke data."""
    if caseops_text:
        return CASEOPS_TOKENIZER_PATH, CASEOPS_DATASET_DIR, CASEOPS_BUILD_INFO
    return TOKENIZER_PATH, DATASET_DIR, BUILD_INFO


def prepare_data(caseops_text: bool = False) -> dict:
    tokenizer_path, dataset_dir, build_info = data_paths(caseops_text)
    val_docs, train_docs = smoke_corpus()
    workers = build_shards.default_workers()
    print(f"smoke: training a {VOCAB_SIZE}-piece tokenizer on {len(train_docs)} documents", file=sys.stderr, flush=True)
    tokenizer_docs = map(caseops.encode, train_docs) if caseops_text else train_docs
    build_shards.train_tokenizer(tokenizer_docs, VOCAB_SIZE, tokenizer_path, threads=workers, caseops_operators=caseops_text)
    vocab = build_shards.load_tokenizer(tokenizer_path).vocab_size()
    if vocab != VOCAB_SIZE:  # VOCAB_SIZE in SMOKE_ENV must match the tokenizer
        raise build_shards.BuildError(f"the smoke corpus gave a vocabulary of {vocab}, not {VOCAB_SIZE}")
    stats = build_shards.write_dataset(val_docs, train_docs, tokenizer_path, dataset_dir, workers=workers, caseops_text=caseops_text)
    build_info.write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def training_env(steps: int | None, caseops_text: bool = False) -> dict[str, str]:
    """SMOKE_ENV (with the CaseOps data paths), overridden by the caller's environment, overridden by --steps."""
    defaults = {**SMOKE_ENV, **CASEOPS_ENV} if caseops_text else SMOKE_ENV
    overridden = sorted(k for k in defaults if k in os.environ and os.environ[k] != defaults[k])
    if overridden:
        print(f"smoke: from your environment: {', '.join(f'{k}={os.environ[k]}' for k in overridden)}", file=sys.stderr)
    env = {**defaults, **os.environ}
    if steps is not None:
        env["ITERATIONS"] = str(steps)
    return env


def train(steps: int | None, caseops_text: bool = False) -> int:
    command = [sys.executable, "train_gpt.py"]
    print(f"smoke: running {' '.join(command)} in {REPO}", file=sys.stderr, flush=True)
    try:
        return subprocess.run(command, cwd=REPO, env=training_env(steps, caseops_text)).returncode
    except KeyboardInterrupt:  # the child got the Ctrl-C too
        return 130


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prepare-only", action="store_true", help="build the data, do not train")
    p.add_argument("--rebuild", action="store_true", help="rebuild the data even if data/smoke/ is complete")
    p.add_argument("--steps", type=int, help="training steps (ITERATIONS; default from SMOKE_ENV)")
    p.add_argument("--caseops", action="store_true", help="CaseOps text with byte sidecars, in data/smoke_caseops/")
    args = p.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        p.error("--steps must be at least 1")

    _, _, build_info = data_paths(args.caseops)
    if args.rebuild or not build_info.is_file():
        build_info.unlink(missing_ok=True)
        try:
            stats = prepare_data(args.caseops)
        except build_shards.BuildError as e:
            print(f"smoke: error: {e}", file=sys.stderr)
            return 1
    else:
        stats = json.loads(build_info.read_text())
        print(f"smoke: using the existing data in {build_info.parent} (--rebuild to redo it)", file=sys.stderr)
    env = {**SMOKE_ENV, **CASEOPS_ENV} if args.caseops else SMOKE_ENV
    print(build_shards.format_summary({**stats, "vocab_size": VOCAB_SIZE, "caseops": args.caseops,
                                       "tokenizer": env["TOKENIZER_PATH"], "dataset_dir": env["DATA_PATH"]}))
    if args.prepare_only:
        return 0
    return train(args.steps, args.caseops)


if __name__ == "__main__":
    sys.exit(main())
