"""records/sweep.py end to end: a 2x2 grid (MATRIX_LR x SEED) of tiny train_gpt.py runs on synthetic
shards with a tokenizer trained here (a few seconds per run, CPU), then resuming it."""

from __future__ import annotations

import random
import re
import sys
from pathlib import Path

import matplotlib.image
import pytest

from conftest import REPO, TINY, mark_synthetic, synthetic_stream, train_gpt

sys.path.insert(0, str(REPO / "records"))
sys.path.insert(0, str(REPO / "data"))
import build_shards  # noqa: E402
import logparse  # noqa: E402
import sweep  # noqa: E402

WORDS = "the of and to in river city north south engine signal market".split()


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """(environment, folder): shards of synthetic documents and a SentencePiece model of their vocabulary size."""
    root = tmp_path_factory.mktemp("sweep")
    rng = random.Random(0)
    model = build_shards.train_tokenizer([" ".join(rng.choice(WORDS) for _ in range(30)) for _ in range(200)], 64, root / "tok" / "sweep.model")
    import sentencepiece as spm

    vocab = spm.SentencePieceProcessor(model_file=str(model)).vocab_size()
    data = root / "data"
    train_gpt.write_data_shard(data / "fineweb_train_000000.bin", synthetic_stream(400, vocab=vocab, seed=1))
    train_gpt.write_data_shard(data / "fineweb_val_000000.bin", synthetic_stream(30, vocab=vocab, seed=2))
    mark_synthetic(data)
    env = {k: str(v) for k, v in TINY.items()}
    env.update(DATA_PATH=str(data), TOKENIZER_PATH=str(model), VOCAB_SIZE=str(vocab), ITERATIONS="3", TRAIN_LOG_EVERY="1",
               VAL_LOSS_EVERY="2", VAL_MAX_TOKENS="600", LOG_DIR=str(root / "logs"), OMP_NUM_THREADS="1")
    return env, root


def sweep_in(root: Path, env: dict, monkeypatch, *extra: str) -> int:
    for name in [n for n in list(__import__("os").environ) if re.match(r"(TTT|QUANT|GPTQ|EVAL|ARTIFACT|SIZE|SWA|EMA|QAT|SEED|RUN_ID)", n)]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(root)
    return sweep.main(["--set", "MATRIX_LR=0.02,0.03", "--seeds", "1", "2", "--name", "lr",
                       "--launch", f"{sys.executable} {REPO / 'train_gpt.py'}", "--quiet", *extra])


@pytest.fixture(scope="module")
def swept(tiny_setup):
    env, root = tiny_setup
    with pytest.MonkeyPatch.context() as mp:
        code = sweep_in(root, env, mp)
    return code, root / "logs"


def test_sweep_runs_the_grid_and_prints_mean_and_std_per_setting(swept, capsys):
    code, logs = swept
    assert code == 0
    expected = [f"lr_matrix_lr{lr}_seed{seed}" for seed in (1, 2) for lr in ("0.02", "0.03")]
    assert sorted(p.stem for p in logs.glob("*.txt")) == sorted(expected)
    runs = {p.stem: logparse.parse_log(p) for p in logs.glob("*.txt")}
    for run_id, run in runs.items():
        lr, seed = re.match(r"lr_matrix_lr([\d.]+)_seed(\d)", run_id).groups()
        assert (run.settings["MATRIX_LR"], run.seed, run.final_path, run.submission_valid) == (lr, int(seed), "ttt", True)
    image = matplotlib.image.imread(logs / "lr.png")
    assert image.ndim == 3 and image.shape[2] == 4


def test_sweep_output_has_the_compare_table_and_the_summary(tiny_setup, swept, capsys, monkeypatch):
    env, root = tiny_setup
    assert sweep_in(root, env, monkeypatch) == 0  # everything done: nothing runs again
    out = capsys.readouterr().out
    assert out.count("done already") == 4 and "running" not in out
    assert len(list((root / "logs").glob("*.txt"))) == 4, "no run was started again (it would have renamed its old log)"
    runs = {p.stem: logparse.parse_log(p) for p in (root / "logs").glob("*.txt")}
    for lr in ("0.02", "0.03"):
        scores = [r.final_val_bpb for r in runs.values() if r.settings["MATRIX_LR"] == lr]
        mean = sum(scores) / 2
        std = abs(scores[0] - scores[1]) / 2 ** 0.5  # sample std of two values
        assert re.search(rf"^  {re.escape(lr)}\s+2\s+{mean:.6f} ± {std:.6f}$", out, re.M), out
    table = [line for line in out.splitlines() if line.startswith("lr_matrix_lr")]
    assert len(table) == 4 and all(f"{runs[line.split()[0]].final_val_bpb:.6f}" in line for line in table)


def test_sweep_resumes_a_run_that_did_not_finish(tiny_setup, swept, capsys, monkeypatch):
    env, root = tiny_setup
    log = root / "logs" / "lr_matrix_lr0.03_seed2.txt"
    text = log.read_text()
    log.write_text(text.split("final_")[0])  # died before its evaluation
    assert sweep_in(root, env, monkeypatch, "--no-plot") == 0
    out = capsys.readouterr().out
    assert out.count("done already") == 3 and out.count(": running with ") == 1 and "lr_matrix_lr0.03_seed2: running" in out
    assert logparse.parse_log(log).submission_valid is True
    assert len(list((root / "logs").glob("lr_matrix_lr0.03_seed2.*.txt"))) == 1, "train_gpt.py kept the unfinished log aside"


