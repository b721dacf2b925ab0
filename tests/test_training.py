"""Settings, the command line's error handling and the training loop: loss falls, the warm-up is
fully undone, and 2 CPU processes (gloo) train exactly like 1 on the same global batch."""

import json
import re
import socket
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import train_gpt
from conftest import REPO, TINY, Recorder, clean_env, tiny_args



# ----------------------------------------------------------------------------- Hyperparameters


def test_defaults_are_the_record_configuration():
    """The defaults are the best legal record's run (1.0611, 2026-04-27), as its logs print it."""
    a = train_gpt.Hyperparameters({})
    assert (a.num_layers, a.model_dim, a.num_heads, a.num_kv_heads) == (11, 512, 8, 4)
    assert a.mlp_mult == 4.0 and a.mlp_act == "leaky_relu2" and a.vocab_size == 8192
    assert a.train_seq_len == 2048 and a.train_batch_tokens == 786432
    assert a.max_wallclock_seconds == 600.0
    assert a.tie_embeddings is True and a.logit_softcap == 30.0 and a.tied_embed_init_std == 0.005
    assert a.data_path.endswith("fineweb10B_sp8192_lossless_caps_caseops_v1_reserved")  # the record's CaseOps data and tokenizer
    assert a.tokenizer_path == "data/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model"
    assert (a.loop_start, a.loop_end, a.num_loops, a.loop_enable_frac) == (3, 5, 2, 0.35)
    assert (a.parallel_residual_start, a.xsa_last_n, a.rope_dims, a.qk_gain_init) == (8, 11, 16, 5.0)
    assert a.attn_gate and a.attn_gate_scale == 0.5 and a.gate_window == 12 and a.smear_gate and a.smear_gate_mode == "input"
    assert a.skip_gates and a.ln_scale and a.ortho_init and a.doc_isolation and a.bigram_vocab_size == 0
    assert (a.matrix_lr, a.tied_embed_lr, a.scalar_lr) == (0.026, 0.03, 0.02)
    assert (a.muon_momentum, a.muon_momentum_warmup_start, a.muon_momentum_warmup_steps) == (0.97, 0.92, 1500)
    assert (a.muon_wd, a.embed_wd, a.adam_wd, a.beta1, a.beta2) == (0.095, 0.085, 0.02, 0.9, 0.99)
    assert a.muon_row_normalize and a.muon_ns_coeffs == "polar_express" and a.muon_backend_steps == 5
    assert (a.warmdown_frac, a.min_lr, a.ema_decay, a.qat_start, a.grad_clip_norm) == (0.85, 0.1, 0.9965, 0.0, 0.3)
    # the batch splits evenly over 8 GPUs x 1 micro-step and 1 GPU x 8 micro-steps
    assert a.train_batch_tokens % (8 * a.train_seq_len) == 0
    cfg = train_gpt.ModelConfig.from_args(a)
    assert cfg.qat_bits == {"attn": 0, "mlp": 0, "other": 0}, "QAT off: no fake quantization in any layer"
    assert cfg.layer_order(True) == [0, 1, 2, 3, 4, 5, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10]  # 17 virtual layers
    assert train_gpt.count_parameters(train_gpt.GPT(cfg)) == 35_945_671  # the record's model_params


RECORD_LOG = REPO.parent / "shared" / "fixtures" / "official_logs" / "2026-04-27_SP8192_LQER_SparseGate_BOSSmearFix_9HpStack_1.0611" / "train_seed42.log"
# The record's setting names -> ours (the architecture only).
RECORD_NAMES = {
    "vocab_size": "VOCAB_SIZE", "num_layers": "NUM_LAYERS", "model_dim": "MODEL_DIM", "num_heads": "NUM_HEADS",
    "num_kv_heads": "NUM_KV_HEADS", "mlp_mult": "MLP_MULT", "tie_embeddings": "TIE_EMBEDDINGS", "rope_dims": "ROPE_DIMS",
    "qk_gain_init": "QK_GAIN_INIT", "logit_softcap": "LOGIT_SOFTCAP", "num_loops": "NUM_LOOPS", "loop_start": "LOOP_START",
    "loop_end": "LOOP_END", "parallel_start_layer": "PARALLEL_RESIDUAL_START", "xsa_last_n": "XSA_LAST_N",
    "gate_window": "GATE_WINDOW", "smear_gate_enabled": "SMEAR_GATE", "sparse_attn_gate_enabled": "ATTN_GATE",
    "skip_gates_enabled": "SKIP_GATES", "ln_scale": "LN_SCALE",
}


