"""No paid run lost, the hostile cases: a log on a full disk, a signal or a failure at every stage after
the first step (what is kept, and the command that goes on), a diverged loss, settings that would
exhaust the machine, exit codes under torchrun, reruns and killed writes, wrong files for
QUANTIZE_ONLY and EVAL_DUMP."""

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt
from conftest import REPO, TINY, Recorder, clean_env, synthetic_stream, tiny_args, tiny_model, toy_tables
from test_preflight import preflight_problems, run_args, script_env, write_tiny_artifact

DEV_FULL = Path("/dev/full")  # every write to it fails with ENOSPC


@pytest.fixture
def restore_signals():
    """main() installs its SIGINT / SIGTERM handlers in this process: put pytest's back."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in handlers.items():
        signal.signal(s, handler)


def run_main(monkeypatch, env: dict) -> int:
    """train_gpt.main() in this process (so tests can patch its stages), with `env` as the environment; its exit code."""
    monkeypatch.setattr(os, "environ", env)
    with pytest.raises(SystemExit) as info:
        train_gpt.main()
    code = info.value.code
    return code if isinstance(code, int) else 1


def last_log_line(tmp_path, run_id="run") -> str:
    return (tmp_path / "logs" / f"{run_id}.txt").read_text().splitlines()[-1]


def fresh_model(args):
    torch.manual_seed(args.seed)
    return train_gpt.GPT(train_gpt.ModelConfig.from_args(args))


# ----------------------------------------------------------------------------- 1. a log that cannot be written


@pytest.mark.skipif(not DEV_FULL.exists(), reason="no /dev/full")
def test_a_log_on_a_full_disk_falls_back_to_the_console_once_and_never_raises(tmp_path, capsys):
    log = train_gpt.Logger(tmp_path / "run.txt")
    log.file.close()
    log.file = open(DEV_FULL, "w", encoding="utf-8")
    log("step:1/3 train_loss:4.0")
    log("a traceback, for the file only", console=False)
    log("step:2/3 train_loss:3.0")
    out, err = capsys.readouterr()
    assert out == "step:1/3 train_loss:4.0\nstep:2/3 train_loss:3.0\n"
    assert err.count("WARNING: cannot write the log file") == 1 and "No space left on device" in err
    assert err.splitlines()[-1] == "a traceback, for the file only", "the file's lines go to stderr instead"


@pytest.mark.skipif(not DEV_FULL.exists(), reason="no /dev/full")
def test_training_goes_on_when_the_log_cannot_be_written(synthetic_data, tmp_path, capsys):
    args = tiny_args(DATA_PATH=synthetic_data, ITERATIONS=3, TRAIN_LOG_EVERY=1, GPTQ_ENABLED=0)
    log = train_gpt.Logger(tmp_path / "run.txt")
    log.file.close()
    log.file = open(DEV_FULL, "w", encoding="utf-8")
    result = train_gpt.train_model(fresh_model(args), args, train_gpt.Runtime(), log, None)
    assert result.steps == 3
    assert "step:3/3 train_loss:" in capsys.readouterr().out


# ----------------------------------------------------------------------------- 2. a failure or a signal after the first step keeps what was trained


def test_sigterm_during_quantization_saves_the_trained_weights_and_exits_143(tmp_path, synthetic_data, tiny_tokenizer, monkeypatch, restore_signals):
    """The interrupt is a BaseException: the weights must be saved all the same, and the log's last line says where."""
    seen = {}

    def killed_while_quantizing(model, *args, **kwargs):
        seen.update({k: v.clone() for k, v in model.state_dict().items()})
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(train_gpt, "quantize_and_write", killed_while_quantizing)
    assert run_main(monkeypatch, script_env(tmp_path, synthetic_data, tiny_tokenizer)) == 143
    line = last_log_line(tmp_path)
    weights = tmp_path / "logs" / "run.weights.pt"
    assert line.startswith(f"interrupted: SIGTERM; the run stopped here; no artifact was written to {tmp_path / 'out' / 'model.pgz'}; "), line
    assert f"the trained weights are saved in {weights}: " in line and f"QUANTIZE_ONLY={weights} python3 " in line
    saved = torch.load(weights)
    assert saved.keys() == seen.keys() and all(torch.equal(saved[k], seen[k]) for k in seen)


