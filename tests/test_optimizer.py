"""Optimizer section of train_gpt.py: Newton-Schulz / Muon, weight decay, parameter groups and the
LR schedule."""

import math
import subprocess
import sys
import textwrap

import pytest
import torch

import train_gpt
from conftest import REPO, clean_env, tiny_args, tiny_model



def singular_values(m: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(m.double())


@pytest.mark.parametrize("shape", [(64, 32), (32, 64), (48, 48)])
def test_newton_schulz_is_close_to_orthogonal(shape):
    g = torch.Generator().manual_seed(0)
    G = torch.randn(*shape, generator=g)
    if shape[0] == shape[1]:  # keep a square test matrix well conditioned
        G = G + 3 * torch.eye(shape[0])
    X = train_gpt.newton_schulz_orthogonalize(G, 5)
    assert X.shape == G.shape
    s = singular_values(X)
    assert s.min() >= 0.5 and s.max() <= 1.5, s
    # it keeps the singular vectors: X is close to U V^T of G
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    polar = U @ Vh
    cos = (X.double() * polar).sum() / (X.double().norm() * polar.norm())
    assert cos > 0.95


def test_newton_schulz_scale_invariant():
    G = torch.randn(32, 16)
    a = train_gpt.newton_schulz_orthogonalize(G, 5)
    b = train_gpt.newton_schulz_orthogonalize(G * 1000.0, 5)
    assert torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("shape", [(64, 32), (32, 64)])
def test_muon_step_applies_scaled_orthogonal_update(shape):
    g = torch.Generator().manual_seed(1)
    p = torch.nn.Parameter(torch.randn(*shape, generator=g))
    p.grad = torch.randn(*shape, generator=g)
    before = p.detach().clone()
    opt = train_gpt.Muon([p], lr=1.0, momentum=0.0, backend_steps=5, weight_decay=0.0)
    opt.step()
    update = before - p.detach()
    scale = max(1.0, shape[0] / shape[1]) ** 0.5
    s = singular_values(update / scale)
    assert s.min() >= 0.5 and s.max() <= 1.5, s
    assert torch.allclose(update, train_gpt.newton_schulz_orthogonalize(p.grad, 5) * scale, atol=1e-5)
    # descent direction: the update is positively aligned with the gradient
    assert (update * p.grad).sum() > 0


def test_muon_momentum_accumulates_with_nesterov():
    torch.manual_seed(2)
    p = torch.nn.Parameter(torch.zeros(16, 16))
    g1, g2 = torch.randn(16, 16), torch.randn(16, 16)
    opt = train_gpt.Muon([p], lr=1.0, momentum=0.9, backend_steps=5)
    p.grad = g1.clone()
    opt.step()
    after1 = p.detach().clone()
    p.grad = g2.clone()
    opt.step()
    buf = 0.9 * g1 + g2
    expected = train_gpt.newton_schulz_orthogonalize(g2 + 0.9 * buf, 5)
    assert torch.allclose(after1 - p.detach(), expected, atol=1e-5)


def test_muon_weight_decay_shrinks_by_one_minus_lr_wd():
    torch.manual_seed(3)
    p = torch.nn.Parameter(torch.randn(16, 8))
    p.grad = torch.zeros_like(p)  # a zero gradient orthogonalizes to zero: only the decay acts
    before = p.detach().clone()
    lr, wd = 0.1, 0.5
    opt = train_gpt.Muon([p], lr=lr, momentum=0.95, backend_steps=5, weight_decay=wd)
    opt.step()
    assert torch.allclose(p.detach(), before * (1 - lr * wd), atol=1e-7)
    # with a gradient: decay first, then the update
    p.grad = torch.randn(16, 8)
    before = p.detach().clone()
    opt2 = train_gpt.Muon([p], lr=lr, momentum=0.0, backend_steps=5, weight_decay=wd)
    opt2.step()
    update = train_gpt.newton_schulz_orthogonalize(p.grad, 5) * 2 ** 0.5
    assert torch.allclose(p.detach(), before * (1 - lr * wd) - lr * update, atol=1e-6)


# ----------------------------------------------------------------------------- parameter groups


@pytest.mark.parametrize("overrides", [{}, {"TIE_EMBEDDINGS": 0}, {"BIGRAM_VOCAB_SIZE": 0, "SMEAR_GATE": 0, "UNET_SKIPS": 0}])
def test_every_parameter_in_exactly_one_group(overrides):
    args = tiny_args(**overrides)
    model = tiny_model(**overrides)
    optimizers = train_gpt.build_optimizers(model, args, train_gpt.Runtime())
    seen = [p for opt in optimizers for group in opt.param_groups for p in group["params"]]
    ids = [id(p) for p in seen]
    assert len(ids) == len(set(ids)), "a parameter is in two groups"
    names = {id(p): n for n, p in model.named_parameters()}
    missing = [n for n, p in model.named_parameters() if id(p) not in set(ids)]
    assert not missing, f"parameters no optimizer updates: {missing}"
    assert set(ids) <= set(names)

    muon = [o for o in optimizers if isinstance(o, train_gpt.Muon)]
    assert len(muon) == 1
    muon_names = {names[id(p)] for g in muon[0].param_groups for p in g["params"]}
    adam_names = {names[id(p)] for o in optimizers if not isinstance(o, train_gpt.Muon) for g in o.param_groups for p in g["params"]}
    block_matrices = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, train_gpt.CastedLinear) and n.startswith("blocks.")}
    assert len(block_matrices) == 6 * args.num_layers
    assert block_matrices <= muon_names
    assert all(dict(model.named_parameters())[n].ndim == 2 for n in muon_names)
    assert all(n.endswith(".weight") and not n.startswith(("tok_emb", "lm_head", "bigram.table")) for n in muon_names)
    # embeddings, gains, gates and scales go to Adam
    assert "tok_emb.weight" in adam_names
    for n, p in model.named_parameters():
        if p.ndim < 2 or any(c in n for c in train_gpt.CONTROL_PARAMETER_NAMES) or n.startswith(("tok_emb", "lm_head", "bigram.table")):
            assert n in adam_names, n
    if model.lm_head is not None:
        assert "lm_head.weight" in adam_names
    if model.skip_weights is not None:
        assert "skip_weights" in adam_names  # 2-D but a control tensor
    assert "blocks.0.resid_mix" in adam_names


