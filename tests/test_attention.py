"""Attention segments and backends, the fused cross-entropy and the compiled training step, on a CPU.

FlashAttention's varlen kernels need CUDA; here a reference implementation (causal attention inside
each segment of the flattened tokens, one SDPA call per segment) stands in for them, registered as a
custom op so that torch.compile treats it as one opaque call, as it treats the real kernels."""

import inspect
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_gpt
from conftest import randomize, tiny_args, tiny_model

V = 64


def _segments(q, k, v, cu):
    out, bounds = [], sorted(set(cu.tolist()))
    for a, b in zip(bounds, bounds[1:]):
        y = F.scaled_dot_product_attention(q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1), is_causal=True, enable_gqa=True)
        out.append(y.transpose(0, 1))
    return torch.cat(out)


@torch.library.custom_op("pgtest::varlen_reference", mutates_args=())
def varlen_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int) -> torch.Tensor:
    assert max(np.diff(sorted(set(cu.tolist())))) <= max_len, "a segment longer than max_len"
    return _segments(q, k, v, cu)


@varlen_reference.register_fake
def _(q, k, v, cu, max_len):
    return torch.empty_like(q)


def _setup(ctx, inputs, output):
    q, k, v, cu, _ = inputs
    ctx.save_for_backward(q, k, v, cu)


def _backward(ctx, grad):
    q, k, v, cu = ctx.saved_tensors
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        grads = torch.autograd.grad(_segments(*leaves, cu), leaves, grad)
    return (*grads, None, None)


varlen_reference.register_autograd(_backward, setup_context=_setup)


class ReferenceFlash:
    """flash_attn / flash_attn_interface as train_gpt calls them, computed by the reference."""

    @staticmethod
    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=True):
        assert causal and cu_q is cu_k and max_q == max_k
        return varlen_reference(q, k, v, cu_q, max_q)

    @staticmethod
    def flash_attn_func(q, k, v, causal=True):
        B, T, H, D = q.shape
        cu = torch.arange(0, B * T + 1, T, dtype=torch.int32)
        flat = lambda t: t.reshape(B * T, t.size(2), D)  # noqa: E731
        return varlen_reference(flat(q), flat(k), flat(v), cu, T).view(B, T, H, D)


class ReferenceTorchVarlen:
    """torch.nn.attention.varlen of torch 2.11 (window_size, no enable_gqa): K and V must have every head."""

    @staticmethod
    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1)):
        assert window_size == (-1, 0) and key.size(1) == query.size(1), "causal, with the KV heads repeated"
        return varlen_reference(query, key, value, cu_seq_q, max_q)


@pytest.fixture
def reference_flash(monkeypatch):
    monkeypatch.setattr(train_gpt, "_flash_attention_module", lambda backend: ReferenceTorchVarlen if backend == "varlen" else ReferenceFlash)
    monkeypatch.setattr(train_gpt, "TORCH_VARLEN_OPTIONS", {"window_size": (-1, 0)})


def documents(rows=2, width=48, seed=0, bos=(0, 7, 19, 40)):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(2, V, (rows, width), generator=g)
    idx[:, [b for b in bos if b < width]] = train_gpt.BOS_ID
    idx[rows - 1, 5] = train_gpt.BOS_ID  # rows differ
    return idx


# ----------------------------------------------------------------------------- segments


def plain_starts(tokens, row_len, at_bos, max_len):
    starts, flat = [], tokens.reshape(-1)
    for p in range(flat.size):
        if p % row_len == 0 or (at_bos and flat[p] == train_gpt.BOS_ID):
            starts.append(p)
        elif max_len and p - starts[-1] == max_len:
            starts.append(p)
    return starts


