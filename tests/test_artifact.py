"""Tests of the artifact pipeline: per-row quantization (search and SDClip), GPTQ (the tied embedding
included), the low-rank correction, int8 control tensors, pruning, bit-packing, the file format
(per-group streams, every compressor, round trip, corruption, size accounting and the cap), weight
averaging and the QAT switch under torch.compile, and an end-to-end run of train_gpt.py whose artifact
is re-scored with EVAL_ONLY, by the script and by the shipped wrapper it wrote."""

import hashlib
import itertools
import os
import re
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch

import train_gpt as T
from conftest import REPO, SP1024, TINY, randomize, synthetic_stream, tiny_args, tiny_model

BITS = range(2, 9)


# The tiny model's block matrices are below the default QUANT_FLOAT_MAX_NUMEL; quantize every 2-D weight anyway.
ALL_Q = dict(QUANT_FLOAT_MAX_NUMEL=0)


def heavy_tailed(rows=24, cols=257, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g).add(0.1)
    w[:, :3] *= 8.0  # a few outliers per row, so the clip matters
    return w


# ----------------------------------------------------------------------------- per-row quantization


@pytest.mark.parametrize("mode", ["search", "sdclip"])
def test_round_to_nearest_error_bounds_per_bit_width(mode):
    w = heavy_tailed()
    mse = []
    for bits in BITS:
        qmax = 2 ** (bits - 1) - 1
        scale = T.row_scales(w, bits, mode, 3.0)
        assert scale.shape == (w.size(0), 1) and (scale > 0).all()
        assert torch.equal(scale, scale.half().float()), "the scale must be exactly what the fp16 file stores"
        q = T.quantize_with_scale(w, scale, bits)
        assert q.dtype == torch.int8 and int(q.abs().max()) <= qmax
        err = (w - q.float() * scale).abs()
        inside = w.abs() <= qmax * scale
        assert inside.float().mean() > 0.9
        assert (err[inside] <= scale.expand_as(w)[inside] / 2 * (1 + 1e-6)).all(), f"{bits} bits: more than half a step off inside the clip"
        outside = ~inside
        edge = (w.abs() - qmax * scale).expand_as(w)
        torch.testing.assert_close(err[outside], edge[outside])  # clipped values land on the last grid point
        mse.append(err.square().mean().item())
    assert all(a > b for a, b in zip(mse, mse[1:])), f"error must shrink as bits grow: {mse}"


def test_clip_modes_choose_the_documented_scale():
    w = heavy_tailed(seed=1)
    w[0] = torch.where(torch.arange(w.size(1)) % 2 == 0, 1.0, -1.0)  # std about 1, absmax 1
    for bits in BITS:
        qmax = 2 ** (bits - 1) - 1
        k = 2.5
        sd = T.row_scales(w, bits, "sdclip", k)
        expect = k * w.std(dim=1, keepdim=True) / qmax  # the sample std (n - 1), as the record's SDClip
        assert torch.equal(sd, expect.half().float())
        assert not torch.equal(sd, (k * w.std(dim=1, keepdim=True, correction=0) / qmax).half().float())
        assert sd[0].item() == pytest.approx(k / qmax, rel=3e-3), "k * std beyond absmax is kept: a coarser grid, not absmax"
        # search: never worse per row than the plain absmax clip (one of its candidates), usually better
        search = T.row_scales(w, bits, "search", k)
        absmax = (w.abs().amax(dim=1, keepdim=True) / qmax).half().float()

        def row_err(s):
            return (w - T.quantize_with_scale(w, s, bits).float() * s).square().sum(dim=1)

        assert (row_err(search) <= row_err(absmax) * (1 + 1e-6)).all()
        if bits <= 6:
            assert row_err(search).sum() < row_err(absmax).sum()


@pytest.mark.parametrize("mode", ["search", "sdclip"])
def test_zero_and_tiny_rows_get_a_nonzero_fp16_scale(mode):
    # A clamp below fp16's smallest positive value (2^-24) used to round to 0: 0/0 = NaN went into an int8 cast.
    w = heavy_tailed(rows=4, cols=300)
    w[1] = 0.0
    w[2] *= 1e-8
    for bits in BITS:
        scale = T.row_scales(w, bits, mode, 4.0)
        assert (scale.half() > 0).all(), f"{mode} {bits} bits: a row scale underflows fp16"
        assert not torch.isnan(w / scale).any()
        q = T.quantize_with_scale(w, scale, bits)
        assert (q[1] == 0).all()
        err = (w - q.float() * scale).abs()
        assert (err[1] == 0).all() and err[2].max() <= w[2].abs().max(), "a tiny row must come back no worse than zeroed"


def entropy_bits(q: torch.Tensor) -> float:
    """Empirical entropy of the values, in bits per value (what an ideal order-0 coder needs)."""
    p = torch.bincount((q.flatten().long() + 128)).float()
    p = p[p > 0] / q.numel()
    return float(-(p * p.log2()).sum())


def test_sdclip_takes_each_roles_k_and_trades_error_for_bytes():
    model = tiny_model(seed=4)
    state = model.state_dict()
    ks = dict(QUANT_CLIP_K_ATTN=3.0, QUANT_CLIP_K_MLP=5.0, QUANT_CLIP_K_EMBED=7.0)
    args = tiny_args(QUANT_CLIP="sdclip", QUANT_BITS_ATTN=6, QUANT_BITS_MLP=5, QUANT_BITS_EMBED=7, LQER_RANK=0, GPTQ_ENABLED=0, **ks, **ALL_Q)
    qstate = T.quantize_state_dict(state, args, None)
    for name, k, bits in (("blocks.1.attn.c_q.weight", 3.0, 6), ("blocks.2.mlp.fc.weight", 5.0, 5), ("tok_emb.weight", 7.0, 7)):
        w = state[name].float()
        expect = (k * w.std(dim=1, keepdim=True) / (2 ** (bits - 1) - 1)).half()
        assert torch.equal(qstate[name].scale, expect), name
        assert qstate[name].bits == bits
    # a larger k: a coarser grid, fewer bits per value, more error; inside the clip the error stays under half a step
    w = heavy_tailed(rows=64, cols=512, seed=5)
    entropy, mse = [], []
    for k in (2.0, 4.0, 8.0, 16.0):
        scale = T.row_scales(w, 6, "sdclip", k)
        q = T.quantize_with_scale(w, scale, 6)
        err = (w - q.float() * scale).abs()
        inside = w.abs() <= 31 * scale
        assert (err[inside] <= scale.expand_as(w)[inside] / 2 * (1 + 1e-6)).all()
        entropy.append(entropy_bits(q))
        mse.append(err[inside].square().mean().item())
    assert all(a > b for a, b in zip(entropy, entropy[1:])), entropy
    assert all(a < b for a, b in zip(mse, mse[1:])), mse


# ----------------------------------------------------------------------------- GPTQ