def test_group_learning_rates():
    args = tiny_args(TIE_EMBEDDINGS=0, EMBED_LR=0.3, HEAD_LR=0.007, MATRIX_LR=0.02, SCALAR_LR=0.01, MUON_WD=0.05)
    model = tiny_model(TIE_EMBEDDINGS=0)
    optimizers = train_gpt.build_optimizers(model, args, train_gpt.Runtime())
    by_param = {id(p): g for o in optimizers for g in o.param_groups for p in g["params"]}
    assert by_param[id(model.tok_emb.weight)]["lr"] == 0.3
    assert by_param[id(model.lm_head.weight)]["lr"] == 0.007
    assert by_param[id(model.blocks[0].attn.c_q.weight)]["lr"] == 0.02
    assert by_param[id(model.blocks[0].attn.c_q.weight)]["weight_decay"] == 0.05
    assert by_param[id(model.blocks[0].attn_scale)]["lr"] == 0.01
    assert all(g["base_lr"] == g["lr"] for g in by_param.values())
    tied = train_gpt.build_optimizers(tiny_model(), tiny_args(TIED_EMBED_LR=0.04), train_gpt.Runtime())
    assert tied[0].param_groups[0]["lr"] == 0.04


# ----------------------------------------------------------------------------- LR schedule


def mult(step, elapsed_ms=0.0, budget_ms=0.0, **overrides):
    return train_gpt.lr_multiplier(step, elapsed_ms, tiny_args(**{"MIN_LR": 0, **overrides}), budget_ms)


def test_lr_default_is_the_record_schedule():
    """1 until 15 % of the budget, then linear over the last 85 % down to a floor of 0.1."""
    args = train_gpt.Hyperparameters({})
    at = lambda frac: train_gpt.lr_multiplier(10, frac * 600_000, args, 600_000)  # noqa: E731
    assert at(0.1) == 1.0 and at(0.15) == pytest.approx(1.0)
    assert at(0.575) == pytest.approx(0.5)
    assert at(0.95) == pytest.approx(0.1) and at(1.0) == pytest.approx(0.1)


def test_lr_iteration_budget_warmdown():
    kw = dict(ITERATIONS=100, WARMDOWN_FRAC=0.5)
    assert mult(0, **kw) == 1.0
    assert mult(30, **kw) == 1.0
    assert mult(50, **kw) == pytest.approx(1.0)
    assert mult(75, **kw) == pytest.approx(0.5)
    assert mult(90, **kw) == pytest.approx(0.2)
    assert mult(100, **kw) == pytest.approx(0.0)
    values = [mult(s, **kw) for s in range(101)]
    assert all(a >= b for a, b in zip(values, values[1:])), "the multiplier never rises"


