"""The records tools against the official record logs of every era (../shared/fixtures/official_logs,
skipped when absent) and against small logs written here for each format the parser must read."""

from __future__ import annotations

import json
import re
import sys
from decimal import Decimal
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "records"))

import logparse  # noqa: E402

FIXTURES = REPO.parent / "shared" / "fixtures" / "official_logs"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text()) if (FIXTURES / "expected.json").is_file() else {}
RECORD_1_0611 = "2026-04-27_SP8192_LQER_SparseGate_BOSSmearFix_9HpStack_1.0611"
EXACT_KEYS = {"bytes_total": "total_bytes", "bytes_code": "code_size_bytes", "steps": "steps", "seed": "seed"}
FLOAT_KEYS = {"val_bpb": "final_val_bpb", "val_loss": "final_val_loss", "step_avg_ms": "step_avg_ms", "eval_time_s": "eval_time_s"}


def official(rel: str) -> Path:
    if not FIXTURES.is_dir():
        pytest.skip("../shared/fixtures/official_logs is not beside the repository")
    return FIXTURES / rel


def agrees(parsed: float | None, claimed: float) -> bool:
    """Within 1e-6 where the claim has that precision, else equal once rounded as the claim is."""
    if parsed is None:
        return False
    decimals = -Decimal(str(claimed)).as_tuple().exponent
    if decimals >= 6:
        return abs(parsed - claimed) <= 1e-6
    return round(parsed, decimals) == claimed


# ----------------------------------------------------------------------------- the official logs


@pytest.mark.parametrize("rel", sorted(EXPECTED) or ["(fixtures absent)"])
def test_every_official_log_parses_to_its_claimed_numbers(rel):
    run = logparse.parse_log(official(rel))
    claims = EXPECTED[rel]
    for key, attr in EXACT_KEYS.items():
        if key in claims:
            assert getattr(run, attr) == claims[key], (key, getattr(run, attr), claims[key])
    for key, attr in FLOAT_KEYS.items():
        if key in claims:
            assert agrees(getattr(run, attr), claims[key]), (key, getattr(run, attr), claims[key])


def test_the_score_is_the_final_path_and_the_trailing_roundtrip_line_is_an_alias():
    run = logparse.parse_log(official("2026-03-23_LeakyReLU_LegalTTT_ParallelMuon/train_seed1337.log"))
    assert run.final_path == "ttt" and run.finals["ttt"].name == "legal_ttt"
    assert run.aliases == ["final_int8_zlib_roundtrip_exact"]
    # The alias repeats the sliding-window score; the roundtrip path keeps its own, worse, number.
    assert run.finals["roundtrip"].val_bpb == pytest.approx(1.14518023) and run.finals["sliding_window"].val_bpb == pytest.approx(1.12165091)
    assert run.ttt_gain_bpb == pytest.approx(1.12165091 - 1.11922988)


def test_appended_runs_are_counted_and_the_last_one_is_read():
    run = logparse.parse_log(official("2026-03-19_MixedQuant_Int6Int8_SlidingWindow/train.log"))
    assert run.runs_in_file == 3 and run.steps == 12395 and run.finals["sliding_window"].name == "final_sliding_window_eval"


def test_hyperparameters_block_and_printed_source():
    run = logparse.parse_log(official("2026-04-01_Vocab4096_MLPMult4_WD085/train_seed1337.log"))
    assert (run.settings["SEED"], run.settings["MATRIX_LR"], run.run_id) == ("1337", "0.02", "1337")
    assert not any(name.islower() for name in run.settings)
    assert [p.step for p in run.val_curve] == [0, 4000, 5962] and run.train_curve[-1].train_time_ms == pytest.approx(9.1 * 60_000)
    assert run.pre_quant_val_bpb == pytest.approx(1.10481601) and run.quant_scheme == "int6+brotli"


