"""Build a record folder from the logs of finished runs (one per seed), or refuse with the reason.

    python3 records/make_submission.py logs/seed1337.txt logs/seed42.txt logs/seed2025.txt \\
        --name "Int6 GPTQ LoRA TTT" --author "Jane Doe" --github-id janedoe --blurb "..."

writes `records/track_10min_16mb/<YYYY-MM-DD>_<Name>/` (`--non-record`:
`records/track_non_record_16mb/...`) with submission.json, a README.md skeleton (method to fill
in, per-seed results, the exact command, compliance notes), the logs as `train_seed{seed}.log`
and the exact train_gpt.py that produced them.

Everything in submission.json comes from what the logs prove. It refuses, creating nothing, when
  - the script's sha256 differs from the `code_sha256` a run logged, or the runs disagree on it,
  - a run's counted size (artifact bytes + shipped code bytes) is not under 16,000,000 bytes,
  - a log has no final score, no seed, or two logs share a seed,
  - a log does not end with `submission_valid:yes` (a run that died during its evaluation has the
    score of an earlier path in its log, not the score of the run),
  - an evaluation audit the run logged did not pass (`eval_audit … verdict:` and `eval_audit_verdict:`),
  - the runs differ in a setting other than SEED and RUN_ID (then no single command reproduces them),
  - for the record track, a log is a QUANTIZE_ONLY run (it quantized and scored the weights an
    earlier run saved when its artifact could not be written, so it holds no training) and the log
    of that training run is not given with --training-log; given, it must be of the same script,
    RUN_ID, seed and settings and name the weights file, and its training figures are the run's.

The reproduce command never names a file the runs loaded (QUANTIZE_ONLY, EVAL_ONLY): it trains.

With `--wrap`, the shipped train_gpt.py is a self-extracting lzma + base85 copy of the script; its
size is then the counted code size, and it is checked to decode to the logged script and to load.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import datetime as dt
import hashlib
import importlib.util
import json
import lzma
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import logparse
import stats

CAP_BYTES = 16_000_000
TRAIN_LIMIT_MS = 600_000
EVAL_LIMIT_S = 600.0
LOADED_FILE_SETTINGS = ("QUANTIZE_ONLY", "EVAL_ONLY")  # a file on the machine that ran: never in the reproduce command
PER_RUN_SETTINGS = ("SEED", "RUN_ID", *LOADED_FILE_SETTINGS)  # the only settings allowed to differ between the seeds
TRAINING_FIELDS = ("steps", "iterations", "step_avg_ms", "train_time_ms", "stopped_early", "train_curve", "val_curve", "model_params",
                   "peak_mem_allocated_mib", "peak_mem_reserved_mib")  # what a QUANTIZE_ONLY run takes from its training log
SAVED_WEIGHTS = re.compile(r"the trained weights are saved in (.+?): fix the cause")  # train_gpt.py's keep_trained_weights
RECORDS_DIR = Path(__file__).resolve().parent
REPO_ROOT = RECORDS_DIR.parent
TRUE_WORDS, FALSE_WORDS = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class SubmissionError(Exception):
    """A reason to refuse; main() prints it as one line and exits 1."""


# ----------------------------------------------------------------------------- checks


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_runs(paths: list[str]) -> list[logparse.RunLog]:
    runs = []
    for path in paths:
        try:
            run = logparse.parse_log(path)
        except OSError as e:
            raise SubmissionError(f"cannot read {path}: {e}") from None
        if run.final_val_bpb is None or run.final_val_loss is None:
            raise SubmissionError(f"{path}: no final score (no final_..._exact line); did the run finish?")
        if run.seed is None:
            raise SubmissionError(f"{path}: no seed logged (SEED=... line)")
        if run.runs_in_file > 1:
            raise SubmissionError(f"{path}: holds {run.runs_in_file} runs appended together; give the log of one run")
        check_finished_and_valid(run)
        check_audits(run)
        runs.append(run)
    seeds = [r.seed for r in runs]
    if len(set(seeds)) != len(seeds):
        dup = sorted({s for s in seeds if seeds.count(s) > 1})
        raise SubmissionError(f"several logs for seed {', '.join(map(str, dup))}; give one log per seed")
    return runs


def check_finished_and_valid(run: logparse.RunLog):
    """The run's own last word: train_gpt.py ends every finished run with submission_valid."""
    if run.submission_valid is None:
        raise SubmissionError(
            f"{run.path}: no submission_valid line, so the run stopped before its evaluation finished "
            f"(its last score, {run.final_path}, may not be the run's); rerun it"
        )
    if not run.submission_valid:
        raise SubmissionError(f"{run.path}: logged submission_valid:no ({run.submission_reason or 'no reason given'})")


