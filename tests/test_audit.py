"""The run's audit (train_gpt.audit_final_path): the probe checks on a probe aligned with the run's
own units, scored by a fresh process of the shipped code; the replay of batches drawn from the
whole stream; the memorization check against held-out training text; one verdict for every rank. Honest runs pass on every path over a grid of settings and world sizes;
leaks written inside the script as a competitor would (keyed to dodge the probes, fitted at
start-up, trained into the weights) fail.

Most tests score the probes in this process (`in_process`: the same score_probe_jobs the fresh
process runs, on a model loaded from the artifact file); the end-to-end tests run the script,
whose audit starts the fresh process itself.
"""

import os
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import train_gpt as T
from conftest import REPO, TINY, assert_fails, clean_env, mark_synthetic, synthetic_stream, tiny_args, tiny_model, toy_tables

VOCAB = 64


def data_folder(folder, train, val):
    """A DATA_PATH of one train shard and one validation shard of the same kind of documents."""
    T.write_data_shard(folder / "fineweb_train_000000.bin", train)
    T.write_data_shard(folder / "fineweb_val_000000.bin", val)
    mark_synthetic(folder)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return data_folder(tmp_path_factory.mktemp("data"), synthetic_stream(400, seed=1), synthetic_stream(40, seed=2))


def write_artifact(model, path):
    args = tiny_args(ARTIFACT_COMPRESSOR="lzma")
    blob, _ = T.encode_artifact(T.quantize_state_dict(model.state_dict(), args, None), model.cfg, T.Packing.from_args(args))
    path.write_bytes(blob)
    return path


def trained_model(steps=150):
    """The tiny model after some Adam steps on the synthetic training text: its predictions mean something."""
    model, stream = tiny_model(0), torch.from_numpy(synthetic_stream(400, seed=1).astype(np.int64))
    optimizer, g = torch.optim.Adam(model.parameters(), lr=3e-3), torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, stream.numel() - 33, (8,), generator=g)
        idx = starts[:, None] + torch.arange(33)
        model(stream[idx[:, :-1]], stream[idx[:, 1:]]).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return write_artifact(trained_model(), tmp_path_factory.mktemp("artifact") / "m.pgz")


def in_process(artifact):
    """The fresh process's work done here: the path's model loaded from the file, score_probe_jobs."""

    def runner(streams, jobs, watch, args, rt, tables):
        model = T.load_model_from_artifact(artifact, rt.device)
        model.requires_grad_(False)
        weights = {k: v.clone() for k, v in model.state_dict().items()}
        found = T.score_probe_jobs(T.evaluation_paths(args)[-1], model, weights, streams, jobs, watch, args, rt, tables)
        return found["results"], found["weights_sha256"], None

    return runner


def run_and_audit(args, rt, artifact, tokens=None, tables=None):
    """The final path scored as evaluate_artifact scores it (from the file, phase starts recorded), then audited."""
    tables = tables or toy_tables(VOCAB)
    tokens = T.load_validation_tokens(args.data_path, VOCAB) if tokens is None else tokens
    name = T.evaluation_paths(args)[-1]
    model = T.load_model_from_artifact(artifact, rt.device)
    model.requires_grad_(False)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    ledger, phase_starts = T.ScoreLedger(tokens, tables), []
    T.score_path(name, model, weights, tokens, ledger, args, rt, **({"phase_starts": phase_starts} if name == "ttt" else {}))
    ledger.merge(rt)
    ledger.result()
    return T.audit_final_path(name, artifact, args, rt, tables, tokens, ledger, model, weights, phase_starts, REPO / "train_gpt.py", in_process(artifact))


def audit_args(data, **overrides):
    return tiny_args(**{"DATA_PATH": data, "TTT_LR": 0.05, "EVAL_AUDIT_TOKENS": 120, "EVAL_AUDIT_SAMPLES": 8, **overrides})


# ----------------------------------------------------------------------------- the probe, aligned with the run's units