def test_a_failure_during_training_saves_the_averaged_weights_of_the_last_step(tmp_path, synthetic_data, tiny_tokenizer, monkeypatch):
    """A crash at step 3 keeps the EMA of steps 1-2 (not the live weights), and says so."""
    averagers = []

    class Recorded(train_gpt.WeightAverager):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            averagers.append(self)

    lr_multiplier = train_gpt.lr_multiplier
    live = {}

    def crash_at_step_2(step, *a):
        if step == 2:
            live.update({n: t.clone() for n, t in zip(averagers[0].names, averagers[0].live)})
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return lr_multiplier(step, *a)

    monkeypatch.setattr(train_gpt, "WeightAverager", Recorded)
    monkeypatch.setattr(train_gpt, "lr_multiplier", crash_at_step_2)
    args = run_args(tmp_path, synthetic_data, tiny_tokenizer, ITERATIONS=100, EMA_DECAY=0.5)
    with pytest.raises(train_gpt.RunStopped) as info:
        train_gpt.run(args, train_gpt.Runtime(), "crash", Recorder())
    weights = tmp_path / "logs" / "crash.weights.pt"
    assert str(info.value).startswith("training stopped after step 2/100 (RuntimeError: CUDA error: an illegal memory access was encountered); ")
    assert f"the trained weights are saved in {weights}" in str(info.value)
    saved, (kind, averaged) = torch.load(weights), averagers[0].export()
    assert kind == "ema" and all(torch.equal(saved[k], averaged[k]) for k in averaged)
    assert not torch.equal(saved["blocks.0.attn.c_q.weight"], live["blocks.0.attn.c_q.weight"]), "the average, not the last step's weights"


def test_a_failure_before_the_first_step_keeps_nothing(tmp_path, synthetic_data, tiny_tokenizer, monkeypatch):
    def crash(step, *a):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(train_gpt, "lr_multiplier", crash)
    with pytest.raises(RuntimeError, match="out of memory"):
        train_gpt.run(run_args(tmp_path, synthetic_data, tiny_tokenizer), train_gpt.Runtime(), "early", Recorder())
    assert not (tmp_path / "logs" / "early.weights.pt").exists(), "the initial weights are not worth a resume command"