@pytest.fixture(scope="module")
def trained_tiny():
    """A tiny model trained a little with Adam on learnable synthetic documents, calibration and test batches."""
    torch.manual_seed(0)
    model = tiny_model(seed=0, randomized=False)
    stream = torch.from_numpy(synthetic_stream(300, seed=3).astype(np.int64))
    g = torch.Generator().manual_seed(0)

    def batch(n=8, t=32):
        starts = torch.randint(0, stream.numel() - t - 1, (n,), generator=g)
        chunk = torch.stack([stream[s : s + t + 1] for s in starts.tolist()])
        return chunk[:, :-1], chunk[:, 1:]

    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    first = None
    for _ in range(20):
        x, y = batch()
        loss = model(x, y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first - 0.3, "the tiny model did not learn"
    model.requires_grad_(False)
    calib = [batch()[0] for _ in range(4)]
    test = [batch()[0] for _ in range(2)]
    return model, calib, test


def layer_inputs(model, batches, names):
    """The inputs X that the named weights multiply on `batches`, as (tokens, in_features): a CastedLinear's
    input, and for the tied embedding the LM head's input (the final norm's output)."""
    modules = {**dict(model.named_modules()), "tok_emb": model.head_input}
    got = {n: [] for n in names}
    handles = [modules[n.removesuffix(".weight")].register_forward_hook(lambda m, i, o, n=n: got[n].append(i[0].reshape(-1, i[0].size(-1)))) for n in names]
    with torch.no_grad():
        for x in batches:
            model(x)
    for h in handles:
        h.remove()
    return {n: torch.cat(v) for n, v in got.items()}


@pytest.mark.parametrize("bits", [4, 5])
def test_gptq_beats_round_to_nearest_on_layer_outputs(trained_tiny, bits):
    model, calib, test = trained_tiny
    hessians = T.collect_hessians(model, calib, T.Runtime())
    names = [n for n in hessians if n.startswith("blocks.")]
    assert len(names) == 4 * 6
    X = layer_inputs(model, test, names)  # held-out activations, not the calibration ones
    state = model.state_dict()
    ratios = []
    for name in names:
        w = state[name].float()
        scale = T.row_scales(w, bits, "search", 4.0)
        rtn = T.quantize_with_scale(w, scale, bits).float() * scale
        q = T.gptq_quantize(w, hessians[name], scale, bits, block_size=16, damp=0.01, act_order=True)
        assert q.dtype == torch.int8 and int(q.abs().max()) <= 2 ** (bits - 1) - 1
        gptq = q.float() * scale
        x = X[name]
        e_rtn = torch.linalg.norm(x @ w.T - x @ rtn.T).item()
        e_gptq = torch.linalg.norm(x @ w.T - x @ gptq.T).item()
        assert e_gptq < e_rtn, f"{name}: GPTQ {e_gptq:.3e} >= RTN {e_rtn:.3e}"
        ratios.append(e_gptq / e_rtn)
    assert float(np.mean(ratios)) < 0.75, f"GPTQ should cut the output error clearly: mean ratio {np.mean(ratios):.3f}"


def test_quantize_state_dict_uses_gptq_where_a_hessian_exists(trained_tiny):
    model, calib, _ = trained_tiny
    hessians = T.collect_hessians(model, calib, T.Runtime())
    assert "tok_emb.weight" in hessians, "the tied embedding gets the Hessian of the LM head's input"
    state = model.state_dict()
    args = tiny_args(QUANT_BITS_ATTN=4, QUANT_BITS_MLP=4, QUANT_BITS_EMBED=8, QUANT_BITS_OTHER=7, **ALL_Q)
    rtn = T.quantize_state_dict(state, args, None)
    gptq = T.quantize_state_dict(state, args, hessians)
    assert set(rtn) == set(gptq) == set(state)
    for name, v in gptq.items():
        if name in hessians:
            assert isinstance(v, T.QuantizedTensor) and v.bits == (4 if name.startswith("blocks.") else 8 if name == "tok_emb.weight" else 7)
            assert not torch.equal(v.q, rtn[name].q), f"{name}: GPTQ was not applied"
        elif isinstance(v, T.QuantizedTensor) and not T.is_control(name):  # the BigramHash table (an embedding lookup, no Hessian): round-to-nearest
            assert name == "bigram.table.weight" and torch.equal(v.q, rtn[name].q) and v.bits == 7
    off = T.quantize_state_dict(state, tiny_args(GPTQ_ENABLED=0, QUANT_BITS_ATTN=4, QUANT_BITS_MLP=4, QUANT_BITS_EMBED=8, QUANT_BITS_OTHER=7, **ALL_Q), hessians)
    assert all(torch.equal(off[n].q, rtn[n].q) for n in hessians)
    no_embed = T.quantize_state_dict(state, tiny_args(GPTQ_EMBED=0, QUANT_BITS_ATTN=4, QUANT_BITS_MLP=4, QUANT_BITS_EMBED=8, QUANT_BITS_OTHER=7, **ALL_Q), hessians)
    assert torch.equal(no_embed["tok_emb.weight"].q, rtn["tok_emb.weight"].q), "GPTQ_EMBED=0: round-to-nearest for the embedding"
    assert torch.equal(no_embed["blocks.0.attn.c_q.weight"].q, gptq["blocks.0.attn.c_q.weight"].q)


@pytest.mark.parametrize("bits", [5, 7])
def test_gptq_embedding_beats_round_to_nearest_on_the_logits(trained_tiny, bits):
    """The tied embedding's GPTQ error bound: on held-out text its logits move less than with round-to-nearest
    on the same grid, and each weight stays within the grid (|q| <= qmax)."""
    model, calib, test = trained_tiny
    H = T.collect_hessians(model, calib, T.Runtime())["tok_emb.weight"]
    X = layer_inputs(model, test, ["tok_emb.weight"])["tok_emb.weight"]  # the head's input on held-out batches
    w = model.tok_emb.weight.float()
    for mode, k in (("search", 0.0), ("sdclip", 14.0)):
        scale = T.row_scales(w, bits, mode, k)
        rtn = T.quantize_with_scale(w, scale, bits).float() * scale
        q = T.gptq_quantize(w, H, scale, bits, block_size=128, damp=0.01, act_order=True)
        assert int(q.abs().max()) <= 2 ** (bits - 1) - 1
        e_rtn = torch.linalg.norm(X @ (w - rtn).T).item()
        e_gptq = torch.linalg.norm(X @ (w - q.float() * scale).T).item()
        assert e_gptq < 0.9 * e_rtn, (mode, bits, e_gptq, e_rtn)


# ----------------------------------------------------------------------------- self-generated calibration (GPTQ_CALIBRATION=self)


def self_calibration(model, num_seqs=6, seq_len=24, temperature=0.8, seed=1, batch=4, rt=None):
    return torch.cat(list(T.generate_calibration_batches(model, num_seqs, seq_len, temperature, rt or T.Runtime(), seed, batch)))


def test_self_calibration_sequences_start_with_bos_and_are_reproducible():
    model = tiny_model(seed=3)
    model.requires_grad_(False)
    batches = list(T.generate_calibration_batches(model, 6, 24, 0.8, T.Runtime(), 1, batch=4))
    assert [tuple(b.shape) for b in batches] == [(4, 24), (2, 24)]
    seqs = torch.cat(batches)
    assert seqs.dtype == torch.long and (seqs[:, 0] == T.BOS_ID).all()
    assert int(seqs.min()) >= 0 and int(seqs.max()) < model.cfg.vocab_size
    assert len(seqs[:, 1:].unique()) > 10, "sampled text should not be one repeated token"
    assert torch.equal(seqs, self_calibration(model, seed=1)), "the same seed must give the same text"
    assert not torch.equal(seqs, self_calibration(model, seed=2)), "another seed must give other text"
    # each rank samples its share (GPTQ_CALIB_SEQS counts all ranks together) from its own stream
    rank0, rank1 = (self_calibration(model, rt=T.Runtime(rank=r, world_size=2)) for r in (0, 1))
    assert rank0.shape == rank1.shape == (3, 24) and not torch.equal(rank0, rank1)


def test_self_calibration_temperature_shapes_the_distribution():
    model = tiny_model(seed=3)
    model.requires_grad_(False)
    stats = {}
    for temp in (1e-4, 2.0):
        seqs = self_calibration(model, temperature=temp)
        logits = model(seqs)[:, :-1]
        greedy = (logits.argmax(-1) == seqs[:, 1:]).float().mean().item()
        logp = torch.log_softmax(logits, -1).gather(-1, seqs[:, 1:, None]).mean().item()
        stats[temp] = (greedy, logp, len(seqs[:, 1:].unique()))
        if temp < 0.01:  # near-greedy: every row is the same argmax continuation of BOS
            assert greedy == 1.0 and (seqs == seqs[0]).all(), stats
    (_, lp_cold, n_cold), (g_hot, lp_hot, n_hot) = stats[1e-4], stats[2.0]
    assert g_hot < 0.3 and lp_hot < lp_cold - 1.0 and n_hot > 2 * n_cold, stats
    # the first token after BOS is drawn from softmax(logits / temperature): its empirical law is
    # close to that distribution and far from the one of another temperature
    logits0 = model(torch.full((1, 1), T.BOS_ID))[0, -1]
    for temp, other in ((0.5, 2.0), (2.0, 0.5)):
        first = self_calibration(model, num_seqs=4000, seq_len=2, temperature=temp, batch=4000)[:, 1]
        freq = torch.bincount(first, minlength=model.cfg.vocab_size).float() / first.numel()
        tv = 0.5 * (freq - torch.softmax(logits0 / temp, -1)).abs().sum().item()
        tv_other = 0.5 * (freq - torch.softmax(logits0 / other, -1)).abs().sum().item()
        assert tv < 0.1 and tv_other > 0.3, (temp, tv, tv_other)


def test_self_calibration_hessians_drive_gptq(trained_tiny):
    model, _, test = trained_tiny
    seqs = self_calibration(model, num_seqs=8, seq_len=32, temperature=0.8, seed=5)
    hessians = T.collect_hessians(model, seqs.split(4), T.Runtime())
    linear_names = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, T.CastedLinear)} | {"tok_emb.weight"}
    assert set(hessians) == linear_names and len(linear_names) == 4 * 6 + 2  # 6 per block, the bigram projection, the tied embedding
    X = layer_inputs(model, [seqs], sorted(linear_names))
    for name, H in hessians.items():
        assert H.shape == (model.state_dict()[name].size(1),) * 2
        assert torch.equal(H, H.T), f"{name}: not symmetric"
        assert torch.linalg.eigvalsh(H.double()).min() > -1e-5 * H.diag().max(), f"{name}: not PSD"
        assert H.diag().sum() > 0
        torch.testing.assert_close(H, X[name].T @ X[name] / X[name].size(0), rtol=1e-4, atol=1e-6)  # mean of x^T x per token
    state = model.state_dict()
    args = tiny_args(QUANT_BITS_ATTN=4, QUANT_BITS_MLP=4, **ALL_Q)
    rtn = T.quantize_state_dict(state, args, None)
    gptq = T.quantize_state_dict(state, args, hessians)
    for name in hessians:
        assert not torch.equal(gptq[name].q, rtn[name].q), f"{name}: GPTQ was not applied"
    models = [float_model_from_qstate(model.cfg, q) for q in (rtn, gptq)]
    with torch.no_grad():
        a, b = (m(test[0]) for m in models)
    assert not torch.equal(a, b)
    # the model's own text is a usable calibration set: on held-out real data GPTQ beats RTN overall
    X = layer_inputs(model, test, sorted(hessians))
    err = {k: sum(torch.linalg.norm(X[n] @ state[n].T - X[n] @ q[n].dequantize().T).item() for n in hessians) for k, q in (("rtn", rtn), ("gptq", gptq))}
    assert err["gptq"] < 0.9 * err["rtn"], err


