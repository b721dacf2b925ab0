"""Model section of train_gpt.py: every switch acts and trains, causality, document boundaries in
SmearGate and BigramHash, GQA, the attention backend choice, TTT adapters and QAT."""

import math

import pytest
import torch
import torch.nn.functional as F

import train_gpt
from conftest import tiny_args, tiny_model

V, T = 64, 32



def random_tokens(batch=2, length=T, seed=0, bos_every=None):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(4, V, (batch, length), generator=g)
    if bos_every:
        idx[:, ::bos_every] = train_gpt.BOS_ID
    return idx


def repetitive_batch(batch=4, length=T, seed=0):
    """Documents repeating a short pattern: learnable from context within a few dozen steps."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        pattern = torch.randint(4, V, (int(torch.randint(2, 5, (1,), generator=g)),), generator=g)
        row = pattern.repeat(length // pattern.numel() + 2)[: length + 1]
        row[0] = train_gpt.BOS_ID
        rows.append(row)
    seq = torch.stack(rows)
    return seq[:, :-1], seq[:, 1:]


def transplant(src: torch.nn.Module, dst: torch.nn.Module):
    """Copy every parameter the two models share, so only the switched feature differs."""
    shared = {k: v for k, v in src.state_dict().items() if k in dst.state_dict() and dst.state_dict()[k].shape == v.shape}
    dst.load_state_dict(shared, strict=False)
    return dst


# (switch, value that turns the feature on, value that turns it off)
SWITCHES = [
    ("SMEAR_GATE", 1, 0),
    ("SMEAR_GATE_MODE", "input", "dim"),
    ("BIGRAM_VOCAB_SIZE", 31, 0),
    ("UNET_SKIPS", 1, 0),
    ("SKIP_GATES", 1, 0),
    ("MLP_ACT", "leaky_relu2", "relu2"),
    ("ROPE_DIMS", 4, 0),
    ("TIE_EMBEDDINGS", 0, 1),
    ("NUM_LOOPS", 1, 0),
    ("PARALLEL_RESIDUAL_START", 2, -1),
    ("XSA_LAST_N", 4, 0),
    ("ATTN_GATE", 1, 0),
    ("DOC_ISOLATION", 1, 0),
    ("LN_SCALE", 1, 0),
]


@pytest.mark.parametrize("name, on, off", SWITCHES)
def test_each_switch_changes_the_output(name, on, off):
    model_on = tiny_model(seed=1, **{name: on}).eval()
    model_off = transplant(model_on, tiny_model(seed=2, **{name: off})).eval()
    idx = random_tokens(bos_every=11)
    with torch.no_grad():
        a, b = model_on(idx), model_off(idx)
    assert a.shape == b.shape == (2, T, V)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert (a - b).abs().max() > 1e-3, f"{name}={on} has no effect on the output"


def test_switches_reach_the_modules():
    assert tiny_model(SMEAR_GATE=0).smear is None and tiny_model(SMEAR_GATE=1).smear is not None
    assert tiny_model(BIGRAM_VOCAB_SIZE=0).bigram is None
    assert tiny_model(BIGRAM_VOCAB_SIZE=31).bigram.table.weight.shape == (31, 8)
    assert tiny_model(UNET_SKIPS=0).skip_weights is None
    assert tiny_model(UNET_SKIPS=1).skip_weights.shape == (3, 32)  # 6 virtual layers with the loop on, 4 without
    assert tiny_model(UNET_SKIPS=1, NUM_LOOPS=0).skip_weights.shape == (2, 32)
    assert tiny_model(SKIP_GATES=1).skip_gates.shape == (3, 32) and tiny_model(SKIP_GATES=0).skip_gates is None
    assert tiny_model(PARALLEL_RESIDUAL_START=2).lane_post.shape == (4, 2, 2)
    assert tiny_model(PARALLEL_RESIDUAL_START=-1).lane_post is None and tiny_model(PARALLEL_RESIDUAL_START=4).lane_resid is None
    assert [b.attn.xsa for b in tiny_model(XSA_LAST_N=3).blocks] == [False, True, True, True]
    assert tiny_model(ATTN_GATE=1).blocks[0].attn.out_gate.shape == (4, 4) and tiny_model(ATTN_GATE=0).blocks[0].attn.out_gate is None
    assert tiny_model(SMEAR_GATE_MODE="input").smear.gate.shape == (4,) and tiny_model(SMEAR_GATE_MODE="dim").smear.gate.shape == (32,)
    assert [b.norm_scale for b in tiny_model(LN_SCALE=1).blocks] == pytest.approx([1, 2**-0.5, 3**-0.5, 0.5])
    assert tiny_model(NUM_LOOPS=1).cfg.layer_order(True) == [0, 1, 2, 1, 2, 3]
    assert tiny_model(NUM_LOOPS=2, LOOP_START=1, LOOP_END=1).cfg.layer_order(True) == [0, 1, 1, 1, 2, 3]
    assert tiny_model(TIE_EMBEDDINGS=1).lm_head is None
    assert tiny_model(TIE_EMBEDDINGS=0).lm_head.weight.shape == (V, 32)
    assert tiny_model(ROPE_DIMS=4).blocks[0].attn.rotary.rope_dims == 4
    assert tiny_model(ROPE_DIMS=0).blocks[0].attn.rotary.rope_dims == 8


ALL_OFF = {name: off for name, _, off in SWITCHES}


@pytest.mark.parametrize("name, on, off", SWITCHES + [("ALL_ON", None, None), ("ALL_OFF", None, None)])
def test_model_trains_with_each_switch(name, on, off):
    """Each feature alone on top of the plain model, all of them together, and none."""
    if name == "ALL_ON":
        overrides = {n: v for n, v, _ in SWITCHES}
    elif name == "ALL_OFF":
        overrides = dict(ALL_OFF)
    else:
        overrides = {**ALL_OFF, name: on}
    torch.manual_seed(0)
    model = train_gpt.GPT(train_gpt.ModelConfig.from_args(tiny_args(**overrides)))
    x, y = repetitive_batch()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = model(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # the best a model that ignores the context can do is the entropy of the target frequencies
    freq = torch.bincount(y.flatten(), minlength=V).float() / y.numel()
    unigram = -(freq[freq > 0] * freq[freq > 0].log()).sum().item()
    assert math.isfinite(losses[-1])
    assert losses[0] == pytest.approx(math.log(V), abs=0.3), "a fresh model predicts about uniformly"
    assert losses[-1] < 0.6 * unigram, f"{name}: loss {losses[0]:.3f} -> {losses[-1]:.3f} (unigram {unigram:.3f})"


def test_feature_parameters_receive_gradients():
    model = tiny_model(seed=3, TIE_EMBEDDINGS=0)
    x, y = repetitive_batch()
    model(x, y).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert not missing, f"parameters without gradient: {missing}"


def test_loss_is_the_cross_entropy_of_the_logits():
    model = tiny_model(seed=4).eval()
    x, y = repetitive_batch()
    with torch.no_grad():
        logits = model(x)
        loss = model(x, y)
    assert torch.allclose(loss, F.cross_entropy(logits.reshape(-1, V), y.reshape(-1)), atol=1e-6)
    cap = model.cfg.logit_softcap
    assert logits.abs().max() <= cap


# ----------------------------------------------------------------------------- causality


CAUSALITY_CASES = [
    {},
    {"ROPE_DIMS": 4, "MLP_ACT": "leaky_relu2", "TIE_EMBEDDINGS": 0},
    {"NUM_KV_HEADS": 1},
    {"NUM_LOOPS": 2, "LOOP_START": 1, "LOOP_END": 2},  # recurrence
    {"PARALLEL_RESIDUAL_START": 0},  # two lanes from the first block
    {"XSA_LAST_N": 4, "ATTN_GATE": 1},
    {"DOC_ISOLATION": 0},
    {"SMEAR_GATE_MODE": "dim", "BIGRAM_VOCAB_SIZE": 31},
]


@pytest.mark.parametrize("overrides", CAUSALITY_CASES)
def test_full_model_is_causal(overrides):
    model = tiny_model(seed=5, **overrides).eval()
    idx = random_tokens(bos_every=9, seed=1)
    with torch.no_grad():
        base = model(idx)
        for t in (0, 5, 8, 17, T - 2):
            changed = idx.clone()
            changed[:, t + 1] = (changed[:, t + 1] + 7) % (V - 4) + 4
            if t + 1 < T - 1:
                changed[:, t + 2 :] = random_tokens(seed=t + 100)[:, t + 2 :]
            out = model(changed)
            assert torch.equal(out[:, : t + 1], base[:, : t + 1]), f"logits at <= {t} depend on token {t + 1}"
            assert not torch.equal(out[:, t + 1], base[:, t + 1]), "the changed token must change its own logits"


def documents_batch(seed=0):
    """Two rows of three documents each: BOS at 0, 11 and 23."""
    idx = random_tokens(seed=seed)
    idx[:, [0, 11, 23]] = train_gpt.BOS_ID
    return idx


@pytest.mark.parametrize("overrides", CAUSALITY_CASES[:6])
def test_document_isolation_no_output_depends_on_another_document(overrides):
    """With DOC_ISOLATION, changing any token of document k leaves every output of the other documents
    unchanged (later ones included) and changes document k's own; without it, later documents move."""
    model = tiny_model(seed=12, DOC_ISOLATION=1, **overrides).eval()
    leaky = tiny_model(seed=12, **{**overrides, "DOC_ISOLATION": 0}).eval()
    idx = documents_batch()
    with torch.no_grad():
        base, base_leaky = model(idx), leaky(idx)
        for doc, (a, b) in enumerate(((0, 11), (11, 23))):
            changed = idx.clone()
            changed[:, a + 1 : b] = random_tokens(seed=50 + doc)[:, a + 1 : b]
            out = model(changed)
            assert torch.equal(out[:, :a], base[:, :a]) and torch.equal(out[:, b:], base[:, b:]), f"document {doc} reaches another document"
            assert not torch.allclose(out[:, a + 1 : b], base[:, a + 1 : b])
            assert not torch.allclose(leaky(changed)[:, b:], base_leaky[:, b:]), "without isolation later documents must see it"