def test_the_record_architecture_rebuilt_from_its_log_has_its_parameter_count():
    if not RECORD_LOG.is_file():
        pytest.skip("../shared/fixtures is not beside the repository")
    text = RECORD_LOG.read_text()
    logged = dict(re.findall(r"^  (\w+): (.*)$", text.split("Hyperparameters:", 1)[1].split("\n\n", 1)[0], flags=re.M))
    env = {ours: logged[theirs] for theirs, ours in RECORD_NAMES.items()}
    env = {k: {"True": "1", "False": "0"}.get(v, v) for k, v in env.items()}
    env["BIGRAM_VOCAB_SIZE"] = "0"  # the record has no BigramHash
    model = train_gpt.GPT(train_gpt.ModelConfig.from_args(train_gpt.Hyperparameters(env)))
    assert train_gpt.count_parameters(model) == int(re.search(r"^model_params:(\d+)$", text, flags=re.M).group(1)) == 35_945_671


def test_environment_values_are_parsed_by_type():
    a = train_gpt.Hyperparameters({"NUM_LAYERS": "9", "TRAIN_BATCH_TOKENS": "5.24288e5", "TIE_EMBEDDINGS": "0", "MATRIX_LR": "0.04", "MLP_ACT": "leaky_relu2", "SMEAR_GATE": "false"})
    assert a.num_layers == 9 and a.train_batch_tokens == 524288 and a.tie_embeddings is False
    assert a.matrix_lr == 0.04 and a.mlp_act == "leaky_relu2" and a.smear_gate is False
    assert set(a.as_dict()) == {s.name for s in train_gpt.SETTINGS}


def test_keyword_overrides_win_over_the_environment():
    env = {"NUM_LAYERS": "9", "NUM_LOOPS": "0"}
    assert train_gpt.Hyperparameters(env, NUM_LAYERS=3).num_layers == 3
    assert train_gpt.Hyperparameters(env, num_layers=4).num_layers == 4
    assert train_gpt.Hyperparameters(env, TIE_EMBEDDINGS=False).tie_embeddings is False
    assert not hasattr(train_gpt.Hyperparameters(env, NUM_LAYERS=3), "NUM_LAYERS")
    with pytest.raises(train_gpt.SettingsError, match="NUM_LAYRS"):
        train_gpt.Hyperparameters(env, NUM_LAYRS=3)
    with pytest.raises(train_gpt.SettingsError, match="NUM_LAYERS"):
        train_gpt.Hyperparameters(env, num_layers="x")
    with pytest.raises(train_gpt.SettingsError, match="NUM_KV_HEADS"):
        train_gpt.Hyperparameters(env, NUM_KV_HEADS=3)


