"""Our quantization against the 1.0611 record's own code (../shared/fixtures/record_1855/train_gpt.py):
the same weights and Hessians give the same integers, scales, low-rank factors and dequantized weights,
and our defaults are the record's logged settings. Skipped when ../shared is not beside the repository.

The record's module imports FlashAttention-3 and Triton at the top and compiles a function at import;
`record()` imports it once with those replaced by inert stand-ins (only its quantization functions,
plain PyTorch and NumPy, are called here), torch.compile as the identity and an empty environment."""

import functools
import importlib.util
import json
import os
import re
import sys
import types
from dataclasses import replace
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import torch

import train_gpt as T
from conftest import REPO, tiny_args, tiny_model

RECORD_SCRIPT = REPO.parent / "shared" / "fixtures" / "record_1855" / "train_gpt.py"
RECORD_LOG = REPO.parent / "shared" / "fixtures" / "official_logs" / "2026-04-27_SP8192_LQER_SparseGate_BOSSmearFix_9HpStack_1.0611" / "train_seed42.log"


def _unavailable(*args, **kwargs):
    raise RuntimeError("a GPU kernel of the record, not available in this test")


def _stand_ins() -> dict:
    flash = types.ModuleType("flash_attn_interface")
    flash.flash_attn_func = flash.flash_attn_varlen_func = _unavailable
    triton = types.ModuleType("triton")
    triton.jit = lambda fn=None, **kw: fn if fn is not None else (lambda f: f)
    language = types.ModuleType("triton.language")
    language.constexpr = object
    tools = types.ModuleType("triton.tools")
    descriptor = types.ModuleType("triton.tools.tensor_descriptor")
    descriptor.TensorDescriptor = object
    triton.language, triton.tools, tools.tensor_descriptor = language, tools, descriptor
    return {"flash_attn_interface": flash, "triton": triton, "triton.language": language, "triton.tools": tools, "triton.tools.tensor_descriptor": descriptor}


@functools.cache
def _import_record():
    spec = importlib.util.spec_from_file_location("record_1855_train_gpt", RECORD_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    identity = lambda fn=None, **kw: fn if fn is not None else (lambda f: f)  # noqa: E731
    with mock.patch.dict(sys.modules, _stand_ins()), mock.patch.dict(os.environ, {}, clear=True), mock.patch("torch.compile", identity):
        spec.loader.exec_module(module)
    return module


def record():
    if not (RECORD_SCRIPT.is_file() and RECORD_LOG.is_file()):
        pytest.skip("../shared/fixtures (the record's code and logs) is not beside the repository")
    return _import_record()


def record_settings() -> SimpleNamespace:
    """The record's Hyperparameters as its seed-42 log prints them (the values the 1.0611 run used)."""
    text = RECORD_LOG.read_text()
    logged = dict(re.findall(r"^  (\w+): (.*)$", text.split("Hyperparameters:", 1)[1].split("\n\n", 1)[0], flags=re.M))
    parse = lambda v: {"True": True, "False": False}.get(v, v)  # noqa: E731
    h = SimpleNamespace(**{k: parse(v) for k, v in logged.items()})
    for name in ("embed_bits", "matrix_bits", "lqer_rank", "lqer_top_k", "lqer_factor_bits", "lqer_asym_group"):
        setattr(h, name, int(getattr(h, name)))
    for name in ("embed_clip_sigmas", "mlp_clip_sigmas", "attn_clip_sigmas", "matrix_clip_sigmas"):
        setattr(h, name, float(getattr(h, name)))
    return h


def test_our_quantization_defaults_are_the_record_settings():
    record()
    h, ours = record_settings(), T.Hyperparameters({})
    assert h.compressor == "pergroup" and h.gated_attn_quant_gate and h.lqer_enabled and h.lqer_asym_enabled
    assert (ours.quant_bits_attn, ours.quant_bits_mlp, ours.quant_bits_other, ours.quant_bits_embed) == (h.matrix_bits,) * 3 + (h.embed_bits,)
    assert (ours.quant_clip_k_attn, ours.quant_clip_k_mlp, ours.quant_clip_k_other, ours.quant_clip_k_embed) == (
        h.attn_clip_sigmas, h.mlp_clip_sigmas, h.matrix_clip_sigmas, h.embed_clip_sigmas)
    assert ours.quant_clip == "sdclip" and ours.quant_float_max_numel == 65536 and ours.quant_control_int8 == "out_gate"
    assert (ours.lqer_rank, ours.lqer_top_k, ours.lqer_group) == (h.lqer_rank, h.lqer_top_k, h.lqer_asym_group)
    assert (ours.lqer_a_bits, ours.lqer_b_bits, ours.lqer_a_clip_search) == (2, 4, False)  # the asymmetric pack: A in [-2, 1], B in [-8, 7]
    assert ours.gptq_enabled and ours.gptq_embed and ours.gptq_act_order and (ours.gptq_block_size, ours.gptq_damp) == (128, 0.01)
    assert ours.quant_prune_frac == 0.0
    # the record's rank 0 builds its Hessians from GPTQ_CALIBRATION_BATCHES of its share of a training batch (8 GPUs)
    assert ours.gptq_calib_seqs == int(h.gptq_calibration_batches) * int(h.train_batch_tokens) // (8 * int(h.train_seq_len)) == 768


def correlated_inputs(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=g) @ (torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g)) * torch.rand(cols, generator=g).add(0.05)