# ----------------------------------------------------------------------------- pruning


@pytest.mark.parametrize("use_gptq", [False, True])
def test_magnitude_pruning_zeroes_about_that_fraction(use_gptq):
    model = tiny_model(seed=2)
    state = model.state_dict()
    hessians = None
    if use_gptq:
        hessians = T.collect_hessians(model, [torch.randint(0, 64, (4, 32))], T.Runtime())
    base = T.quantize_state_dict(state, tiny_args(QUANT_BITS_ATTN=6, QUANT_BITS_MLP=6, **ALL_Q), hessians)
    frac = 0.3
    pruned = T.quantize_state_dict(state, tiny_args(QUANT_BITS_ATTN=6, QUANT_BITS_MLP=6, QUANT_PRUNE_FRAC=frac, **ALL_Q), hessians)
    checked = 0
    for name, v in pruned.items():
        if not isinstance(v, T.QuantizedTensor) or T.is_control(name):  # int8 control tensors are never pruned
            assert torch.equal(v.q, base[name].q) if isinstance(v, T.QuantizedTensor) else torch.equal(v, base[name])
            continue
        w = state[name].float()
        smallest = w.abs() <= w.abs().flatten().kthvalue(int(frac * w.numel())).values
        assert (v.q[smallest] == 0).all(), f"{name}: a pruned weight survived"
        zeros, natural = (v.q == 0).float().mean().item(), (base[name].q == 0).float().mean().item()
        asked = int(frac * w.numel()) / w.numel()
        assert asked <= zeros <= frac + natural + 0.02, f"{name}: {zeros:.3f} zero, asked {frac} (+{natural:.3f} rounding to 0)"
        checked += 1
    assert checked == sum(isinstance(v, T.QuantizedTensor) and not T.is_control(n) for n, v in base.items()) and checked >= 20