@pytest.mark.parametrize(
    "env, names",
    [
        ({"NUM_LAYERS": "abc"}, ["NUM_LAYERS", "abc"]),
        ({"NUM_LAYERS": "2.5"}, ["NUM_LAYERS"]),
        ({"TIE_EMBEDDINGS": "maybe"}, ["TIE_EMBEDDINGS"]),
        ({"MATRIX_LR": "nan"}, ["MATRIX_LR"]),
        ({"NUM_LAYERS": "0"}, ["NUM_LAYERS", "in [1, 1024]"]),
        ({"EVAL_STRIDE": "4096"}, ["EVAL_STRIDE", "EVAL_SEQ_LEN"]),
        ({"NUM_KV_HEADS": "3"}, ["NUM_KV_HEADS", "NUM_HEADS"]),
        ({"EMA_DECAY": "1"}, ["EMA_DECAY"]),
        ({"MLP_ACT": "gelu"}, ["MLP_ACT", "relu2"]),
        ({"ROPE_DIMS": "3"}, ["ROPE_DIMS"]),
        ({"TTT_STPES": "2"}, ["TTT_STPES", "TTT_STEPS"]),
        ({"MATRX_LR": "0.1"}, ["MATRX_LR", "MATRIX_LR"]),  # a near miss, whatever its prefix
        ({"MAX_JOBS": "4"}, []),  # unrelated: ignored
        ({"ITERS": "5"}, ["ITERS", "ITERATIONS"]),  # an abbreviation
        ({"SEQ_LEN": "64"}, ["SEQ_LEN", "TRAIN_SEQ_LEN"]),  # the ending of settings
        ({"RUN_ID": "../../x"}, ["RUN_ID", "plain file name"]),
        ({"MATRIX_LR": "1e99"}, ["MATRIX_LR", "in [0, 10]"]),
        ({"NUM_LAYERS": "1e99"}, ["NUM_LAYERS", "in [1, 1024]"]),
        ({"GATE_WINDOW": "1024"}, ["GATE_WINDOW", "MODEL_DIM=512"]),
    ],
    ids=lambda v: "_".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else None,
)
def test_bad_settings_raise_settings_error_naming_the_variable(env, names):
    if not names:
        train_gpt.Hyperparameters(env)
        return
    with pytest.raises(train_gpt.SettingsError) as info:
        train_gpt.Hyperparameters(env)
    for name in names:
        assert name in str(info.value), f"{name!r} missing from {str(info.value)!r}"


def test_typo_suggests_the_setting():
    with pytest.raises(train_gpt.SettingsError, match=r"unknown setting TTT_STPES; did you mean TTT_STEPS\?"):
        train_gpt.Hyperparameters({"TTT_STPES": "2"})
    with pytest.raises(train_gpt.SettingsError, match="EMA_DECAY"):
        train_gpt.Hyperparameters({"EMA_DECAY": "0.997", "EMA_DECAY_RATE": "1"})


MISSPELT = {  # variable -> the setting the message suggests
    "MODEL_DIMS": "MODEL_DIM", "NUM_LAYER": "NUM_LAYERS", "MAX_WALLCLOCK": "MAX_WALLCLOCK_SECONDS", "VOCABSIZE": "VOCAB_SIZE",
    "DATA_PTH": "DATA_PATH", "RUNID": "RUN_ID", "LOGDIR": "LOG_DIR", "SIZE_CAP": "SIZE_CAP_BYTES", "MIN_LRS": "MIN_LR",
    "num_layers": "NUM_LAYERS", "model_dim": "MODEL_DIM", "max_wallclock_seconds": "MAX_WALLCLOCK_SECONDS", "Eval_Only": "EVAL_ONLY",
    "TTT_STPES": "TTT_STEPS", "EMA_DECAY_RATE": "EMA_DECAY", "GPTQ_FOO": None,
    "ITERS": "ITERATIONS", "SEQ_LEN": "TRAIN_SEQ_LEN", "SEQLEN": "TRAIN_SEQ_LEN", "BATCH_TOKENS": "TRAIN_BATCH_TOKENS", "LAYERS": "NUM_LAYERS",
    "SEEDS": "SEED", "NUM_ITERS": "ITERATIONS", "MAX_SEQ_LEN": "TRAIN_SEQ_LEN", "WARMUP": "WARMUP_STEPS", "STEPS": "WARMUP_STEPS", "LR": "EMBED_LR", "TTT": "TTT_ENABLED",
}
UNRELATED = [  # variables users really have set
    "MAX_JOBS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "LOG_LEVEL", "DATA_DIR", "MODEL_NAME", "NUM_WORKERS", "RUN_NAME", "LOG_FILE",
    "LOCAL_WORLD_SIZE", "WORLD_SIZE", "RANK", "LOCAL_RANK", "GROUP_RANK", "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE",
    "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS",
    "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_ERROR_FILE", "CUDA_VISIBLE_DEVICES", "CUDA_HOME", "CUDA_LAUNCH_BLOCKING",
    "CUDA_DEVICE_MAX_CONNECTIONS", "NCCL_DEBUG", "NCCL_IB_DISABLE", "NCCL_P2P_DISABLE", "NCCL_SOCKET_IFNAME",
    "PYTORCH_CUDA_ALLOC_CONF", "TORCH_CUDA_ARCH_LIST", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "TORCH_DISTRIBUTED_DEBUG", "TORCH_LOGS",
    "TORCH_HOME", "TORCHINDUCTOR_CACHE_DIR", "TOKENIZERS_PARALLELISM", "HF_TOKEN", "HF_HOME", "PYTHONPATH", "PATH", "HOME",
    "LD_LIBRARY_PATH", "TMPDIR", "http_proxy", "no_proxy",
]


