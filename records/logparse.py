"""The one log parser shared by the records tools (make_submission, stats, compare, plot, sweep).

It reads the log train_gpt.py writes on rank 0 (`logs/{RUN_ID}.txt`) and the logs of the
official records, whatever their era:

- the script's source printed at the top, before a line of 100 `=` that is followed by the
  versions (`python 3.11 torch …` here, `Running Python …` in the official logs), sometimes after
  a `Hyperparameters:` block and a `Source code:` header; the source is never read as log lines;
- or a console capture with no source and no separator;
- a leading timestamp on each line (`1776142360.538 …` or `2026-04-13 04:52:28 …`) is dropped;
- step lines with or without the `step:` prefix, `key:value` or `key: value`, times in ms,
  s or minutes (`train_time: 0.8m`);
- evaluation lines `final_<scheme>_<path>[_exact]`, `quantized[_<path>]`, `legal_ttt[_exact]`,
  `diagnostic quantized`, with `key:value` tokens anywhere (`final_sliding_window_eval stride:64
  val_loss:…`); the pre-quantization score in any of its spellings;
- sizes `Serialized model …`, `Code size[ (compressed|uncompressed)]`, `Total submission size …`,
  and `total_eval_time`.

Several runs appended to one file (the official logger appends) are counted in `runs_in_file`;
the last one is parsed. Unknown lines are ignored and a field the log does not hold is None, so a
crashed or foreign run still parses; the tools decide what a missing field means.

The score is the submission's final path: TTT over sliding window over roundtrip. An evaluation
line that repeats the numbers of a path already scored (the official `final_int8_zlib_roundtrip_exact`
line that later scripts print after their real final path, for old tools) is an alias, not a path.

    from logparse import parse_log
    run = parse_log("logs/abc.txt")
    run.final_val_bpb, run.finals["sliding_window"].val_bpb, run.total_bytes
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

EVAL_PATHS = ("roundtrip", "sliding_window", "ttt")  # lowest to highest priority as the run's score

SEPARATOR = re.compile(r"^={100}$")
VERSIONS = re.compile(r"^(?:Running Python \S|python \d+\.\d+\S* torch \S)")
TIMESTAMP = re.compile(r"^(?:\d{9,11}(?:\.\d+)?|\[?\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2}(?:[.,]\d+)?\]?) ")
HPARAMS_HEADER = "Hyperparameters:"
HPARAM_LINE = re.compile(r"^\s+([A-Za-z_]\w*):\s?(.*)$")


class FinalScore(NamedTuple):
    """One evaluation path of the reloaded artifact, full precision where the log has it."""

    val_loss: float | None
    val_bpb: float | None
    eval_time_ms: float | None
    name: str  # the line's own name, e.g. final_int6_zstd_sliding_window or quantized_ttt_phased


class StepPoint(NamedTuple):
    step: int
    train_time_ms: float | None  # None where the line has no time (official `N/M val_loss:` lines)
    loss: float
    bpb: float | None = None  # validation points only


@dataclass
class RunLog:
    path: str | None = None
    run_id: str | None = None
    seed: int | None = None
    settings: dict[str, str] = field(default_factory=dict)  # NAME -> value as logged (see _hparam)
    versions: dict[str, str] = field(default_factory=dict)  # python, torch, numpy, cuda, device, driver
    code_sha256: str | None = None
    runs_in_file: int = 1  # runs appended to the file (each starts with its source and versions)
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
    train_curve: list[StepPoint] = field(default_factory=list)
    val_curve: list[StepPoint] = field(default_factory=list)
    peak_mem_allocated_mib: int | None = None
    peak_mem_reserved_mib: int | None = None
    pre_quant_weights: str | None = None
    pre_quant_val_loss: float | None = None
    pre_quant_val_bpb: float | None = None
    # artifact
    quant_scheme: str | None = None
    artifact_bytes: int | None = None
    code_size_bytes: int | None = None  # the counted code: "Code size:" or "Code size (compressed):"
    code_size_uncompressed_bytes: int | None = None
    total_bytes: int | None = None
    size_cap_bytes: int | None = None
    fits_cap: bool | None = None
    # evaluation
    finals: dict[str, FinalScore] = field(default_factory=dict)  # EVAL_PATHS -> score
    aliases: list[str] = field(default_factory=list)  # evaluation lines that repeated a path's numbers
    final_path: str | None = None  # the path that is the run's score
    final_val_loss: float | None = None
    final_val_bpb: float | None = None
    scored_after_serialization: bool | None = None  # every final line comes after the artifact was written
    quant_gap_bpb: float | None = None  # logged, else roundtrip minus pre-quant
    ttt_base_bpb: float | None = None
    ttt_gain_bpb: float | None = None  # logged (base model on the same documents), else sliding minus TTT
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

    def path_bpb(self, path: str) -> float | None:
        score = self.finals.get(path)
        return score.val_bpb if score else None


# ----------------------------------------------------------------------------- field helpers

_FIELD = re.compile(r"([A-Za-z_][\w/]*):\s?([^\s,]+)")
_NUMBER = re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_MS_PER_UNIT = {"ms": 1.0, "s": 1000.0, "m": 60_000.0, "min": 60_000.0, "": 1.0}


def _fields(text: str) -> dict[str, str]:
    """`key:value` or `key: value` tokens, e.g. `val_loss: 2.07 eval_time:1401ms` -> {"val_loss": "2.07", ...}."""
    return dict(_FIELD.findall(text))


def _float(raw: str | None) -> float | None:
    """The number a token starts with (`1401ms` -> 1401.0); None for anything else, such as an
    f-string placeholder `{val_loss:.4f}`, so an unformatted line can never pass for a result."""
    if raw is None:
        return None
    m = _NUMBER.match(raw)
    return float(m.group(0)) if m else None


def _int(raw: str | None) -> int | None:
    value = _float(raw)
    return None if value is None else int(value)


def _ms(raw: str | None) -> float | None:
    """A duration in ms from `600038ms`, `338.2s` or `0.8m` (no unit: ms, as the official lines)."""
    value = _float(raw)
    if value is None:
        return None
    unit = raw[len(_NUMBER.match(raw).group(0)) :]
    scale = _MS_PER_UNIT.get(unit)
    return None if scale is None else value * scale


def _yes(raw: str | None) -> bool | None:
    if raw is None:
        return None
    return raw.strip().lower() in ("yes", "true", "1", "pass")


def path_of(name: str) -> str:
    """The evaluation path an evaluation line's name stands for (`_exact` already removed)."""
    low = name.lower()
    if "ttt" in low:
        return "ttt"
    if "sliding" in low:
        return "sliding_window"
    return "roundtrip"  # final_<scheme>_roundtrip, quantized, diagnostic quantized