@pytest.mark.parametrize("at_bos, max_len", [(True, 0), (True, 5), (False, 0), (False, 7), (True, 1)])
def test_segment_starts_follow_their_definition(at_bos, max_len):
    tokens = documents(rows=3, width=40, seed=1).numpy()
    starts = train_gpt.segment_starts(tokens, 40, at_bos, max_len)
    expected = plain_starts(tokens, 40, at_bos, max_len)
    n = tokens.size
    assert starts.dtype == np.int32 and starts.size % train_gpt.CU_SEQLENS_MULTIPLE == 0 and starts.size > len(expected)
    assert starts[: len(expected)].tolist() == expected and (starts[len(expected) :] == n).all()


def test_mask_and_offsets_describe_the_same_segments():
    tokens = documents(seed=2).numpy()
    starts = train_gpt.segment_starts(tokens, 48, True, 10)
    mask = train_gpt.layout_from_starts(starts, (2, 48), "sdpa", 10).mask[:, 0]
    bounds = sorted(set(starts.tolist()))
    for a, b in zip(bounds, bounds[1:]):
        r, i, j = a // 48, a % 48, (b - 1) % 48 + 1
        block = mask[r, i:j, i:j]
        assert torch.equal(block, torch.ones_like(block).tril()), (a, b)
        assert not mask[r, i:j, :i].any()
    assert train_gpt.layout_from_starts(starts, (2, 48), "fa2", 10).max_len == 10
    assert train_gpt.layout_from_starts(starts, (2, 48), "fa2").max_len == 48


# ----------------------------------------------------------------------------- backends


@pytest.mark.parametrize("backend", ["fa2", "fa3", "varlen"])
def test_flash_backends_give_the_mask_path_outputs(reference_flash, backend):
    """A model on each FlashAttention backend (varlen offsets, the reference kernel) gives the SDPA
    model's logits (boolean mask), documents isolated or not, looping on."""
    for isolate in (1, 0):
        sdpa = tiny_model(seed=3, DOC_ISOLATION=isolate)
        flash = train_gpt.GPT(sdpa.cfg, backend)
        flash.load_state_dict(sdpa.state_dict())
        idx = documents(seed=4)
        with torch.no_grad():
            assert torch.allclose(flash(idx), sdpa(idx), atol=1e-5), (backend, isolate)


def test_packed_training_row_scores_each_segment_as_if_alone(reference_flash):
    """A packed row (the loader's layout: cuts at each BOS and every TRAIN_SEQ_LEN) gives every token
    the loss it gets when its segment is a row of its own: no segment sees another."""
    model = tiny_model(seed=5, TRAIN_SEQ_LEN=16, SMEAR_GATE=0, BIGRAM_VOCAB_SIZE=0)  # both mix the previous token across a cut inside a document
    flash = train_gpt.GPT(model.cfg, "fa2")
    flash.load_state_dict(model.state_dict())
    x = documents(rows=1, width=96, seed=6, bos=(0, 30, 70))
    y = torch.roll(x, -1, 1)
    starts = train_gpt.segment_starts(x.numpy(), 96, True, 16)
    layout = train_gpt.layout_from_starts(starts, (1, 96), "fa2", 16)
    with torch.no_grad():
        packed = flash(x, y, layout=layout, reduction="none")[0]
        bounds = sorted(set(starts.tolist()))
        alone = torch.cat([model(x[:, a:b], y[:, a:b], layout=train_gpt.ONE_SEGMENT_PER_ROW, reduction="none")[0] for a, b in zip(bounds, bounds[1:])])
    assert torch.allclose(packed, alone, atol=1e-5)


def test_torch_varlen_options_follow_the_installed_signature(monkeypatch):
    def fake(signature):
        module = type("M", (), {})()
        module.varlen_attn = signature
        monkeypatch.setattr(train_gpt, "_flash_attention_module", lambda backend: module)
        return train_gpt._torch_varlen_options()

    assert fake(lambda query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None: 0) == {"is_causal": True}
    assert fake(lambda query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1): 0) == {"window_size": (-1, 0)}
    assert fake(lambda q, k, v, a, b, c, d, *, window_size=(-1, -1), enable_gqa=False: 0) == {"window_size": (-1, 0), "enable_gqa": True}
    if train_gpt.TORCH_VARLEN_OPTIONS is not None:  # this torch's own varlen_attn has one of these signatures
        params = inspect.signature(__import__("torch.nn.attention.varlen", fromlist=["x"]).varlen_attn).parameters
        assert set(train_gpt.TORCH_VARLEN_OPTIONS) <= set(params)