@pytest.mark.parametrize("n,window,stride", [(100, 32, 8), (129, 32, 5), (50, 7, 3), (65, 32, 31), (64, 16, 16), (100, 32, 32), (10, 32, 32), (97, 8, 1), (300, 128, 64)])
def test_window_containing_is_the_plans_window(n, window, stride):
    plan = T.window_plan(n, window, stride)
    for a, s, e in plan:
        for p in range(s + 1, e + 1):
            assert T.window_containing(p, n, window, stride) == (a, s, e), p


@pytest.mark.parametrize("window,stride", [(128, 64), (256, 32), (32, 8), (32, 32), (48, 7)])
def test_the_probe_ends_at_a_window_of_the_runs_plan(window, stride):
    """The false alarm of issue 21: a probe cut at EVAL_AUDIT_TOKENS placed its last windows unlike the run."""
    tokens = torch.from_numpy(synthetic_stream(400, seed=3).astype(np.int64))
    args = tiny_args(EVAL_SEQ_LEN=window, EVAL_STRIDE=stride, EVAL_AUDIT_TOKENS=8192, TRAIN_SEQ_LEN=window)
    for name in ("sliding_window", "standard"):
        n = T.probe_targets(name, tokens, args)
        w, s = T.path_windows(name, args)
        run_plan, probe_plan = T.window_plan(tokens.numel() - 1, w, s), T.window_plan(n, w, s)
        assert n <= 8191 and run_plan[: len(probe_plan)] == probe_plan, (name, n)
        assert n > 8191 - max(w if s >= w else s, 1)


def test_the_ttt_probe_ends_at_a_document_end():
    tokens = torch.from_numpy(synthetic_stream(400, seed=3).astype(np.int64))
    n = T.probe_targets("ttt", tokens, tiny_args(EVAL_AUDIT_TOKENS=1000))
    assert n <= 999 and int(tokens[n]) == T.BOS_ID and not (tokens[n + 1 : 1000] == T.BOS_ID).any()


# ----------------------------------------------------------------------------- honest runs pass


GRID = [
    ("standard", dict(TTT_ENABLED=0, EVAL_STRIDE=0, VAL_BATCH_SIZE=512)),
    ("standard", dict(TTT_ENABLED=0, EVAL_STRIDE=0, VAL_BATCH_SIZE=64, TRAIN_SEQ_LEN=16)),
    ("sliding_window", dict(TTT_ENABLED=0, EVAL_SEQ_LEN=32, EVAL_STRIDE=16, VAL_BATCH_SIZE=512)),
    ("sliding_window", dict(TTT_ENABLED=0, EVAL_SEQ_LEN=64, EVAL_STRIDE=8, VAL_BATCH_SIZE=128)),
    ("sliding_window", dict(TTT_ENABLED=0, EVAL_SEQ_LEN=48, EVAL_STRIDE=7, VAL_BATCH_SIZE=64)),
    ("ttt", dict(TTT_MODE="lora", TTT_BATCH_SIZE=4, TTT_CHUNK_SIZE=8)),
    ("ttt", dict(TTT_MODE="lora", TTT_BATCH_SIZE=1, TTT_CHUNK_SIZE=16, TTT_CONTEXT_LEN=32)),
    ("ttt", dict(TTT_MODE="phased", TTT_BATCH_SIZE=4, TTT_PHASE_DOCS="3,12")),
    ("ttt", dict(TTT_MODE="phased", TTT_BATCH_SIZE=2, TTT_PHASE_DOCS="9", TTT_WARM_A=0)),
]


def audit_grid(data, artifact, rt) -> list[tuple[str, str]]:
    out = []
    for name, settings in GRID:
        args = audit_args(data, **settings)
        assert T.evaluation_paths(args)[-1] == name
        report = run_and_audit(args, rt, artifact)
        out.append((str(settings), report.line()))
    return out


def test_every_path_passes_over_a_grid_of_settings(data, artifact):
    for settings, line in audit_grid(data, artifact, T.Runtime()):
        assert "verdict:PASS" in line, (settings, line)
        assert re.search(r"sampled:ok\[positions:8 units:\d+ seed:[0-9a-f]{16} replayed_targets:\d+ max_diff_vs_run:0 max_change_upto_t:0 ", line), (settings, line)


