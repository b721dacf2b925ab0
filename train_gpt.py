"""Parameter Golf record-run script: train a small GPT in 10 minutes, pack it under 16,000,000
bytes, and score it in bits per byte with evaluators that cannot leak validation data.

Launch: torchrun --standalone --nproc_per_node=8 train_gpt.py  (or plain `python train_gpt.py`).
Every setting is an environment variable; see the Hyperparameters class or README.md.
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import difflib
import glob
import hashlib
import importlib.util
import inspect
import io
import json
import lzma
import math
import os
import platform
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

# ----------------------------------------------------------------------------- hyperparameters


class SettingsError(ValueError):
    """A malformed, out-of-range or unknown environment setting."""


@dataclass(frozen=True)
class Setting:
    name: str  # environment variable; the attribute is its lower-case form
    default: object
    doc: str
    check: object = None  # callable(value) -> bool, or a tuple of allowed values
    rule: str = ""  # what `check` demands, for the error message


ATTENTION_BACKENDS = ("fa3", "varlen", "fa2", "sdpa")  # ATTN_BACKEND=auto takes the first that runs here


def _positive(v):
    return v > 0


def _non_negative(v):
    return v >= 0


def _fraction(v):
    return 0.0 <= v <= 1.0


def _seconds(v: str) -> float | None:
    try:
        seconds = float(v)
    except ValueError:
        return None
    return seconds if 0 <= seconds < math.inf else None


def _file_name(v: str) -> bool:
    return "/" not in v and not v.startswith(".")


def _learning_rate(v):
    return 0.0 <= v <= 10.0  # far above any useful rate, and never an overflow in a float32 step


def _items(v: str) -> set[str]:
    return {item.strip() for item in v.split(",") if item.strip()}


SETTINGS = (
    # data, run and logging
    Setting("DATA_PATH", "./data/datasets/fineweb10B_sp8192_lossless_caps_caseops_v1_reserved", "folder of fineweb_{train,val}_*.bin shards (default: the record's CaseOps data)"),
    Setting("TOKENIZER_PATH", "", "SentencePiece model used for bpb byte counts (empty: <root>/tokenizers/fineweb_<V>_bpe<suffix>.model for DATA_PATH=<root>/datasets/fineweb10B_sp<V><suffix>)"),
    Setting("RUN_ID", "", "name of the run; logs/{RUN_ID}.txt (default: a fresh id)", _file_name, "a plain file name (no '/', not starting with '.')"),
    Setting("SEED", 1337, "random seed for init, data order of TTT adapters and sampling"),
    Setting("LOG_DIR", "logs", "folder for the log file and, by default, the artifact"),
    Setting("ARTIFACT_PATH", "", "where the compressed model is written (default {LOG_DIR}/{RUN_ID}.pgz)"),
    Setting("EVAL_ONLY", "", "path of an existing artifact: skip training, load it and evaluate"),
    Setting("TRAIN_LOG_EVERY", 200, "progress line every N steps (0 = only first and last)", _non_negative, ">= 0"),
    Setting("VAL_LOSS_EVERY", 0, "validation every N steps during training (0 = only at the end)", _non_negative, ">= 0"),
    Setting("VAL_BATCH_SIZE", 524288, "tokens per validation batch, all ranks together", _positive, "> 0"),
    Setting("VAL_MAX_TOKENS", 0, "score only the first N validation tokens (0 = all; smoke runs and tests only)", _non_negative, ">= 0"),
    Setting("QUANTIZE_ONLY", "", "path of a state dict saved by a run whose artifact could not be written: skip training; quantize, write and evaluate it"),
    # schedule
    Setting("ITERATIONS", 20000, "maximum number of training steps", _positive, "> 0"),
    Setting("MAX_WALLCLOCK_SECONDS", 600.0, "training wall-clock cap in seconds (0 = no cap)", _non_negative, ">= 0"),
    Setting("WARMUP_STEPS", 20, "untimed compile warm-up steps; weights, optimizer and data are restored after", _non_negative, ">= 0"),
    Setting("WARMDOWN_FRAC", 0.85, "LR warm-down over this fraction of the budget (wall clock, else ITERATIONS)", _fraction, "in [0, 1]"),
    Setting("WARMDOWN_ITERS", 0, "if > 0, warm down over the last N steps instead (estimated by wall clock, as the baseline)", _non_negative, ">= 0"),
    Setting("MIN_LR", 0.1, "floor of the LR multiplier during warm-down", _fraction, "in [0, 1]"),
    Setting("TRAIN_BATCH_TOKENS", 786432, "tokens per optimizer step, all ranks and micro-steps together", _positive, "> 0"),
    Setting("TRAIN_SEQ_LEN", 2048, "training sequence length", lambda v: 0 < v <= 2**20, "in [1, 1048576]"),
    # model
    Setting("VOCAB_SIZE", 8192, "vocabulary size; must match the tokenizer", lambda v: 0 < v <= 65536, "in [1, 65536] (shards hold uint16 tokens)"),
    Setting("NUM_LAYERS", 11, "transformer blocks", lambda v: 0 < v <= 1024, "in [1, 1024]"),
    Setting("MODEL_DIM", 512, "residual width", lambda v: 0 < v <= 65536, "in [1, 65536]"),
    Setting("NUM_HEADS", 8, "query heads", lambda v: 0 < v <= 1024, "in [1, 1024]"),
    Setting("NUM_KV_HEADS", 4, "key/value heads (GQA); must divide NUM_HEADS", lambda v: 0 < v <= 1024, "in [1, 1024]"),
    Setting("MLP_MULT", 4.0, "MLP hidden width as a multiple of MODEL_DIM", lambda v: 0 < v <= 64, "in (0, 64]"),
    Setting("MLP_ACT", "leaky_relu2", "MLP activation: relu2 = relu(x)^2, leaky_relu2 = leaky_relu(x, 0.5)^2", ("relu2", "leaky_relu2")),
    Setting("TIE_EMBEDDINGS", True, "share the input embedding and the LM head"),
    Setting("ROPE_BASE", 10000.0, "RoPE base frequency", _positive, "> 0"),
    Setting("ROPE_DIMS", 16, "rotate only the first N dims of each head (0 = all; partial RoPE)", _non_negative, ">= 0"),
    Setting("LOGIT_SOFTCAP", 30.0, "logits = cap * tanh(z / cap) (0 = off)", _non_negative, ">= 0"),
    Setting("QK_GAIN_INIT", 5.0, "initial per-head query gain after QK-norm", _positive, "> 0"),
    Setting("SMEAR_GATE", True, "mix the previous token's embedding in through a learned gate (never across BOS)"),
    Setting("SMEAR_GATE_MODE", "input", "input = x_t += lambda*sigmoid(W x_t[:GATE_WINDOW]) x_{t-1} on the raw embedding; dim = per-dimension lerp after the norm", ("input", "dim")),
    Setting("GATE_WINDOW", 12, "leading dims of a token's vector that drive the input-dependent smear and attention gates", _positive, "> 0"),
    Setting("ATTN_GATE", True, "per-head sigmoid gate on the attention output, from the first GATE_WINDOW dims of the block input"),
    Setting("ATTN_GATE_SCALE", 0.5, "gate = sigmoid(ATTN_GATE_SCALE * W x[:GATE_WINDOW])", _positive, "> 0"),
    Setting("XSA_LAST_N", 11, "exclusive self-attention on the last N blocks: remove each head's output component along its own value", _non_negative, ">= 0"),
    Setting("LOOP_START", 3, "first block of the depth-recurrent range", _non_negative, ">= 0"),
    Setting("LOOP_END", 5, "last block (inclusive) of the depth-recurrent range", _non_negative, ">= 0"),
    Setting("NUM_LOOPS", 2, "extra passes through blocks LOOP_START..LOOP_END (0 = no recurrence)", lambda v: 0 <= v <= 64, "in [0, 64]"),
    Setting("LOOP_ENABLE_FRAC", 0.35, "recurrence switches on at this fraction of the training budget", _fraction, "in [0, 1]"),
    Setting("PARALLEL_RESIDUAL_START", 8, "blocks from this index on run attention and MLP on two residual lanes (-1 = off)", lambda v: v >= -1, ">= -1"),
    Setting("DOC_ISOLATION", True, "attention stays inside each document (BOS-delimited) in training and every evaluation path"),
    Setting("EMBED_BF16", True, "on GPUs the token embedding is stored and trained in bf16, as the record's, so the residual stream is bf16 (CPU: fp32)"),
    Setting("LN_SCALE", True, "scale each block's normalized input by 1/sqrt(block + 1)"),
    Setting("ORTHO_INIT", True, "orthogonal init of the Q, K, V and MLP input projections"),
    Setting("BIGRAM_VOCAB_SIZE", 0, "rows of the hashed (previous, current) token embedding (0 = off)", lambda v: v == 0 or 2 <= v <= 2**24, "0 or in [2, 16777216]"),
    Setting("BIGRAM_DIM", 128, "width of the BigramHash table before its projection", lambda v: 0 < v <= 65536, "in [1, 65536]"),
    Setting("UNET_SKIPS", True, "skip connections from the first half of the (virtual) layers to the second"),
    Setting("SKIP_GATES", True, "U-Net skips enter through a learned sigmoid gate (lerp) instead of a plain sum"),
    Setting("ATTN_BACKEND", "auto", "auto = FlashAttention-3 (Hopper), else torch's varlen FlashAttention (torch >= 2.10), else FlashAttention-2, else SDPA", ("auto", *ATTENTION_BACKENDS)),
    Setting("COMPILE", True, "torch.compile the model for training and evaluation on CUDA (never on CPU)"),
    # optimizer
    Setting("EMBED_LR", 0.6, "Adam LR of the untied input embedding", _learning_rate, "in [0, 10]"),
    Setting("HEAD_LR", 0.008, "Adam LR of the untied LM head", _learning_rate, "in [0, 10]"),
    Setting("TIED_EMBED_LR", 0.03, "Adam LR of the tied embedding", _learning_rate, "in [0, 10]"),
    Setting("TIED_EMBED_INIT_STD", 0.005, "init std of the tied embedding", _positive, "> 0"),
    Setting("MATRIX_LR", 0.026, "Muon LR of the 2-D block matrices", _learning_rate, "in [0, 10]"),
    Setting("SCALAR_LR", 0.02, "Adam LR of gains, gates, scales and the BigramHash table", _learning_rate, "in [0, 10]"),
    Setting("MUON_MOMENTUM", 0.97, "Muon momentum after warm-up", _fraction, "in [0, 1]"),
    Setting("MUON_MOMENTUM_WARMUP_START", 0.92, "Muon momentum at step 0", _fraction, "in [0, 1]"),
    Setting("MUON_MOMENTUM_WARMUP_STEPS", 1500, "steps of linear momentum warm-up", _non_negative, ">= 0"),
    Setting("MUON_BACKEND_STEPS", 5, "Newton-Schulz iterations", _positive, "> 0"),
    Setting("MUON_NS_COEFFS", "polar_express", "Newton-Schulz coefficients: polar_express = one tuned tuple per iteration, classic = (3.4445, -4.7750, 2.0315)", ("polar_express", "classic")),
    Setting("MUON_ROW_NORMALIZE", True, "MuonEq-R: normalize each row of the update before orthogonalizing"),
    Setting("MUON_WD", 0.095, "decoupled weight decay of Muon matrices (scaled by LR)", _non_negative, ">= 0"),
    Setting("EMBED_WD", 0.085, "decoupled weight decay of the embeddings (AdamW)", _non_negative, ">= 0"),
    Setting("ADAM_WD", 0.02, "decoupled weight decay of gains, gates and scales (AdamW)", _non_negative, ">= 0"),
    Setting("BETA1", 0.9, "Adam beta1", _fraction, "in [0, 1]"),
    Setting("BETA2", 0.99, "Adam beta2", _fraction, "in [0, 1]"),
    Setting("ADAM_EPS", 1e-8, "Adam epsilon", _positive, "> 0"),
    Setting("GRAD_CLIP_NORM", 0.3, "gradient-norm clip (0 = off)", _non_negative, ">= 0"),
    Setting("GRAD_CLIP_SCOPE", "rank", "rank = each rank clips its own gradient before the averaging (the record); global = the averaged gradient, independent of the GPU count", ("rank", "global")),
    # averaging and quantization-aware training
    Setting("EMA_DECAY", 0.9965, "EMA of all weights, updated every step (0 = off)", lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    Setting("SWA_ENABLED", False, "uniform average of snapshots late in training; exported instead of the EMA"),
    Setting("SWA_EVERY", 50, "steps between SWA snapshots", _positive, "> 0"),
    Setting("SWA_START_FRAC", 0.4, "take snapshots once the LR multiplier is below this", _fraction, "in [0, 1]"),
    Setting("QAT_START", 0.0, "fake-quantize weights once the LR multiplier is below this (0 = never: no fake quantization is computed)", _fraction, "in [0, 1]"),
    # quantization and the artifact
    Setting("QUANT_BITS_ATTN", 6, "bits of attention matrices", lambda v: 2 <= v <= 8, "in [2, 8]"),
    Setting("QUANT_BITS_MLP", 6, "bits of MLP matrices", lambda v: 2 <= v <= 8, "in [2, 8]"),
    Setting("QUANT_BITS_EMBED", 7, "bits of the token embedding / LM head", lambda v: 2 <= v <= 8, "in [2, 8]"),
    Setting("QUANT_BITS_OTHER", 6, "bits of other large matrices (BigramHash)", lambda v: 2 <= v <= 8, "in [2, 8]"),
    Setting("QUANT_CLIP", "sdclip", "row clip: search = MSE-best of a few quantiles, sdclip = QUANT_CLIP_K_<role> * std(row) (a larger k: coarser grid, fewer bytes)", ("search", "sdclip")),
    Setting("QUANT_CLIP_K_ATTN", 13.0, "k of the sdclip clip of attention matrices", _positive, "> 0"),
    Setting("QUANT_CLIP_K_MLP", 11.5, "k of the sdclip clip of MLP matrices", _positive, "> 0"),
    Setting("QUANT_CLIP_K_EMBED", 14.0, "k of the sdclip clip of the token embedding / LM head", _positive, "> 0"),
    Setting("QUANT_CLIP_K_OTHER", 12.85, "k of the sdclip clip of other large matrices (BigramHash)", _positive, "> 0"),
    Setting("QUANT_FLOAT_MAX_NUMEL", 65536, "2-D tensors of at most this many elements are stored in fp16, not quantized", _non_negative, ">= 0"),
    Setting("QUANT_CONTROL_INT8", "out_gate", "control tensors (gates, scales, mixes) stored as int8 with a scale per row (row max / 127) instead of fp16: all, or a comma list of their names (empty = none)", lambda v: v == "all" or _items(v) <= set(CONTROL_PARAMETER_NAMES), "all or a comma list of names from CONTROL_PARAMETER_NAMES in train_gpt.py"),
    Setting("QUANT_PRUNE_FRAC", 0.0, "zero this fraction of smallest-magnitude weights before quantizing", lambda v: 0.0 <= v < 1.0, "in [0, 1)"),
    Setting("QUANT_FIT_TO_CAP", True, "if over SIZE_CAP_BYTES, raise pruning step by step until the artifact fits"),
    Setting("LQER_RANK", 4, "rank of the low-rank correction of the worst-quantized tensors (0 = off)", _non_negative, ">= 0"),
    Setting("LQER_TOP_K", 3, "how many tensors get the correction: those with the largest norm of W - W_q", _non_negative, ">= 0"),
    Setting("LQER_A_BITS", 2, "bits of the correction's left factor A = U S (one scale; values in [-2^(b-1), 2^(b-1) - 1], scale max / (2^(b-1) - 0.5))", lambda v: 2 <= v <= 8, "in [2, 8]"),
    Setting("LQER_B_BITS", 4, "bits of the correction's right factor B = V^T (one scale per LQER_GROUP columns, the same grid as A)", lambda v: 2 <= v <= 8, "in [2, 8]"),
    Setting("LQER_GROUP", 64, "columns of B sharing one scale", _positive, "> 0"),
    Setting("LQER_A_CLIP_SEARCH", False, "clip A at the fraction of its largest magnitude that fits the error best (else at the largest, as the record)"),
    Setting("GPTQ_ENABLED", True, "full-Hessian GPTQ (else round-to-nearest)"),
    Setting("GPTQ_EMBED", True, "GPTQ the tied embedding too, with the Hessian of the LM head's input (else round-to-nearest)"),
    Setting("GPTQ_CALIBRATION", "train", "train = batches read inside the training budget, self = model-generated text", ("train", "self")),
    Setting("GPTQ_RESERVE_SECONDS", "auto", "training stops this much early so that calibration fits inside the cap; auto = 1.25 x the calibration time measured before training + 1 s", lambda v: v == "auto" or _seconds(v) is not None, "auto or seconds >= 0"),
    Setting("GPTQ_CALIB_SEQS", 768, "calibration sequences of TRAIN_SEQ_LEN, all ranks together (the record: 16 batches of 48 on its rank 0)", _positive, "> 0"),
    Setting("GPTQ_CALIB_TEMPERATURE", 0.8, "sampling temperature of self-generated calibration text", _positive, "> 0"),
    Setting("GPTQ_BLOCK_SIZE", 128, "GPTQ column block size", _positive, "> 0"),
    Setting("GPTQ_DAMP", 0.01, "GPTQ damping as a fraction of mean diag(H)", _positive, "> 0"),
    Setting("GPTQ_ACT_ORDER", True, "GPTQ column order by descending diag(H)"),
    Setting("ARTIFACT_COMPRESSOR", "auto", "compressor of each stream, at its strongest setting; auto = the smallest of every installed one", ("auto", "zstd", "lzma", "brotli", "zpaq")),
    Setting("ARTIFACT_GROUPING", "role", "role = one compressed stream per kind of tensor across layers (attn.c_q, mlp.fc, ...), scales, fp16 and fp32; single = one stream for all", ("role", "single")),
    Setting("ARTIFACT_PACKING", "int8", "quantized values in int8 containers, bit-packed, or auto = the smaller after compression, per stream", ("auto", "int8", "bitpack")),
    Setting("ARTIFACT_TRANSPOSE", True, "store each quantized matrix column by column"),
    Setting("ARTIFACT_REORDER_ROWS", "tok_emb,attn.c_q,mlp.fc", "store the rows of these kinds of quantized matrix in nearest-neighbour order (the order is stored): a comma list, all, or empty (none)",
            lambda v: v == "all" or _items(v) <= set(MATRIX_GROUPS), "all or a comma list from MATRIX_GROUPS in train_gpt.py"),
    Setting("CODE_MINIFY", True, "minify the source (python-minifier) before compressing it into the shipped train_gpt.py"),
    Setting("SIZE_CAP_BYTES", 16000000, "cap on code bytes + artifact bytes", _positive, "> 0"),
    # evaluation
    Setting("EVAL_SEQ_LEN", 2048, "window length of sliding-window evaluation", lambda v: 0 < v <= 2**20, "in [1, 1048576]"),
    Setting("EVAL_STRIDE", 0, "sliding-window stride, a diagnostic path (0 = off; the record scores TTT only)", _non_negative, ">= 0"),
    Setting("EVAL_AUDIT", True, "audit the final path after its timed scoring; submission_valid:yes needs its PASS"),
    Setting("EVAL_AUDIT_TOKENS", 8192, "validation tokens of the audit's probes (a fresh process reruns the path on them about a dozen times)", lambda v: v >= 64, ">= 64"),
    Setting("EVAL_AUDIT_SAMPLES", 32, "positions drawn from the whole validation stream after scoring (seeded by the run's scores): the batch that scored each is replayed as the run computed it, as is and perturbed after it (0 = off, which fails the audit)", _non_negative, ">= 0"),
    Setting("EVAL_AUDIT_HELDOUT_TOKENS", 16777216, "tail of the last train shard that training never reads (at most a quarter of it): the audit compares the artifact's loss on it with its loss on as many validation tokens (0 = off, which fails the audit)", _non_negative, ">= 0"),
    Setting("EVAL_AUDIT_PROBES", "", "set by the audit for its fresh process, not by users: score the probe streams this file lists instead of the validation set"),
    Setting("EVAL_DUMP", "", "write per-target records (position, nll, bytes) of each path to {EVAL_DUMP}.{path}.npz"),
    Setting("TTT_ENABLED", True, "score-first test-time training (the final path)"),
    Setting("TTT_MODE", "phased", "phased = per-document LoRA plus global SGD phases on documents already scored; lora = LoRA only", ("phased", "lora")),
    Setting("TTT_LORA_RANK", 80, "LoRA rank on the block projections", _positive, "> 0"),
    Setting("TTT_LORA_ALPHA", 144.0, "LoRA deltas are scaled by alpha / rank", _positive, "> 0"),
    Setting("TTT_HEAD_RANK", 80, "LoRA rank on the LM head (0 = no head adapter)", _non_negative, ">= 0"),
    Setting("TTT_TARGETS", "q,k,v,o,mlp", "comma list of adapted projections: q, k, v, o, mlp"),
    Setting("TTT_BIAS", False, "also tune a per-document bias on each virtual layer's output"),
    Setting("TTT_WARM_A", True, "each phase's documents start from the mean LoRA A of the previous phase's (else a fresh seeded A per document)"),
    Setting("TTT_CHUNK_SIZE", 48, "tokens scored, then trained on, per TTT step", _positive, "> 0"),
    Setting("TTT_CONTEXT_LEN", 2048, "tokens of in-document context per TTT window (>= TTT_CHUNK_SIZE)", _positive, "> 0"),
    Setting("TTT_STEPS", 1, "optimizer steps on each scored chunk", _positive, "> 0"),
    Setting("TTT_OPTIMIZER", "adamw", "optimizer of the adapters", ("adam", "adamw", "sgd")),
    Setting("TTT_LR", 0.0001, "adapter LR (0 = score with the base model only)", _learning_rate, "in [0, 10]"),
    Setting("TTT_WD", 0.5, "adapter weight decay (adamw)", _non_negative, ">= 0"),
    Setting("TTT_BETA1", 0.0, "adapter Adam beta1", _fraction, "in [0, 1]"),
    Setting("TTT_BETA2", 0.99, "adapter Adam beta2", _fraction, "in [0, 1]"),
    Setting("TTT_EPS", 1e-10, "adapter Adam epsilon", _positive, "> 0"),
    Setting("TTT_LR_HORIZON", 0, "cosine decay of the adapter LR over the first N chunks of a document, then 0 (0 = constant); never the document's length", _non_negative, ">= 0"),
    Setting("TTT_MAX_ADAPT_TOKENS", 0, "a document's adapters stop training once this many of its tokens were read (0 = never stop)", _non_negative, ">= 0"),
    Setting("TTT_BATCH_SIZE", 64, "documents adapted together per rank", _positive, "> 0"),
    Setting("TTT_PHASE_TOKENS", "4292608,7176192,9469952", "phased: a global SGD phase runs once the documents scored (in stream order) hold this many tokens: the record's phases trained on 131, 219 and 289 steps of 32768"),
    Setting("TTT_PHASE_DOCS", "", "phased: cut the phases after this many documents instead (set, it overrides TTT_PHASE_TOKENS)"),
    Setting("TTT_PHASE_LR", 0.001, "phased: SGD LR, cosine over the phase's steps", _learning_rate, "in [0, 10]"),
    Setting("TTT_PHASE_MOMENTUM", 0.9, "phased: SGD momentum", _fraction, "in [0, 1]"),
    Setting("TTT_PHASE_CLIP", 1.0, "phased: gradient-norm clip of each SGD step (0 = off)", _non_negative, ">= 0"),
    Setting("TTT_PHASE_CHUNK_TOKENS", 32768, "phased: tokens per SGD step, all ranks together", _positive, "> 0"),
    Setting("TTT_PHASE_SEQ_LEN", 2048, "phased: sequence length of the SGD steps", _positive, "> 0"),
    Setting("TTT_DEADLINE_SECONDS", 500.0, "after this many seconds of evaluation on 8 GPUs (scaled by 8 / WORLD_SIZE), remaining documents get the base model (0 = none)", _non_negative, ">= 0"),
    Setting("TTT_REPORT_BASE", False, "also score the TTT documents with the base model to log the TTT gain (costs a pass)"),
)

# Prefixes of our own names: a variable with one of these prefixes that is not a setting is a typo.
_NOT_OUR_PREFIXES = {"MAX", "MIN", "RUN", "DATA", "MODEL", "NUM", "LOG", "VOCAB", "SIZE"}
_OUR_PREFIXES = {s.name.split("_")[0] for s in SETTINGS if "_" in s.name} - _NOT_OUR_PREFIXES
# The multi-word endings of settings (TRAIN_SEQ_LEN: SEQ_LEN), and the common variables of shells and
# launchers that are also the last word of a setting (DATA_PATH, TTT_LORA_RANK, GPTQ_CALIB_TEMPERATURE, GATE_WINDOW).
_ENDINGS = {s.name.split("_", i)[-1] for s in SETTINGS for i in range(1, s.name.count("_"))}
_COMMON_VARIABLES = {"PATH", "RANK", "TEMP", "WINDOW"}


def _settings_near(upper: str) -> list[str]:
    """Settings an upper-case name may have meant, the closest first."""
    order = [s.name for s in SETTINGS]
    near = difflib.get_close_matches(upper, order, n=1, cutoff=0.85)
    near += [k for k in order if (("_" in upper or upper in _OUR_PREFIXES) and k.startswith(upper + "_")) or ("_" in upper and upper.startswith(k + "_"))]
    if upper not in _COMMON_VARIABLES and len(upper) > 1:  # a setting's ending (SEQ_LEN), misspelt (SEQLEN) or abbreviated (ITERS)
        endings = [upper] + difflib.get_close_matches(upper, _ENDINGS, n=3, cutoff=0.85)
        stem = upper.rstrip("S") if "_" not in upper and len(upper.rstrip("S")) >= 4 else None
        near += [k for k in order if any(k.endswith("_" + e) for e in endings) or (stem and k.split("_")[-1].startswith(stem))]
    first, _, rest = upper.partition("_")
    if first in ("MAX", "MIN", "NUM") and rest:  # MAX_STEPS, NUM_ITERS: a setting's ending behind a generic word
        near += _settings_near(rest)
    return list(dict.fromkeys(near))


def misspelt_setting(name: str) -> str | None:
    """Why a variable looks like a mistyped setting (None if it is one, or unrelated): a typo must not train the default model."""
    known = {s.name for s in SETTINGS}
    upper = name.upper()
    if name in known:
        return None
    if upper in known:
        return f"{name} is not a setting; settings are upper-case: {upper}"
    if near := _settings_near(upper)[:3]:
        return f"unknown setting {name}; did you mean {', '.join(near[:-1]) + ' or ' if len(near) > 1 else ''}{near[-1]}?"
    if "_" in upper and upper.split("_")[0] in _OUR_PREFIXES:
        return f"unknown setting {name}; see the README's table of settings"
    return None


def _parse_setting(setting: Setting, raw: str):
    kind = type(setting.default)
    try:
        if kind is bool:
            low = raw.strip().lower()
            if low not in ("0", "1", "true", "false", "yes", "no", "on", "off"):
                raise ValueError
            value = low in ("1", "true", "yes", "on")
        elif kind is int:
            number = float(raw)  # accepts 786432, 7.86432e5 and 1e4
            if not number.is_integer():
                raise ValueError
            value = int(number)
        elif kind is float:
            value = float(raw)
            if not math.isfinite(value):
                raise ValueError
        else:
            value = raw
    except ValueError:
        raise SettingsError(f"{setting.name}={raw!r} is not a valid {kind.__name__}; {setting.doc}") from None
    check = setting.check
    if isinstance(check, tuple):
        if value not in check:
            raise SettingsError(f"{setting.name}={raw!r} must be one of {', '.join(map(str, check))}")
    elif check is not None and not check(value):
        raise SettingsError(f"{setting.name}={raw!r} must be {setting.rule}; {setting.doc}")
    return value


def tokenizer_beside(data_path: str) -> str:
    """The tokenizer the official layout keeps beside DATA_PATH (see TOKENIZER_PATH), or "" for another folder name."""
    datasets, name = os.path.split(os.path.normpath(data_path))
    vocab, _, suffix = name.removeprefix("fineweb10B_sp").partition("_")
    if os.path.basename(datasets) != "datasets" or not name.startswith("fineweb10B_sp") or not vocab.isdigit():
        return ""
    return os.path.join(os.path.dirname(datasets), "tokenizers", f"fineweb_{vocab}_bpe{'_' * bool(suffix)}{suffix}.model")


class Hyperparameters:
    """All settings, read once from the environment and validated; attribute = lower-case name."""

    def __init__(self, environ=None, **overrides):
        environ = os.environ if environ is None else environ
        known = {s.name for s in SETTINGS}
        for name in environ:
            if problem := misspelt_setting(name):
                raise SettingsError(problem)
        for s in SETTINGS:
            value = s.default
            if s.name in environ:
                value = _parse_setting(s, environ[s.name])
            setattr(self, s.name.lower(), value)
        for key, value in overrides.items():
            if key.upper() not in known:
                raise SettingsError(f"unknown setting {key.upper()}")
            setattr(self, key.lower(), _parse_setting(next(s for s in SETTINGS if s.name == key.upper()), str(value)))
        self.tokenizer_path = self.tokenizer_path or tokenizer_beside(self.data_path)
        self._check_consistency()

    def _check_consistency(self):
        if self.num_heads % self.num_kv_heads:
            raise SettingsError(f"NUM_KV_HEADS={self.num_kv_heads} must divide NUM_HEADS={self.num_heads}")
        if self.model_dim % self.num_heads or (self.model_dim // self.num_heads) % 2:
            raise SettingsError(f"MODEL_DIM={self.model_dim} must be NUM_HEADS={self.num_heads} times an even head size")
        if self.rope_dims > self.model_dim // self.num_heads or self.rope_dims % 2:
            raise SettingsError(f"ROPE_DIMS={self.rope_dims} must be even and at most the head size {self.model_dim // self.num_heads}")
        if (self.attn_gate or (self.smear_gate and self.smear_gate_mode == "input")) and self.gate_window > self.model_dim:
            raise SettingsError(f"GATE_WINDOW={self.gate_window} must be <= MODEL_DIM={self.model_dim}: the gates read the first GATE_WINDOW dims of a token's vector")
        if self.ttt_context_len < self.ttt_chunk_size:
            raise SettingsError(f"TTT_CONTEXT_LEN={self.ttt_context_len} must be >= TTT_CHUNK_SIZE={self.ttt_chunk_size}")
        for name, example in (("ttt_phase_tokens", "4292608,7176192,9469952"), ("ttt_phase_docs", "833,1666,2500")):
            try:
                counts = [int(d) for d in getattr(self, name).split(",") if d.strip()]
            except ValueError:
                counts = None
            if counts is None or counts != sorted(set(counts)) or any(d <= 0 for d in counts):
                raise SettingsError(f"{name.upper()}={getattr(self, name)!r}: use increasing counts, e.g. {example} (or empty)")
        bad = set(self.ttt_target_list) - {"q", "k", "v", "o", "mlp"}
        if bad or not self.ttt_target_list:
            raise SettingsError(f"TTT_TARGETS={self.ttt_targets!r}: use a comma list of q, k, v, o, mlp")
        if self.num_loops and not self.loop_start <= self.loop_end < self.num_layers:
            raise SettingsError(f"LOOP_START={self.loop_start}..LOOP_END={self.loop_end} must be blocks of NUM_LAYERS={self.num_layers} (or set NUM_LOOPS=0)")
        if self.eval_stride > self.eval_seq_len:
            raise SettingsError(f"EVAL_STRIDE={self.eval_stride} must be <= EVAL_SEQ_LEN={self.eval_seq_len}")
        if self.eval_only and self.quantize_only:
            raise SettingsError("EVAL_ONLY and QUANTIZE_ONLY are both set; set one: EVAL_ONLY scores an artifact, QUANTIZE_ONLY makes one from saved weights")

    @property
    def ttt_phase_cuts(self) -> tuple[str, list[int]]:
        """("docs" or "tokens", the counts after which phased TTT runs global SGD): TTT_PHASE_DOCS when set."""
        unit = "docs" if self.ttt_phase_docs.strip() else "tokens"
        return unit, [int(d) for d in getattr(self, f"ttt_phase_{unit}").split(",") if d.strip()]

    @property
    def ttt_target_list(self) -> list[str]:
        return [t.strip() for t in self.ttt_targets.split(",") if t.strip()]

    def as_dict(self) -> dict:
        return {s.name: getattr(self, s.name.lower()) for s in SETTINGS}

    def describe(self) -> str:
        return "\n".join(f"{k}={v}" for k, v in self.as_dict().items())


# ----------------------------------------------------------------------------- runtime: devices, ranks, logging


@dataclass
class Runtime:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    distributed: bool = False

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    @property
    def grad_accum_steps(self) -> int:
        return 8 // self.world_size


def _launcher_int(name: str, default: str) -> int:
    """WORLD_SIZE, RANK or LOCAL_RANK as torchrun sets them; a malformed one is a one-line error."""
    raw = os.environ.get(name, default)
    try:
        return int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not an integer; torchrun sets it, so unset it to run one process or launch with torchrun") from None


def setup_runtime() -> Runtime:
    """One process per GPU (NCCL) or per CPU worker (gloo); WORLD_SIZE must divide 8."""
    world_size = _launcher_int("WORLD_SIZE", "1")
    if world_size < 1 or 8 % world_size:
        raise SettingsError(f"WORLD_SIZE={world_size} must divide 8 (1, 2, 4 or 8 processes) so the global batch stays the same")
    rank, local_rank = _launcher_int("RANK", "0"), _launcher_int("LOCAL_RANK", "0")
    if not 0 <= rank < world_size:
        raise SettingsError(f"RANK={rank} with WORLD_SIZE={world_size}: a stale launcher variable; unset RANK to run one process, or launch with torchrun")
    if world_size > 1 and "LOCAL_WORLD_SIZE" not in os.environ:  # torchrun sets it: WORLD_SIZE alone would wait forever for the other ranks
        raise SettingsError(
            f"WORLD_SIZE={world_size} is set, but this process was not started by torchrun (no LOCAL_WORLD_SIZE): unset WORLD_SIZE and RANK "
            "to run one process, or launch with torchrun (another launcher must set LOCAL_WORLD_SIZE as torchrun does)"
        )
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
    if world_size > 1:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    return Runtime(rank, world_size, local_rank, device, world_size > 1)


def set_aside(path: Path):
    """Keep an earlier run's file under a name stamped with its modification time, instead of overwriting it."""
    if path.is_file():
        stamp = time.strftime("%Y%m%d_%H%M%S", time.localtime(path.stat().st_mtime))
        os.replace(path, path.with_name(f"{path.stem}.{stamp}{path.suffix}"))