def check_audits(run: logparse.RunLog):
    """Every evaluation audit the run logged must have passed (a run without the audit has none)."""
    failed = sorted(path for path, verdict in run.audits.items() if verdict != "PASS")
    if failed:
        raise SubmissionError(f"{run.path}: the evaluation audit of {', '.join(failed)} did not pass (eval_audit … verdict:)")
    if run.audit_verdict == "FAIL" or (run.audits and run.audit_verdict != "PASS"):
        raise SubmissionError(f"{run.path}: eval_audit_verdict:{run.audit_verdict or 'missing'}, PASS is needed")


def check_code_hash(runs: list[logparse.RunLog], script: Path, script_sha: str):
    """The shipped script must be byte for byte the one every run logged."""
    for run in runs:
        if run.code_sha256 is None:
            raise SubmissionError(f"{run.path}: no code_sha256 line, so nothing proves which script ran")
    hashes = {r.code_sha256 for r in runs}
    if len(hashes) > 1:
        detail = ", ".join(f"{Path(r.path).name}={r.code_sha256[:12]}" for r in runs)
        raise SubmissionError(f"the runs ran different scripts (code_sha256 {detail})")
    logged = hashes.pop()
    if logged != script_sha:
        raise SubmissionError(
            f"{script} has sha256 {script_sha[:12]}..., the runs logged {logged[:12]}...: "
            "pass --script with the exact train_gpt.py that ran"
        )


def check_same_settings(runs: list[logparse.RunLog]):
    first = runs[0]
    for run in runs[1:]:
        if differ := stats.differing_settings(first, run, PER_RUN_SETTINGS):
            raise SubmissionError(f"{Path(run.path).name} and {Path(first.path).name} differ in settings other than {'/'.join(PER_RUN_SETTINGS)}: {differ}")


def attach_training_logs(runs: list[logparse.RunLog], training_logs: list[str], record_track: bool) -> dict[int, str]:
    """Each QUANTIZE_ONLY run with the training figures of the run whose saved weights it quantized, from
    that run's log (same script, RUN_ID, seed and settings; it names the weights file). Returns seed ->
    training log path. Without it, the record track refuses: nothing proves the weights were trained
    within the rules; the non-record track takes the run with no training figures."""
    trainings = []
    for path in training_logs:
        try:
            text = Path(path).read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise SubmissionError(f"cannot read --training-log {path}: {e.strerror}") from None
        saved = SAVED_WEIGHTS.findall(text)
        trainings.append((logparse.parse_text(text, path), Path(saved[-1]).name if saved else None))
    paired = {}
    for i, run in enumerate(runs):
        weights = run.settings.get("QUANTIZE_ONLY")
        if not weights:
            continue
        training = next((t for t, saved in trainings if saved == Path(weights).name and t.run_id == run.run_id), None)
        if training is None:
            if record_track:
                raise SubmissionError(
                    f"{run.path} is a QUANTIZE_ONLY run: it quantized weights an earlier run saved ({weights}) and holds no training; "
                    f"give that run's log (it ends with 'the trained weights are saved in …{Path(weights).name}') with --training-log, or use --non-record")
            continue
        if training.code_sha256 != run.code_sha256:
            raise SubmissionError(f"{training.path} ran another script than {run.path} (code_sha256 {str(training.code_sha256)[:12]} vs {str(run.code_sha256)[:12]}); a record ships the one script that trained and scored")
        if differ := stats.differing_settings(training, run, ("RUN_ID", *LOADED_FILE_SETTINGS)):
            raise SubmissionError(f"{training.path} trained with other settings than {run.path} quantized with: {differ}")
        if training.train_time_ms is None:
            raise SubmissionError(f"{training.path}: no training time logged, so it does not show the weights were trained within the rules")
        runs[i] = dataclasses.replace(run, **{f: getattr(training, f) for f in TRAINING_FIELDS})
        paired[run.seed] = training.path
    unused = sorted(set(training_logs) - set(paired.values()))
    if unused:
        raise SubmissionError(f"--training-log {unused[0]} saved no weights that a QUANTIZE_ONLY log given here quantized (same RUN_ID, same weights file)")
    return paired


