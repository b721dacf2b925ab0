"""The one log parser shared by the records tools (make_submission, stats, compare).

It reads the log that train_gpt.py writes on rank 0 (`logs/{RUN_ID}.txt`: the script's source, a
line of 100 `=`, version lines, one `NAME=value` line per setting, then the run's progress and
report lines) and the official baseline's log (the same `step:` and `final_..._roundtrip` lines,
no settings, no code hash). Unknown lines are ignored and a field the log does not hold is None,
so a crashed or older run still parses; the tools decide what a missing field means.

    from logparse import parse_log
    run = parse_log("logs/abc.txt")
    run.final_val_bpb, run.finals["sliding_window"].val_bpb, run.total_bytes
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

SEPARATOR = "=" * 100
EVAL_PATHS = ("roundtrip", "sliding_window", "ttt_lora")  # in the order train_gpt.py runs them


class FinalScore(NamedTuple):
    """One evaluation path of the reloaded artifact; loss and bpb from its `_exact` line if any."""

    val_loss: float | None
    val_bpb: float | None
    eval_time_ms: float | None


@dataclass
class RunLog:
    path: str | None = None
    run_id: str | None = None
    seed: int | None = None
    settings: dict[str, str] = field(default_factory=dict)  # NAME -> value exactly as logged
    versions: dict[str, str] = field(default_factory=dict)  # python, torch, numpy, cuda, device, driver
    code_sha256: str | None = None
    runs_in_file: int = 0  # code_sha256 lines seen: more than 1 means several runs appended to one file
    code_bytes: int | None = None
    world_size: int | None = None
    grad_accum_steps: int | None = None
    device: str | None = None
    attention_backend: str | None = None
    model_params: int | None = None
    # training
    steps: int | None = None  # last step number seen on a step line
    iterations: int | None = None
    step_avg_ms: float | None = None
    train_time_ms: float | None = None  # last step line, or train_time_total with in-budget GPTQ calibration
    stopped_early: bool = False
    peak_mem_allocated_mib: int | None = None
    peak_mem_reserved_mib: int | None = None
    pre_quant_weights: str | None = None
    pre_quant_val_loss: float | None = None
    pre_quant_val_bpb: float | None = None
    # artifact
    quant_scheme: str | None = None
    artifact_bytes: int | None = None
    code_size_bytes: int | None = None  # the "Code size:" line
    total_bytes: int | None = None
    size_cap_bytes: int | None = None
    fits_cap: bool | None = None
    # evaluation
    finals: dict[str, FinalScore] = field(default_factory=dict)
    final_path: str | None = None  # path of the last `_exact` line: the run's score
    final_val_loss: float | None = None
    final_val_bpb: float | None = None
    scored_after_serialization: bool | None = None  # every final line comes after the artifact was written
    quant_gap_bpb: float | None = None
    ttt_base_bpb: float | None = None
    ttt_gain_bpb: float | None = None
    audits: dict[str, str] = field(default_factory=dict)  # eval path -> PASS / FAIL
    audit_verdict: str | None = None  # PASS, FAIL or SKIPPED
    eval_time_total_ms: float | None = None
    projected_8gpu_eval_s: float | None = None
    fits_600s: bool | None = None
    submission_valid: bool | None = None
    submission_reason: str | None = None

    @property
    def eval_time_s(self) -> float | None:
        """Total evaluation time: the logged total, else the sum of the paths' eval times."""
        if self.eval_time_total_ms is not None:
            return self.eval_time_total_ms / 1000.0
        times = [f.eval_time_ms for f in self.finals.values() if f.eval_time_ms is not None]
        return sum(times) / 1000.0 if times else None

    @property
    def nats_per_bpb(self) -> float | None:
        """val_loss / val_bpb = ln 2 * (bytes per token): converts a bpb difference into nats."""
        if self.final_val_loss is None or not self.final_val_bpb:
            return None
        return self.final_val_loss / self.final_val_bpb


# ----------------------------------------------------------------------------- field helpers

_FIELD = re.compile(r"(\w+):(\S+)")
_UNIT = re.compile(r"(ms|s|MiB|x)$")


def _fields(text: str) -> dict[str, str]:
    """`key:value` tokens of a line, e.g. `val_loss:2.07 eval_time:1401ms` -> {"val_loss": "2.07", ...}."""
    return dict(_FIELD.findall(text))


def _float(raw: str | None) -> float | None:
    if raw is None:
        return None
    try:
        return float(_UNIT.sub("", raw))
    except ValueError:
        return None


def _int(raw: str | None) -> int | None:
    value = _float(raw)
    return None if value is None else int(value)


def _yes(raw: str | None) -> bool | None:
    if raw is None:
        return None
    return raw.strip().lower() in ("yes", "true", "1", "pass")


# ----------------------------------------------------------------------------- line handlers


@dataclass
class _State:
    """The run being filled plus what only the parser needs (line numbers, official fallbacks)."""

    run: RunLog
    line_no: int = 0
    official_seed: int | None = None  # `seed:1337` of the official log
    official_run_id: str | None = None  # `logs/{RUN_ID}.txt` printed by the official script
    serialized_at: int | None = None
    first_final_at: int | None = None


