"""The 1.0611 record's own train_gpt.py as a test oracle, imported on a CPU.

The record (../shared/fixtures/record_1855/train_gpt.py, PR #1855) imports FlashAttention-3 and
Triton at the top and runs its kernels on CUDA only. `record_module()` imports it once per process
with those packages replaced, only while its module body runs, by stand-ins in plain PyTorch:

- flash_attn_interface.flash_attn_func: causal SDPA (grouped-query, scale 1/sqrt(head_dim));
  flash_attn_varlen_func: the same, once per segment of cu_seqlens (a packed row of documents).
- triton: enough for the module body to run (the decorators, tl.constexpr); a kernel launched
  anyway raises. The record's fused LeakyReLU² MLP keeps its own autograd Function; only its Triton
  matmul kernel (`linear_leaky_relu_square`) is replaced by the same product in PyTorch. The fused
  cross-entropy checks for CUDA tensors itself, so `record_hparams` turns FUSED_CE_ENABLED off: the
  record's eager branch (softcap, then cross-entropy), which its comments call numerically equal.
- torch.compile is the identity while the module body runs: `zeropower_via_newtonschulz5` is the
  function under its @torch.compile (the same math, no compiler).
- BOS_ID = 1, as the record's loader sets it on reading its first shard.

The module is imported with an empty environment: the record reads settings at import time
(CONTROL_TENSOR_NAME_PATTERNS among them), and the caller's variables must not change the oracle.

On the record's side everything is the record's code; what this module adds is the mapping between
the two models: the settings (`RECORD_TO_OURS`), and the weights (`record_tensors`: the record keeps
each kind of block matrix of all layers in one bank, `qo_bank` = Q of every layer then O of every
layer, `kv_bank` = K then V, `mlp_up_bank`, `mlp_down_bank`).

Tests call `require()` first: it skips them when ../shared is not beside the repository.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import re
import sys
import types
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
RECORD_SCRIPT = REPO.parent / "shared" / "fixtures" / "record_1855" / "train_gpt.py"
RECORD_LOG = (REPO.parent / "shared" / "fixtures" / "official_logs" / "2026-04-27_SP8192_LQER_SparseGate_BOSSmearFix_9HpStack_1.0611"
              / "train_seed42.log")

# The record's setting -> ours, for every logged setting of the model, the optimizer and the schedule
# that we have too (same meaning; the record's name on the left as its log prints it).
RECORD_TO_OURS = {
    "vocab_size": "VOCAB_SIZE", "num_layers": "NUM_LAYERS", "model_dim": "MODEL_DIM", "num_heads": "NUM_HEADS",
    "num_kv_heads": "NUM_KV_HEADS", "mlp_mult": "MLP_MULT", "tie_embeddings": "TIE_EMBEDDINGS",
    "tied_embed_init_std": "TIED_EMBED_INIT_STD", "rope_base": "ROPE_BASE", "rope_dims": "ROPE_DIMS",
    "logit_softcap": "LOGIT_SOFTCAP", "qk_gain_init": "QK_GAIN_INIT", "ln_scale": "LN_SCALE", "xsa_last_n": "XSA_LAST_N",
    "num_loops": "NUM_LOOPS", "loop_start": "LOOP_START", "loop_end": "LOOP_END", "enable_looping_at": "LOOP_ENABLE_FRAC",
    "parallel_start_layer": "PARALLEL_RESIDUAL_START", "skip_gates_enabled": "SKIP_GATES", "gate_window": "GATE_WINDOW",
    "smear_gate_enabled": "SMEAR_GATE", "sparse_attn_gate_enabled": "ATTN_GATE", "sparse_attn_gate_scale": "ATTN_GATE_SCALE",
    "train_seq_len": "TRAIN_SEQ_LEN", "train_batch_tokens": "TRAIN_BATCH_TOKENS", "iterations": "ITERATIONS",
    "max_wallclock_seconds": "MAX_WALLCLOCK_SECONDS", "warmup_steps": "WARMUP_STEPS", "warmdown_frac": "WARMDOWN_FRAC",
    "min_lr": "MIN_LR", "embed_lr": "EMBED_LR", "tied_embed_lr": "TIED_EMBED_LR", "matrix_lr": "MATRIX_LR",
    "scalar_lr": "SCALAR_LR", "muon_momentum": "MUON_MOMENTUM", "muon_momentum_warmup_start": "MUON_MOMENTUM_WARMUP_START",
    "muon_momentum_warmup_steps": "MUON_MOMENTUM_WARMUP_STEPS", "muon_backend_steps": "MUON_BACKEND_STEPS",
    "muon_row_normalize": "MUON_ROW_NORMALIZE", "muon_wd": "MUON_WD", "embed_wd": "EMBED_WD", "adam_wd": "ADAM_WD",
    "beta1": "BETA1", "beta2": "BETA2", "adam_eps": "ADAM_EPS", "grad_clip_norm": "GRAD_CLIP_NORM", "ema_decay": "EMA_DECAY",
}


def available() -> bool:
    return RECORD_SCRIPT.is_file() and RECORD_LOG.is_file()


def require():
    if not available():
        pytest.skip("../shared/fixtures (the record's code and logs) is not beside the repository")


# ----------------------------------------------------------------------------- the stand-ins


def flash_attn_func(q, k, v, causal=False, softmax_scale=None, window_size=(-1, -1), **unsupported):
    """FlashAttention's dense call: q (B, T, H, D), k and v (B, T, Hkv, D) -> (B, T, H, D)."""
    if unsupported or tuple(window_size) != (-1, -1):
        raise NotImplementedError(f"the stand-in has no {sorted(unsupported) or 'window_size'}")
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
                                       scale=softmax_scale, enable_gqa=True)
    return y.transpose(1, 2)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False, softmax_scale=None,
                           window_size=(-1, -1), **unsupported):
    """FlashAttention's packed call: q (N, H, D), k and v (N, Hkv, D); segment i is
    cu_seqlens[i]:cu_seqlens[i+1] (repeated trailing offsets are empty segments) and attends to itself only."""
    if not torch.equal(cu_seqlens_q, cu_seqlens_k):
        raise NotImplementedError("the stand-in needs the same segments for queries and keys")
    out = torch.zeros_like(q)
    bounds = cu_seqlens_q.tolist()
    for start, end in zip(bounds, bounds[1:]):
        if end > start:
            part = (t[None, start:end] for t in (q, k, v))
            out[start:end] = flash_attn_func(*part, causal=causal, softmax_scale=softmax_scale, window_size=window_size, **unsupported)[0]
    return out