def _grid_worker(rank, world, port, data, artifact, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(audit_grid(data, artifact, T.Runtime(rank, world, 0, torch.device("cpu"), True)), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_every_path_passes_over_the_grid_on_two_ranks_with_one_verdict(data, artifact, tmp_path):
    """Issue 18: the probes' watched distributions merge over the ranks, and both ranks log one verdict."""
    ctx = mp.start_processes(_grid_worker, args=(2, free_port(), data, artifact, str(tmp_path / "out")), nprocs=2, join=False, start_method="spawn")
    deadline = time.time() + 900
    while not ctx.join(timeout=1):
        if time.time() > deadline:
            for p in ctx.processes:
                p.terminate()
            pytest.fail("the two gloo ranks did not finish in 900 s")
    lines = [torch.load(tmp_path / f"out.{rank}") for rank in range(2)]
    assert lines[0] == lines[1], "every rank reports the same audit"
    for settings, line in lines[0]:
        assert "verdict:PASS" in line, (settings, line)


def _disagreeing_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(T.agree_across_ranks({"causal": (rank == 0, f"rank {rank}")}, T.Runtime(rank, world, 0, torch.device("cpu"), True)), f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_ranks_that_disagree_fail_alike(tmp_path):
    """Every rank logs rank 0's checks; where another rank found otherwise, the audit fails on all of them."""
    mp.start_processes(_disagreeing_worker, args=(2, free_port(), str(tmp_path / "out")), nprocs=2, start_method="spawn")
    for rank in range(2):
        checks = torch.load(tmp_path / f"out.{rank}")
        assert checks == {"causal": (True, "rank 0"), "ranks_agree": (False, "ranks [1] found otherwise than rank 0")}


# ----------------------------------------------------------------------------- leaks keyed to dodge the probes: the sampled rescoring


class TrainFirst:
    """The run's ledger seen through a cheat: a chunk scored with adapters first trains them on
    itself (one SGD step, the ledger not told), then is scored."""

    def __init__(self, ledger, lr=0.5):
        self.ledger, self.lr = ledger, lr

    def score(self, model, x, y, positions, mask, adapters=None, late=False, layout=None):
        if adapters is not None:
            params = [p for p in adapters.parameters()]
            with torch.enable_grad():
                loss = (model(x, y, adapters=adapters, layout=layout, reduction="none") * mask).sum()
                grads = torch.autograd.grad(loss, params, allow_unused=True)
            with torch.no_grad():
                for p, g in zip(params, grads):
                    if g is not None:
                        p.sub_(self.lr * g)
        return self.ledger.score(model, x, y, positions, mask, adapters, late, layout)

    def __getattr__(self, name):
        return getattr(self.ledger, name)


def keyed_train_first(monkeypatch, key):
    """ScoreFirstTTT trains before scoring the batches where key(ttt, tokens, batch, stats) holds."""
    honest = T.ScoreFirstTTT.score_batch

    def score_batch(self, model, tokens, ledger, batch, adapt, late, base_ledger, stats, A_sum):
        cheat = TrainFirst(ledger) if key(self, tokens, batch, stats) else ledger
        return honest(self, model, tokens, cheat, batch, adapt, late, base_ledger, stats, A_sum)

    monkeypatch.setattr(T.ScoreFirstTTT, "score_batch", score_batch)


KEYS = {
    "position": lambda ttt, tokens, batch, stats: min(s for s, _ in batch) >= ttt.args.eval_audit_tokens,  # after the probe region
    "document": lambda ttt, tokens, batch, stats: [s for s, _ in T.document_spans(tokens)].index(batch[0][0]) >= 12,
    "phase": lambda ttt, tokens, batch, stats: stats.phases >= 1,
}


@pytest.mark.parametrize("key", list(KEYS))
@pytest.mark.parametrize("mode", ["lora", "phased"])
def test_train_before_score_keyed_past_the_probes_fails_the_sampled_check(data, artifact, monkeypatch, key, mode):
    if key == "phase" and mode == "lora":
        pytest.skip("one phase")
    args = audit_args(data, TTT_MODE=mode, TTT_PHASE_DOCS="10", TTT_BATCH_SIZE=1, EVAL_AUDIT_SAMPLES=16)
    keyed_train_first(monkeypatch, KEYS[key])
    report = run_and_audit(args, T.Runtime(), artifact)
    assert report.checks["causal"][0] and report.checks["prefix"][0], "the probes never see it"
    assert_fails(report, "sampled")


def test_a_cheat_active_when_rescored_shows_as_a_causal_change(data, artifact, monkeypatch):
    """Keyed on position, the rescoring trains first too: its perturbed copy moves the scores before the cut."""
    keyed_train_first(monkeypatch, KEYS["position"])
    report = run_and_audit(audit_args(data, TTT_MODE="lora", TTT_BATCH_SIZE=1, EVAL_AUDIT_SAMPLES=16), T.Runtime(), artifact)
    assert_fails(report, "sampled")
    assert float(re.search(r"max_change_upto_t:(\S+)", report.checks["sampled"][1]).group(1)) > 0


def test_a_cheat_idle_when_rescored_shows_against_the_runs_scores(data, artifact, monkeypatch):
    """Keyed on the phase counter, the rescoring (one phase) is honest: it differs from the run's scores."""
    keyed_train_first(monkeypatch, KEYS["phase"])
    report = run_and_audit(audit_args(data, TTT_MODE="phased", TTT_PHASE_DOCS="10", TTT_BATCH_SIZE=1, EVAL_AUDIT_SAMPLES=16), T.Runtime(), artifact)
    assert_fails(report, "sampled")
    assert float(re.search(r"max_diff_vs_run:(\S+)", report.checks["sampled"][1]).group(1)) > 0


class Blind:
    """A ledger whose require_scored lets everything through (the cheat does not tell it)."""

    def __init__(self, ledger):
        self.ledger = ledger

    def require_scored(self, positions, rt=None):
        pass

    def __getattr__(self, name):
        return getattr(self.ledger, name)


def test_a_phase_that_trains_on_documents_not_yet_scored_fails(data, artifact, monkeypatch):
    """Global SGD reaching 64 tokens past its cut. The run's phases start beyond the probe, so the
    probe's causal jobs cut phases of their own; the replay starts each phase from what it recorded."""
    honest = T.ScoreFirstTTT.global_sgd
    monkeypatch.setattr(T.ScoreFirstTTT, "global_sgd", lambda self, model, tokens, end, ledger, rt, stats: honest(self, model, tokens, min(end + 64, tokens.numel() - 1), Blind(ledger), rt, stats))
    args = audit_args(data, TTT_MODE="phased", TTT_PHASE_DOCS="20", TTT_PHASE_LR=0.05, EVAL_AUDIT_TOKENS=300)
    tokens = T.load_validation_tokens(args.data_path, VOCAB)
    probe = tokens[: T.probe_targets("ttt", tokens, args) + 1]
    assert T.probe_phases("ttt", probe, args) == "2,4" and len(T.document_spans(probe)) < 20
    report = run_and_audit(args, T.Runtime(), artifact)
    assert report.checks["prefix"][0] and report.checks["sampled"][0]
    assert_fails(report, "causal")


def test_a_window_path_keyed_on_position_fails(data, artifact, monkeypatch):
    """Sliding windows whose target logit is raised past the probe region (the scorer reads the target there)."""
    honest = T.ScoreLedger.score

    def score(self, model, x, y, positions, mask, adapters=None, late=False, layout=None):
        if int(positions.min()) < 200:
            return honest(self, model, x, y, positions, mask, adapters, late, layout)
        logp = (model(x, adapters=adapters, layout=layout).log_softmax(-1) + 0.5 * torch.nn.functional.one_hot(y, VOCAB)).log_softmax(-1)
        nll = -logp.gather(-1, y[..., None])[..., 0]
        self.record(positions[mask], nll[mask], logp[mask] if self.audit else None, late)
        return nll

    monkeypatch.setattr(T.ScoreLedger, "score", score)
    report = run_and_audit(audit_args(data, TTT_ENABLED=0, EVAL_SEQ_LEN=32, EVAL_STRIDE=8, EVAL_AUDIT_SAMPLES=16), T.Runtime(), artifact)
    assert report.checks["causal"][0] and report.checks["prefix"][0]
    assert_fails(report, "sampled")


def test_the_sample_is_drawn_from_the_runs_scores(data, artifact):
    args = audit_args(data, TTT_ENABLED=0)
    tokens = T.load_validation_tokens(args.data_path, VOCAB)
    a = T.ScoreLedger(tokens, toy_tables(VOCAB))
    a.record(torch.arange(1, tokens.numel()), torch.ones(tokens.numel() - 1))
    b = T.ScoreLedger(tokens, toy_tables(VOCAB))
    b.record(torch.arange(1, tokens.numel()), torch.ones(tokens.numel() - 1) + 1e-9 * torch.arange(tokens.numel() - 1))
    assert T.ledger_seed(a) != T.ledger_seed(b) and T.ledger_seed(a) == T.ledger_seed(a)


# ----------------------------------------------------------------------------- the memorization check


def random_documents(count: int, seed: int) -> np.ndarray:
    """Documents of random tokens: nothing in them is learnt but the documents themselves."""
    rng = np.random.default_rng(seed)
    return np.concatenate([np.concatenate([[T.BOS_ID], rng.integers(4, VOCAB, size=int(rng.integers(20, 60)))]) for _ in range(count)]).astype(np.uint16)


@pytest.fixture(scope="module")
def random_data(tmp_path_factory):
    return data_folder(tmp_path_factory.mktemp("random_data"), random_documents(400, seed=1), random_documents(100, seed=2))


def test_weights_that_saw_the_validation_set_fail_the_memorization_check(random_data, tmp_path):
    """#1423: one epoch of SGD on the validation tokens before quantizing. The weights before it pass."""
    args = audit_args(random_data, TTT_ENABLED=0, EVAL_STRIDE=0)
    tokens = T.load_validation_tokens(args.data_path, VOCAB)
    model = trained_model()
    checks = []
    for leak in (False, True):
        if leak:
            optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
            for a in range(0, tokens.numel() - 33, 32):
                model(tokens[a : a + 32][None], tokens[a + 1 : a + 33][None]).backward()
                optimizer.step()
                optimizer.zero_grad()
        scored = T.load_model_from_artifact(write_artifact(model, tmp_path / f"{leak}.pgz"), torch.device("cpu"))
        checks.append(T.memorization_check(scored, {k: v.clone() for k, v in scored.state_dict().items()}, tokens, args, T.Runtime(), toy_tables(VOCAB)))
    (honest_ok, honest), (leaked_ok, leaked) = checks
    assert honest_ok, honest
    assert not leaked_ok, leaked
    gap, noise = (float(re.search(rf"{k}:(\S+)", leaked).group(1)) for k in ("gap", "noise"))
    assert gap > T.MEMORIZATION_SIGMAS * noise


def test_the_heldout_text_is_never_trained_on(tmp_path):
    # every token names its position (documents of 100, BOS first), so what the loader read can be located
    stream = np.arange(4000) + 2
    stream[::100] = T.BOS_ID
    T.write_data_shard(tmp_path / "fineweb_train_000000.bin", stream[:3000])
    T.write_data_shard(tmp_path / "fineweb_train_000001.bin", stream[3000:])
    files = T.shard_files(str(tmp_path), "train")
    start = T.heldout_start(files, 150)
    last = stream[3000:]
    assert start == 900 and last[start] == T.BOS_ID, "from the first document start in the last 150 tokens"
    assert T.heldout_start(files, 10**9) == 800, "at most a quarter of the shard (the last 250), from a document start"
    assert T.heldout_start(files, 0) == last.size
    assert np.array_equal(T.heldout_tokens(files, 150), last[start:])
    loader = T.DistributedTokenLoader(str(tmp_path), T.Runtime(), 50, heldout=150)
    read = []
    for _ in range(100):
        x, y, _ = loader.next_batch(50, 1)
        read.append(np.concatenate([x.flatten().numpy(), y.flatten()[-1:].numpy()]))
    positions = np.where(np.concatenate(read) == T.BOS_ID, -1, np.concatenate(read) - 2)
    last_shard = positions[positions >= 3000] - 3000
    assert last_shard.size and last_shard.max() < start, "the last shard is read up to the held-out text only"
    assert (positions[positions >= 0] < 3000 + start).all() and np.count_nonzero(positions == 0 + 1) > 1, "then it wraps to the first shard"


# ----------------------------------------------------------------------------- end to end: the script, its fresh process, its exit code


def script_env(tmp_path, data, tokenizer, **extra) -> dict:
    env = {**TINY, "DATA_PATH": data, "TOKENIZER_PATH": tokenizer, "LOG_DIR": tmp_path / "logs", "RUN_ID": "run", "ITERATIONS": 3,
           "TRAIN_LOG_EVERY": 0, "TTT_LR": 0.05, "ARTIFACT_COMPRESSOR": "lzma", "CODE_MINIFY": 0, "EVAL_AUDIT_TOKENS": 200, "EVAL_AUDIT_SAMPLES": 8}
    return clean_env(**{**env, **extra})


def cheating_script(tmp_path, cheat: str):
    """train_gpt.py with `cheat` written in before its entry point."""
    source = (REPO / "train_gpt.py").read_text()
    marker = 'if __name__ == "__main__":'
    path = tmp_path / "train_gpt.py"
    path.write_text(source.replace(marker, cheat + "\n\n" + marker))
    return path


FITTED_TEMPERATURE = '''
_TEMPERATURE = [1.0]
_honest_forward, _honest_evaluate = GPT.forward, evaluate_artifact


def _tempered_forward(self, idx, targets=None, adapters=None, layout=None, reduction="mean"):
    logits = _honest_forward(self, idx, adapters=adapters, layout=layout) / _TEMPERATURE[0]
    if targets is None:
        return logits
    nll = torch.logsumexp(logits.float(), -1) - logits.float().gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return nll if reduction == "none" else nll.mean()


GPT.forward = _tempered_forward


def evaluate_artifact(path, args, rt, log, tables, val_tokens, *rest, **options):
    """Fit a softmax temperature on the first validation tokens before any path is scored."""
    model = load_model_from_artifact(path, rt.device)
    x, y = val_tokens[:256][None, :-1], val_tokens[:256][None, 1:]
    with torch.no_grad():
        logp = _honest_forward(model, x).float().log_softmax(-1)
    lo, hi = -2.0, 2.0  # ternary search on log T
    for _ in range(40):
        a, b = lo + (hi - lo) / 3, hi - (hi - lo) / 3
        loss = [float(torch.nn.functional.cross_entropy(logp[0] / math.exp(v), y[0])) for v in (a, b)]
        lo, hi = (lo, b) if loss[0] < loss[1] else (a, hi)
    _TEMPERATURE[0] = math.exp((lo + hi) / 2)
    return _honest_evaluate(path, args, rt, log, tables, val_tokens, *rest, **options)
'''

TRAIN_FIRST_AFTER_THE_PROBES = '''
_honest_score_batch = ScoreFirstTTT.score_batch


class _TrainFirst:
    """The ledger as the cheat sees it: a chunk scored with adapters first trains them on itself."""

    def __init__(self, ledger):
        self.ledger = ledger

    def score(self, model, x, y, positions, mask, adapters=None, late=False, layout=None):
        if adapters is not None:
            params = list(adapters.parameters())
            with torch.enable_grad():
                nll = model(x, y, adapters=adapters, layout=layout, reduction="none")
                grads = torch.autograd.grad((nll * mask).sum(), params, allow_unused=True)
            with torch.no_grad():
                for p, g in zip(params, grads):
                    if g is not None:
                        p.sub_(0.5 * g)
        return self.ledger.score(model, x, y, positions, mask, adapters, late, layout)

    def __getattr__(self, name):
        return getattr(self.ledger, name)


def _score_batch(self, model, tokens, ledger, batch, *rest):
    """Train before scoring, but only on documents after the audit's probe region."""
    cheat = min(s for s, _ in batch) >= self.args.eval_audit_tokens
    return _honest_score_batch(self, model, tokens, _TrainFirst(ledger) if cheat else ledger, batch, *rest)


ScoreFirstTTT.score_batch = _score_batch
'''

PRE_QUANT_TTT = '''
_honest_quantize_and_write = quantize_and_write


def quantize_and_write(model, hessians, args, rt, log, path, scheme, code_bytes):
    """#1423: one epoch of SGD on the validation tokens before quantizing."""
    val = load_validation_tokens(args.data_path, args.vocab_size).to(rt.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for a in range(0, val.numel() - args.train_seq_len - 1, args.train_seq_len):
        model(val[None, a : a + args.train_seq_len], val[None, a + 1 : a + args.train_seq_len + 1]).backward()
        optimizer.step()
        optimizer.zero_grad()
    return _honest_quantize_and_write(model, hessians, args, rt, log, path, scheme, code_bytes)
'''


def run_script(script, env, cwd):
    return subprocess.run([sys.executable, str(script)], env=env, cwd=cwd, capture_output=True, text=True, timeout=900)


def audit_line(log: str) -> str:
    return next(line for line in log.splitlines() if line.startswith("eval_audit path:"))


def test_a_legal_run_passes_and_a_fitted_temperature_fails(tmp_path, data, tiny_tokenizer, artifact):
    """Issue 21 (2): a temperature fitted at start-up on the first validation tokens, in a module-level
    variable the run and any in-process probe share. The fresh process fits it on its own validation
    data (the perturbed probes): its scores of the probe differ from the run's."""
    env = script_env(tmp_path, data, tiny_tokenizer, EVAL_ONLY=artifact, TTT_MODE="lora")
    honest = run_script(REPO / "train_gpt.py", env, tmp_path)
    assert honest.returncode == 0, honest.stdout[-3000:] + honest.stderr[-3000:]
    assert "eval_audit_verdict:PASS" in honest.stdout and honest.stdout.strip().endswith("submission_valid:yes")
    assert re.search(r"^eval_audit_time:\d+ms ratio_to_eval:\d+\.\d\d ", honest.stdout, re.M)
    cheat = run_script(cheating_script(tmp_path, FITTED_TEMPERATURE), {**env, "RUN_ID": "cheat"}, tmp_path)
    assert cheat.returncode == 3, cheat.stdout[-3000:] + cheat.stderr[-3000:]
    line = audit_line(cheat.stdout)
    assert "verdict:FAIL" in line and "prefix:FAIL" in line, line
    assert cheat.stdout.strip().endswith("submission_valid:no reason:audit_failed")


def test_train_before_score_after_the_probe_region_fails(tmp_path, data, tiny_tokenizer, artifact):
    """Issue 21 (1): the probes never see it; the replay of the drawn batches does."""
    env = script_env(tmp_path, data, tiny_tokenizer, EVAL_ONLY=artifact, TTT_MODE="phased", TTT_PHASE_DOCS="3,12", RUN_ID="train_first")
    cheat = run_script(cheating_script(tmp_path, TRAIN_FIRST_AFTER_THE_PROBES), env, tmp_path)
    assert cheat.returncode == 3, cheat.stdout[-3000:] + cheat.stderr[-3000:]
    line = audit_line(cheat.stdout)
    assert "causal:ok" in line and "prefix:ok" in line and "sampled:FAIL" in line, line


def test_pre_quantization_training_on_validation_fails(tmp_path, random_data, tiny_tokenizer):
    """Issue 21 (3): the artifact itself has seen the validation set."""
    env = script_env(tmp_path, random_data, tiny_tokenizer, TTT_ENABLED=0, EVAL_STRIDE=0, ITERATIONS=20, GPTQ_ENABLED=0, RUN_ID="pre_quant_ttt")
    cheat = run_script(cheating_script(tmp_path, PRE_QUANT_TTT), env, tmp_path)
    assert cheat.returncode == 3, cheat.stdout[-3000:] + cheat.stderr[-3000:]
    assert re.search(r"^audit_heldout shard:fineweb_train_000000\.bin from_token:\d+ tokens:\d+ \(never trained on\)$", cheat.stdout, re.M)
    line = audit_line(cheat.stdout)
    assert "memorization:FAIL" in line, line


def torchrun(script, env, cwd):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=900)


def two_ranks(script, env, cwd) -> list[subprocess.CompletedProcess]:
    """The two processes torchrun would start, launched by hand: torchrun stops the other ranks as soon
    as one exits with an error, so only this way does every rank's own exit code show."""
    launcher = dict(WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    ranks = [subprocess.Popen([sys.executable, str(script)], env={**env, **launcher, "RANK": str(r), "LOCAL_RANK": str(r)}, cwd=cwd,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=900) for p in ranks]
    return [subprocess.CompletedProcess(p.args, p.returncode, *out) for p, out in zip(ranks, outs)]


def test_two_processes_exit_alike_with_one_verdict(tmp_path, data, tiny_tokenizer, artifact):
    """Issue 18: 2 CPU processes: a legal run (torchrun) PASSes, exit 0; a leaky one FAILs, exit 3 on both ranks."""
    env = script_env(tmp_path, data, tiny_tokenizer, EVAL_ONLY=artifact, TTT_MODE="phased", TTT_PHASE_DOCS="3,12")
    legal = torchrun(REPO / "train_gpt.py", env, tmp_path)
    assert legal.returncode == 0, legal.stdout[-3000:] + legal.stderr[-3000:]
    assert "eval_audit_verdict:PASS" in legal.stdout and legal.stdout.strip().endswith("submission_valid:yes")
    leaky = two_ranks(cheating_script(tmp_path, FITTED_TEMPERATURE), {**env, "RUN_ID": "leaky"}, tmp_path)
    assert [r.returncode for r in leaky] == [3, 3], [r.stdout[-2000:] + r.stderr[-2000:] for r in leaky]
    assert "verdict:FAIL" in audit_line(leaky[0].stdout) and leaky[0].stdout.strip().endswith("submission_valid:no reason:audit_failed")
    assert leaky[1].stdout == "", "rank 1 logs nothing"


def probe_result(gaps) -> dict:
    """A probe's result whose recorded nll differs from its distribution's by `gaps` (one per target)."""
    g = torch.tensor(gaps, dtype=torch.float64)
    return {"nll": torch.ones(4, dtype=torch.float64), "late": torch.zeros(4, dtype=torch.bool), "updates": 0, "distributions": {}, "normalization": 0.0,
            "mismatch": float(g.abs().max()), "moments": [g.numel(), float(g.sum()), float(g.square().sum())], "unshown": 0}


def test_on_a_gpu_the_nll_must_match_its_distribution_on_average():
    """fp32 (CPU): each recorded nll within 1e-4 of -log p[target]. bf16 (GPU, two compiled graphs):
    per-token rounding differences pass when they average to 0; a recorded nll lowered on average fails."""
    noise = [0.01 * (-1) ** i for i in range(1000)]
    lowered = [x - 0.003 for x in noise]

    def normalized(gaps, exact):
        return T.probe_checks([probe_result(gaps)] * 3, [], None, exact)["normalized"]

    assert normalized([1e-6] * 1000, True)[0] and not normalized(noise, True)[0]
    assert normalized(noise, False)[0] and "rule:mean" in normalized(noise, False)[1]
    assert not normalized(lowered, False)[0]
