"""Evaluation section of train_gpt.py: the score ledger, the standard / sliding / score-first TTT
scorers, the legality audit, and deliberately leaky scorers the ledger and the audit must refuse.

What the audit can and cannot see (REFERENCE.md §6; the leaky variants below probe each limit):

* exactly_once is enforced by the ledger itself: a second `record` of a position raises and
  `result` refuses a hole. A scorer cannot get around it except by keeping its own tally and
  recording once (the "best of several passes" cheat), which the other checks must then catch.
* score_before_update is enforced only where the scorer calls `ledger.require_scored` before an
  update. A scorer that trains without telling the ledger is not seen by this check; the causal
  check is the backstop, and it sees such a leak only where it changes a loss at or before the
  cut point t.
* causal reruns the scorer with every token after t replaced and compares the recorded nll of
  positions <= t and the entropy of the distribution at t + 1 (whose own target changed). The nll
  alone cannot see a model that reads its own target (one token ahead: inputs shifted by one, a
  BigramHash or SmearGate taking the next token instead of the previous); the entropy, a
  fingerprint of the whole distribution that the audit ledger keeps, does. It uses a single cut
  point: a leak whose reach does not cross t is not seen (t = N/2 was a window end of both window
  paths for the default 8192-token probe, so a dropped causal mask passed; t = N/2 + 1 now).
* normalized: every recorded nll must come with the distribution that produced it (ScoreLedger.score
  does this for every honest path; a bare `record` in an audit counts as unshown), that
  distribution must sum to 1 over the whole vocabulary, and the nll must be its value at the real
  target. A scorer that shows one distribution and records another's nll is caught.
"""

import math
import os
import re
import socket
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import train_gpt as T
from conftest import tiny_args, tiny_model, toy_tables, synthetic_stream

VOCAB = 64
CHUNK = 8  # TINY's TTT_CHUNK_SIZE


# ----------------------------------------------------------------------------- helpers



@pytest.fixture(scope="module")
def model():
    m = tiny_model(0)
    m.requires_grad_(False)
    return m


@pytest.fixture(scope="module")
def tables():
    return toy_tables(VOCAB)


def doc_stream(lengths, seed=0, start_with_bos=True) -> torch.Tensor:
    """Documents of the given lengths (BOS included), each repeating a short random pattern."""
    rng = np.random.default_rng(seed)
    out = []
    for i, n in enumerate(lengths):
        pattern = rng.integers(4, VOCAB, size=int(rng.integers(3, 8)))
        body = np.resize(pattern, n - 1)
        out.append(body if (i == 0 and not start_with_bos) else np.concatenate([[T.BOS_ID], body]))
    return torch.from_numpy(np.concatenate(out).astype(np.int64))


# 256 tokens: docs at 0, 30, 70, 100 (120 long, spans the middle) and 220. N = 256 makes N/2 a
# multiple of every power-of-two window and stride, the alignment of the default 8192-token probe.
AUDIT_LENGTHS = [30, 40, 30, 120, 36]


def audit_stream() -> torch.Tensor:
    tokens = doc_stream(AUDIT_LENGTHS, seed=7)
    assert tokens.numel() == 256
    return tokens


def audit_cut(tokens) -> int:
    """The cut point audit_scorer uses (checked against its report in the tests)."""
    return tokens.numel() // 2 + 1


def scorer_of(name, args, rt=None):
    rt = rt or T.Runtime()
    cfg = T.ModelConfig.from_args(args)
    return dict(T.evaluation_paths(args, T.ScoreFirstLoRATTT(cfg, args, rt)))[name]


def run_scorer(scorer, model, tokens, tables, rt=None, **kw):
    ledger = T.ScoreLedger(tokens, tables)
    out = scorer(model, tokens, ledger, rt or T.Runtime(), **kw)
    return ledger, out


def ttt_run(model, tokens, tables, base=False, deadline=None, **env):
    args = tiny_args(**env)
    ttt = T.ScoreFirstLoRATTT(model.cfg, args, T.Runtime())
    ledger = T.ScoreLedger(tokens, tables)
    base_ledger = T.ScoreLedger(tokens, tables) if base else None
    stats = ttt(model, tokens, ledger, T.Runtime(), base_ledger=base_ledger, deadline=deadline)
    return ledger, base_ledger, stats


def audit(name, scorer, model, tokens, tables, full=True):
    full_ledger = None
    if full:
        full_ledger, _ = run_scorer(scorer, model, tokens, tables)
    report = T.audit_scorer(name, scorer, model, tokens, tables, T.Runtime(), VOCAB, full_ledger)
    return report


