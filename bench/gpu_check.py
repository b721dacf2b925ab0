#!/usr/bin/env python3
"""GPU proof harness: one command that checks train_gpt.py on a CUDA machine and measures what a
competitor needs to know before paying for 8xH100.

    python3 bench/gpu_check.py [--data DIR] [--tokenizer MODEL] [--out bench/gpu_check.json]
    python3 bench/gpu_check.py --quick   # the end-to-end part alone, under 5 minutes
    python3 bench/gpu_check.py --cpu     # every part with tiny settings on CPU (its own test)

The parts run in order, most valuable first, each with a time budget (--budget PART=SECONDS); by
default a GPU runs e2e, speed and correctness (about 10 minutes on one GPU, compiles included):

  e2e          the README's training command itself: torchrun, one process per GPU (2 gloo
               processes with --cpu), a short clock, a validation slice holding two TTT phases,
               the audit on, compiled; from its log one row per stage with its wall time, each
               graph's compile time, ms/step and tokens/s with recurrence off and on, peak memory,
               the artifact's bytes, each path's bpb and tokens/s projected to the full validation
               on 8 GPUs, compiles during the timed evaluation (must be 0), the audit, the
               submission's validity and every rank's exit code; a run cut short names its stage
  speed        ms/step, tokens/s, peak memory and MFU of the compiled default step (8 micro-steps
               on one GPU) with recurrence off and on, for each attention backend, then with each
               expensive feature off (QAT: on)
  correctness  compiled vs eager: training loss and gradients, and each scoring path; every
               attention backend against an fp32 SDPA reference; the causal audit of each path on
               the compiled model (its GPU tolerance included); the compiled TTT path scores every
               target once within a known number of compiles; 2 processes train like 1 (NCCL)
  size         a short training run of the configuration, GPTQ, the artifact: bytes per role,
               total against the cap
  eval         evaluate_artifact on a slice of validation tokens: each path's tokens/s projected to
               the full validation on 8 GPUs, against the 600 s evaluation budget

The configuration is train_gpt.py's defaults, or whatever settings the environment holds. The
parts run in one child process; a check that fails or raises is a row of the table with its
one-line reason, and a child that crashes or overruns a part's budget is stopped and a fresh one
goes on with the next part. The table is printed as markdown and written as JSON to --out after
every row (a run cut short keeps what it measured); the child's output goes to the same path with
the suffix .log. Exit code: 0 when no check failed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "records"))
import numpy as np  # noqa: E402
import torch  # noqa: E402

import logparse  # noqa: E402
import train_gpt as tg  # noqa: E402

PARTS = ("e2e", "speed", "correctness", "size", "eval")  # most valuable first
DEFAULT_GPU_PARTS = ("e2e", "speed", "correctness")  # about 10 minutes on one GPU; e2e already covers size and evaluation time
QUICK_E2E_BUDGET_S = 270
FULL_VALIDATION_TOKENS = 47_851_520  # the official validation set in the record's CaseOps sp8192 tokens, for the 8-GPU projection
EVAL_BUDGET_S = 600.0
GPUS = 8
DEFAULT_DATA = REPO / ".bench" / "wiki_bench" / "datasets" / "fineweb10B_sp8192"  # README, Benchmarks
DEFAULT_TOKENIZER = REPO / ".bench" / "wiki_bench" / "tokenizers" / "fineweb_8192_bpe.model"

# Compiles of GPT.forward that the TTT path may cause: it calls the model in 4 ways (scoring with
# adapters, scoring the base model for TTT_REPORT_BASE, training the adapters, the phases' SGD on
# every weight), and automatic dynamic shapes compile each way at most twice (its first shapes,
# then shape-generic).
TTT_FORWARD_COMPILE_BOUND = 8

# Tiny settings of the CPU mode (as tests/conftest.py's TINY, with 2 blocks): the default
# configuration's features (recurrence, parallel lanes, gates, XSA, document isolation, TTT) at a
# size where dynamo traces each graph in about a second. QUANT_FLOAT_MAX_NUMEL makes the tiny
# matrices quantized, as the full-size ones are.
CPU_SETTINGS = dict(
    VOCAB_SIZE=64, NUM_LAYERS=2, MODEL_DIM=32, NUM_HEADS=4, NUM_KV_HEADS=2, MLP_MULT=2,
    TRAIN_SEQ_LEN=32, TRAIN_BATCH_TOKENS=8 * 32 * 2,
    EVAL_SEQ_LEN=32, EVAL_STRIDE=8, VAL_BATCH_SIZE=32 * 16, TTT_CHUNK_SIZE=8, TTT_CONTEXT_LEN=16,
    TTT_BATCH_SIZE=4, TTT_LORA_RANK=2, TTT_HEAD_RANK=2, GPTQ_CALIB_SEQS=4, LOOP_START=1, LOOP_END=1,
    NUM_LOOPS=1, PARALLEL_RESIDUAL_START=1, GATE_WINDOW=4, ROPE_DIMS=4, QUANT_FLOAT_MAX_NUMEL=256,
    TTT_LORA_ALPHA=2, TTT_PHASE_DOCS="4", TTT_PHASE_SEQ_LEN=32, TTT_PHASE_CHUNK_TOKENS=64, EVAL_AUDIT_TOKENS=256,
)
CPU_VOCAB = CPU_SETTINGS["VOCAB_SIZE"]


@dataclass(frozen=True)
class Scale:
    """How much work each check does, and the parts' time budgets (seconds)."""

    budgets: dict
    check_seqs: int  # training sequences of the compiled-vs-eager and backend checks
    check_tokens: int  # validation tokens of the scoring-path checks and audits
    speed_steps: int  # training steps per speed configuration, timed from the end of the first
    warmup_steps: int  # untimed compile warm-up steps of the speed and size training runs
    size_train_seconds: float  # 0: train ITERATIONS steps instead (CPU)
    size_iterations: int
    eval_tokens: int
    compile_backend: str
    # compiled vs eager, relative: |loss|, ||grad|| (L2), bpb; logits of a backend vs fp32 SDPA
    tol_loss: float
    tol_grad: float
    tol_bpb: float
    tol_logits: float


GPU_SCALE = Scale(
    budgets={"e2e": 330, "speed": 120, "correctness": 120, "size": 120, "eval": 90},
    check_seqs=8, check_tokens=16384, speed_steps=8, warmup_steps=2, size_train_seconds=40.0, size_iterations=20000,
    eval_tokens=262144, compile_backend="inductor",
    # bf16 autocast rounds at 2^-8 relative per operation; compiled kernels round in other places.
    tol_loss=2e-3, tol_grad=5e-2, tol_bpb=2e-3, tol_logits=5e-2,
)
# On CPU everything is fp32 and dynamo's "eager" backend runs the traced graph with the same
# kernels: results agree to rounding. It traces, guards and recompiles exactly as inductor does,
# without generating code (minutes on 2 cores for aot_eager or inductor).
CPU_SCALE = Scale(
    budgets={"e2e": 300, "correctness": 240, "speed": 120, "size": 120, "eval": 120},
    check_seqs=4, check_tokens=1024, speed_steps=2, warmup_steps=1, size_train_seconds=0.0, size_iterations=20,
    eval_tokens=1024, compile_backend="eager",
    tol_loss=1e-5, tol_grad=1e-4, tol_bpb=1e-5, tol_logits=1e-5,
)
# A check that starts inside the budget may end after it; a part still running at 1.5 times its
# budget (plus the grace) is stopped, with what it was doing, as hung.
HARD_LIMIT_FACTOR, HARD_LIMIT_GRACE_S = 1.5, 30.0