def test_near_misses_of_any_setting_are_refused_and_common_variables_are_not():
    for name, suggestion in MISSPELT.items():
        with pytest.raises(train_gpt.SettingsError) as info:
            train_gpt.Hyperparameters({name: "1"})
        message = str(info.value)
        assert name in message and (suggestion is None or suggestion in message), message
    train_gpt.Hyperparameters({name: "1" for name in UNRELATED})


def test_world_size_must_divide_8(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(train_gpt.SettingsError, match="WORLD_SIZE=3"):
        train_gpt.setup_runtime()
    monkeypatch.setenv("WORLD_SIZE", "eight")
    with pytest.raises(train_gpt.SettingsError, match="WORLD_SIZE='eight' is not an integer"):
        train_gpt.setup_runtime()
    for world, accum in ((1, 8), (2, 4), (4, 2), (8, 1)):
        assert train_gpt.Runtime(world_size=world).grad_accum_steps == accum


def test_command_line_errors_are_one_line_each_without_traceback_and_end_the_log(tmp_path):
    """Settings errors are found before the log is opened: the reason still ends a log file where LOG_DIR allows one."""
    (tmp_path / "a_file").write_text("not a folder")
    missing = {"DATA_PATH": str(tmp_path / "none"), "TOKENIZER_PATH": str(tmp_path / "none.model")}
    cases = {
        "malformed": ({"NUM_LAYERS": "abc"}, "NUM_LAYERS"),
        "typo": ({"TTT_STPES": "2"}, "TTT_STEPS"),
        "near_miss": ({"MODEL_DIMS": "256"}, "MODEL_DIM"),
        "lower_case": ({"num_layers": "2"}, "NUM_LAYERS"),
        "ending": ({"SEQ_LEN": "64"}, "TRAIN_SEQ_LEN"),
        "run_id_outside_log_dir": ({"RUN_ID": "../../x"}, "RUN_ID='../../x' must be a plain file name"),
        "world_size": ({"WORLD_SIZE": "3"}, "WORLD_SIZE=3"),
        "world_size_not_a_number": ({"WORLD_SIZE": "eight"}, "WORLD_SIZE='eight'"),
        "stale_world_size": ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}, "not started by torchrun"),
        "missing_data": (missing, "cached_challenge_fineweb.py"),
        "log_dir_is_a_file": ({**missing, "LOG_DIR": str(tmp_path / "a_file")}, "LOG_DIR"),
        "tokenizer_not_sentencepiece": ({**missing, "TOKENIZER_PATH": str(REPO / "README.md")}, "not a SentencePiece model"),
    }
    procs = {
        name: subprocess.Popen(
            [sys.executable, str(REPO / "train_gpt.py")], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=clean_env(**{"LOG_DIR": tmp_path / name, "RUN_ID": name, **env}),
        )
        for name, (env, _) in cases.items()
    }
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=300)  # a dozen processes importing torch at once
        expected = cases[name][1]
        assert proc.returncode == 1, name
        assert "Traceback" not in err, f"{name}: {err}"
        lines = err.strip().splitlines()
        assert lines and all(line.startswith("error: ") for line in lines), f"{name}: {err!r}"
        assert any(expected in line for line in lines), f"{name}: {err}"
        if name != "log_dir_is_a_file":
            (log,) = (tmp_path / name).glob("*.txt")  # RUN_ID=../../x: a fresh id
            assert log.read_text().splitlines()[-1] == lines[-1], name