def test_timestamps_compressed_code_size_and_total_eval_time():
    run = logparse.parse_log(official("2026-04-13_VarLenAttn_PhasingTTT2000/logs/train0.txt"))
    assert (run.code_size_bytes, run.code_size_uncompressed_bytes, run.artifact_bytes) == (28599, 139831, 15968098)
    assert run.eval_time_total_ms == pytest.approx(500_100) and run.finals["ttt"].name == "quantized_ttt_phased"
    assert run.finals["roundtrip"].name == "quantized" and run.settings["SEED"] == "0"


def test_compare_reads_every_official_log(capsys):
    import compare

    logs = [str(official(rel)) for rel in sorted(EXPECTED)]
    assert compare.main([*logs, "--markdown"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()[2:]
    scores = [float(row.strip("|").split("|")[5]) for row in rows]  # the score column, 6 decimals
    assert len(scores) == len(EXPECTED) and all(agrees(score, EXPECTED[rel]["val_bpb"]) for score, rel in zip(scores, sorted(EXPECTED)))


# ----------------------------------------------------------------------------- each format, written here


def test_source_before_the_versions_is_never_read():
    source = "\n".join([
        '"""Docs that quote a log: final_int6_roundtrip_exact val_loss:9.00000000 val_bpb:9.00000000"""',
        "SEED=7",
        "step:5/10 val_loss:9.0 val_bpb:9.0 train_time:1ms step_avg:1ms",
        "Serialized model int6: 999 bytes",
        "Hyperparameters:",
        "  seed: 8",
        "  matrix_lr: 9",
    ])
    text = source + "\n" + "=" * 100 + "\n" + "\n".join([
        "python 3.12.1 torch 2.6.0 numpy 2.1.0 platform Linux",
        "SEED=42",
        "final_int6_roundtrip_exact val_loss:2.00000000 val_bpb:1.20000000",
    ])
    run = logparse.parse_text(text)
    assert (run.seed, run.steps, run.artifact_bytes, run.final_val_bpb) == (42, None, None, 1.2)
    assert run.settings == {"SEED": "42"}


def test_unformatted_f_strings_are_not_results():
    run = logparse.parse_text("\n".join([
        'final_int6_roundtrip_exact val_loss:{q_val_loss:.8f} val_bpb:{q_val_bpb:.8f}',
        "step:{step}/{args.iterations} val_loss:{val_loss:.4f} val_bpb:{val_bpb:.4f}",
        "quantized_ttt val_loss:{loss} val_bpb:{bpb} eval_time:{ms}ms",
    ]))
    assert run.finals == {} and run.final_val_bpb is None and run.val_curve == []


def test_official_formats_written_here():
    text = "\n".join([
        "1700000000.100 Hyperparameters:",
        "1700000000.100   seed: 5",
        "1700000000.100   run_id: abc",
        "1700000000.200 0/100 val_loss: 7.0000 val_bpb: 4.0000",
        "1700000000.300 50/100 train_loss: 3.5000 train_time: 0.5m tok/s: 100",
        "1700000000.400 100/100 val_loss: 3.0000 val_bpb: 1.3000",
        "1700000000.500 stopping_early: wallclock_cap train_time: 61000ms step: 100/100",
        "1700000000.600 pre-quantization post-ema val_loss:2.90000000 val_bpb:1.25000000 eval_time:10ms",
        "1700000000.700 Code size (uncompressed): 5000 bytes",
        "1700000000.700 Code size (compressed): 2000 bytes",
        "1700000000.800 Serialized model quantized+brotli: 15000000 bytes",
        "1700000000.800 Total submission size quantized+brotli: 15002000 bytes",
        "1700000000.900 final_int6_roundtrip val_loss:2.9500 val_bpb:1.2700 eval_time:5ms",
        "1700000001.000 final_sliding_window_eval stride:64 val_loss:2.91000000 val_bpb:1.26000000 eval_time:50ms",
        "1700000001.100 final_int8_zlib_roundtrip_exact val_loss:2.91000000 val_bpb:1.26000000",
        "1700000001.200 legal_ttt val_loss:2.9000 val_bpb:1.2550 eval_time:300ms",
        "1700000001.300 total_eval_time:355.0s",
    ])
    run = logparse.parse_text(text)
    assert (run.seed, run.run_id, run.steps, run.train_time_ms) == (5, "abc", 100, 61000.0)
    assert run.train_curve == [(50, 30_000.0, 3.5, None)] and [(p.step, p.bpb) for p in run.val_curve] == [(0, 4.0), (100, 1.3)]
    assert (run.code_size_bytes, run.total_bytes, run.artifact_bytes) == (2000, 15_002_000, 15_000_000)
    assert {p: s.name for p, s in run.finals.items()} == {"roundtrip": "final_int6_roundtrip", "sliding_window": "final_sliding_window_eval", "ttt": "legal_ttt"}
    assert run.aliases == ["final_int8_zlib_roundtrip_exact"] and run.finals["roundtrip"].val_bpb == 1.27
    assert (run.final_path, run.final_val_bpb, run.eval_time_s) == ("ttt", 1.255, 355.0)
    assert run.quant_gap_bpb == pytest.approx(0.02) and run.ttt_gain_bpb == pytest.approx(0.005)


# ----------------------------------------------------------------------------- train_gpt.py for community tools


def test_byte_table_is_named_as_static_checkers_look_for_it():
    """Community byte-count checkers read the canonical LUT line of the script: the table named
    base_bytes gets len(piece.encode("utf-8")) of the piece after its leading space was removed."""
    source = (REPO / "train_gpt.py").read_text()
    body = source.split("def build_byte_tables", 1)[1].split("\ndef ", 1)[0]
    assert re.search(r'^\s*base_bytes\[\w+\] = len\(piece\.encode\("utf-8"\)\)$', body, re.M), body
    assert "piece[1:]" in body, "the leading space is stripped before counting"
    assert "+ 1" not in body, "the space byte is added at scoring time only"


# ----------------------------------------------------------------------------- stats


def test_stats_reproduces_the_1_0611_record_from_its_three_logs(capsys):
    import stats

    folder = official(RECORD_1_0611)
    sub = json.loads((folder / "submission.json").read_text())
    logs = [str(folder / f"train_seed{seed}.log") for seed in sub["seeds"]]
    report = stats.record_report(stats.load_runs(logs), stats.record_from_submission(folder / "submission.json"))
    assert report.seeds == sub["seeds"] and report.new_mean_bpb == pytest.approx(sub["val_bpb"], abs=1e-8)
    assert report.new_mean_loss == pytest.approx(sub["val_loss"], abs=1e-8)
    # The record's std is the population std (0.00090), not the sample std (0.00111).
    assert round(report.new_population_std_bpb, 5) == sub["val_bpb_std"] and round(report.new_std_bpb, 5) == 0.00111
    assert round(report.new_population_std_loss, 5) == sub["val_loss_std"]
    assert report.prev_std_convention == "population"
    assert stats.main([*logs, "--prev-submission", str(folder / "submission.json")]) == 2  # the same runs: no improvement
    out = capsys.readouterr().out
    assert "1.06107587 ± 0.00110608 sample std" in out and "± 0.00090311 population std" in out  # numpy std ddof=1, ddof=0
    assert "reports val_bpb_std 0.0009: the population std of its seeds" in out


def test_stats_tells_which_std_each_official_record_reports():
    import stats

    folders = {p.parent.name: json.loads(p.read_text()) for p in official(".").glob("*/submission.json")}
    conventions = {
        name: stats.std_convention(list(stats.per_seed_bpb(sub).values()), sub["val_bpb_std"])
        for name, sub in folders.items() if "val_bpb_std" in sub
    }
    assert conventions == {
        "2026-03-25_ValCalib_GPTQ_XSA_BigramHash3072": "sample",
        "2026-04-01_Vocab4096_MLPMult4_WD085": "sample",
        "2026-04-05_SP8192_GPTQ-Embeddings_SDClip_Loop45x2": "sample",
        "2026-04-09_SP8192_3LayerRecur_ParResid_QK525_LegalTTT": "sample",
        "2026-04-10_VarLenAttn": "sample",
        "2026-04-13_VarLenAttn_PhasingTTT2000": "population",
        RECORD_1_0611: "population",
    }


@pytest.mark.parametrize("form", [
    {"seed_results": {"1": {"val_bpb": 1.101}, "2": {"val_bpb": 1.102}, "3": {"val_bpb": 1.104}}},
    {"seed_results": [{"seed": 1, "val_bpb": 1.101}, {"seed": 2, "val_bpb": 1.102}, {"seed": 3, "val_bpb": 1.104}]},
    {"seeds": [1, 2, 3], "seed_scores": [1.101, 1.102, 1.104]},
    {"seeds": [1, 2, 3], "seed_scores": {"1": 1.101, "2": 1.102, "3": 1.104}},
])
def test_stats_reads_every_per_seed_form_of_a_submission(tmp_path, form):
    import stats

    path = tmp_path / "submission.json"
    path.write_text(json.dumps({"val_bpb": 1.1023, "val_bpb_std": 0.00153, **form}))
    prev = stats.record_from_submission(path)
    assert prev.bpb == [1.101, 1.102, 1.104] and [str(s) for s in prev.seeds] == ["1", "2", "3"]
    assert stats.std_convention(prev.bpb, prev.reported_std_bpb) == "sample"


# ----------------------------------------------------------------------------- plot


def test_plot_of_the_1_0611_seeds_has_a_line_per_run_in_each_curve_panel_and_a_bar_per_path(tmp_path, capsys):
    import matplotlib.image
    import plot

    folder = official(RECORD_1_0611)
    logs = [folder / f"train_seed{seed}.log" for seed in (42, 0, 1234)]
    runs = [logparse.parse_log(p) for p in logs]
    fig = plot.make_figure(runs)
    loss_step, loss_time, bpb_step, bpb_time, bars = fig.axes
    assert [len(ax.get_lines()) for ax in (loss_step, loss_time, bpb_step, bpb_time)] == [3, 3, 3, 3]
    assert [line.get_label() for line in loss_step.get_lines()] == ["record_smearfix_s42", "record_smearfix_s0", "record_smearfix_s1234"]
    assert len(loss_time.get_lines()[0].get_xdata()) == len(runs[0].train_curve)  # every train point has a time
    assert len(bars.patches) == 9  # pre-quant, roundtrip and TTT of each seed (no sliding window in this record)
    notes = [t.get_text() for t in bars.texts]
    assert sum("quant gap +0.0086" in n for n in notes) == 2 and any(n.startswith("1.0599") for n in notes)
    out = tmp_path / "record.png"
    assert plot.main([*map(str, logs), "-o", str(out), "--title", "1.0611"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and matplotlib.image.imread(out).shape == (990, 1760, 4)
    assert capsys.readouterr().out == f"wrote {out}\n"


def test_plot_without_matplotlib_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    import plot

    log = tmp_path / "run.txt"
    log.write_text("step:1/2 train_loss:5.0 train_time:10ms step_avg:10ms\nfinal_int6_roundtrip_exact val_loss:3.0 val_bpb:1.5\n")
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if it were not installed
    assert plot.main([str(log), "-o", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err
    assert err == "error: plotting needs matplotlib: pip install matplotlib\n" and not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("name, written", [("record", "record.png"), ("record.v2", "record.v2.png"), ("record.jpg", "record.jpg.png"), ("record.PNG", "record.PNG")])
def test_plot_writes_the_file_it_names(tmp_path, capsys, name, written):
    """-o without .png: matplotlib would add .png itself (or write another format for another suffix) while
    the tool printed the name it was given; it writes a PNG under the name it prints, and says why."""
    import plot

    pytest.importorskip("matplotlib")
    log = tmp_path / "run.txt"
    log.write_text("step:1/2 train_loss:5.0 train_time:10ms step_avg:10ms\nfinal_int6_roundtrip_exact val_loss:3.0 val_bpb:1.5\n")
    assert plot.main([str(log), "-o", str(tmp_path / name)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"wrote {tmp_path / written}") and out.count("\n") == 1
    assert ("does not end with .png" in out) == (name != written)
    assert [p.name for p in tmp_path.iterdir() if p.name != "run.txt"] == [written]
    assert (tmp_path / written).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