# Speed: the configuration with one expensive feature switched off (QAT: on) at a time.
SPEED_FEATURES = (
    ("parallel residuals off", {"PARALLEL_RESIDUAL_START": -1}),
    ("document isolation off", {"DOC_ISOLATION": 0}),
    # WARMDOWN_ITERS far beyond the run keeps the LR multiplier at MIN_LR (< QAT_START) from step 0,
    # so every timed step runs with fake quantization.
    ("QAT on", {"QAT_START": 0.15, "WARMDOWN_ITERS": 10**9}),
)
ATTENTION_BACKENDS = tg.ATTENTION_BACKENDS


# ----------------------------------------------------------------------------- the table


@dataclass
class Result:
    """What a check found: status pass / FAIL / ERROR / skipped / measured, figures with units."""

    status: str
    figures: list = field(default_factory=list)  # [name, value, unit]
    note: str = ""
    check: str | None = None  # a check that reports several rows names each


def figure(name: str, value, unit: str) -> list:
    return [name, value, unit]


def format_value(value) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.4g}"


def markdown_table(report: dict) -> str:
    lines = [f"GPU check ({report['mode']} mode) on {report.get('device', '?')}: torch {report.get('torch', '?')}, "
             f"python {report.get('python', '?')}, data {report['data']}"]
    if report.get("settings_changed"):
        lines.append("settings: " + " ".join(f"{k}={v}" for k, v in report["settings_changed"].items()))
    lines += ["", "| part | check | status | figures | note | s |", "| --- | --- | --- | --- | --- | --- |"]
    for row in report["rows"]:
        figures = "; ".join(f"{name} {format_value(value)} {unit}" for name, value, unit in row["figures"])
        note = row["note"].replace("|", "/")
        lines.append(f"| {row['part']} | {row['check']} | {row['status']} | {figures} | {note} | {row['seconds']:.0f} |")
    counts = {}
    for row in report["rows"]:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    lines += ["", ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) + ("" if report["finished"] else " (run cut short)")]
    return "\n".join(lines)


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


# ----------------------------------------------------------------------------- the child: context and part runner


class Context:
    """What every check needs: runtime, settings, data, byte tables, the work folder."""

    def __init__(self, opts):
        self.opts, self.cpu = opts, opts.cpu
        self.scale = CPU_SCALE if opts.cpu else GPU_SCALE
        self.rt = tg.Runtime() if opts.cpu else tg.setup_runtime()
        self.workdir = Path(opts.workdir)
        self.settings = base_settings(opts)
        self.tables = byte_tables(opts, self.args().vocab_size)
        self.val_tokens = tg.load_validation_tokens(opts.data, self.args().vocab_size).to(self.rt.device)
        self.artifact_path = self.workdir / "gpu_check.pgz"

    def args(self, **overrides) -> tg.Hyperparameters:
        return tg.Hyperparameters({**self.settings, **{k: str(v) for k, v in overrides.items()}})

    def val_slice(self, tokens: int) -> torch.Tensor:
        return self.val_tokens[:tokens]

    def train_batch(self, args: tg.Hyperparameters, seqs: int) -> tuple[torch.Tensor, torch.Tensor]:
        loader = tg.DistributedTokenLoader(args.data_path, self.rt, args.train_seq_len)  # rows of TRAIN_SEQ_LEN
        return loader.next_batch(seqs * args.train_seq_len, 1)[:2]

    def release_memory(self):
        gc.collect()
        if self.rt.device.type == "cuda":
            torch.cuda.empty_cache()


def base_settings(opts) -> dict[str, str]:
    """The environment's settings (train_gpt.py's defaults for the rest), the data paths, and in
    CPU mode the tiny model."""
    settings = {s.name: os.environ[s.name] for s in tg.SETTINGS if s.name in os.environ}
    settings.update(DATA_PATH=str(opts.data), TOKENIZER_PATH=str(opts.tokenizer or ""))
    if opts.cpu:
        settings.update({k: str(v) for k, v in CPU_SETTINGS.items()})
        if opts.tokenizer:
            import sentencepiece as spm

            settings["VOCAB_SIZE"] = str(spm.SentencePieceProcessor(model_file=str(opts.tokenizer)).vocab_size())
    return settings


def byte_tables(opts, vocab_size: int) -> tg.ByteTables:
    if opts.tokenizer:
        return tg.load_tokenizer_tables(str(opts.tokenizer), vocab_size)
    # Synthetic CPU data has no tokenizer: ids 0-3 are control pieces, the rest 1-3 bytes, odd ids
    # with a leading space, so that bpb accounting has all its cases.
    ids = torch.arange(vocab_size)
    return tg.ByteTables(torch.where(ids < 4, 0, 1 + ids % 3).to(torch.int16), (ids % 2 == 1) & (ids >= 4), ids < 4)


def write_synthetic_shards(folder: Path):
    """CPU mode without --data: learnable documents (BOS, then a short pattern repeated)."""
    rng = np.random.default_rng(0)
    for split, docs in (("train", 400), ("val", 120)):
        stream = []
        for _ in range(docs):
            pattern = rng.integers(4, CPU_VOCAB, size=int(rng.integers(2, 6)))
            stream.append(np.concatenate([[tg.BOS_ID], np.resize(pattern, int(rng.integers(5, 60)))]))
        tg.write_data_shard(folder / f"fineweb_{split}_000000.bin", np.concatenate(stream).astype(np.uint16))


class Events:
    """The child's report to the parent: one JSON object per line, flushed at once."""

    def __init__(self, path: Path):
        self.file = open(path, "a", encoding="utf-8")

    def __call__(self, event: str, **fields):
        self.file.write(json.dumps({"event": event, **fields}) + "\n")
        self.file.flush()


class PartRunner:
    """Runs a part's checks in order inside its budget; each check's result or exception is a row."""

    def __init__(self, ctx: Context, name: str, budget_s: float, events: Events):
        self.ctx, self.name, self.budget_s, self.events = ctx, name, budget_s, events
        self.deadline = time.monotonic() + budget_s
        self.longest_s = 0.0

    def row(self, check: str, result: Result, seconds: float = 0.0):
        self.events("row", part=self.name, check=result.check or check, status=result.status,
                    figures=result.figures, note=result.note, seconds=round(seconds, 1))

    def check(self, name: str, fn, similar: bool = False):
        """fn() -> Result or a list of them; returns it (None when skipped). similar: the check costs
        about what the part's earlier ones did, so it is skipped when the longest of them would not fit."""
        left = self.deadline - time.monotonic()
        if left <= 0 or (similar and left < self.longest_s):
            # Skipped rather than stopped halfway at the part's hard limit, which loses the rest of the part.
            self.row(name, Result("skipped", note=f"{max(left, 0):.0f} s left of the part's {self.budget_s:.0f} s budget; its longest check took {self.longest_s:.0f} s"))
            return None
        self.events("check", part=self.name, check=name)
        start = time.monotonic()
        try:
            results = fn()
        except Exception as e:  # recorded as the row; the part goes on
            results = Result("ERROR", note=one_line(e))
        finally:
            self.ctx.release_memory()
        seconds = time.monotonic() - start
        self.longest_s = max(self.longest_s, seconds)
        for result in results if isinstance(results, list) else [results]:
            self.row(name, result, seconds)
        return results