@pytest.mark.parametrize("bits, k, cols", [(6, 11.5, 256), (7, 14.0, 200), (4, 3.0, 96)])
def test_gptq_gives_the_record_integers_and_scales(bits, k, cols):
    rec = record()
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(48, cols, generator=g) * torch.rand(48, 1, generator=g).add(0.05)
    x = correlated_inputs(4 * cols, cols, seed=bits)
    H = x.T @ x / x.size(0)
    H[:, 7] = H[7, :] = 0.0  # a dead input: the record's and our special case
    q_rec, s_rec = rec.gptq_quantize_weight(w, H, clip_sigmas=k, clip_range=2 ** (bits - 1) - 1)
    scale = T.row_scales(w, bits, "sdclip", k)
    q = T.gptq_quantize(w, H, scale, bits, 128, 0.01, True)
    assert torch.equal(scale.half().view(-1), s_rec), "SDClip: k * std(row) (unbiased) / qmax in fp16"
    assert torch.equal(q, q_rec)


def test_gate_int8_rows_are_the_records():
    rec = record()
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 12, generator=g) * torch.tensor([1e-3, 0.01, 0.1, 1, 3, 10, 0.5, 2]).view(-1, 1)
    q_rec, s_rec = rec._quantize_gate_int8_row(w)
    ours = T.quantize_control(w)
    assert torch.equal(ours.q, q_rec) and torch.equal(ours.scale.view(-1), s_rec) and ours.bits == 8


@pytest.mark.parametrize("rank, cols", [(4, 512), (2, 128)])
def test_lqer_factors_are_the_records_asymmetric_pack(rank, cols):
    rec = record()
    g = torch.Generator().manual_seed(rank)
    err = torch.randn(96, cols, generator=g) @ torch.diag(torch.linspace(2, 0.1, cols)) * 0.01
    u, s, vh = torch.linalg.svd(err, full_matrices=False)
    qa, sa, qb, sb = rec._lqer_pack_asym((u[:, :rank] * s[:rank]).contiguous(), vh[:rank].contiguous(), 64)
    c = T.low_rank_correction(err, rank, 2, 4, 64)
    assert torch.equal(c.a, qa) and torch.equal(c.a_scale.reshape(()), sa) and torch.equal(c.b, qb) and torch.equal(c.b_scale.reshape(-1), sb)
    assert set(c.a.unique().tolist()) <= {-2, -1, 0, 1} and int(c.b.min()) >= -8 and int(c.b.max()) <= 7


def record_sized_model():
    """A model whose block matrices straddle the record's fixed fp16 threshold (65,536 elements): c_q is
    256 x 256 = 65,536 (fp16 in both), mlp.fc 512 x 256 and the 512 x 256 embedding are quantized."""
    overrides = dict(VOCAB_SIZE=512, MODEL_DIM=256, MLP_MULT=2, BIGRAM_VOCAB_SIZE=0, GATE_WINDOW=12)  # attention gate 4 x 12: int8 in the record
    model = tiny_model(seed=1, **overrides)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and not T.is_control(name):
                p.mul_(torch.rand(p.size(0), 1).add(0.1) / 10)  # rows of different scales
    g = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, 512, (8, 32), generator=g) for _ in range(4)]
    hessians = T.collect_hessians(model, batches, T.Runtime())
    return model, hessians, overrides