# ----------------------------------------------------------------------------- line handlers


@dataclass
class _State:
    """The run being filled plus what only the parser needs (line numbers, official fallbacks)."""

    run: RunLog
    line_no: int = 0
    in_hparams: bool = False
    official_seed: int | None = None  # `seed:1337` of the official log
    official_run_id: str | None = None  # `logs/{RUN_ID}.txt` printed by the official script
    exact_paths: set = field(default_factory=set)  # paths whose score came from an `_exact` line
    serialized_at: int | None = None
    first_final_at: int | None = None


# Each handler takes (state, match, fields of the line) and fills the run; the first pattern that
# matches a line wins.


def _code_hash(s: _State, m: re.Match, f: dict):
    s.run.code_sha256 = f["code_sha256"].lower()
    s.run.code_bytes = _int(f.get("code_bytes"))


def _world(s: _State, m: re.Match, f: dict):
    s.run.world_size = _int(f.get("world_size"))
    s.run.grad_accum_steps = _int(f.get("grad_accum_steps"))
    s.run.device = f.get("device", s.run.device)


def _attention(s: _State, m: re.Match, f: dict):
    s.run.attention_backend = m.group(1)


def _model_params(s: _State, m: re.Match, f: dict):
    s.run.model_params = int(m.group(1))


def _step(s: _State, m: re.Match, f: dict):
    run, step = s.run, int(m.group(1))
    time_ms = _ms(f.get("train_time"))
    train_loss, val_loss, val_bpb = _float(f.get("train_loss")), _float(f.get("val_loss")), _float(f.get("val_bpb"))
    if train_loss is None and val_loss is None:
        return
    run.steps, run.iterations = step, int(m.group(2))
    if time_ms is not None:
        run.train_time_ms = time_ms
    if "step_avg" in f:
        run.step_avg_ms = _ms(f["step_avg"])
    if train_loss is not None:
        run.train_curve.append(StepPoint(step, time_ms, train_loss))
    if val_loss is not None:
        run.val_curve.append(StepPoint(step, time_ms, val_loss, val_bpb))