def forward_compiles() -> int:
    """How many compiled versions of GPT.forward dynamo holds (its cache entries)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    return len(_debug_get_cache_entry_list(tg.GPT.forward.__code__))


def recompile_limit() -> int:
    config = torch._dynamo.config
    return getattr(config, "recompile_limit", None) or config.cache_size_limit


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, in float64."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def training_flops_per_token(args: tg.Hyperparameters, looping: bool) -> float:
    """Model FLOPs of one training token (forward and backward, 3 x the forward): every matmul of each
    virtual layer and of the head, and causal attention over TRAIN_SEQ_LEN / 2 keys on average (an
    upper bound: documents shorter than a row attend to fewer)."""
    cfg = tg.ModelConfig.from_args(args)
    d, head_dim = cfg.model_dim, cfg.model_dim // cfg.num_heads
    kv, hidden = cfg.num_kv_heads * head_dim, int(cfg.mlp_mult * cfg.model_dim)
    layers = len(cfg.layer_order(looping))
    matmul_params = layers * (2 * d * d + 2 * d * kv + 2 * d * hidden) + d * cfg.vocab_size + (cfg.bigram_dim * d if cfg.bigram_vocab_size else 0)
    attention = layers * 2 * d * args.train_seq_len  # QK and AV, 2 flops each, over T / 2 keys
    return 3 * (2 * matmul_params + attention)


_PEAK = {}


def matmul_peak_flops(device: torch.device) -> float:
    """The bf16 matmul rate this GPU reaches (8192^3, best of 10): the denominator of MFU."""
    if device.type != "cuda":
        return math.nan
    if device not in _PEAK:
        a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
        best = math.inf
        for _ in range(12):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            a @ a
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        _PEAK[device] = 2 * 8192**3 / best
    return _PEAK[device]


def mfu_figures(args: tg.Hyperparameters, tokens_per_s_per_gpu: float, looping: bool, device: torch.device) -> list:
    flops = training_flops_per_token(args, looping)
    peak = matmul_peak_flops(device)
    out = [figure("model FLOPs", flops / 1e6, "MFLOP/token")]
    if peak == peak:  # measured (CUDA)
        out += [figure("MFU", 100 * flops * tokens_per_s_per_gpu / peak, f"% of {peak / 1e12:.0f} TFLOP/s measured bf16")]
    return out


def activated_model(args: tg.Hyperparameters, backend: str, ctx: Context) -> tg.GPT:
    """The configuration's model with Gaussian noise on every weight: zero-initialised projections
    and gates then act, so attention, gates and adapters all change the outputs being compared."""
    torch.manual_seed(args.seed)
    model = tg.GPT(tg.ModelConfig.from_args(args), backend).to(ctx.rt.device)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.02)
    return model


# ----------------------------------------------------------------------------- part 0: the README's command, end to end

# The README's training command, shortened: a short clock (recurrence switches on inside it), a
# validation slice on which two TTT phases happen, every path and the audit, compiled as a real run.
E2E_SETTINGS = {
    "gpu": dict(MAX_WALLCLOCK_SECONDS=90, VAL_MAX_TOKENS=393_216, TTT_PHASE_TOKENS="131072,262144", TRAIN_LOG_EVERY=5),
    "quick": dict(MAX_WALLCLOCK_SECONDS=30, VAL_MAX_TOKENS=131_072, TTT_PHASE_TOKENS="65536", TRAIN_LOG_EVERY=5),
    "cpu": dict(ITERATIONS=8, MAX_WALLCLOCK_SECONDS=0, WARMUP_STEPS=1, LOOP_ENABLE_FRAC=0.5, VAL_MAX_TOKENS=2500, TTT_PHASE_DOCS="3",
                TRAIN_LOG_EVERY=1, VAL_BATCH_SIZE=512, EVAL_AUDIT_TOKENS=512, CODE_MINIFY=0, GPTQ_RESERVE_SECONDS=0),
}
STAGE = re.compile(r"^stage:(\S+) (start|done)(?: seconds:([\d.]+))?")


def write_cpu_e2e_data(folder: Path) -> tuple[Path, Path, int]:
    """A real tokenizer (256 pieces) and shards of the Python documentation, for the CPU mode's run of
    train_gpt.py (the other parts use synthetic token ids)."""
    sys.path.insert(0, str(REPO / "data"))
    import build_shards
    import smoke

    docs = smoke.topic_documents()
    tokenizer = folder / "tokenizers" / "fineweb_256_bpe.model"
    build_shards.train_tokenizer(docs[12:], 256, tokenizer, threads=1)
    vocab = build_shards.load_tokenizer(tokenizer).vocab_size()
    dataset = folder / "datasets" / f"fineweb10B_sp{vocab}"
    build_shards.write_dataset(docs[:12], docs[12:], tokenizer, dataset, workers=1)
    return dataset, tokenizer, vocab


def e2e_environment(ctx: Context, mode: str, run_id: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not tg.misspelt_setting(k) and k not in {s.name for s in tg.SETTINGS}}
    env.update(ctx.settings)
    env.update({k: str(v) for k, v in E2E_SETTINGS[mode].items()})
    env.update(RUN_ID=run_id, LOG_DIR=str(ctx.workdir / "e2e"), EVAL_AUDIT="1", COMPILE="1", PYTHONUNBUFFERED="1")
    if ctx.cpu:
        dataset, tokenizer, vocab = write_cpu_e2e_data(ctx.workdir / "e2e_data")
        env.update(DATA_PATH=str(dataset), TOKENIZER_PATH=str(tokenizer), VOCAB_SIZE=str(vocab), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return env


def stage_rows(lines: list[str]) -> tuple[list[Result], str | None]:
    """One row per stage the log opened (its wall time), and the stage a run cut short was in."""
    rows, open_stage = [], None
    for line in lines:
        m = STAGE.match(line)
        if not m:
            continue
        name, event, seconds = m.groups()
        if event == "start":
            open_stage = name
        else:
            open_stage = None
            rows.append(Result("measured", [figure("wall time", float(seconds), "s")], check=f"stage {name}"))
    return rows, open_stage


def speed_rows(run, lines: list[str], args: tg.Hyperparameters, world: int, device: torch.device) -> list[Result]:
    """ms/step and tokens/s before and after recurrence switched on, from the progress lines."""
    switch = next((int(m.group(1)) for line in lines if (m := re.match(r"^recurrence:on step:(\d+)", line))), None)
    points = [p for p in run.train_curve if p.train_time_ms is not None]
    rows = []
    for label, part in (("off", [p for p in points if switch is None or p.step <= switch]), ("on", [p for p in points if switch is not None and p.step > switch])):
        if len(part) < 2:
            rows.append(Result("skipped", note=f"fewer than 2 progress lines with recurrence {label}", check=f"training speed, recurrence {label}"))
            continue
        (s0, t0), (s1, t1) = (part[0].step, part[0].train_time_ms), (part[-1].step, part[-1].train_time_ms)
        ms = (t1 - t0) / (s1 - s0)
        per_gpu = args.train_batch_tokens / (ms / 1000) / world
        rows.append(Result("measured", [figure("step", ms, "ms/step"), figure("throughput", args.train_batch_tokens / (ms / 1000), "tokens/s"),
                                        figure("per GPU", per_gpu, "tokens/s"), *mfu_figures(args, per_gpu, label == "on", device)],
                           f"steps {s0}-{s1} on {world} process{'es' * (world > 1)}", check=f"training speed, recurrence {label}"))
    return rows


def compile_rows(lines: list[str]) -> list[Result]:
    rows = []
    for line in lines:
        if m := re.match(r"^train_compile recurrence:(\w+) first_step_seconds:([\d.]+)", line):
            rows.append(Result("measured", [figure("compile + first step", float(m.group(2)), "s")], check=f"compile: training graph, recurrence {m.group(1)}"))
        elif m := re.match(r"^eval_compile path:(\w+) seconds:([\d.]+)", line):
            rows.append(Result("measured", [figure("compile + warm-up", float(m.group(2)), "s")], check=f"compile: evaluation, {m.group(1)}"))
        elif m := re.match(r"^eval_compiles_during_timed_eval graphs:(\d+)", line):
            n = int(m.group(1))
            rows.append(Result("pass" if n == 0 else "FAIL", [figure("graphs compiled", n, "during the timed evaluation")],
                               "every graph must compile in the untimed warm-up", check="no compile inside the timed evaluation"))
    return rows


def outcome_rows(run, lines: list[str], args: tg.Hyperparameters, world: int, returncode: int | None, console_tail: str) -> list[Result]:
    rows = []
    if run.peak_mem_allocated_mib is not None:
        rows.append(Result("measured", [figure("peak allocated", run.peak_mem_allocated_mib / 1024, "GiB"), figure("peak reserved", run.peak_mem_reserved_mib / 1024, "GiB")], check="peak memory"))
    if run.total_bytes is not None:
        rows.append(Result("pass" if run.fits_cap else "FAIL", [figure("artifact", run.artifact_bytes, "bytes"), figure("code", run.code_size_bytes, "bytes"),
                                                                 figure("total", run.total_bytes, "bytes")], f"cap {run.size_cap_bytes:,}", check="artifact"))
    targets = next((int(m.group(1)) for line in lines if (m := re.match(r"^val_tokens:\d+ targets:(\d+)", line))), 0)
    for path, final in run.finals.items():
        if final.eval_time_ms:
            rate = targets / (final.eval_time_ms / 1000)
            projected = FULL_VALIDATION_TOKENS / (rate * GPUS / world)
            rows.append(Result("measured", [figure("bpb", final.val_bpb, "bits/byte"), figure("rate", rate / world, "tokens/s per GPU"),
                                            figure("projected", projected, f"s on {GPUS} GPUs, full validation")],
                               f"{targets:,} targets", check=f"eval {path}"))
    audit = next((line for line in lines if line.startswith("eval_audit path:")), None)
    if audit is not None:
        rows.append(Result("pass" if "verdict:PASS" in audit else "FAIL", note=audit[:300], check="audit"))
    if run.submission_valid is not None:
        rows.append(Result("pass" if run.submission_valid else "FAIL", note=f"submission_valid:{'yes' if run.submission_valid else 'no ' + (run.submission_reason or '')}", check="submission_valid"))
    if returncode is not None:
        rows.append(Result("pass" if returncode == 0 else "FAIL", [figure("exit code", returncode, "code")], console_tail if returncode else "", check="exit code (every rank)"))
    return rows


def run_end_to_end(ctx: Context, part: PartRunner) -> list[Result]:
    """torchrun of train_gpt.py, one process per GPU (2 gloo processes in CPU mode), then its log read back."""
    mode = "cpu" if ctx.cpu else "quick" if ctx.opts.quick else "gpu"
    world = 2 if ctx.cpu else ctx.opts.nproc or max(1, torch.cuda.device_count())
    run_id = "gpu_check_e2e"
    env = e2e_environment(ctx, mode, run_id)
    args = tg.Hyperparameters({k: v for k, v in env.items() if k in {s.name for s in tg.SETTINGS}})
    log_path = Path(env["LOG_DIR"]) / f"{run_id}.txt"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", str(REPO / "train_gpt.py")]
    with open(ctx.workdir / "e2e_console.txt", "w") as console:
        child = subprocess.Popen(command, cwd=REPO, env=env, stdout=console, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode = child.wait(timeout=max(10.0, part.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            returncode = None
    lines = logparse._lines(log_path.read_text(errors="replace")) if log_path.is_file() else []
    run = logparse.parse_text("\n".join(lines))
    stages, open_stage = stage_rows(lines)
    console = ctx.workdir / "e2e_console.txt"
    tail = " | ".join(line.strip() for line in console.read_text(errors="replace").splitlines()[-4:])[-600:]
    rows = stages + compile_rows(lines) + speed_rows(run, lines, args, world, ctx.rt.device) + outcome_rows(run, lines, args, world, returncode, tail)
    if returncode is None or open_stage is not None:
        last = next((line for line in reversed(lines) if line.startswith("error:")), lines[-1] if lines else last_line(ctx.workdir / "e2e_console.txt"))
        why = "stopped at the part's budget" if returncode is None else f"exited with {returncode}"
        rows.append(Result("ERROR", note=f"{why} in stage {open_stage or '(before the first)'}: {last[:200]}", check="run"))
    settings = " ".join(f"{k}={v}" for k, v in E2E_SETTINGS[mode].items())
    rows.insert(0, Result("measured", [figure("processes", world, "count")], f"torchrun --standalone --nproc_per_node={world} train_gpt.py with {settings}", check="command"))
    return rows


def end_to_end(ctx: Context, part: PartRunner):
    part.check("the README's training command", lambda: run_end_to_end(ctx, part))


# ----------------------------------------------------------------------------- part 1: correctness


def loss_and_grads(forward, model: tg.GPT, x, y, device, autocast: bool = True) -> tuple[float, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    with tg.autocast_context(device) if autocast else torch.autocast(device.type, enabled=False):
        loss = forward(x, y)
    loss.backward()
    grads = torch.cat([p.grad.reshape(-1).float() for p in model.parameters() if p.grad is not None])
    model.zero_grad(set_to_none=True)
    return float(loss), grads


def compare_training(ctx: Context, model: tg.GPT, x, y) -> Result:
    tol = ctx.scale
    eager_loss, eager_grads = loss_and_grads(model, model, x, y, ctx.rt.device)
    torch._dynamo.reset()
    compiled = torch.compile(model, dynamic=False, backend=tol.compile_backend)  # as train_model compiles it
    loss, grads = loss_and_grads(compiled, model, x, y, ctx.rt.device)
    loss_err, grad_err = abs(loss - eager_loss) / abs(eager_loss), relative_error(grads, eager_grads)
    ok = loss_err <= tol.tol_loss and grad_err <= tol.tol_grad
    return Result("pass" if ok else "FAIL",
                  [figure("loss", loss, "nats"), figure("loss error", loss_err, "relative"), figure("gradient error", grad_err, "relative L2")],
                  f"{x.size(0)}x{x.size(1)} tokens, looping {'on' if model.looping else 'off'}; tolerance {tol.tol_loss:g} (loss), {tol.tol_grad:g} (gradients)")


@contextlib.contextmanager
def full_fp32_matmuls():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def compare_attention_backends(ctx: Context, args: tg.Hyperparameters, state: dict, x, y) -> list[Result]:
    """Each backend under autocast against SDPA in fp32, with and without document isolation:
    logits (the forward) and gradients (the backward). SDPA in bf16 sets the yardstick for the
    FlashAttention backends: they must agree with fp32 about as well as SDPA does."""
    device, tol = ctx.rt.device, ctx.scale
    configs = {iso: dataclasses.replace(tg.ModelConfig.from_args(args), doc_isolation=iso) for iso in (True, False)}

    def build(cfg, backend):
        model = tg.GPT(cfg, backend).to(device)
        model.load_state_dict(state)
        return model

    def outputs(cfg, backend, autocast):
        model = build(cfg, backend)
        with torch.no_grad(), (tg.autocast_context(device) if autocast else torch.autocast(device.type, enabled=False)):
            logits = model(x)
        _, grads = loss_and_grads(model, model, x, y, device, autocast)
        return logits, grads

    with full_fp32_matmuls():  # setup_runtime turns TF32 on; the reference is plain fp32
        reference = {iso: outputs(cfg, "sdpa", autocast=False) for iso, cfg in configs.items()}
    results, sdpa_errors = [], {}
    for backend in ("sdpa", "fa3", "varlen", "fa2"):
        name = f"attention {backend} vs fp32 SDPA"
        try:
            tg.select_attention_backend(backend, device)
        except tg.SettingsError as e:
            results.append(Result("skipped", note=str(e), check=name))
            continue
        try:
            errors = {}
            for iso, cfg in configs.items():
                logits, grads = outputs(cfg, backend, autocast=True)
                errors[iso] = (relative_error(logits, reference[iso][0]), relative_error(grads, reference[iso][1]))
        except Exception as e:  # one backend's failure is its own row
            results.append(Result("ERROR", note=one_line(e), check=name))
            continue
        if backend == "sdpa":
            sdpa_errors = errors
            limit = {iso: (tol.tol_logits, tol.tol_logits) for iso in errors}
        else:
            base = sdpa_errors or {iso: (tol.tol_logits / 2, tol.tol_logits / 2) for iso in errors}
            limit = {iso: (2 * base[iso][0] + 1e-3, 2 * base[iso][1] + 1e-3) for iso in errors}
        ok = all(errors[iso][k] <= limit[iso][k] for iso in errors for k in (0, 1))
        figures = []
        for iso, (logit_err, grad_err) in errors.items():
            label = "isolated" if iso else "not isolated"
            figures += [figure(f"logits ({label})", logit_err, "relative L2"), figure(f"gradients ({label})", grad_err, "relative L2")]
        note = "bf16 autocast" if device.type == "cuda" else "fp32"
        note += "; limit: " + ", ".join(f"{'isolated' if iso else 'not isolated'} {lim[0]:.3g}/{lim[1]:.3g}" for iso, lim in limit.items())
        results.append(Result("pass" if ok else "FAIL", figures, note, check=name))
    return results


def score_path(ctx: Context, args, name: str, scorer, forward, tokens) -> tuple[tg.ScoreLedger, tg.EvalResult]:
    """One path over `tokens` as evaluate_artifact runs it (TTT with its base-model ledger)."""
    ledger = tg.ScoreLedger(tokens, ctx.tables)
    options = {"base_ledger": tg.ScoreLedger(tokens, ctx.tables) if args.ttt_report_base else None} if name == "ttt" else {}
    scorer(forward, tokens, ledger, ctx.rt, **options)
    ledger.merge(ctx.rt)
    return ledger, ledger.result()


def compare_scoring_path(ctx: Context, args, name: str, scorer, model: tg.GPT, tokens, compiled_out: dict) -> list[Result]:
    tol = ctx.scale
    _, eager = score_path(ctx, args, name, scorer, model, tokens)
    if name == "ttt":  # TTT's compiles are counted alone; the window paths share their graphs as in evaluate_artifact
        torch._dynamo.reset()
    compiled = torch.compile(model, backend=tol.compile_backend)  # as evaluate_artifact compiles it
    compiled_out["forward"] = compiled
    before = forward_compiles()
    ledger, result = score_path(ctx, args, name, scorer, compiled, tokens)
    compiled_out["ledger"] = ledger
    compiles, error = forward_compiles() - before, abs(result.val_bpb - eager.val_bpb) / eager.val_bpb
    results = [Result("pass" if error <= tol.tol_bpb else "FAIL",
                      [figure("bpb", result.val_bpb, "bits/byte"), figure("bpb error", error, "relative"), figure("new forward compiles", compiles, "compiles")],
                      f"{result.targets:,} targets; tolerance {tol.tol_bpb:g}")]
    if name == "ttt":
        once = int((ledger.count == 1).sum())
        ok = once == ledger.num_targets and compiles <= TTT_FORWARD_COMPILE_BOUND
        results.append(Result("pass" if ok else "FAIL",
                              [figure("scored once", once, f"of {ledger.num_targets:,} targets"), figure("forward", compiles, f"compiles (bound {TTT_FORWARD_COMPILE_BOUND})")],
                              f"{ledger.updates} adapter updates, each on scored positions", check="ttt compiled: every target once, bounded compiles"))
    return results


def audit_path(ctx: Context, args, name: str, model: tg.GPT, weights: dict, tokens, compiled_out: dict) -> Result:
    """The audit as evaluate_artifact runs it, from `weights` (the ones the scored run started from)."""
    forward = compiled_out.get("forward")
    if forward is None:  # the comparison did not get as far as compiling
        forward = torch.compile(model, backend=ctx.scale.compile_backend)

    def score(toks, ledger, alone):
        tg.score_path(name, forward, weights, toks, ledger, tg.one_per_batch(args) if alone else args, ctx.rt)

    report = tg.audit_path(name, score, tokens, ctx.tables, ctx.rt, model.cfg.vocab_size, args.ttt_chunk_size, compiled_out.get("ledger"), args.eval_audit_tokens)
    detail = "; ".join(f"{check} {'ok' if ok else 'FAIL'} {text}" for check, (ok, text) in report.checks.items())
    return Result("pass" if report.passed else "FAIL", note=detail)


def train_and_save_update(settings: dict, rt: tg.Runtime, out: Path):
    """A few training steps from the seed's initialization; rank 0 saves the weight updates."""
    args = tg.Hyperparameters(settings)
    torch.manual_seed(args.seed)
    model = tg.GPT(tg.ModelConfig.from_args(args), tg.select_attention_backend(args.attn_backend, rt.device)).to(rt.device)
    initial = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    tg.train_model(model, args, rt, lambda line: None, None)
    if rt.is_master:
        torch.save({k: v.cpu() - initial[k] for k, v in model.state_dict().items()}, out)