def test_the_whole_quantization_is_the_records_with_our_defaults():
    """gptq_mixed_quantize + dequantize_mixed of the record (its logged settings) against
    quantize_state_dict + dequantize_state_dict with our defaults: every stored integer, scale and
    factor, every fp16 tensor and every rebuilt weight equal."""
    rec = record()
    model, hessians, overrides = record_sized_model()
    state = model.state_dict()
    ours = T.quantize_state_dict(state, tiny_args(**overrides), hessians)  # our quantization defaults
    record_name = {n: n.replace(".attn.out_gate", ".attn.attn_gate_w") for n in state}  # the record's name of the attention gate
    result, meta = rec.gptq_mixed_quantize({record_name[n]: t for n, t in state.items()}, hessians, record_settings())
    kinds = {}
    for name, v in ours.items():
        r = record_name[name]
        kinds[meta[r]] = kinds.get(meta[r], 0) + 1
        if meta[r] == "passthrough (float16)":
            assert v.dtype == torch.float16 and torch.equal(v, result[r]), name
        elif meta[r] == "gate_int8_row":
            assert torch.equal(v.q, result[r + ".gq"]) and torch.equal(v.scale.view(-1), result[r + ".gs"]), name
        else:
            assert meta[r].startswith(f"gptq (int{v.bits})"), (name, meta[r])
            assert torch.equal(v.q, result[r + ".q"]) and torch.equal(v.scale.view(-1), result[r + ".scale"]), name
            assert (v.correction is not None) == meta[r].endswith("+lqer_asym"), name
            if v.correction is not None:
                c = v.correction
                assert torch.equal(c.a, result[r + ".lqA_a"]) and torch.equal(c.a_scale.reshape(()), result[r + ".lqAs_a"]), name
                assert torch.equal(c.b, result[r + ".lqB_a"]) and torch.equal(c.b_scale.reshape(-1), result[r + ".lqBs_a"]), name
    assert kinds["gate_int8_row"] == 4 and sum(n for k, n in kinds.items() if k.startswith("gptq")) == 9  # 4 mlp.fc, 4 mlp.proj, tok_emb
    assert sum(n for k, n in kinds.items() if k.endswith("+lqer_asym")) == 3 and kinds["passthrough (float16)"] > 20
    rebuilt = rec.dequantize_mixed(result, meta, {record_name[n]: t for n, t in state.items()})
    mine = T.dequantize_state_dict(ours)
    assert all(torch.equal(mine[n], rebuilt[record_name[n]]) for n in state)


def test_row_order_is_the_records_l1_chain_with_its_ties():
    rec = record()
    g = torch.Generator().manual_seed(0)
    centers = torch.randint(-6, 7, (5, 40), generator=g)
    q = (centers[torch.randint(0, 5, (150,), generator=g)] + torch.randint(-1, 2, (150, 40), generator=g)).to(torch.int8)
    q[10] = q[20] = q[30]  # equal rows: equal distances, the first index wins
    for m in (q, torch.zeros(7, 5, dtype=torch.int8)):
        assert np.array_equal(T.similarity_order(m).numpy(), rec._similarity_sort_l1(m.numpy()).astype(np.int64))


def test_the_value_streams_hold_the_records_per_group_bytes(monkeypatch):
    """With the default layout, each kind of matrix's stream decompresses to the bytes the record's
    _serialize_pergroup hands its compressor (lrzip, replaced here by the identity): layers in order,
    each matrix transposed, the rows of tok_emb, attn.c_q and mlp.fc (only) in the record's L1 order."""
    rec = record()
    overrides = dict(VOCAB_SIZE=512, MODEL_DIM=320, MLP_MULT=2, BIGRAM_VOCAB_SIZE=0, GATE_WINDOW=12)  # c_q 320 x 320: quantized
    model = tiny_model(seed=3, **overrides)
    state = model.state_dict()
    args = tiny_args(**overrides)
    qstate = T.quantize_state_dict(state, args, None)  # round-to-nearest: the layout is what is compared
    result = {}
    for name, v in qstate.items():  # our integers in the record's naming
        if isinstance(v, T.QuantizedTensor) and not T.is_control(name):
            result[name + ".q"] = v.q
    monkeypatch.setattr(rec, "_lrzip_compress", lambda data, tmpdir, label: data)
    record_streams = rec._unpack_streams(rec._serialize_pergroup(result, {}, args.num_layers, None))
    record_groups = {key.removeprefix("_").removesuffix(".weight.q"): data for key, data in zip(rec._GROUP_ORDER, record_streams)}
    blob, _ = T.encode_artifact(qstate, model.cfg, replace(T.Packing.from_args(args), compressor="zstd"))  # the default layout
    raw_manifest, *streams = T._read_streams(blob[T._ARTIFACT_HEADER.size :])
    manifest = json.loads(raw_manifest)
    ours = {spec["sections"][0]: data for spec, data in zip(manifest["streams"], streams)}
    groups = {T.value_group(n.removesuffix(".q")) for n in result}
    assert groups == {"tok_emb", "attn.c_q", "attn.proj", "mlp.fc", "mlp.proj"}
    for group in groups:
        assert ours[group] == record_groups[group], group
    entries = {e["name"]: e for e in manifest["tensors"]}
    assert {T.value_group(n) for n, e in entries.items() if e.get("ordered")} == {"tok_emb", "attn.c_q", "mlp.fc"}
