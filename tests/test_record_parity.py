"""Parity with the 1.0611 record's own code (../shared/fixtures/record_1855/train_gpt.py, imported on
a CPU by record_oracle): its GPT built from its logged settings at a tiny width, the same weights in
ours, then the same logits, loss and gradients in fp32; the same optimizer groups; and, from the same
gradients, the same clipped AdamW and Muon steps. Skipped when ../shared is not beside the repository."""

import inspect

import pytest
import torch

import record_oracle as ro
import train_gpt

# Only the widths shrink; every other setting is the record's logged one (11 blocks, blocks 3-5 looped
# twice more, parallel lanes from block 8, XSA on all blocks, partial RoPE on 16 of 32 dims, the
# sparse attention gate and SmearGate on 12 dims, skip gates, q gain 5, softcap 30, tied embeddings).
TINY = dict(vocab_size=64, model_dim=128, num_heads=4, num_kv_heads=2)
T = 48


@pytest.fixture(autouse=True)
def _needs_the_record():
    ro.require()


def record_and_ours(isolate: bool = False, seed: int = 0, **ours_overrides):
    """The record's GPT with every weight moved off its init (so every gate and zero-init projection
    acts), and ours from the same settings holding the same weights."""
    h = ro.record_hparams(**TINY)
    torch.manual_seed(seed)
    record = ro.build_record_model(h)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in record.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    args = train_gpt.Hyperparameters(ro.our_env(h, DOC_ISOLATION=int(isolate), **ours_overrides))
    ours = train_gpt.GPT(train_gpt.ModelConfig.from_args(args))
    ro.copy_record_weights(record, ours, strict=not ours_overrides)
    return h, record, ours, args


def tokens(batch: int, seed: int = 1) -> torch.Tensor:
    """Random tokens with documents: BOS at the start of row 0 and inside every row; row 1 starts mid-document."""
    idx = torch.randint(2, TINY["vocab_size"], (batch, T), generator=torch.Generator().manual_seed(seed))
    idx[:, [11, 30]] = train_gpt.BOS_ID
    idx[0, 0] = train_gpt.BOS_ID
    return idx


def record_logits(h, record, idx: torch.Tensor, isolate: bool) -> torch.Tensor:
    if not isolate:
        return record.forward_logits(idx)
    assert idx.size(0) == 1, "the record packs documents into one row"
    starts = (idx[0] == train_gpt.BOS_ID).nonzero().flatten().tolist()
    cu, max_len = ro.record_module()._build_cu_seqlens(starts, idx.size(1), idx.device, h.train_seq_len)
    return record.forward_logits(idx, cu_seqlens=cu, max_seqlen=max_len)


# ----------------------------------------------------------------------------- the model


@pytest.mark.parametrize("looping", [False, True], ids=["recurrence_off", "recurrence_on"])
@pytest.mark.parametrize("isolate", [False, True], ids=["causal", "documents"])
def test_same_weights_and_tokens_give_the_records_logits(looping, isolate):
    h, record, ours, _ = record_and_ours(isolate)
    record.eval(), ours.eval()
    record.looping_active, ours.looping = looping, looping
    idx = tokens(1 if isolate else 2)
    with torch.no_grad():
        expected = record_logits(h, record, idx, isolate)
        got = ours(idx)
    assert expected.abs().max() > 1.0, "logits of a model that does something"
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("looping", [False, True], ids=["recurrence_off", "recurrence_on"])
def test_same_weights_and_tokens_give_the_records_loss_and_gradients(looping):
    """In training mode: the record's fused MLP (its own autograd Function) and its eager
    softcapped cross-entropy against our one forward."""
    h, record, ours, _ = record_and_ours(isolate=True)
    record.train(), ours.train()
    record.looping_active, ours.looping = looping, looping
    idx = tokens(1, seed=2)
    x, y = idx[:, :-1], idx[:, 1:]
    starts = (x[0] == train_gpt.BOS_ID).nonzero().flatten().tolist()
    cu, max_len = ro.record_module()._build_cu_seqlens(starts, x.size(1), x.device, h.train_seq_len)
    expected = record(x, y, cu_seqlens=cu, max_seqlen=max_len)
    got = ours(x, y)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    expected.backward()
    got.backward()
    theirs = ro.record_tensors(record, grads=True)
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, theirs[name].reshape(p.shape), rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("knockout", [
    dict(SMEAR_GATE=0), dict(ATTN_GATE=0), dict(XSA_LAST_N=0), dict(PARALLEL_RESIDUAL_START=-1), dict(SKIP_GATES=0),
    dict(LN_SCALE=0), dict(ROPE_DIMS=0), dict(PARALLEL_RESIDUAL_START=9),
], ids=lambda d: "_".join(f"{k}={v}" for k, v in d.items()))
def test_each_record_feature_is_seen_by_the_comparison(knockout):
    """The parity above has power: our model without one of the record's features (the weights it
    still has copied) no longer gives the record's logits."""
    h, record, ours, _ = record_and_ours(**knockout)
    record.eval(), ours.eval()
    idx = tokens(2)
    with torch.no_grad():
        assert (ours(idx) - record.forward_logits(idx)).abs().max() > 1e-3