# Each handler takes (state, match) and fills fields; the first pattern that matches a line wins.


def _code_hash(s: _State, m: re.Match):
    f = _fields(m.string)
    s.run.code_sha256 = f["code_sha256"].lower()
    s.run.code_bytes = _int(f.get("code_bytes"))
    s.run.runs_in_file += 1


def _world(s: _State, m: re.Match):
    f = _fields(m.string)
    s.run.world_size = _int(f.get("world_size"))
    s.run.grad_accum_steps = _int(f.get("grad_accum_steps"))
    s.run.device = f.get("device", s.run.device)


def _attention(s: _State, m: re.Match):
    s.run.attention_backend = m.group(1)


def _model_params(s: _State, m: re.Match):
    s.run.model_params = int(m.group(1))


def _step(s: _State, m: re.Match):
    s.run.steps, s.run.iterations = int(m.group(1)), int(m.group(2))
    f = _fields(m.group(3))
    if "train_time" in f:
        s.run.train_time_ms = _float(f["train_time"])
    if "step_avg" in f:
        s.run.step_avg_ms = _float(f["step_avg"])


def _stopping_early(s: _State, m: re.Match):
    s.run.stopped_early = True
    f = _fields(m.string)
    if "train_time" in f:
        s.run.train_time_ms = _float(f["train_time"])
    step = f.get("step", "").split("/")[0]
    if step.isdigit():
        s.run.steps = int(step)


def _calibration(s: _State, m: re.Match):
    # Calibration on training batches counts against the 600 s, so its total is the training time.
    f = _fields(m.string)
    if "train_time_total" in f:
        s.run.train_time_ms = _float(f["train_time_total"])


def _peak_memory(s: _State, m: re.Match):
    s.run.peak_mem_allocated_mib, s.run.peak_mem_reserved_mib = int(m.group(1)), int(m.group(2))


def _pre_quant(s: _State, m: re.Match):
    f = _fields(m.string)
    s.run.pre_quant_weights = f.get("weights")
    s.run.pre_quant_val_loss, s.run.pre_quant_val_bpb = _float(f.get("val_loss")), _float(f.get("val_bpb"))


def _serialized(s: _State, m: re.Match):
    # The official log prints the raw (unquantized) size first; the last line is the artifact.
    s.run.artifact_bytes = int(m.group(2))
    s.run.quant_scheme = m.group(1) or s.run.quant_scheme
    s.serialized_at = s.line_no


def _code_size(s: _State, m: re.Match):
    s.run.code_size_bytes = int(m.group(1))


def _total_size(s: _State, m: re.Match):
    s.run.total_bytes = int(m.group(2))


def _size_check(s: _State, m: re.Match):
    f = _fields(m.string)
    if "total_bytes" in f:
        s.run.total_bytes = _int(f["total_bytes"])
    s.run.size_cap_bytes = _int(f.get("cap_bytes"))
    s.run.fits_cap = _yes(f.get("fits"))


def _split_final_name(name: str) -> tuple[str | None, str]:
    """`int6_zstd_sliding_window` -> ("int6_zstd", "sliding_window"); an unknown path keeps its name."""
    for path in EVAL_PATHS:
        if name == path:
            return None, path
        if name.endswith("_" + path):
            return name[: -len(path) - 1], path
    return None, name


def _final(s: _State, m: re.Match):
    run = s.run
    scheme, path = _split_final_name(m.group(1))
    f = _fields(m.group(3))
    loss, bpb = _float(f.get("val_loss")), _float(f.get("val_bpb"))
    old = run.finals.get(path, FinalScore(None, None, None))
    if m.group(2):  # the `_exact` line: full precision, and the last one is the run's score
        run.finals[path] = old._replace(val_loss=loss, val_bpb=bpb)
        run.final_path, run.final_val_loss, run.final_val_bpb = path, loss, bpb
    else:
        keep_exact = old.val_bpb is not None
        run.finals[path] = FinalScore(old.val_loss if keep_exact else loss, old.val_bpb if keep_exact else bpb, _float(f.get("eval_time")))
    run.quant_scheme = run.quant_scheme or scheme
    if s.first_final_at is None:
        s.first_final_at = s.line_no


def _quant_gap(s: _State, m: re.Match):
    s.run.quant_gap_bpb = _float(m.group(1))


def _ttt_base(s: _State, m: re.Match):
    f = _fields(m.string)
    s.run.ttt_base_bpb, s.run.ttt_gain_bpb = _float(f.get("val_bpb")), _float(f.get("ttt_gain_bpb"))


def _audit(s: _State, m: re.Match):
    f = _fields(m.string)
    if "path" in f and "verdict" in f:
        s.run.audits[f["path"]] = f["verdict"].upper()


def _audit_verdict(s: _State, m: re.Match):
    s.run.audit_verdict = m.group(1).upper()