def _stopping_early(s: _State, m: re.Match, f: dict):
    s.run.stopped_early = True
    if "train_time" in f:
        s.run.train_time_ms = _ms(f["train_time"])
    step = f.get("step", "").split("/")[0]
    if step.isdigit():
        s.run.steps = int(step)


def _calibration(s: _State, m: re.Match, f: dict):
    # Calibration on training batches counts against the 600 s, so its total is the training time.
    if "train_time_total" in f:
        s.run.train_time_ms = _ms(f["train_time_total"])


def _peak_memory(s: _State, m: re.Match, f: dict):
    s.run.peak_mem_allocated_mib, s.run.peak_mem_reserved_mib = int(m.group(1)), int(m.group(2))


def _serialized(s: _State, m: re.Match, f: dict):
    # The official log prints the raw (unquantized) size first; the last line is the artifact.
    s.run.artifact_bytes = int(m.group(2))
    s.run.quant_scheme = m.group(1) or s.run.quant_scheme
    s.serialized_at = s.line_no


def _code_size(s: _State, m: re.Match, f: dict):
    if m.group(1) == "uncompressed":
        s.run.code_size_uncompressed_bytes = int(m.group(2))
    else:  # "Code size:" or "(compressed)": the bytes the cap counts
        s.run.code_size_bytes = int(m.group(2))


def _total_size(s: _State, m: re.Match, f: dict):
    s.run.total_bytes = int(m.group(2))


def _size_check(s: _State, m: re.Match, f: dict):
    if "total_bytes" in f:
        s.run.total_bytes = _int(f["total_bytes"])
    s.run.size_cap_bytes = _int(f.get("cap_bytes"))
    s.run.fits_cap = _yes(f.get("fits"))


def _labelled_score(s: _State, m: re.Match, f: dict):
    """An evaluation line `<label> … val_loss:… val_bpb:…`: a path's score or the pre-quant score."""
    label = m.group(1).strip()
    loss, bpb = _float(f.get("val_loss")), _float(f.get("val_bpb"))
    if loss is None or bpb is None:
        return
    evaluation = _EVAL_LABEL.match(label)
    if evaluation:
        _final(s, evaluation.group(1), loss, bpb, _ms(f.get("eval_time")))
    elif _PRE_QUANT_LABEL.search(label):
        s.run.pre_quant_weights = f.get("weights")
        s.run.pre_quant_val_loss, s.run.pre_quant_val_bpb = loss, bpb


def _final(s: _State, name: str, loss: float, bpb: float, eval_time_ms: float | None):
    run = s.run
    exact = name.endswith("_exact")
    base = name[: -len("_exact")] if exact else name
    path = path_of(base)
    if any((score.val_loss, score.val_bpb) == (loss, bpb) and score.name != base for score in run.finals.values()):
        run.aliases.append(name)  # repeats another line's score: the official alias line
        return
    old = run.finals.get(path)
    if old is not None and path in s.exact_paths and not exact:
        run.finals[path] = old._replace(eval_time_ms=eval_time_ms if eval_time_ms is not None else old.eval_time_ms)
    else:
        keep_time = eval_time_ms if eval_time_ms is not None else (old.eval_time_ms if old else None)
        run.finals[path] = FinalScore(loss, bpb, keep_time, base)
        if exact:
            s.exact_paths.add(path)
    scheme = re.match(r"final_(\w+?)_(?:roundtrip|sliding_window|ttt)", base)
    if scheme and run.quant_scheme is None:
        run.quant_scheme = scheme.group(1)
    if s.first_final_at is None:
        s.first_final_at = s.line_no


def _quant_gap(s: _State, m: re.Match, f: dict):
    s.run.quant_gap_bpb = _float(m.group(1))


def _ttt_base(s: _State, m: re.Match, f: dict):
    s.run.ttt_base_bpb, s.run.ttt_gain_bpb = _float(f.get("val_bpb")), _float(f.get("ttt_gain_bpb"))


def _audit(s: _State, m: re.Match, f: dict):
    if "path" in f and "verdict" in f:
        s.run.audits[f["path"]] = f["verdict"].upper()


def _audit_verdict(s: _State, m: re.Match, f: dict):
    s.run.audit_verdict = m.group(1).upper()