def test_auto_takes_the_first_backend_that_runs_and_a_forced_one_must_run(monkeypatch):
    cuda = torch.device("cuda", 0)
    capability = [(9, 0)]
    importable = {"fa3": False, "fa2": True}

    def module(backend):
        if not importable.get(backend, True):
            raise ImportError(f"No module named {backend}")
        return ReferenceFlash

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability[0])
    monkeypatch.setattr(train_gpt, "_flash_attention_module", module)
    monkeypatch.setattr(train_gpt, "TORCH_VARLEN_OPTIONS", {"window_size": (-1, 0)})
    select = train_gpt.select_attention_backend
    assert select("auto", cuda) == "varlen"
    importable["fa3"] = True
    assert select("auto", cuda) == "fa3"
    capability[0] = (8, 0)  # Ampere: no FlashAttention-3
    assert select("auto", cuda) == "varlen"
    monkeypatch.setattr(train_gpt, "TORCH_VARLEN_OPTIONS", None)  # torch < 2.10
    assert select("auto", cuda) == "fa2"
    with pytest.raises(train_gpt.SettingsError, match="ATTN_BACKEND=varlen cannot run: torch .* has no torch.nn.attention.varlen"):
        select("varlen", cuda)
    with pytest.raises(train_gpt.SettingsError, match="ATTN_BACKEND=fa3 cannot run: compute capability 8.x"):
        select("fa3", cuda)
    importable["fa2"] = False
    assert select("auto", cuda) == "sdpa"
    capability[0] = (7, 5)
    importable["fa2"] = True
    assert select("auto", cuda) == "sdpa"


# ----------------------------------------------------------------------------- the fused cross-entropy


@pytest.mark.parametrize("cap", [30.0, 0.0])
def test_fused_cross_entropy_equals_the_plain_one(cap):
    g = torch.Generator().manual_seed(7)
    z = (torch.randn(37, V, generator=g) * 20).requires_grad_()
    targets = torch.randint(0, V, (37,), generator=g)
    weights = torch.rand(37, generator=g)
    fused = train_gpt.SoftcappedCrossEntropy.apply(z, targets, cap)
    (fused * weights).sum().backward()
    fused_grad, z.grad = z.grad, None
    logits = cap * torch.tanh(z / cap) if cap else z
    plain = F.cross_entropy(logits, targets, reduction="none")
    (plain * weights).sum().backward()
    assert torch.allclose(fused, plain, atol=1e-5) and torch.allclose(fused_grad, z.grad, atol=1e-6)


def test_fused_cross_entropy_keeps_the_heads_dtype():
    z = torch.randn(5, V, dtype=torch.bfloat16, requires_grad=True)
    nll = train_gpt.SoftcappedCrossEntropy.apply(z, torch.arange(5), 30.0)
    nll.sum().backward()
    assert nll.dtype == torch.float32 and z.grad.dtype == torch.bfloat16


def test_model_loss_is_the_cross_entropy_of_its_logits():
    model = tiny_model(seed=8)
    idx = documents(seed=9)
    y = torch.roll(idx, -1, 1)
    with torch.no_grad():
        logits = model(idx)
        per_token = model(idx, y, reduction="none")
    assert torch.allclose(per_token, F.cross_entropy(logits.transpose(1, 2), y, reduction="none"), atol=1e-5)
    assert torch.allclose(model(idx, y), per_token.mean(), atol=1e-6)


# ----------------------------------------------------------------------------- the compiled training step