def test_prune_smallest_quantized_zeroes_the_smallest_nonzero_entries():
    w = heavy_tailed(rows=64, cols=512, seed=4)
    scale = T.row_scales(w, 5, "search", 4.0)
    q = T.quantize_with_scale(w, scale, 5)
    q[:, :40] = 0  # entries already zero (about 8% of the tensor, plus natural rounding to zero)
    qt = T.QuantizedTensor(q, scale.half(), 5)
    qstate = {"w": qt, "small": torch.ones(3, dtype=torch.float16)}
    before = (q == 0).float().mean().item()
    for frac in (0.05, 0.1, 0.3):
        out = T.prune_smallest_quantized(qstate, frac)
        assert out["small"] is qstate["small"] and out["w"].scale is qt.scale and out["w"].bits == 5
        p = out["w"].q
        newly = (p == 0) & (q != 0)
        assert abs(newly.float().mean().item() - frac) < 0.01, f"asked {frac} more zeros, got {newly.float().mean().item():.4f} (had {before:.3f})"
        assert ((p == 0) | (p == q)).all(), "surviving values must be untouched"
        mag = (q.float() * scale).abs()
        assert mag[newly].max() <= mag[(p != 0)].min(), "must prune the smallest magnitudes first"
    assert torch.equal(qt.q, q), "the input qstate must not be modified"
    assert T.prune_smallest_quantized(qstate, 0.0)["w"] is qt


# ----------------------------------------------------------------------------- bit-packing and serialization


@pytest.mark.parametrize("bits", BITS)
def test_pack_unpack_bits_round_trip(bits):
    rng = np.random.default_rng(bits)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1)
    for count in (1, 3, 7, 13, 1001, 4097):
        values = rng.integers(lo, hi, size=count).astype(np.int8)
        values[0], values[-1] = lo, hi - 1  # both extremes
        packed = T.pack_bits(values, bits)
        assert len(packed) == (count * bits + 7) // 8, "bit-packing must be dense"
        out = T.unpack_bits(packed, bits, count)
        assert out.dtype == np.int8 and np.array_equal(out, values)


def sample_qstate(seed=0, **overrides):
    """A randomized tiny model with mixed bit widths, int8 and fp16 control tensors and low-rank corrections, its
    args and its round-to-nearest qstate; skip_weights in fp32, as format-2 files written before the controls
    went to fp16 hold them (still read)."""
    args = tiny_args(**{**dict(QUANT_BITS_ATTN=5, QUANT_BITS_MLP=6, QUANT_BITS_EMBED=7, QUANT_BITS_OTHER=3, QUANT_CONTROL_INT8=CONTROLS_INT8, LQER_RANK=2, **ALL_Q), **overrides})
    model = randomize(T.GPT(T.ModelConfig.from_args(args)), seed)
    qstate = T.quantize_state_dict(model.state_dict(), args, None)
    qstate["skip_weights"] = model.skip_weights.detach().float()
    return model, args, qstate


CONTROLS_INT8 = "out_gate,skip_gates,attn_scale,lane_post,smear.scale"  # 2-D, 1-D, 3-D and 0-D control tensors


def assert_same_qstate(a, b):
    assert list(a) == list(b)
    for name in a:
        x, y = a[name], b[name]
        if isinstance(x, T.QuantizedTensor):
            assert isinstance(y, T.QuantizedTensor) and x.bits == y.bits and x.shape == y.shape, name
            assert torch.equal(x.q, y.q) and torch.equal(x.scale, y.scale) and x.scale.dtype == y.scale.dtype == torch.float16, name
            assert (x.correction is None) == (y.correction is None), name
            if x.correction is not None:
                for field in ("a", "a_scale", "b", "b_scale"):
                    assert torch.equal(getattr(x.correction, field), getattr(y.correction, field)), (name, field)
            assert torch.equal(x.dequantize(), y.dequantize()), name
        else:
            assert x.dtype == y.dtype and torch.equal(x, y), name


def decode_file_bytes(blob: bytes):
    return T.decode_artifact(blob[T._ARTIFACT_HEADER.size :])


@pytest.mark.parametrize("compressor", [*T.COMPRESSORS, "auto"])
def test_every_packing_round_trips_losslessly(compressor):
    model, args, qstate = sample_qstate()
    kinds = {type(v).__name__ if isinstance(v, T.QuantizedTensor) else str(v.dtype) for v in qstate.values()}
    assert kinds == {"QuantizedTensor", "torch.float16", "torch.float32"}
    assert {v.bits for v in qstate.values() if isinstance(v, T.QuantizedTensor)} == {3, 5, 6, 7, 8}
    assert sum(v.correction is not None for v in qstate.values() if isinstance(v, T.QuantizedTensor)) == 3
    layouts = itertools.product(("role", "single"), ("int8", "bitpack", "auto"), (False, True), (False, True))
    if compressor != "zstd":  # every layout once with the fast compressor; two opposite ones with the slow ones
        layouts = [("role", "auto", True, True), ("single", "int8", False, False)]
    for grouping, values, transpose, reorder in layouts:
        blob, streams = T.encode_artifact(qstate, model.cfg, T.Packing(compressor, grouping, values, transpose, "all" if reorder else ""))
        config, back = decode_file_bytes(blob)
        assert config == model.cfg
        assert_same_qstate(qstate, back)
        assert compressor == "auto" or {s.compressor for s in streams} == {compressor}
        assert grouping == "role" or [s.name for s in streams] == ["manifest", "all"]


def test_role_grouping_puts_each_kind_of_matrix_in_its_own_stream():
    model, args, qstate = sample_qstate(seed=3)
    _, streams = T.encode_artifact(qstate, model.cfg, T.Packing("zstd", "role", "int8", True, "all"))
    names = [s.name for s in streams]
    assert names[0] == "manifest"
    expected = {"control", "tok_emb", "bigram.table", "bigram.proj", "attn.c_q", "attn.c_k", "attn.c_v", "attn.proj", "mlp.fc", "mlp.proj", "scales", "row_orders", "lqer", "fp16", "fp32"}
    assert set(names[1:]) == expected and len(names) == len(set(names))
    counts = {s.name: s.numel for s in streams}
    assert counts["mlp.fc"] == sum(qstate[f"blocks.{i}.mlp.fc.weight"].q.numel() for i in range(4)), "one stream holds the matrix of every layer"
    assert counts["scales"] == 0 and counts["tok_emb"] == qstate["tok_emb.weight"].q.numel()
    _, single = T.encode_artifact(qstate, model.cfg, T.Packing("zstd", "single", "int8", True, "all"))
    assert [s.name for s in single] == ["manifest", "all"] and single[1].numel == sum(counts.values())


def test_small_tensors_stay_in_fp16():
    model, args, qstate = sample_qstate(QUANT_FLOAT_MAX_NUMEL=65536)  # the default: block matrices stay fp16
    assert any(v.dtype == torch.float16 for v in qstate.values() if not isinstance(v, T.QuantizedTensor))
    for grouping in ("role", "single"):
        assert_same_qstate(qstate, decode_file_bytes(T.encode_artifact(qstate, model.cfg, T.Packing("zstd", grouping, "auto", True, "all"))[0])[1])