def _eval_time_total(s: _State, m: re.Match, f: dict):
    s.run.eval_time_total_ms = _ms(f.get("eval_time_total") or f.get("total_eval_time"))
    s.run.projected_8gpu_eval_s = _float(f.get("projected_8gpu_s"))
    s.run.fits_600s = _yes(f.get("fits_600s"))


def _submission_valid(s: _State, m: re.Match, f: dict):
    s.run.submission_valid = _yes(m.group(1))
    s.run.submission_reason = (m.group(2) or "").strip() or None


def _our_versions(s: _State, m: re.Match, f: dict):
    words = m.string.split()
    pairs = dict(zip(words[0::2], words[1::2]))  # "python 3.11.7 torch 2.6 numpy 2.1 platform ..."
    for key in ("python", "torch", "numpy"):
        if key in pairs:
            s.run.versions[key] = pairs[key]


def _cuda_version(s: _State, m: re.Match, f: dict):
    s.run.versions["cuda"], s.run.versions["device"] = m.group(1), m.group(2).strip()


def _driver(s: _State, m: re.Match, f: dict):
    s.run.versions["driver"] = m.group(1)


def _official_version(s: _State, m: re.Match, f: dict):
    s.run.versions["python" if m.group(1) == "Python" else "torch"] = m.group(2)


def _official_seed(s: _State, m: re.Match, f: dict):
    s.official_seed = int(m.group(1))


def _official_log_path(s: _State, m: re.Match, f: dict):
    s.official_run_id = m.group(1)


def _setting(s: _State, m: re.Match, f: dict):
    s.run.settings[m.group(1)] = m.group(2)


def _hparams_start(s: _State, m: re.Match, f: dict):
    s.in_hparams = True


def _hparam(s: _State, m: re.Match):
    # A `Hyperparameters:` block's `name: value` lines; the scripts read each from the environment
    # variable NAME, so they are kept under that name beside our own `NAME=value` lines.
    s.run.settings[m.group(1).upper()] = m.group(2).strip()


_EVAL_LABEL = re.compile(r"^(?:diagnostic\s+)?((?:final_|quantized|legal_ttt)\w*)$", re.IGNORECASE)
_PRE_QUANT_LABEL = re.compile(r"pre[-_]?quant|post[-_]?ema", re.IGNORECASE)

_HANDLERS = [
    (re.compile(r"^code_sha256:[0-9a-fA-F]{64}\b"), _code_hash),
    (re.compile(r"^world_size:\d+"), _world),
    (re.compile(r"^attention_backend:(\S+)"), _attention),
    (re.compile(r"^model_params:\s?(\d+)"), _model_params),
    (re.compile(r"^(?:step:\s?)?(\d+)/(\d+)\s+(?=.*(?:train_loss|val_loss):)"), _step),
    (re.compile(r"^stopping_early:"), _stopping_early),
    (re.compile(r"^gptq_calibration\s"), _calibration),
    (re.compile(r"^peak memory allocated: (\d+) MiB reserved: (\d+) MiB"), _peak_memory),
    (re.compile(r"^Serialized model(?: (\S+?))?: (\d+) bytes"), _serialized),
    (re.compile(r"^Code size(?: \((compressed|uncompressed)\))?: (\d+) bytes"), _code_size),
    (re.compile(r"^Total submission size(?: (\S+?))?: (\d+) bytes"), _total_size),
    (re.compile(r"^size_check\s"), _size_check),
    (re.compile(r"^quant_gap_bpb:(\S+)"), _quant_gap),
    (re.compile(r"^ttt_base_same_docs\s"), _ttt_base),
    (re.compile(r"^eval_audit\s"), _audit),
    (re.compile(r"^eval_audit_verdict:(\w+)"), _audit_verdict),
    (re.compile(r"^(?:eval_time_total|total_eval_time):"), _eval_time_total),
    (re.compile(r"^submission_valid:(\w+)(?:\s+reason:(.*))?$"), _submission_valid),
    (re.compile(r"^python \d+\.\d+\S* torch \S+"), _our_versions),
    (re.compile(r"^cuda (\S+) device (.+)$"), _cuda_version),
    (re.compile(r"^nvidia driver (\S+)"), _driver),
    (re.compile(r"^Running (Python|PyTorch) (\S+)"), _official_version),
    (re.compile(r"^seed:(\d+)$"), _official_seed),
    (re.compile(r"^logs/(\S+)\.txt$"), _official_log_path),
    (re.compile(r"^([A-Z][A-Z0-9_]*)=(.*)$"), _setting),
    (re.compile(r"^Hyperparameters:$"), _hparams_start),
    # last: any other line with a label before its key:value tokens, e.g. `quantized_ttt val_loss:…`
    (re.compile(r"^([^:]*?)\s+(?=[A-Za-z_][\w/]*:)"), _labelled_score),
]