def _eval_time_total(s: _State, m: re.Match):
    f = _fields(m.string)
    s.run.eval_time_total_ms = _float(f.get("eval_time_total"))
    s.run.projected_8gpu_eval_s = _float(f.get("projected_8gpu_s"))
    s.run.fits_600s = _yes(f.get("fits_600s"))


def _submission_valid(s: _State, m: re.Match):
    s.run.submission_valid = _yes(m.group(1))
    s.run.submission_reason = (m.group(2) or "").strip() or None


def _our_versions(s: _State, m: re.Match):
    words = m.string.split()
    pairs = dict(zip(words[0::2], words[1::2]))  # "python 3.11.7 torch 2.6 numpy 2.1 platform ..."
    for key in ("python", "torch", "numpy"):
        if key in pairs:
            s.run.versions[key] = pairs[key]


def _cuda_version(s: _State, m: re.Match):
    s.run.versions["cuda"], s.run.versions["device"] = m.group(1), m.group(2).strip()


def _driver(s: _State, m: re.Match):
    s.run.versions["driver"] = m.group(1)


def _official_version(s: _State, m: re.Match):
    s.run.versions["python" if m.group(1) == "Python" else "torch"] = m.group(2)


def _official_seed(s: _State, m: re.Match):
    s.official_seed = int(m.group(1))


def _official_log_path(s: _State, m: re.Match):
    s.official_run_id = m.group(1)


def _setting(s: _State, m: re.Match):
    s.run.settings[m.group(1)] = m.group(2)


_HANDLERS = [
    (re.compile(r"^code_sha256:[0-9a-fA-F]{64}\b"), _code_hash),
    (re.compile(r"^world_size:\d+"), _world),
    (re.compile(r"^attention_backend:(\S+)"), _attention),
    (re.compile(r"^model_params:(\d+)"), _model_params),
    (re.compile(r"^step:(\d+)/(\d+)\s+(.*)$"), _step),
    (re.compile(r"^stopping_early:"), _stopping_early),
    (re.compile(r"^gptq_calibration\s"), _calibration),
    (re.compile(r"^peak memory allocated: (\d+) MiB reserved: (\d+) MiB"), _peak_memory),
    (re.compile(r"^pre_quant\s"), _pre_quant),
    (re.compile(r"^Serialized model(?: (\S+?))?: (\d+) bytes"), _serialized),
    (re.compile(r"^Code size: (\d+) bytes"), _code_size),
    (re.compile(r"^Total submission size(?: (\S+?))?: (\d+) bytes"), _total_size),
    (re.compile(r"^size_check\s"), _size_check),
    (re.compile(r"^final_(\w+?)(_exact)?\s+(val_loss:.*)$"), _final),
    (re.compile(r"^quant_gap_bpb:(\S+)"), _quant_gap),
    (re.compile(r"^ttt_base_same_docs\s"), _ttt_base),
    (re.compile(r"^eval_audit\s"), _audit),
    (re.compile(r"^eval_audit_verdict:(\w+)"), _audit_verdict),
    (re.compile(r"^eval_time_total:"), _eval_time_total),
    (re.compile(r"^submission_valid:(\w+)(?:\s+reason:(.*))?$"), _submission_valid),
    (re.compile(r"^python \d+\.\d+\S* torch \S+"), _our_versions),
    (re.compile(r"^cuda (\S+) device (.+)$"), _cuda_version),
    (re.compile(r"^nvidia driver (\S+)"), _driver),
    (re.compile(r"^Running (Python|PyTorch) (\S+)"), _official_version),
    (re.compile(r"^seed:(\d+)$"), _official_seed),
    (re.compile(r"^logs/(\S+)\.txt$"), _official_log_path),
    (re.compile(r"^([A-Z][A-Z0-9_]*)=(.*)$"), _setting),
]


def _log_lines(text: str) -> list[str]:
    """The lines after the logged source: everything after the first line of 100 `=`, if any."""
    lines = text.splitlines()
    try:
        return lines[lines.index(SEPARATOR) + 1 :]
    except ValueError:
        return lines  # a console capture without the source


def parse_text(text: str, path: str | None = None) -> RunLog:
    state = _State(RunLog(path=path))
    for line_no, line in enumerate(_log_lines(text)):
        state.line_no, line = line_no, line.strip()
        for pattern, handler in _HANDLERS:
            m = pattern.match(line)
            if m:
                handler(state, m)
                break
    return _finish(state)


def _finish(s: _State) -> RunLog:
    """Fields that come from several lines or from an official-log fallback."""
    run = s.run
    seed = run.settings.get("SEED", "")
    run.seed = int(seed) if seed.lstrip("-").isdigit() else s.official_seed
    run.run_id = run.settings.get("RUN_ID") or s.official_run_id
    if s.first_final_at is not None:
        run.scored_after_serialization = s.serialized_at is not None and s.serialized_at < s.first_final_at
    return run


def parse_log(path: str | Path) -> RunLog:
    path = Path(path)
    return parse_text(path.read_text(encoding="utf-8", errors="replace"), str(path))