def test_a_failure_after_the_artifact_is_written_says_it_is_intact_and_the_command_scores_it(tmp_path, synthetic_data, tiny_tokenizer, monkeypatch):
    """A full disk during the evaluation: nothing is saved again; the EVAL_ONLY command finishes the run."""

    def disk_full_during_evaluation(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(train_gpt, "evaluate_artifact", disk_full_during_evaluation)
    args = run_args(tmp_path, synthetic_data, tiny_tokenizer, EVAL_STRIDE=0)
    with pytest.raises(train_gpt.RunStopped) as info:
        train_gpt.run(args, train_gpt.Runtime(), "evalfail", Recorder())
    message, artifact = str(info.value), tmp_path / "out" / "model.pgz"
    assert message.startswith(f"the evaluation stopped (OSError: [Errno 28] No space left on device); the artifact {artifact} is intact: score it without retraining: ")
    assert not (tmp_path / "logs" / "evalfail.weights.pt").exists()
    monkeypatch.undo()
    command = shlex.split(message.split("without retraining: ", 1)[1])
    env = dict(word.split("=", 1) for word in command[:-2])
    assert env["EVAL_ONLY"] == str(artifact) and "QUANTIZE_ONLY" not in env and command[-2] == "python3"
    done = subprocess.run([sys.executable, command[-1]], env=clean_env(**env), capture_output=True, text=True, timeout=300)
    assert done.returncode in (0, 3), done.stderr[-3000:]
    assert f"eval_only artifact:{artifact}" in done.stdout and "model_params" not in done.stdout and "final_int6" in done.stdout


# ----------------------------------------------------------------------------- 3. a non-finite loss


def nan_from_step(model, first_bad_call: int):
    """Make the model's training loss NaN from its `first_bad_call`-th forward on; returns the call counter."""
    calls = [0]
    forward = model.forward

    def forward_with_nan(*a, **k):
        calls[0] += 1
        out = forward(*a, **k)
        return out * float("nan") if calls[0] >= first_bad_call else out

    model.forward = forward_with_nan
    return calls


def test_a_nan_loss_stops_training_at_that_step_with_one_line(synthetic_data):
    args = tiny_args(DATA_PATH=synthetic_data, ITERATIONS=50, TRAIN_LOG_EVERY=0, GPTQ_ENABLED=0)
    model = fresh_model(args)
    micro = train_gpt.Runtime().grad_accum_steps
    calls = nan_from_step(model, 2 * micro + 1)  # step 3's first micro-step
    with pytest.raises(train_gpt.TrainingDiverged) as info:
        train_gpt.train_model(model, args, train_gpt.Runtime(), Recorder(), None)
    assert calls[0] == 3 * micro, "no step after the first non-finite loss"
    message = str(info.value)
    assert "\n" not in message and message.startswith("train_loss is not finite at step 3 (nan or inf; nan on rank 0)")


def test_a_diverged_run_ends_with_its_reason_and_no_resume_command(tmp_path, synthetic_data, tiny_tokenizer, monkeypatch, restore_signals):
    forward = train_gpt.GPT.forward
    monkeypatch.setattr(train_gpt.GPT, "forward", lambda self, *a, **k: forward(self, *a, **k) * float("nan"))
    assert run_main(monkeypatch, script_env(tmp_path, synthetic_data, tiny_tokenizer)) == 1
    assert last_log_line(tmp_path).startswith("error: train_loss is not finite at step 1")
    assert "without retraining" not in (tmp_path / "logs" / "run.txt").read_text().split("=" * 100)[-1]
    assert not list((tmp_path / "logs").glob("*.weights.pt"))


NAN_WORKER = textwrap.dedent(
    """
    import json, sys
    import torch
    sys.path.insert(0, {repo!r})
    import train_gpt

    torch.set_num_threads(1)
    config = json.loads(sys.argv[1])
    rt = train_gpt.setup_runtime()
    args = train_gpt.Hyperparameters(config["env"])
    torch.manual_seed(args.seed)
    model = train_gpt.GPT(train_gpt.ModelConfig.from_args(args))
    calls = [0]
    forward = model.forward

    def forward_with_nan(*a, **k):  # rank 1 only, from its second step on
        calls[0] += 1
        out = forward(*a, **k)
        return out * float("nan") if rt.rank == 1 and calls[0] > rt.grad_accum_steps else out

    model.forward = forward_with_nan
    try:
        train_gpt.train_model(model, args, rt, train_gpt.Logger(None), None)
        outcome = "finished"
    except train_gpt.TrainingDiverged as e:
        outcome = str(e)
    print(json.dumps({{"rank": rt.rank, "outcome": outcome, "forward_calls": calls[0]}}))
    torch.distributed.destroy_process_group()
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_nan_on_one_rank_stops_every_rank_at_the_same_step(synthetic_data, tmp_path):
    """The flag rides on the wall-clock cap's all-reduce: rank 0 (finite loss) stops with rank 1."""
    env = {k: str(v) for k, v in {**TINY, "DATA_PATH": synthetic_data, "ITERATIONS": 20, "TRAIN_LOG_EVERY": 0, "GPTQ_ENABLED": 0}.items()}
    script = tmp_path / "worker.py"
    script.write_text(NAN_WORKER.format(repo=str(REPO)))
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), json.dumps({"env": env})], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=clean_env(WORLD_SIZE=2, RANK=rank, LOCAL_RANK=rank, LOCAL_WORLD_SIZE=2, MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
        )
        for rank in (0, 1)
    ]
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=180)
        assert p.returncode == 0, out
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert [r["outcome"].split(" (")[0] for r in results] == ["train_loss is not finite at step 2"] * 2, results
    assert results[0]["forward_calls"] == results[1]["forward_calls"] == 2 * 4, "both ranks stop after step 2"