def counted_totals(runs: list[logparse.RunLog], code_bytes: int) -> dict[int, int]:
    """Per seed: artifact bytes + bytes of the shipped script, which must be under the cap."""
    totals = {}
    for run in runs:
        if run.artifact_bytes is not None:
            totals[run.seed] = run.artifact_bytes + code_bytes
        elif run.total_bytes is not None:
            totals[run.seed] = run.total_bytes
        else:
            raise SubmissionError(f"{run.path}: no artifact size logged (Serialized model ... bytes)")
        if totals[run.seed] >= CAP_BYTES:
            raise SubmissionError(
                f"seed {run.seed}: {totals[run.seed]:,} bytes (artifact + code) is not under the {CAP_BYTES:,}-byte cap"
            )
    return totals


# ----------------------------------------------------------------------------- the shipped script


def wrap_source(source: bytes) -> bytes:
    """A self-extracting script: lzma-compressed source in a base85 string (no quote or backslash in it)."""
    payload = base64.b85encode(lzma.compress(source, preset=9 | lzma.PRESET_EXTREME)).decode("ascii")
    return (
        "import lzma,base64\n"
        f'exec(compile(lzma.decompress(base64.b85decode("{payload}")),"<train_gpt>","exec"))\n'
    ).encode("ascii")


def unwrap_source(wrapped: bytes) -> bytes:
    payload = re.search(rb'b85decode\("([^"]*)"\)', wrapped)
    if payload is None:
        raise SubmissionError("the wrapped script has no b85decode payload")
    return lzma.decompress(base64.b85decode(payload.group(1)))