def test_document_isolation_matches_scoring_each_document_alone():
    """A window holding several documents gives each document the logits it gets on its own (RoPE is relative)."""
    model = tiny_model(seed=13).eval()
    idx = documents_batch(seed=3)[:1]
    with torch.no_grad():
        together = model(idx)
        for a, b in ((0, 11), (11, 23), (23, T)):
            assert torch.allclose(together[:, a:b], model(idx[:, a:b]), atol=1e-5)


def test_document_layout_for_flash_attention_is_padded_and_complete():
    idx = documents_batch()
    cu = train_gpt.document_cu_seqlens(idx)
    starts = [0, 11, 23, T, T + 11, T + 23]
    assert cu.dtype == torch.int32 and cu.numel() == 64
    assert cu[:6].tolist() == starts and (cu[6:] == 2 * T).all()
    many = torch.full((4, 64), train_gpt.BOS_ID)
    assert train_gpt.document_cu_seqlens(many).numel() == 512  # 256 documents + the end, rounded up to a power of two


def test_attention_alone_is_causal():
    model = tiny_model(seed=6)
    attn = model.blocks[1].attn
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, T, 32, generator=g)
    with torch.no_grad():
        base = attn(x, None, None, 0)
        for t in (0, 3, 15, T - 2):
            changed = x.clone()
            changed[:, t + 1 :] = torch.randn(2, T - t - 1, 32, generator=g)
            out = attn(changed, None, None, 0)
            assert torch.equal(out[:, : t + 1], base[:, : t + 1])
            assert not torch.allclose(out[:, t + 1], base[:, t + 1])