def test_quantize_only_refuses_weights_that_are_not_finite(tmp_path, synthetic_data, tiny_tokenizer):
    state = tiny_model().state_dict()
    state["blocks.0.mlp.fc.weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    problems = preflight_problems(run_args(tmp_path, synthetic_data, tiny_tokenizer, QUANTIZE_ONLY=tmp_path / "nan.pt"))
    assert problems == [f"QUANTIZE_ONLY={tmp_path / 'nan.pt'} holds weights that are not finite (a diverged run): nothing to quantize; train again with lower learning rates"]


# ----------------------------------------------------------------------------- 4. settings that would exhaust the machine


@pytest.mark.parametrize(
    "name, value", [("NUM_LAYERS", "1e99"), ("MODEL_DIM", "1e9"), ("NUM_HEADS", "4096"), ("MLP_MULT", "1e6"), ("VOCAB_SIZE", "100000"),
                    ("BIGRAM_VOCAB_SIZE", "1e12"), ("NUM_LOOPS", "1000"), ("TRAIN_SEQ_LEN", "1e9"), ("MATRIX_LR", "1e99"), ("EMBED_LR", "11")],
)
def test_size_and_rate_settings_have_upper_bounds(name, value):
    with pytest.raises(train_gpt.SettingsError, match=f"^{name}='{value}' must be "):
        train_gpt.Hyperparameters({name: value})


def test_large_but_plausible_configurations_are_accepted():
    train_gpt.Hyperparameters({"NUM_LAYERS": "64", "MODEL_DIM": "4096", "NUM_HEADS": "32", "NUM_KV_HEADS": "8", "MLP_MULT": "8", "VOCAB_SIZE": "65536",
                               "TRAIN_SEQ_LEN": "65536", "EVAL_SEQ_LEN": "65536", "BIGRAM_VOCAB_SIZE": "1048576", "NUM_LOOPS": "8", "MATRIX_LR": "10"})


def test_a_model_too_large_for_the_device_is_refused_before_anything_is_allocated(tmp_path, synthetic_data, tiny_tokenizer, monkeypatch):
    record = train_gpt.Hyperparameters({})
    assert train_gpt.model_size_problem(record, train_gpt.Runtime()) is None, "the record's model fits any machine"
    huge = train_gpt.Hyperparameters({"NUM_LAYERS": "1024", "MODEL_DIM": "65536", "NUM_HEADS": "256", "NUM_KV_HEADS": "256", "ROPE_DIMS": "16"})
    problem = train_gpt.model_size_problem(huge, train_gpt.Runtime())
    assert problem.startswith("the settings build a model of ") and "GiB to train, more than the " in problem and "lower NUM_LAYERS" in problem
    pages = {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 2**18}  # a 1 GiB machine: 36M parameters need 0.7 GiB, 60M need 1.1
    monkeypatch.setattr(train_gpt.os, "sysconf", pages.__getitem__)
    assert train_gpt.model_size_problem(record, train_gpt.Runtime()) is None
    bigger = train_gpt.Hyperparameters({"NUM_LAYERS": "20"})
    with torch.device("meta"):
        params = train_gpt.count_parameters(train_gpt.GPT(train_gpt.ModelConfig.from_args(bigger)))
    assert train_gpt.model_size_problem(bigger, train_gpt.Runtime()) == (
        f"the settings build a model of {params:,} parameters, which needs at least {20 * params / 2**30:.1f} GiB to train, more than the 1.0 GiB of this cpu; "
        "lower NUM_LAYERS, MODEL_DIM, MLP_MULT, VOCAB_SIZE or BIGRAM_VOCAB_SIZE"
    )
    problems = preflight_problems(run_args(tmp_path, synthetic_data, tiny_tokenizer, MODEL_DIM=65536, NUM_HEADS=256, NUM_LAYERS=64, ROPE_DIMS=16))
    assert len(problems) == 1 and problems[0].startswith("the settings build a model of ")


# ----------------------------------------------------------------------------- 5. exit codes under torchrun

EXIT_WRAPPER = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {repo!r})
    import train_gpt

    # Rank 0 finds the run invalid (only it knows the artifact's size), rank 1 valid; rank 0 is slow to
    # tear down, so torchrun, seeing rank 1 exit first, sends it SIGTERM while it finishes.
    train_gpt.run = lambda args, rt, run_id, log: rt.rank != 0
    destroy = train_gpt.dist.destroy_process_group
    train_gpt.dist.destroy_process_group = lambda: (time.sleep(5 if train_gpt.dist.get_rank() == 0 else 0), destroy())[1]
    train_gpt.main()
    """
)


def test_every_rank_exits_with_rank_0s_code_under_torchrun(tmp_path):
    script = tmp_path / "wrapper.py"
    script.write_text(EXIT_WRAPPER.format(repo=str(REPO)))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    done = subprocess.run(command, env=clean_env(LOG_DIR=tmp_path / "logs", RUN_ID="r"), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, "torchrun reports 1 for any failed rank"
    codes = [line.split(":")[1].split()[0] for line in done.stderr.splitlines() if line.strip().startswith("exitcode")]
    assert codes == ["3", "3"], done.stderr[-3000:]


# ----------------------------------------------------------------------------- 6. reruns, RUN_ID, killed writes


def test_a_rerun_with_the_same_run_id_keeps_the_earlier_artifact_and_code(tmp_path, synthetic_data, tiny_tokenizer):
    args = run_args(tmp_path, synthetic_data, tiny_tokenizer, ARTIFACT_PATH="", EVAL_STRIDE=0, ITERATIONS=1)
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "same.pgz").write_bytes(b"the first run's artifact")
    (logs / "same.train_gpt.py").write_bytes(b"the first run's code")
    train_gpt.run(args, train_gpt.Runtime(), "same", Recorder())
    kept = {p.name: p.read_bytes() for p in logs.iterdir() if p.name not in ("same.pgz", "same.train_gpt.py")}
    assert sorted(kept.values()) == [b"the first run's artifact", b"the first run's code"], kept
    assert train_gpt.read_artifact(logs / "same.pgz"), "the new artifact took the plain name"


def test_a_run_id_must_be_a_plain_file_name():
    for bad in ("../../x", "a/b", ".hidden", "/abs"):
        with pytest.raises(train_gpt.SettingsError, match="RUN_ID=.* must be a plain file name"):
            train_gpt.Hyperparameters({"RUN_ID": bad})
    assert train_gpt.Hyperparameters({"RUN_ID": "seed42_lr0.03"}).run_id == "seed42_lr0.03"


KILLED_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {repo!r})
    import train_gpt

    train_gpt.os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)  # killed between the write and the rename
    train_gpt.write_atomic(sys.argv[1], bytes(100_000))
    """
)