def test_similarity_order_is_a_permutation_that_chains_near_rows():
    g = torch.Generator().manual_seed(0)
    centers = torch.randint(-20, 20, (6, 64), generator=g)
    rows = centers[torch.randint(0, 6, (120,), generator=g)] + torch.randint(-1, 2, (120, 64), generator=g)  # 6 clusters, shuffled
    q = rows.to(torch.int8)
    order = T.similarity_order(q)
    assert sorted(order.tolist()) == list(range(120))
    chained = q[order].float()
    step = (chained[1:] - chained[:-1]).square().sum(1)
    shuffled = (q[1:].float() - q[:-1].float()).square().sum(1)
    assert int((step > 200).sum()) <= 5 < int((shuffled > 200).sum()), "a chain leaves each cluster once; the shuffled rows jump often"


def test_int8_control_tensors_round_trip_within_half_a_step():
    model, args, qstate = sample_qstate(seed=2)
    state = model.state_dict()
    names = [n for n in state if any(c in n for c in CONTROLS_INT8.split(","))]
    assert {state[n].ndim for n in names} == {0, 1, 2, 3}
    for name in names:
        v = qstate[name]
        assert isinstance(v, T.QuantizedTensor) and v.bits == 8 and v.q.dtype == torch.int8
        back = v.dequantize()
        assert back.shape == state[name].shape
        step = v.scale.float().reshape(-1).max().item()
        assert (back - state[name]).abs().max().item() <= step / 2 * (1 + 1e-3), name
    untouched = [n for n in state if T.is_control(n) and n not in names and n != "skip_weights"]
    assert untouched and all(qstate[n].dtype == torch.float16 and torch.equal(qstate[n], state[n].half()) for n in untouched)
    fp16 = T.quantize_state_dict(state, tiny_args(QUANT_CONTROL_INT8="", LQER_RANK=0, **ALL_Q), None)
    assert all(fp16[n].dtype == torch.float16 for n in state if T.is_control(n))
    sizes = [len(T.encode_artifact(q, model.cfg, T.Packing("zstd", "role", "int8", True, "all"))[0]) for q in (fp16, T.quantize_state_dict(state, tiny_args(QUANT_CONTROL_INT8=CONTROLS_INT8, LQER_RANK=0, **ALL_Q), None))]
    assert sizes[1] < sizes[0], f"int8 control tensors must save bytes: {sizes}"
    with pytest.raises(T.SettingsError, match="CONTROL_PARAMETER_NAMES"):
        tiny_args(QUANT_CONTROL_INT8="out_gate,tok_emb")


# ----------------------------------------------------------------------------- low-rank error correction (LQER)