def test_training_step_is_one_graph_per_recurrence_state(reference_flash, monkeypatch, tmp_path):
    """train_model's compiled forward with fullgraph=True (any graph break raises) on the FlashAttention
    layout of the loader: one graph with recurrence off and one with it on, whatever the length of
    cu_seqlens, so nothing recompiles inside the timed loop."""
    from torch._dynamo.testing import CompileCounter

    rng = np.random.default_rng(0)
    stream = []
    for _ in range(400):  # documents of 2 to 100 tokens: cu_seqlens lengths vary between micro-batches
        stream.append(np.concatenate([[train_gpt.BOS_ID], rng.integers(2, V, int(rng.integers(1, 100)))]))
    train_gpt.write_data_shard(tmp_path / "fineweb_train_000000.bin", np.concatenate(stream).astype(np.uint16))
    counter = CompileCounter()
    monkeypatch.setattr(train_gpt, "compiled", lambda model, args, rt, **options: torch.compile(model, backend=counter, **options))
    monkeypatch.setattr(train_gpt, "CU_SEQLENS_MULTIPLE", 2)  # more distinct lengths in few steps
    lengths = []
    next_batch = train_gpt.DistributedTokenLoader.next_batch
    monkeypatch.setattr(train_gpt.DistributedTokenLoader, "next_batch", lambda self, *a: (lambda b: (lengths.append(b[2].cu_seqlens.numel()), b)[1])(next_batch(self, *a)))
    args = tiny_args(DATA_PATH=str(tmp_path), ATTN_BACKEND="fa2", ITERATIONS=4, WARMUP_STEPS=1, GPTQ_ENABLED=0, LOOP_ENABLE_FRAC=0.5,
                     TRAIN_SEQ_LEN=64, TRAIN_BATCH_TOKENS=8 * 256, EMA_DECAY=0, TRAIN_LOG_EVERY=0)
    torch._dynamo.reset()
    model = randomize(train_gpt.GPT(train_gpt.ModelConfig.from_args(args), "fa2"))
    train_gpt.train_model(model, args, train_gpt.Runtime(), lambda line: None, None)
    torch._dynamo.reset()
    assert len(set(lengths)) > 2, lengths
    assert counter.frame_count == 2, f"{counter.frame_count} graphs for cu_seqlens lengths {sorted(set(lengths))}"


# ----------------------------------------------------------------------------- evaluation graphs


def test_evaluation_compiles_in_the_warm_up_and_never_during_scoring(monkeypatch):
    """evaluate_artifact's warm-up on dummy tokens compiles every graph the paths need: scoring the
    validation stream (documents of every length, the TTT's growing windows, a lone last document,
    a phase's SGD, a short last window) then compiles nothing more."""
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    monkeypatch.setattr(train_gpt, "compiled", lambda model, args, rt, **options: torch.compile(model, backend=counter, **options))
    args = tiny_args(TTT_LR=0.05, TTT_PHASE_DOCS="3", EVAL_STRIDE=8, TTT_BATCH_SIZE=4)
    rt = train_gpt.Runtime()
    torch._dynamo.reset()
    model = tiny_model(seed=10)
    model.requires_grad_(False)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    forward = train_gpt.compile_for_eval(model, args, rt)
    tables = __import__("conftest").toy_tables(V)
    names = train_gpt.evaluation_paths(args)
    train_gpt.warm_up_paths(forward, weights, names, args, rt, tables, V, lambda line: None)
    warm = counter.frame_count
    rng = np.random.default_rng(3)
    docs = [np.concatenate([[train_gpt.BOS_ID], rng.integers(2, V, n)]) for n in (3, 70, 9, 41, 5, 120, 17, 2, 33, 64, 11)]
    tokens = torch.from_numpy(np.concatenate(docs).astype(np.int64))
    for name in names:
        ledger = train_gpt.ScoreLedger(tokens, tables)
        train_gpt.score_path(name, forward, weights, tokens, ledger, args, rt)
        ledger.result()
    torch._dynamo.reset()
    assert warm > 0 and counter.frame_count == warm, f"{counter.frame_count - warm} graphs compiled while scoring"