def check_wrapped(path: Path, source: bytes):
    """The wrapper decodes to the exact logged source and loads in a fresh interpreter (main() not run)."""
    if unwrap_source(path.read_bytes()) != source:
        raise SubmissionError("the wrapped script does not decode to the original source")
    probe = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='train_gpt_wrap_check')"
    done = subprocess.run([sys.executable, "-c", probe, str(path)], capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise SubmissionError(f"the wrapped script does not load: {last}")


def shipped_code_file(runs: list[logparse.RunLog]) -> bytes | None:
    """The train_gpt.py the runs wrote beside their logs (`shipped_code file:… bytes:… sha256:…`), byte for
    byte what they logged, or None when the logs name none (older runs)."""
    pattern = re.compile(r"^shipped_code file:(\S+) bytes:(\d+) sha256:([0-9a-f]{64})$", re.M)
    logged = [pattern.search(Path(run.path).read_text(encoding="utf-8", errors="replace")) for run in runs]
    if not any(logged):
        return None
    if not all(logged) or len({m.group(3) for m in logged}) > 1:
        raise SubmissionError("the runs did not all write the same shipped train_gpt.py (shipped_code lines differ); give logs of one script")
    name, size, sha = logged[0].groups()
    path = Path(runs[0].path).parent / name
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SubmissionError(f"cannot read {path}, the shipped train_gpt.py the run wrote beside its log: {e.strerror}") from None
    if len(data) != int(size) or sha256_bytes(data) != sha:
        raise SubmissionError(f"{path} has {len(data)} bytes (sha256 {sha256_bytes(data)[:12]}...), the run logged {size} bytes (sha256 {sha[:12]}...): ship the file the run wrote")
    return data


# ----------------------------------------------------------------------------- settings and the command


def script_defaults(script: Path) -> dict[str, object] | None:
    """NAME -> default from the script's SETTINGS (each has .name and .default); None if it cannot be read."""
    spec = importlib.util.spec_from_file_location("train_gpt_for_defaults", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script loads
    try:
        spec.loader.exec_module(module)
        return {s.name: s.default for s in module.SETTINGS}
    except Exception as e:  # any failure only costs the shorter command line
        print(f"warning: cannot read the defaults of {script} ({type(e).__name__}: {e}); the command lists every setting", file=sys.stderr)
        return None
    finally:
        sys.modules.pop(spec.name, None)


def same_as_default(default: object, logged: str) -> bool:
    if isinstance(default, bool):
        low = logged.strip().lower()
        return (low in TRUE_WORDS and default) or (low in FALSE_WORDS and not default)
    if isinstance(default, (int, float)):
        try:
            return float(logged) == float(default)
        except ValueError:
            return False
    return logged == str(default)


def env_value(logged: str) -> str:
    """Logged booleans read True/False; the environment takes 1/0 just as well and is shorter."""
    return {"True": "1", "False": "0"}.get(logged, logged)


def changed_settings(run: logparse.RunLog, defaults: dict[str, object] | None) -> dict[str, str]:
    return {
        name: env_value(value)
        for name, value in run.settings.items()
        if name not in PER_RUN_SETTINGS and (defaults is None or name not in defaults or not same_as_default(defaults[name], value))
    }


def command(runs: list[logparse.RunLog], changed: dict[str, str], script_rel: str) -> str:
    seeds = " ".join(str(r.seed) for r in runs)
    nproc = runs[0].world_size or 8
    env = "".join(f"  {name}={shlex.quote(value)} \\\n" for name, value in changed.items())
    return (
        f"for SEED in {seeds}; do\n"
        f"  SEED=$SEED RUN_ID=seed$SEED \\\n{env}"
        f"  torchrun --standalone --nproc_per_node={nproc} {script_rel}\n"
        "done"
    )


# ----------------------------------------------------------------------------- submission.json and README


# Setting-name prefixes of evaluation techniques the recent records declare absent (compliance
# no_slot, no_etlb, no_ngram_cache): a technique counts as used when a logged setting of its family is on.
TECHNIQUE_SETTING_PREFIXES = {"no_slot": "SLOT", "no_etlb": "ETLB", "no_ngram_cache": "NGRAM"}


def technique_on(run: logparse.RunLog, prefix: str) -> bool:
    return any(
        name.startswith(prefix) and value.strip().lower() not in (*FALSE_WORDS, "", "0.0", "none")
        for name, value in run.settings.items()
    )


def compliance(runs: list[logparse.RunLog], totals: dict[int, int]) -> dict[str, bool]:
    train_ms = [r.train_time_ms for r in runs]
    audit_pass = all(r.audit_verdict == "PASS" for r in runs)
    return {
        "train_under_600s": None not in train_ms and max(train_ms) <= TRAIN_LIMIT_MS,
        "artifact_under_16mb": all(total < CAP_BYTES for total in totals.values()),
        "eval_under_600s": all(r.projected_8gpu_eval_s is not None and r.projected_8gpu_eval_s <= EVAL_LIMIT_S for r in runs),
        "score_first_ttt": audit_pass,
        "no_pre_quant_ttt": audit_pass and all(r.scored_after_serialization for r in runs),
        **{flag: not any(technique_on(r, prefix) for r in runs) for flag, prefix in TECHNIQUE_SETTING_PREFIXES.items()},
        "three_seeds": len({r.seed for r in runs}) >= 3,
        "audit_passed": audit_pass,
    }


def _round(value: float | None, digits: int = 8) -> float | None:
    return None if value is None else round(value, digits)


def _joined(values) -> str | None:
    unique = list(dict.fromkeys(v for v in values if v))
    return ", ".join(unique) or None


def hardware(runs: list[logparse.RunLog]) -> str | None:
    return _joined(f"{r.world_size or 1}x {r.versions.get('device') or r.device or 'unknown device'}" for r in runs)


def seed_result(run: logparse.RunLog, total_bytes: int) -> dict:
    """One seed as the official records give it; artifact_bytes is the counted total (model + code)."""
    return {
        "val_bpb": run.final_val_bpb,
        "val_loss": run.final_val_loss,
        "artifact_bytes": total_bytes,
        "steps": run.steps,
        "step_avg_ms": run.step_avg_ms,
        "train_time_s": _round(None if run.train_time_ms is None else run.train_time_ms / 1000, 3),
        "eval_time_s": _round(run.eval_time_s, 3),
    }


def submission(args: argparse.Namespace, runs: list[logparse.RunLog], totals: dict[int, int], code_bytes: int) -> dict:
    """submission.json: the official keys plus those the recent records add. The stds are sample
    stds (ddof=1), as the t-test uses; records/stats.py prints the population std too."""
    bpbs, losses = [r.final_val_bpb for r in runs], [r.final_val_loss for r in runs]
    return {
        "author": args.author,
        "github_id": args.github_id,
        "name": args.name,
        "blurb": args.blurb,
        "date": args.date,
        "val_loss": _round(stats.mean(losses)),
        "val_bpb": _round(stats.mean(bpbs)),
        "bytes_total": max(totals.values()),
        "bytes_code": code_bytes,
        "track": "non_record_16mb" if args.non_record else "10min_16mb",
        "seeds": [r.seed for r in runs],
        "seed_results": {str(r.seed): seed_result(r, totals[r.seed]) for r in runs},
        "val_bpb_std": _round(stats.sample_std(bpbs)),
        "val_loss_std": _round(stats.sample_std(losses)),
        "artifact_bytes_mean": round(stats.mean(list(totals.values()))),
        "artifact_bytes_max": max(totals.values()),
        "hardware": hardware(runs),
        "pytorch_version": _joined(r.versions.get("torch") for r in runs),
        "technique_summary": args.technique_summary,
        "compliance": compliance(runs, totals),
    }


def _cell(value, fmt: str = "{}") -> str:
    return "-" if value is None else fmt.format(value)


def results_tables(runs: list[logparse.RunLog], totals: dict[int, int]) -> str:
    bpbs, losses = [r.final_val_bpb for r in runs], [r.final_val_loss for r in runs]
    rows = [
        "| Seed | val_bpb | val_loss | Steps | ms/step | Train (s) | Artifact bytes | Total bytes | Eval (s) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        train_s = None if r.train_time_ms is None else r.train_time_ms / 1000
        rows.append(
            f"| {r.seed} | {r.final_val_bpb:.8f} | {r.final_val_loss:.8f} | {_cell(r.steps)} | {_cell(r.step_avg_ms, '{:.2f}')} "
            f"| {_cell(train_s, '{:.1f}')} | {_cell(r.artifact_bytes, '{:,}')} | {totals[r.seed]:,} | {_cell(r.eval_time_s, '{:.1f}')} |"
        )
    rows.append(
        f"| **mean ± std** | **{stats.mean(bpbs):.8f} ± {_cell(stats.sample_std(bpbs), '{:.8f}')}** "
        f"| {stats.mean(losses):.8f} ± {_cell(stats.sample_std(losses), '{:.8f}')} | | | | | | |"
    )
    rows += [
        "",
        "Every evaluation path of the reloaded artifact (bpb); the score is the last one:",
        "",
        "| Seed | " + " | ".join(logparse.EVAL_PATHS) + " | pre-quant | quant gap | TTT gain |",
        "|---:|" + "---:|" * (len(logparse.EVAL_PATHS) + 3),
    ]
    for r in runs:
        paths = " | ".join(_cell(r.finals[p].val_bpb if p in r.finals else None, "{:.8f}") for p in logparse.EVAL_PATHS)
        rows.append(
            f"| {r.seed} | {paths} | {_cell(r.pre_quant_val_bpb, '{:.4f}')} | {_cell(r.quant_gap_bpb, '{:.6f}')} | {_cell(r.ttt_gain_bpb, '{:.6f}')} |"
        )
    return "\n".join(rows)


def compliance_notes(runs: list[logparse.RunLog], totals: dict[int, int], flags: dict[str, bool], script_sha: str, wrapped: bool) -> str:
    def box(ok: bool) -> str:
        return "[x]" if ok else "[ ]"

    train = [r.train_time_ms for r in runs if r.train_time_ms is not None]
    evals = [r.projected_8gpu_eval_s for r in runs if r.projected_8gpu_eval_s is not None]
    verdicts = ", ".join(f"seed {r.seed}: {r.audit_verdict or 'none'}" for r in runs)
    lines = [
        f"- {box(flags['train_under_600s'])} Training under 600 s: at most {_cell(max(train, default=None), '{:.0f}')} ms (`train_time`).",
        f"- {box(flags['artifact_under_16mb'])} Under {CAP_BYTES:,} bytes: at most {max(totals.values()):,} bytes "
        "(artifact + shipped train_gpt.py), checked per seed.",
        f"- {box(flags['eval_under_600s'])} Evaluation under 600 s on 8 GPUs: at most {_cell(max(evals, default=None), '{:.1f}')} s projected (`projected_8gpu_s`).",
        f"- {box(flags['audit_passed'])} Evaluation audit (`eval_audit_verdict`): {verdicts}.",
        f"- {box(flags['score_first_ttt'])} Score-first TTT: every token is scored before any update that used it (audit).",
        f"- {box(flags['no_pre_quant_ttt'])} No pre-quant TTT: every score comes from the artifact reloaded after it was written.",
        f"- {box(flags['no_slot'] and flags['no_etlb'] and flags['no_ngram_cache'])} No SLOT, no ETLB, no n-gram cache: "
        "no setting of those families is on in the logs.",
        f"- {box(flags['three_seeds'])} {len(runs)} seed(s): {', '.join(str(r.seed) for r in runs)}.",
        f"- Code: every log records `code_sha256:{script_sha}`, the sha256 of the script"
        + (" that `train_gpt.py` here decompresses to (lzma + base85 wrapper)." if wrapped else " shipped here as `train_gpt.py`."),
        "- No validation data during training and no network during evaluation (see the method).",
    ]
    return "\n".join(lines)


def data_variant(run: logparse.RunLog) -> str:
    """The downloader variant of the run's DATA_PATH (…/fineweb10B_sp8192 -> sp8192)."""
    m = re.search(r"fineweb10B_(\w+)", run.settings.get("DATA_PATH", ""))
    return m.group(1) if m else "sp1024"


def rescue_notes(runs: list[logparse.RunLog], training: dict[int, str]) -> str:
    """One line per seed whose weights were quantized and scored by a QUANTIZE_ONLY run."""
    lines = []
    for run in runs:
        if not run.settings.get("QUANTIZE_ONLY"):
            continue
        source = (f"trained by the run logged in `train_seed{run.seed}_training.log` (its figures above)" if run.seed in training
                  else "trained by an earlier run whose log is not included (no training figures)")
        lines.append(f"Seed {run.seed}: {source}; that run could not write its artifact, so `train_seed{run.seed}.log` is a "
                     "QUANTIZE_ONLY run that quantized, wrote and scored its saved weights. The command above trains from scratch.")
    return "\n\n" + "\n\n".join(lines) if lines else ""


def readme(args: argparse.Namespace, runs, totals, sub: dict, cmd: str, script_sha: str, notes: str = "") -> str:
    std = _cell(sub["val_bpb_std"], "{:.8f}")
    return f"""# {args.name}

{args.blurb}

**val_bpb {sub['val_bpb']:.8f} ± {std}** (mean ± sample std over {len(runs)} seeds), val_loss {sub['val_loss']:.8f};
at most {sub['bytes_total']:,} bytes of the {CAP_BYTES:,}-byte cap. Hardware: {sub['hardware']}, PyTorch {sub['pytorch_version']}.

## Method

_TODO: what changed relative to the previous record, why it helps, and what did not work._

Techniques: {args.technique_summary}

## Results

{results_tables(runs, totals)}

## Command

From the repository root, with the data from `python3 data/cached_challenge_fineweb.py --variant {data_variant(runs[0])}`:

```bash
{cmd}
```

Settings not listed are the script's defaults.{notes}

## Compliance

{compliance_notes(runs, totals, sub['compliance'], script_sha, args.wrap)}
"""


# ----------------------------------------------------------------------------- writing


def slug(name: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-")
    if not cleaned:
        raise SubmissionError(f"--name {name!r} leaves nothing usable for a folder name")
    return cleaned


def write_folder(dest: Path, files: dict[str, bytes], wrapped_source: bytes | None):
    """Write into a temporary sibling and rename it into place, so a failure leaves nothing behind."""
    temp = dest.with_name(f".{dest.name}.partial")
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir(parents=True)
    try:
        for name, data in files.items():
            (temp / name).write_bytes(data)
        if wrapped_source is not None:
            check_wrapped(temp / "train_gpt.py", wrapped_source)
        os.rename(temp, dest)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def build(args: argparse.Namespace) -> Path:
    script = Path(args.script)
    try:
        source = script.read_bytes()
    except OSError as e:
        raise SubmissionError(f"cannot read --script {script}: {e}") from None
    script_sha = sha256_bytes(source)
    runs = load_runs(args.logs)
    training = attach_training_logs(runs, args.training_log, record_track=not args.non_record)
    check_code_hash(runs, script, script_sha)
    check_same_settings(runs)
    written = shipped_code_file(runs)
    if written is not None and args.wrap:
        raise SubmissionError("the runs wrote their shipped train_gpt.py already; drop --wrap")
    shipped = written if written is not None else wrap_source(source) if args.wrap else source
    totals = counted_totals(runs, len(shipped))

    track = "track_non_record_16mb" if args.non_record else "track_10min_16mb"
    dest = Path(args.out_root) / track / f"{args.date}_{slug(args.name)}"
    if dest.exists():
        raise SubmissionError(f"{dest} already exists; choose another --name or --date, or remove it")

    sub = submission(args, runs, totals, len(shipped))
    script_rel = os.path.relpath(dest / "train_gpt.py", REPO_ROOT) if dest.resolve().is_relative_to(REPO_ROOT) else str(dest / "train_gpt.py")
    cmd = command(runs, changed_settings(runs[0], script_defaults(script)), script_rel)
    files = {
        "submission.json": (json.dumps(sub, indent=2) + "\n").encode(),
        "README.md": readme(args, runs, totals, sub, cmd, script_sha, rescue_notes(runs, training)).encode(),
        "train_gpt.py": shipped,
        **{f"train_seed{r.seed}.log": Path(r.path).read_bytes() for r in runs},
        **{f"train_seed{seed}_training.log": Path(path).read_bytes() for seed, path in training.items()},
    }
    write_folder(dest, files, source if args.wrap else None)
    return dest


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Build a records/ submission folder from run logs, or refuse (exit 1) with the reason.")
    parser.add_argument("logs", nargs="+", help="logs/{RUN_ID}.txt of each run, one per seed")
    parser.add_argument("--name", required=True, help="submission name; also the folder name after the date")
    parser.add_argument("--author", required=True)
    parser.add_argument("--github-id", required=True)
    parser.add_argument("--blurb", default="TODO: one-paragraph summary of the submission.")
    parser.add_argument("--technique-summary", default="TODO: comma-separated list of techniques.")
    parser.add_argument("--date", default=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d"), help="YYYY-MM-DD (default: today, UTC)")
    parser.add_argument("--non-record", action="store_true", help="write under records/track_non_record_16mb/")
    parser.add_argument("--training-log", action="append", default=[], metavar="LOG",
                        help="the log of the training run whose saved weights a QUANTIZE_ONLY log quantized (repeatable); the record track needs it")
    parser.add_argument("--script", default=str(REPO_ROOT / "train_gpt.py"), help="the exact train_gpt.py that ran (default: the repository's)")
    parser.add_argument("--wrap", action="store_true", help="ship a self-extracting lzma+base85 train_gpt.py; its size is the counted code size")
    parser.add_argument("--out-root", default=str(RECORDS_DIR), help="folder holding the track folders (default: records/)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", args.date):
        print(f"error: --date {args.date!r} is not YYYY-MM-DD", file=sys.stderr)
        return 1
    try:
        dest = build(args)
    except SubmissionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