def init_form(t: torch.Tensor) -> str:
    """What an init looks like: zeros, a constant, a (semi-)orthogonal matrix, or random (its std)."""
    t = t.detach().double()
    if t.eq(0).all():
        return "zeros"
    if t.eq(t.flatten()[0]).all():
        return f"constant {float(t.flatten()[0]):.4g}"
    if t.ndim == 2:
        w = t if t.size(0) <= t.size(1) else t.T
        if torch.allclose(w @ w.T, torch.eye(w.size(0), dtype=w.dtype), atol=2e-2):
            return "orthogonal"
    return f"random std {float(t.std()):.1g}"


def test_fresh_weights_have_the_records_init():
    """Orthogonal Q, K, V and MLP-up, zero O and MLP-down, embedding std 0.005, gates zero, lane
    weights 1.1 / 1, skip weights 1, resid_mix (1, 0), q gain 5: tensor by tensor as the record's."""
    h = ro.record_hparams(**TINY)
    record = ro.build_record_model(h)
    ours = train_gpt.GPT(train_gpt.ModelConfig.from_args(train_gpt.Hyperparameters(ro.our_env(h))))
    theirs = ro.record_tensors(record)
    forms = {}
    for name, p in ours.named_parameters():
        t = theirs[name].reshape(p.shape)
        if name == "blocks.0.resid_mix":
            assert torch.equal(p, t) and p[0].eq(1).all() and p[1].eq(0).all()
        elif name.endswith("resid_mix"):
            assert torch.equal(p, t), name
        else:
            forms[name] = (init_form(p), init_form(t))
    assert {n: f for n, f in forms.items() if f[0] != f[1]} == {}
    assert forms["tok_emb.weight"][0] == "random std 0.005"
    assert forms["blocks.0.attn.c_k.weight"][0] == "orthogonal" and forms["blocks.0.mlp.proj.weight"][0] == "zeros"


# ----------------------------------------------------------------------------- the optimizer


def _owner(record) -> dict[str, str]:
    """Our parameter name -> the name of the record's parameter that holds it (a bank for the matrices)."""
    storage = {p.untyped_storage().data_ptr(): n for n, p in record.named_parameters()}
    return {ours: storage[t.untyped_storage().data_ptr()] for ours, t in ro.record_tensors(record).items()}


def test_optimizer_groups_are_the_records():
    """Same parameters in each group, and per group the same lr, betas, eps and weight decay (Muon:
    lr, momentum, Newton-Schulz steps, Nesterov, weight decay, row normalization)."""
    h, record, ours, args = record_and_ours()
    record_opts = ro.build_record_optimizers(h, record)
    our_opts = train_gpt.build_optimizers(ours, args, train_gpt.Runtime())
    owner = _owner(record)
    record_name = {id(p): n for n, p in record.named_parameters()}
    our_name = {id(p): n for n, p in ours.named_parameters()}
    keys = ("lr", "betas", "eps", "weight_decay", "momentum", "backend_steps", "nesterov")
    mine = {}
    for opt in our_opts:
        for g in opt.param_groups:
            names = frozenset(our_name[id(p)] for p in g["params"])
            mine[names] = {k: g[k] for k in keys if k in g}
            if isinstance(opt, train_gpt.Muon):
                mine[names]["row_normalize"] = opt.row_normalize
    assert len(mine) == 3
    for opt in record_opts.optimizers:
        for g in opt.param_groups:
            held = {record_name[id(p)] for p in g["params"]}
            names = frozenset(n for n, o in owner.items() if o in held)
            assert names in mine, f"no group of ours holds exactly {sorted(names)}"
            expected = {k: g[k] for k in keys + ("row_normalize",) if k in g}
            assert mine[names] == pytest.approx(expected), sorted(names)[:3]


def _set_schedule(record_opts, our_opts, momentum: float, lr_mul: float):
    for opt in list(record_opts.optimizers) + list(our_opts):
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * lr_mul
            if "momentum" in g:
                g["momentum"] = momentum