def test_lr_min_lr_floor():
    kw = dict(ITERATIONS=100, WARMDOWN_FRAC=0.5, MIN_LR=0.1)
    assert mult(100, **kw) == pytest.approx(0.1)
    assert mult(95, **kw) == pytest.approx(0.1)
    assert mult(75, **kw) == pytest.approx(0.5)


def test_lr_wall_clock_budget():
    kw = dict(ITERATIONS=100000, WARMDOWN_FRAC=0.4)
    assert mult(10, elapsed_ms=100.0, budget_ms=1000.0, **kw) == 1.0
    assert mult(10, elapsed_ms=600.0, budget_ms=1000.0, **kw) == pytest.approx(1.0)
    assert mult(10, elapsed_ms=800.0, budget_ms=1000.0, **kw) == pytest.approx(0.5)
    assert mult(10, elapsed_ms=1000.0, budget_ms=1000.0, **kw) == pytest.approx(0.0)
    assert mult(10, elapsed_ms=1500.0, budget_ms=1000.0, **kw) == 0.0
    # whichever budget is further along wins: ITERATIONS still ends training on time
    assert mult(90, elapsed_ms=100.0, budget_ms=1000.0, ITERATIONS=100, WARMDOWN_FRAC=0.4) == pytest.approx(0.25)


def test_lr_warmdown_iters_mode():
    # no wall clock: the last WARMDOWN_ITERS steps of ITERATIONS
    kw = dict(ITERATIONS=100, WARMDOWN_ITERS=20)
    assert mult(50, **kw) == 1.0
    assert mult(80, **kw) == pytest.approx(1.0)
    assert mult(90, **kw) == pytest.approx(0.5)
    assert mult(100, **kw) == pytest.approx(0.0)
    # wall clock: remaining steps estimated from the average step time (10 ms here)
    kw = dict(ITERATIONS=100000, WARMDOWN_ITERS=20)
    assert mult(50, elapsed_ms=500.0, budget_ms=1000.0, **kw) == 1.0
    assert mult(90, elapsed_ms=900.0, budget_ms=1000.0, **kw) == pytest.approx(0.5)
    assert mult(100, elapsed_ms=1000.0, budget_ms=1000.0, **kw) == pytest.approx(0.0)
    assert mult(100, elapsed_ms=1000.0, budget_ms=1000.0, MIN_LR=0.05, **kw) == pytest.approx(0.05)


def test_lr_no_warmdown():
    assert mult(100, ITERATIONS=100, WARMDOWN_FRAC=0.0) == 1.0
    assert mult(5, elapsed_ms=999.0, budget_ms=1000.0, WARMDOWN_FRAC=0.0) == 1.0


def test_embed_and_scalar_weight_decays_are_separate():
    args = tiny_args(EMBED_WD=0.085, ADAM_WD=0.02, BIGRAM_VOCAB_SIZE=31)
    model = tiny_model(randomized=False, BIGRAM_VOCAB_SIZE=31)
    embeddings, scalars, muon = train_gpt.build_optimizers(model, args, train_gpt.Runtime())
    assert all(g["weight_decay"] == 0.085 for g in embeddings.param_groups)
    assert all(g["weight_decay"] == 0.02 for g in scalars.param_groups)
    assert {id(p) for g in embeddings.param_groups for p in g["params"]} == {id(model.tok_emb.weight), id(model.bigram.table.weight)}
    scalar_ids = {id(p) for g in scalars.param_groups for p in g["params"]}
    for name, p in model.named_parameters():  # every gate, lane weight and scale is a scalar-group parameter
        if any(k in name for k in ("out_gate", "lane_", "skip_", "smear", "q_gain", "resid_mix")):
            assert id(p) in scalar_ids, name
    assert {id(p) for p in muon.param_groups[0]["params"]} == {id(p) for n, p in model.named_parameters() if n.endswith(("c_q.weight", "c_k.weight", "c_v.weight", "proj.weight", "fc.weight"))}