def test_our_logs_end_their_scores_with_the_official_alias_line(swept):
    _, logs = swept
    paths = [p for p in logs.glob("*.txt") if re.fullmatch(r"lr_matrix_lr0\.0[23]_seed[12]", p.stem)]  # not the kept unfinished log
    assert len(paths) == 4
    for path in paths:
        run = logparse.parse_log(path)
        last = [line for line in path.read_text().splitlines() if "val_bpb:" in line][-1]
        assert last == f"final_int8_zlib_roundtrip_exact val_loss:{run.final_val_loss:.8f} val_bpb:{run.final_val_bpb:.8f}"
        assert run.aliases == ["final_int8_zlib_roundtrip_exact"] and run.finals["roundtrip"].name.endswith("_roundtrip")


@pytest.mark.parametrize("argv, message", [
    (["--set", "matrix_lr=1,2"], "upper-case setting name"),
    (["--set", "A=1,,2"], "a value is empty"),
    (["--set", "A=1", "--set", "A=2"], "given twice"),
    (["--set", "SEED=1,2", "--seeds", "3"], "not both"),
    ([], "nothing to sweep"),
    (["--seeds", "1", "--launch", "no_such_launcher_xyz train_gpt.py"], "cannot start 'no_such_launcher_xyz'"),
])
def test_sweep_errors_are_one_line(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LOG_DIR", str(tmp_path / "logs"))
    assert sweep.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_dry_run_checks_every_configuration_with_the_scripts_settings(tmp_path, monkeypatch, capsys):
    """Every problem of every run to do, at once, each once with the runs it stops; nothing runs."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LOG_DIR", str(tmp_path / "logs"))
    launch = f"{sys.executable} {REPO / 'train_gpt.py'}"
    argv = ["--set", "MATRIX_LR=0.02,abc", "--set", "NUM_HEADS=8,7", "--seeds", "1", "2", "--launch", launch]
    assert sweep.main([*argv, "--dry-run"]) == 1
    captured = capsys.readouterr()
    assert captured.out.count(": to run with ") == 8
    errors = captured.err.splitlines()
    assert errors[0] == f"error: {REPO / 'train_gpt.py'} refuses these settings, so nothing was run:"
    assert errors[1:] == [
        "error: sweep_matrix_lr0.02_num_heads7_seed1 and 1 more run(s): NUM_KV_HEADS=4 must divide NUM_HEADS=7",
        f"error: sweep_matrix_lrabc_num_heads8_seed1 and 3 more run(s): MATRIX_LR='abc' is not a valid float; "
        + next(s.doc for s in train_gpt.SETTINGS if s.name == "MATRIX_LR"),
    ]
    assert sweep.main(argv) == 1  # without --dry-run the same check stops the sweep before its first run
    assert "nothing was run" in capsys.readouterr().err and not (tmp_path / "logs").exists()
    assert sweep.main(["--set", "MATRIX_LR=0.02,0.03", "--launch", launch, "--dry-run"]) == 0
    assert capsys.readouterr().out.endswith("accepts the settings of every run to do\n")


def test_quiet_prints_a_failed_runs_reason_and_its_real_log(tmp_path, monkeypatch, capsys):
    """--quiet hides the runs' output, so a failure prints its error lines, and the log only where the run wrote one."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.setenv("DATA_PATH", str(tmp_path / "no_data"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert sweep.main(["--set", "MATRIX_LR=0.02", "--name", "real", "--quiet", "--no-plot", "--launch", f"{sys.executable} {REPO / 'train_gpt.py'}"]) == 1
    out = capsys.readouterr().out
    log = tmp_path / "logs" / "real_matrix_lr0.02.txt"
    assert f"real_matrix_lr0.02: failed (exit 1; log {log}):" in out and log.is_file()
    assert f"  error: no fineweb_train_*.bin shards in DATA_PATH={tmp_path / 'no_data'}" in out, out
    # a launcher that fails before writing any log; an older log of the same RUN_ID is not this run's
    (tmp_path / "fail.py").write_text("import sys\nprint('starting', file=sys.stderr)\nsys.exit('error: the machine has no GPU today')\n")
    stale = tmp_path / "logs" / "gone_matrix_lr0.02.txt"
    stale.write_text("an earlier attempt\n")
    old = stale.stat().st_mtime - 60
    __import__("os").utime(stale, (old, old))
    assert sweep.main(["--set", "MATRIX_LR=0.02", "--name", "gone", "--quiet", "--no-plot", "--launch", f"{sys.executable} fail.py"]) == 1
    captured = capsys.readouterr()
    assert "gone_matrix_lr0.02: failed (exit 1; it wrote no log):\n  error: the machine has no GPU today\n" in captured.out, captured.out
    assert "settings are not checked" in captured.err
