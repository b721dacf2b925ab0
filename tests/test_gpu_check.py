"""bench/gpu_check.py: its CPU mode runs every part and writes the table, its budgets and its
supervision of the child hold, and without CUDA it refuses in one line."""

import json
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import gpu_check  # noqa: E402

SCRIPT = REPO / "bench" / "gpu_check.py"


def run_harness(*argv, timeout=600):
    return subprocess.run([sys.executable, str(SCRIPT), *argv], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def rows_by_check(report: dict) -> dict:
    return {(row["part"], row["check"]): row for row in report["rows"]}


def test_cpu_mode_runs_every_check_of_every_part(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = run_harness("--cpu", "--out", str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["finished"] and report["mode"] == "cpu" and report["device"] == "cpu"
    rows = rows_by_check(report)
    assert not [r for r in report["rows"] if r["status"] in ("FAIL", "ERROR")]
    assert [part for part in dict.fromkeys(row["part"] for row in report["rows"])][0] == "e2e", "the e2e part first"
    assert_e2e_rows(rows)

    correctness = [check for part, check in rows if part == "correctness"]
    for path in ("standard", "sliding_window", "ttt"):
        assert rows[("correctness", f"{path}: compiled vs eager")]["status"] == "pass"
        assert rows[("correctness", f"{path}: causal audit, compiled")]["status"] == "pass"
    ttt = rows[("correctness", "ttt compiled: every target once, bounded compiles")]
    scored_once = {name: (value, unit) for name, value, unit in ttt["figures"]}["scored once"]
    assert ttt["status"] == "pass" and scored_once[1] == f"of {scored_once[0]:,} targets"
    assert rows[("correctness", "attention sdpa vs fp32 SDPA")]["status"] == "pass"
    assert {rows[("correctness", f"attention {b} vs fp32 SDPA")]["status"] for b in ("fa3", "fa2")} == {"skipped"}
    assert rows[("correctness", "2 processes train like 1")]["status"] == "pass"
    assert correctness[0].startswith("training loss and gradients: compiled vs eager")
    assert rows[("correctness", correctness[0])]["status"] == "pass"

    speed = {check: row for (part, check), row in rows.items() if part == "speed"}
    assert [speed[c]["status"] for c in ("default, sdpa", "recurrence off, sdpa", "parallel residuals off, sdpa",
                                         "document isolation off, sdpa", "QAT on, sdpa")] == ["measured"] * 5
    step_ms = {name: value for name, value, unit in speed["default, sdpa"]["figures"] if unit == "ms/step"}
    assert step_ms["step"] > 0

    size = {check: row for (part, check), row in rows.items() if part == "size"}
    assert size["training"]["status"] == "measured"
    streams = [c for c in size if c.startswith("artifact stream ")]
    for kind in ("attn.", "mlp.", "tok_emb", "control"):  # one stream per kind of tensor: its bytes are that role's
        assert any(kind in c for c in streams), (kind, streams)
    total = {name: value for name, value, _ in size["artifact total vs cap"]["figures"]}
    assert size["artifact total vs cap"]["status"] == "pass" and total["total"] == total["code"] + total["artifact"]

    evaluation = {check: row for (part, check), row in rows.items() if part == "eval"}
    for path in ("standard", "sliding_window", "ttt"):
        figures = {name: value for name, value, _ in evaluation[f"eval {path}"]["figures"]}
        assert figures["projected"] == pytest.approx(gpu_check.FULL_VALIDATION_TOKENS / gpu_check.GPUS / figures["rate"])
    assert "eval projected total vs budget" in evaluation

    for row in report["rows"]:
        assert all(isinstance(value, (int, float)) and unit for _, value, unit in row["figures"]), row
    assert gpu_check.markdown_table(report) in done.stdout


def assert_e2e_rows(rows: dict):
    """The e2e part: train_gpt.py under torchrun (2 gloo processes) on real text, every stage of
    training and evaluation a row with its time, the speed before and after recurrence, the audit,
    submission_valid and every rank's exit code."""
    rows = {check: row for (part, check), row in rows.items() if part == "e2e"}
    for stage in ("preflight", "train_compile_warmup", "train", "calibration", "quantize", "compress", "reload", "eval_ttt_phased", "audit"):
        seconds = {name: value for name, value, _ in rows[f"stage {stage}"]["figures"]}["wall time"]
        assert rows[f"stage {stage}"]["status"] == "measured" and seconds >= 0, stage
    for state in ("off", "on"):
        figures = {name: value for name, value, _ in rows[f"training speed, recurrence {state}"]["figures"]}
        assert figures["step"] > 0 and figures["per GPU"] == pytest.approx(figures["throughput"] / 2)
    for check in ("audit", "submission_valid", "exit code (every rank)", "no compile inside the timed evaluation", "artifact"):
        assert rows[check]["status"] == "pass", check
    assert "nproc_per_node=2" in rows["command"]["note"]


def test_a_part_out_of_budget_skips_its_checks_and_the_next_part_runs(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = run_harness("--cpu", "--parts", "size,eval", "--budget", "size=0", "--out", str(out))
    report = json.loads(out.read_text())
    rows = rows_by_check(report)
    training = rows[("size", "train 20 steps, quantize, write the artifact")]
    assert training["status"] == "skipped" and "budget" in training["note"]
    # no artifact from the size part: the evaluation makes one of untrained weights and times every path
    assert rows[("eval", "artifact")]["status"] == "measured"
    assert rows[("eval", "eval ttt")]["status"] == "measured"
    assert done.returncode == 0 and report["finished"]


def write_events(path, *events):
    with open(path, "a") as f:
        for event in events:
            f.write(json.dumps(event) + "\n")


def test_a_child_stuck_past_the_hard_limit_is_stopped_and_the_rest_of_the_parts_go_on(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "HARD_LIMIT_GRACE_S", 0.5)  # budget 0.5 s: stopped after 1.25 s
    events = tmp_path / "events.jsonl"
    write_events(events, {"event": "part", "part": "speed"}, {"event": "check", "part": "speed", "check": "default, fa3"})
    stuck = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    opts = gpu_check.build_parser().parse_args(["--out", str(tmp_path / "t.json")])
    report = gpu_check.Report(opts, {})
    start = time.monotonic()
    remaining = gpu_check.watch_child(stuck, events, ["speed", "size", "eval"], report, {"speed": 0.5}, tmp_path / "t.log")
    assert time.monotonic() - start < 10 and stuck.poll() is not None
    assert remaining == ["size", "eval"]
    stopped, rest = report.data["rows"]
    assert (stopped["check"], stopped["status"]) == ("default, fa3", "ERROR") and "stopped after 1 s, the hard limit" in stopped["note"]
    assert rest["status"] == "skipped"
    assert json.loads((tmp_path / "t.json").read_text())["rows"] == report.data["rows"]


def test_a_child_that_crashes_is_reported_with_its_last_line(tmp_path):
    events, log = tmp_path / "events.jsonl", tmp_path / "t.log"
    write_events(events, {"event": "part", "part": "correctness"}, {"event": "part_done", "part": "correctness"},
                 {"event": "part", "part": "speed"}, {"event": "check", "part": "speed", "check": "default, sdpa"})
    log.write_text("RuntimeError: CUDA error: an illegal memory access was encountered\n")
    crashed = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    opts = gpu_check.build_parser().parse_args(["--out", str(tmp_path / "t.json")])
    report = gpu_check.Report(opts, {})
    remaining = gpu_check.watch_child(crashed, events, ["correctness", "speed", "eval"], report, {"correctness": 60, "speed": 60}, log)
    assert remaining == ["eval"]
    row = report.data["rows"][0]
    assert (row["part"], row["check"], row["status"]) == ("speed", "default, sdpa", "ERROR")
    assert "exited with 3" in row["note"] and "illegal memory access" in row["note"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_refuses_in_one_line(tmp_path):
    with pytest.raises(SystemExit) as stop:
        gpu_check.main(["--out", str(tmp_path / "x.json")])
    message = str(stop.value.code)
    assert message.startswith("error: no CUDA device") and "\n" not in message and "--cpu" in message
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("argv", [["--parts", "speed,typo"], ["--budget", "speed"], ["--budget", "nope=3"], ["--budget", "eval=-1"]])
def test_bad_options_stop_with_a_one_line_error(argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        gpu_check.main(["--cpu", "--out", str(tmp_path / "x.json"), *argv])
    assert stop.value.code != 0
    message = str(stop.value.code) if isinstance(stop.value.code, str) else capsys.readouterr().err.strip().splitlines()[-1]
    assert "error:" in message and ("--parts" in message or "PART=SECONDS" in message), message