# ----------------------------------------------------------------------------- the training loop


def test_logger_without_path_prints_nothing(capsys, tmp_path):
    train_gpt.Logger(None)("step:1/1 train_loss:1.0000")
    assert capsys.readouterr().out == ""
    log = train_gpt.Logger(tmp_path / "logs" / "run.txt")
    log("visible")
    log("file only", console=False)
    assert capsys.readouterr().out == "visible\n"
    assert (tmp_path / "logs" / "run.txt").read_text() == "visible\nfile only\n"


def val_batch(data_path, seq_len=32):
    val = train_gpt.load_validation_tokens(str(data_path), 64)
    n = (val.numel() - 1) // seq_len * seq_len
    return val[:n].view(-1, seq_len), val[1 : n + 1].view(-1, seq_len)


def fresh_model(args):
    torch.manual_seed(args.seed)
    return train_gpt.GPT(train_gpt.ModelConfig.from_args(args))


def test_train_model_lowers_the_loss(synthetic_data):
    # a higher scalar LR than the record's: the zero-initialized gates must open within 20 tiny steps
    args = tiny_args(DATA_PATH=synthetic_data, ITERATIONS=20, EMA_DECAY=0, TRAIN_LOG_EVERY=10, VAL_LOSS_EVERY=10, SCALAR_LR=0.1)
    model = fresh_model(args)
    x, y = val_batch(synthetic_data)
    with torch.no_grad():
        before = model(x, y).item()
    evaluated = []

    def evaluate_fn(m):
        assert m is model
        evaluated.append(True)
        return SimpleNamespace(val_loss=1.5, val_bpb=2.5)

    log = Recorder()
    result = train_gpt.train_model(model, args, train_gpt.Runtime(), log, evaluate_fn)
    with torch.no_grad():
        after = model(x, y).item()
    assert after < before - 0.1, f"validation loss {before:.3f} -> {after:.3f}"
    assert isinstance(result, train_gpt.TrainResult)
    assert result.steps == 20 and not result.stopped_early
    assert result.exported_weights == "raw"
    assert result.train_time_ms > 0
    assert set(result.hessians) == set(train_gpt.gptq_target_modules(model))
    assert len(evaluated) == 2  # at steps 10 and 20
    text = "\n".join(log.lines)
    assert "step:1/20 train_loss:" in text and "step:10/20 train_loss:" in text and "step:20/20 train_loss:" in text
    assert "step:20/20 val_loss:1.5000 val_bpb:2.5000 train_time:" in text
    assert "gptq_calibration source:train" in text


@pytest.mark.parametrize(
    "overrides, kind",
    [
        ({"EMA_DECAY": 0.9}, "ema"),
        ({"EMA_DECAY": 0.9, "SWA_ENABLED": 1, "SWA_EVERY": 2, "SWA_START_FRAC": 0.9}, "swa"),
        ({"EMA_DECAY": 0}, "raw"),
    ],
)
def test_exported_weights_kind(synthetic_data, overrides, kind):
    args = tiny_args(DATA_PATH=synthetic_data, ITERATIONS=6, GPTQ_ENABLED=0, TRAIN_LOG_EVERY=0, **overrides)
    model = fresh_model(args)
    result = train_gpt.train_model(model, args, train_gpt.Runtime(), train_gpt.Logger(None), None)
    assert result.exported_weights == kind
    assert result.hessians is None