class _UnlaunchableKernel:
    """What @triton.jit returns here: the function, which nothing may launch on a CPU."""

    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        raise RuntimeError(f"Triton kernel {self.fn.__name__} cannot run in the CPU oracle")


def linear_leaky_relu_square(a, b, aux=None):
    """The record's Triton matmul of its fused MLP, in PyTorch: forward (aux None) gives
    (a @ b.T, leaky_relu(a @ b.T, 0.5)^2); backward gives (a @ b.T) * d/dx leaky_relu(x, 0.5)^2 at x = aux."""
    c = a @ b.T
    if aux is None:
        return c, F.leaky_relu(c, 0.5).square()
    return c * torch.where(aux > 0, 2.0 * aux, 0.5 * aux)


def _stand_in_modules() -> dict[str, types.ModuleType]:
    fa = types.ModuleType("flash_attn_interface")
    fa.flash_attn_func, fa.flash_attn_varlen_func = flash_attn_func, flash_attn_varlen_func
    triton = types.ModuleType("triton")
    triton.jit = lambda fn=None, **_: _UnlaunchableKernel(fn) if fn is not None else _UnlaunchableKernel
    triton.cdiv = lambda a, b: -(-a // b)
    tl = types.ModuleType("triton.language")
    tl.constexpr = type("constexpr", (), {})
    tools = types.ModuleType("triton.tools")
    descriptor = types.ModuleType("triton.tools.tensor_descriptor")
    descriptor.TensorDescriptor = type("TensorDescriptor", (), {})
    triton.language, triton.tools, tools.tensor_descriptor = tl, tools, descriptor
    return {"flash_attn_interface": fa, "triton": triton, "triton.language": tl, "triton.tools": tools,
            "triton.tools.tensor_descriptor": descriptor}


def _no_compile(fn=None, **options):
    """torch.compile while the record's module body runs: the function itself (torch's compiler
    stack would look for Triton and find the stand-in)."""
    return fn if fn is not None else _no_compile


@functools.cache
def record_module() -> types.ModuleType:
    """The record's train_gpt.py as a module (imported once: it registers custom torch ops)."""
    require()
    stand_ins = _stand_in_modules()
    saved = {name: sys.modules.get(name) for name in stand_ins}
    sys.modules.update(stand_ins)
    try:
        spec = importlib.util.spec_from_file_location("record_1855_train_gpt", RECORD_SCRIPT)
        module = importlib.util.module_from_spec(spec)
        with mock.patch.dict(os.environ, clear=True), mock.patch.object(torch, "compile", _no_compile):
            spec.loader.exec_module(module)
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
    module.linear_leaky_relu_square = linear_leaky_relu_square
    module.BOS_ID = 1
    return module


# ----------------------------------------------------------------------------- settings


def _typed(raw: str):
    if raw in ("True", "False"):
        return raw == "True"
    for kind in (int, float):
        with contextlib.suppress(ValueError):
            return kind(raw)
    return raw


@functools.cache
def logged_settings() -> dict:
    """The record's Hyperparameters as its seed-42 log prints them, typed (bool, int, float or str)."""
    require()
    block = RECORD_LOG.read_text().split("Hyperparameters:\n", 1)[1]
    block = block[: re.search(r"^\S", block, flags=re.M).start()]
    return {k: _typed(v) for k, v in re.findall(r"^  (\w+): ?(.*)$", block, flags=re.M)}


def record_hparams(**overrides) -> SimpleNamespace:
    """The record's logged settings with `overrides` (names as the record's), fused CE off (above)."""
    settings = {**logged_settings(), "fused_ce_enabled": False, **overrides}
    unknown = set(overrides) - set(logged_settings())
    if unknown:
        raise KeyError(f"not a setting of the record: {sorted(unknown)}")
    return SimpleNamespace(**settings)


def our_env(h: SimpleNamespace, **extra) -> dict[str, str]:
    """Our settings for the record's `h`: every mapped setting from `h`, the rest our defaults."""
    env = {ours: getattr(h, theirs) for theirs, ours in RECORD_TO_OURS.items()}
    env.update(extra)
    return {k: str(int(v) if isinstance(v, bool) else v) for k, v in env.items()}


# ----------------------------------------------------------------------------- the model and its weights


def build_record_model(h: SimpleNamespace) -> torch.nn.Module:
    """The record's GPT as its train_model and deserialize build it (cast to bf16 whole, then its
    restore_fp32_params), widened back to fp32 for an exact comparison: the tensors left in bf16
    (the embedding, the RoPE frequencies) keep their bf16-rounded values."""
    m = record_module()
    model = m.GPT(h).bfloat16()
    m.restore_fp32_params(model)
    return model.float()


def record_tensors(model: torch.nn.Module, grads: bool = False) -> dict[str, torch.Tensor]:
    """Our parameter name -> the record model's tensor (a view of it) holding the same weight, or
    its gradient with grads=True. Shapes are ours (the smear gate's (1, W) row is our (W,) vector)."""
    n = model.num_layers
    params = dict(model.named_parameters())
    get = (lambda name: params[name].grad) if grads else (lambda name: params[name].data)  # noqa: E731
    out = {"tok_emb.weight": get("tok_emb.weight")}
    for i in range(n):
        qo, kv, up, down = get("qo_bank"), get("kv_bank"), get("mlp_up_bank"), get("mlp_down_bank")
        out.update({
            f"blocks.{i}.attn.c_q.weight": qo[i], f"blocks.{i}.attn.proj.weight": qo[n + i],
            f"blocks.{i}.attn.c_k.weight": kv[i], f"blocks.{i}.attn.c_v.weight": kv[n + i],
            f"blocks.{i}.mlp.fc.weight": up[i], f"blocks.{i}.mlp.proj.weight": down[i],
        })
        for name in ("attn_scale", "mlp_scale", "resid_mix", "attn.q_gain"):
            out[f"blocks.{i}.{name}"] = get(f"blocks.{i}.{name}")
        if f"blocks.{i}.attn.attn_gate_w" in params:
            out[f"blocks.{i}.attn.out_gate"] = get(f"blocks.{i}.attn.attn_gate_w")
    renames = {"skip_weights": "skip_weights", "skip_gates": "skip_gates", "parallel_post_lambdas": "lane_post",
               "parallel_resid_lambdas": "lane_resid", "lm_head.weight": "lm_head.weight"}
    out.update({ours: get(theirs) for theirs, ours in renames.items() if theirs in params})
    if "smear_gate.weight" in params:
        out["smear.gate"] = get("smear_gate.weight").view(-1)
        out["smear.scale"] = get("smear_lambda").view(())
    return out


@torch.no_grad()
def copy_record_weights(record_model: torch.nn.Module, our_model: torch.nn.Module, strict: bool = True):
    """Load the record model's weights into ours. Each of our parameters must receive one; with
    strict, each of the record's must have a place too (a model with a feature switched off has fewer)."""
    theirs = record_tensors(record_model)
    ours = dict(our_model.named_parameters())
    if set(ours) - set(theirs) or (strict and set(theirs) - set(ours)):
        raise KeyError(f"unmapped: ours only {sorted(set(ours) - set(theirs))}, record only {sorted(set(theirs) - set(ours))}")
    for name, p in ours.items():
        p.copy_(theirs[name].reshape(p.shape))


# ----------------------------------------------------------------------------- the optimizers


class _NoStream:
    def wait_stream(self, other):
        pass


@contextlib.contextmanager
def _cuda_streams_as_no_ops():
    """The record's Optimizers runs its Adam steps on a side CUDA stream: here, on the one CPU stream."""
    with mock.patch.object(torch.cuda, "Stream", _NoStream), mock.patch.object(torch.cuda, "current_stream", _NoStream), \
            mock.patch.object(torch.cuda, "stream", lambda s: contextlib.nullcontext()):
        yield


def build_record_optimizers(h: SimpleNamespace, model: torch.nn.Module):
    """The record's Optimizers (tied-embedding AdamW, Muon on the banks, scalar AdamW) for `model`."""
    with _cuda_streams_as_no_ops():
        return record_module().Optimizers(h, model)


def record_optimizer_step(optimizers):
    """The record's Optimizers.step on one process (no reduction: the gradients are already the
    global ones), which also zeroes the gradients."""
    with _cuda_streams_as_no_ops():
        optimizers.step(distributed=False)