@pytest.mark.parametrize("scope", ["rank", "global"])
def test_momentum_warmup_and_gradient_clipping_in_the_step_loop(synthetic_data, monkeypatch, scope):
    """MUON_MOMENTUM_WARMUP_START -> MUON_MOMENTUM over MUON_MOMENTUM_WARMUP_STEPS, and GRAD_CLIP_NORM
    scaling every gradient by min(1, clip / norm), as clip_grad_norm_ would (0 = no scaling): on one
    process both scopes clip the same gradient, rank before the averaging (Muon gets factor 1),
    global after it (Muon gets the factor)."""
    momenta, seen = [], []
    muon_step = train_gpt.Muon.step
    model_ref = {}

    def recording_step(self, grad_scale=1.0):
        momenta.append(self.param_groups[0]["momentum"])
        muon_ids = {id(p) for p in self.param_groups[0]["params"]}
        others = [p.grad for p in model_ref["model"].parameters() if id(p) not in muon_ids and p.grad is not None]
        scale = float(grad_scale)
        muon_sq = sum(float(g.square().sum()) for g in self.local_grads.values()) * scale**2
        seen.append((scale, math.sqrt(sum(float(g.square().sum()) for g in others) + muon_sq)))  # the norm the optimizers apply
        return muon_step(self, grad_scale)

    monkeypatch.setattr(train_gpt.Muon, "step", recording_step)
    env = dict(DATA_PATH=synthetic_data, ITERATIONS=5, TRAIN_LOG_EVERY=0, GPTQ_ENABLED=0, MUON_MOMENTUM_WARMUP_START=0.5, MUON_MOMENTUM=0.9,
               MUON_MOMENTUM_WARMUP_STEPS=4, GRAD_CLIP_SCOPE=scope)
    for clip in (0.25, 0.0):
        momenta.clear(), seen.clear()
        args = tiny_args(GRAD_CLIP_NORM=clip, **env)
        torch.manual_seed(0)
        model_ref["model"] = train_gpt.GPT(train_gpt.ModelConfig.from_args(args))
        train_gpt.train_model(model_ref["model"], args, train_gpt.Runtime(), train_gpt.Logger(None), None)
        assert momenta == pytest.approx([0.5, 0.6, 0.7, 0.8, 0.9])
        if clip == 0:
            assert all(scale == 1.0 for scale, _ in seen) and any(norm > 0.25 for _, norm in seen), "no clip when 0"
            continue
        assert all(norm <= clip * (1 + 1e-4) for _, norm in seen)
        assert any(norm == pytest.approx(clip, rel=1e-4) for _, norm in seen), "the clip must have acted"
        assert all(scale == 1.0 for scale, _ in seen) == (scope == "rank")