class Logger:
    """Rank 0 writes every line to stdout and, flushed at once, to logs/{RUN_ID}.txt.

    One run per file (the tools read a file as one run): an older log of the same RUN_ID is set aside.
    If the file cannot be opened, lines go to the console only and the preflight reports the unusable
    LOG_DIR; if a write fails (a full disk), the file's lines go to stderr from then on: a log never
    stops a run.
    """

    def __init__(self, path: Path | None):
        self.path, self.file, self.write_failed = path, None, False
        if path is not None:
            with contextlib.suppress(OSError):
                path.parent.mkdir(parents=True, exist_ok=True)
                set_aside(path)
                self.file = open(path, "w", encoding="utf-8")

    def __call__(self, line: str = "", console: bool = True, stream=None):
        if self.path is None:
            return
        if self.file is not None:
            try:
                self.file.write(line + "\n")
                self.file.flush()
            except OSError as e:
                self.file, self.write_failed = None, True
                self._print(f"WARNING: cannot write the log file {self.path} ({e.strerror or e}); its lines go to stdout and stderr from here", sys.stderr)
        if console or self.write_failed:
            self._print(line, stream or (sys.stdout if console else sys.stderr))

    @staticmethod
    def _print(line: str, stream):
        with contextlib.suppress(OSError):  # a closed or full console must not stop the run either
            print(line, file=stream, flush=True)


def environment_versions() -> str:
    lines = [f"python {sys.version.split()[0]} torch {torch.__version__} numpy {np.__version__} platform {platform.platform()}"]
    if torch.cuda.is_available():
        lines.append(f"cuda {torch.version.cuda} device {torch.cuda.get_device_name()}")
        with contextlib.suppress(Exception):
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            lines.append(f"nvidia driver {smi.stdout.strip().splitlines()[0]}")
    return "\n".join(lines)


def sync_time(rt: Runtime) -> float:
    """Wall clock after the device has finished its queued work."""
    if rt.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


PROCESS_START = time.perf_counter()


class Stage:
    """`stage:NAME start` when made and `stage:NAME done seconds:S` at done() (t: since the process
    started): a run cut short still says which stage it was in, and each stage's wall time is logged."""

    def __init__(self, name: str, log, rt: Runtime):
        self.name, self.log, self.rt, self.t0 = name, log, rt, sync_time(rt)
        log(f"stage:{name} start t:{self.t0 - PROCESS_START:.1f}s")

    def done(self) -> float:
        seconds = sync_time(self.rt) - self.t0
        self.log(f"stage:{self.name} done seconds:{seconds:.2f} t:{self.t0 + seconds - PROCESS_START:.1f}s")
        return seconds


def write_atomic(path: str | Path, data: bytes):
    """Write to a temporary file and rename it, so a crash never leaves a half-written file; on
    any failure the temporary file is removed (a full disk must not fill up further). One that a
    killed process left is named after its host and process, for remove_stale_temporaries."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{platform.node()}-{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove the temporary files of write_atomic in `folder` whose process (on this host) is gone: a
    SIGKILL during a write leaves one, as large as the file it was writing."""
    removed = []
    for tmp in folder.glob(".*.tmp") if folder.is_dir() else []:
        prefix, _, pid = tmp.name[: -len(".tmp")].rpartition("-")
        if not (prefix.endswith(f".{platform.node()}") and pid.isdigit() and int(pid) > 0):
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                tmp.unlink()
                removed.append(tmp)
        except OSError:  # alive, owned by another user
            pass
    return removed


# ----------------------------------------------------------------------------- data: shards, loaders, documents

SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_INTS = 20240520, 1, 256
BOS_ID = 1


class DataError(RuntimeError):
    """Missing, corrupt or mismatched data; the message says what to run or fix."""


DOWNLOAD_HINT = (
    "make the record's CaseOps data with the README's first command (data/cached_challenge_fineweb.py, then data/build_shards.py), "
    "or download plain sp8192 with `python3 data/cached_challenge_fineweb.py --variant sp8192 --train-shards 80` and set "
    "DATA_PATH=./data/datasets/fineweb10B_sp8192, or run the offline smoke run with `python3 data/smoke.py`"
)


def write_data_shard(path: str | Path, tokens: np.ndarray):
    """Official shard: 256 little-endian int32 header (magic, version, count) then uint16 tokens."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise DataError(f"{path}: token ids must fit in uint16")
    header = np.zeros(SHARD_HEADER_INTS, dtype="<i4")
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, tokens.size)
    write_atomic(path, header.tobytes() + tokens.astype("<u2").tobytes())


def shard_token_count(path: str | Path) -> int:
    """The token count in a shard's header, checked against the file's size (DataError if they disagree)."""
    path = Path(path)
    size = path.stat().st_size
    if size < SHARD_HEADER_INTS * 4:
        raise DataError(f"{path}: {size} bytes is shorter than the 1024-byte shard header; the file is truncated, re-create it")
    header = np.fromfile(path, dtype="<i4", count=SHARD_HEADER_INTS)
    if header[0] != SHARD_MAGIC:
        raise DataError(f"{path}: bad magic {header[0]} (expected {SHARD_MAGIC}); not a shard file, re-create it")
    if header[1] != SHARD_VERSION:
        raise DataError(
            f"{path}: shard version {header[1]} is not supported (expected {SHARD_VERSION}); "
            "re-download it with data/cached_challenge_fineweb.py or re-create it with data/build_shards.py"
        )
    count = int(header[2])
    if size != SHARD_HEADER_INTS * 4 + 2 * count:
        raise DataError(f"{path}: header says {count} tokens ({SHARD_HEADER_INTS * 4 + 2 * count} bytes) but the file has {size} bytes; re-download or re-create it")
    return count


def load_data_shard(path: str | Path) -> np.ndarray:
    return np.fromfile(path, dtype="<u2", count=shard_token_count(path), offset=SHARD_HEADER_INTS * 4)


def shard_files(data_path: str, split: str) -> list[str]:
    # [0-9]: the byte sidecars fineweb_val_bytes_*.bin sit in the same folder and are not token shards
    files = sorted(glob.glob(os.path.join(data_path, f"fineweb_{split}_[0-9]*.bin")))
    if not files:
        raise DataError(f"no fineweb_{split}_*.bin shards in DATA_PATH={data_path}; {DOWNLOAD_HINT}")
    return files


def load_validation_tokens(data_path: str, vocab_size: int, max_tokens: int = 0) -> Tensor:
    """All validation shards as one int64 stream (the official validation set is scored in full)."""
    tokens = np.concatenate([load_data_shard(f) for f in shard_files(data_path, "val")])
    if max_tokens:
        tokens = tokens[:max_tokens]
    if tokens.size < 2:
        raise DataError(f"validation shards in {data_path} hold {tokens.size} tokens; at least 2 are needed")
    if int(tokens.max()) >= vocab_size:
        raise DataError(f"validation token id {int(tokens.max())} >= VOCAB_SIZE={vocab_size}; the shards were made with another tokenizer")
    return torch.from_numpy(tokens.astype(np.int64))


def byte_sidecar_path(shard: str) -> str:
    """fineweb_val_000000.bin -> fineweb_val_bytes_000000.bin beside it (the naming of the CaseOps records)."""
    folder, name = os.path.split(shard)
    split, index = name.removesuffix(".bin").rsplit("_", 1)
    return os.path.join(folder, f"{split}_bytes_{index}.bin")


def load_byte_sidecar(data_path: str, tokenizer_path: str) -> Tensor | None:
    """The byte sidecars of the validation shards as one int32 stream (entry i: the original UTF-8 bytes
    that validation token i stands for), or None when there are none and the official count applies.

    Preflight: every validation shard needs its sidecar of exactly its length, and a CaseOps tokenizer
    needs sidecars (its operator pieces stand for no bytes, and its pieces are lowercase where the text
    was not), so any of these stops the run before training instead of reporting a wrong bpb."""
    shards = shard_files(data_path, "val")
    sidecars = [byte_sidecar_path(f) for f in shards]
    found = sorted(glob.glob(os.path.join(data_path, "fineweb_val_bytes_*.bin")))
    rebuild = "rebuild the data with `python3 data/build_shards.py ... --caseops`"
    if not found:
        if is_caseops_tokenizer(tokenizer_path):
            raise DataError(f"TOKENIZER_PATH={tokenizer_path} is a CaseOps tokenizer but DATA_PATH={data_path} has no fineweb_val_bytes_*.bin byte sidecars to count the original bytes; {rebuild}")
        return None
    unpaired = [p for p in sidecars if not os.path.isfile(p)] + sorted(set(found) - set(sidecars))
    if unpaired:
        raise DataError(f"{unpaired[0]}: every validation shard in DATA_PATH={data_path} needs its byte sidecar and every sidecar its shard; {rebuild}")
    parts = []
    for shard, sidecar in zip(shards, sidecars):
        counts = load_data_shard(sidecar)
        tokens = (os.path.getsize(shard) - SHARD_HEADER_INTS * 4) // 2  # load_data_shard checked this size
        if counts.size != tokens:
            raise DataError(f"{sidecar} holds {counts.size} byte counts but {shard} holds {tokens} tokens; the two come from different builds: {rebuild}")
        parts.append(counts)
    return torch.from_numpy(np.concatenate(parts).astype(np.int32))


def shard_problems(files: list[str], vocab_size: int) -> list[str]:
    """Each shard's header against its size and its largest token id against VOCAB_SIZE (memory-mapped,
    vectorized), so a bad shard stops the run before the first step, not when the loader reaches it."""
    problems = []
    for f in files:
        try:
            count = shard_token_count(f)
            top = int(np.memmap(f, dtype="<u2", mode="r", offset=SHARD_HEADER_INTS * 4, shape=(count,)).max()) if count else 0
        except (DataError, OSError) as e:  # OSError: unreadable, e.g. its permissions
            problems.append(str(e))
            continue
        if top >= vocab_size:
            problems.append(f"{f}: token id {top} >= VOCAB_SIZE={vocab_size}; the shard was made with another tokenizer: set VOCAB_SIZE and TOKENIZER_PATH to the ones that made it")
    return problems


TOKENIZER_FINGERPRINT = "tokenizer_fingerprint.json"  # beside shards made by data/build_shards.py or fetched by data/cached_challenge_fineweb.py


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


REENCODED_MIN = 0.9  # the tokenizer that made the shards gives back all (measured: every Wikipedia article), another one of 1024+ pieces ~0


def reencoded_share(data_path: str, tokenizer_path: str, max_tokens: int = 1 << 17) -> float | None:
    """Share of the first validation tokens that decoding with the tokenizer and encoding again gives back
    (None: nothing to check). A document counts up to its first <unk> (it decodes to " ⁇ "), or the sample's
    end, cut back to a word start, which no merge crosses. A tokenizer of few merges (a tiny test vocabulary)
    may give back another's ids too."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=tokenizer_path)
    first = shard_files(data_path, "val")[0]
    total = shard_token_count(first)
    tokens = np.fromfile(first, dtype="<u2", count=min(total, max_tokens), offset=SHARD_HEADER_INTS * 4)
    if not tokens.size or int(tokens.max()) >= sp.vocab_size():
        return None  # shard_problems reports ids outside the vocabulary
    docs = np.split(tokens, np.flatnonzero(tokens == BOS_ID))
    same = checked = 0
    for n, doc in enumerate(docs):
        ids = doc[doc != BOS_ID].tolist()
        end = ids.index(sp.unk_id()) if sp.unk_id() in ids else len(ids)
        if end < len(ids) or (n == len(docs) - 1 and tokens.size < total):
            end = next((k for k in range(end - 1, -1, -1) if sp.id_to_piece(ids[k]).startswith("\u2581")), 0)
        same += end * (sp.encode(sp.decode(ids[:end])) == ids[:end])
        checked += end
    return same / checked if checked else None


def tokenizer_mismatch(data_path: str, tokenizer_path: str) -> str | None:
    """Why TOKENIZER_PATH is not the tokenizer that made the shards (None if it is): with another tokenizer
    of the same or a larger vocabulary every other check passes and the bpb is silently wrong. The shards'
    fingerprint names it; without one (an older download) the tokenizer must give back the first validation
    documents. A fingerprint with tokenizer_sha256 null marks token ids no tokenizer made (tests)."""
    record = Path(data_path) / TOKENIZER_FINGERPRINT
    if record.is_file():
        try:
            made_with = json.loads(record.read_text())
            recorded = made_with["tokenizer_sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            return f"{record} cannot be read; re-create the shards with data/build_shards.py"
        if recorded in (None, file_sha256(tokenizer_path)):
            return None
        made_by = f"the tokenizer {made_with.get('tokenizer', '?')} (sha256 {recorded[:12]})"
        fits = lambda path: file_sha256(path) == recorded  # noqa: E731
    else:
        share = reencoded_share(data_path, tokenizer_path)
        if share is None or share >= REENCODED_MIN:
            return None
        made_by = f"another tokenizer (decoded with this one and encoded again, {share:.0%} of the first validation tokens come back)"
        fits = lambda path: (reencoded_share(data_path, str(path)) or 0) >= REENCODED_MIN  # noqa: E731
    return f"the shards in DATA_PATH={data_path} were made with {made_by}, not TOKENIZER_PATH={tokenizer_path}; use {fitting_tokenizer(data_path, tokenizer_path, fits)}"


def fitting_tokenizer(data_path: str, tokenizer_path: str, fits) -> str:
    """The settings of a tokenizer that fits the shards, among those beside them in the official layout
    (data/datasets/<name>/ and data/tokenizers/) and beside TOKENIZER_PATH."""
    import sentencepiece as spm

    beside = {*Path(data_path).resolve().parent.parent.glob("tokenizers/*.model"), *Path(tokenizer_path).resolve().parent.glob("*.model")}
    for path in sorted(beside - {Path(tokenizer_path).resolve()}):
        try:
            if fits(path):
                return f"TOKENIZER_PATH={path} VOCAB_SIZE={spm.SentencePieceProcessor(model_file=str(path)).vocab_size()}"
        except (RuntimeError, OSError):  # not a SentencePiece model
            continue
    return "the TOKENIZER_PATH and VOCAB_SIZE that made them"


def heldout_start(files: list[str], tokens: int) -> int:
    """Where the audit's held-out text starts in the last train shard: the first document start in
    its last `tokens` tokens (at most a quarter of the shard); the shard's size when `tokens` is 0.
    Training and calibration never read from there on (the memorization check scores it)."""
    shard = mapped_shard(files[-1])
    n = min(tokens, shard.size // 4)
    if not n:
        return shard.size
    starts = np.flatnonzero(shard[shard.size - n :] == BOS_ID)
    return shard.size - n + (int(starts[0]) if starts.size else 0)


def heldout_tokens(files: list[str], tokens: int) -> np.ndarray:
    return np.array(mapped_shard(files[-1])[heldout_start(files, tokens) :])


def mapped_shard(path: str) -> np.ndarray:
    return np.memmap(path, dtype="<u2", mode="r", offset=SHARD_HEADER_INTS * 4, shape=(shard_token_count(path),))


class DistributedTokenLoader:
    """Training batches: each micro-step takes the next world_size * (local + 1) tokens of the training
    stream and rank r keeps the r-th span of local + 1 (inputs and the targets one token on), so 1
    process with 8 micro-steps reads exactly what 8 processes with 1 micro-step read. A span never
    crosses a shard: the stream starts at a shard's first BOS and a shard's tail too short for a span
    is skipped (the record's loader reads the same tokens). With a FlashAttention backend a rank's
    micro-batch is one row of `local` tokens whose documents are cut at each BOS and every `seq_len`
    tokens, so a document across a row edge keeps its context; SDPA gets rows of `seq_len` and a mask.
    The last shard ends where the audit's held-out text starts (heldout_start). The next batches, their
    attention layout included, are prepared in a thread in pinned memory."""

    def __init__(self, data_path: str, rt: Runtime, seq_len: int, backend: str = "sdpa", isolate: bool = True, heldout: int = 0):
        self.files, self.rt, self.seq_len = shard_files(data_path, "train"), rt, seq_len
        self.stop = heldout_start(self.files, heldout)  # the last shard's held-out tail is the audit's
        self.backend, self.isolate = backend, isolate
        self.file_idx, self.tokens, self.cursor = -1, None, 0
        self.pool, self.pending = ThreadPoolExecutor(1), []

    @classmethod
    def for_model(cls, args: Hyperparameters, rt: Runtime, model: "GPT") -> "DistributedTokenLoader":
        """The loader of `model`'s training: its attention backend's layout, its document isolation."""
        return cls(args.data_path, rt, args.train_seq_len, model.attn_backend, model.cfg.doc_isolation, args.eval_audit_heldout_tokens)

    def _open_next_shard(self):
        self.file_idx = (self.file_idx + 1) % len(self.files)
        self.tokens = mapped_shard(self.files[self.file_idx])
        if self.file_idx == len(self.files) - 1:
            self.tokens = self.tokens[: self.stop]
        first_bos = np.flatnonzero(self.tokens[: 1 << 16] == BOS_ID)
        self.cursor = int(first_bos[0]) if first_bos.size else 0

    def _prepare(self, local: int):
        span = (local + 1) * self.rt.world_size
        for _ in range(len(self.files) + 1):
            if self.tokens is not None and self.cursor + span <= self.tokens.size:
                break
            self._open_next_shard()
        else:
            raise DataError(f"no training shard holds {span} tokens, the span of one micro-step; use fewer TRAIN_BATCH_TOKENS or larger shards")
        start = self.cursor + self.rt.rank * (local + 1)
        chunk = torch.from_numpy(self.tokens[start : start + local + 1].astype(np.int64))
        self.cursor += span
        row = local if self.backend != "sdpa" else self.seq_len
        if local % row:
            raise SettingsError(f"TRAIN_BATCH_TOKENS gives {local} tokens per micro-step, not a multiple of TRAIN_SEQ_LEN={self.seq_len}")
        x, y = chunk[:-1].view(-1, row), chunk[1:].view(-1, row)
        layout = layout_from_starts(segment_starts(x.numpy(), row, self.isolate, self.seq_len), tuple(x.shape), self.backend, self.seq_len)
        if self.rt.device.type == "cuda":
            x, y = x.pin_memory(), y.pin_memory()
            layout = layout._replace(**{k: getattr(layout, k).pin_memory() for k in ("cu_seqlens", "mask") if getattr(layout, k) is not None})
        return x, y, layout

    def next_batch(self, global_tokens: int, grad_accum_steps: int) -> tuple[Tensor, Tensor, AttentionLayout]:
        """This rank's next micro-batch: inputs, targets and their attention layout, on the device."""
        local = global_tokens // (self.rt.world_size * grad_accum_steps)
        self.pending = [f for f in self.pending if f[0] == local] or []  # batches prepared for another size are not used
        while len(self.pending) < 3:
            self.pending.append((local, self.pool.submit(self._prepare, local)))
        x, y, layout = self.pending.pop(0)[1].result()
        device = self.rt.device
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True), move_layout(layout, device)


def document_spans(tokens: Tensor) -> list[tuple[int, int]]:
    """[start, end) of each document: it starts at a BOS (or at 0) and ends at the next BOS.

    Its targets are tokens[start+1 : end+1], so the next document's BOS is its last target and the
    spans' targets together are exactly the flat stream's targets 1 .. N-1.
    """
    n = tokens.numel()
    starts = torch.nonzero(tokens[:-1] == BOS_ID).flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0] + starts
    ends = starts[1:] + [n - 1]
    return [(s, e) for s, e in zip(starts, ends) if e > s]


# ----------------------------------------------------------------------------- bytes: the official bpb accounting, or the byte sidecar

CASEOPS_OPERATORS = "\ue001\ue002\ue003\ue004"  # TITLE ALLCAPS CAPNEXT ESCAPE, the record's; = data/caseops.py OPERATORS (a test keeps the two equal)


@dataclass
class ByteTables:
    base_bytes: Tensor  # int16 [vocab]: UTF-8 bytes of the piece without its leading space marker
    has_leading_space: Tensor  # bool [vocab]: the piece starts with "▁"
    is_boundary: Tensor  # bool [vocab]: control/unknown/unused pieces (0 bytes, no space after them)
    # With a byte sidecar: the validation stream it belongs to and, per token, the original UTF-8 bytes
    # it stands for. A text transform (CaseOps) makes the pieces' own bytes wrong; the sidecar is not.
    sidecar_tokens: Tensor | None = None  # int64 [N]
    sidecar_bytes: Tensor | None = None  # int32 [N]

    def to(self, device) -> "ByteTables":
        if self.base_bytes.device == torch.device(device):
            return self
        return ByteTables(*(t if t is None else t.to(device) for t in (self.base_bytes, self.has_leading_space, self.is_boundary, self.sidecar_tokens, self.sidecar_bytes)))