def test_ema_is_what_the_model_holds_after_training(synthetic_data):
    """With EMA the returned model holds the average, not the last weights."""
    common = dict(DATA_PATH=synthetic_data, ITERATIONS=5, GPTQ_ENABLED=0, TRAIN_LOG_EVERY=0)
    raw, ema = fresh_model(tiny_args(**common)), fresh_model(tiny_args(**common))
    initial = {k: v.clone() for k, v in raw.state_dict().items()}
    train_gpt.train_model(raw, tiny_args(EMA_DECAY=0, **common), train_gpt.Runtime(), train_gpt.Logger(None), None)
    train_gpt.train_model(ema, tiny_args(EMA_DECAY=0.5, **common), train_gpt.Runtime(), train_gpt.Logger(None), None)
    w = "blocks.0.attn.c_q.weight"
    # the EMA lies between the initial and the final weights
    d_raw = (raw.state_dict()[w] - initial[w]).norm()
    d_ema = (ema.state_dict()[w] - initial[w]).norm()
    assert 0 < d_ema < d_raw


def test_warmup_is_fully_restored(synthetic_data):
    """WARMUP_STEPS (with the QAT graph) must leave no trace: same weights, optimizer state and data."""
    results = {}
    for warmup in (0, 3):
        args = tiny_args(DATA_PATH=synthetic_data, ITERATIONS=8, WARMUP_STEPS=warmup, EMA_DECAY=0, QAT_START=0.3, TRAIN_LOG_EVERY=0, GPTQ_CALIB_SEQS=2)
        model = fresh_model(args)
        log = Recorder()
        result = train_gpt.train_model(model, args, train_gpt.Runtime(), log, None)
        results[warmup] = (model.state_dict(), result, log.lines)
    (w0, r0, lines0), (w3, r3, lines3) = results[0], results[3]
    assert any(line.startswith("warmup_steps:3") for line in lines3)
    assert any(line.startswith("qat:on") for line in lines0), "QAT must switch on in this run"
    assert r0.steps == r3.steps == 8
    assert w0.keys() == w3.keys()
    for k in w0:
        assert torch.equal(w0[k], w3[k]), f"{k} differs after a warm-up"
    for k in r0.hessians:  # calibration read the same tokens: the data position was restored
        assert torch.equal(r0.hessians[k], r3.hessians[k]), k


def test_batch_must_split_over_ranks_and_micro_steps(synthetic_data):
    args = tiny_args(DATA_PATH=synthetic_data, TRAIN_BATCH_TOKENS=32 * 12)
    with pytest.raises(train_gpt.SettingsError, match="TRAIN_BATCH_TOKENS"):
        train_gpt.train_model(fresh_model(args), args, train_gpt.Runtime(), train_gpt.Logger(None), None)


def test_wallclock_cap_stops_early(synthetic_data):
    args = tiny_args(DATA_PATH=synthetic_data, ITERATIONS=100000, MAX_WALLCLOCK_SECONDS=0.5, GPTQ_ENABLED=0, EMA_DECAY=0, TRAIN_LOG_EVERY=0)
    log = Recorder()
    result = train_gpt.train_model(fresh_model(args), args, train_gpt.Runtime(), log, None)
    assert result.stopped_early and 0 < result.steps < 100000
    assert any(line.startswith("stopping_early: wallclock_cap") for line in log.lines)


# ----------------------------------------------------------------------------- 2 processes (gloo) = 1 process