def train_worker(spec_path: str) -> int:
    """One rank of the 2-process check, started by torchrun."""
    spec = json.loads(Path(spec_path).read_text())
    rt = tg.setup_runtime()
    train_and_save_update(spec["settings"], rt, Path(spec["out"]))
    if rt.distributed:
        tg.dist.destroy_process_group()
    return 0


def two_process_training(ctx: Context) -> Result:
    """train_model on 2 ranks (NCCL on 2 GPUs, gloo on CPU) against 1 rank with 8 micro-steps on the
    same global batches: the weight updates after a few steps must agree."""
    if not ctx.cpu and torch.cuda.device_count() < 2:
        return Result("skipped", note=f"needs 2 GPUs for NCCL; this machine has {torch.cuda.device_count()}")
    steps, args = 3, ctx.args()
    # The collectives are what is checked: 2 sequences per micro-step keep it cheap on any model. The
    # default per-rank clip (the record's) depends on the GPU count by design: clip the average here.
    settings = {**ctx.settings, "ITERATIONS": str(steps), "WARMUP_STEPS": "0", "MAX_WALLCLOCK_SECONDS": "0", "COMPILE": "0",
                "GPTQ_ENABLED": "0", "EMA_DECAY": "0", "TRAIN_LOG_EVERY": "0", "TRAIN_BATCH_TOKENS": str(16 * args.train_seq_len),
                "GRAD_CLIP_SCOPE": "global"}
    reference, distributed = ctx.workdir / "update_1_process.pt", ctx.workdir / "update_2_processes.pt"
    train_and_save_update(settings, ctx.rt, reference)  # here, on this process's device
    spec = ctx.workdir / "train_worker.json"
    spec.write_text(json.dumps({"settings": settings, "out": str(distributed)}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({"CUDA_VISIBLE_DEVICES": ""} if ctx.cpu else {})}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run([*launcher, str(Path(__file__).resolve()), "--train-worker", str(spec)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=ctx.scale.budgets["correctness"])
    if done.returncode:
        tail = ((done.stderr or done.stdout).strip().splitlines() or ["no output"])[-1]
        return Result("ERROR", note=f"2 processes exited with {done.returncode}: {tail[:200]}")
    updates = [torch.cat([v.reshape(-1).float() for v in torch.load(path).values()]) for path in (distributed, reference)]
    error = relative_error(*updates)
    backend = "gloo" if ctx.cpu else "nccl"
    return Result("pass" if error <= ctx.scale.tol_grad else "FAIL", [figure("update difference", error, "relative L2")],
                  f"{backend}, {steps} steps from the same initialization, eager; tolerance {ctx.scale.tol_grad:g}")


def correctness(ctx: Context, part: PartRunner):
    args = ctx.args()
    backend = tg.select_attention_backend(args.attn_backend, ctx.rt.device)
    model = activated_model(args, backend, ctx)
    x, y = ctx.train_batch(args, ctx.scale.check_seqs)
    part.check(f"training loss and gradients: compiled vs eager ({backend})", lambda: compare_training(ctx, model, x, y))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    part.check("attention backends vs fp32 SDPA", lambda: compare_attention_backends(ctx, args, state, x[:2], y[:2]))
    model.requires_grad_(False)  # as evaluate_artifact: only TTT adapters take gradients
    tokens = ctx.val_slice(ctx.scale.check_tokens)
    torch._dynamo.reset()
    weights = {k: v.clone() for k, v in model.state_dict().items()}  # phased TTT trains them: every path starts here
    for name in tg.evaluation_paths(args):
        def scorer(forward, toks, ledger, rt, n=name, **options):
            return tg.score_path(n, forward, weights, toks, ledger, args, rt, **options)

        compiled = {}
        part.check(f"{name}: compiled vs eager", lambda n=name, s=scorer, c=compiled: compare_scoring_path(ctx, args, n, s, model, tokens, c))
        part.check(f"{name}: causal audit, compiled", lambda n=name, c=compiled: audit_path(ctx, args, n, model, weights, tokens, c))
    torch._dynamo.reset()
    part.check("2 processes train like 1", lambda: two_process_training(ctx))


# ----------------------------------------------------------------------------- part 2: speed and memory


def step_times(lines: list[str]) -> list[tuple[int, float]]:
    """(step, train_time ms) of each progress line train_model logged."""
    out = []
    for line in lines:
        run = logparse.parse_text(line)
        if run.steps is not None and run.train_time_ms is not None:
            out.append((run.steps, run.train_time_ms))
    return out


def measure_training_speed(ctx: Context, overrides: dict) -> Result:
    scale = ctx.scale
    args = ctx.args(**{"ITERATIONS": scale.speed_steps, "WARMUP_STEPS": scale.warmup_steps, "MAX_WALLCLOCK_SECONDS": 0,
                       "LOOP_ENABLE_FRAC": 0, "GPTQ_ENABLED": 0, "VAL_LOSS_EVERY": 0, "TRAIN_LOG_EVERY": 1, **overrides})
    try:
        backend = tg.select_attention_backend(args.attn_backend, ctx.rt.device)
    except tg.SettingsError as e:
        return Result("skipped", note=str(e))
    torch._dynamo.reset()
    torch.manual_seed(args.seed)
    model = tg.GPT(tg.ModelConfig.from_args(args), backend).to(ctx.rt.device)
    cuda = ctx.rt.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    lines = []
    tg.train_model(model, args, ctx.rt, lines.append, None)
    times = step_times(lines)
    # Timed from the end of the first step: that step also pays for switching QAT on and for the
    # allocator growing to its working size.
    (s0, t0), (s1, t1) = times[0], times[-1]
    timed = s1 - s0
    ms = (t1 - t0) / timed
    compile_s = [float(m.group(1)) for line in lines if (m := re.match(r"^train_compile recurrence:\w+ first_step_seconds:([\d.]+)", line))]
    figures = [figure("step", ms, "ms/step"), figure("throughput", args.train_batch_tokens / (ms / 1000), "tokens/s"),
               *mfu_figures(args, args.train_batch_tokens / (ms / 1000), model.cfg.num_loops > 0, ctx.rt.device),
               figure("compile + first step", sum(compile_s), "s")]
    if cuda:
        figures += [figure("peak allocated", torch.cuda.max_memory_allocated() / 2**30, "GiB"),
                    figure("peak reserved", torch.cuda.max_memory_reserved() / 2**30, "GiB")]
    budget_ms = 1000 * 600
    figures.append(figure("8-GPU steps in 600 s", int(budget_ms / (ms / GPUS)), "steps (compute only)"))
    compiled = "compiled" if args.compile and cuda else "eager (train_gpt.py compiles on CUDA only)"
    return Result("measured", figures, f"{timed} timed step{'s' * (timed > 1)} of {args.train_batch_tokens:,} tokens in {ctx.rt.grad_accum_steps} micro-steps, {compiled}")


def speed(ctx: Context, part: PartRunner):
    best = tg.select_attention_backend(ctx.args().attn_backend, ctx.rt.device)
    configs = [(f"default, {b}", {"ATTN_BACKEND": b}) for b in sorted(ATTENTION_BACKENDS, key=lambda b: b != best)]
    configs.insert(1, (f"recurrence off, {best}", {"ATTN_BACKEND": best, "NUM_LOOPS": 0}))
    configs += [(f"{label}, {best}", {"ATTN_BACKEND": best, **overrides}) for label, overrides in SPEED_FEATURES]
    for label, overrides in configs:
        part.check(label, lambda o=overrides: measure_training_speed(ctx, o), similar=True)


# ----------------------------------------------------------------------------- part 3: size


def size_run_args(ctx: Context) -> tg.Hyperparameters:
    scale = ctx.scale
    return ctx.args(MAX_WALLCLOCK_SECONDS=scale.size_train_seconds, ITERATIONS=scale.size_iterations,
                    WARMUP_STEPS=scale.warmup_steps, VAL_LOSS_EVERY=0, TRAIN_LOG_EVERY=0)


def train_and_measure_artifact(ctx: Context) -> list[Result]:
    """One check, so that the artifact is always measured once the training it needs has run."""
    args = size_run_args(ctx)
    torch._dynamo.reset()
    torch.manual_seed(args.seed)
    model = tg.GPT(tg.ModelConfig.from_args(args), tg.select_attention_backend(args.attn_backend, ctx.rt.device)).to(ctx.rt.device)
    trained = tg.train_model(model, args, ctx.rt, lambda line: None, None)
    hessians = trained.hessians
    results = [Result("measured", [figure("trained", trained.steps, "steps"), figure("training", trained.train_time_ms / 1000, "s")],
                      f"exported {trained.exported_weights} weights; Hessians from {'training batches' if hessians else 'none: round-to-nearest'}",
                      check="training")]
    state = model.state_dict()
    start = tg.sync_time(ctx.rt)
    qstate = tg.quantize_state_dict(state, args, hessians)
    quantize_s = tg.sync_time(ctx.rt) - start
    code_bytes = len(tg.shipped_code(tg.running_source(), args.code_minify))
    report, streams, timings = tg.write_artifact(qstate, model.cfg, args, ctx.artifact_path, code_bytes, lambda line: None)
    for stream in streams:  # the file is one compressed stream per kind of tensor: its bytes per stream are the bytes per role
        per_value = [figure("bits per value", 8 * stream.bytes / stream.numel, "bits")] if stream.numel else []
        results.append(Result("measured", [figure("compressed", stream.bytes, "bytes"), figure("raw", stream.raw_bytes, "bytes"), *per_value],
                              f"{stream.compressor}", check=f"artifact stream {stream.name}"))
    pruned = f"; fit-to-cap pruned {timings['prune_frac']:.3f} of each quantized tensor" if timings["prune_frac"] else ""
    results.append(Result("pass" if report.fits else "FAIL",
                          [figure("code", report.code_bytes, "bytes"), figure("artifact", report.artifact_bytes, "bytes"),
                           figure("total", report.total_bytes, "bytes"), figure("cap", report.cap_bytes, "bytes"),
                           figure("quantize", quantize_s, "s"), figure("compress", timings["compress_ms"] / 1000, "s")],
                          f"{tg.quantization_scheme(args)}, {'GPTQ' if hessians else 'round-to-nearest'}{pruned}",
                          check="artifact total vs cap"))
    return results


def size(ctx: Context, part: PartRunner):
    seconds = ctx.scale.size_train_seconds
    training = f"{seconds:.0f} s" if seconds else f"{ctx.scale.size_iterations} steps"
    part.check(f"train {training}, quantize, write the artifact", lambda: train_and_measure_artifact(ctx))


# ----------------------------------------------------------------------------- part 4: evaluation time


def untrained_artifact(ctx: Context, args: tg.Hyperparameters) -> Result:
    model = tg.GPT(tg.ModelConfig.from_args(args)).to(ctx.rt.device)
    tg.write_artifact(tg.quantize_state_dict(model.state_dict(), args, None), model.cfg, args, ctx.artifact_path, 0, lambda line: None)
    return Result("measured", [figure("artifact", ctx.artifact_path.stat().st_size, "bytes")],
                  "the size part wrote no artifact: untrained weights, round-to-nearest (evaluation time does not depend on the weights)")


def time_evaluation(ctx: Context, args: tg.Hyperparameters) -> list[Result]:
    tokens = ctx.val_slice(ctx.scale.eval_tokens)
    backend = tg.select_attention_backend(args.attn_backend, ctx.rt.device)
    torch._dynamo.reset()  # count the compiles of the evaluation alone
    lines = []
    tg.evaluate_artifact(ctx.artifact_path, args, ctx.rt, lines.append, ctx.tables, tokens, tg.quantization_scheme(args), backend)
    compiles = forward_compiles()
    run = logparse.parse_text("\n".join(lines))
    targets, results, projected_paths = tokens.numel() - 1, [], 0.0
    label_to_path = {tg.path_label(path, args): path for path in tg.evaluation_paths(args)}
    for label, final in run.finals.items():
        seconds = final.eval_time_ms / 1000
        rate = targets / seconds
        projected = FULL_VALIDATION_TOKENS / GPUS / rate
        projected_paths += projected
        path = label_to_path.get(label, label)
        note = f"{targets:,} targets; projection: {FULL_VALIDATION_TOKENS / 1e6:.0f} M tokens / {GPUS} GPUs at this rate"
        if path == "ttt" and args.ttt_deadline_seconds and projected > args.ttt_deadline_seconds:
            note += f"; over TTT_DEADLINE_SECONDS={args.ttt_deadline_seconds:g}, where a real run scores the rest with the base model"
        results.append(Result("measured", [figure("time", seconds, "s"), figure("rate", rate, "tokens/s"), figure("projected", projected, "s on 8 GPUs")],
                              note, check=f"eval {path}"))
    fixed = run.eval_time_total_ms / 1000 - sum(f.eval_time_ms for f in run.finals.values()) / 1000
    total = fixed + projected_paths
    verdict = "measured" if ctx.cpu else "pass" if total <= EVAL_BUDGET_S else "FAIL"  # the budget is for GPUs
    results.append(Result(verdict,
                          [figure("artifact load + compile warm-up", fixed, "s"), figure("projected total", total, "s on 8 GPUs"), figure("budget", EVAL_BUDGET_S, "s")],
                          "load and warm-up happen on every GPU at once, so they are not divided by 8", check="eval projected total vs budget"))
    limit, check = recompile_limit(), "eval compiles of GPT.forward"
    if args.compile and ctx.rt.device.type == "cuda":
        results.append(Result("pass" if compiles < limit else "FAIL", [figure("GPT.forward", compiles, f"compiles (dynamo limit {limit})")],
                              "at the limit dynamo stops compiling new shapes and runs them eagerly", check=check))
    else:
        results.append(Result("skipped", note="train_gpt.py compiles on CUDA only (COMPILE=1)", check=check))
    return results


def evaluation(ctx: Context, part: PartRunner):
    args = ctx.args()
    if not ctx.artifact_path.is_file():
        if part.check("artifact", lambda: untrained_artifact(ctx, args)) is None:
            return
    part.check(f"evaluate_artifact on {min(ctx.scale.eval_tokens, ctx.val_tokens.numel()):,} validation tokens", lambda: time_evaluation(ctx, args))


PART_FUNCTIONS = {"e2e": end_to_end, "correctness": correctness, "speed": speed, "size": size, "eval": evaluation}


def child_main(opts) -> int:
    events = Events(Path(opts.events))
    try:
        ctx = Context(opts)
    except Exception as e:  # every part needs the context: each is recorded as not run
        for name in opts.parts:
            events("part", part=name)
            events("row", part=name, check="setup", status="ERROR", figures=[], note=one_line(e), seconds=0.0)
            events("part_done", part=name)
        return 0
    device = torch.cuda.get_device_name() if ctx.rt.device.type == "cuda" else "cpu"
    events("environment", device=device, torch=torch.__version__, python=sys.version.split()[0], cuda=torch.version.cuda)
    for name in opts.parts:
        budget = opts.budget.get(name, QUICK_E2E_BUDGET_S if opts.quick and name == "e2e" else ctx.scale.budgets[name])
        events("part", part=name, budget_s=budget)
        part = PartRunner(ctx, name, budget, events)
        try:
            PART_FUNCTIONS[name](ctx, part)
        except Exception as e:  # the part's own setup failed; the next part goes on
            part.row("setup", Result("ERROR", note=one_line(e)))
        ctx.release_memory()
        events("part_done", part=name)
    return 0


# ----------------------------------------------------------------------------- the parent: supervise the child, keep the table


class Report:
    """The table so far, written as JSON after every change."""

    def __init__(self, opts, settings_changed: dict):
        self.out = Path(opts.out)
        data = "synthetic shards" if opts.tokenizer is None else str(opts.data)
        self.data = {"mode": "cpu" if opts.cpu else "gpu", "data": data, "settings_changed": settings_changed,
                     "budgets_s": {}, "rows": [], "finished": False}

    def add_row(self, **row):
        self.data["rows"].append(row)
        print(f"[{row['part']}] {row['check']}: {row['status']} {row['note'][:160]}", flush=True)
        self.write()

    def write(self):
        tg.write_atomic(self.out, (json.dumps(self.data, indent=1) + "\n").encode())

    @property
    def failed(self) -> bool:
        return any(r["status"] in ("FAIL", "ERROR") for r in self.data["rows"])


def last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()] if path.is_file() else []
    return lines[-1].strip()[:300] if lines else "no output"


def run_child(opts, parts: list[str], report: Report, budgets: dict, log_path: Path) -> list[str]:
    """Run the parts in one child; returns the parts still to run after a child that died or was stopped."""
    events_path = Path(opts.workdir) / f"events_{time.time_ns()}.jsonl"
    command = [sys.executable, str(Path(__file__).resolve()), "--child", "--events", str(events_path), "--workdir", str(opts.workdir),
               "--data", str(opts.data), "--parts", ",".join(parts)]
    command += ["--tokenizer", str(opts.tokenizer)] if opts.tokenizer else []
    command += ["--cpu"] if opts.cpu else []
    command += ["--quick"] if opts.quick else []
    command += [f"--nproc={opts.nproc}"] if opts.nproc else []
    command += [f"--budget={name}={seconds}" for name, seconds in opts.budget.items()]
    events_path.touch()
    with open(log_path, "a") as log:
        # Its own process group, so that a part over its budget is stopped with everything it started.
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        return watch_child(child, events_path, parts, report, budgets, log_path)
    except KeyboardInterrupt:
        os.killpg(child.pid, signal.SIGKILL)
        raise


def watch_child(child, events_path: Path, parts: list[str], report: Report, budgets: dict, log_path: Path) -> list[str]:
    done, current_part, current_check, part_started, offset, stopped = set(), None, None, 0.0, 0, None
    while True:
        exited = child.poll() is not None
        with open(events_path) as f:
            f.seek(offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind("\n") + 1]
        offset += len(complete.encode())
        for line in complete.splitlines():
            event = json.loads(line)
            kind = event.pop("event")
            if kind == "environment":
                report.data.update(event)
            elif kind == "part":
                current_part, current_check, part_started = event["part"], None, time.monotonic()
            elif kind == "check":
                current_check = event["check"]
            elif kind == "row":
                current_check = None
                report.add_row(**event)
            elif kind == "part_done":
                done.add(event["part"])
                current_part = None
        if exited:
            break
        hard_limit = HARD_LIMIT_FACTOR * budgets[current_part] + HARD_LIMIT_GRACE_S if current_part is not None else None
        if hard_limit is not None and time.monotonic() - part_started > hard_limit:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            stopped = f"stopped after {hard_limit:.0f} s, the hard limit of the part's {budgets[current_part]:.0f} s budget"
            break
        time.sleep(0.2)
    remaining = [p for p in parts if p not in done]
    if not remaining:
        return []
    reason = stopped or f"the child exited with {child.returncode}: {last_line(log_path)} (see {log_path})"
    if current_part is None:  # died outside a part: nothing more to learn by retrying
        for name in remaining:
            report.add_row(part=name, check="setup", status="ERROR", figures=[], note=reason, seconds=0.0)
        return []
    report.add_row(part=current_part, check=current_check or "(between checks)", status="ERROR", figures=[], note=reason,
                   seconds=round(time.monotonic() - part_started, 1))
    report.add_row(part=current_part, check="(rest of the part)", status="skipped", figures=[], note="not run: the part was stopped", seconds=0.0)
    return [p for p in remaining if p != current_part]


def parse_budget(text: str) -> tuple[str, float]:
    name, _, seconds = text.partition("=")
    try:
        value = float(seconds)
    except ValueError:
        value = -1.0
    if name not in PARTS or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: use PART=SECONDS with PART one of {', '.join(PARTS)}")
    return name, value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="tiny settings on CPU: the harness's self-test (synthetic data unless --data)")
    p.add_argument("--data", type=Path, help=f"folder of fineweb_{{train,val}}_*.bin shards (default: $DATA_PATH, else {DEFAULT_DATA.relative_to(REPO)})")
    p.add_argument("--tokenizer", type=Path, help=f"SentencePiece model of the shards (default: $TOKENIZER_PATH, else {DEFAULT_TOKENIZER.relative_to(REPO)})")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "gpu_check.json", help="the JSON table (the child's output goes to the same path with .log)")
    p.add_argument("--parts", help=f"comma list of parts to run, in the order {', '.join(PARTS)} (default: {', '.join(DEFAULT_GPU_PARTS)} on a GPU, about 10 minutes; all of them with --cpu)")
    p.add_argument("--quick", action="store_true", help="the end-to-end part alone with a 30 s clock and a smaller validation slice: under 5 minutes on one GPU")
    p.add_argument("--nproc", type=int, help="processes of the end-to-end run (default: every GPU of the machine)")
    p.add_argument("--budget", type=parse_budget, action="append", default=[], metavar="PART=SECONDS", help="a part's time budget (repeatable)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # the parent starts the parts with these
    p.add_argument("--events", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--train-worker", help=argparse.SUPPRESS)
    return p


def resolve_data(opts):
    """Shards and tokenizer, checked before anything runs; CPU mode without --data writes synthetic shards."""
    if opts.cpu and opts.data is None:
        if opts.tokenizer is not None:
            sys.exit("error: --tokenizer needs --data (the synthetic CPU data has its own vocabulary)")
        opts.data = Path(opts.workdir) / "synthetic"
        opts.data.mkdir()
        write_synthetic_shards(opts.data)
        return
    opts.data = opts.data or Path(os.environ.get("DATA_PATH") or DEFAULT_DATA)
    opts.tokenizer = opts.tokenizer or Path(os.environ.get("TOKENIZER_PATH") or DEFAULT_TOKENIZER)
    for split in ("train", "val"):
        try:
            tg.shard_files(str(opts.data), split)
        except tg.DataError:
            sys.exit(f"error: no fineweb_{split}_*.bin shards in {opts.data}; pass --data, or build the small set of the README's Benchmarks section")
    if not opts.tokenizer.is_file():
        sys.exit(f"error: tokenizer not found at {opts.tokenizer}; pass --tokenizer (the SentencePiece model the shards were made with)")


def main(argv: list[str] | None = None) -> int:
    opts = build_parser().parse_args(argv)
    if opts.train_worker:
        return train_worker(opts.train_worker)
    opts.budget = dict(opts.budget)
    default = PARTS if opts.cpu else ("e2e",) if opts.quick else DEFAULT_GPU_PARTS
    names = [p.strip() for p in (opts.parts or ",".join(default)).split(",") if p.strip()]
    unknown = [p for p in names if p not in PARTS]
    if unknown or not names:
        sys.exit(f"error: --parts takes a comma list of {', '.join(PARTS)}; got {', '.join(unknown) or 'nothing'}")
    opts.parts = [p for p in PARTS if p in names]
    if opts.child:
        return child_main(opts)
    if not opts.cpu and not torch.cuda.is_available():
        sys.exit("error: no CUDA device here; run bench/gpu_check.py on a GPU machine (README, Benchmarks), or pass --cpu for its tiny CPU self-test")
    try:
        tg.Hyperparameters()  # a misspelt or malformed setting in the environment stops here, in one line
    except tg.SettingsError as e:
        sys.exit(f"error: {e}")
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as workdir:
        opts.workdir = workdir
        resolve_data(opts)
        return supervise(opts)


def supervise(opts) -> int:
    defaults = {s.name: str(s.default) for s in tg.SETTINGS}
    changed = {k: v for k, v in base_settings(opts).items() if k not in ("DATA_PATH", "TOKENIZER_PATH") and defaults[k] != v}
    report = Report(opts, changed)
    scale = CPU_SCALE if opts.cpu else GPU_SCALE
    budgets = {name: opts.budget.get(name, QUICK_E2E_BUDGET_S if opts.quick and name == "e2e" else scale.budgets[name]) for name in opts.parts}
    report.data["budgets_s"] = budgets
    log_path = Path(opts.out).with_suffix(".log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text("")
    pending = list(opts.parts)
    try:
        while pending:
            pending = run_child(opts, pending, report, budgets, log_path)
        report.data["finished"] = True
    finally:
        report.write()
    print()
    print(markdown_table(report.data))
    print(f"\nwritten: {opts.out} (child output: {log_path})")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