def build_byte_tables(sp, vocab_size: int) -> ByteTables:
    """Tables of the official evaluator, from a SentencePiece processor."""
    if sp.vocab_size() != vocab_size:
        raise DataError(f"tokenizer has {sp.vocab_size()} pieces but VOCAB_SIZE={vocab_size}; set VOCAB_SIZE or TOKENIZER_PATH to match the shards")
    # Named as in the official script: static byte-count checkers look for `base_bytes[...] = len(piece.encode("utf-8"))`.
    base_bytes = np.zeros(vocab_size, dtype=np.int16)
    has_leading_space = np.zeros(vocab_size, dtype=np.bool_)
    is_boundary = np.zeros(vocab_size, dtype=np.bool_)
    for i in range(vocab_size):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            is_boundary[i] = True
            continue
        if sp.is_byte(i):
            base_bytes[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith("\u2581"):
            has_leading_space[i], piece = True, piece[1:]
        base_bytes[i] = len(piece.encode("utf-8"))
    return ByteTables(torch.from_numpy(base_bytes), torch.from_numpy(has_leading_space), torch.from_numpy(is_boundary))


def is_caseops_tokenizer(tokenizer_path: str) -> bool:
    """A CaseOps tokenizer holds each operator character as a piece of its own (reserved at training)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=tokenizer_path)
    return all(sp.id_to_piece(sp.piece_to_id(op)) == op for op in CASEOPS_OPERATORS)


def attach_byte_sidecar(tables: ByteTables, val_tokens: Tensor, data_path: str, tokenizer_path: str) -> ByteTables:
    """The tables, with the validation shards' byte sidecar when they have one (load_byte_sidecar's checks)."""
    sidecar = load_byte_sidecar(data_path, tokenizer_path)
    if sidecar is None:
        return tables
    sidecar = sidecar[: val_tokens.numel()].to(val_tokens.device)  # VAL_MAX_TOKENS cuts both alike
    rebuild = "so they do not describe these shards; rebuild the data with `python3 data/build_shards.py ... --caseops`"
    if bool((sidecar[val_tokens == BOS_ID] != 0).any()):
        raise DataError(f"the byte sidecars in DATA_PATH={data_path} charge bytes to a BOS token, {rebuild}")
    # Real sidecars charge about what the pieces spell (CaseOps operators spell 3 each): 0.92 of it on Wikipedia text, never half.
    charged, spelled = int(sidecar.sum()), int(target_bytes(val_tokens[:-1], val_tokens[1:], tables.to(val_tokens.device)).sum())
    if charged == 0 or 2 * charged < spelled:
        raise DataError(f"the byte sidecars in DATA_PATH={data_path} charge {charged} bytes to validation tokens whose pieces spell {spelled}, {rebuild}")
    return ByteTables(tables.base_bytes, tables.has_leading_space, tables.is_boundary, val_tokens, sidecar)


def load_tokenizer_tables(tokenizer_path: str, vocab_size: int) -> ByteTables:
    import sentencepiece as spm

    if not tokenizer_path:
        raise DataError("TOKENIZER_PATH is empty and DATA_PATH is not named <root>/datasets/fineweb10B_sp<V><suffix>, so no tokenizer is beside it; set TOKENIZER_PATH to the .model the shards were made with")
    if not os.path.isfile(tokenizer_path):
        raise DataError(f"tokenizer not found at TOKENIZER_PATH={tokenizer_path}; {DOWNLOAD_HINT}")
    try:
        sp = spm.SentencePieceProcessor(model_file=tokenizer_path)
    except (RuntimeError, OSError):
        raise DataError(f"TOKENIZER_PATH={tokenizer_path} is not a SentencePiece model; point it at the .model file the shards were made with") from None
    return build_byte_tables(sp, vocab_size)


def target_bytes(prev: Tensor, tgt: Tensor, tables: ByteTables) -> Tensor:
    """Bytes charged for predicting `tgt` after `prev`: base bytes plus a space unless prev is a boundary.
    The tables follow the tokens to their device (they are small; the tokens may be the whole stream)."""
    tables = tables.to(tgt.device)
    extra = tables.has_leading_space[tgt] & ~tables.is_boundary[prev]
    return tables.base_bytes[tgt].to(torch.int32) + extra.to(torch.int32)


def stream_target_bytes(tokens: Tensor, tables: ByteTables) -> Tensor:
    """Bytes of the target positions 1 .. N-1 of `tokens`: where every score ledger gets its bytes.

    When `tokens` is the validation stream of the byte sidecar (or its start, as the audit's probe),
    target position p is charged sidecar[p]; any other stream (compile warm-up, the audit's perturbed
    copy) and every run without a sidecar get the official count."""
    n, sidecar = tokens.numel(), tables.sidecar_tokens
    if sidecar is not None and n <= sidecar.numel() and torch.equal(tokens, sidecar[:n].to(tokens.device)):
        return tables.sidecar_bytes[1:n].to(tokens.device)
    return target_bytes(tokens[:-1], tokens[1:], tables)


def bits_per_byte(nll_sum_nats: float, byte_count: float) -> float:
    return nll_sum_nats / math.log(2.0) / byte_count


# ----------------------------------------------------------------------------- model


@dataclass
class ModelConfig:
    """The architecture; stored in the artifact so a model can be rebuilt from the file alone.
    Its values come from the settings of the same names (defaults live there only)."""

    vocab_size: int
    num_layers: int
    model_dim: int
    num_heads: int
    num_kv_heads: int
    mlp_mult: float
    mlp_act: str
    tie_embeddings: bool
    tied_embed_init_std: float
    rope_base: float
    rope_dims: int
    logit_softcap: float
    qk_gain_init: float
    smear_gate: bool
    smear_gate_mode: str
    gate_window: int
    attn_gate: bool
    attn_gate_scale: float
    xsa_last_n: int
    loop_start: int
    loop_end: int
    num_loops: int
    parallel_residual_start: int
    doc_isolation: bool
    ln_scale: bool
    ortho_init: bool
    bigram_vocab_size: int
    bigram_dim: int
    unet_skips: bool
    skip_gates: bool
    qat_bits: dict  # bits of the fake quantization per role (attn, mlp, other); 0 = QAT off, nothing computed
    embed_bf16: bool = False  # an older artifact's config has no such field

    @classmethod
    def from_args(cls, args: Hyperparameters) -> "ModelConfig":
        names = [f for f in cls.__dataclass_fields__ if f != "qat_bits"]
        on = args.qat_start > 0
        qat_bits = {"attn": args.quant_bits_attn * on, "mlp": args.quant_bits_mlp * on, "other": args.quant_bits_other * on}
        return cls(**{n: getattr(args, n) for n in names}, qat_bits=qat_bits)

    def layer_order(self, looping: bool) -> list[int]:
        """Block index of each virtual layer: with looping on, blocks LOOP_START..LOOP_END run 1 + NUM_LOOPS times."""
        if not looping or not self.num_loops:
            return list(range(self.num_layers))
        loop = list(range(self.loop_start, self.loop_end + 1))
        return list(range(self.loop_start)) + loop * (self.num_loops + 1) + list(range(self.loop_end + 1, self.num_layers))

    @property
    def num_virtual_layers(self) -> int:
        return len(self.layer_order(True))


def _flash_attention_module(backend: str):
    if backend == "fa3":
        import flash_attn_interface as module
    elif backend == "fa2":
        import flash_attn as module
    else:
        import torch.nn.attention.varlen as module  # PyTorch's own FlashAttention, torch >= 2.10
    return module


def _torch_varlen_options() -> dict | None:
    """Keyword arguments of torch's varlen_attn for a causal GQA call, by the installed signature (None
    below torch 2.10): 2.10 takes is_causal, later versions a window_size, 2.12 adds enable_gqa."""
    try:
        params = inspect.signature(_flash_attention_module("varlen").varlen_attn).parameters
    except (ImportError, AttributeError):
        return None
    options = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    return options | ({"enable_gqa": True} if "enable_gqa" in params else {})


TORCH_VARLEN_OPTIONS = _torch_varlen_options()


def select_attention_backend(choice: str, device: torch.device) -> str:
    """The first of FlashAttention-3 (Hopper), torch's varlen FlashAttention, FlashAttention-2 (both
    Ampere or newer) and SDPA that runs here; a forced choice that cannot is a one-line error."""
    if device.type != "cuda":
        if choice not in ("auto", "sdpa"):
            raise SettingsError(f"ATTN_BACKEND={choice} needs a CUDA GPU; use auto or sdpa")
        return "sdpa"
    major = torch.cuda.get_device_capability(device)[0]
    needs = {"fa3": 9, "varlen": 8, "fa2": 8, "sdpa": 0}
    for backend in ATTENTION_BACKENDS if choice == "auto" else (choice,):
        problem = f"compute capability {major}.x is below {needs[backend]}" if major < needs[backend] else None
        if problem is None and backend == "varlen" and TORCH_VARLEN_OPTIONS is None:
            problem = f"torch {torch.__version__} has no torch.nn.attention.varlen (torch >= 2.10)"
        elif problem is None and backend in ("fa3", "fa2"):
            try:
                _flash_attention_module(backend)
            except ImportError as e:
                problem = f"it cannot be imported ({e})"
        if problem is None:
            return backend
        if choice != "auto":
            raise SettingsError(f"ATTN_BACKEND={choice} cannot run: {problem}; use auto or sdpa")
    return "sdpa"


def document_start_mask(idx: Tensor) -> Tensor:
    """True where a token has no in-document predecessor in this window: position 0 and every BOS."""
    start = idx == BOS_ID
    start[:, 0] = True
    return start


class AttentionLayout(NamedTuple):
    """Where attention may look besides causality: within each segment of the (B, T) tokens. The
    FlashAttention backends take `cu_seqlens`, the int32 start of every segment of the flattened
    tokens, then B*T, padded with B*T; SDPA takes `mask` (B, 1, T, T). Neither: each row is one
    segment (plain causal attention)."""

    cu_seqlens: Tensor | None = None
    max_len: int = 0  # the longest a segment can be
    mask: Tensor | None = None


ONE_SEGMENT_PER_ROW = AttentionLayout()
CU_SEQLENS_MULTIPLE = 64  # cu_seqlens is padded to a multiple of this, so it takes few lengths


def segment_starts(tokens: np.ndarray, row_len: int, at_bos: bool, max_len: int = 0) -> np.ndarray:
    """Start offsets into the flattened tokens of the attention segments: every row start, every BOS
    when documents are isolated, and every `max_len` tokens into a segment (0 = no cut); then the
    end, repeated up to a multiple of CU_SEQLENS_MULTIPLE entries. The one definition of a segment:
    the training loader and every evaluation path take theirs from here."""
    flat = tokens.reshape(-1)
    n = flat.size
    start = np.zeros(n, dtype=bool)
    start[::row_len] = True
    if at_bos:
        start |= flat == BOS_ID
    starts = np.flatnonzero(start)
    if max_len:
        pieces = -(-np.diff(np.append(starts, n)) // max_len)
        first = np.repeat(np.cumsum(pieces) - pieces, pieces)
        starts = np.repeat(starts, pieces) + max_len * (np.arange(int(pieces.sum())) - first)
    size = -(-(starts.size + 1) // CU_SEQLENS_MULTIPLE) * CU_SEQLENS_MULTIPLE
    return np.concatenate([starts, np.full(size - starts.size, n)]).astype(np.int32)


def layout_from_starts(starts: np.ndarray, shape: tuple[int, int], backend: str, max_len: int = 0) -> AttentionLayout:
    """The layout of `segment_starts` for `backend`, on the CPU (the caller moves it)."""
    B, T = shape
    max_len = min(max_len or T, T)
    if backend != "sdpa":
        return AttentionLayout(torch.from_numpy(starts), max_len)
    first = np.zeros(B * T, dtype=np.int32)
    first[starts[starts < B * T]] = 1
    segment = torch.from_numpy(np.cumsum(first)).view(B, T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    return AttentionLayout(None, max_len, ((segment[:, :, None] == segment[:, None, :]) & causal).unsqueeze(1))


def move_layout(layout: AttentionLayout, device: torch.device) -> AttentionLayout:
    return layout._replace(**{k: getattr(layout, k).to(device, non_blocking=True) for k in ("cu_seqlens", "mask") if getattr(layout, k) is not None})


@torch.compiler.disable  # reads the tokens on the host: evaluation only; training gets its layout from the loader
def document_layout(idx: Tensor, backend: str) -> AttentionLayout:
    """Document isolation for tokens that come without a layout: segments start at each row and BOS."""
    return move_layout(layout_from_starts(segment_starts(idx.cpu().numpy(), idx.size(1), True), tuple(idx.shape), backend), idx.device)


def _varlen_attention(backend: str, q: Tensor, k: Tensor, v: Tensor, cu: Tensor, max_len: int) -> Tensor:
    """q: (N, H, D); k, v: (N, Hkv, D), segments at `cu`: FlashAttention's varlen call of `backend`."""
    module = _flash_attention_module(backend)
    if backend != "varlen":
        out = module.flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=True)
        return out[0] if isinstance(out, tuple) else out
    if "enable_gqa" not in TORCH_VARLEN_OPTIONS:  # before torch 2.12 K and V need every query head
        k, v = (t.repeat_interleave(q.size(1) // t.size(1), dim=1) for t in (k, v))
    return module.varlen_attn(q, k, v, cu, cu, max_len, max_len, **TORCH_VARLEN_OPTIONS)


def causal_attention(q: Tensor, k: Tensor, v: Tensor, backend: str, layout: AttentionLayout = ONE_SEGMENT_PER_ROW) -> Tensor:
    """q: (B, T, H, D); k, v: (B, T, Hkv, D) -> (B, T, H, D); causal, grouped-query, within the layout's segments."""
    B, T, H, D = q.shape
    if backend != "sdpa":
        q, k = q.to(v.dtype), k.to(v.dtype)  # autocast may keep the QK-norm's output in fp32; FlashAttention wants one dtype
        if layout.cu_seqlens is None and backend != "varlen":
            out = _flash_attention_module(backend).flash_attn_func(q, k, v, causal=True)
            return (out[0] if isinstance(out, tuple) else out).reshape(B, T, H, D)
        cu, max_len = layout.cu_seqlens, layout.max_len
        if cu is None:  # one segment per row
            cu, max_len = torch.arange(0, B * T + 1, T, dtype=torch.int32, device=q.device), T
        flat = lambda t: t.reshape(B * T, t.size(2), D)  # noqa: E731
        return _varlen_attention(backend, flat(q), flat(k), flat(v), cu, max_len).reshape(B, T, H, D)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if layout.mask is None:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    else:  # repeat the KV heads: the masked kernels do not all take enable_gqa
        k, v = (t.repeat_interleave(H // t.size(1), dim=1) for t in (k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=layout.mask)
    return y.transpose(1, 2)


def fake_quantize_rows(w: Tensor, bits: int) -> Tensor:
    """Per-row symmetric round-to-nearest onto the export grid (QAT forward)."""
    qmax = 2 ** (bits - 1) - 1
    scale = (w.detach().abs().amax(dim=1, keepdim=True) / qmax).clamp_min(1e-10)
    return (w / scale).round().clamp(-qmax, qmax) * scale


class CastedLinear(nn.Linear):
    """fp32 weight used in the activations' dtype; straight-through fake quantization when QAT is on.

    The QAT switch is a buffer, not a Python attribute, so a compiled graph reads it at run time
    instead of constant-folding the value it had when it was traced. With QAT_START=0 the layers
    get qat_bits=0 and no fake quantization is computed at all.
    """

    def __init__(self, in_features: int, out_features: int, qat_bits: int = 0, zero_init: bool = False):
        super().__init__(in_features, out_features, bias=False)
        self.qat_bits = qat_bits
        self.register_buffer("qat_on", torch.zeros(()), persistent=False)
        if zero_init:
            nn.init.zeros_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if self.qat_bits:
            w = w + self.qat_on * (fake_quantize_rows(w, self.qat_bits) - w).detach()
        return F.linear(x, w.to(x.dtype))


def rms_norm(x: Tensor) -> Tensor:
    return F.rms_norm(x, (x.size(-1),))


class Rotary(nn.Module):
    """RoPE on the first `rope_dims` of each head (all of them when rope_dims = 0)."""

    def __init__(self, head_dim: int, rope_dims: int, base: float):
        super().__init__()
        self.rope_dims = rope_dims or head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, self.rope_dims, 2, dtype=torch.float32) / self.rope_dims))
        # rounded to bf16 as in the record, whose model is cast to bf16 whole (its buffers too)
        self.register_buffer("inv_freq", inv_freq.bfloat16().float(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:  # x: (B, T, H, D)
        t = torch.arange(x.size(1), device=x.device, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq)
        cos, sin = freqs.cos()[None, :, None, :].to(x.dtype), freqs.sin()[None, :, None, :].to(x.dtype)
        rot, rest = x[..., : self.rope_dims], x[..., self.rope_dims :]
        x1, x2 = rot.chunk(2, dim=-1)
        rot = torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)
        return torch.cat((rot, rest), dim=-1) if rest.numel() else rot


class BatchedLoRA(nn.Module):
    """One low-rank delta per document of a batch: x (B, T, in) -> scale * x @ A[b] @ B[b]; B starts at
    zero, A uniform in +-1/sqrt(in) (the record's init)."""

    def __init__(self, batch: int, in_features: int, out_features: int, rank: int, scale: float = 1.0):
        super().__init__()
        self.A = nn.Parameter(torch.empty(batch, in_features, rank))
        self.B = nn.Parameter(torch.empty(batch, rank, out_features))
        self.scale = scale
        self.reset()

    @torch.no_grad()
    def reset(self, generator: torch.Generator | None = None):
        bound = 1.0 / math.sqrt(self.A.size(1))
        self.A.uniform_(-bound, bound, generator=generator)
        self.B.zero_()

    def forward(self, x: Tensor, rows: Tensor | None = None) -> Tensor:
        A, B = (self.A, self.B) if rows is None else (self.A[rows], self.B[rows])
        return self.scale * torch.bmm(torch.bmm(x, A.to(x.dtype)), B.to(x.dtype))


class DocumentAdapters(nn.Module):
    """Per-document TTT state: LoRA on the chosen projections of every virtual layer (a looped block
    gets one adapter per pass), on the LM head, and optionally a bias on each virtual layer's output.
    Passed to GPT.forward; the base weights never change. `rows` selects the documents (batch rows)
    a forward computes, so finished documents leave the batch."""

    def __init__(self, cfg: ModelConfig, batch: int, rank: int, head_rank: int, targets: list[str], block_bias: bool, alpha: float = 0.0):
        super().__init__()
        d, kv = cfg.model_dim, cfg.num_kv_heads * (cfg.model_dim // cfg.num_heads)
        out = {"q": d, "k": kv, "v": kv, "o": d, "mlp": d}
        layers = cfg.num_virtual_layers
        scale = lambda r: alpha / r if alpha else 1.0  # noqa: E731
        self.layers = nn.ModuleList(nn.ModuleDict({t: BatchedLoRA(batch, d, out[t], rank, scale(rank)) for t in targets}) for _ in range(layers))
        self.head = BatchedLoRA(batch, d, cfg.vocab_size, head_rank, scale(head_rank)) if head_rank else None
        self.bias = nn.Parameter(torch.zeros(batch, layers, 1, d)) if block_bias else None
        self.rows: Tensor | None = None

    def loras(self) -> list[BatchedLoRA]:
        return [m for m in self.modules() if isinstance(m, BatchedLoRA)]

    @torch.no_grad()
    def reset(self, seeds: int | list[int], shared_A: list[Tensor] | None = None):
        """Fresh adapters: B = 0 and bias = 0; A = `shared_A` in every row (a phase's warm A), else
        row i drawn from seeds[i] alone (an int s means s, s+1, ...). Either way a document's scores
        depend neither on the documents batched with it nor on the batch size or the world size."""
        loras = self.loras()
        if shared_A is not None:
            for m, a in zip(loras, shared_A):
                m.A.copy_(a.expand_as(m.A))
                m.B.zero_()
        elif loras:
            rows, device = loras[0].A.size(0), loras[0].A.device
            seeds = list(range(seeds, seeds + rows)) if isinstance(seeds, int) else seeds
            sizes = [m.A[0].numel() for m in loras]
            flat = torch.empty(len(seeds), sum(sizes), device=device)
            for i, seed in enumerate(seeds):
                flat[i].uniform_(-1.0, 1.0, generator=torch.Generator(device=device).manual_seed(seed))
            for m, part in zip(loras, flat.split(sizes, dim=1)):
                m.A[: len(seeds)].copy_(part.view(len(seeds), *m.A.shape[1:]) / math.sqrt(m.A.size(1)))
                m.B.zero_()
        if self.bias is not None:
            self.bias.zero_()

    def delta(self, layer: int, target: str, x: Tensor) -> Tensor | int:
        lora = self.layers[layer]
        return lora[target](x, self.rows) if target in lora else 0

    def head_delta(self, x: Tensor) -> Tensor | int:
        return 0 if self.head is None else self.head(x, self.rows)

    def layer_bias(self, layer: int, dtype: torch.dtype) -> Tensor | int:
        if self.bias is None:
            return 0
        return (self.bias if self.rows is None else self.bias[self.rows])[:, layer].to(dtype)


def remove_value_component(y: Tensor, v: Tensor) -> Tensor:
    """XSA: subtract from each head's output its projection on that head's own value vector.
    y: (B, T, H, D), v: (B, T, Hkv, D); query heads of a group share their KV head's value."""
    B, T, H, D = y.shape
    y = y.view(B, T, v.size(2), H // v.size(2), D)
    vn = F.normalize(v, dim=-1).unsqueeze(3)
    return (y - (y * vn).sum(-1, keepdim=True) * vn).view(B, T, H, D)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int, backend: str):
        super().__init__()
        self.backend = backend
        self.num_heads, self.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
        self.head_dim = cfg.model_dim // cfg.num_heads
        kv_dim, bits = self.num_kv_heads * self.head_dim, cfg.qat_bits["attn"]
        self.c_q = CastedLinear(cfg.model_dim, cfg.model_dim, bits)
        self.c_k = CastedLinear(cfg.model_dim, kv_dim, bits)
        self.c_v = CastedLinear(cfg.model_dim, kv_dim, bits)
        self.proj = CastedLinear(cfg.model_dim, cfg.model_dim, bits, zero_init=True)
        self.q_gain = nn.Parameter(torch.full((cfg.num_heads,), cfg.qk_gain_init))
        self.rotary = Rotary(self.head_dim, cfg.rope_dims, cfg.rope_base)
        self.xsa = index >= cfg.num_layers - cfg.xsa_last_n
        self.gate_window, self.gate_scale = min(cfg.gate_window, cfg.model_dim), cfg.attn_gate_scale
        # Sparse output gate: per head, sigmoid(scale * W x[:window]); W = 0 opens every head halfway.
        self.out_gate = nn.Parameter(torch.zeros(cfg.num_heads, self.gate_window)) if cfg.attn_gate else None

    def forward(self, x: Tensor, layout: AttentionLayout, adapters: DocumentAdapters | None, layer: int) -> Tensor:
        B, T, _ = x.shape
        q, k, v = self.c_q(x), self.c_k(x), self.c_v(x)
        if adapters is not None:
            q, k, v = (t + adapters.delta(layer, name, x) for name, t in (("q", q), ("k", k), ("v", v)))
        q = rms_norm(q.view(B, T, self.num_heads, self.head_dim))
        k = rms_norm(k.view(B, T, self.num_kv_heads, self.head_dim))
        q, k = self.rotary(q), self.rotary(k)
        q = q * self.q_gain.to(q.dtype)[None, None, :, None]
        v = v.view(B, T, self.num_kv_heads, self.head_dim)
        y = causal_attention(q, k, v, self.backend, layout)
        if self.xsa:
            y = remove_value_component(y, v)
        if self.out_gate is not None:
            gate = torch.sigmoid(self.gate_scale * F.linear(x[..., : self.gate_window], self.out_gate.to(x.dtype)))
            y = y * gate.unsqueeze(-1)
        out = self.proj(y.reshape(B, T, -1))
        return out if adapters is None else out + adapters.delta(layer, "o", x)  # the O adapter reads the block's normed input, as the record's


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden, bits = int(cfg.mlp_mult * cfg.model_dim), cfg.qat_bits["mlp"]
        self.leaky = cfg.mlp_act == "leaky_relu2"
        self.fc = CastedLinear(cfg.model_dim, hidden, bits)
        self.proj = CastedLinear(hidden, cfg.model_dim, bits, zero_init=True)

    def forward(self, x: Tensor, adapters: DocumentAdapters | None, layer: int) -> Tensor:
        h = self.fc(x)
        h = (F.leaky_relu(h, 0.5) if self.leaky else F.relu(h)).square()
        out = self.proj(h)
        return out if adapters is None else out + adapters.delta(layer, "mlp", x)


class Block(nn.Module):
    """Attention then MLP on one residual stream, or (parallel residuals) on two lanes: attention
    reads lane 0, the MLP lane 1, and both outputs are written into both lanes with learned weights."""

    def __init__(self, cfg: ModelConfig, index: int, backend: str):
        super().__init__()
        d = cfg.model_dim
        self.attn = CausalSelfAttention(cfg, index, backend)
        self.mlp = MLP(cfg)
        self.attn_scale = nn.Parameter(torch.ones(d))
        self.mlp_scale = nn.Parameter(torch.ones(d))
        self.resid_mix = nn.Parameter(torch.stack((torch.ones(d), torch.zeros(d))))  # how much of x0 re-enters
        self.norm_scale = 1.0 / math.sqrt(index + 1) if cfg.ln_scale else 1.0

    def mix_in(self, x: Tensor, x0: Tensor) -> Tensor:
        mix = self.resid_mix.to(x.dtype)
        return mix[0] * x + mix[1] * x0

    def attend(self, x: Tensor, layout, adapters, layer: int) -> Tensor:
        return self.attn_scale.to(x.dtype) * self.attn(rms_norm(x) * self.norm_scale, layout, adapters, layer)

    def feed_forward(self, x: Tensor, adapters, layer: int) -> Tensor:
        return self.mlp_scale.to(x.dtype) * self.mlp(rms_norm(x) * self.norm_scale, adapters, layer)

    def forward(self, x: Tensor, x0: Tensor, layout: AttentionLayout, adapters: DocumentAdapters | None, layer: int) -> Tensor:
        x = self.mix_in(x, x0)
        x = x + self.attend(x, layout, adapters, layer)
        x = x + self.feed_forward(x, adapters, layer)
        return x if adapters is None else x + adapters.layer_bias(layer, x.dtype)

    def forward_lanes(self, lanes: tuple[Tensor, Tensor], x0: Tensor, layout, adapters, layer: int, resid: Tensor, post: Tensor) -> tuple[Tensor, Tensor]:
        """resid (2,): each lane's carry-over; post (2, 2): post[i, j] = weight of output i (attention, MLP) in lane j.
        As in the record, only the attention lane mixes x0 back in; the MLP reads lane 1 as it is."""
        a = self.attend(self.mix_in(lanes[0], x0), layout, adapters, layer)
        m = self.feed_forward(lanes[1], adapters, layer)
        resid, post = resid.to(a.dtype), post.to(a.dtype)
        bias = 0 if adapters is None else adapters.layer_bias(layer, a.dtype)
        return tuple(resid[j] * lanes[j] + post[0, j] * a + post[1, j] * m + bias for j in (0, 1))


class SmearGate(nn.Module):
    """Mixes the previous token's vector into the current one; the previous-token term is zero at a
    document start (position 0 and every BOS), identically in training, evaluation and TTT.

    mode 'input' (on the raw embedding): x_t += scale * sigmoid(w . x_t[:window]) * x_{t-1}, w and scale zero-init.
    mode 'dim' (after the first norm): x_t <- (1-g) x_t + g x_{t-1}, g a learned per-dimension gate.
    """

    def __init__(self, dim: int, mode: str, window: int):
        super().__init__()
        self.mode, self.window = mode, min(window, dim)
        self.gate = nn.Parameter(torch.zeros(self.window if mode == "input" else dim))
        self.scale = nn.Parameter(torch.zeros(())) if mode == "input" else None

    def forward(self, x: Tensor, idx: Tensor) -> Tensor:
        prev = F.pad(x[:, :-1], (0, 0, 1, 0)) * (~document_start_mask(idx)).unsqueeze(-1).to(x.dtype)
        if self.mode == "input":
            g = torch.sigmoid((x[..., : self.window] * self.gate.to(x.dtype)).sum(-1, keepdim=True))
            return x + self.scale.to(x.dtype) * g * prev
        g = torch.sigmoid(self.gate).to(x.dtype)
        return (1 - g) * x + g * prev


class BigramHash(nn.Module):
    """Embedding of a hash of (previous, current) token; the last row stands for 'no previous token'."""

    def __init__(self, buckets: int, dim: int, model_dim: int, qat_bits: int):
        super().__init__()
        self.buckets = buckets
        self.table = nn.Embedding(buckets, dim)
        nn.init.normal_(self.table.weight, std=0.02)
        self.proj = CastedLinear(dim, model_dim, qat_bits, zero_init=True)
        self.scale = nn.Parameter(torch.tensor(0.05))

    def bucket_ids(self, idx: Tensor) -> Tensor:
        prev = F.pad(idx[:, :-1], (1, 0))
        h = torch.bitwise_xor(36313 * idx, 27191 * prev) % (self.buckets - 1)
        return torch.where(document_start_mask(idx), self.buckets - 1, h)

    def forward(self, idx: Tensor) -> Tensor:
        return self.scale.to(self.proj.weight.dtype) * self.proj(self.table(self.bucket_ids(idx)))


def softcapped_logits(z: Tensor, cap: float) -> Tensor:
    """The LM head's output z as fp32 logits cap * tanh(z / cap) (cap 0: z)."""
    z = z.float()
    return cap * torch.tanh(z / cap) if cap else z


class SoftcappedCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy of softcapped_logits(z), z (N, V) in any float dtype. It keeps z and one
    log-normalizer per token for the backward, which recomputes the fp32 logits: a compiled step fuses
    each pass into one read of z, so the (N, V) fp32 logits are never stored."""

    @staticmethod
    def forward(ctx, z: Tensor, targets: Tensor, cap: float) -> Tensor:
        logits = softcapped_logits(z, cap)
        lse = torch.logsumexp(logits, dim=-1)
        ctx.save_for_backward(z, targets, lse)
        ctx.cap = cap
        return lse - logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        z, targets, lse = ctx.saved_tensors
        logits = softcapped_logits(z, ctx.cap)
        dlogits = torch.exp(logits - lse.unsqueeze(-1))
        dlogits.scatter_add_(-1, targets.unsqueeze(-1), torch.full_like(lse, -1.0).unsqueeze(-1))
        if ctx.cap:
            dlogits = dlogits * (1 - (logits / ctx.cap).square())
        return (dlogits * grad.unsqueeze(-1)).to(z.dtype), None, None


class GPT(nn.Module):
    """The one forward pass of training, every evaluation path and TTT (adapters = None or per-document LoRA).

    Virtual layers: `cfg.layer_order(self.looping)` lists the block run at each depth; the first
    half pushes U-Net skips, the second half pops them. `looping` is a plain attribute: a compiled
    model keeps one graph per value, both compiled in the untimed warm-up.
    """

    def __init__(self, cfg: ModelConfig, attn_backend: str = "sdpa"):
        super().__init__()
        self.cfg, self.attn_backend = cfg, attn_backend
        self.looping = cfg.num_loops > 0
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.model_dim)
        nn.init.normal_(self.tok_emb.weight, std=cfg.tied_embed_init_std)
        self.bigram = BigramHash(cfg.bigram_vocab_size, cfg.bigram_dim, cfg.model_dim, cfg.qat_bits["other"]) if cfg.bigram_vocab_size else None
        self.smear = SmearGate(cfg.model_dim, cfg.smear_gate_mode, cfg.gate_window) if cfg.smear_gate else None
        self.blocks = nn.ModuleList(Block(cfg, i, attn_backend) for i in range(cfg.num_layers))
        num_skips = max(len(cfg.layer_order(looping)) // 2 for looping in (False, True))
        self.skip_weights = nn.Parameter(torch.ones(num_skips, cfg.model_dim)) if cfg.unet_skips and num_skips else None
        self.skip_gates = nn.Parameter(torch.zeros(num_skips, cfg.model_dim)) if self.skip_weights is not None and cfg.skip_gates else None
        parallel = 0 <= cfg.parallel_residual_start < cfg.num_layers
        self.lane_resid = nn.Parameter(torch.full((cfg.num_layers, 2), 1.1)) if parallel else None
        self.lane_post = nn.Parameter(torch.ones(cfg.num_layers, 2, 2)) if parallel else None
        self.lm_head = None if cfg.tie_embeddings else CastedLinear(cfg.model_dim, cfg.vocab_size, zero_init=True)
        self.head_input = nn.Identity()  # hook point: the LM head's input, whose Hessian GPTQ uses for the tied embedding
        if cfg.ortho_init:
            for block in self.blocks:
                for linear in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.fc):
                    nn.init.orthogonal_(linear.weight)
        with torch.no_grad():  # the record's initial values: it casts its model to bf16 whole before training
            for p in self.parameters():
                p.copy_(p.bfloat16())

    def embed(self, idx: Tensor) -> Tensor:
        x = self.tok_emb(idx)
        if self.cfg.embed_bf16 and x.is_cuda:  # the record's bf16 embedding: the residual stream is bf16 from here
            x = x.bfloat16()
        if self.bigram is not None:
            x = x + self.bigram(idx).to(x.dtype)
        if self.smear is not None and self.smear.mode == "input":
            x = self.smear(x, idx)
        x = rms_norm(x)
        if self.smear is not None and self.smear.mode == "dim":
            x = self.smear(x, idx)
        return x

    def add_skip(self, x: Tensor, skip: Tensor, j: int) -> Tensor:
        scaled = self.skip_weights[j].to(x.dtype) * skip
        if self.skip_gates is None:
            return x + scaled
        return torch.lerp(scaled, x, torch.sigmoid(self.skip_gates[j]).to(x.dtype))

    def forward(self, idx: Tensor, targets: Tensor | None = None, adapters: DocumentAdapters | None = None,
                layout: AttentionLayout | None = None, reduction: str = "mean") -> Tensor:
        """Logits (B, T, V) in fp32; with targets, their cross-entropy (the mean, or (B, T) with
        reduction="none"). `layout`: where attention may look; None derives it from the BOS in idx
        (document isolation) or, with DOC_ISOLATION=0, attends over each whole row."""
        if layout is None:
            layout = document_layout(idx, self.attn_backend) if self.cfg.doc_isolation else ONE_SEGMENT_PER_ROW
        x = self.embed(idx)
        order = self.cfg.layer_order(self.looping)
        num_encoder = len(order) // 2
        x0, skips, lanes = x, [], None
        for layer, i in enumerate(order):
            block = self.blocks[i]
            if lanes is None and self.lane_resid is not None and i >= self.cfg.parallel_residual_start:
                lanes = (x, x)
            if self.skip_weights is not None and layer >= num_encoder and skips:
                skip, j = skips.pop(), layer - num_encoder
                if lanes is None:
                    x = self.add_skip(x, skip, j)
                else:  # as in the record: into the attention lane only
                    lanes = (self.add_skip(lanes[0], skip, j), lanes[1])
            if lanes is None:
                x = block(x, x0, layout, adapters, layer)
            else:
                lanes = block.forward_lanes(lanes, x0, layout, adapters, layer, self.lane_resid[i], self.lane_post[i])
            if self.skip_weights is not None and layer < num_encoder:
                skips.append(x if lanes is None else 0.5 * (lanes[0] + lanes[1]))
        x = self.head_input(rms_norm(x if lanes is None else 0.5 * (lanes[0] + lanes[1])))
        head = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        z = F.linear(x, head.to(x.dtype))
        if adapters is not None:
            z = z + adapters.head_delta(x)
        if targets is None:
            return softcapped_logits(z, self.cfg.logit_softcap)
        nll = SoftcappedCrossEntropy.apply(z.reshape(-1, z.size(-1)), targets.reshape(-1), self.cfg.logit_softcap).view_as(targets)
        return nll if reduction == "none" else nll.mean()

    def set_qat(self, enabled: bool):
        for m in self.modules():
            if isinstance(m, CastedLinear):
                m.qat_on.fill_(float(enabled))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- optimizer: Muon, Adam groups, LR schedule


NEWTON_SCHULZ_COEFFS = {
    # One (a, b, c) per iteration, X <- a X + (b A + c A^2) X with A = X X^T; the last repeats.
    "classic": ((3.4445, -4.7750, 2.0315),),
    # Polar Express (Amsel et al. 2025): minimax-tuned per iteration (the record's five tuples).
    "polar_express": (
        (8.156554524902461, -22.48329292557795, 15.878769915207462),
        (4.042929935166739, -2.808917465908714, 0.5000178451051316),
        (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
        (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
        (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
    ),
}


def newton_schulz_orthogonalize(G: Tensor, steps: int, coeffs: str = "classic", eps: float = 1e-7) -> Tensor:
    """Quintic Newton-Schulz iteration towards the nearest semi-orthogonal matrix, in G's dtype; a
    stack of matrices (..., rows, cols) is orthogonalized matrix by matrix. Input scaled by 1/||G||."""
    table = NEWTON_SCHULZ_COEFFS[coeffs]
    X = G / (G.norm(dim=(-2, -1), keepdim=True) + eps)
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    for i in range(steps):
        a, b, c = table[min(i, len(table) - 1)]
        A = X @ X.mT
        X = a * X + (b * A + c * (A @ A)) @ X
    return X.mT if transposed else X


class Muon(torch.optim.Optimizer):
    """Momentum on the gradient, then its orthogonalization (Nesterov, decoupled weight decay;
    MuonEq-R: each row of the update normalized first).

    The work is sharded: matrices of one shape are stacked, one reduce-scatter hands rank r the
    averaged gradients of its slice only (`reduce_gradients`), rank r keeps the momentum of and
    orthogonalizes only those, and one all-gather shares the updates (`step`). Nothing else
    synchronizes the matrices' gradients. All of it in `dtype`: bf16 on GPUs, as the record. The
    collectives are asynchronous: a bucket's all-gather overlaps the next bucket's Newton-Schulz.
    """

    def __init__(self, params, lr: float, momentum: float, backend_steps: int, weight_decay: float = 0.0, nesterov: bool = True,
                 row_normalize: bool = False, coeffs: str = "classic", rt: Runtime | None = None, dtype: torch.dtype = torch.float32):
        super().__init__(params, dict(lr=lr, momentum=momentum, backend_steps=backend_steps, weight_decay=weight_decay, nesterov=nesterov))
        self.rt = rt or Runtime()
        self.row_normalize, self.coeffs, self.dtype = row_normalize, coeffs, dtype
        self.buckets = {}  # (group, shape) -> params of that shape, stacked in this order
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                self.buckets.setdefault((gi, tuple(p.shape)), []).append(p)
        self.local_grads: dict = {}  # bucket -> this rank's slice of the averaged gradients

    def _slice(self, n: int) -> tuple[int, int]:
        per_rank = -(-n // self.rt.world_size)
        return per_rank, per_rank * self.rt.rank

    @torch.no_grad()
    def reduce_gradients(self) -> Tensor:
        """Average the matrices' gradients over ranks into each rank's own slice; returns the
        squared norm of all of them (summed over ranks) for gradient clipping."""
        sq = torch.zeros((), device=self.param_groups[0]["params"][0].device)
        pending = []  # every bucket's reduce-scatter is in flight before the first is waited on
        for key, params in self.buckets.items():
            per_rank, first = self._slice(len(params))
            grads = torch.stack([(p.grad if p.grad is not None else torch.zeros_like(p)).to(self.dtype) for p in params])
            work = None
            if self.rt.distributed:
                grads = F.pad(grads, (0, 0, 0, 0, 0, per_rank * self.rt.world_size - len(params)))
                local = torch.empty_like(grads[:per_rank])
                work = _reduce_scatter(local, grads, async_op=True)
            else:
                local = grads
            pending.append((key, local[: max(0, min(per_rank, len(params) - first))], work))
        for key, local, work in pending:
            if work is not None:
                work.wait()
                local /= self.rt.world_size
            self.local_grads[key] = local
            sq += local.float().square().sum()
        if self.rt.distributed:
            dist.all_reduce(sq)
        return sq

    @torch.no_grad()
    def step(self, grad_scale: float | Tensor = 1.0):
        """Apply the update to every matrix; `grad_scale` is the clipping factor of the gradients."""
        if not self.local_grads:
            self.reduce_gradients()
        gathers = []
        for (gi, shape), params in self.buckets.items():
            group = self.param_groups[gi]
            per_rank, first = self._slice(len(params))
            local = self.local_grads.pop((gi, shape))
            updates = torch.zeros((per_rank * self.rt.world_size, *shape), device=params[0].device, dtype=self.dtype)
            if len(local):
                mine = []
                for j, g in enumerate(local):
                    g = g * grad_scale
                    buf = self.state[params[first + j]].setdefault("momentum_buffer", torch.zeros_like(g))
                    buf.mul_(group["momentum"]).add_(g)
                    mine.append(g.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf)
                g = torch.stack(mine)
                if self.row_normalize:
                    g = g / g.float().norm(dim=-1, keepdim=True).clamp_min(1e-7).to(g.dtype)
                g = newton_schulz_orthogonalize(g, group["backend_steps"], self.coeffs)
                updates[first : first + len(local)] = g * max(1.0, shape[0] / shape[1]) ** 0.5
            work = _all_gather(updates, updates[first : first + per_rank].clone(), async_op=True) if self.rt.distributed else None
            gathers.append((group, params, updates, work))  # the next bucket's Newton-Schulz runs while this one gathers
        for group, params, updates, work in gathers:
            if work is not None:
                work.wait()
            for p, u in zip(params, updates):
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(u.to(p.dtype), alpha=-group["lr"])


# torch >= 2.12 renames the tensor collectives; older GPU images have only the old names.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@torch.no_grad()
def average_gradients(params: list[Tensor], rt: Runtime) -> Tensor:
    """All-reduce (mean) the gradients not handled by Muon, as one flat buffer; returns their squared norm."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=rt.device)
    if rt.distributed:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= rt.world_size
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))
    return sum(g.float().square().sum() for g in grads)


@torch.no_grad()
def reduce_and_clip_gradients(other_params: list[Tensor], muon: Muon | None, args: Hyperparameters, rt: Runtime) -> float | Tensor:
    """Average every gradient over ranks and clip it to GRAD_CLIP_NORM; returns the factor Muon's step
    still has to apply. rank (the record): each rank clips its own gradient before the averaging;
    global: the averaged gradient is clipped, so a run does not depend on the GPU count. Equal on one GPU."""
    by_rank = args.grad_clip_norm > 0 and args.grad_clip_scope == "rank"
    if by_rank:
        matrices = [p for g in muon.param_groups for p in g["params"]] if muon is not None else []
        torch.nn.utils.clip_grad_norm_(other_params + matrices, args.grad_clip_norm)
    grad_sq = average_gradients(other_params, rt) + (muon.reduce_gradients() if muon is not None else 0.0)
    if args.grad_clip_norm <= 0 or by_rank:
        return 1.0
    clip = (args.grad_clip_norm / (grad_sq.sqrt() + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_([p.grad for p in other_params if p.grad is not None], clip)
    return clip


CONTROL_PARAMETER_NAMES = (
    "q_gain", "attn_scale", "mlp_scale", "resid_mix", "skip_weights", "skip_gates", "lane_resid", "lane_post",
    "out_gate", "smear.gate", "smear.scale", "bigram.scale",
)


def build_optimizers(model: GPT, args: Hyperparameters, rt: Runtime) -> list[torch.optim.Optimizer]:
    """Muon for 2-D block matrices; AdamW for embeddings (EMBED_WD) and for gains, gates and scales (ADAM_WD)."""
    matrices, scalars = [], []
    for name, p in model.named_parameters():
        if name.startswith(("tok_emb", "lm_head", "bigram.table")):
            continue
        (scalars if p.ndim < 2 or any(c in name for c in CONTROL_PARAMETER_NAMES) else matrices).append(p)
    fused = {"fused": True} if rt.device.type == "cuda" else {}
    adam = dict(betas=(args.beta1, args.beta2), eps=args.adam_eps, **fused)
    embed_lr = args.tied_embed_lr if args.tie_embeddings else args.embed_lr
    embeddings = [{"params": [model.tok_emb.weight], "lr": embed_lr, "base_lr": embed_lr}]
    if model.bigram is not None:
        embeddings.append({"params": [model.bigram.table.weight], "lr": embed_lr, "base_lr": embed_lr})
    if model.lm_head is not None:
        embeddings.append({"params": [model.lm_head.weight], "lr": args.head_lr, "base_lr": args.head_lr})
    optimizers = [
        torch.optim.AdamW(embeddings, weight_decay=args.embed_wd, **adam),
        torch.optim.AdamW([{"params": scalars, "lr": args.scalar_lr, "base_lr": args.scalar_lr}], weight_decay=args.adam_wd, **adam),
    ]
    if matrices:
        muon = Muon(matrices, args.matrix_lr, args.muon_momentum, args.muon_backend_steps, args.muon_wd,
                    row_normalize=args.muon_row_normalize, coeffs=args.muon_ns_coeffs, rt=rt,
                    dtype=torch.bfloat16 if rt.device.type == "cuda" else torch.float32)
        for g in muon.param_groups:
            g["base_lr"] = args.matrix_lr
        optimizers.append(muon)
    return optimizers


def training_progress(step: int, elapsed_ms: float, args: Hyperparameters, budget_ms: float) -> float:
    """Fraction of the training budget used: of the wall clock when there is a cap, else of ITERATIONS (the larger)."""
    progress = step / args.iterations
    return max(progress, elapsed_ms / budget_ms) if budget_ms > 0 else progress


def lr_multiplier(step: int, elapsed_ms: float, args: Hyperparameters, budget_ms: float) -> float:
    """1 until the warm-down, then linear to 0 (floored at MIN_LR) at the end of the budget.

    The budget is the wall clock when there is a cap, else ITERATIONS; WARMDOWN_ITERS > 0 uses the
    baseline's rule (the last N steps, estimated from the average step time).
    """
    if args.warmdown_iters > 0:
        if budget_ms > 0:
            step_ms = elapsed_ms / max(step, 1)
            remaining = max(budget_ms - elapsed_ms, 0.0) / max(args.warmdown_iters * step_ms, 1e-9)
        else:
            remaining = (args.iterations - step) / args.warmdown_iters
    elif args.warmdown_frac > 0:
        remaining = (1.0 - training_progress(step, elapsed_ms, args, budget_ms)) / args.warmdown_frac
    else:
        remaining = 1.0
    return max(min(remaining, 1.0), args.min_lr)


# ----------------------------------------------------------------------------- training: warm-up, step loop, averaging, calibration


def compiled(model: nn.Module, args: Hyperparameters, rt: Runtime, **options) -> nn.Module:
    """torch.compile (inductor) of the model on CUDA with COMPILE=1; elsewhere the model itself."""
    return torch.compile(model, **options) if args.compile and rt.device.type == "cuda" else model


def autocast_context(device: torch.device):
    """bf16 autocast on CUDA; exact fp32 on CPU (the causality audit compares bit for bit there)."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class WeightAverager:
    """EMA of every weight after each step, and SWA: a uniform average of snapshots taken every
    SWA_EVERY steps once the LR multiplier is below SWA_START_FRAC."""

    def __init__(self, model: nn.Module, ema_decay: float, swa_enabled: bool, swa_every: int, swa_start_frac: float):
        state = model.state_dict()
        self.names, self.live = list(state), [t for t in state.values()]  # share storage with the parameters
        self.ema_decay = ema_decay
        self.ema = [t.detach().float().clone() for t in self.live] if ema_decay > 0 else None
        self.swa_enabled, self.swa_every, self.swa_start_frac = swa_enabled, swa_every, swa_start_frac
        self.swa_sum, self.swa_count = None, 0
        self.steps = 0  # training steps averaged so far

    @torch.no_grad()
    def update(self, step: int, lr_mul: float):
        self.steps = step + 1
        live = [t.float() for t in self.live]
        if self.ema is not None:
            torch._foreach_lerp_(self.ema, live, 1.0 - self.ema_decay)
        if self.swa_enabled and lr_mul < self.swa_start_frac and step % self.swa_every == 0:
            if self.swa_sum is None:
                self.swa_sum = [t.clone() for t in live]
            else:
                torch._foreach_add_(self.swa_sum, live)
            self.swa_count += 1

    def export(self) -> tuple[str, dict[str, Tensor]]:
        """The weights to quantize: SWA if it took snapshots, else the EMA, else the raw weights."""
        if self.swa_count:
            return "swa", {n: (s / self.swa_count).to(t.dtype) for n, s, t in zip(self.names, self.swa_sum, self.live)}
        if self.ema is not None:
            return "ema", {n: e.to(t.dtype) for n, e, t in zip(self.names, self.ema, self.live)}
        return "raw", {n: t.detach().clone() for n, t in zip(self.names, self.live)}


class TrainingDiverged(RuntimeError):
    """A non-finite training loss: the weights are lost, and no resume command can help."""


@dataclass
class TrainResult:
    steps: int
    train_time_ms: float  # step loop plus in-budget calibration
    stopped_early: bool
    exported_weights: str
    hessians: dict | None


def gptq_target_modules(model: GPT) -> dict[str, nn.Module]:
    """For each weight GPTQ quantizes (by state-dict name), the module whose input it multiplies: every
    CastedLinear, and for a tied embedding the LM head's input."""
    targets = {f"{name}.weight": m for name, m in model.named_modules() if isinstance(m, CastedLinear)}
    if model.lm_head is None:
        targets["tok_emb.weight"] = model.head_input
    return targets


@torch.no_grad()
def collect_hessians(model: GPT, batches, rt: Runtime) -> dict[str, Tensor]:
    """H = mean of x^T x over every input row x of each GPTQ target (a looped block's layers see each
    token once per pass), summed over ranks."""
    targets = gptq_target_modules(model)
    params = dict(model.named_parameters())
    hessians = {n: torch.zeros(params[n].size(1), params[n].size(1), device=rt.device) for n in targets}
    counts = torch.zeros(len(targets), device=rt.device)

    def hook(k, name):
        def accumulate(module, inputs, output):
            x = inputs[0].reshape(-1, inputs[0].size(-1)).float()
            hessians[name].addmm_(x.T, x)
            counts[k] += x.size(0)

        return accumulate

    handles = [m.register_forward_hook(hook(k, n)) for k, (n, m) in enumerate(targets.items())]
    try:
        for x in batches:
            with autocast_context(rt.device):
                model(x)
    finally:
        for h in handles:
            h.remove()
    if rt.distributed:
        for h in hessians.values():
            dist.all_reduce(h)
        dist.all_reduce(counts)
    return {n: h / counts[k].clamp_min(1) for k, (n, h) in enumerate(hessians.items())}


@torch.no_grad()
def generate_calibration_batches(model: GPT, num_seqs: int, seq_len: int, temperature: float, rt: Runtime, seed: int, batch: int = 16):
    """Sequences the model writes itself (from BOS, sampled at `temperature`): calibration without data."""
    local = max(1, num_seqs // rt.world_size)
    gen = torch.Generator(device=rt.device).manual_seed(seed + rt.rank)
    for start in range(0, local, batch):
        seqs = torch.full((min(batch, local - start), 1), BOS_ID, dtype=torch.long, device=rt.device)
        for _ in range(seq_len - 1):
            with autocast_context(rt.device):
                logits = model(seqs)[:, -1]
            probs = torch.softmax(logits / temperature, dim=-1)
            seqs = torch.cat((seqs, torch.multinomial(probs, 1, generator=gen)), dim=1)
        yield seqs


def train_batches_for_calibration(loader: DistributedTokenLoader, args: Hyperparameters, rt: Runtime):
    """Training tokens after the last step's (never validation data), as rows of TRAIN_SEQ_LEN taken
    from training micro-batches: GPTQ_CALIB_SEQS rows, all ranks together."""
    left = max(1, args.gptq_calib_seqs // rt.world_size)
    while left > 0:
        x = loader.next_batch(args.train_batch_tokens, rt.grad_accum_steps)[0].view(-1, args.train_seq_len)[:left]
        left -= x.size(0)
        yield x


def gptq_reserve_seconds(model: GPT, args: Hyperparameters, rt: Runtime, log, new_loader) -> float:
    """Seconds the step loop leaves for calibration inside the cap: GPTQ_RESERVE_SECONDS, or with auto
    what one calibration pass (from the start of the training stream, before training) takes, with margin."""
    if args.gptq_reserve_seconds != "auto":
        return float(args.gptq_reserve_seconds)
    t0 = sync_time(rt)
    collect_hessians(model, train_batches_for_calibration(new_loader(), args, rt), rt)
    measured = sync_time(rt) - t0
    reserve = 1.25 * measured + 1.0
    log(f"gptq_reserve:{reserve:.1f}s (auto: 1.25 x {measured:.1f}s, one calibration pass measured before training, + 1 s)")
    return reserve


def train_progress_line(step: int, args: Hyperparameters, loss: Tensor, elapsed_ms: float) -> str:
    tok_s = step * args.train_batch_tokens / max(elapsed_ms / 1000.0, 1e-9)
    return f"step:{step}/{args.iterations} train_loss:{loss.item():.4f} train_time:{elapsed_ms:.0f}ms step_avg:{elapsed_ms / step:.2f}ms tok_s:{tok_s:.0f}"


def train_model(model: GPT, args: Hyperparameters, rt: Runtime, log: Logger, evaluate_fn, progress: dict | None = None) -> TrainResult:
    """Warm-up (restored afterwards), the timed step loop, weight averaging and in-budget calibration.

    On return `model` holds the exported (averaged) weights; progress["averager"] holds them during
    training, for a run that has to stop early.
    """
    accum = rt.grad_accum_steps
    if args.train_batch_tokens % (rt.world_size * accum * args.train_seq_len):
        raise SettingsError(
            f"TRAIN_BATCH_TOKENS={args.train_batch_tokens} must be a multiple of 8 * TRAIN_SEQ_LEN={8 * args.train_seq_len} "
            f"(world size {rt.world_size} x {accum} micro-steps x sequence length)"
        )
    if rt.distributed:  # no DDP wrapper: Muon reduce-scatters the matrices' gradients itself
        for t in model.state_dict().values():
            dist.broadcast(t, src=0)
    # One graph per step (two: recurrence off and on); cu_seqlens is the one dynamic size, marked in train_step.
    # flash-attn 2 before its torch custom ops cannot be traced in one graph: it alone may break it.
    train_forward = compiled(model, args, rt, fullgraph=model.attn_backend != "fa2")
    if model.cfg.embed_bf16 and rt.device.type == "cuda":
        model.tok_emb.to(torch.bfloat16)  # before the optimizers: AdamW keeps its state in the weight's dtype, as the record's
    optimizers = build_optimizers(model, args, rt)
    muon = next((o for o in optimizers if isinstance(o, Muon)), None)
    muon_params = {id(p) for p in muon.param_groups[0]["params"]} if muon is not None else set()
    other_params = [p for p in model.parameters() if id(p) not in muon_params]
    loop_switch = model.cfg.num_loops > 0 and args.loop_enable_frac > 0  # recurrence starts off and switches on
    new_loader = lambda: DistributedTokenLoader.for_model(args, rt, model)  # noqa: E731
    loader = new_loader()
    calibrate_in_budget = args.gptq_enabled and args.gptq_calibration == "train"

    def train_step(step: int, lr_mul: float) -> Tensor:
        total = torch.zeros((), device=rt.device)
        for _ in range(accum):
            x, y, layout = loader.next_batch(args.train_batch_tokens, accum)
            if layout.cu_seqlens is not None:
                torch._dynamo.maybe_mark_dynamic(layout.cu_seqlens, 0)
            with autocast_context(rt.device):
                loss = train_forward(x, y, layout=layout)
            (loss / accum).backward()
            total += loss.detach()
        if muon is not None and args.muon_momentum_warmup_steps:
            frac = min(step / args.muon_momentum_warmup_steps, 1.0)
            for g in muon.param_groups:
                g["momentum"] = (1 - frac) * args.muon_momentum_warmup_start + frac * args.muon_momentum
        for opt in optimizers:
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * lr_mul
        clip = reduce_and_clip_gradients(other_params, muon, args, rt)
        for opt in optimizers:
            opt.step(grad_scale=clip) if opt is muon else opt.step()
        model.zero_grad(set_to_none=True)
        return total / accum

    model.looping = model.cfg.num_loops > 0 and not loop_switch
    if args.warmup_steps:
        # Compile every graph (recurrence off and on, QAT on and off) on real training steps, then put everything back.
        warmup = Stage("train_compile_warmup", log, rt)
        initial_model = {k: v.detach().clone() for k, v in model.state_dict().items()}
        initial_opts = [copy.deepcopy(o.state_dict()) for o in optimizers]
        for looping in (False, True) if loop_switch else (model.looping,):
            model.looping = looping
            for s in range(args.warmup_steps):
                t = sync_time(rt)
                model.set_qat(args.qat_start > 0 and s == args.warmup_steps - 1)
                train_step(s, 1.0)
                if s == 0:  # the first step of a graph is its compile
                    log(f"train_compile recurrence:{'on' if looping else 'off'} first_step_seconds:{sync_time(rt) - t:.1f}")
        model.set_qat(False)
        model.looping = model.cfg.num_loops > 0 and not loop_switch
        model.load_state_dict(initial_model)
        for o, st in zip(optimizers, initial_opts):
            o.load_state_dict(st)
        loader = new_loader()
        graphs = "recurrence off and on" if loop_switch else f"recurrence {'on' if model.looping else 'off'}"
        log(f"warmup_steps:{args.warmup_steps} done for {graphs} (untimed; weights, optimizer state and data position restored)")
        warmup.done()

    reserve_s = gptq_reserve_seconds(model, args, rt, log, new_loader) if calibrate_in_budget and args.max_wallclock_seconds > 0 else 0.0
    budget_ms = 1000.0 * max(args.max_wallclock_seconds - reserve_s, 0.0) if args.max_wallclock_seconds > 0 else 0.0
    averager = WeightAverager(model, args.ema_decay, args.swa_enabled, args.swa_every, args.swa_start_frac)
    if progress is not None:
        progress["averager"] = averager
    training_ms, step, stop_after, qat_on = 0.0, 0, None, False
    timer = Stage("train", log, rt)
    t0 = timer.t0
    while True:
        last = step == args.iterations or (stop_after is not None and step >= stop_after)
        if args.val_loss_every and (last or step % args.val_loss_every == 0) and step > 0:
            training_ms += 1000.0 * (sync_time(rt) - t0)
            result = evaluate_fn(model)
            log(f"step:{step}/{args.iterations} val_loss:{result.val_loss:.4f} val_bpb:{result.val_bpb:.4f} train_time:{training_ms:.0f}ms step_avg:{training_ms / step:.2f}ms")
            t0 = sync_time(rt)
        if last:
            if stop_after is not None and step < args.iterations:
                log(f"stopping_early: wallclock_cap train_time:{training_ms + 1000.0 * (time.perf_counter() - t0):.0f}ms step:{step}/{args.iterations}")
            break
        elapsed_ms = training_ms + 1000.0 * (time.perf_counter() - t0)
        lr_mul = lr_multiplier(step, elapsed_ms, args, budget_ms)
        if loop_switch and not model.looping and training_progress(step, elapsed_ms, args, budget_ms) >= args.loop_enable_frac:
            model.looping = True
            log(f"recurrence:on step:{step} virtual_layers:{model.cfg.num_virtual_layers} blocks:{model.cfg.layer_order(True)}")
        if args.qat_start > 0 and lr_mul < args.qat_start and not qat_on:
            model.set_qat(True)
            qat_on = True
            log(f"qat:on step:{step} lr_mul:{lr_mul:.3f}")
        loss = train_step(step, lr_mul)
        averager.update(step, lr_mul)
        step += 1
        elapsed_ms = training_ms + 1000.0 * (time.perf_counter() - t0)
        if args.train_log_every and (step % args.train_log_every == 0 or step == 1):
            elapsed_ms = training_ms + 1000.0 * (sync_time(rt) - t0)
            log(train_progress_line(step, args, loss, elapsed_ms))
        # One collective and one host sync per step: the wall-clock cap, and a non-finite loss on any rank.
        flags = torch.stack((torch.full((), float(budget_ms > 0 and elapsed_ms >= budget_ms), device=rt.device), (~loss.isfinite()).float()))
        if rt.distributed:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        reached_cap, diverged = flags.tolist()
        if diverged:
            raise TrainingDiverged(
                f"train_loss is not finite at step {step} (nan or inf; {loss.item()} on rank {rt.rank}): training diverged and nothing can be kept; "
                "lower the learning rates (MATRIX_LR, EMBED_LR, SCALAR_LR, ...) and train again"
            )
        if stop_after is None and reached_cap > 0:
            stop_after = step
    training_ms += 1000.0 * (sync_time(rt) - t0)
    timer.done()
    if step and not (args.train_log_every and step % args.train_log_every == 0):
        log(train_progress_line(step, args, loss, training_ms))
    model.set_qat(False)
    if loop_switch and not model.looping:
        model.looping = True
        log("WARNING: training ended before LOOP_ENABLE_FRAC; the exported model runs with recurrence on as the artifact's config says")
    kind, weights = averager.export()
    model.load_state_dict(weights)
    hessians = None
    if calibrate_in_budget:
        timer = Stage("calibration", log, rt)
        hessians = collect_hessians(model, train_batches_for_calibration(loader, args, rt), rt)
        calib_ms = 1000.0 * timer.done()
        training_ms += calib_ms
        within = args.max_wallclock_seconds <= 0 or training_ms <= 1000.0 * args.max_wallclock_seconds
        log(f"gptq_calibration source:train seqs:{args.gptq_calib_seqs} time:{calib_ms:.0f}ms train_time_total:{training_ms:.0f}ms within_cap:{'yes' if within else 'no'}")
    if rt.device.type == "cuda":
        log(f"peak memory allocated: {torch.cuda.max_memory_allocated() // 2**20} MiB reserved: {torch.cuda.max_memory_reserved() // 2**20} MiB")
    return TrainResult(step, training_ms, stop_after is not None, kind, hessians)


# ----------------------------------------------------------------------------- artifact: quantization, GPTQ, packing, file format

CLIP_QUANTILES = (0.999, 0.9995, 0.9999, 0.99999, 1.0)
LQER_A_CLIP_FRACTIONS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)  # of max |A|: the clips LQER_A_CLIP_SEARCH tries


class ArtifactError(RuntimeError):
    """An artifact file that cannot be read back: wrong magic, version, length or checksum."""


def tensor_role(name: str, tensor: Tensor, float_max_numel: int = 65536) -> str:
    """attn / mlp / embed / other for quantized matrices; control or small (fp16) otherwise."""
    if not tensor.is_floating_point() or tensor.ndim != 2 or is_control(name):
        return "control"
    if name.startswith(("tok_emb", "lm_head")):
        return "embed"
    if tensor.numel() <= float_max_numel:
        return "small"
    return "attn" if ".attn." in name else "mlp" if ".mlp." in name else "other"


def is_control(name: str) -> bool:
    return any(c in name for c in CONTROL_PARAMETER_NAMES)


def role_bits(args: Hyperparameters) -> dict[str, int]:
    return {"attn": args.quant_bits_attn, "mlp": args.quant_bits_mlp, "embed": args.quant_bits_embed, "other": args.quant_bits_other}


def role_clip_k(args: Hyperparameters) -> dict[str, float]:
    return {"attn": args.quant_clip_k_attn, "mlp": args.quant_clip_k_mlp, "embed": args.quant_clip_k_embed, "other": args.quant_clip_k_other}


def quantize_with_scale(w: Tensor, scale: Tensor, bits: int) -> Tensor:
    qmax = 2 ** (bits - 1) - 1
    return torch.clamp(torch.round(w / scale), -qmax, qmax).to(torch.int8)


def row_scales(w: Tensor, bits: int, mode: str, k: float) -> Tensor:
    """Per-row fp16 scale = clip / qmax; clip = the MSE-best of a few |w| quantiles (search), or
    k * std(row) (sdclip: a larger k is a coarser grid whose values compress smaller)."""
    qmax = 2 ** (bits - 1) - 1
    w = w.float()
    if mode == "sdclip":
        return (k * w.std(dim=1, keepdim=True) / qmax).clamp_min(2**-24).half().float()  # 2^-24: the smallest fp16 > 0
    best_scale, best_err = None, None
    quantiles = torch.quantile(w.abs(), torch.tensor(CLIP_QUANTILES, device=w.device), dim=1).T  # (rows, Q)
    for j in range(quantiles.size(1)):
        scale = (quantiles[:, j : j + 1] / qmax).clamp_min(2**-24).half().float()
        err = (w - quantize_with_scale(w, scale, bits).float() * scale).square().sum(dim=1, keepdim=True)
        if best_err is None:
            best_scale, best_err = scale, err
        else:
            better = err < best_err
            best_scale, best_err = torch.where(better, scale, best_scale), torch.minimum(err, best_err)
    return best_scale


def gptq_quantize(w: Tensor, H: Tensor, scale: Tensor, bits: int, block_size: int, damp: float, act_order: bool, keep: Tensor | None = None) -> Tensor:
    """Full-Hessian GPTQ of one weight (rows = outputs) on a fixed per-row grid.

    Columns go in descending diag(H) order (act-order); each quantized column's error is spread
    onto the columns not yet quantized through the Cholesky factor of H^-1. `keep` = False forces
    a weight to 0 (magnitude pruning) and the following columns compensate for it.
    """
    W = w.float().clone()
    H = H.float().clone()
    n = W.size(1)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(n, device=W.device)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(n, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    keep = None if keep is None else keep[:, perm]
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    qmax = 2 ** (bits - 1) - 1
    Q = torch.zeros_like(W, dtype=torch.int8)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = W1[:, i]
            q = torch.clamp(torch.round(col / scale[:, 0]), -qmax, qmax)
            if keep is not None:
                q = q * keep[:, i1 + i]
            Q[:, i1 + i] = q.to(torch.int8)
            err = (col - q * scale[:, 0]) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q[:, torch.argsort(perm)]


def magnitude_keep_mask(w: Tensor, frac: float) -> Tensor | None:
    if frac <= 0:
        return None
    k = int(frac * w.numel())
    if k == 0:
        return None
    threshold = w.abs().flatten().kthvalue(k).values
    return (w.abs() > threshold).float()


@dataclass
class LowRankCorrection:
    """A quantized rank-r term added back when the weights are rebuilt: W ~ W_q + A @ B (LQER)."""

    a: Tensor  # int8 (rows, rank), one fp16 scale
    a_scale: Tensor  # fp16 (1, 1)
    b: Tensor  # int8 (rank, cols), one fp16 scale per `group` columns
    b_scale: Tensor  # fp16 (rank, ceil(cols / group))
    a_bits: int
    b_bits: int
    group: int

    def delta(self) -> Tensor:
        b_scale = self.b_scale.float().repeat_interleave(self.group, dim=1)[:, : self.b.size(1)]
        return (self.a.float() * self.a_scale.float()) @ (self.b.float() * b_scale)


@dataclass
class QuantizedTensor:
    q: Tensor  # int8 values in [-qmax, qmax], (rows, cols)
    scale: Tensor  # fp16 per-row scale (rows, 1)
    bits: int
    shape: tuple | None = None  # the tensor's own shape where it is not (rows, cols): 1-D and 3-D control tensors
    correction: LowRankCorrection | None = None

    def dequantize(self, dtype=torch.float32) -> Tensor:
        w = self.q.float() * self.scale.float()
        if self.correction is not None:
            w = w + self.correction.delta()
        return w.reshape(w.shape if self.shape is None else self.shape).to(dtype)


def quantize_control(t: Tensor) -> QuantizedTensor:
    """A gate or control tensor as int8 in [-127, 127] with an fp16 scale per row, row max / 127 (a vector is one row)."""
    w = t.detach().float().cpu().reshape(t.shape[0] if t.ndim > 1 else 1, -1)
    scale = (w.abs().amax(dim=1, keepdim=True) / 127).clamp_min(2**-24).half().float()
    return QuantizedTensor(quantize_with_scale(w, scale, 8), scale.half(), 8, None if t.ndim == 2 else tuple(t.shape))


def quantize_state_dict(state: dict[str, Tensor], args: Hyperparameters, hessians: dict | None, log=None) -> dict[str, object]:
    """Each tensor by role: QuantizedTensor (GPTQ where a Hessian exists, else round-to-nearest; int8 for the
    QUANT_CONTROL_INT8 tensors) or fp16; then the low-rank correction of the worst few."""
    bits_of, k_of = role_bits(args), role_clip_k(args)
    int8_controls = CONTROL_PARAMETER_NAMES if args.quant_control_int8 == "all" else _items(args.quant_control_int8)
    out = {}
    for name, t in state.items():
        role = tensor_role(name, t, args.quant_float_max_numel)
        if role == "control":
            out[name] = quantize_control(t) if any(c in name for c in int8_controls) else t.detach().half().cpu()
            continue
        if role == "small":
            out[name] = t.detach().half().cpu()
            continue
        bits, w = bits_of[role], t.detach().float()
        scale = row_scales(w, bits, args.quant_clip, k_of[role])
        keep = magnitude_keep_mask(w, args.quant_prune_frac)
        if args.gptq_enabled and hessians is not None and name in hessians and (role != "embed" or args.gptq_embed):
            H = hessians[name].to(w.device)
            q = gptq_quantize(w, H, scale, bits, args.gptq_block_size, args.gptq_damp, args.gptq_act_order, keep)
        else:
            q = quantize_with_scale(w, scale, bits)
            if keep is not None:
                q = q * keep.to(torch.int8)
        out[name] = QuantizedTensor(q.cpu(), scale.half().cpu(), bits)
    if args.lqer_rank and args.lqer_top_k:
        add_low_rank_corrections(out, state, args, log)
    return out


def lqer_grid(x: Tensor, amax: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """x on the grid {-2^(b-1), ..., 2^(b-1) - 1} * scale, scale = amax / (2^(b-1) - 0.5) in fp16: all 2^b
    levels used, the largest |x| on an end of the grid ([-2, 1] at 2 bits, [-8, 7] at 4)."""
    top = 2 ** (bits - 1)
    scale = (amax / (top - 0.5)).clamp_min(2**-24).half().float()
    return torch.clamp(torch.round(x / scale), -top, top - 1).to(torch.int8), scale


def low_rank_correction(err: Tensor, rank: int, a_bits: int, b_bits: int, group: int, clip_search: bool = False) -> LowRankCorrection:
    """The error's top singular directions, err ~ A @ B with A = U S (one scale) and B = V^T (a scale per
    `group` columns); with `clip_search`, A's grid ends at the fraction of max |A| that leaves the least
    ||err - A B|| instead of at max |A| (the columns of small singular values keep more levels)."""
    rank = min(rank, *err.shape)
    cols = err.size(1)
    groups = -(-cols // group)
    u, s, vh = torch.linalg.svd(err, full_matrices=False)
    padded = F.pad(vh[:rank], (0, groups * group - cols)).view(rank, groups, group)
    b, b_scale = lqer_grid(padded, padded.abs().amax(dim=2, keepdim=True), b_bits)
    b, b_scale = b.view(rank, -1)[:, :cols], b_scale.squeeze(2)
    a_float = u[:, :rank] * s[:rank]
    b_float = b.float() * b_scale.repeat_interleave(group, dim=1)[:, :cols]
    fits = [lqer_grid(a_float, frac * a_float.abs().amax().reshape(1, 1), a_bits) for frac in (LQER_A_CLIP_FRACTIONS if clip_search else (1.0,))]
    a, a_scale = min(fits, key=lambda fit: torch.linalg.norm(err - (fit[0].float() * fit[1]) @ b_float).item())
    return LowRankCorrection(a, a_scale.half(), b, b_scale.half(), a_bits, b_bits, group)


def add_low_rank_corrections(qstate: dict[str, object], state: dict[str, Tensor], args: Hyperparameters, log=None):
    """LQER: the LQER_TOP_K quantized matrices with the largest ||W - W_q|| get a quantized rank-LQER_RANK correction (in place)."""
    errors = {}
    for name, v in qstate.items():
        if isinstance(v, QuantizedTensor) and not is_control(name):
            errors[name] = torch.linalg.norm(state[name].detach().float().cpu() - v.dequantize()).item()
    for name in sorted(errors, key=errors.get, reverse=True)[: args.lqer_top_k]:
        err = state[name].detach().float().cpu() - qstate[name].dequantize()
        correction = low_rank_correction(err, args.lqer_rank, args.lqer_a_bits, args.lqer_b_bits, args.lqer_group, args.lqer_a_clip_search)
        qstate[name] = replace(qstate[name], correction=correction)
        if log is not None:
            log(f"lqer {name} rank:{correction.a.size(1)} error:{errors[name]:.4f} -> {torch.linalg.norm(err - correction.delta()).item():.4f}")


def dequantize_state_dict(qstate: dict[str, object]) -> dict[str, Tensor]:
    return {n: (v.dequantize() if isinstance(v, QuantizedTensor) else v.float()) for n, v in qstate.items()}


def prune_smallest_quantized(qstate: dict[str, object], frac: float) -> dict[str, object]:
    """Zero the smallest-magnitude nonzero quantized weights (|q * scale|), `frac` of each weight matrix's entries (control tensors are kept)."""
    out = {}
    for name, v in qstate.items():
        if isinstance(v, QuantizedTensor) and frac > 0 and not is_control(name):
            mag = (v.q.float() * v.scale.float()).abs()
            nonzero = mag[v.q != 0]
            k = min(int(frac * mag.numel()), nonzero.numel())
            if k:
                threshold = nonzero.kthvalue(k).values
                v = replace(v, q=torch.where(mag <= threshold, torch.zeros_like(v.q), v.q))
        out[name] = v
    return out


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Signed values in [-2^(b-1), 2^(b-1)) as a dense little-bit-order stream of b-bit fields."""
    u = (values.astype(np.int16) + (1 << (bits - 1))).astype(np.uint8)
    fields = np.unpackbits(u[:, None], axis=1, bitorder="little")[:, :bits]
    return np.packbits(fields.reshape(-1), bitorder="little").tobytes()


def unpack_bits(data: bytes, bits: int, count: int) -> np.ndarray:
    fields = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")[: count * bits].reshape(count, bits)
    u = np.packbits(np.pad(fields, ((0, 0), (0, 8 - bits))), axis=1, bitorder="little")[:, 0]
    return (u.astype(np.int16) - (1 << (bits - 1))).astype(np.int8)


def similarity_order(q: Tensor) -> Tensor:
    """A greedy nearest-neighbour chain through the rows (L1 distance of the values, ties to the lowest
    row), from row 0: rows that follow each other in the file are alike, which the compressors exploit."""
    x = q.float()
    dist = torch.cdist(x, x, p=1)  # sums of integers: exact in fp32
    visited = torch.zeros(x.size(0), dtype=torch.bool)
    order = [0]
    visited[0] = True
    for _ in range(x.size(0) - 1):
        order.append(int(torch.argmin(dist[order[-1]].masked_fill(visited, float("inf")))))
        visited[order[-1]] = True
    return torch.tensor(order)


ARTIFACT_MAGIC = b"PGA\x01"
ARTIFACT_FORMAT_VERSION = 2  # 1: one compressed stream (before per-group packing, LQER and int8 controls)
COMPRESSORS = ("zstd", "lzma", "brotli", "zpaq")  # position = the id stored in the file
COMPRESSOR_PACKAGES = {"zstd": ("zstandard", "zstandard"), "brotli": ("brotli", "brotli"), "zpaq": ("zpaq", "zpaq")}  # module, pip name
_ARTIFACT_PREFIX = struct.Struct("<4sB")  # magic, format version (the same in every format)
_ARTIFACT_HEADER = struct.Struct("<4sBII")  # magic, format version, payload bytes, crc32 of payload
_STREAM_HEADER = struct.Struct("<BI")  # compressor id, compressed bytes
FLOAT_SECTIONS = ("scales", "row_orders", "lqer", "fp16", "fp32")  # after the value groups, in this order


def compressor_installed(compressor: str) -> bool:
    return compressor not in COMPRESSOR_PACKAGES or importlib.util.find_spec(COMPRESSOR_PACKAGES[compressor][0]) is not None


def compress(data: bytes, compressor: str) -> bytes:
    """Each compressor at its strongest setting; zpaq on one thread, so the bytes do not depend on the machine."""
    if compressor == "zstd":
        import zstandard

        return zstandard.ZstdCompressor(level=22).compress(data)
    if compressor == "brotli":
        import brotli

        return brotli.compress(data, quality=11, lgwin=24)
    if compressor == "zpaq":
        import zpaq

        return zpaq.compress(data, level=5, threads=1)
    return lzma.compress(data, format=lzma.FORMAT_ALONE, preset=9 | lzma.PRESET_EXTREME)


def decompress(data: bytes, compressor: str) -> bytes:
    if compressor == "zstd":
        import zstandard

        return zstandard.ZstdDecompressor().decompress(data)
    if compressor == "brotli":
        import brotli

        return brotli.decompress(data)
    if compressor == "zpaq":
        import zpaq

        return zpaq.decompress(data)
    return lzma.decompress(data)


@dataclass(frozen=True)
class Packing:
    """How the quantized model is laid out and compressed (the ARTIFACT_* settings)."""

    compressor: str  # one of COMPRESSORS, or auto
    grouping: str  # role / single
    values: str  # int8 / bitpack / auto
    transpose: bool
    reorder_rows: str  # the value groups whose rows are reordered: a comma list, all, or empty

    @classmethod
    def from_args(cls, args: Hyperparameters) -> "Packing":
        return cls(args.artifact_compressor, args.artifact_grouping, args.artifact_packing, args.artifact_transpose, args.artifact_reorder_rows)

    @property
    def compressors(self) -> tuple[str, ...]:
        return tuple(c for c in COMPRESSORS if compressor_installed(c)) if self.compressor == "auto" else (self.compressor,)


@dataclass
class StreamReport:
    """One compressed stream of the file: what it holds and what it cost."""

    name: str
    raw_bytes: int
    bytes: int
    compressor: str
    values: str  # int8 / bitpack for quantized values, raw for floats
    numel: int  # quantized values in it


MATRIX_GROUPS = ("tok_emb", "lm_head", "bigram.table", "bigram.proj", "attn.c_q", "attn.c_k", "attn.c_v", "attn.proj", "mlp.fc", "mlp.proj")


def value_group(name: str) -> str:
    """The stream of a quantized tensor's values under ARTIFACT_GROUPING=role: one kind of matrix across
    layers (blocks.3.attn.c_q.weight -> attn.c_q), the control tensors together."""
    if is_control(name):
        return "control"
    return (name.split(".", 2)[2] if name.startswith("blocks.") else name).removesuffix(".weight")


def _values_bytes(parts: list[tuple[np.ndarray, int]], values: str) -> bytes:
    return b"".join(pack_bits(v, bits) if values == "bitpack" else v.tobytes() for v, bits in parts)


def _section_length(section: object, values: str) -> int:
    if not isinstance(section, list):
        return len(section)
    return sum((v.size * bits + 7) // 8 if values == "bitpack" else v.size for v, bits in section)


def artifact_sections(qstate: dict[str, object], transpose: bool, reorder_rows: str) -> tuple[list[dict], dict[str, object]]:
    """Manifest entries and the file's sections: per value group the (values, bits) of its tensors (rows
    reordered, columns first if transposed), then bytes of row scales, row orders, LQER factors, fp16, fp32."""
    entries, groups = [], {}
    floats = {key: [] for key in FLOAT_SECTIONS}
    for name, v in qstate.items():
        if not isinstance(v, QuantizedTensor):
            kind = "fp16" if v.dtype == torch.float16 else "fp32"
            floats[kind].append(v.numpy().astype("<f2" if kind == "fp16" else "<f4").tobytes())
            entries.append({"name": name, "kind": kind, "shape": list(v.shape)})
            continue
        rows, cols = v.q.shape
        entry = {"name": name, "kind": "q", "group": value_group(name), "shape": list(v.q.shape if v.shape is None else v.shape), "rows": rows, "cols": cols, "bits": v.bits}
        q = v.q
        if rows > 2 and not is_control(name) and (reorder_rows == "all" or entry["group"] in _items(reorder_rows)):
            order = similarity_order(q)
            q = q[order]
            floats["row_orders"].append(order.numpy().astype(_order_dtype(rows)).tobytes())
            entry["ordered"] = True
        values = (q.T if transpose else q).contiguous().numpy().reshape(-1)
        groups.setdefault(entry["group"], []).append((values, v.bits))
        floats["scales"].append(v.scale.numpy().astype("<f2").tobytes())
        if v.correction is not None:
            c = v.correction
            floats["lqer"] += [c.a.numpy().tobytes(), c.b.numpy().tobytes(), c.a_scale.numpy().astype("<f2").tobytes(), c.b_scale.numpy().astype("<f2").tobytes()]
            entry["lqer"] = [c.a.size(1), c.a_bits, c.b_bits, c.group]
        entries.append(entry)
    sections = {**groups, **{key: b"".join(parts) for key, parts in floats.items() if parts}}
    return entries, sections


def _order_dtype(rows: int) -> str:
    return "<u2" if rows <= 65536 else "<u4"


def compress_candidates(candidates: dict[str, dict[str, bytes]], compressors: tuple[str, ...]) -> dict[str, tuple[str, str, bytes]]:
    """stream -> (layout, compressor, bytes): every (stream, layout, compressor) is compressed, in
    parallel threads, and per stream the smallest wins (ties: the first layout and compressor)."""
    jobs = [(stream, layout, c) for stream, layouts in candidates.items() for layout in layouts for c in compressors]
    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        blobs = list(pool.map(lambda job: compress(candidates[job[0]][job[1]], job[2]), jobs))
    best = {}
    for (stream, layout, c), blob in zip(jobs, blobs):
        if stream not in best or len(blob) < len(best[stream][2]):
            best[stream] = (layout, c, blob)
    return best


def encode_artifact(qstate: dict[str, object], config: ModelConfig, packing: Packing) -> tuple[bytes, list[StreamReport]]:
    """The artifact file's bytes: a header, then compressed streams, the manifest first (config, tensors,
    and which sections each stream holds); with auto, each stream keeps its smallest compressor and layout."""
    entries, sections = artifact_sections(qstate, packing.transpose, packing.reorder_rows)
    layouts = ("int8", "bitpack") if packing.values == "auto" else (packing.values,)

    def layout_bytes(names: list[str], layout: str) -> bytes:
        return b"".join(_values_bytes(sections[n], layout) if isinstance(sections[n], list) else sections[n] for n in names)

    plan = {name: [name] for name in sections} if packing.grouping == "role" else {"all": list(sections)}
    candidates = {}
    for stream, names in plan.items():
        has_values = any(isinstance(sections[n], list) for n in names)
        candidates[stream] = {layout: layout_bytes(names, layout) for layout in (layouts if has_values else ("raw",))}
    chosen = compress_candidates(candidates, packing.compressors)
    stream_specs, reports = [], []
    for stream, names in plan.items():
        layout, c, blob = chosen[stream]
        lengths = [_section_length(sections[n], layout) for n in names]
        stream_specs.append({"sections": names, "lengths": lengths, "values": layout})
        numel = sum(v.size for n in names if isinstance(sections[n], list) for v, _ in sections[n])
        reports.append(StreamReport(stream, len(candidates[stream][layout]), len(blob), c, layout, numel))
    manifest = json.dumps({"config": config.__dict__, "transposed": packing.transpose, "tensors": entries, "streams": stream_specs}, separators=(",", ":")).encode()
    _, manifest_compressor, manifest_blob = compress_candidates({"manifest": {"raw": manifest}}, packing.compressors)["manifest"]
    reports.insert(0, StreamReport("manifest", len(manifest), len(manifest_blob), manifest_compressor, "raw", 0))
    payload = b"".join(
        _STREAM_HEADER.pack(COMPRESSORS.index(c), len(blob)) + blob
        for c, blob in [(manifest_compressor, manifest_blob)] + [chosen[s][1:] for s in plan]
    )
    header = _ARTIFACT_HEADER.pack(ARTIFACT_MAGIC, ARTIFACT_FORMAT_VERSION, len(payload), zlib.crc32(payload))
    return header + payload, reports


def _read_streams(payload: bytes) -> list[bytes]:
    streams, pos = [], 0
    while pos < len(payload):
        if pos + _STREAM_HEADER.size > len(payload):
            raise ArtifactError("a stream header is cut off")
        comp, length = _STREAM_HEADER.unpack_from(payload, pos)
        pos += _STREAM_HEADER.size
        if comp >= len(COMPRESSORS) or pos + length > len(payload):
            raise ArtifactError(f"stream {len(streams)} has compressor id {comp} and {length} bytes, which the file cannot hold")
        compressor = COMPRESSORS[comp]
        if not compressor_installed(compressor):
            module, pip_name = COMPRESSOR_PACKAGES[compressor]
            raise ArtifactError(f"a stream is {compressor}-compressed and the {module} module is missing: pip install {pip_name}")
        streams.append(decompress(payload[pos : pos + length], compressor))
        pos += length
    return streams


def decode_artifact(payload: bytes) -> tuple[ModelConfig, dict[str, object]]:
    """The inverse of encode_artifact, from the payload after the header."""
    manifest_raw, *stream_data = _read_streams(payload)
    manifest = json.loads(manifest_raw)
    if len(stream_data) != len(manifest["streams"]):
        raise ArtifactError(f"the manifest lists {len(manifest['streams'])} streams, the file holds {len(stream_data)}")
    sections, layouts = {}, {}
    for spec, data in zip(manifest["streams"], stream_data):
        if sum(spec["lengths"]) != len(data):
            raise ArtifactError(f"stream of {'+'.join(spec['sections'])} has {len(data)} bytes, the manifest says {sum(spec['lengths'])}")
        pos = 0
        for name, length in zip(spec["sections"], spec["lengths"]):
            sections[name], layouts[name], pos = memoryview(data)[pos : pos + length], spec["values"], pos + length
    cursor = dict.fromkeys(sections, 0)

    def take(section: str, nbytes: int) -> memoryview:
        start = cursor[section]
        if start + nbytes > len(sections[section]):
            raise ArtifactError(f"section {section} is shorter than its tensors need")
        cursor[section] = start + nbytes
        return sections[section][start : start + nbytes]

    def floats(section: str, dtype: str, shape) -> Tensor:
        count = int(np.prod(shape))
        return torch.from_numpy(np.frombuffer(take(section, count * np.dtype(dtype).itemsize), dtype=dtype).copy()).reshape(tuple(shape))

    def ints(section: str, shape) -> Tensor:
        return torch.from_numpy(np.frombuffer(take(section, int(np.prod(shape))), dtype=np.int8).copy()).reshape(tuple(shape))

    out = {}
    for e in manifest["tensors"]:
        if e["kind"] != "q":
            out[e["name"]] = floats(e["kind"], "<f2" if e["kind"] == "fp16" else "<f4", e["shape"])
            continue
        rows, cols, bits, group = e["rows"], e["cols"], e["bits"], e["group"]
        if layouts[group] == "bitpack":
            flat = unpack_bits(take(group, (rows * cols * bits + 7) // 8), bits, rows * cols)
        else:
            flat = np.frombuffer(take(group, rows * cols), dtype=np.int8)
        q = torch.from_numpy(flat.copy())
        q = q.view(cols, rows).T.contiguous() if manifest["transposed"] else q.view(rows, cols)
        if e.get("ordered"):
            order = torch.from_numpy(np.frombuffer(take("row_orders", rows * np.dtype(_order_dtype(rows)).itemsize), dtype=_order_dtype(rows)).astype(np.int64))
            q = q[torch.argsort(order)]
        scale = floats("scales", "<f2", (rows, 1))
        correction = None
        if "lqer" in e:
            rank, a_bits, b_bits, lgroup = e["lqer"]
            a, b = ints("lqer", (rows, rank)), ints("lqer", (rank, cols))
            correction = LowRankCorrection(a, floats("lqer", "<f2", (1, 1)), b, floats("lqer", "<f2", (rank, -(-cols // lgroup))), a_bits, b_bits, lgroup)
        shape = tuple(e["shape"])
        out[e["name"]] = QuantizedTensor(q, scale, bits, None if shape == (rows, cols) else shape, correction)
    leftover = [s for s in sections if cursor[s] != len(sections[s])]
    if leftover:
        raise ArtifactError(f"section {leftover[0]} has bytes no tensor uses")
    return ModelConfig(**manifest["config"]), out


def read_artifact(path: str | Path) -> tuple[ModelConfig, dict[str, object]]:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"artifact {path} does not exist; train one first or check EVAL_ONLY/ARTIFACT_PATH")
    data = path.read_bytes()
    if len(data) < _ARTIFACT_PREFIX.size:
        raise ArtifactError(f"{path}: {len(data)} bytes is too short for an artifact; the file is empty or truncated, copy it again from where the run wrote it")
    magic, version = _ARTIFACT_PREFIX.unpack_from(data)
    if magic != ARTIFACT_MAGIC:
        raise ArtifactError(f"{path}: not a train_gpt.py artifact (bad magic {magic!r}); give EVAL_ONLY the .pgz file a training run wrote")
    if version != ARTIFACT_FORMAT_VERSION:
        raise ArtifactError(f"{path}: artifact format {version}, this script reads format {ARTIFACT_FORMAT_VERSION}: evaluate it with the train_gpt.py that wrote it, or retrain")
    if len(data) < _ARTIFACT_HEADER.size:
        raise ArtifactError(f"{path}: {len(data)} bytes is too short for an artifact; the file is truncated, copy it again from where the run wrote it")
    _, _, length, crc = _ARTIFACT_HEADER.unpack_from(data)
    payload = data[_ARTIFACT_HEADER.size :]
    if len(payload) != length:
        raise ArtifactError(f"{path}: payload has {len(payload)} bytes, header says {length}; the file is truncated or padded, copy it again from where the run wrote it")
    if zlib.crc32(payload) != crc:
        raise ArtifactError(f"{path}: checksum mismatch; the file is corrupt, re-create or re-download it")
    try:
        return decode_artifact(payload)
    except ArtifactError as e:
        raise ArtifactError(f"{path}: {e}") from None
    except Exception as e:
        raise ArtifactError(f"{path}: cannot decode the artifact ({type(e).__name__}: {e})") from None


def load_model_from_artifact(path: str | Path, device: torch.device, attn_backend: str = "sdpa") -> GPT:
    """A fresh model built from the artifact file alone (low-rank corrections applied)."""
    config, qstate = read_artifact(path)
    model = GPT(config, attn_backend).to(device)
    try:
        model.load_state_dict({k: v.to(device) for k, v in dequantize_state_dict(qstate).items()})
    except RuntimeError as e:
        raise ArtifactError(f"{path}: its tensors do not fit the model its config describes ({' '.join(str(e).split())[:300]}); re-create it with this script") from None
    return model


@dataclass
class SizeReport:
    code_bytes: int
    artifact_bytes: int
    cap_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.code_bytes + self.artifact_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.cap_bytes


def write_artifact(qstate: dict[str, object], config: ModelConfig, args: Hyperparameters, path: Path, code_bytes: int, log: Logger) -> tuple[SizeReport, list[StreamReport], dict]:
    """Compress, write atomically, check code + artifact against the cap; over the cap, optionally prune until it fits."""
    timings = {}
    packing = Packing.from_args(args)
    t0 = time.perf_counter()
    blob, streams = encode_artifact(qstate, config, packing)
    timings["compress_ms"] = 1000.0 * (time.perf_counter() - t0)
    prune = 0.0
    while args.quant_fit_to_cap and code_bytes + len(blob) > args.size_cap_bytes and prune < 0.5:
        over = code_bytes + len(blob) - args.size_cap_bytes
        prune = min(0.5, prune + max(0.005, 1.5 * over / len(blob)))
        blob, streams = encode_artifact(prune_smallest_quantized(qstate, prune), config, packing)
        log(f"fit_to_cap: pruned {prune:.3f} of each quantized tensor -> {code_bytes + len(blob)} bytes")
    write_atomic(path, blob)
    report = SizeReport(code_bytes, path.stat().st_size, args.size_cap_bytes)
    timings["prune_frac"] = prune
    return report, streams, timings


# ----------------------------------------------------------------------------- artifact: the shipped code

_LATIN1_LITERAL_ESCAPES = {ord("\\"): "\\\\", ord("'"): "\\'", ord("\n"): "\\n", ord("\r"): "\\r", 0: "\\x00"}


def minified_source(source: bytes) -> bytes:
    """The source without docstrings, with short local names and no redundant syntax (python-minifier: deterministic for one version)."""
    import python_minifier

    return python_minifier.minify(source.decode("utf-8"), remove_literal_statements=True).encode("utf-8")


def shipped_code(source: bytes, minify: bool) -> bytes:
    """The train_gpt.py that ships: the (minified) source brotli-compressed into a Latin-1 string literal and
    two lines that decompress it and run it as this very module (__name__, __file__ kept)."""
    import brotli

    packed = brotli.compress(minified_source(source) if minify else source, quality=11, lgwin=24)
    literal = packed.decode("latin-1").translate(_LATIN1_LITERAL_ESCAPES)
    wrapper = f"#coding:latin-1\nimport brotli;SHIPPED_SOURCE=brotli.decompress('{literal}'.encode('latin-1'));exec(compile(SHIPPED_SOURCE,'<shipped train_gpt.py>','exec'))\n"
    return wrapper.encode("latin-1")


def running_source() -> bytes:
    """The source text that runs: this file, or what the shipped wrapper decompressed."""
    return globals().get("SHIPPED_SOURCE") or Path(__file__).read_bytes()


def write_shipped_code(path: Path, source: bytes, minify: bool) -> int:
    """Write the file that ships (this wrapper itself when running from one) and return its size on disk: the counted code bytes."""
    write_atomic(path, Path(__file__).read_bytes() if "SHIPPED_SOURCE" in globals() else shipped_code(source, minify))
    return path.stat().st_size


def check_artifact_packages(args: Hyperparameters):
    """Before training: every package the code and artifact settings need is installed, else a one-line fix."""
    needs = [("brotli", "brotli", "the shipped train_gpt.py (brotli-compressed)")]
    if args.code_minify:
        needs.append(("python_minifier", "python-minifier", "CODE_MINIFY=1 (or set CODE_MINIFY=0)"))
    if args.artifact_compressor in COMPRESSOR_PACKAGES:
        needs.append((*COMPRESSOR_PACKAGES[args.artifact_compressor], f"ARTIFACT_COMPRESSOR={args.artifact_compressor}"))
    for module, pip_name, needed_by in needs:
        if importlib.util.find_spec(module) is None:
            raise SettingsError(f"{needed_by} needs the {module} module: pip install {pip_name}")


# ----------------------------------------------------------------------------- evaluation: the score ledger


class LeakageError(RuntimeError):
    """An evaluator broke the score-first rule; the run stops rather than report a tainted score."""


@dataclass
class EvalResult:
    val_loss: float  # mean nats per target token
    val_bpb: float
    nll_sum: float
    byte_sum: int
    targets: int


class ScoreLedger:
    """Per target position p = 1 .. N-1 of a token stream (target tokens[p], previous tokens[p-1]):
    its nll in float64, its bytes, and how often it was scored.

    `score` is how every evaluation path scores: the full-vocabulary log-softmax of the one forward
    pass, recorded here. `record` refuses a position scored before; `result` refuses a ledger with a
    position unscored; `require_scored` refuses an update on a position not yet scored. The records
    are private: `nll` and `count` hand out copies, so nothing but these methods writes a score.

    With `audit=True` the ledger also checks that every distribution shown to it sums to 1 and that
    the recorded nll is its value at the real target, and keeps the whole distribution at the
    positions in `watch` (the audit compares them between perturbed runs).
    """

    def __init__(self, tokens: Tensor, tables: ByteTables, audit: bool = False, watch: tuple[int, ...] = ()):
        self.num_targets = tokens.numel() - 1
        device = tokens.device
        self._targets = tokens[1:]
        self._nll = torch.zeros(self.num_targets, dtype=torch.float64, device=device)
        self._count = torch.zeros(self.num_targets, dtype=torch.int32, device=device)
        self._bytes = stream_target_bytes(tokens, tables.to(device))
        self._late = torch.zeros(self.num_targets, dtype=torch.bool, device=device)  # scored after the TTT deadline
        self.updates = 0  # optimizer steps, each checked by require_scored
        self.audit, self.watch, self.vocab_size = audit, set(watch), tables.base_bytes.numel()
        self.distributions: dict[int, Tensor] = {}  # audit: position -> log p over the vocabulary
        self.normalization_error = 0.0  # audit: max |log sum p| of the scored distributions
        self.nll_mismatch = 0.0  # audit: max |recorded nll - (-log p[target])|
        self.mismatch_moments = [0.0, 0.0, 0.0]  # audit: count, sum and sum of squares of recorded nll - (-log p[target])
        self.without_distribution = 0  # audit: positions recorded with no distribution shown

    nll = property(lambda self: self._nll.clone())
    count = property(lambda self: self._count.clone())
    bytes = property(lambda self: self._bytes.clone())
    late = property(lambda self: self._late.clone())

    def score(self, model, x: Tensor, y: Tensor, positions: Tensor, mask: Tensor, adapters: DocumentAdapters | None = None,
              late: bool = False, layout: AttentionLayout | None = None) -> Tensor:
        """Score the targets y[mask] (at `positions[mask]`) with the one forward and record them; returns
        the nll of every (B, T) entry, with its graph when gradients are on (TTT trains on this very
        forward, after the record). An auditing ledger also gets each distribution, from a second,
        gradient-free forward of the same inputs, so the scores are computed alike with or without audit."""
        with autocast_context(x.device):
            nll = model(x, y, adapters=adapters, layout=layout, reduction="none")
        logp = None
        if self.audit:
            with torch.no_grad(), autocast_context(x.device):
                logp = torch.log_softmax(model(x, adapters=adapters, layout=layout), dim=-1)[mask]
        self.record(positions[mask], nll.detach()[mask], logp, late)
        return nll

    def record(self, positions: Tensor, nll: Tensor, logp: Tensor | None = None, late: bool = False):
        idx = positions.reshape(-1) - 1
        if idx.numel() == 0:
            return
        if int(idx.min()) < 0 or int(idx.max()) >= self.num_targets:
            raise LeakageError(f"scored position outside 1..{self.num_targets}")
        self._count.index_add_(0, idx, torch.ones_like(idx, dtype=torch.int32))
        if int(self._count[idx].max()) > 1:
            twice = int(idx[self._count[idx] > 1][0]) + 1
            raise LeakageError(f"target position {twice} scored twice; every token must be scored exactly once")
        self._nll[idx] = nll.reshape(-1).to(torch.float64)
        self._late[idx] = late
        if self.audit:
            self._audit_distribution(idx, nll.reshape(-1), logp)

    def _audit_distribution(self, idx: Tensor, nll: Tensor, logp: Tensor | None):
        if logp is None:
            self.without_distribution += idx.numel()
            return
        logp = logp.reshape(idx.numel(), -1).float()
        self.normalization_error = max(self.normalization_error, float(torch.logsumexp(logp, dim=-1).abs().max()))
        at_target = -logp.gather(-1, self._targets[idx].unsqueeze(-1)).squeeze(-1)
        gap = (nll.float() - at_target).double()
        self.nll_mismatch = max(self.nll_mismatch, float(gap.abs().max()))
        self.mismatch_moments = [m + float(v) for m, v in zip(self.mismatch_moments, (gap.numel(), gap.sum(), gap.square().sum()))]
        for k, p in enumerate(idx.tolist()):
            if p + 1 in self.watch:
                self.distributions[p + 1] = logp[k].detach().clone()

    def require_scored(self, positions: Tensor, rt: Runtime | None = None):
        """Refuse an update on a position not scored yet (by any rank, when `rt` is given: phases train on all ranks' documents)."""
        idx = positions.reshape(-1) - 1
        count = self._count[idx]
        if rt is not None and rt.distributed:
            count = count.clone()
            dist.all_reduce(count)
        unscored = count == 0
        if bool(unscored.any()):
            raise LeakageError(f"an update would train on target position {int(idx[unscored][0]) + 1} before it was scored")
        self.updates += 1

    def merge(self, rt: Runtime):
        """Each rank scored its share; after this every rank holds all of them (with audit=True, the
        watched distributions and the normalization figures too)."""
        if rt.distributed:
            for t in (self._nll, self._count):
                dist.all_reduce(t)
            late = self._late.to(torch.int32)
            dist.all_reduce(late)
            self._late = late > 0
            if self.audit:
                self._merge_audit()

    def _merge_audit(self):
        watch = sorted(self.watch)
        shown = torch.zeros(len(watch), self.vocab_size + 1, device=self._nll.device)  # log p, then a 1 where this rank scored it
        for i, p in enumerate(watch):
            if p in self.distributions:
                shown[i, :-1], shown[i, -1] = self.distributions[p], 1.0
        worst = torch.tensor([self.normalization_error, self.nll_mismatch], device=shown.device)
        hidden = torch.tensor([self.without_distribution], device=shown.device)
        moments = torch.tensor(self.mismatch_moments, dtype=torch.float64, device=shown.device)
        dist.all_reduce(moments)
        self.mismatch_moments = moments.tolist()
        dist.all_reduce(shown)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        dist.all_reduce(hidden)
        self.distributions = {p: shown[i, :-1] for i, p in enumerate(watch) if shown[i, -1] > 0}
        self.normalization_error, self.nll_mismatch = worst.tolist()
        self.without_distribution = int(hidden)

    def result(self) -> EvalResult:
        unscored, repeated = int((self._count == 0).sum()), int((self._count > 1).sum())
        if unscored or repeated:
            raise LeakageError(f"{unscored} targets never scored and {repeated} scored more than once out of {self.num_targets}")
        nll_sum = float(np.sum(self._nll.cpu().numpy()))
        byte_sum = int(self._bytes.sum())
        return EvalResult(nll_sum / self.num_targets, bits_per_byte(nll_sum, byte_sum), nll_sum, byte_sum, self.num_targets)

    def dump(self, path: str | Path):
        """Per-target records that re-aggregate to the logged score: bpb = sum(nll) / ln 2 / sum(bytes)."""
        buf = io.BytesIO()
        np.savez(buf, position=np.arange(1, self.num_targets + 1, dtype=np.int64), nll=self._nll.cpu().numpy(), bytes=self._bytes.cpu().numpy().astype(np.int32))
        write_atomic(path, buf.getvalue())


# ----------------------------------------------------------------------------- evaluation: standard and sliding windows


def window_plan(num_targets: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows (a, s, e): inputs tokens[a:e], targets tokens[a+1:e+1], scoring target positions s+1 .. e.

    stride >= window: non-overlapping windows, the last one shorter (standard evaluation).
    stride < window: each window ends `stride` after the previous one and scores only the targets
    the previous did not, each with at least window - stride tokens of context.
    """
    if stride >= window:
        return [(a, a, min(a + window, num_targets)) for a in range(0, num_targets, window)]
    end = min(window, num_targets)
    plan = [(0, 0, end)]
    while end < num_targets:
        new_end = min(end + stride, num_targets)
        plan.append((max(0, new_end - window), end, new_end))
        end = new_end
    return plan


MIN_ROWS = 2  # batches of one row are padded to two: torch.compile specializes a dimension of size 1 (another graph)


def dynamic_rows(*tensors: Tensor, dims: tuple[int, ...] = (0,)):
    """Let a compiled model take these tensors' sizes along `dims` as variables: one graph for all of them."""
    for t in tensors:
        for d in dims:
            torch._dynamo.maybe_mark_dynamic(t, d)


def isolated_layout(model, x: Tensor) -> AttentionLayout:
    """The layout of rows that hold several documents, computed on the host before a (compiled)
    forward: each document on its own when the model isolates them."""
    base = getattr(model, "_orig_mod", model)
    if not base.cfg.doc_isolation:
        return ONE_SEGMENT_PER_ROW
    layout = document_layout(x, base.attn_backend)
    dynamic_rows(*(t for t in (layout.cu_seqlens, layout.mask) if t is not None))
    return layout


def window_batches(plan: list[tuple[int, int, int]], window: int, batch_tokens: int, rank: int, world_size: int) -> list[list[tuple[int, int, int]]]:
    """The batches of windows `rank` scores, in order: its round-robin share of the plan, every batch of
    one size (the last one filled with (0, 0, 0), which scores nothing), so a compiled model runs one
    graph; the audit replays some of them exactly."""
    mine = plan[rank::world_size]
    rows = max(MIN_ROWS, min(max(1, batch_tokens // (window * world_size)), len(mine)))
    return [mine[i : i + rows] + [(0, 0, 0)] * max(0, i + rows - len(mine)) for i in range(0, len(mine), rows)]


def window_inputs(tokens: Tensor, batch: list[tuple[int, int, int]], window: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Inputs, targets, target positions and the mask of scored targets of a batch of windows, each
    padded to `window` (a short last window; the padding is masked)."""
    a, s, e = torch.tensor(batch).T.unsqueeze(-1)
    idx = a + torch.arange(window)  # (rows, window) input positions
    valid = idx < e
    take, keep = torch.where(valid, idx, 0).to(tokens.device), valid.to(tokens.device)
    x, y = torch.where(keep, tokens[take], 0), torch.where(keep, tokens[take + 1], 0)
    dynamic_rows(x, y)
    return x, y, (idx + 1).to(tokens.device), (valid & (idx >= s)).to(tokens.device)


@torch.no_grad()
def score_windows(model, tokens: Tensor, ledger: ScoreLedger, rt: Runtime, window: int, stride: int, batch_tokens: int):
    """Standard (stride = window) and sliding-window scoring; windows are dealt round-robin to ranks."""
    for batch in window_batches(window_plan(tokens.numel() - 1, window, stride), window, batch_tokens, rt.rank, rt.world_size):
        x, y, positions, mask = window_inputs(tokens, batch, window)
        ledger.score(model, x, y, positions, mask, layout=isolated_layout(model, x))


# ----------------------------------------------------------------------------- evaluation: score-first TTT (per-document LoRA, phased global SGD)


class BatchedAdam:
    """Adam / AdamW / SGD over parameters whose first dimension is the document, each document with its own LR."""

    def __init__(self, params: list[Tensor], kind: str, betas: tuple[float, float], weight_decay: float, eps: float = 1e-8):
        self.params, self.kind, self.betas, self.wd, self.eps = params, kind, betas, weight_decay, eps
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0

    def reset(self):
        for buf in self.m + self.v:
            buf.zero_()
        self.t = 0

    @torch.no_grad()
    def step(self, lr: Tensor):
        """lr: (documents,) learning rates; a document with lr 0 is left exactly as it is."""
        self.t += 1
        b1, b2 = self.betas
        for p, m, v in zip(self.params, self.m, self.v):
            if p.grad is None:
                continue
            g = p.grad
            lr_p = lr.view(-1, *([1] * (p.ndim - 1)))
            if self.kind == "sgd":
                p.sub_(lr_p * g)
                continue
            m.lerp_(g, 1 - b1)
            v.lerp_(g * g, 1 - b2)
            update = (m / (1 - b1**self.t)) / ((v / (1 - b2**self.t)).sqrt() + self.eps)
            if self.kind == "adamw" and self.wd:
                p.mul_(1 - lr_p * self.wd)
            p.sub_(lr_p * update)


def zigzag_ranks(num_items: int, world_size: int) -> list[int]:
    """Rank of each item of a length-sorted list: 0..W-1, W-1..0, ... so every rank gets long and short ones."""
    out = []
    for i in range(num_items):
        r, pos = divmod(i, world_size)
        out.append(pos if r % 2 == 0 else world_size - 1 - pos)
    return out


def _batched(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def phase_ranges(docs: list[tuple[int, int]], args: Hyperparameters) -> list[tuple[int, int, bool]]:
    """(first, end, then_sgd) document ranges in stream order: the phased mode cuts the stream after the
    document that brings the scored tokens to each TTT_PHASE_TOKENS count (or after each TTT_PHASE_DOCS
    count of documents), and runs global SGD on everything before the cut."""
    unit, counts = args.ttt_phase_cuts
    ends, cuts = np.array([e for _, e in docs]), []
    for count in counts if args.ttt_mode == "phased" else []:
        cut = count if unit == "docs" else int(np.searchsorted(ends, count)) + 1
        if cut < len(docs) and (not cuts or cut > cuts[-1]):
            cuts.append(cut)
    bounds = [0] + cuts + [len(docs)]
    return [(a, b, b in cuts) for a, b in zip(bounds, bounds[1:])]


def adapter_lr(c: int, args: Hyperparameters) -> float:
    """The adapter LR at chunk c of a document: a causal schedule (it never looks at the document's length)."""
    if not args.ttt_lr_horizon:
        return args.ttt_lr
    return args.ttt_lr * 0.5 * (1 + math.cos(math.pi * min(c, args.ttt_lr_horizon) / args.ttt_lr_horizon))


@dataclass
class PhaseStart:
    """What a phase's documents start from: recorded by the run, the audit rescores documents from it."""
    first_doc: int
    weights: dict[str, Tensor]
    shared_A: list[Tensor] | None


@dataclass
class Replay:
    """The audit's replay of some of a run's TTT batches: those holding one of `docs` (indices into
    document_spans), from the run's PhaseStarts; `late`: the documents the run scored after its deadline."""
    starts: list[PhaseStart]
    docs: set[int]
    late: set[int]


@dataclass
class TTTStats:
    docs_adapted: int = 0
    docs_base: int = 0
    docs_after_deadline: int = 0
    updates: int = 0
    phases: int = 0  # global SGD phases run
    tokens_computed: int = 0  # token positions through the model, every pass (scoring, adapting, phases)
    tokens_scored: int = 0


class ScoreFirstTTT:
    """Score-first test-time training: per-document LoRA (TTT_MODE=lora), plus global SGD phases (phased).

    The documents (split at BOS) are taken in stream order, phase by phase (TTT_PHASE_TOKENS). Inside
    a phase, each rank takes its share of the phase's documents (zigzag over length) and batches them
    by length. Each document starts with B = 0 and the phase's A, and its targets are cut into
    chunks. One forward per chunk: its scores are recorded in the ledger first, and only then does
    the loss of that same forward train the document's adapters (the ledger checks it holds those
    positions) before chunk c+1 is scored. Finished documents leave the batch; the last chunk is
    never trained on. Documents of one phase adapt independently, so the batching changes nothing.
    After a phase, global SGD trains every weight on all documents scored so far (stream order:
    those before the cut), and the next phase's A is the mean A the phase's documents ended with. So
    a token's score depends on the artifact, its own document before it, and the documents before its
    phase: never on later tokens nor on where its document ends. After the deadline the remaining
    documents get the base model (zero adapters, through the same compiled graph).
    """

    def __init__(self, cfg: ModelConfig, args: Hyperparameters, rt: Runtime):
        self.args, self.rt = args, rt
        self.adapters = DocumentAdapters(cfg, args.ttt_batch_size, args.ttt_lora_rank, args.ttt_head_rank, args.ttt_target_list, args.ttt_bias, args.ttt_lora_alpha).to(rt.device)
        self.optimizer = BatchedAdam(list(self.adapters.parameters()), args.ttt_optimizer, (args.ttt_beta1, args.ttt_beta2), args.ttt_wd, args.ttt_eps)
        self.shared_A: list[Tensor] | None = None
        self.phase_docs = 0  # documents adapted in the current phase (their A is summed for the next phase)
        if args.ttt_warm_a:
            g = torch.Generator(device=rt.device).manual_seed(args.seed * 1_000_003)
            self.shared_A = [(2 * torch.rand(m.A.shape[1:], generator=g, device=rt.device) - 1) / math.sqrt(m.A.size(1)) for m in self.adapters.loras()]

    def __call__(self, model, tokens: Tensor, ledger: ScoreLedger, rt: Runtime, base_ledger: ScoreLedger | None = None, deadline: float | None = None, log=None,
                 phase_starts: list | None = None, replay: Replay | None = None) -> TTTStats:
        """Score every target of `tokens` once into `ledger` (and, if given, the base model's scores into `base_ledger`).

        The audit's hooks: `phase_starts` gets a PhaseStart at each phase's start; `replay` computes
        only the batches holding one of its documents, as the run computed them, each phase from its
        recorded start (no SGD phase; a batch is late where the run's was)."""
        args, stats = self.args, TTTStats()
        docs = document_spans(tokens)
        t_start, done, total = time.perf_counter(), 0, 0
        ranges = phase_ranges(docs, args)
        for p, (first, end, then_sgd) in enumerate(ranges):
            if replay is not None:
                getattr(model, "_orig_mod", model).load_state_dict(replay.starts[p].weights)
                self.shared_A = replay.starts[p].shared_A
            if phase_starts is not None:
                state = getattr(model, "_orig_mod", model).state_dict()
                phase_starts.append(PhaseStart(first, {k: v.detach().clone() for k, v in state.items()}, None if self.shared_A is None else [a.clone() for a in self.shared_A]))
            order = sorted(range(first, end), key=lambda d: (docs[d][1] - docs[d][0], d))
            mine = [d for d, r in zip(order, zigzag_ranks(len(order), rt.world_size)) if r == rt.rank]
            total += len(mine)
            A_sum = [torch.zeros_like(a) for a in self.shared_A] if self.shared_A is not None else None
            batches = _batched(mine, args.ttt_batch_size)
            for k, batch in enumerate(batches):
                if replay is not None and replay.docs.isdisjoint(batch):
                    continue
                late = not replay.late.isdisjoint(batch) if replay is not None else deadline is not None and time.perf_counter() > deadline
                adapt = args.ttt_lr > 0 and not late
                stats.docs_after_deadline += len(batch) if late else 0
                stats.docs_adapted += len(batch) if adapt else 0
                stats.docs_base += len(batch) if not adapt and not late else 0
                self.score_batch(model, tokens, ledger, [docs[d] for d in batch], adapt, late, base_ledger, stats, A_sum)
                done += len(batch)
                if log is not None and ((k + 1) % max(1, len(batches) // 4) == 0 or k + 1 == len(batches)):
                    elapsed = time.perf_counter() - t_start
                    log(f"ttt_progress phase:{stats.phases + 1}/{sum(r[2] for r in ranges) + 1} docs:{done}/{len(docs)} rank_docs:{done}/{total}+ "
                        f"elapsed:{elapsed:.1f}s computed_per_scored:{stats.tokens_computed / max(stats.tokens_scored, 1):.1f}")
            if then_sgd and replay is None:
                self.global_sgd(model, tokens, docs[end - 1][1], ledger, rt, stats)
                stats.phases += 1
                if A_sum is not None:
                    self.shared_A = self.mean_A(A_sum, rt)
        stats.updates = ledger.updates
        return stats

    def chunk_windows(self, tokens: Tensor, batch: list[tuple[int, int]], c: int):
        """Inputs, targets, positions and the mask of chunk c's targets for each document (left-aligned,
        zero padded), on the tokens' device. Every window ends where chunk c ends in a document long
        enough to hold it, so its context never depends on where its document ends, and all have the
        width min((c + 1) * chunk, context)."""
        C = self.args.ttt_chunk_size
        w0 = max(0, (c + 1) * C - self.args.ttt_context_len)
        spans = torch.tensor(batch)
        starts, ends = spans[:, :1], spans[:, 1:]
        idx = starts + w0 + torch.arange((c + 1) * C - w0)  # (B, width) input positions
        valid = idx < torch.minimum(ends, starts + (c + 1) * C)
        mask = valid & (idx >= starts + c * C)
        device = tokens.device
        take, valid = torch.where(valid, idx, 0).to(device), valid.to(device)
        return torch.where(valid, tokens[take], 0), torch.where(valid, tokens[take + 1], 0), (idx + 1).to(device), mask.to(device)

    def score_batch(self, model, tokens, ledger, batch, adapt: bool, late: bool, base_ledger, stats: TTTStats, A_sum):
        """One batch of documents, chunk by chunk. Every forward goes through the adapters (reset, B = 0,
        they add exactly nothing where the base model scores) with gradients on: one compiled graph."""
        args, adapters = self.args, self.adapters
        C, limit = args.ttt_chunk_size, args.ttt_max_adapt_tokens
        num_chunks = [-(-(e - s) // C) for s, e in batch]
        adapters.reset([args.seed * 1_000_003 + s for s, _ in batch], self.shared_A if adapt else None)
        self.optimizer.reset()
        for c in range(max(num_chunks)):
            active = [i for i in range(len(batch)) if c < num_chunks[i]]  # finished documents leave the batch
            rows = active + active[:1] * (MIN_ROWS - len(active))  # a lone document gets a masked twin
            x, y, pos, mask = self.chunk_windows(tokens, [batch[i] for i in rows], c)
            mask[len(active) :] = False
            trains = [k < len(active) and adapt and c < num_chunks[i] - 1 and (not limit or (c + 1) * C <= limit) for k, i in enumerate(rows)]
            adapters.rows = torch.tensor(rows, device=tokens.device)
            dynamic_rows(x, y, pos, mask, dims=(0, 1))
            dynamic_rows(adapters.rows)
            with torch.enable_grad():
                nll = ledger.score(model, x, y, pos, mask, adapters, late=late, layout=ONE_SEGMENT_PER_ROW)
            stats.tokens_computed += x.numel()
            stats.tokens_scored += int(mask.sum())
            if base_ledger is not None:  # TTT_REPORT_BASE: the base model on the same windows (its own graph)
                with torch.no_grad():
                    base_ledger.score(model, x, y, pos, mask, layout=ONE_SEGMENT_PER_ROW)
                stats.tokens_computed += x.numel()
            if not any(trains):
                continue
            train_mask = mask & torch.tensor(trains, device=tokens.device).unsqueeze(1)
            ledger.require_scored(pos[train_mask])
            lr = torch.zeros(args.ttt_batch_size)
            lr[[i for k, i in enumerate(rows) if trains[k]]] = adapter_lr(c, args)
            lr = lr.to(tokens.device)
            for step in range(args.ttt_steps):
                if step:
                    with torch.enable_grad(), autocast_context(x.device):
                        nll = model(x, y, adapters=adapters, layout=ONE_SEGMENT_PER_ROW, reduction="none")
                    stats.tokens_computed += x.numel()
                per_doc = (nll * train_mask).sum(dim=1) / train_mask.sum(dim=1).clamp_min(1)
                per_doc.sum().backward()
                self.optimizer.step(lr)
                for p in adapters.parameters():
                    p.grad = None
        adapters.rows = None
        if adapt and A_sum is not None:
            for total, m in zip(A_sum, adapters.loras()):
                total += m.A[: len(batch)].detach().sum(0)
            self.phase_docs += len(batch)

    def mean_A(self, A_sum: list[Tensor], rt: Runtime) -> list[Tensor]:
        """The next phase's A: the mean over every document adapted in this phase, on every rank."""
        docs = torch.tensor(float(self.phase_docs), device=rt.device)
        if rt.distributed:
            for t in A_sum + [docs]:
                dist.all_reduce(t)
        self.phase_docs = 0
        return [a / docs for a in A_sum] if docs > 0 else self.shared_A

    def global_sgd(self, model, tokens: Tensor, end: int, ledger: ScoreLedger, rt: Runtime, stats: TTTStats):
        """One epoch of SGD on every weight over target positions 1..end (all scored already, by some
        rank): sequences of TTT_PHASE_SEQ_LEN, steps of TTT_PHASE_CHUNK_TOKENS shared by the ranks,
        momentum, gradient clipping and a cosine LR over the phase's steps."""
        args = self.args
        seq = min(args.ttt_phase_seq_len, end)
        starts = list(range(0, end - seq + 1, seq))
        ledger.require_scored(torch.arange(1, starts[-1] + seq + 1, device=tokens.device), rt)
        per_step = max(1, args.ttt_phase_chunk_tokens // seq)
        steps = _batched(starts, per_step)
        params = [p for p in model.parameters()]
        momentum = [torch.zeros_like(p) for p in params]
        model.requires_grad_(True)
        try:
            for k, step in enumerate(steps):
                lr = args.ttt_phase_lr * 0.5 * (1 + math.cos(math.pi * k / len(steps)))
                mine = step[rt.rank :: rt.world_size]
                if mine:  # this rank's sequences in one forward; a lone one gets a twin of weight 0
                    rows = torch.tensor(mine + mine[:1] * (MIN_ROWS - len(mine)), device=tokens.device)
                    weight = (torch.arange(rows.numel(), device=tokens.device) < len(mine)).float()
                    idx = rows.unsqueeze(1) + torch.arange(seq, device=tokens.device)
                    x, y = tokens[idx], tokens[idx + 1]
                    dynamic_rows(x, y)
                    with autocast_context(x.device):
                        nll = model(x, y, layout=isolated_layout(model, x), reduction="none")
                    ((nll.sum(dim=1) * weight).sum() / (len(step) * seq)).backward()
                    stats.tokens_computed += x.numel()
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
                if rt.distributed:
                    flat = torch.cat([g.reshape(-1) for g in grads])
                    dist.all_reduce(flat)
                    grads = [f.view_as(p) for f, p in zip(flat.split([p.numel() for p in params]), params)]
                norm = torch.sqrt(sum(g.float().square().sum() for g in grads))
                clip = min(1.0, args.ttt_phase_clip / (float(norm) + 1e-6)) if args.ttt_phase_clip > 0 else 1.0
                with torch.no_grad():
                    for p, g, buf in zip(params, grads, momentum):
                        buf.mul_(args.ttt_phase_momentum).add_(g, alpha=clip)
                        p.sub_(buf, alpha=lr)
                        p.grad = None
                ledger.updates += 1
        finally:
            model.requires_grad_(False)


# ----------------------------------------------------------------------------- evaluation: legality audit

AUDIT_PROBE_TIMEOUT_S = 3600  # the fresh process of the probes; a hang there must not hold the run forever
MEMORIZATION_SIGMAS = 4.0  # validation may score better than the held-out text by this many standard errors


@dataclass
class AuditReport:
    path: str
    checks: dict  # name -> (passed, detail)
    seconds: dict = field(default_factory=dict)  # part -> wall-clock seconds

    @property
    def passed(self) -> bool:
        return all(ok for ok, _ in self.checks.values())

    def line(self) -> str:
        parts = " ".join(f"{name}:{'ok' if ok else 'FAIL'}[{detail}]" for name, (ok, detail) in self.checks.items())
        return f"eval_audit path:{self.path} verdict:{'PASS' if self.passed else 'FAIL'} {parts}"


def scramble_(tokens: Tensor, start: int, end: int, vocab_size: int, seed: int, keep_documents: bool = True):
    """Replace tokens[start:end] in place by random ones; keep_documents: the BOS tokens among them stay."""
    part = tokens[start:end]
    repl = torch.randint(2, vocab_size, part.shape, generator=torch.Generator().manual_seed(seed)).to(tokens.device)
    tokens[start:end] = torch.where(part == BOS_ID, part, repl) if keep_documents else repl


def perturb_after(tokens: Tensor, t: int, vocab_size: int, seed: int = 0, keep_documents: bool = True) -> Tensor:
    """A copy whose tokens after index t are replaced at random. keep_documents: BOS tokens stay, so
    documents keep their bounds; else the BOS go too and the document holding t runs to the end."""
    out = tokens.clone()
    scramble_(out, t + 1, tokens.numel(), vocab_size, seed, keep_documents)
    return out


def audit_cut_points(tokens: Tensor, chunk: int) -> list[int]:
    """Cuts t (tokens after index t change) where leaks hide: t = 1 (whatever is fitted on the stream
    given sees a different stream), inside a chunk and at a chunk's end in the second chunk of a
    document long enough to be adapted over several chunks, at a document's BOS, and at N/2 + 1 (a
    window end for power-of-two windows is N/2)."""
    n = tokens.numel()
    cuts = {1, n // 2 + 1}
    for s, e in document_spans(tokens):
        if e - s > 3 * chunk and s + 2 * chunk < n - 2:
            cuts |= {s + chunk + chunk // 2, s + 2 * chunk}
            break
    starts = [s for s, _ in document_spans(tokens) if 0 < s < n - 2]
    if starts:
        cuts.add(starts[len(starts) // 2])
    return sorted(c for c in cuts if 0 < c < n - 2)


def probe_targets(name: str, tokens: Tensor, args: Hyperparameters) -> int:
    """How many targets the probe covers: about EVAL_AUDIT_TOKENS, ending where one of the run's own
    units ends (a window of its plan; a document for TTT), so that the probe scores every position
    with exactly the context the run gave it."""
    n = tokens.numel() - 1
    limit = min(args.eval_audit_tokens, n + 1) - 1
    if name == "ttt":
        bos = torch.nonzero(tokens[1 : limit + 1] == BOS_ID).flatten()
        return limit if limit == n or not bos.numel() else int(bos[-1]) + 1
    window, stride = path_windows(name, args)
    step = min(stride, window)
    end = min(window, n)
    while end < n and min(end + step, n) <= limit:
        end = min(end + step, n)
    return end


def window_containing(p: int, num_targets: int, window: int, stride: int) -> tuple[int, int, int]:
    """The window (a, s, e) of window_plan(num_targets, window, stride) that scores target position p."""
    first, step = min(window, num_targets), min(stride, window)
    if p <= first:
        return 0, 0, first
    k = -(-(p - first) // step)
    s, e = first + (k - 1) * step, min(first + k * step, num_targets)
    return (s if stride >= window else max(0, e - window)), s, e


def probe_streams(probe: Tensor, cuts: list[int], vocab_size: int) -> list[Tensor]:
    """The probe's perturbed copies (at each cut, without and with the document boundaries), then the
    probe. The fresh process reads them in this order as its validation shards, so what a script
    fits on its validation data at start-up sees the earliest cut first, not the run's tokens."""
    return [perturb_after(probe, t, vocab_size, seed=t, keep_documents=keep) for t in cuts for keep in (False, True)] + [probe]


def probe_phases(name: str, probe: Tensor, args: Hyperparameters) -> str | None:
    """TTT_PHASE_DOCS of the causal jobs when the run's phases all start beyond the probe: cuts at a
    third and two thirds of its documents, so that the causal check crosses phase transitions too."""
    spans = document_spans(probe)
    docs = len(spans)
    if name != "ttt" or args.ttt_mode != "phased" or docs < 3 or len(phase_ranges(spans, args)) > 1:
        return None
    return f"{docs // 3},{2 * docs // 3}"


def probe_jobs(num_streams: int, phases: str | None = None) -> list[tuple[int, bool, str | None]]:
    """(stream, alone, TTT_PHASE_DOCS or None for the run's): each perturbed copy alone, then the probe
    alone twice (the noise floor), as the run batches it, and alone with the run's phases if not those."""
    probe = num_streams - 1
    jobs = [(i, True, phases) for i in range(num_streams)] + [(probe, True, phases), (probe, False, None)]
    return jobs + ([(probe, True, None)] if phases else [])


def score_probes(score, streams: list[Tensor], jobs: list, tables: ByteTables, watch: list[int], rt: Runtime) -> list[dict]:
    """Each job scored by `score(tokens, ledger, alone, phases)` into an audit ledger merged over the
    ranks; a LeakageError ends the list with its message."""
    out = []
    for i, alone, phases in jobs:
        ledger = ScoreLedger(streams[i], tables, audit=True, watch=tuple(watch))
        try:
            score(streams[i], ledger, alone, phases)
            ledger.merge(rt)
            ledger.result()
        except LeakageError as e:
            return out + [{"error": str(e)}]
        out.append({"nll": ledger.nll.cpu(), "late": ledger.late.cpu(), "updates": ledger.updates, "distributions": {p: d.cpu() for p, d in ledger.distributions.items()},
                    "normalization": ledger.normalization_error, "mismatch": ledger.nll_mismatch, "moments": ledger.mismatch_moments, "unshown": ledger.without_distribution})
    return out


def probe_noise(results: list[dict], cuts: list[int]) -> tuple[float, float]:
    """(run-to-run noise of the probe alone, how much batching it as the run does moves it)."""
    reference, again, as_run, *run_alone = results[2 * len(cuts) :]
    return float((reference["nll"] - again["nll"]).abs().max()), float((as_run["nll"] - (run_alone or [reference])[0]["nll"]).abs().max())


def probe_checks(results: list[dict], cuts: list[int], full_ledger: ScoreLedger | None, exact: bool = True) -> dict:
    """exactly_once, causal, prefix, normalized and score_before_update from the probes' results (see audit_path)."""
    if results and "error" in results[-1]:  # the ledger stopped the scorer: charge the check whose rule it broke
        error = results[-1]["error"]
        return {"score_before_update" if "before it was scored" in error else "exactly_once": (False, error)}
    perturbed, (reference, again, as_run) = results[: 2 * len(cuts)], results[2 * len(cuts) : 2 * len(cuts) + 3]
    floor, regroup = probe_noise(results, cuts)
    tolerance = 4.0 * floor
    checks = {}
    if full_ledger is not None:
        once = int((full_ledger.count == 1).sum())
        checks["exactly_once"] = (once == full_ledger.num_targets, f"{once}/{full_ledger.num_targets} probes_ok")
    else:
        checks["exactly_once"] = (True, "probes")
    worst_before, worst_dist, all_moved = 0.0, 0.0, True
    for (t, _), ledger in zip([(t, keep) for t in cuts for keep in (False, True)], perturbed):
        worst_before = max(worst_before, float((reference["nll"][:t] - ledger["nll"][:t]).abs().max()))
        a, b = reference["distributions"].get(t + 1), ledger["distributions"].get(t + 1)
        if a is not None and b is not None:
            worst_dist = max(worst_dist, float((a - b).abs().max()))
        all_moved &= bool((reference["nll"][t:] != ledger["nll"][t:]).any())
    shown = all(t + 1 in r["distributions"] for r in results for t in cuts)
    causal_ok = worst_before <= tolerance and worst_dist <= tolerance and all_moved and shown
    checks["causal"] = (causal_ok, f"cuts:{','.join(map(str, cuts))} max_change_upto_t:{worst_before:.3g} max_dlogp_at_t+1:{worst_dist:.3g} "
                                   f"later_moved:{all_moved} tolerance:{tolerance:.3g}")
    if full_ledger is not None:
        prefix_tolerance = 4.0 * regroup + tolerance
        n = as_run["nll"].numel()
        comparable = ~full_ledger.late[:n].cpu()  # documents after the TTT deadline depend on timing only
        gap = float((full_ledger.nll[:n].cpu() - as_run["nll"])[comparable].abs().max())
        checks["prefix"] = (gap <= prefix_tolerance, f"max_diff_vs_file:{gap:.3g} tolerance:{prefix_tolerance:.3g} positions:{int(comparable.sum())}")
    norm, mismatch = max(r["normalization"] for r in results), max(r["mismatch"] for r in results)
    hidden = sum(r["unshown"] for r in results)
    # The recorded nll and the distribution come from two forwards (two compiled graphs): in fp32 they
    # agree to rounding; in bf16 each token may differ by a few units of the logits' last place, so
    # there the sum that scores (their mean difference) must be 0 within its standard error.
    n, total, squares = (sum(r["moments"][i] for r in results) for i in range(3))
    bias = total / max(n, 1)
    se = math.sqrt(max(squares / max(n, 1) - bias**2, 0.0) / max(n, 1))
    agree = mismatch <= 1e-4 if exact else abs(bias) <= 1e-4 + 4 * se
    checks["normalized"] = (norm <= 1e-4 and agree and hidden == 0,
                            f"max_abs_log_sum_p:{norm:.2g} nll_vs_distribution:{mismatch:.2g} mean:{bias:.2g}±{se:.2g} rule:{'max' if exact else 'mean'} unshown:{hidden}")
    checks["score_before_update"] = (True, f"updates:{reference['updates']} all_on_scored_positions")
    return checks


def audit_path(name: str, score, tokens: Tensor, tables: ByteTables, rt: Runtime, vocab_size: int, chunk: int,
               full_ledger: ScoreLedger | None = None, probe_tokens: int = 8192) -> AuditReport:
    """The probe checks of one evaluation path, scored here by `score(tokens, ledger, alone)`, which
    must run the path as the run does from the artifact's weights (a fresh scorer each call);
    alone=True with every batch of one document or window, so that no shape, and so no rounding,
    of a document's computation depends on any other document. (The run's audit scores the same
    probes in a fresh process: audit_final_path.) The probe is the first `probe_tokens` tokens.

    exactly_once: every target of the run scored once (and of every probe).
    causal: at several cuts t, with the tokens after t replaced (keeping and removing the document
      boundaries), the scores at positions <= t and the whole distribution at t+1 (whose own target
      changed) do not move beyond the run-to-run noise of the same probe (0 on CPU), while some
      later score does. Catches reading ahead, training before scoring, fitting on the tokens
      given, and schedules or routing that depend on where a document ends.
    prefix: the run's scores on the probe's positions equal the probe scored with the run's batch
      sizes, within a few times how much regrouping alone moves them.
    normalized: every distribution scored in the probes sums to 1 and the recorded nll is its value
      at the target. score_before_update: every update was on scored positions (the ledger stops it).
    """
    probe = tokens[: min(probe_tokens, tokens.numel())]
    cuts = audit_cut_points(probe, chunk)
    streams = probe_streams(probe, cuts, vocab_size)
    results = score_probes(lambda toks, ledger, alone, phases: score(toks, ledger, alone), streams, probe_jobs(len(streams)), tables, [t + 1 for t in cuts], rt)
    return AuditReport(name, probe_checks(results, cuts, full_ledger, exact=rt.device.type == "cpu"))


def weights_sha256(weights: dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(weights):
        h.update(k.encode())
        h.update(weights[k].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def score_probe_jobs(name: str, forward, weights: dict[str, Tensor], streams: list[Tensor], jobs: list, watch: list[int], args: Hyperparameters, rt: Runtime, tables: ByteTables) -> dict:
    """What the fresh process finds: each job scored through score_path, and the hash of the weights it loaded."""

    def score(toks, ledger, alone, phases):
        job = one_per_batch(args) if alone else args
        if phases:
            job = copy.copy(job)
            job.ttt_phase_docs = phases
        score_path(name, forward, weights, toks, ledger, job, rt)

    return {"results": score_probes(score, streams, jobs, tables, watch, rt), "weights_sha256": weights_sha256(weights)}


def score_probe_file(name: str, forward, weights: dict[str, Tensor], args: Hyperparameters, rt: Runtime, tables: ByteTables):
    """The audit's fresh process (EVAL_AUDIT_PROBES): each validation shard is one probe stream; score
    the jobs the file lists and write what this rank found."""
    spec = json.loads(Path(args.eval_audit_probes).read_text())
    streams = [torch.from_numpy(load_data_shard(f).astype(np.int64)).to(rt.device) for f in shard_files(args.data_path, "val")]
    buffer = io.BytesIO()
    torch.save(score_probe_jobs(name, forward, weights, streams, spec["jobs"], spec["watch"], args, rt, tables), buffer)
    write_atomic(f"{spec['out']}.{rt.rank}", buffer.getvalue())


def probe_environment(args: Hyperparameters, overrides: dict[str, str]) -> dict[str, str]:
    """The fresh process's environment: this run's settings and other variables (not torchrun's: the
    fresh processes form a group of their own), then `overrides`."""
    launcher = {"WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in launcher and not k.startswith("TORCHELASTIC_") and not misspelt_setting(k)}
    env.update({k: str(int(v) if isinstance(v, bool) else v) for k, v in args.as_dict().items()})
    return {**env, **overrides}


def write_probe_data(folder: Path, streams: list[Tensor], jobs: list, watch: list[int], tables: ByteTables, args: Hyperparameters) -> Path:
    """A DATA_PATH whose validation shards are the probe streams (with byte sidecars where the run has
    them), one train shard for the preflight, the tokenizer fingerprint; and the jobs file."""
    data = folder / "data"
    data.mkdir(parents=True)
    for i, stream in enumerate(streams):
        shard, tokens = data / f"fineweb_val_{i:06d}.bin", stream.cpu().numpy()
        write_data_shard(shard, tokens)
        if tables.sidecar_bytes is not None:
            write_data_shard(byte_sidecar_path(str(shard)), np.where(tokens == BOS_ID, 0, tables.sidecar_bytes[: tokens.size].cpu().numpy()))
    train = shard_files(args.data_path, "train")[0]
    os.symlink(os.path.abspath(train), data / os.path.basename(train))
    if (Path(args.data_path) / TOKENIZER_FINGERPRINT).is_file():
        shutil.copy(Path(args.data_path) / TOKENIZER_FINGERPRINT, data / TOKENIZER_FINGERPRINT)
    jobs_file = folder / "probes.json"
    jobs_file.write_text(json.dumps({"jobs": jobs, "watch": watch, "out": str(folder / "results")}))
    return jobs_file


def run_probe_process(streams: list[Tensor], jobs: list, watch: list[int], args: Hyperparameters, rt: Runtime, tables: ByteTables, artifact: Path, code: Path):
    """Score the probe jobs in a fresh process of the shipped code, one per rank in a group of their
    own: EVAL_ONLY on the artifact with the probe streams as its validation shards, so anything the
    script fits on validation data at import or start-up is fitted anew there. Returns (results,
    sha256 of the weights it loaded, None) the same on every rank, or (None, None, why it failed)."""
    port = [0]
    if rt.is_master:
        with socket.socket() as s:
            s.bind(("", 0))
            port[0] = s.getsockname()[1]
    if rt.distributed:
        dist.broadcast_object_list(port, src=0)
    found, problem = None, None
    with tempfile.TemporaryDirectory(prefix="eval_audit_") as tmp:
        folder = Path(tmp)
        overrides = dict(EVAL_ONLY=str(Path(artifact).resolve()), DATA_PATH=str(folder / "data"), LOG_DIR=str(folder / "logs"), RUN_ID="eval_audit_probes",
                         EVAL_AUDIT_PROBES=str(write_probe_data(folder, streams, jobs, watch, tables, args)), EVAL_DUMP="", VAL_MAX_TOKENS="0", QUANTIZE_ONLY="", ARTIFACT_PATH="")
        if rt.distributed:
            overrides.update(WORLD_SIZE=str(rt.world_size), RANK=str(rt.rank), LOCAL_RANK=str(rt.local_rank), LOCAL_WORLD_SIZE=os.environ.get("LOCAL_WORLD_SIZE", str(rt.world_size)), MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"), MASTER_PORT=str(port[0]))
        with open(folder / "output.txt", "w+") as output:
            try:
                code_rc = subprocess.run([sys.executable, str(code)], env=probe_environment(args, overrides), stdout=output, stderr=subprocess.STDOUT, timeout=AUDIT_PROBE_TIMEOUT_S).returncode
            except subprocess.TimeoutExpired:
                code_rc = f"timeout after {AUDIT_PROBE_TIMEOUT_S}s"
            output.seek(0)
            last = (output.read().strip().splitlines() or [""])[-1][-300:]
        results = folder / f"results.{rt.rank}"
        if results.is_file():
            found = torch.load(results, weights_only=True)
        else:
            problem = f"the probe process of rank {rt.rank} ended ({code_rc}) without results: {last}"
    problems = [problem]
    if rt.distributed:
        problems = [None] * rt.world_size
        dist.all_gather_object(problems, problem)
        shared = [found]
        dist.broadcast_object_list(shared, src=0)
        found = shared[0]
    problem = next((p for p in problems if p), None)
    return (None, None, problem) if problem else (found["results"], found["weights_sha256"], None)


def ledger_seed(ledger: ScoreLedger) -> int:
    """A seed from every score of the run: the script cannot know it before it has scored everything."""
    return int.from_bytes(hashlib.sha256(ledger.nll.cpu().numpy().tobytes()).digest()[:8], "little")


def sampled_check(name: str, forward, weights: dict[str, Tensor], tokens: Tensor, full_ledger: ScoreLedger, phase_starts: list[PhaseStart],
                  args: Hyperparameters, rt: Runtime, tables: ByteTables, floor: float) -> tuple[bool, str]:
    """EVAL_AUDIT_SAMPLES positions drawn from the whole stream with a seed from the run's scores; the
    batch that scored each (TTT: of documents, from its phase's recorded start; else of windows) is
    computed again exactly as the run computed it, as is and with the tokens of the position's
    document or window after the position before it replaced. The first must give the run's scores
    (every target of the batch); the second, up to that position and in the distribution at it, must
    not move. Both within the probes' run-to-run noise: a leak keyed on position, document or phase
    shows in one or the other."""
    if not args.eval_audit_samples:
        return False, "off: EVAL_AUDIT_SAMPLES=0"
    seed = ledger_seed(full_ledger)
    positions = torch.randint(1, full_ledger.num_targets + 1, (args.eval_audit_samples,), generator=torch.Generator().manual_seed(seed)).tolist()
    run, versus_run, upto_t, units, extra = full_ledger.nll, 0.0, 0.0, 0, ""
    if name == "ttt":
        docs = document_spans(tokens)
        ends = [e for _, e in docs]
        picks = {}
        for p in positions:
            d = bisect.bisect_left(ends, p)
            picks.setdefault(d, (*docs[d], p))
        perturbed = tokens.clone()
        for s, e, p in picks.values():
            scramble_(perturbed, p, e, args.vocab_size, seed=p)
        starts = torch.tensor([s for s, _ in docs], device=tokens.device)
        replay = Replay(phase_starts, set(picks), set(torch.nonzero(full_ledger.late[starts]).flatten().tolist()))
        watch = tuple(p for *_, p in picks.values())
        plain, changed = ScoreLedger(tokens, tables, audit=True, watch=watch), ScoreLedger(perturbed, tables, audit=True, watch=watch)
        for stream, ledger in ((tokens, plain), (perturbed, changed)):
            score_path("ttt", forward, weights, stream, ledger, args, rt, replay=replay)
            ledger.merge(rt)
        U, P, scored = plain.nll, changed.nll, plain.count > 0
        versus_run, units = float((U - run)[scored].abs().max()), int(scored.sum())
        for s, e, p in picks.values():
            a, b = plain.distributions.get(p), changed.distributions.get(p)  # the distribution at p: its own target changed
            at_t = math.inf if a is None or b is None else float((a - b).abs().max())
            upto_t = max(upto_t, at_t, float((U[s : p - 1] - P[s : p - 1]).abs().max()) if p - 1 > s else 0.0)
        extra = " phase_starts:" + ",".join(f"{ps.first_doc}@{weights_sha256(ps.weights)[:12]}" for ps in phase_starts)
    else:
        getattr(forward, "_orig_mod", forward).load_state_dict(weights)
        window, stride = path_windows(name, args)
        picks = {}
        for p in positions:
            picks.setdefault(window_containing(p, full_ledger.num_targets, window, stride), p)
        plan = window_plan(full_ledger.num_targets, window, stride)
        for r in range(rt.world_size):  # every rank replays every picked batch
            for batch in window_batches(plan, window, args.val_batch_size, r, rt.world_size):
                rows = [i for i, w in enumerate(batch) if w in picks]
                if not rows:
                    continue
                x, y, pos, mask = window_inputs(tokens, batch, window)
                changed_x = x.clone()
                for i in rows:
                    (a, s, e), p = batch[i], picks[batch[i]]
                    segment = tokens[a : e + 1].clone()
                    scramble_(segment, p - a, e + 1 - a, args.vocab_size, seed=p)
                    changed_x[i, : e - a] = segment[:-1]
                # the run's forward on its batch, then on the changed inputs with the run's targets:
                # up to p (its target included) nothing may move
                with torch.no_grad(), autocast_context(x.device):
                    U, P = (forward(inputs, y, layout=isolated_layout(forward, inputs), reduction="none").double() for inputs in (x, changed_x))
                versus_run, units = max(versus_run, float((U[mask] - run[pos[mask] - 1]).abs().max())), units + int(mask.sum())
                for i in rows:
                    (a, s, e), p = batch[i], picks[batch[i]]
                    upto_t = max(upto_t, float((U[i, s - a : p - a] - P[i, s - a : p - a]).abs().max()))
    tolerance = 4.0 * floor
    return (versus_run <= tolerance and upto_t <= tolerance,
            f"positions:{len(positions)} units:{len(picks)} seed:{seed:016x} replayed_targets:{units} max_diff_vs_run:{versus_run:.3g} max_change_upto_t:{upto_t:.3g} tolerance:{tolerance:.3g}{extra}")


def mean_and_variance(tokens: Tensor, nll: Tensor) -> tuple[float, float]:
    """The mean nll per token and its variance with documents as the sampling unit (tokens of one
    document are not independent): D / (D - 1) * sum_d (S_d - n_d * mean)^2 / N^2."""
    doc = torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.long, device=tokens.device), (tokens[1:-1] == BOS_ID).long()]), 0)
    sums = torch.zeros(int(doc[-1]) + 1, dtype=torch.float64, device=nll.device).index_add_(0, doc, nll)
    counts = torch.bincount(doc).double()
    mean, docs = float(sums.sum() / nll.numel()), sums.numel()
    return mean, float(((sums - counts * mean) ** 2).sum()) / nll.numel() ** 2 * docs / max(docs - 1, 1) if docs > 1 else math.inf


def memorization_check(forward, weights: dict[str, Tensor], tokens: Tensor, args: Hyperparameters, rt: Runtime, tables: ByteTables) -> tuple[bool, str]:
    """The artifact's base model on the held-out training text and on as many validation tokens:
    validation may not score better by more than MEMORIZATION_SIGMAS standard errors of the
    difference (documents as the unit), which weights that saw the validation set do (#1423)."""
    if not args.eval_audit_heldout_tokens:
        return False, "off: EVAL_AUDIT_HELDOUT_TOKENS=0"
    held = heldout_tokens(shard_files(args.data_path, "train"), args.eval_audit_heldout_tokens)
    n = min(held.size, tokens.numel())
    stats = []
    for stream in (tokens[:n], torch.from_numpy(held[:n].astype(np.int64)).to(tokens.device)):
        ledger = ScoreLedger(stream, tables)
        score_path("standard", forward, weights, stream, ledger, args, rt)
        ledger.merge(rt)
        stats.append(mean_and_variance(stream, ledger.nll))
    (val, val_var), (heldout, heldout_var) = stats
    gap, noise = heldout - val, math.sqrt(val_var + heldout_var)
    return gap <= MEMORIZATION_SIGMAS * noise, f"val_nll:{val:.4f} heldout_nll:{heldout:.4f} gap:{gap:.4f} noise:{noise:.4f} limit:{MEMORIZATION_SIGMAS:g}x tokens:{n}"


def agree_across_ranks(checks: dict, rt: Runtime) -> dict:
    """One verdict for all ranks: rank 0's checks on every rank, failed if any rank found otherwise."""
    if not rt.distributed:
        return checks
    gathered = [None] * rt.world_size
    dist.all_gather_object(gathered, checks)
    differ = [r for r, c in enumerate(gathered) if c != gathered[0]]
    return {**gathered[0], **({"ranks_agree": (False, f"ranks {differ} found otherwise than rank 0")} if differ else {})}


def audit_final_path(name: str, artifact: Path, args: Hyperparameters, rt: Runtime, tables: ByteTables, tokens: Tensor, full_ledger: ScoreLedger,
                     forward, weights: dict[str, Tensor], phase_starts: list[PhaseStart], code: Path, probe_runner=None) -> AuditReport:
    """The audit of the scored path, after its timed scoring: the probe checks (audit_path) on a
    probe aligned with the run's units, scored by a fresh process of the shipped code from the
    artifact file (`probe_runner`, by default run_probe_process), plus the file's weights being
    the run's; then here, on every rank, the sampled replay and the memorization check."""
    probe = tokens[: probe_targets(name, tokens, args) + 1]
    cuts = audit_cut_points(probe, args.ttt_chunk_size)
    streams = probe_streams(probe, cuts, args.vocab_size)
    runner = probe_runner or (lambda *a: run_probe_process(*a, artifact, code))
    seconds, t0 = {}, sync_time(rt)
    results, file_sha, problem = runner(streams, probe_jobs(len(streams), probe_phases(name, probe, args)), [t + 1 for t in cuts], args, rt, tables)
    seconds["probes"], t0 = sync_time(rt) - t0, sync_time(rt)
    floor = 0.0
    if problem:
        checks = {"probes": (False, problem)}
    else:
        checks = probe_checks(results, cuts, full_ledger, exact=rt.device.type == "cpu")
        floor = probe_noise(results, cuts)[0] if "error" not in results[-1] else 0.0
        run_sha = weights_sha256(weights)
        checks["weights"] = (run_sha == file_sha, f"run:{run_sha[:16]} file:{file_sha[:16]}")
    try:
        checks["sampled"] = sampled_check(name, forward, weights, tokens, full_ledger, phase_starts, args, rt, tables, floor)
    except LeakageError as e:
        checks["score_before_update"] = (False, str(e))
    seconds["sampled"], t0 = sync_time(rt) - t0, sync_time(rt)
    checks["memorization"] = memorization_check(forward, weights, tokens, args, rt, tables)
    seconds["memorization"] = sync_time(rt) - t0
    return AuditReport(name, agree_across_ranks(checks, rt), seconds)


# ----------------------------------------------------------------------------- evaluation: the paths and the report


def evaluation_paths(args: Hyperparameters) -> list[str]:
    """The enabled paths, the one a record is scored on last: the cheap roundtrip (standard windows)
    always, sliding windows as an opt-in diagnostic, then TTT."""
    return ["standard"] + (["sliding_window"] if args.eval_stride else []) + (["ttt"] if args.ttt_enabled else [])


def path_label(name: str, args: Hyperparameters) -> str:
    return {"standard": "roundtrip", "sliding_window": "sliding_window", "ttt": f"ttt_{args.ttt_mode}"}[name]


def one_per_batch(args: Hyperparameters) -> Hyperparameters:
    """The same settings with every window and every TTT document in a batch of its own (the audit's probes)."""
    alone = copy.copy(args)
    alone.val_batch_size, alone.ttt_batch_size = 1, 1
    return alone


def score_path(name: str, model, weights: dict[str, Tensor], tokens: Tensor, ledger: ScoreLedger, args: Hyperparameters, rt: Runtime, **ttt_options):
    """The evaluation entry point, for the run and for the audit alike: the model reset to `weights`
    (the artifact's), a fresh scorer for the path, every target of `tokens` scored into `ledger`."""
    getattr(model, "_orig_mod", model).load_state_dict(weights)
    if name == "ttt":
        return ScoreFirstTTT(getattr(model, "_orig_mod", model).cfg, args, rt)(model, tokens, ledger, rt, **ttt_options)
    return score_windows(model, tokens, ledger, rt, *path_windows(name, args), args.val_batch_size)


def path_windows(name: str, args: Hyperparameters) -> tuple[int, int]:
    """(window, stride) of a window path."""
    return (args.train_seq_len, args.train_seq_len) if name == "standard" else (args.eval_seq_len, args.eval_stride)


def dummy_token_stream(length: int, vocab_size: int, doc_len: int, device) -> Tensor:
    """Random tokens with a BOS every doc_len: compile warm-up without touching validation data."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(2, vocab_size, (length,), generator=g)
    tokens[::doc_len] = BOS_ID
    return tokens.to(device)


def evaluate_standard(model, tokens: Tensor, tables: ByteTables, args: Hyperparameters, rt: Runtime) -> EvalResult:
    ledger = ScoreLedger(tokens, tables)
    score_windows(model, tokens, ledger, rt, args.train_seq_len, args.train_seq_len, args.val_batch_size)
    ledger.merge(rt)
    return ledger.result()


def ttt_deadline(t_start: float, deadline_seconds: float, world_size: int) -> float | None:
    """The wall-clock time after which TTT stops adapting. TTT_DEADLINE_SECONDS counts 8-GPU
    seconds, so that fewer GPUs reproduce what 8 would score inside the 600 s budget."""
    return t_start + deadline_seconds * 8 / world_size if deadline_seconds > 0 else None


def compile_for_eval(model: GPT, args: Hyperparameters, rt: Runtime):
    """Batch sizes and TTT widths are marked dynamic where the paths call it, so each way of calling
    the model (windows, TTT, the phases' SGD, the audit's distributions) compiles once; the limit is
    raised above dynamo's 8 for the few ways and their rare specializations."""
    name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"  # renamed in torch 2.7
    setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 32))
    return compiled(model, args, rt)


def forward_graphs() -> int:
    """How many compiled versions of GPT.forward dynamo holds (its cache entries; 0 when nothing is compiled)."""
    try:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        return len(_debug_get_cache_entry_list(GPT.forward.__code__))
    except (ImportError, AttributeError):
        return 0


def warm_up_paths(forward, weights, names: list[str], args: Hyperparameters, rt: Runtime, tables: ByteTables, vocab_size: int, log):
    """Run every path on random tokens (never validation data) so each graph compiles before the clock
    runs: documents longer than the TTT context (every chunk width), and one phase cut, so the phased
    SGD step compiles too."""
    doc_len = max(args.ttt_context_len + 2 * args.ttt_chunk_size, args.ttt_phase_seq_len + 1)
    length = max(2 * args.eval_seq_len, args.train_seq_len, args.ttt_batch_size * doc_len, 4 * doc_len) + 1
    dummy = dummy_token_stream(length, vocab_size, doc_len, rt.device)
    warm_args = copy.copy(args)
    warm_args.ttt_phase_docs = "2"
    for name in names:
        t0 = sync_time(rt)
        score_path(name, forward, weights, dummy, ScoreLedger(dummy, tables), warm_args, rt)
        log(f"eval_compile path:{name} seconds:{sync_time(rt) - t0:.1f}")


def evaluate_artifact(path: Path, args: Hyperparameters, rt: Runtime, log: Logger, tables: ByteTables, val_tokens: Tensor, scheme: str, backend: str,
                      code: Path | None = None) -> tuple[dict, list]:
    """Everything after training. Timed, as the evaluation: load the artifact and score each path
    (every path from the artifact's weights). Untimed and logged apart: the compile warm-up on
    dummy tokens, and afterwards the audit of the final path (its fresh process runs `code`, the
    shipped train_gpt.py; by default this file). In that fresh process (EVAL_AUDIT_PROBES) only the
    final path is warmed up, and the probes are scored instead of the paths."""
    t_start, reload = sync_time(rt), Stage("reload", log, rt)
    model = load_model_from_artifact(path, rt.device, backend)
    model.requires_grad_(False)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    log(f"artifact_load decompress_and_rebuild:{1000.0 * reload.done():.0f}ms")
    forward = compile_for_eval(model, args, rt)
    names = evaluation_paths(args)
    warmup_s, graphs = 0.0, forward_graphs()
    if forward is not model:
        warmup = Stage("eval_compile_warmup", log, rt)
        warm_up_paths(forward, weights, names[-1:] if args.eval_audit_probes else names, args, rt, tables, model.cfg.vocab_size, log)
        warmup_s = warmup.done()
        log(f"eval_compile_warmup:{1000.0 * warmup_s:.0f}ms graphs:{forward_graphs() - graphs} (dummy tokens, not counted in eval_time_total)")
    if args.eval_audit_probes:
        score_probe_file(names[-1], forward, weights, args, rt, tables)
        return {}, []
    graphs = forward_graphs()
    deadline = ttt_deadline(t_start + warmup_s, args.ttt_deadline_seconds, rt.world_size)
    results, ledgers, phase_starts = {}, {}, []
    for name in names:
        ledger = ScoreLedger(val_tokens, tables)
        base_ledger = ScoreLedger(val_tokens, tables) if name == "ttt" and args.ttt_report_base else None
        timer = Stage(f"eval_{path_label(name, args)}", log, rt)
        options = dict(base_ledger=base_ledger, deadline=deadline, log=log, phase_starts=phase_starts if args.eval_audit else None) if name == "ttt" else {}
        stats = score_path(name, forward, weights, val_tokens, ledger, args, rt, **options)
        ledger.merge(rt)
        result = ledger.result()
        label = f"final_{scheme}_{path_label(name, args)}"
        log(f"{label} val_loss:{result.val_loss:.4f} val_bpb:{result.val_bpb:.4f} eval_time:{1000.0 * timer.done():.0f}ms")
        log(f"{label}_exact val_loss:{result.val_loss:.8f} val_bpb:{result.val_bpb:.8f}")
        results[name], ledgers[name] = result, ledger
        if name == "ttt":
            counts = torch.tensor([stats.docs_adapted, stats.docs_base, stats.docs_after_deadline, stats.updates, stats.tokens_computed, stats.tokens_scored], device=rt.device, dtype=torch.float64)
            if rt.distributed:
                dist.all_reduce(counts)
            log(f"ttt_docs adapted:{int(counts[0])} base_model:{int(counts[1])} after_deadline:{int(counts[2])} updates:{int(counts[3])} "
                f"phases:{stats.phases} computed_per_scored:{float(counts[4] / counts[5].clamp_min(1)):.1f}")
            if base_ledger is not None:
                base_ledger.merge(rt)
                base = base_ledger.result()
                log(f"ttt_base_same_docs val_bpb:{base.val_bpb:.8f} ttt_gain_bpb:{base.val_bpb - result.val_bpb:.6f}")
        if args.eval_dump and rt.is_master:
            try:
                ledger.dump(f"{args.eval_dump}.{name}.npz")
            except OSError as e:  # a diagnostic: the score goes on without it
                log(f"WARNING: eval_dump {args.eval_dump}.{name}.npz not written ({e.strerror or e}); the evaluation goes on")
    log(f"eval_compiles_during_timed_eval graphs:{forward_graphs() - graphs} (0: every graph compiled in the warm-up)")
    final = results[names[-1]]
    # The official baseline's score line, which community tools read: it repeats the last path's score.
    log(f"final_int8_zlib_roundtrip_exact val_loss:{final.val_loss:.8f} val_bpb:{final.val_bpb:.8f}")
    total_s = sync_time(rt) - t_start - warmup_s
    projected = total_s * rt.world_size / 8
    log(f"eval_time_total:{1000.0 * total_s:.0f}ms projected_8gpu_s:{projected:.1f} fits_600s:{'yes' if projected <= 600 else 'no'}")
    audits = []
    if args.eval_audit:
        timer = Stage("audit", log, rt)
        report = audit_final_path(names[-1], path, args, rt, tables, val_tokens, ledgers[names[-1]], forward, weights, phase_starts, code or Path(__file__))
        log(report.line())
        audit_s = timer.done()
        parts = " ".join(f"{part}:{1000.0 * s:.0f}ms" for part, s in report.seconds.items())
        log(f"eval_audit_time:{1000.0 * audit_s:.0f}ms ratio_to_eval:{audit_s / total_s:.2f} {parts} (after the timed evaluation)")
        audits.append(report)
    return results, audits


# ----------------------------------------------------------------------------- main: train -> average -> quantize -> write -> reload -> evaluate


def quantization_scheme(args: Hyperparameters) -> str:
    return f"int{max(args.quant_bits_attn, args.quant_bits_mlp)}_{args.artifact_compressor}"


def fresh_run_id() -> str:
    return f"{time.strftime('%Y%m%d_%H%M%S')}_{uuid.uuid4().hex[:6]}"


def broadcast_run_id(args: Hyperparameters, rt: Runtime) -> str:
    run_id = [args.run_id or fresh_run_id()]
    if rt.distributed:
        dist.broadcast_object_list(run_id, src=0)
    return run_id[0]


def quantize_and_write(model: GPT, hessians, args: Hyperparameters, rt: Runtime, log: Logger, path: Path, scheme: str, code_bytes: int) -> SizeReport | None:
    """Rank 0 quantizes (GPTQ where Hessians exist), packs and writes the artifact; the others wait, and fail with it."""
    report, written = None, [False]
    try:
        if rt.is_master:
            timer = Stage("quantize", log, rt)
            qstate = quantize_state_dict(model.state_dict(), args, hessians, log)
            quant_ms = 1000.0 * timer.done()
            timer = Stage("compress", log, rt)
            report, streams, timings = write_artifact(qstate, model.cfg, args, path, code_bytes, log)
            timer.done()
            t1 = time.perf_counter()
            read_artifact(path)
            decode_ms = 1000.0 * (time.perf_counter() - t1)
            written[0] = True
    finally:
        if rt.distributed:
            dist.broadcast_object_list(written, src=0)
    if not written[0]:
        raise ArtifactError("rank 0 could not write the artifact")
    if rt.is_master:
        method = "gptq" if args.gptq_enabled and hessians else "rtn"
        for s in streams:
            per_value = f" bits_per_value:{8 * s.bytes / s.numel:.3f}" if s.numel else ""
            log(f"artifact_stream {s.name} bytes:{s.bytes} raw:{s.raw_bytes} compressor:{s.compressor} values:{s.values}{per_value}")
        log(f"quant_stages quantize_{method}:{quant_ms:.0f}ms compress:{timings['compress_ms']:.0f}ms decompress:{decode_ms:.0f}ms "
            f"compressors:{','.join(Packing.from_args(args).compressors)} fit_prune:{timings['prune_frac']:.3f}")
        log(f"Serialized model {scheme}: {report.artifact_bytes} bytes")
        log(f"Code size: {report.code_bytes} bytes")
        log(f"Total submission size {scheme}: {report.total_bytes} bytes")
        log(f"size_check total_bytes:{report.total_bytes} cap_bytes:{report.cap_bytes} fits:{'yes' if report.fits else 'no'}")
        if not report.fits:
            log(f"WARNING: OVER THE CAP by {report.total_bytes - report.cap_bytes} bytes: this run is NOT a valid submission (files kept at {path})")
    return report


def calibrate_after_training(model: GPT, hessians: dict | None, args: Hyperparameters, rt: Runtime, log: Logger) -> dict | None:
    """GPTQ Hessians that training did not collect: from self-generated text, or after QUANTIZE_ONLY from the start of the training stream."""
    if not args.gptq_enabled or (hessians is not None and args.gptq_calibration == "train"):
        return hessians
    t0 = sync_time(rt)
    if args.gptq_calibration == "self":
        batches = generate_calibration_batches(model, args.gptq_calib_seqs, args.train_seq_len, args.gptq_calib_temperature, rt, args.seed)
    else:
        batches = train_batches_for_calibration(DistributedTokenLoader.for_model(args, rt, model), args, rt)
    hessians = collect_hessians(model, batches, rt)
    log(f"gptq_calibration source:{args.gptq_calibration} seqs:{args.gptq_calib_seqs} time:{1000.0 * (sync_time(rt) - t0):.0f}ms")
    return hessians


def load_trained_weights(model: GPT, path: str):
    """QUANTIZE_ONLY: the plain state dict a stopped run saved; anything else is named, with what to pass instead."""
    what, hint = f"QUANTIZE_ONLY={path}", "give QUANTIZE_ONLY the .weights.pt file a stopped run printed"
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise DataError(f"{what} cannot be read ({e.strerror or e}); {hint}") from None
    if head == ARTIFACT_MAGIC:
        raise DataError(f"{what} is an artifact, not trained weights: score it with EVAL_ONLY={path} instead")
    if head != b"PK\x03\x04":  # torch.save writes a zip archive
        raise DataError(f"{what} is not a file torch.save wrote; {hint}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        state = None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise DataError(f"{what} is a torch file but not a plain state dict of tensors; {hint}")
    if not all(v.isfinite().all() for v in state.values() if v.is_floating_point()):
        raise DataError(f"{what} holds weights that are not finite (a diverged run): nothing to quantize; train again with lower learning rates")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        raise DataError(f"{what} cannot be loaded into the model these settings build ({detail}); use the file and the settings the stopped run printed") from None


def resume_command(args: Hyperparameters, rt: Runtime, **changes) -> str:
    """This run's command line (its settings that differ from the defaults, and its launcher) with `changes`; None removes a setting."""
    settings = {s.name: getattr(args, s.name.lower()) for s in SETTINGS if getattr(args, s.name.lower()) != s.default}
    settings = {k: v for k, v in {**settings, **changes}.items() if v is not None}
    env = " ".join(f"{k}={shlex.quote(str(int(v) if isinstance(v, bool) else v))}" for k, v in settings.items())
    launcher = f"torchrun --standalone --nproc_per_node={rt.world_size}" if rt.distributed else "python3"
    return f"{env} {launcher} {os.path.relpath(__file__)}"


def keep_trained_weights(model: GPT, args: Hyperparameters, rt: Runtime, run_id: str, artifact_path: Path, reason: str) -> str:
    """After a training step, when no artifact could be made: save the model's (averaged) weights as a plain
    state dict where they fit, and say how to quantize, write and evaluate them without retraining."""
    if args.quantize_only:
        return f"{reason}; the weights are still in QUANTIZE_ONLY={args.quantize_only}: fix the cause and run the same command again"
    if not rt.is_master:
        return reason
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if not all(v.isfinite().all() for v in state.values() if v.is_floating_point()):
        return f"{reason}; the weights are not finite (training diverged), so they are not kept: lower the learning rates and train again"
    buffer = io.BytesIO()
    torch.save(state, buffer)
    for folder in dict.fromkeys([Path(args.log_dir), artifact_path.parent, Path.cwd(), Path(tempfile.gettempdir())]):
        saved = folder / f"{run_id}.weights.pt"
        try:
            set_aside(saved)
            write_atomic(saved, buffer.getvalue())
            break
        except OSError:
            continue
    else:
        return f"{reason}; the trained weights could not be saved anywhere either (no writable folder with room)"
    command = resume_command(args, rt, RUN_ID=run_id, QUANTIZE_ONLY=saved)
    return f"{reason}; the trained weights are saved in {saved}: fix the cause, then quantize, write and evaluate them without retraining: {command}"


def writable_problem(folder: Path, setting: str, room: int = 0) -> str | None:
    """Why `folder` cannot take a file of `room` bytes (None if it can): found before training, not after it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
        free = shutil.disk_usage(folder).free
    except OSError as e:
        return f"{setting}: cannot create or write the folder {folder} ({e.strerror or e}); set {setting} to a writable place"
    if free < room:
        return f"{setting}: {free} bytes free in {folder}, but the artifact may take {room}; free space or set {setting} to another disk"
    return None


def model_size_problem(args: Hyperparameters, rt: Runtime) -> str | None:
    """Why the model these settings build cannot train on this device (None if it may): its parameters are
    counted on the meta device, before anything is allocated."""
    with torch.device("meta"):
        params = count_parameters(GPT(ModelConfig.from_args(args)))
    try:
        memory = torch.cuda.get_device_properties(rt.device).total_memory if rt.device.type == "cuda" else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no sysconf: nothing to compare with
        return None
    need = 20 * params  # fp32 weights, gradients, optimizer state and weight average, at the least
    if need <= memory:
        return None
    return (
        f"the settings build a model of {params:,} parameters, which needs at least {need / 2**30:.1f} GiB to train, more than the "
        f"{memory / 2**30:.1f} GiB of this {rt.device.type}; lower NUM_LAYERS, MODEL_DIM, MLP_MULT, VOCAB_SIZE or BIGRAM_VOCAB_SIZE"
    )


def loaded_weights_problem(args: Hyperparameters) -> str | None:
    """EVAL_ONLY / QUANTIZE_ONLY: why the file cannot be scored or quantized with these data, tokenizer and settings."""
    try:
        if args.eval_only:
            vocab = load_model_from_artifact(args.eval_only, torch.device("cpu")).cfg.vocab_size
            if vocab != args.vocab_size:
                return (
                    f"EVAL_ONLY={args.eval_only} holds a model of vocabulary {vocab}, but VOCAB_SIZE={args.vocab_size} (the data and tokenizer); "
                    "score it with the VOCAB_SIZE, DATA_PATH and TOKENIZER_PATH it was trained with"
                )
        elif args.quantize_only:
            load_trained_weights(GPT(ModelConfig.from_args(args)), args.quantize_only)
    except (ArtifactError, DataError) as e:
        return str(e)
    return None


def preflight(args: Hyperparameters, rt: Runtime, artifact_path: Path, log: Logger):
    """Everything checkable before the first step, in seconds, on every rank (the shards split between them):
    shards, tokenizer, outputs, libraries, the file to load. All problems at once, before any GPU time."""
    t0 = time.perf_counter()
    problems, shards = [], 0
    for split in ("train", "val"):
        try:
            files = shard_files(args.data_path, split)
        except DataError as e:
            problems.append(str(e))
            continue
        shards += len(files)
        problems += shard_problems(files[rt.rank :: rt.world_size], args.vocab_size)
    try:
        load_tokenizer_tables(args.tokenizer_path, args.vocab_size)
        problems.append(tokenizer_mismatch(args.data_path, args.tokenizer_path))
    except DataError as e:
        problems.append(str(e))
    try:
        select_attention_backend(args.attn_backend, rt.device)
    except SettingsError as e:
        problems.append(str(e))
    try:
        check_artifact_packages(args)
    except SettingsError as e:
        problems.append(str(e))
    size_problem = None if args.eval_only else model_size_problem(args, rt)
    problems.append(size_problem)
    if rt.is_master:  # the only rank that writes or loads files
        dump = Path(args.eval_dump)
        for tmp in (t for folder in dict.fromkeys([Path(args.log_dir), artifact_path.parent] + [dump.parent] * bool(args.eval_dump)) for t in remove_stale_temporaries(folder)):
            log(f"preflight: removed {tmp}, the temporary file of a write whose process was killed")
        problems.append(writable_problem(Path(args.log_dir), "LOG_DIR"))
        if args.eval_dump and (dump.is_dir() or args.eval_dump.endswith("/")):
            problems.append(f"EVAL_DUMP={args.eval_dump} is a folder; give a file prefix such as {dump / 'run'} (for run.standard.npz, ...)")
        elif args.eval_dump:
            problems.append(writable_problem(dump.parent, "EVAL_DUMP"))
        if not args.eval_only and artifact_path.is_dir():
            problems.append(f"ARTIFACT_PATH={artifact_path} is a folder; give a file name such as {artifact_path / 'model.pgz'}")
        elif not args.eval_only:
            problems.append(writable_problem(artifact_path.parent, "ARTIFACT_PATH" if args.artifact_path else "LOG_DIR", args.size_cap_bytes))
        if size_problem is None:  # QUANTIZE_ONLY builds the model to load the weights into
            problems.append(loaded_weights_problem(args))
    if rt.distributed:
        gathered = [None] * rt.world_size
        dist.all_gather_object(gathered, problems)
        problems = sum(gathered, [])
    problems = [p for p in dict.fromkeys(problems) if p]
    if problems:
        raise DataError("\n".join(problems))
    log(f"preflight: {shards} shards, tokenizer, outputs and libraries checked in {time.perf_counter() - t0:.1f}s")


def run(args: Hyperparameters, rt: Runtime, run_id: str, log: Logger) -> bool:
    """The pipeline; returns whether the run is a valid submission."""
    log_dir = Path(args.log_dir)
    source = running_source()
    log(source.decode("utf-8"), console=False)
    log("=" * 100, console=False)
    log(environment_versions())
    log(args.describe().replace(f"RUN_ID={args.run_id}", f"RUN_ID={run_id}"))
    log(f"code_sha256:{hashlib.sha256(source).hexdigest()} code_bytes:{len(source)}")
    artifact_path = Path(args.eval_only or args.artifact_path or log_dir / f"{run_id}.pgz")
    timer = Stage("preflight", log, rt)
    preflight(args, rt, artifact_path, log)
    timer.done()
    code_bytes = 0
    if rt.is_master:
        shipped = log_dir / f"{run_id}.train_gpt.py"
        for earlier in [shipped] + [artifact_path] * (not args.eval_only):  # a rerun of a RUN_ID keeps the earlier run's files
            set_aside(earlier)
        code_bytes = write_shipped_code(shipped, source, args.code_minify)
        log(f"shipped_code file:{shipped.name} bytes:{code_bytes} sha256:{hashlib.sha256(shipped.read_bytes()).hexdigest()}")
    backend = select_attention_backend(args.attn_backend, rt.device)
    log(f"world_size:{rt.world_size} grad_accum_steps:{rt.grad_accum_steps} device:{rt.device.type}")
    log(f"attention_backend:{backend}")
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    tables = load_tokenizer_tables(args.tokenizer_path, args.vocab_size)
    val_tokens = load_validation_tokens(args.data_path, args.vocab_size, args.val_max_tokens).to(rt.device)
    tables = attach_byte_sidecar(tables, val_tokens, args.data_path, args.tokenizer_path)
    log(f"val_tokens:{val_tokens.numel()} targets:{val_tokens.numel() - 1}")
    byte_source = "sidecar (fineweb_val_bytes_*.bin, original UTF-8 bytes)" if tables.sidecar_bytes is not None else "official (tokenizer tables)"
    log(f"bpb_bytes:{int(stream_target_bytes(val_tokens, tables).sum())} source:{byte_source}")
    if args.eval_audit_heldout_tokens:
        train_files = shard_files(args.data_path, "train")
        start = heldout_start(train_files, args.eval_audit_heldout_tokens)
        log(f"audit_heldout shard:{Path(train_files[-1]).name} from_token:{start} tokens:{shard_token_count(train_files[-1]) - start} (never trained on)")
    scheme = quantization_scheme(args)
    pre_quant, train_result, size = None, None, None
    if args.eval_only:
        log(f"eval_only artifact:{artifact_path}")
    else:
        model = GPT(ModelConfig.from_args(args), backend).to(rt.device)
        progress = {}  # train_model's weight averager: what a run stopped during training keeps
        try:
            if args.quantize_only:
                load_trained_weights(model, args.quantize_only)
                log(f"quantize_only weights:{args.quantize_only} (no training)")
                weights, hessians = "quantize_only", None
            else:
                log(f"model_params:{count_parameters(model)}")
                train_result = train_model(model, args, rt, log, lambda m: evaluate_standard(m, val_tokens, tables, args, rt), progress)
                weights, hessians = train_result.exported_weights, train_result.hessians
            pre_quant = evaluate_standard(model, val_tokens, tables, args, rt)
            log(f"pre_quant weights:{weights} val_loss:{pre_quant.val_loss:.4f} val_bpb:{pre_quant.val_bpb:.4f}")
            hessians = calibrate_after_training(model, hessians, args, rt, log)
            size = quantize_and_write(model, hessians, args, rt, log, artifact_path, scheme, code_bytes)
        except BaseException as e:
            averager = progress.get("averager")
            if isinstance(e, TrainingDiverged) or not (args.quantize_only or averager and averager.steps):
                raise  # nothing trained yet, or nothing worth keeping
            where = f"no artifact was written to {artifact_path}"
            if train_result is None and not args.quantize_only:
                model.load_state_dict(averager.export()[1])
                where = f"training stopped after step {averager.steps}/{args.iterations}"
            stop(e, keep_trained_weights(model, args, rt, run_id, artifact_path, failure(e, where)), log)
        del model
    try:
        results, audits = evaluate_artifact(artifact_path, args, rt, log, tables, val_tokens, scheme, backend, log_dir / f"{run_id}.train_gpt.py")
    except BaseException as e:
        command = resume_command(args, rt, RUN_ID=run_id, EVAL_ONLY=artifact_path, QUANTIZE_ONLY=None)
        stop(e, f"{failure(e, 'the evaluation stopped')}; the artifact {artifact_path} is intact: score it without retraining: {command}", log)
    if args.eval_audit_probes:  # the audit's fresh process: its probes are written, nothing to report
        return True
    if pre_quant is not None:
        log(f"quant_gap_bpb:{results['standard'].val_bpb - pre_quant.val_bpb:.6f}")
    verdict = "NOT_RUN" if not audits else "PASS" if all(a.passed for a in audits) else "FAIL"
    log(f"eval_audit_verdict:{verdict}")
    problems = []
    if size is not None and not size.fits:
        problems.append("over_size_cap")
    if train_result is not None and train_result.train_time_ms > 600_000:
        problems.append("train_time_over_600s")
    if verdict != "PASS":  # a score without its audit is not evidence of legality
        problems.append("audit_failed" if verdict == "FAIL" else "audit_not_run")
    if rt.distributed:  # rank 0 holds the size report: its decision is every rank's, and so is the exit code
        shared = [problems]
        dist.broadcast_object_list(shared, src=0)
        problems = shared[0]
    log(f"submission_valid:{'no reason:' + ','.join(problems) if problems else 'yes'}")
    return not problems


EXIT_ERROR, EXIT_INVALID_SUBMISSION = 1, 3  # and 128 + the signal's number after SIGINT (130) or SIGTERM (143)


class Interrupted(BaseException):
    """SIGINT or SIGTERM: stop now, and say so as the log's last line (with `note`: what was kept)."""

    note = ""


class RunStopped(RuntimeError):
    """A failure after the first training step; the message says what was kept and the command that goes on."""


def failure(e: BaseException, where: str) -> str:
    return where if isinstance(e, Interrupted) else f"{where} ({type(e).__name__}: {e})"


def stop(e: BaseException, note: str, log: Logger):
    """Re-raise a failure or an interrupt after the first training step with `note`: what was kept and how to go on."""
    if isinstance(e, Interrupted):
        e.note = note
        raise e
    log(traceback.format_exc().rstrip(), console=False)
    raise RunStopped(note) from e


def _ignore_signals():
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def _raise_interrupted(signum, frame):
    _ignore_signals()  # a second signal (torchrun's SIGTERM after a Ctrl-C) must not cut short the saving of the weights
    raise Interrupted(signum)


def main():
    try:
        args = Hyperparameters()
        rt = setup_runtime()
    except SettingsError as e:
        run_id = os.environ.get("RUN_ID", "")
        if os.environ.get("RANK", "0") == "0":  # found before the log is opened: the reason still ends a log file where LOG_DIR allows
            Logger(Path(os.environ.get("LOG_DIR", "logs")) / f"{run_id if run_id and _file_name(run_id) else fresh_run_id()}.txt")(f"error: {e}", console=False)
        sys.exit(f"error: {e}")
    run_id = broadcast_run_id(args, rt)
    log = Logger(Path(args.log_dir) / f"{run_id}.txt" if rt.is_master else None)
    code = EXIT_ERROR
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _raise_interrupted)
    try:
        try:
            code = 0 if run(args, rt, run_id, log) else EXIT_INVALID_SUBMISSION
            if rt.distributed:  # one exit code on every rank: rank 0's, which alone knows the artifact's size
                verdict = [code]
                dist.broadcast_object_list(verdict, src=0)
                code = verdict[0]
        finally:  # torchrun stops the other ranks (SIGTERM) once one exits: that must not cut their last lines or change their exit code
            _ignore_signals()
    except Interrupted as e:
        log(f"interrupted: {signal.Signals(e.args[0]).name}; the run stopped here{'; ' + e.note if e.note else ''}", stream=sys.stderr)
        code = 128 + e.args[0]
    except (SettingsError, DataError, ArtifactError, LeakageError, TrainingDiverged, RunStopped) as e:
        for line in str(e).splitlines():
            log(f"error: {line}", stream=sys.stderr)
    except Exception as e:  # a bug or a crash: the traceback goes to stderr as usual, and the reason ends the log
        log(traceback.format_exc().rstrip(), console=False)
        log(f"error: {type(e).__name__}: {e}", console=False)
        raise
    finally:
        if rt.distributed:
            dist.destroy_process_group()
    sys.exit(code)


if __name__ == "__main__":
    main()