WORKER = textwrap.dedent(
    """
    import json, sys
    import torch
    sys.path.insert(0, {repo!r})
    import train_gpt
    import torch.distributed as dist

    torch.set_num_threads(1)
    config = json.loads(sys.argv[1])
    rt = train_gpt.setup_runtime()
    args = train_gpt.Hyperparameters(config["env"])
    torch.manual_seed(args.seed)
    model = train_gpt.GPT(train_gpt.ModelConfig.from_args(args))
    init = {{k: v.clone() for k, v in model.state_dict().items()}}
    losses = []
    progress_line = train_gpt.train_progress_line

    def record(step, args, loss, elapsed_ms):
        global_loss = loss.detach().clone()
        if rt.distributed:
            dist.all_reduce(global_loss)
            global_loss /= rt.world_size
        losses.append(global_loss.item())
        return progress_line(step, args, loss, elapsed_ms)

    train_gpt.train_progress_line = record
    result = train_gpt.train_model(model, args, rt, train_gpt.Logger(None), None)
    if rt.is_master:
        torch.save({{"losses": losses, "init": init, "state": model.state_dict(), "steps": result.steps}}, config["out"])
    if rt.distributed:
        dist.destroy_process_group()
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_train_like_one(synthetic_data, tmp_path):
    steps = 4
    # recurrence switches on at step 2 of 4: both processes must switch at the same step
    # GRAD_CLIP_SCOPE=global: the record's per-rank clip (the default) depends on the GPU count by design
    env = {k: str(v) for k, v in {**TINY, "DATA_PATH": synthetic_data, "ITERATIONS": steps, "TRAIN_LOG_EVERY": 1, "EMA_DECAY": 0, "GPTQ_ENABLED": 0, "GRAD_CLIP_SCOPE": "global"}.items()}
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(repo=str(REPO)))
    port = free_port()
    procs = []
    for name, world, rank in (("single", 1, 0), ("dist", 2, 0), ("dist", 2, 1)):
        config = json.dumps({"env": env, "out": str(tmp_path / f"{name}.pt")})
        penv = clean_env(WORLD_SIZE=world, RANK=rank, LOCAL_RANK=rank, LOCAL_WORLD_SIZE=world, MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, str(script), config], env=penv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        out, _ = p.communicate(timeout=180)
        assert p.returncode == 0, out
    single, dist2 = torch.load(tmp_path / "single.pt"), torch.load(tmp_path / "dist.pt")
    assert single["steps"] == dist2["steps"] == steps
    assert len(single["losses"]) == len(dist2["losses"]) == steps
    np.testing.assert_allclose(dist2["losses"], single["losses"], rtol=0, atol=1e-5)
    moved = [k for k, v in single["state"].items() if not torch.equal(v, single["init"][k])]
    assert any(".attn.c_q." in k for k in moved) and "tok_emb.weight" in moved and "lane_post" in moved, "Muon, AdamW and the scalars all trained"
    for k, v in single["state"].items():
        torch.testing.assert_close(dist2["state"][k], v, rtol=0, atol=1e-4, msg=k)


def test_a_second_run_with_the_same_run_id_keeps_the_first_log_apart(tmp_path):
    path = tmp_path / "logs" / "same.txt"
    first = train_gpt.Logger(path)
    first("first run", console=False)
    first.file.close()
    second = train_gpt.Logger(path)
    second("second run", console=False)
    second.file.close()
    assert path.read_text() == "second run\n"
    kept = [p for p in path.parent.iterdir() if p != path]
    assert len(kept) == 1 and kept[0].read_text() == "first run\n" and kept[0].name.startswith("same.")


def test_recurrence_switches_on_at_its_fraction_of_the_budget(synthetic_data):
    args = tiny_args(DATA_PATH=synthetic_data, ITERATIONS=10, LOOP_ENABLE_FRAC=0.35, WARMUP_STEPS=1, GPTQ_ENABLED=0, TRAIN_LOG_EVERY=0)
    model = fresh_model(args)
    seen = []
    forward = model.forward
    model.forward = lambda *a, **k: (seen.append(model.looping), forward(*a, **k))[1]
    log = Recorder()
    train_gpt.train_model(model, args, train_gpt.Runtime(), log, None)
    micro = 8  # one process: 8 micro-steps per step
    assert seen[: 2 * micro] == [False] * micro + [True] * micro, "the warm-up runs (and compiles) both graphs"
    timed = seen[2 * micro :]
    assert timed == [False] * 4 * micro + [True] * 6 * micro  # progress 4/10 is the first >= 0.35
    assert any(line.startswith("recurrence:on step:4 virtual_layers:6") for line in log.lines)
    assert model.looping
    always = tiny_args(DATA_PATH=synthetic_data, ITERATIONS=2, LOOP_ENABLE_FRAC=0, WARMUP_STEPS=1, GPTQ_ENABLED=0)
    model = fresh_model(always)
    train_gpt.train_model(model, always, train_gpt.Runtime(), Recorder(), None)
    assert model.looping