def test_lqer_reduces_the_error_of_the_worst_tensors_and_is_applied_on_reload(tmp_path, trained_tiny):
    model, _, _ = trained_tiny
    state = model.state_dict()
    base = dict(QUANT_BITS_ATTN=3, QUANT_BITS_MLP=3, QUANT_BITS_EMBED=4, GPTQ_ENABLED=0, **ALL_Q)
    plain = T.quantize_state_dict(state, tiny_args(LQER_RANK=0, **base), None)
    lines = []
    corrected = T.quantize_state_dict(state, tiny_args(LQER_RANK=4, LQER_TOP_K=3, LQER_A_BITS=2, LQER_B_BITS=4, LQER_GROUP=8, **base), None, lines.append)
    errors = {n: torch.linalg.norm(state[n].float() - v.dequantize()).item() for n, v in plain.items() if isinstance(v, T.QuantizedTensor) and not T.is_control(n)}
    worst = sorted(errors, key=errors.get, reverse=True)[:3]
    assert [n for n, v in corrected.items() if isinstance(v, T.QuantizedTensor) and v.correction is not None] == [n for n in state if n in worst]
    assert len(lines) == 3 and all(line.startswith("lqer ") for line in lines)
    for name in worst:
        c = corrected[name].correction
        assert torch.equal(corrected[name].q, plain[name].q), "the correction is added on top; the values stay"
        assert c.a.shape == (state[name].size(0), 4) and c.b.shape == (4, state[name].size(1))
        assert -2 <= int(c.a.min()) and int(c.a.max()) <= 1 and -8 <= int(c.b.min()) and int(c.b.max()) <= 7  # the grids [-2, 1] and [-8, 7]
        assert c.b_scale.shape == (4, -(-state[name].size(1) // 8))
        after = torch.linalg.norm(state[name].float() - corrected[name].dequantize()).item()
        assert after < 0.97 * errors[name], (name, errors[name], after)
    path = tmp_path / "lqer.pgz"
    T.write_artifact(corrected, model.cfg, tiny_args(LQER_RANK=4, **base), path, 0, lambda line: None)
    reloaded = T.load_model_from_artifact(path, torch.device("cpu")).state_dict()
    for name in worst:
        assert torch.equal(reloaded[name], corrected[name].dequantize()), "the reload must apply the correction"
        assert not torch.equal(reloaded[name], plain[name].dequantize())


def test_lqer_clip_search_fits_the_error_at_least_as_well_as_the_records_max_clip():
    """LQER_A_CLIP_SEARCH: A's grid ends at the best of a few fractions of max |A| (1 = the record's clip is
    one of them), so ||E - A B|| never grows, and shrinks where A's columns differ in scale (U S)."""
    g = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(96, 4, generator=g)).Q
    err = u * torch.tensor([20.0, 4.0, 2.0, 1.0]) @ torch.randn(4, 128, generator=g) / 10 + 0.01 * torch.randn(96, 128, generator=g)
    plain, searched = (T.low_rank_correction(err, 4, 2, 4, 64, clip_search) for clip_search in (False, True))
    assert torch.equal(plain.b, searched.b) and torch.equal(plain.b_scale, searched.b_scale), "the search moves A's scale only"
    a_float = (lambda usv: usv[0][:, :4] * usv[1][:4])(torch.linalg.svd(err, full_matrices=False))
    assert plain.a_scale.item() == (a_float.abs().max() / 1.5).half().item()
    assert searched.a_scale.item() < plain.a_scale.item()
    miss = [torch.linalg.norm(err - c.delta()).item() for c in (plain, searched)]
    assert miss[1] < 0.9 * miss[0], miss
    for bits in (2, 3):
        w = heavy_tailed(rows=64, cols=128, seed=bits)
        e = w - T.quantize_with_scale(w, T.row_scales(w, bits, "sdclip", 3.0), bits).float() * T.row_scales(w, bits, "sdclip", 3.0)
        off, on = (torch.linalg.norm(e - T.low_rank_correction(e, 4, 2, 4, 64, flag).delta()).item() for flag in (False, True))
        assert on <= off * (1 + 1e-6)


# ----------------------------------------------------------------------------- the artifact file


def float_model_from_qstate(cfg, qstate):
    m = T.GPT(cfg)
    m.load_state_dict(T.dequantize_state_dict(qstate))
    return m


@pytest.mark.parametrize("compressor", [*T.COMPRESSORS, "auto"])
def test_artifact_reloads_to_identical_logits(tmp_path, compressor):
    model, args, qstate = sample_qstate(seed=5, ARTIFACT_COMPRESSOR=compressor)
    path = tmp_path / "model.pgz"
    lines = []
    report, streams, timings = T.write_artifact(qstate, model.cfg, args, path, 1000, lines.append)
    assert timings["prune_frac"] == 0.0 and report.fits and report.code_bytes == 1000
    assert {s.compressor for s in streams} <= ({compressor} if compressor != "auto" else set(T.COMPRESSORS))
    assert sum(s.bytes for s in streams) + T._STREAM_HEADER.size * len(streams) + T._ARTIFACT_HEADER.size == report.artifact_bytes == os.path.getsize(path)
    loaded = T.load_model_from_artifact(path, torch.device("cpu"))
    direct = float_model_from_qstate(model.cfg, qstate)
    x = torch.randint(0, 64, (3, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b, orig = loaded(x), direct(x), model(x)
    assert torch.equal(a, b), "artifact reload must reproduce the dequantized model bit for bit"
    assert not torch.equal(a, orig), "quantization did not change anything; the test is vacuous"
    assert_same_qstate(qstate, T.read_artifact(path)[1])


def test_auto_keeps_the_smallest_compressor_and_layout_of_each_stream():
    model, args, qstate = sample_qstate(seed=6, QUANT_BITS_ATTN=3)
    fixed = {}
    for c in T.COMPRESSORS:
        for values in ("int8", "bitpack"):
            fixed[c, values] = {s.name: s.bytes for s in T.encode_artifact(qstate, model.cfg, T.Packing(c, "role", values, True, ""))[1]}
    blob, streams = T.encode_artifact(qstate, model.cfg, T.Packing("auto", "role", "auto", True, ""))
    for s in streams:
        sizes = {key: found[s.name] for key, found in fixed.items()}
        assert s.bytes == min(sizes.values()), (s.name, s.bytes, sizes)
        assert sizes[s.compressor, s.values if s.values != "raw" else "int8"] == s.bytes
    assert len(set(fixed[c, "int8"]["mlp.fc"] for c in T.COMPRESSORS)) == len(T.COMPRESSORS), "the compressors must differ for the choice to mean something"
    totals = {key: sum(v.values()) for key, v in fixed.items()}
    assert sum(s.bytes for s in streams) <= min(totals.values())


def test_a_missing_compressor_module_is_named_when_reading(tmp_path, monkeypatch):
    model, args, qstate = sample_qstate(seed=7, ARTIFACT_COMPRESSOR="zpaq")
    path = tmp_path / "zpaq.pgz"
    T.write_artifact(qstate, model.cfg, args, path, 0, lambda line: None)
    monkeypatch.setattr(T, "compressor_installed", lambda c: c != "zpaq")
    with pytest.raises(T.ArtifactError, match="pip install zpaq"):
        T.read_artifact(path)
    assert "zpaq" not in T.Packing("auto", "role", "int8", True, "all").compressors, "auto uses only the installed compressors"


@pytest.fixture
def good_artifact(tmp_path):
    model, args, qstate = sample_qstate(seed=6)
    path = tmp_path / "good.pgz"
    T.write_artifact(qstate, model.cfg, args, path, 0, lambda line: None)
    return path, model.cfg, qstate


def _header(payload: bytes, version=T.ARTIFACT_FORMAT_VERSION, magic=T.ARTIFACT_MAGIC) -> bytes:
    return T._ARTIFACT_HEADER.pack(magic, version, len(payload), zlib.crc32(payload)) + payload


def _stream(data: bytes, compressor="zstd") -> bytes:
    blob = T.compress(data, compressor)
    return T._STREAM_HEADER.pack(T.COMPRESSORS.index(compressor), len(blob)) + blob


def _streams_of(data: bytes) -> list[bytes]:
    """The decompressed streams of a good file."""
    return T._read_streams(data[T._ARTIFACT_HEADER.size :])


def corrupt(kind: str, data: bytes, cfg, qstate) -> bytes | None:
    h = T._ARTIFACT_HEADER.size
    if kind == "missing":
        return None
    if kind == "empty":
        return b""
    if kind == "header_only_part":
        return data[:7]
    if kind == "truncated":
        return data[: len(data) - 17]
    if kind == "padded":
        return data + b"\0"
    if kind == "flipped_payload_byte":
        b = bytearray(data)
        b[h + (len(data) - h) // 2] ^= 0x40
        return bytes(b)
    if kind == "wrong_magic":
        return b"PK\x03\x04" + data[4:]
    if kind == "format_1":  # a file of the one-stream format before this one
        payload = T.compress(b"old", "zstd")
        return struct.pack("<4sBBII", T.ARTIFACT_MAGIC, 1, 0, len(payload), zlib.crc32(payload)) + payload
    if kind == "unknown_version":
        return data[:4] + bytes([T.ARTIFACT_FORMAT_VERSION + 1]) + data[5:]
    if kind == "unknown_compressor":
        payload = bytearray(data[h:])
        payload[0] = len(T.COMPRESSORS)
        return _header(bytes(payload))
    if kind == "garbage_stream_good_crc":
        return _header(T._STREAM_HEADER.pack(0, 60) + b"not a zstd frame at all" * 3)
    if kind == "stream_header_cut":
        return _header(_stream(b"{}") + b"\x00\x01")
    if kind == "bad_manifest":
        return _header(_stream(b'{"config"' + b"\0" * 10))
    if kind == "stream_length_mismatch":
        manifest, *streams = _streams_of(data)
        return _header(_stream(manifest) + b"".join(_stream(s) for s in streams[:-1]) + _stream(streams[-1] + b"extra"))
    if kind == "missing_stream":
        manifest, *streams = _streams_of(data)
        return _header(_stream(manifest) + b"".join(_stream(s) for s in streams[:-1]))
    raise AssertionError(kind)


CORRUPTIONS = {  # what the message says is wrong, then what to do
    "missing": "does not exist; train one first",
    "empty": "too short.*copy it again",
    "header_only_part": "too short.*copy it again",
    "truncated": "truncated.*copy it again",
    "padded": "padded.*copy it again",
    "flipped_payload_byte": "checksum mismatch",
    "wrong_magic": "bad magic.*give EVAL_ONLY the .pgz file a training run wrote",
    "format_1": r"artifact format 1, this script reads format 2: evaluate it with the train_gpt.py that wrote it",
    "unknown_version": r"artifact format 3, this script reads format 2",
    "unknown_compressor": r"compressor id 4",
    "garbage_stream_good_crc": "cannot decode",
    "stream_header_cut": "stream header is cut off",
    "bad_manifest": "cannot decode",
    "stream_length_mismatch": "the manifest says",
    "missing_stream": "the file holds",
}


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_corrupt_artifacts_fail_with_a_clear_artifact_error(good_artifact, tmp_path, kind):
    path, cfg, qstate = good_artifact
    assert_same_qstate(qstate, T.read_artifact(path)[1])  # the intact file reads
    bad = tmp_path / "damaged.pgz"
    data = corrupt(kind, path.read_bytes(), cfg, qstate)
    if data is not None:
        bad.write_bytes(data)
    for reader in (T.read_artifact, lambda p: T.load_model_from_artifact(p, torch.device("cpu"))):
        with pytest.raises(T.ArtifactError) as info:
            reader(bad)
        message = str(info.value)
        assert str(bad) in message, "the message must name the file"
        assert "\n" not in message
        assert re.search(CORRUPTIONS[kind], message.replace(str(bad), "<file>")), message


# ----------------------------------------------------------------------------- size accounting and the cap


def test_size_report_matches_the_bytes_on_disk(tmp_path):
    model, args, qstate = sample_qstate(seed=7)
    path = tmp_path / "sub" / "model.pgz"
    report, _, _ = T.write_artifact(qstate, model.cfg, args, path, 31_999, lambda line: None)
    assert report.artifact_bytes == os.path.getsize(path)
    assert report.code_bytes == 31_999 and report.total_bytes == report.code_bytes + report.artifact_bytes
    assert report.cap_bytes == 16_000_000 and report.fits
    assert not [p for p in path.parent.iterdir() if p.name != "model.pgz"], "no temporary file left behind"
    assert T.SizeReport(10, 6, 16).fits and not T.SizeReport(10, 7, 16).fits  # the cap is inclusive, in bytes


CODE_BYTES = 40_000


def quantize_and_write(tmp_path, name, **overrides):
    model = tiny_model(seed=8)
    args = tiny_args(GPTQ_ENABLED=0, ARTIFACT_COMPRESSOR="zstd", **{**ALL_Q, **overrides})
    lines = []
    path = tmp_path / name
    report = T.quantize_and_write(model, None, args, T.Runtime(), lines.append, path, T.quantization_scheme(args), CODE_BYTES)
    return report, lines, path


def test_over_the_cap_is_flagged_and_the_file_kept(tmp_path):
    report, lines, path = quantize_and_write(tmp_path, "over.pgz", SIZE_CAP_BYTES=50_000, QUANT_FIT_TO_CAP=0)
    assert not report.fits and report.total_bytes > 50_000 and report.code_bytes == CODE_BYTES
    assert path.is_file() and os.path.getsize(path) == report.artifact_bytes
    assert any("NOT a valid submission" in line for line in lines), lines
    assert f"size_check total_bytes:{report.total_bytes} cap_bytes:50000 fits:no" in lines
    assert not any(line.startswith("fit_to_cap") for line in lines)
    assert f"Serialized model int6_zstd: {report.artifact_bytes} bytes" in lines and f"Code size: {CODE_BYTES} bytes" in lines
    streams = [line for line in lines if line.startswith("artifact_stream ")]
    assert sum(int(re.search(r" bytes:(\d+)", line).group(1)) for line in streams) + T._STREAM_HEADER.size * len(streams) + T._ARTIFACT_HEADER.size == report.artifact_bytes
    assert any(line.startswith("artifact_stream mlp.fc ") and "bits_per_value:" in line for line in streams)
    T.read_artifact(path)


def test_fit_to_cap_prunes_until_the_artifact_fits(tmp_path):
    free, _, free_path = quantize_and_write(tmp_path, "free.pgz")
    assert free.fits
    cap = free.code_bytes + int(0.85 * free.artifact_bytes)
    report, lines, path = quantize_and_write(tmp_path, "fit.pgz", SIZE_CAP_BYTES=cap)
    assert report.fits and report.total_bytes <= cap and report.artifact_bytes == os.path.getsize(path)
    assert any(line.startswith("fit_to_cap: pruned") for line in lines), lines
    assert not any("NOT a valid submission" in line for line in lines)
    prune = float(re.search(r"fit_prune:([0-9.]+)", next(l for l in lines if l.startswith("quant_stages"))).group(1))
    assert 0 < prune <= 0.5

    def zeros(p):
        q = [v.q for v in T.read_artifact(p)[1].values() if isinstance(v, T.QuantizedTensor)]
        return sum(int((x == 0).sum()) for x in q) / sum(x.numel() for x in q)

    assert zeros(path) >= zeros(free_path) + prune - 0.01, "the pruned fraction must be on top of the values already zero"
    # An unreachable cap: pruning stops at half the weights and the run is flagged, file kept.
    report, lines, path = quantize_and_write(tmp_path, "hopeless.pgz", SIZE_CAP_BYTES=1000)
    assert not report.fits and path.is_file()
    assert any("NOT a valid submission" in line for line in lines)
    assert "fit_prune:0.500" in next(l for l in lines if l.startswith("quant_stages"))


# ----------------------------------------------------------------------------- EMA and SWA


class OneWeight(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([0.0]))


def run_averager(values, lr_muls, **kw):
    m = OneWeight()
    avg = T.WeightAverager(m, **kw)
    for step, (v, lr) in enumerate(zip(values, lr_muls)):
        with torch.no_grad():
            m.w.fill_(v)  # the "optimizer step": the live weight changes in place
        avg.update(step, lr)
    return m, avg


def test_ema_matches_the_closed_form():
    values = [1.0, 3.0, -2.0, 5.0, 0.5, 4.0, 7.0]
    d = 0.8
    m, avg = run_averager(values, [1.0] * len(values), ema_decay=d, swa_enabled=False, swa_every=1, swa_start_frac=0.5)
    n = len(values)
    closed = d**n * 0.0 + sum((1 - d) * d ** (n - 1 - k) * v for k, v in enumerate(values))
    kind, weights = avg.export()
    assert kind == "ema"
    assert weights["w"].item() == pytest.approx(closed, rel=1e-6)
    assert m.w.item() == values[-1], "export must not touch the live weights"


def test_swa_averages_the_snapshots_it_should_take():
    values = [float(v) for v in range(1, 21)]
    lr_muls = [1.0 - i / 20 for i in range(20)]  # below 0.5 from step 11 on
    every, start = 3, 0.5
    _, avg = run_averager(values, lr_muls, ema_decay=0.9, swa_enabled=True, swa_every=every, swa_start_frac=start)
    taken = [v for step, (v, lr) in enumerate(zip(values, lr_muls)) if lr < start and step % every == 0]
    assert taken == [13.0, 16.0, 19.0]  # steps 12, 15, 18
    kind, weights = avg.export()
    assert kind == "swa" and avg.swa_count == 3
    assert weights["w"].item() == pytest.approx(np.mean(taken))


def test_export_priority_swa_over_ema_over_raw():
    values, late = [2.0, 4.0, 6.0], [0.1, 0.1, 0.1]
    assert run_averager(values, late, ema_decay=0.5, swa_enabled=True, swa_every=1, swa_start_frac=0.5)[1].export()[0] == "swa"
    # SWA on but no snapshot taken yet (LR still high): the EMA is exported
    assert run_averager(values, [1.0] * 3, ema_decay=0.5, swa_enabled=True, swa_every=1, swa_start_frac=0.5)[1].export()[0] == "ema"
    assert run_averager(values, late, ema_decay=0.5, swa_enabled=False, swa_every=1, swa_start_frac=0.5)[1].export()[0] == "ema"
    m, avg = run_averager(values, late, ema_decay=0.0, swa_enabled=False, swa_every=1, swa_start_frac=0.5)
    kind, weights = avg.export()
    assert kind == "raw" and weights["w"].item() == 6.0
    with torch.no_grad():
        m.w.fill_(-1.0)
    assert weights["w"].item() == 6.0, "the raw export must be a copy, not the live tensor"


# ----------------------------------------------------------------------------- QAT under torch.compile


def test_qat_switch_is_seen_by_a_compiled_model_without_recompiling():
    from torch._dynamo.utils import counters

    model = tiny_model(seed=9, NUM_LAYERS=2, NUM_LOOPS=0, QAT_START=0.15)
    model.requires_grad_(False)
    x = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(2))
    eager_off = model(x)
    model.set_qat(True)
    eager_on = model(x)
    model.set_qat(False)
    assert not torch.equal(eager_off, eager_on), "QAT changes nothing even uncompiled; the test is vacuous"
    torch._dynamo.reset()
    counters.clear()
    # aot_eager: dynamo + AOTAutograd tracing as on the GPU, without inductor's C++ build (about a minute on 2 CPU cores)
    compiled = torch.compile(model, backend="aot_eager", dynamic=False)
    off = compiled(x)
    graphs = counters["stats"]["unique_graphs"]
    model.set_qat(True)
    on = compiled(x)
    assert not torch.equal(off, on), "set_qat(True) was not seen by the compiled graph"
    assert torch.equal(on, eager_on) and torch.equal(off, eager_off)
    assert counters["stats"]["unique_graphs"] == graphs, "the buffer switch must not force a recompile"
    model.set_qat(False)
    assert torch.equal(compiled(x), eager_off)
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- end to end


def tiny_script_runner(synthetic_data, tmp_path):
    """f(script=train_gpt.py, **env) runs a script on the synthetic shards with the sp1024 tokenizer (TTT off), returns its stdout."""
    if not SP1024.is_file():
        pytest.skip("../shared/data is not beside the repository")
    env = {k: v for k, v in os.environ.items() if not re.match(r"(TTT|QUANT|GPTQ|EVAL|ARTIFACT|SIZE|SWA|EMA|QAT|LQER|CODE)_", k)}
    env.update({k: str(v) for k, v in TINY.items()})
    env.update(
        DATA_PATH=str(synthetic_data), TOKENIZER_PATH=str(SP1024), VOCAB_SIZE="1024", ITERATIONS="3", TRAIN_LOG_EVERY="0",
        LOG_DIR=str(tmp_path / "logs"), RUN_ID="e2e", ARTIFACT_PATH=str(tmp_path / "run" / "model.pgz"), VAL_MAX_TOKENS="600", TTT_ENABLED="0",
        QUANT_BITS_ATTN="5", QUANT_BITS_MLP="5", OMP_NUM_THREADS="1",
    )

    def run(script=REPO / "train_gpt.py", **extra):
        r = subprocess.run([sys.executable, str(script)], env={**env, **extra}, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return r.stdout

    return run


def test_end_to_end_run_and_eval_only_rescore_identically(synthetic_data, tmp_path):
    """Train, then re-score the artifact with EVAL_ONLY twice: by train_gpt.py and by the shipped wrapper the
    run wrote beside its log, whose exact size is the logged code size."""
    run = tiny_script_runner(synthetic_data, tmp_path)
    artifact = tmp_path / "run" / "model.pgz"
    train = run()
    assert artifact.is_file()
    size = int(re.search(r"Serialized model int5_auto: (\d+) bytes", train).group(1))
    assert size == os.path.getsize(artifact)
    assert "gptq_calibration source:train" in train and "quant_stages quantize_gptq" in train
    assert "submission_valid:yes" in train
    shipped = tmp_path / "logs" / "e2e.train_gpt.py"
    logged = re.search(r"^shipped_code file:e2e.train_gpt.py bytes:(\d+) sha256:([0-9a-f]{64})$", train, re.M)
    code = int(re.search(r"^Code size: (\d+) bytes$", train, re.M).group(1))
    assert logged and int(logged.group(1)) == code == os.path.getsize(shipped)
    assert logged.group(2) == hashlib.sha256(shipped.read_bytes()).hexdigest()
    assert f"Total submission size int5_auto: {size + code} bytes" in train
    assert code < os.path.getsize(REPO / "train_gpt.py") / 3, "the shipped file is the compressed source"
    rescored = run(EVAL_ONLY=str(artifact), RUN_ID="e2e_eval")
    assert "eval_only artifact:" in rescored and "model_params" not in rescored  # no training
    by_wrapper = run(script=shipped, EVAL_ONLY=str(artifact), RUN_ID="e2e_shipped")
    assert (tmp_path / "logs" / "e2e_shipped.train_gpt.py").read_bytes() == shipped.read_bytes(), "a wrapper ships itself"
    for label in ("roundtrip", "sliding_window"):
        pattern = rf"^final_int5_auto_{label}_exact val_loss:\S+ val_bpb:\S+$"
        a, b, c = (re.findall(pattern, out, re.M) for out in (train, rescored, by_wrapper))
        assert len(a) == 1 and a == b == c, (label, a, b, c)


def test_end_to_end_self_calibration(synthetic_data, tmp_path):
    run = tiny_script_runner(synthetic_data, tmp_path)
    out = run(GPTQ_CALIBRATION="self", GPTQ_CALIB_SEQS="3", EVAL_STRIDE="0")
    assert re.search(r"^gptq_calibration source:self seqs:3 time:\d+ms$", out, re.M), out[-3000:]
    assert "source:train" not in out, "self calibration must not also read training batches"
    assert "quant_stages quantize_gptq" in out and "submission_valid:yes" in out
    assert (tmp_path / "run" / "model.pgz").is_file()


def test_gptq_knobs_act_order_block_size_and_damping(trained_tiny):
    """GPTQ_BLOCK_SIZE only groups the lazy updates (same result); GPTQ_ACT_ORDER changes the column
    order (different result); GPTQ_DAMP pulls the result towards round-to-nearest."""
    model, calib, _ = trained_tiny
    name = "blocks.0.mlp.fc.weight"
    H = T.collect_hessians(model, calib, T.Runtime())[name]
    w = model.state_dict()[name].float()
    scale = T.row_scales(w, 4, "search", 4.0)
    base = T.gptq_quantize(w, H, scale, 4, 128, 0.01, True)
    small_blocks = T.gptq_quantize(w, H, scale, 4, 8, 0.01, True)
    assert (base != small_blocks).float().mean() < 0.01  # equal up to float rounding at a few grid boundaries
    assert (base != T.gptq_quantize(w, H, scale, 4, 128, 0.01, False)).any()
    rtn = T.quantize_with_scale(w, scale, 4)
    heavy_damp = T.gptq_quantize(w, H, scale, 4, 128, 1e4, True)
    assert (heavy_damp != rtn).float().mean() < (base != rtn).float().mean()