def test_grouped_query_attention_matches_repeated_heads():
    """causal_attention with 2 KV heads for 4 query heads = plain causal attention on repeated K/V."""
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, D = 2, 4, 2, 8
    q, k, v = torch.randn(B, T, H, D, generator=g), torch.randn(B, T, Hkv, D, generator=g), torch.randn(B, T, Hkv, D, generator=g)
    out = train_gpt.causal_attention(q, k, v, "sdpa")
    kr, vr = k.repeat_interleave(H // Hkv, dim=2), v.repeat_interleave(H // Hkv, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, kr) / math.sqrt(D)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    ref = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), vr)
    assert out.shape == (B, T, H, D)
    assert torch.allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_gqa_shapes(kv_heads):
    model = tiny_model(seed=7, NUM_KV_HEADS=kv_heads)
    attn = model.blocks[0].attn
    head_dim = 32 // 4
    assert attn.c_q.weight.shape == (32, 32)
    assert attn.c_k.weight.shape == (kv_heads * head_dim, 32)
    assert attn.c_v.weight.shape == (kv_heads * head_dim, 32)
    with torch.no_grad():
        out = model(random_tokens())
    assert out.shape == (2, T, V) and torch.isfinite(out).all()


def test_select_attention_backend_on_cpu():
    cpu = torch.device("cpu")
    assert train_gpt.select_attention_backend("auto", cpu) == "sdpa"
    assert train_gpt.select_attention_backend("sdpa", cpu) == "sdpa"
    for forced in ("fa3", "fa2"):
        with pytest.raises(train_gpt.SettingsError, match=f"ATTN_BACKEND={forced}"):
            train_gpt.select_attention_backend(forced, cpu)


# ----------------------------------------------------------------------------- document boundaries


def smear_output(model, idx):
    captured = {}
    handle = model.smear.register_forward_hook(lambda m, inp, out: captured.__setitem__("out", out))
    with torch.no_grad():
        model(idx)
    handle.remove()
    return captured["out"]


def test_smear_gate_does_not_cross_bos():
    model = tiny_model(seed=8).eval()
    idx = random_tokens(seed=2)
    p, q = 10, 20  # a BOS at p; an ordinary token at q
    idx[:, p] = train_gpt.BOS_ID
    base = smear_output(model, idx)
    changed = idx.clone()
    changed[:, p - 1] = (changed[:, p - 1] + 5) % (V - 4) + 4
    changed[:, q - 1] = (changed[:, q - 1] + 5) % (V - 4) + 4
    out = smear_output(model, changed)
    assert not torch.equal(out[:, p - 1], base[:, p - 1])
    assert torch.equal(out[:, p], base[:, p]), "the token before a BOS leaks into the BOS position"
    assert not torch.allclose(out[:, q], base[:, q]), "SmearGate must mix the previous token in elsewhere"


def test_orthogonal_init_of_the_input_projections():
    attn, mlp = tiny_model(randomized=False, ORTHO_INIT=1).blocks[1].attn, tiny_model(randomized=False, ORTHO_INIT=1).blocks[1].mlp
    for w in (attn.c_q.weight, attn.c_k.weight, attn.c_v.weight, mlp.fc.weight):
        small = w if w.size(0) <= w.size(1) else w.T
        assert torch.allclose(small @ small.T, torch.eye(small.size(0)), atol=1e-2)  # rounded to bf16, as the record's
    plain = tiny_model(randomized=False, ORTHO_INIT=0).blocks[1].attn.c_q.weight
    assert not torch.allclose(plain @ plain.T, torch.eye(32), atol=1e-2)
    assert torch.count_nonzero(attn.proj.weight) == 0 and torch.count_nonzero(mlp.proj.weight) == 0


def test_input_dependent_smear_gate_formula():
    gate = train_gpt.SmearGate(6, "input", 3)
    with torch.no_grad():
        gate.gate.copy_(torch.tensor([0.5, -1.0, 2.0]))
        gate.scale.fill_(0.7)
    x = torch.randn(1, 5, 6)
    idx = torch.tensor([[7, 8, 1, 9, 10]])
    out = gate(x, idx).detach()
    expected = x.clone()
    for t in (1, 3, 4):  # positions 0 and 2 (a BOS) have no previous-token term
        g = torch.sigmoid((x[0, t, :3] * gate.gate.detach()).sum())
        expected[:, t] += 0.7 * g * x[:, t - 1]
    assert torch.allclose(out, expected, atol=1e-6)
    fresh = train_gpt.SmearGate(6, "input", 3)
    assert torch.equal(fresh(x, idx), x), "zero-initialized: the identity at the start of training"


def test_xsa_removes_the_component_along_the_own_value():
    g = torch.Generator().manual_seed(0)
    y, v = torch.randn(2, 5, 4, 8, generator=g), torch.randn(2, 5, 2, 8, generator=g)
    out = train_gpt.remove_value_component(y, v)
    own_value = v.repeat_interleave(2, dim=2)  # query heads 0,1 share KV head 0; 2,3 share head 1
    assert torch.allclose((out * own_value).sum(-1), torch.zeros(2, 5, 4), atol=1e-5)
    assert torch.allclose(out + (y * F.normalize(own_value, dim=-1)).sum(-1, keepdim=True) * F.normalize(own_value, dim=-1), y, atol=1e-5)


def test_attention_gate_is_per_head_and_reads_the_first_dims():
    """proj's input = each head's output times sigmoid(ATTN_GATE_SCALE * W x[:GATE_WINDOW]), W zero-init (1/2)."""
    attn = tiny_model(seed=3, ATTN_GATE=1, GATE_WINDOW=4, ATTN_GATE_SCALE=0.5).blocks[0].attn
    x = torch.randn(2, T, 32, generator=torch.Generator().manual_seed(1))
    seen = []
    attn.proj.register_forward_hook(lambda m, inp, out: seen.append(inp[0].view(2, T, 4, 8)))
    W = torch.randn(4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        attn.out_gate.zero_()
        attn(x, None, None, 0)
        attn.out_gate.copy_(W)
        attn(x, None, None, 0)
    half, gated = seen
    gate = torch.sigmoid(0.5 * x[..., :4] @ W.T)  # (B, T, heads)
    assert torch.allclose(gated, 2 * half * gate.unsqueeze(-1), atol=1e-5)


def test_smear_gate_formula():
    gate = train_gpt.SmearGate(6, "dim", 4)
    with torch.no_grad():
        gate.gate.copy_(torch.linspace(-2, 2, 6))
    x = torch.randn(1, 5, 6)
    idx = torch.tensor([[7, 8, 1, 9, 10]])
    g = torch.sigmoid(gate.gate.detach())
    out = gate(x, idx).detach()
    expected = (1 - g) * x.clone()
    for t in (1, 3, 4):  # positions 0 and 2 (a BOS) have no previous-token term
        expected[:, t] += g * x[:, t - 1]
    assert torch.allclose(out, expected, atol=1e-6)


def test_bigram_hash_reserves_the_last_bucket_for_document_starts():
    model = tiny_model(seed=9, BIGRAM_VOCAB_SIZE=31)
    idx = random_tokens(seed=3)
    idx[0, 7] = train_gpt.BOS_ID
    idx[1, 12] = train_gpt.BOS_ID
    buckets = model.bigram.bucket_ids(idx)
    reserved = model.bigram.buckets - 1
    starts = torch.zeros_like(idx, dtype=torch.bool)
    starts[:, 0] = True
    starts[0, 7] = starts[1, 12] = True
    assert (buckets[starts] == reserved).all()
    assert (buckets[~starts] < reserved).all() and (buckets >= 0).all()
    # elsewhere the bucket is the hash of (previous, current)
    prev, cur = int(idx[0, 3]), int(idx[0, 4])
    assert int(buckets[0, 4]) == ((36313 * cur) ^ (27191 * prev)) % (model.bigram.buckets - 1)
    # so the token before a BOS never reaches the BOS position's bigram embedding
    changed = idx.clone()
    changed[0, 6] = (changed[0, 6] + 3) % (V - 4) + 4
    with torch.no_grad():
        a, b = model.bigram(idx), model.bigram(changed)
    assert torch.equal(a[0, 7], b[0, 7])
    assert not torch.equal(a[0, 6], b[0, 6])


# ----------------------------------------------------------------------------- TTT adapters and QAT


def test_fresh_adapters_leave_the_output_unchanged():
    args = tiny_args()
    model = tiny_model(seed=10, TIE_EMBEDDINGS=0).eval()
    idx = random_tokens(batch=3, seed=4, bos_every=13)
    adapters = train_gpt.DocumentAdapters(model.cfg, 3, rank=2, head_rank=2, targets=["q", "k", "v", "o", "mlp"], block_bias=True)
    with torch.no_grad():
        for p in adapters.parameters():  # as after a document was adapted
            p.normal_()
        adapters.reset(args.seed)
        base = model(idx)
        with_adapters = model(idx, adapters=adapters)
        assert torch.equal(with_adapters, base), "freshly reset adapters must be an exact no-op"
        # and they are wired in: a non-zero B changes the output
        adapters.layers[1]["v"].B.normal_()
        assert not torch.allclose(model(idx, adapters=adapters), base)
        adapters.reset(1)
        adapters.head.B.normal_()
        assert not torch.allclose(model(idx, adapters=adapters), base)


def test_adapter_reset_is_reproducible():
    cfg = tiny_model().cfg
    a = train_gpt.DocumentAdapters(cfg, 2, 2, 2, ["q", "v"], False)
    b = train_gpt.DocumentAdapters(cfg, 2, 2, 2, ["q", "v"], False)
    a.reset(123)
    b.reset(123)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_qat_switch_changes_and_restores_the_output():
    model = tiny_model(seed=11, QAT_START=0.15).eval()
    idx = random_tokens(seed=5)
    with torch.no_grad():
        base = model(idx)
        model.set_qat(True)
        on = model(idx)
        model.set_qat(False)
        off = model(idx)
    assert (on - base).abs().max() > 1e-4, "QAT on must fake-quantize the weights"
    assert torch.equal(off, base)
    flags = [m.qat_on for m in model.modules() if isinstance(m, train_gpt.CastedLinear)]
    assert flags and all(float(f) == 0.0 for f in flags)


def test_qat_passes_gradients_straight_through():
    lin = train_gpt.CastedLinear(8, 4, qat_bits=4)
    lin.qat_on.fill_(1.0)
    x = torch.randn(3, 8)
    lin(x).sum().backward()
    assert torch.allclose(lin.weight.grad, x.sum(0).expand(4, 8))
    q = train_gpt.fake_quantize_rows(lin.weight.detach(), 4)
    scale = lin.weight.detach().abs().amax(1, keepdim=True) / 7
    assert torch.allclose(q / scale, (q / scale).round(), atol=1e-4)
    assert (q / scale).abs().max() <= 7 + 1e-4


def test_qk_gain_init_sets_every_heads_query_gain():
    model = tiny_model(randomized=False, QK_GAIN_INIT=4.25)
    for block in model.blocks:
        assert torch.equal(block.attn.q_gain, torch.full((4,), 4.25))


def test_no_fake_quantization_is_computed_when_qat_is_off(monkeypatch):
    calls = []
    quantize = train_gpt.fake_quantize_rows
    monkeypatch.setattr(train_gpt, "fake_quantize_rows", lambda w, bits: (calls.append(bits), quantize(w, bits))[1])
    idx = random_tokens()
    off = tiny_model(seed=14, QAT_START=0)
    off.set_qat(True)
    off(idx)
    assert calls == []
    on = tiny_model(seed=14, QAT_START=0.15)
    on(idx)
    assert len(calls) == 1 + 6 * len(on.cfg.layer_order(True))  # the bigram projection, 6 linears per virtual layer


def test_recurrence_switch_is_compiled_once_per_graph_and_never_again():
    """Both graphs (recurrence off and on) compile in the warm-up; flipping the switch later reuses them."""
    from torch._dynamo.utils import counters

    model = tiny_model(seed=15)
    x, y = repetitive_batch()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="aot_eager", dynamic=False)
    losses = {}
    for looping in (False, True):  # the warm-up
        model.looping = looping
        losses[looping] = compiled(x, y)
        losses[looping].backward()
    assert not torch.equal(losses[False], losses[True]), "the switch must change the model"
    graphs = counters["stats"]["unique_graphs"]
    for looping in (False, True, False, True):  # the timed loop switches: no new graph
        model.looping = looping
        compiled(x, y).backward()
    assert counters["stats"]["unique_graphs"] == graphs
    with torch.no_grad():
        assert torch.equal(compiled(x, y), model(x, y))
    torch._dynamo.reset()