def test_the_preflight_removes_the_temporary_file_of_a_killed_write_and_only_that(tmp_path, synthetic_data, tiny_tokenizer):
    out = tmp_path / "out"
    script = tmp_path / "killed.py"
    script.write_text(KILLED_WRITER.format(repo=str(REPO)))
    done = subprocess.run([sys.executable, str(script), str(out / "model.pgz")], env=clean_env(), capture_output=True, timeout=120)
    assert done.returncode == -signal.SIGKILL
    (stale,) = out.iterdir()
    assert stale.name.startswith(".model.pgz.") and stale.stat().st_size == 100_000
    live = out / f".other.pgz.{train_gpt.platform.node()}-{os.getpid()}.tmp"  # a write in progress, in this process
    elsewhere = out / ".model.pgz.another-host-1.tmp"  # a write of another machine on a shared disk
    for p in (live, elsewhere):
        p.write_bytes(b"")
    log = Recorder()
    train_gpt.preflight(run_args(tmp_path, synthetic_data, tiny_tokenizer), train_gpt.Runtime(), out / "model.pgz", log)
    assert sorted(p.name for p in out.iterdir()) == sorted([live.name, elsewhere.name])
    assert f"preflight: removed {stale}, the temporary file of a write whose process was killed" in log.lines


# ----------------------------------------------------------------------------- 7. settings the model or launcher would silently bend


def test_gate_window_wider_than_the_model_is_refused_where_a_gate_reads_it():
    with pytest.raises(train_gpt.SettingsError, match="GATE_WINDOW=64 must be <= MODEL_DIM=32"):
        tiny_args(GATE_WINDOW=64)
    tiny_args(GATE_WINDOW=64, ATTN_GATE=0, SMEAR_GATE=0)
    tiny_args(GATE_WINDOW=64, ATTN_GATE=0, SMEAR_GATE_MODE="dim")