def record_gradients(h, record, seed: int, norm: float):
    """Gradients of the record's loss on one packed row of documents, scaled to a total norm `norm`."""
    idx = tokens(1, seed=seed)
    starts = (idx[0, :-1] == train_gpt.BOS_ID).nonzero().flatten().tolist()
    cu, max_len = ro.record_module()._build_cu_seqlens(starts, T - 1, idx.device, h.train_seq_len)
    record.zero_grad(set_to_none=True)
    record(idx[:, :-1], idx[:, 1:], cu_seqlens=cu, max_seqlen=max_len).backward()
    grads = [p.grad for p in record.parameters()]
    torch._foreach_mul_(grads, norm / torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


def optimizers_of_both(muon_dtype=torch.bfloat16):
    h, record, ours, args = record_and_ours(isolate=True)
    record.looping_active = ours.looping = True
    our_opts = train_gpt.build_optimizers(ours, args, train_gpt.Runtime())
    muon = next(o for o in our_opts if isinstance(o, train_gpt.Muon))
    muon.dtype = muon_dtype
    others = [p for p in ours.parameters() if all(p is not q for q in muon.param_groups[0]["params"])]
    return h, record, ours, args, ro.build_record_optimizers(h, record), our_opts, muon, others


def copy_gradients(record, ours):
    grads = ro.record_tensors(record, grads=True)
    for name, p in ours.named_parameters():
        p.grad = grads[name].reshape(p.shape).clone()


def test_same_gradients_give_the_records_optimizer_steps():
    """Three steps (momentum and LR changing, as in the warm-up and warm-down) from the same weights
    and gradients: the record's (clip_grad_norm_ over every parameter, then its Optimizers.step: two
    AdamW groups and Muon on the banks) against ours (reduce_and_clip_gradients, then each optimizer's
    step). Muon runs in bf16 as on GPUs (build_optimizers picks it on CUDA), and then matches bit for
    bit: bf16 Newton-Schulz is a few % from exact arithmetic (fp32 on a CPU is another result), and
    the least change of its input moves it that much, so only the record's own dtype compares, and
    the gradients stay under the clip (a clip factor computed in another order differs in its last bit)."""
    h, record, ours, args, record_opts, our_opts, muon, others = optimizers_of_both()
    for step, (momentum, lr_mul) in enumerate(((0.92, 1.0), (0.95, 0.6), (0.97, 0.3))):
        record_gradients(h, record, seed=10 + step, norm=0.2)
        copy_gradients(record, ours)
        _set_schedule(record_opts, our_opts, momentum, lr_mul)
        torch.nn.utils.clip_grad_norm_(list(record.parameters()), h.grad_clip_norm)
        ro.record_optimizer_step(record_opts)
        clip = train_gpt.reduce_and_clip_gradients(others, muon, args, train_gpt.Runtime())
        for opt in our_opts:
            opt.step(grad_scale=clip) if opt is muon else opt.step()
        ours.zero_grad(set_to_none=True)
        theirs = ro.record_tensors(record)
        for name, p in ours.named_parameters():
            exact = any(p is q for q in muon.param_groups[0]["params"])  # AdamW: fused (record) vs for-each, a last bit apart
            tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(p.detach(), theirs[name].reshape(p.shape), **tol, msg=f"step {step}: {name}")


def test_gradient_clipping_is_the_records():
    """Gradients over the clip: every gradient that reaches an optimizer, AdamW's and Muon's, is the
    record's after its clip_grad_norm_(all parameters, GRAD_CLIP_NORM)."""
    h, record, ours, args, record_opts, our_opts, muon, others = optimizers_of_both(torch.float32)
    record_gradients(h, record, seed=3, norm=7.0)
    copy_gradients(record, ours)
    torch.nn.utils.clip_grad_norm_(list(record.parameters()), h.grad_clip_norm)
    clip = train_gpt.reduce_and_clip_gradients(others, muon, args, train_gpt.Runtime())
    theirs = ro.record_tensors(record, grads=True)
    names = {id(p): n for n, p in ours.named_parameters()}
    tol = dict(rtol=2e-4, atol=1e-9)  # an fp32 norm over 2 M numbers, summed tensor by tensor (banks there, matrices here)
    for p in others:
        torch.testing.assert_close(p.grad, theirs[names[id(p)]].reshape(p.shape), **tol)
    for (_, shape), params in muon.buckets.items():
        for p, g in zip(params, muon.local_grads[(0, shape)]):
            torch.testing.assert_close(g * clip, theirs[names[id(p)]].reshape(p.shape), **tol)
    assert sum(float(g.square().sum()) for g in theirs.values()) == pytest.approx(h.grad_clip_norm**2, rel=1e-4)


def test_the_record_clips_each_ranks_gradient_and_so_do_we_by_default():
    """The record has no DDP wrapper: its step clips (clip_grad_norm_) the gradients its rank just
    computed, and only then calls Optimizers.step, which reduce-scatters and all-reduces them. Our
    default scope is that one; GRAD_CLIP_SCOPE=global clips the average instead (the same on one GPU,
    see test_optimizer for 2 processes)."""
    step = inspect.getsource(ro.record_module().train_model)
    step = step[step.index("def step_fn"):step.index("return train_loss")]
    assert "clip_grad_norm_" in step and step.index("clip_grad_norm_") < step.index("optimizers.step(")
    assert "all_reduce" in inspect.getsource(ro.record_module().Optimizers.step)
    assert "DistributedDataParallel" not in inspect.getsource(ro.record_module())
    assert train_gpt.Hyperparameters({}).grad_clip_scope == "rank"


def test_our_defaults_are_the_records_logged_settings():
    """Every setting of the model, optimizer and schedule the two scripts share: our default is the
    value the record's seed-42 log prints."""
    ours, logged = train_gpt.Hyperparameters({}), ro.logged_settings()
    differ = {theirs: (logged[theirs], getattr(ours, name.lower())) for theirs, name in ro.RECORD_TO_OURS.items()
              if logged[theirs] != getattr(ours, name.lower())}
    assert differ == {}