def _feed(s: _State, line: str):
    if s.in_hparams:
        hparam = HPARAM_LINE.match(line)
        if hparam:
            _hparam(s, hparam)
            return
        s.in_hparams = False
    line = line.strip()
    for pattern, handler in _HANDLERS:
        m = pattern.match(line)
        if m:
            handler(s, m, _fields(line))
            return


# ----------------------------------------------------------------------------- the file


def _lines(text: str) -> list[str]:
    return [TIMESTAMP.sub("", line, count=1).rstrip() for line in text.splitlines()]


def _last_run(lines: list[str]) -> tuple[int, int, int]:
    """(where the last run's header starts, where its log lines start, runs in the file).

    A run's log lines start at the versions line after a separator; everything before that
    separator (back to the previous run's versions) is its header: the source, and in the later
    official format a `Hyperparameters:` block. A file without such a separator is a console
    capture, all log lines; one with separators but no versions after them is read after the last."""
    separators = [i for i, line in enumerate(lines) if SEPARATOR.match(line)]
    runs = [i for i in separators if i + 1 < len(lines) and VERSIONS.match(lines[i + 1])]
    if runs:
        header = runs[-2] + 1 if len(runs) > 1 else 0
        return header, runs[-1] + 1, len(runs)
    if separators:
        return 0, separators[-1] + 1, 1
    return 0, 0, 1


def _header_hparams(lines: list[str]) -> list[str]:
    """The `Hyperparameters:` block of a run's header, if it has one: printed right after a
    separator, before the source (a `Hyperparameters:` line inside the source is not it)."""
    starts = [i for i, line in enumerate(lines) if line == HPARAMS_HEADER and i > 0 and SEPARATOR.match(lines[i - 1])]
    if not starts:
        return []
    block = [lines[starts[-1]]]
    for line in lines[starts[-1] + 1 :]:
        if not HPARAM_LINE.match(line):
            break
        block.append(line)
    return block


def parse_text(text: str, path: str | None = None) -> RunLog:
    lines = _lines(text)
    header, start, runs = _last_run(lines)
    state = _State(RunLog(path=path, runs_in_file=runs))
    for line in _header_hparams(lines[header:start]):
        _feed(state, line)
    state.in_hparams = False
    for line_no, line in enumerate(lines[start:]):
        state.line_no = line_no
        _feed(state, line)
    return _finish(state)


def _finish(s: _State) -> RunLog:
    """Fields that come from several lines or from an official-log fallback."""
    run = s.run
    seed = run.settings.get("SEED", "")
    run.seed = int(seed) if seed.lstrip("-").isdigit() else s.official_seed
    run.run_id = run.settings.get("RUN_ID") or s.official_run_id
    if run.world_size is None and run.settings.get("WORLD_SIZE", "").isdigit():
        run.world_size = int(run.settings["WORLD_SIZE"])
    for path in reversed(EVAL_PATHS):
        if path in run.finals:
            score = run.finals[path]
            run.final_path, run.final_val_loss, run.final_val_bpb = path, score.val_loss, score.val_bpb
            break
    roundtrip, sliding, ttt = (run.path_bpb(p) for p in EVAL_PATHS)
    if run.quant_gap_bpb is None and roundtrip is not None and run.pre_quant_val_bpb is not None:
        run.quant_gap_bpb = roundtrip - run.pre_quant_val_bpb
    if run.ttt_gain_bpb is None and sliding is not None and ttt is not None:
        run.ttt_gain_bpb = sliding - ttt
    if s.first_final_at is not None:
        run.scored_after_serialization = s.serialized_at is not None and s.serialized_at < s.first_final_at
    return run


def parse_log(path: str | Path) -> RunLog:
    path = Path(path)
    return parse_text(path.read_text(encoding="utf-8", errors="replace"), str(path))