def forward_nll(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Reference nll of one sequence, computed without any evaluator code."""
    with torch.no_grad():
        logits = model(x[None])[0].double()
    return -(logits.log_softmax(-1).gather(-1, y[:, None]).squeeze(-1))


# ----------------------------------------------------------------------------- the ledger


def test_ledger_refuses_a_position_scored_twice(tables):
    tokens = doc_stream([10, 7])
    ledger = T.ScoreLedger(tokens, tables)
    ledger.record(torch.tensor([1, 2, 3]), torch.tensor([0.1, 0.2, 0.3]))
    with pytest.raises(T.LeakageError, match="scored twice"):
        ledger.record(torch.tensor([4, 3]), torch.tensor([0.4, 0.3]))
    fresh = T.ScoreLedger(tokens, tables)
    with pytest.raises(T.LeakageError, match="scored twice"):
        fresh.record(torch.tensor([5, 5]), torch.tensor([0.5, 0.5]))  # a duplicate inside one call
    for bad in (0, tokens.numel()):
        with pytest.raises(T.LeakageError, match="outside"):
            T.ScoreLedger(tokens, tables).record(torch.tensor([bad]), torch.tensor([1.0]))


def test_ledger_result_refuses_unscored_positions(tables):
    tokens = doc_stream([10, 7])
    n = tokens.numel() - 1
    ledger = T.ScoreLedger(tokens, tables)
    ledger.record(torch.arange(1, n), torch.ones(n - 1))  # position n missing
    with pytest.raises(T.LeakageError, match="1 targets never scored"):
        ledger.result()
    ledger.record(torch.tensor([n]), torch.ones(1))
    assert ledger.result().targets == n


def test_require_scored_refuses_an_unscored_position(tables):
    tokens = doc_stream([12])
    ledger = T.ScoreLedger(tokens, tables)
    ledger.record(torch.arange(1, 6), torch.ones(5))
    ledger.require_scored(torch.arange(1, 6))
    assert ledger.updates == 1
    with pytest.raises(T.LeakageError, match="position 6 before it was scored"):
        ledger.require_scored(torch.arange(3, 8))
    assert ledger.updates == 1, "a refused update must not be counted"


def test_ledger_bytes_and_bpb(tables):
    tokens = doc_stream([9, 14, 6], seed=3)
    tokens[4] = 0  # a boundary piece inside a document: no leading space after it
    ledger = T.ScoreLedger(tokens, tables)
    expected = []
    for p in range(1, tokens.numel()):  # REFERENCE §3, written out per target
        prev, tgt = int(tokens[p - 1]), int(tokens[p])
        space = bool(tables.has_leading_space[tgt]) and not bool(tables.is_boundary[prev])
        expected.append(int(tables.base_bytes[tgt]) + int(space))
    assert ledger.bytes.tolist() == expected
    assert ledger.bytes.tolist() == T.target_bytes(tokens[:-1], tokens[1:], tables).tolist()

    nll = torch.rand(tokens.numel() - 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 5
    ledger.record(torch.arange(1, tokens.numel()), nll)
    r = ledger.result()
    assert r.nll_sum == float(np.sum(nll.numpy()))
    assert r.byte_sum == sum(expected)
    assert r.val_bpb == r.nll_sum / math.log(2) / r.byte_sum
    assert r.val_loss == r.nll_sum / (tokens.numel() - 1)
    assert math.isclose(r.val_bpb, math.fsum(nll.tolist()) / math.log(2) / sum(expected), rel_tol=1e-14)


def test_dump_reaggregates_to_the_result_bit_for_bit(tables, tmp_path):
    tokens = doc_stream([40, 25, 33], seed=1)
    ledger = T.ScoreLedger(tokens, tables)
    nll = torch.rand(tokens.numel() - 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 7
    perm = torch.randperm(nll.numel(), generator=torch.Generator().manual_seed(2))
    for part in perm.split(17):  # recorded out of order, in pieces
        ledger.record(part + 1, nll[part])
    ledger.dump(tmp_path / "d.npz")
    d = np.load(tmp_path / "d.npz")
    assert d["position"].tolist() == list(range(1, tokens.numel()))
    bpb = float(np.sum(d["nll"])) / math.log(2) / int(d["bytes"].sum())
    assert bpb == ledger.result().val_bpb
    assert f"{bpb:.8f}" == f"{ledger.result().val_bpb:.8f}"


# ----------------------------------------------------------------------------- windows


@pytest.mark.parametrize(
    "num_targets,window,stride",
    [(1, 32, 8), (31, 32, 8), (32, 32, 8), (100, 32, 8), (129, 32, 5), (50, 7, 3), (65, 32, 31), (64, 16, 16), (100, 32, 32), (10, 32, 32), (97, 8, 1)],
)
def test_window_plan_scores_every_target_once_with_context(num_targets, window, stride):
    plan = T.window_plan(num_targets, window, stride)
    count = np.zeros(num_targets + 1, dtype=int)
    for a, s, e in plan:
        assert 0 <= a <= s < e <= num_targets and e - a <= window
        count[s + 1 : e + 1] += 1
        for p in range(s + 1, e + 1):  # p's inputs are tokens[a:p]
            if stride < window:
                assert p - a >= min(p, window - stride), f"target {p} sees only {p - a} tokens"
            else:
                assert a == (p - 1) // window * window, "standard windows are back to back"
    assert count[0] == 0 and (count[1:] == 1).all()


@pytest.mark.parametrize("num_tokens", [4 * 32 + 1, 4 * 32 + 1 + 13])
def test_sliding_with_stride_equal_window_is_the_standard_evaluation(model, tables, num_tokens):
    tokens = torch.from_numpy(synthetic_stream(20, seed=4).astype(np.int64))[:num_tokens]
    args = tiny_args(TRAIN_SEQ_LEN=32, EVAL_SEQ_LEN=32, EVAL_STRIDE=32)
    std, _ = run_scorer(scorer_of("standard", args), model, tokens, tables)
    sld, _ = run_scorer(scorer_of("sliding_window", args), model, tokens, tables)
    assert torch.equal(std.nll, sld.nll) and std.result() == sld.result()
    ref = torch.cat([forward_nll(model, tokens[a:a + 32], tokens[a + 1:a + 33]) for a in range(0, num_tokens - 1, 32)])
    torch.testing.assert_close(std.nll, ref, rtol=1e-5, atol=1e-5)


def test_sliding_window_losses_match_a_direct_computation(model, tables):
    tokens = torch.from_numpy(synthetic_stream(20, seed=5).astype(np.int64))[:150]
    window, stride = 32, 8
    ledger, _ = run_scorer(scorer_of("sliding_window", tiny_args(EVAL_SEQ_LEN=window, EVAL_STRIDE=stride)), model, tokens, tables)
    n = tokens.numel() - 1
    ends = [min(window, n)]
    while ends[-1] < n:
        ends.append(min(ends[-1] + stride, n))
    ref = torch.empty(n, dtype=torch.float64)
    for p in range(1, n + 1):
        e = next(e for e in ends if e >= p)  # the first window reaching p scores it
        a = max(0, e - window)
        ref[p - 1] = forward_nll(model, tokens[a:e], tokens[a + 1:e + 1])[p - 1 - a]
    torch.testing.assert_close(ledger.nll, ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- EVAL_DUMP through the whole evaluation


def test_eval_dump_reaggregates_to_the_logged_bpb(model, tables, tmp_path):
    tokens = doc_stream([40, 60, 35, 50], seed=2)
    args = tiny_args(EVAL_DUMP=str(tmp_path / "dump"), EVAL_AUDIT=1, TTT_LR=0.05, ARTIFACT_COMPRESSOR="lzma")
    qstate = T.quantize_state_dict(model.state_dict(), args, None)
    blob, _ = T.encode_artifact(qstate, model.cfg, T.Packing.from_args(args))
    (tmp_path / "model.pgz").write_bytes(blob)
    log = T.Logger(tmp_path / "log.txt")
    results, audits = T.evaluate_artifact(tmp_path / "model.pgz", args, T.Runtime(), log, tables, tokens, "int6", "sdpa")
    text = (tmp_path / "log.txt").read_text()
    assert set(results) == {"standard", "sliding_window", "ttt_lora"}
    for name, result in results.items():
        d = np.load(tmp_path / f"dump.{name}.npz")
        bpb = float(np.sum(d["nll"])) / math.log(2) / int(d["bytes"].sum())
        assert bpb == result.val_bpb, name
        logged = re.search(rf"final_int6_{T.FINAL_LABELS[name]}_exact val_loss:(\S+) val_bpb:(\S+)", text)
        assert logged and logged.group(2) == f"{bpb:.8f}", name
        assert logged.group(1) == f"{float(np.sum(d['nll'])) / d['nll'].size:.8f}", name
    assert [a.path for a in audits] == ["standard", "sliding_window", "ttt_lora"] and all(a.passed for a in audits)
    assert text.count("verdict:PASS") == 3


# ----------------------------------------------------------------------------- the audit on the real scorers


@pytest.mark.parametrize("name", ["standard", "sliding_window", "ttt_lora"])
def test_audit_passes_the_real_scorers(model, tables, name):
    tokens = audit_stream()
    args = tiny_args(TTT_LR=0.05)
    report = audit(name, scorer_of(name, args), model, tokens, tables)
    assert report.passed, report.line()
    assert set(report.checks) == {"exactly_once", "causal", "normalized", "score_before_update"}
    assert all(ok for ok, _ in report.checks.values())
    assert f"t:{audit_cut(tokens)}" in report.checks["causal"][1]
    assert "verdict:PASS" in report.line()
    if name == "ttt_lora":
        assert int(re.search(r"updates:(\d+)", report.checks["score_before_update"][1]).group(1)) > 0


# ----------------------------------------------------------------------------- leaky scorers


def assert_fails(report, check, detail=None):
    assert not report.passed and "verdict:FAIL" in report.line(), report.line()
    ok, text = report.checks[check]
    assert not ok, report.line()
    if detail:
        assert re.search(detail, text), text


def test_audit_fails_a_rescoring_pass(model, tables):
    """(a) score everything, then score it all again with more context (#991)."""

    def rescore(model, tokens, ledger, rt, **_):
        T.score_windows(model, tokens, ledger, rt, 32, 32, 512)
        T.score_windows(model, tokens, ledger, rt, 32, 8, 512)

    tokens = audit_stream()
    with pytest.raises(T.LeakageError, match="scored twice"):
        run_scorer(rescore, model, tokens, tables)
    assert_fails(audit("rescore", rescore, model, tokens, tables, full=False), "exactly_once", "scored twice")


def test_audit_fails_a_scorer_that_skips_tokens(model, tables):
    """(b) report only the tokens the model finds easy."""

    def skip_hard(model, tokens, ledger, rt, **_):
        inner = T.ScoreLedger(tokens, tables)
        T.score_windows(model, tokens, inner, rt, 32, 32, 512)
        easy = torch.nonzero(inner.nll < inner.nll.median()).flatten() + 1
        ledger.record(easy, inner.nll[easy - 1])

    tokens = audit_stream()
    ledger, _ = run_scorer(skip_hard, model, tokens, tables)
    with pytest.raises(T.LeakageError, match="never scored"):
        ledger.result()
    assert_fails(audit("skip", skip_hard, model, tokens, tables, full=False), "exactly_once", "never scored")


class CompactTTT(T.ScoreFirstLoRATTT):
    """A short per-document LoRA TTT with switchable (il)legal habits; the defaults are legal.

    train_first: take the steps on chunk c before scoring it. tell_ledger: call require_scored
    before each update. epochs > 1 with report='each': score every epoch (#596/#605 as written);
    report='best': keep the lowest nll of each token over the epochs and record it once at the end.
    """

    def __init__(self, cfg, args, rt, train_first=False, tell_ledger=True, epochs=1, report="each"):
        super().__init__(cfg, args, rt)
        self.train_first, self.tell_ledger, self.epochs, self.report = train_first, tell_ledger, epochs, report

    def score_batch(self, model, tokens, ledger, batch, use_adapters, base_ledger):
        C, rows = self.args.ttt_chunk_size, self.args.ttt_batch_size
        num_chunks = [-(-(e - s) // C) for s, e in batch]
        self.adapters.reset([self.args.seed * 1_000_003 + s for s, _ in batch])
        self.optimizer.reset()
        best = {}
        for _ in range(self.epochs):
            for c in range(max(num_chunks)):
                x, y, pos, mask = self.chunk_windows(tokens, batch, c, rows)
                if self.train_first:
                    self.train(model, x, y, pos, mask, ledger)
                with torch.no_grad():
                    if self.report == "each":
                        nll = ledger.score(model, x, y, pos, mask, self.adapters)
                    else:
                        nll = T.token_nll(model, x, y, self.adapters)
                if self.report != "each":
                    for p, v in zip(pos[mask].tolist(), nll[mask].tolist()):
                        best[p] = min(v, best.get(p, math.inf))
                if not self.train_first:
                    self.train(model, x, y, pos, mask, ledger)
        if best:
            ledger.record(torch.tensor(list(best)), torch.tensor(list(best.values())))
        return 0.0, 0

    def train(self, model, x, y, pos, mask, ledger):
        if self.tell_ledger:
            ledger.require_scored(pos[mask])
        lr = torch.full((self.args.ttt_batch_size,), self.args.ttt_lr)
        for _ in range(self.args.ttt_steps):
            with torch.enable_grad():
                nll = T.token_nll(model, x, y, self.adapters)
                ((nll * mask).sum(1) / mask.sum(1).clamp_min(1)).sum().backward()
            self.optimizer.step(lr)
            for p in self.adapters.parameters():
                p.grad = None


def compact(model, **habits):
    args = tiny_args(TTT_LR=0.05, TTT_STEPS=2)
    return CompactTTT(model.cfg, args, T.Runtime(), **habits)


def test_cut_point_lies_inside_a_chunk_of_an_adapted_document():
    """Precondition of the TTT leak tests: the audit's cut t has positions <= t and > t in its chunk."""
    tokens = audit_stream()
    t = audit_cut(tokens)
    (s, e), = [(s, e) for s, e in T.document_spans(tokens) if s < t <= e]
    assert -(-(e - s) // CHUNK) >= 4
    k = (t - s - 1) % CHUNK  # t's place in its chunk (0 = first target)
    assert 1 <= k <= CHUNK - 2 and t + 1 <= e


def test_compact_ttt_in_the_legal_order_passes(model, tables):
    """Control: the harness of the leaky TTT variants passes when its habits are legal."""
    report = audit("compact", compact(model), model, audit_stream(), tables)
    assert report.passed, report.line()


def test_audit_fails_training_on_a_chunk_before_scoring_it(model, tables):
    """(c) train on chunk c, then score it: require_scored stops the scorer."""
    tokens = audit_stream()
    with pytest.raises(T.LeakageError, match="before it was scored"):
        run_scorer(compact(model, train_first=True), model, tokens, tables)
    assert_fails(audit("train_first", compact(model, train_first=True), model, tokens, tables, full=False), "score_before_update", "before it was scored")


def test_causal_check_catches_training_before_scoring_without_telling_the_ledger(model, tables):
    """(c) the same leak with require_scored bypassed: the ledger sees nothing, the rerun does."""
    tokens = audit_stream()
    report = audit("train_first_silent", compact(model, train_first=True, tell_ledger=False), model, tokens, tables)
    assert report.checks["exactly_once"][0] and report.checks["normalized"][0]
    assert_fails(report, "causal", r"later_moved:True")
    assert float(re.search(r"max_change_upto_t:(\S+)", report.checks["causal"][1]).group(1)) > 0


def uncausal_attention(q, k, v, backend, layout=None):
    y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=False, enable_gqa=True)
    return y.transpose(1, 2)


@pytest.mark.parametrize("name", ["standard", "sliding_window", "ttt_lora"])
def test_audit_fails_attention_without_a_causal_mask(model, tables, monkeypatch, name):
    """(d) the attention mask dropped. N/2 is a window end of both window paths here (as with the
    default 8192-token probe and power-of-two windows), so a cut at N/2 would not show it."""
    tokens = audit_stream()
    scorer = scorer_of(name, tiny_args(TTT_LR=0.05))
    monkeypatch.setattr(T, "causal_attention", uncausal_attention)
    report = audit(name, scorer, model, tokens, tables)
    assert_fails(report, "causal")
    assert report.checks["normalized"][0] and report.checks["exactly_once"][0]


class PeekAhead(nn.Module):
    """A model wrapper whose logits at each input also see the token `offset` places later."""

    def __init__(self, model, offset):
        super().__init__()
        self.model, self.offset = model, offset

    def forward(self, idx, targets=None, adapters=None):
        logits = self.model(idx, adapters=adapters)
        ahead = F.pad(idx[:, self.offset :], (0, self.offset))
        return logits + 4.0 * F.one_hot(ahead, logits.size(-1)).float()


def test_audit_fails_a_model_that_reads_past_its_target(model, tables):
    """(d) the logits at position p see tokens[p + 1], the token after the target."""
    report = audit("peek2", scorer_of("standard", tiny_args()), PeekAhead(model, 2), audit_stream(), tables)
    assert_fails(report, "causal")


def whole_stream(model, tokens):
    """The positions, targets and logits of one window over the whole stream, for the cheats below."""
    with torch.no_grad():
        logits = model(tokens[:-1][None]).float()[0]
    return torch.arange(1, tokens.numel()), tokens[1:], logits


def nll_at(logq, y):
    return -logq.gather(-1, y[:, None])[:, 0]


def target_temperature_scorer(model, tokens, ledger, rt, **_):
    """(e) sharpen only the target's logit: q(v) = exp(2 l_v - logsumexp(l)), noted over the whole vocabulary."""
    pos, y, logits = whole_stream(model, tokens)
    logq = 2 * logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    ledger.record(pos, nll_at(logq, y), logq)


def subset_scorer(model, tokens, ledger, rt, **_):
    """(e) normalize over the 16 likeliest tokens only (a restriction), score every token against that."""
    pos, y, logits = whole_stream(model, tokens)
    logq = logits - torch.logsumexp(logits.topk(16, dim=-1).values, dim=-1, keepdim=True)
    ledger.record(pos, nll_at(logq, y), logq)


@pytest.mark.parametrize("scorer", [target_temperature_scorer, subset_scorer])
def test_audit_fails_an_unnormalized_distribution(model, tables, scorer):
    """(e) ScoreLedger.score normalizes by itself, so these cheats compute their own nll and show the
    ledger the distribution they score with; it does not sum to 1 over the vocabulary."""
    report = audit(scorer.__name__, scorer, model, audit_stream(), tables)
    assert_fails(report, "normalized")
    assert report.checks["causal"][0] and report.checks["exactly_once"][0]


def test_best_of_several_passes_is_refused(model, tables):
    """(f) #596/#605: several epochs over each document, reporting the best (or last) epoch."""
    tokens = audit_stream()
    with pytest.raises(T.LeakageError, match="scored twice"):  # as written: every epoch recorded
        run_scorer(compact(model, epochs=2), model, tokens, tables)
    assert_fails(audit("epochs", compact(model, epochs=2), model, tokens, tables, full=False), "exactly_once", "scored twice")
    # the best epoch kept aside and recorded once: the first update is on tokens not yet recorded
    with pytest.raises(T.LeakageError, match="before it was scored"):
        run_scorer(compact(model, epochs=2, report="best"), model, tokens, tables)
    # ...and with require_scored bypassed too, the losses before t depend on tokens after it
    sneaky = compact(model, epochs=2, report="best", tell_ledger=False)
    assert_fails(audit("best_epoch", sneaky, model, tokens, tables), "causal")
    legal, _ = run_scorer(compact(model), model, tokens, tables)
    cheat, _ = run_scorer(sneaky, model, tokens, tables)
    assert cheat.result().nll_sum < legal.result().nll_sum  # what the cheat would have claimed


def mismatched_scorer(model, tokens, ledger, rt, **_):
    """Shows the honest distribution, records the target-sharpened nll of target_temperature_scorer."""
    pos, y, logits = whole_stream(model, tokens)
    logq = 2 * logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    ledger.record(pos, nll_at(logq, y), torch.log_softmax(logits, dim=-1))


def unshown_scorer(model, tokens, ledger, rt, **_):
    """Records honest-looking nll values but shows the ledger no distribution at all."""
    pos, y, logits = whole_stream(model, tokens)
    ledger.record(pos, nll_at((2 * logits).log_softmax(-1), y))


@pytest.mark.parametrize("scorer", [mismatched_scorer, unshown_scorer])
def test_audit_fails_an_nll_not_taken_from_the_shown_distribution(model, tables, scorer):
    report = audit(scorer.__name__, scorer, model, audit_stream(), tables)
    assert_fails(report, "normalized")


def test_audit_fails_a_model_that_reads_its_own_target(model, tables):
    """(d) the logits at position p see tokens[p], the target: no nll at or before t moves when the
    tokens after t change, but the distribution at t + 1 does."""
    report = audit("peek1", scorer_of("standard", tiny_args()), PeekAhead(model, 1), audit_stream(), tables)
    assert_fails(report, "causal")


# ----------------------------------------------------------------------------- score-first TTT


def repetitive_document(length=400, period=20, seed=0) -> torch.Tensor:
    pattern = np.random.default_rng(seed).integers(4, VOCAB, size=period)
    return torch.from_numpy(np.concatenate([[T.BOS_ID], np.resize(pattern, length)]).astype(np.int64))


def test_ttt_improves_a_long_repetitive_document(model, tables):
    tokens = repetitive_document()
    env = dict(TTT_CHUNK_SIZE=16, TTT_CONTEXT_LEN=32, TTT_STEPS=2)
    ttt, base, stats = ttt_run(model, tokens, tables, base=True, TTT_LR=0.05, **env)
    assert stats.docs_adapted == 1 and stats.updates == 400 // 16 - 1
    gain = base.result().nll_sum - ttt.result().nll_sum
    assert gain > 0.05 * base.result().nll_sum, (ttt.result(), base.result())
    # score first: the first chunk is scored before any update, so exactly as by the base model
    assert torch.equal(ttt.nll[:16], base.nll[:16])
    # the base ledger of a TTT run is what TTT_LR=0 scores, and TTT_LR=0 is the base model itself
    lr0, lr0_base, stats0 = ttt_run(model, tokens, tables, base=True, TTT_LR=0, **env)
    assert stats0.docs_base == 1 and stats0.updates == 0
    assert torch.equal(lr0.nll, lr0_base.nll) and torch.equal(base.nll, lr0.nll)
    assert base.result() == lr0.result()
    # ...and the base model of the evaluator is the plain model on each chunk's context window
    ref = torch.cat([forward_nll(model, tokens[max(0, t1 - 32):t1], tokens[max(0, t1 - 32) + 1:t1 + 1])[-16:] for t1 in range(16, 401, 16)])
    torch.testing.assert_close(lr0.nll, ref, rtol=1e-5, atol=1e-5)


def test_ttt_lr0_and_base_ledger_on_many_documents(model, tables):
    tokens = doc_stream([30, 7, 45, 64, 19, 52, 33], seed=4)
    ttt, base, stats = ttt_run(model, tokens, tables, base=True, TTT_LR=0.05)
    lr0, _, _ = ttt_run(model, tokens, tables, TTT_LR=0)
    assert torch.equal(base.nll, lr0.nll)
    assert not torch.equal(ttt.nll, lr0.nll)
    for s, e in T.document_spans(tokens):  # each document's first chunk is scored before any update
        first = slice(s, min(s + CHUNK, e))
        assert torch.equal(ttt.nll[first], lr0.nll[first])


def test_the_last_chunk_of_a_document_is_never_trained_on(model, tables, monkeypatch):
    tokens = doc_stream([30, 7, 45, 64, 19, 52, 33, 8, 9], seed=5)
    trained, steps = [], []
    require = T.ScoreLedger.require_scored

    def spy(self, positions):
        assert (self.count[positions - 1] == 1).all()
        trained.append(positions.clone())
        return require(self, positions)

    step = T.BatchedAdam.step
    monkeypatch.setattr(T.ScoreLedger, "require_scored", spy)
    monkeypatch.setattr(T.BatchedAdam, "step", lambda self, lr: (steps.append(lr.clone()), step(self, lr))[1])
    spans = T.document_spans(tokens)
    chunks = [-(-(e - s) // CHUNK) for s, e in spans]
    ledger, _, stats = ttt_run(model, tokens, tables, TTT_LR=0.05, TTT_BATCH_SIZE=1, TTT_STEPS=2)
    assert ledger.updates == stats.updates == sum(c - 1 for c in chunks)
    assert len(steps) == 2 * sum(c - 1 for c in chunks)
    got = torch.cat(trained).sort().values
    want = torch.cat([torch.arange(s + 1, s + 1 + (c - 1) * CHUNK) for (s, e), c in zip(spans, chunks)]).sort().values
    assert torch.equal(got, want), "exactly every chunk but the last of each document is trained on"
    # with several documents per batch, a document on its last chunk takes learning rate 0
    steps.clear()
    ledger4, _, _ = ttt_run(model, tokens, tables, TTT_LR=0.05, TTT_BATCH_SIZE=4, TTT_STEPS=1)
    assert sum(int((lr > 0).sum()) for lr in steps) == sum(c - 1 for c in chunks)
    ledger4.result()


def test_document_length_limits_route_to_the_base_model(model, tables):
    lengths = [12, 25, 40, 70, 18, 55, 33]
    tokens = doc_stream(lengths, seed=6)
    spans = T.document_spans(tokens)
    ledger, _, stats = ttt_run(model, tokens, tables, TTT_LR=0.05, TTT_MIN_DOC_LEN=20, TTT_MAX_DOC_LEN=50)
    adapted = [(s, e) for s, e in spans if 20 <= e - s <= 50]
    assert stats.docs_adapted == len(adapted) == 3 and stats.docs_base == len(spans) - 3
    assert (ledger.count == 1).all() and ledger.result().targets == tokens.numel() - 1
    lr0, _, _ = ttt_run(model, tokens, tables, TTT_LR=0)
    for s, e in spans:
        same = torch.equal(ledger.nll[s:e], lr0.nll[s:e])
        assert same == ((s, e) not in adapted), (s, e)


def test_deadline_fallback_scores_every_token_once_with_the_base_model(model, tables):
    tokens = doc_stream([30, 7, 45, 64, 19, 52, 33], seed=8)
    late, _, stats = ttt_run(model, tokens, tables, deadline=time.perf_counter() - 1, TTT_LR=0.05, TTT_MIN_DOC_LEN=10)
    adaptable = sum(1 for s, e in T.document_spans(tokens) if e - s >= 10)
    assert stats.docs_after_deadline == adaptable == 6 and stats.docs_adapted == 0 and stats.docs_base == 1
    assert stats.updates == 0 and (late.count == 1).all()
    lr0, _, _ = ttt_run(model, tokens, tables, TTT_LR=0)
    assert late.result() == lr0.result()
    on_time, _, stats = ttt_run(model, tokens, tables, deadline=time.perf_counter() + 600, TTT_LR=0.05, TTT_MIN_DOC_LEN=10)
    assert stats.docs_adapted == 6 and stats.docs_after_deadline == 0 and on_time.result() != lr0.result()


@pytest.mark.parametrize("case", ["no_leading_bos", "final_document_of_one_token", "ends_with_bos"])
def test_document_edge_cases_are_scored_once(model, tables, case):
    tokens = doc_stream([20, 33, 17], seed=9, start_with_bos=case != "no_leading_bos")
    if case == "final_document_of_one_token":
        tokens = torch.cat([tokens, torch.tensor([T.BOS_ID, 9])])
    if case == "ends_with_bos":
        tokens = torch.cat([tokens, torch.tensor([T.BOS_ID])])
    spans = T.document_spans(tokens)
    targets = torch.cat([torch.arange(s + 1, e + 1) for s, e in spans])
    assert torch.equal(targets, torch.arange(1, tokens.numel())), "spans' targets are exactly 1 .. N-1, in order"
    if case == "final_document_of_one_token":
        assert spans[-1] == (tokens.numel() - 2, tokens.numel() - 1)
    if case == "no_leading_bos":
        assert spans[0][0] == 0 and tokens[0] != T.BOS_ID
    ledger, _, stats = ttt_run(model, tokens, tables, TTT_LR=0.05)
    assert ledger.result().targets == tokens.numel() - 1 and int(ledger.count.sum()) == tokens.numel() - 1
    assert stats.docs_adapted == len(spans)


@pytest.mark.parametrize("world", [2, 4])
def test_zigzag_ranks_balance_length_sorted_documents(world):
    rng = np.random.default_rng(world)
    lengths = np.sort(rng.integers(1, 3000, size=203))
    ranks = T.zigzag_ranks(len(lengths), world)
    assert sorted(set(ranks)) == list(range(world))
    counts = np.bincount(ranks, minlength=world)
    assert counts.max() - counts.min() <= 1
    totals = np.bincount(ranks, weights=lengths, minlength=world)
    assert totals.max() <= 1.05 * totals.mean() and totals.min() >= 0.95 * totals.mean(), totals


# ----------------------------------------------------------------------------- TTT options: targets, bias, head, optimizer, cosine, progress

TARGETS = ["q", "k", "v", "o", "mlp"]


@pytest.mark.parametrize("target", TARGETS + ["bias"])
def test_each_adapter_acts_alone_per_document_and_resets_to_the_base_model(model, target):
    """A nonzero B of one target (or a nonzero block bias) moves the output of its own document
    only; the fresh adapters of reset (B = 0, bias = 0) give the base model bit for bit."""
    targets = ["q"] if target == "bias" else [target]
    adapters = T.DocumentAdapters(model.cfg, 2, 2, 0, targets, block_bias=target == "bias")
    assert adapters.head is None and all(set(layer) == set(targets) for layer in adapters.layers)
    assert (adapters.bias is not None) == (target == "bias")
    x = torch.randint(4, VOCAB, (2, 24), generator=torch.Generator().manual_seed(11))
    x[:, 0] = T.BOS_ID
    g = torch.Generator().manual_seed(12)
    with torch.no_grad():
        base = model(x)
        for _ in range(2):  # reset twice: also after the adapters were moved
            adapters.reset([5, 6])
            assert torch.equal(model(x, adapters=adapters), base)
            if target == "bias":
                adapters.bias[0].copy_(torch.randn(adapters.bias[0].shape, generator=g) * 0.3)
            else:
                for layer in adapters.layers:
                    B = layer[target].B
                    B[0].copy_(torch.randn(B[0].shape, generator=g) * 0.3)
            out = model(x, adapters=adapters)
            assert (out[0] - base[0]).abs().max() > 1e-2, f"{target}: the adapter does not act"
            assert torch.equal(out[1], base[1]), f"{target}: document 0's adapter leaked into document 1"


TTT_OPTIONS = {
    "q": dict(TTT_TARGETS="q", TTT_HEAD_RANK=0),
    "k": dict(TTT_TARGETS="k", TTT_HEAD_RANK=0),
    "v": dict(TTT_TARGETS="v", TTT_HEAD_RANK=0),
    "o": dict(TTT_TARGETS="o", TTT_HEAD_RANK=0),
    "mlp": dict(TTT_TARGETS="mlp", TTT_HEAD_RANK=0),
    "bias": dict(TTT_TARGETS="q", TTT_HEAD_RANK=0, TTT_BIAS=1),
    "no_head": dict(TTT_HEAD_RANK=0),
}
REPETITIVE = dict(TTT_CHUNK_SIZE=16, TTT_CONTEXT_LEN=32, TTT_STEPS=2, TTT_LR=0.05)


@pytest.mark.parametrize("option", list(TTT_OPTIONS))
def test_ttt_option_scores_once_passes_the_audit_and_learns(model, tables, option):
    env = TTT_OPTIONS[option]
    tokens = repetitive_document()
    ttt, base, stats = ttt_run(model, tokens, tables, base=True, **REPETITIVE, **env)
    assert (ttt.count == 1).all() and ttt.result().targets == tokens.numel() - 1
    assert stats.docs_adapted == 1 and stats.updates == 400 // 16 - 1
    assert torch.equal(ttt.nll[:16], base.nll[:16]), "the first chunk is scored before any update"
    gain = base.result().nll_sum - ttt.result().nll_sum
    assert gain > 0.04 * base.result().nll_sum, (option, ttt.result(), base.result())
    if option == "bias":  # the bias is trained on top of the q adapter: it must change the scores
        without, _, _ = ttt_run(model, tokens, tables, **REPETITIVE, **{**env, "TTT_BIAS": 0})
        assert not torch.equal(ttt.nll, without.nll)
    args = tiny_args(TTT_LR=0.05, **env)
    ttt_path = T.ScoreFirstLoRATTT(model.cfg, args, T.Runtime())
    assert all(set(layer) == set(args.ttt_target_list) for layer in ttt_path.adapters.layers)
    assert (ttt_path.adapters.head is None) == (args.ttt_head_rank == 0)
    assert (ttt_path.adapters.bias is not None) == args.ttt_bias
    report = audit("ttt_lora", dict(T.evaluation_paths(args, ttt_path))["ttt_lora"], model, audit_stream(), tables)
    assert report.passed, report.line()
    assert int(re.search(r"updates:(\d+)", report.checks["score_before_update"][1]).group(1)) > 0


def run_batched_and_reference(kind, wd, lr, steps=3, betas=(0.9, 0.95)):
    """BatchedAdam on parameters whose first dimension is the document, and torch's own optimizer
    on each document's slice with that document's LR, fed the same gradients."""
    g = torch.Generator().manual_seed(0)
    docs = lr.numel()
    shapes = [(docs, 4, 2), (docs, 5), (docs, 2, 1, 6)]
    params = [torch.randn(s, generator=g).requires_grad_() for s in shapes]
    initial = [p.detach().clone() for p in params]
    opt = T.BatchedAdam(params, kind, betas, wd)
    refs = []
    for d in range(docs):
        ps = [p[d].detach().clone().requires_grad_() for p in params]
        if kind == "adam":  # TTT_WD is AdamW's decoupled decay only; Adam and SGD ignore it
            ref = torch.optim.Adam(ps, lr=float(lr[d]), betas=betas, eps=1e-8)
        elif kind == "adamw":
            ref = torch.optim.AdamW(ps, lr=float(lr[d]), betas=betas, eps=1e-8, weight_decay=wd)
        else:
            ref = torch.optim.SGD(ps, lr=float(lr[d]))
        refs.append((ps, ref))
    for _ in range(steps):
        grads = [torch.randn(s, generator=g) for s in shapes]
        for p, grad in zip(params, grads):
            p.grad = grad.clone()
        opt.step(lr)
        for d, (ps, ref) in enumerate(refs):
            for q, grad in zip(ps, grads):
                q.grad = grad[d].clone()
            ref.step()
        for d, (ps, _) in enumerate(refs):
            for p, q in zip(params, ps):
                torch.testing.assert_close(p[d].detach(), q.detach(), rtol=1e-5, atol=1e-6)
    return opt, params, initial


@pytest.mark.parametrize("kind", ["adam", "adamw", "sgd"])
@pytest.mark.parametrize("wd", [0.0, 0.3])
def test_batched_optimizer_matches_torch_per_document(kind, wd):
    lr = torch.tensor([0.1, 0.0, 0.03, 0.01])
    opt, params, initial = run_batched_and_reference(kind, wd, lr)
    for p, p0 in zip(params, initial):
        assert torch.equal(p[1], p0[1]), "a document with LR 0 must stay exactly as it is"
        assert not torch.equal(p[0], p0[0])
    # the closed form of the first step: Adam moves each weight by lr * g / (|g| + eps), AdamW also decays it
    p = torch.randn(2, 3, generator=torch.Generator().manual_seed(1), requires_grad=True)
    p0, grad = p.detach().clone(), torch.randn(2, 3, generator=torch.Generator().manual_seed(2))
    p.grad = grad
    one = T.BatchedAdam([p], kind, (0.9, 0.95), wd)
    one.step(torch.tensor([0.1, 0.2]))
    lr_col = torch.tensor([[0.1], [0.2]])
    if kind == "sgd":
        want = p0 - lr_col * grad
    else:
        decay = 1 - lr_col * wd if kind == "adamw" else 1.0
        want = p0 * decay - lr_col * grad / (grad.abs() + 1e-8)
    torch.testing.assert_close(p.detach(), want, rtol=1e-6, atol=1e-7)


def test_batched_optimizer_reset_clears_its_state():
    lr = torch.tensor([0.1, 0.05])
    opt, params, _ = run_batched_and_reference("adamw", 0.1, lr)
    assert opt.t == 3 and any(bool(m.abs().sum() > 0) for m in opt.m)
    start = [p.detach().clone() for p in params]
    grads = [torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) for p in params]

    def step_from_start(optimizer, ps):
        with torch.no_grad():
            for p, s in zip(ps, start):
                p.copy_(s)
        for p, grad in zip(ps, grads):
            p.grad = grad.clone()
        optimizer.step(lr)
        return [p.detach().clone() for p in ps]

    stale = step_from_start(opt, params)
    opt.reset()
    assert opt.t == 0 and all(not buf.any() for buf in opt.m + opt.v)
    after_reset = step_from_start(opt, params)
    fresh_params = [s.clone().requires_grad_() for s in start]
    fresh = step_from_start(T.BatchedAdam(fresh_params, "adamw", (0.9, 0.95), 0.1), fresh_params)
    assert all(torch.equal(a, b) for a, b in zip(after_reset, fresh)), "after reset a step is a fresh optimizer's first"
    assert not all(torch.equal(a, b) for a, b in zip(stale, fresh)), "the state carried over must matter (else the test is vacuous)"


@pytest.mark.parametrize("cosine", [True, False])
def test_ttt_lr_follows_a_cosine_over_each_documents_chunks(model, tables, monkeypatch, cosine):
    tokens = doc_stream([30, 7, 45, 64, 19, 52, 33, 9], seed=12)
    lrs = []
    step = T.BatchedAdam.step
    monkeypatch.setattr(T.BatchedAdam, "step", lambda self, lr: (lrs.append(lr.clone()), step(self, lr))[1])
    ttt_lr = 0.05
    ledger, _, stats = ttt_run(model, tokens, tables, TTT_LR=ttt_lr, TTT_BATCH_SIZE=1, TTT_STEPS=2, TTT_COSINE=int(cosine))
    spans = sorted(T.document_spans(tokens), key=lambda se: se[1] - se[0])  # the order TTT takes them in
    want = []
    for s, e in spans:
        n = -(-(e - s) // CHUNK)
        for c in range(n - 1):  # every chunk but the last is trained on, TTT_STEPS times at the same LR
            decay = 0.5 * (1 + math.cos(math.pi * c / (n - 1))) if cosine else 1.0
            want += [ttt_lr * decay] * 2
    assert all(lr.shape == (1,) for lr in lrs)
    got = [float(lr[0]) for lr in lrs]
    assert got == pytest.approx(want, rel=1e-6)
    assert len(got) > 20 and len(set(got)) == (len(set(want)) if cosine else 1)
    ledger.result()


@pytest.mark.parametrize("num_docs,batch_size", [(7, 4), (7, 1), (23, 1)])
def test_ttt_progress_lines(model, tables, num_docs, batch_size):
    lengths = [int(n) for n in np.random.default_rng(num_docs).integers(5, 40, size=num_docs)]
    tokens = doc_stream(lengths, seed=13)
    args = tiny_args(TTT_LR=0.05, TTT_BATCH_SIZE=batch_size, TTT_MIN_DOC_LEN=10)
    ledger, lines = T.ScoreLedger(tokens, tables), []
    T.ScoreFirstLoRATTT(model.cfg, args, T.Runtime())(model, tokens, ledger, T.Runtime(), log=lines.append)
    pattern = re.compile(r"^ttt_progress docs:(\d+)/(\d+) running_bpb:(\d+\.\d{4}) elapsed:(\d+\.\d)s eta:(\d+\.\d)s$")
    parsed = [pattern.match(line) for line in lines]
    assert lines and all(parsed), lines
    done = [int(m.group(1)) for m in parsed]
    assert all(int(m.group(2)) == num_docs for m in parsed)
    assert done == sorted(set(done)) and done[-1] == num_docs, f"the last line must say docs:{num_docs}/{num_docs}: {lines}"
    assert len(lines) <= 12, "about ten progress lines, not one per batch"
    last = parsed[-1]
    assert last.group(5) == "0.0"
    assert last.group(3) == f"{ledger.result().val_bpb:.4f}", "the running bpb of all documents is the final bpb"
    assert [float(m.group(4)) for m in parsed] == sorted(float(m.group(4)) for m in parsed)


# ----------------------------------------------------------------------------- several ranks (gloo)


def multi_rank_stream() -> torch.Tensor:
    return doc_stream([30, 7, 45, 64, 19, 52, 33, 8, 41, 26, 60, 12], seed=10)


def evaluate_all_paths(rt) -> dict:
    torch.manual_seed(0)
    args = tiny_args(TTT_LR=0.05)
    m = tiny_model(0)
    m.requires_grad_(False)
    tokens, tables = multi_rank_stream(), toy_tables(VOCAB)
    out = {}
    for name, scorer in T.evaluation_paths(args, T.ScoreFirstLoRATTT(m.cfg, args, rt)):
        ledger = T.ScoreLedger(tokens, tables)
        stats = scorer(m, tokens, ledger, rt)
        ledger.merge(rt)
        counts = [0, 0, 0, 0]
        if stats is not None:
            counts = torch.tensor([stats.docs_adapted, stats.docs_base, stats.docs_after_deadline, stats.updates])
            if rt.distributed:
                dist.all_reduce(counts)
            counts = counts.tolist()
        out[name] = (ledger.nll.clone(), ledger.count.clone(), ledger.result(), counts)
    return out


def _rank_worker(rank, world, port, path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out = evaluate_all_paths(T.Runtime(rank, world, 0, torch.device("cpu"), True))
        torch.save(out, f"{path}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_give_the_single_process_scores(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(_rank_worker, args=(2, port, str(tmp_path / "out")), nprocs=2, join=False, start_method="spawn")
    deadline = time.time() + 120
    while not ctx.join(timeout=1):
        if time.time() > deadline:
            for p in ctx.processes:
                p.terminate()
            pytest.fail("the two gloo ranks did not finish in 120 s")
    single = evaluate_all_paths(T.Runtime())
    for rank in range(2):
        multi = torch.load(tmp_path / f"out.{rank}", weights_only=False)
        for name in ("standard", "sliding_window", "ttt_lora"):
            nll1, count1, res1, stats1 = single[name]
            nll2, count2, res2, stats2 = multi[name]
            assert (count2 == 1).all() and res2.targets == res1.targets and res2.byte_sum == res1.byte_sum
            # same windows and per-document adapters seeded per document: equal up to float noise (bit-equal on CPU here)
            torch.testing.assert_close(nll2, nll1, rtol=1e-6, atol=1e-6, msg=name)
            assert math.isclose(res2.nll_sum, res1.nll_sum, rel_tol=1e-9), name
            # documents adapted / base / after the deadline; not the update count, which is per batch
            assert stats2[:3] == stats1[:3], name


def test_ttt_deadline_counts_eight_gpu_seconds():
    assert T.ttt_deadline(100.0, 500.0, 8) == 600.0
    assert T.ttt_deadline(100.0, 500.0, 1) == 100.0 + 4000.0  # one GPU does eight GPUs' work
    assert T.ttt_deadline(100.0, 0.0, 8) is None
    assert T.Hyperparameters({}).ttt_deadline_seconds == 500.0