def test_stale_launcher_variables_are_refused_instead_of_waiting_forever(tmp_path):
    """A plain `python3 train_gpt.py` in a shell that kept a torchrun job's WORLD_SIZE used to wait forever for rank 1."""
    stale = {"WORLD_SIZE": 2, "RANK": 0, "LOCAL_RANK": 0, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": free_port(), "LOG_DIR": tmp_path, "RUN_ID": "stale"}
    for env, expected in ((stale, "WORLD_SIZE=2 is set, but this process was not started by torchrun"), ({"RANK": 1, "LOG_DIR": tmp_path}, "RANK=1 with WORLD_SIZE=1")):
        done = subprocess.run([sys.executable, str(REPO / "train_gpt.py")], env=clean_env(**env), cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert done.returncode == 1 and done.stderr.startswith(f"error: {expected}"), done.stderr
    assert (tmp_path / "stale.txt").read_text().startswith("error: WORLD_SIZE=2 is set"), "the reason is in the log too"


# ----------------------------------------------------------------------------- 9. the wrong file for QUANTIZE_ONLY


def test_quantize_only_names_the_wrong_file_and_what_to_pass(tmp_path, synthetic_data, tiny_tokenizer):
    artifact = write_tiny_artifact(tmp_path / "model.pgz")
    noise = tmp_path / "noise.pt"
    noise.write_bytes(np.random.default_rng(0).bytes(5000))
    module = tmp_path / "module.pt"
    torch.save(tiny_model(), module)  # a whole pickled model: not loadable without trusting its code
    numbers = tmp_path / "numbers.pt"
    torch.save({"step": 3}, numbers)
    hint = "give QUANTIZE_ONLY the .weights.pt file a stopped run printed"
    expected = {
        artifact: f"QUANTIZE_ONLY={artifact} is an artifact, not trained weights: score it with EVAL_ONLY={artifact} instead",
        noise: f"QUANTIZE_ONLY={noise} is not a file torch.save wrote; {hint}",
        module: f"QUANTIZE_ONLY={module} is a torch file but not a plain state dict of tensors; {hint}",
        numbers: f"QUANTIZE_ONLY={numbers} is a torch file but not a plain state dict of tensors; {hint}",
    }
    for path, message in expected.items():
        assert preflight_problems(run_args(tmp_path, synthetic_data, tiny_tokenizer, QUANTIZE_ONLY=path)) == [message]


# ----------------------------------------------------------------------------- 10. EVAL_DUMP


def test_an_eval_dump_folder_is_a_problem_before_training(tmp_path, synthetic_data, tiny_tokenizer):
    folder = tmp_path / "dumps"
    folder.mkdir()
    for value in (str(folder), f"{tmp_path / 'new'}/"):
        problems = preflight_problems(run_args(tmp_path, synthetic_data, tiny_tokenizer, EVAL_DUMP=value))
        assert problems == [f"EVAL_DUMP={value} is a folder; give a file prefix such as {Path(value) / 'run'} (for run.standard.npz, ...)"]
    assert preflight_problems(run_args(tmp_path, synthetic_data, tiny_tokenizer, EVAL_DUMP=folder / "run")) == []


def test_a_full_disk_at_the_eval_dump_only_costs_the_dump(tmp_path, monkeypatch):
    args = tiny_args(EVAL_DUMP=tmp_path / "dump", TTT_ENABLED=0, EVAL_STRIDE=0, EVAL_AUDIT=0)
    artifact = write_tiny_artifact(tmp_path / "model.pgz")

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(train_gpt, "write_atomic", disk_full)
    log = Recorder()
    tokens = torch.from_numpy(synthetic_stream(20, seed=3).astype(np.int64))
    results, _ = train_gpt.evaluate_artifact(artifact, args, train_gpt.Runtime(), log, toy_tables(), tokens, "int6", "sdpa")
    assert np.isfinite(results["standard"].val_bpb)
    assert f"WARNING: eval_dump {tmp_path / 'dump'}.standard.npz not written (No space left on device); the evaluation goes on" in log.lines
    assert log.lines[-1].startswith("eval_time_total:")