CLIP_WORKER = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {repo!r})
    import train_gpt
    import torch.distributed as dist

    rank, out = int(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo", init_method="file://" + sys.argv[3], rank=rank, world_size=2)
    rt = train_gpt.Runtime(rank=rank, world_size=2, distributed=True)
    result = {{}}
    for scope in ("rank", "global"):
        args = train_gpt.Hyperparameters({{"GRAD_CLIP_NORM": "1.0", "GRAD_CLIP_SCOPE": scope}})
        other, mats = torch.nn.Parameter(torch.zeros(5)), [torch.nn.Parameter(torch.zeros(4, 3)) for _ in range(2)]
        muon = train_gpt.Muon(mats, lr=0.1, momentum=0.9, backend_steps=5, rt=rt)
        g = torch.Generator().manual_seed(rank)
        size = 0.1 if rank == 0 else 10.0  # only rank 1's own gradient is over the clip
        for p in [other] + mats:
            p.grad = size * torch.randn(p.shape, generator=g) / 5
        factor = train_gpt.reduce_and_clip_gradients([other], muon, args, rt)
        result[scope] = (other.grad.clone(), float(factor), muon.local_grads[(0, (4, 3))].clone())
    torch.save(result, out)
    dist.destroy_process_group()
    """
)


def test_rank_scope_clips_each_ranks_gradient_before_the_averaging(tmp_path):
    """2 gloo processes with gradients of norms ~0.1 and ~10: rank (the record) averages the ranks'
    clipped gradients, global clips the average (what 1 process on the same batch would do)."""
    script = tmp_path / "clip_worker.py"
    script.write_text(CLIP_WORKER.format(repo=str(REPO)))
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(tmp_path / f"r{r}.pt"), str(tmp_path / "store")],
                              env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out
    results = [torch.load(tmp_path / f"r{r}.pt") for r in (0, 1)]
    grads = []  # each rank's own gradients, as the worker drew them
    for rank in (0, 1):
        g = torch.Generator().manual_seed(rank)
        size = 0.1 if rank == 0 else 10.0
        grads.append([size * torch.randn(shape, generator=g) / 5 for shape in ((5,), (4, 3), (4, 3))])

    def clipped(gs):
        norm = math.sqrt(sum(float(t.square().sum()) for t in gs))
        return [t * min(1.0, 1.0 / (norm + 1e-6)) for t in gs]

    by_rank = [sum(ts) / 2 for ts in zip(*(clipped(gs) for gs in grads))]
    by_global = clipped([sum(ts) / 2 for ts in zip(*grads)])
    for scope, expected in (("rank", by_rank), ("global", by_global)):
        for rank in (0, 1):
            other, factor, local = results[rank][scope]
            torch.testing.assert_close(other, expected[0], rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(local[0] * factor, expected[1 + rank], rtol=1e-5, atol=1e-7)  # rank r keeps matrix r
    assert not torch.allclose(by_rank[0], by_global[0], rtol=1e-2), "the two scopes differ here"


def test_muon_works_in_bf16_on_gpus_and_in_fp32_on_cpus():
    """As the record: on a GPU the matrices' gradients are reduce-scattered, kept as momentum and
    orthogonalized in bf16 (half the traffic); a CPU keeps fp32, where the tests compare bit for bit."""
    model, args = tiny_model(randomized=False), tiny_args()
    muon = lambda device: next(o for o in train_gpt.build_optimizers(model, args, train_gpt.Runtime(device=torch.device(device))) if isinstance(o, train_gpt.Muon))  # noqa: E731
    assert muon("cuda").dtype == torch.bfloat16 and muon("cpu").dtype == torch.float32
    p = torch.nn.Parameter(torch.randn(8, 4))
    opt = train_gpt.Muon([p], lr=0.1, momentum=0.9, backend_steps=5, dtype=torch.bfloat16)
    p.grad = torch.randn(8, 4)
    opt.step()
    assert opt.state[p]["momentum_buffer"].dtype == torch.bfloat16 and p.dtype == torch.float32


# ----------------------------------------------------------------------------- MuonEq-R and Polar Express


def test_polar_express_orthogonalizes_better_than_the_classic_iteration():
    G = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    G[:, :4] *= 30.0  # a spread of singular values, as real gradients have
    spread = {}
    for coeffs in ("classic", "polar_express"):
        s = torch.linalg.svdvals(train_gpt.newton_schulz_orthogonalize(G, 5, coeffs))
        spread[coeffs] = float((s - 1).abs().max())
    assert spread["polar_express"] < spread["classic"] and spread["polar_express"] < 0.3, spread


def test_row_normalized_muon_ignores_the_scale_of_each_gradient_row():
    """MuonEq-R: the update of D*G (D a positive row scaling) equals that of G; plain Muon's does not."""
    G = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    D = torch.linspace(0.1, 10.0, 16).unsqueeze(1)

    def update(grad, row_normalize):
        p = torch.nn.Parameter(torch.zeros(16, 8))
        opt = train_gpt.Muon([p], lr=1.0, momentum=0.0, backend_steps=5, row_normalize=row_normalize, coeffs="polar_express")
        p.grad = grad.clone()
        opt.step()
        return -p.detach()

    assert torch.allclose(update(G, True), update(D * G, True), atol=1e-4)
    assert not torch.allclose(update(G, False), update(D * G, False), atol=1e-2)


def test_newton_schulz_scales_its_input_by_the_frobenius_norm():
    """As the record: X / ||X||_F, then the iterations (Polar Express too, with no extra safety factor)."""
    G = torch.randn(12, 7, generator=torch.Generator().manual_seed(4))
    for coeffs in ("classic", "polar_express"):
        assert float(train_gpt.newton_schulz_orthogonalize(G, 0, coeffs).norm()) == pytest.approx(1.0, rel=1e-6)


def test_newton_schulz_of_a_stack_is_that_of_each_matrix():
    G = torch.randn(3, 16, 8, generator=torch.Generator().manual_seed(5))
    G[1] *= 100.0  # each matrix is scaled by its own norm
    stacked = train_gpt.newton_schulz_orthogonalize(G, 5, "polar_express")
    for i in range(3):
        torch.testing.assert_close(stacked[i], train_gpt.newton_schulz_orthogonalize(G[i], 5, "polar_express"), rtol=1e-5, atol=1e-6)
