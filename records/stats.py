"""Is a new result a record? Mean and spread over seeds, and the significance test the challenge asks for.

A record must beat the previous one by at least 0.005 nats at p < 0.01. This tool tests exactly
that, one-sided: H0 "the improvement is at most 0.005 nats" against H1 "it is larger", with
Welch's t-test against the previous record's per-seed scores, or a one-sample t-test against its
mean when only the mean is known. Scores are compared in bpb; a threshold in nats (per token) is
converted with the new runs' own ratio val_loss / val_bpb = ln 2 * (bytes per token).

    python3 records/stats.py logs/seed1337.txt logs/seed42.txt logs/seed2025.txt \\
        --prev-bpb 1.1194 1.1201 1.1188          # per-seed scores of the previous record (Welch)
    python3 records/stats.py logs/seed{1337,42,2025}.txt --prev-submission records/track_10min_16mb/.../submission.json

The spread is given both ways, because the records differ: some report the sample std (ddof=1,
what the t-test uses), others the population std (ddof=0); with --prev-submission the report says
which one that record's val_bpb_std is. Logs must have distinct seeds: one run counted twice (the
same log given twice, or an older log of the run renamed by the logger) is refused, and so are runs
of different configurations (settings other than the seed, the run id and file paths), naming the
settings. A run that is not a finished valid one (no final score, stopped during its evaluation,
`submission_valid:no`) is left out with a line saying why; the report names the logs it averaged.

The Student t distribution is computed here (regularized incomplete beta function by its
continued fraction), so the tool needs nothing beyond the standard library.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from decimal import Decimal
from pathlib import Path

import logparse

THRESHOLD_NATS = 0.005
ALPHA = 0.01

# ----------------------------------------------------------------------------- distributions


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function, evaluated by the modified Lentz method."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 1000):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),  # even term
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),  # odd term
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < eps:
            return result
    raise ArithmeticError(f"incomplete beta did not converge for a={a} b={b} x={x}")


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    # The fraction converges fast only below the mean of the beta distribution; use symmetry above it.
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with df degrees of freedom."""
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return tail if t > 0 else 1.0 - tail


def t_cdf(t: float, df: float) -> float:
    return 1.0 - t_sf(t, df)


def two_sided_p(t: float, df: float) -> float:
    return 2.0 * t_sf(abs(t), df)


# ----------------------------------------------------------------------------- sample statistics


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def sample_std(xs: list[float]) -> float | None:
    """Standard deviation with ddof=1 (what the t-test uses); None for fewer than two values."""
    if len(xs) < 2:
        return None
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def population_std(xs: list[float]) -> float | None:
    """Standard deviation with ddof=0; None for fewer than two values."""
    if len(xs) < 2:
        return None
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))


def std_convention(xs: list[float], reported: float) -> str | None:
    """Which standard deviation a record's reported std is: "sample", "population", or None when
    it is neither once rounded to the digits it was reported with. Records use both."""
    digits = max(0, -Decimal(str(reported)).as_tuple().exponent)
    for name, std in (("sample", sample_std(xs)), ("population", population_std(xs))):
        if std is not None and abs(std - reported) <= 0.5 * 10.0**-digits + 1e-12:
            return name
    return None


def welch_df(var_a: float, n_a: int, var_b: float, n_b: int) -> float:
    """Welch-Satterthwaite degrees of freedom of a difference of two means."""
    va, vb = var_a / n_a, var_b / n_b
    denominator = va * va / (n_a - 1) + vb * vb / (n_b - 1)
    return (va + vb) ** 2 / denominator if denominator > 0 else float(n_a + n_b - 2)


@dataclass
class TTest:
    """One-sided test of H1: mean(prev) - mean(new) > margin (lower is better)."""

    kind: str  # "welch" or "one-sample"
    t: float
    df: float
    p: float


def improvement_test(new: list[float], prev: list[float], margin: float = 0.0) -> TTest | None:
    """Welch's test when prev has several values, else a one-sample test against prev's single value.

    None when the new runs are too few to estimate their spread (fewer than two).
    """
    if len(new) < 2:
        return None
    gap = mean(prev) - mean(new) - margin
    var_new = sample_std(new) ** 2
    if len(prev) >= 2:
        kind, var_prev = "welch", sample_std(prev) ** 2
        se = math.sqrt(var_new / len(new) + var_prev / len(prev))
        df = welch_df(var_new, len(new), var_prev, len(prev))
    else:
        kind, se, df = "one-sample", math.sqrt(var_new / len(new)), float(len(new) - 1)
    if se == 0.0:  # identical scores: the sign of the gap decides
        t = math.inf if gap > 0 else -math.inf
    else:
        t = gap / se
    return TTest(kind, t, df, t_sf(t, df))


# ----------------------------------------------------------------------------- the record question


@dataclass
class PreviousRecord:
    """The per-seed scores of the record to beat, and the std it reported (if any)."""

    bpb: list[float]
    seeds: list | None = None
    reported_std_bpb: float | None = None


@dataclass
class RecordReport:
    seeds: list
    logs: list  # the logs averaged, in the order of seeds
    new_bpb: list[float]
    new_mean_bpb: float
    new_std_bpb: float | None  # sample std (ddof=1): the one the t-test uses
    new_population_std_bpb: float | None
    new_mean_loss: float | None
    new_std_loss: float | None
    new_population_std_loss: float | None
    nats_per_bpb: float | None
    prev_bpb: list[float]
    prev_seeds: list | None
    prev_mean_bpb: float | None
    prev_std_bpb: float | None
    prev_reported_std_bpb: float | None
    prev_std_convention: str | None  # which std the previous record reported: sample or population
    improvement_bpb: float | None
    improvement_nats: float | None
    threshold_nats: float
    threshold_bpb: float | None
    alpha: float
    test: TTest | None  # H0: improvement <= threshold
    test_any: TTest | None  # H0: improvement <= 0
    is_record: bool | None  # None when there is nothing to compare with


def record_report(runs: list[logparse.RunLog], prev: PreviousRecord | list[float], threshold_nats: float = THRESHOLD_NATS, alpha: float = ALPHA) -> RecordReport:
    prev = prev if isinstance(prev, PreviousRecord) else PreviousRecord(list(prev))
    prev_bpb = prev.bpb
    new_bpb = [r.final_val_bpb for r in runs]
    losses = [r.final_val_loss for r in runs if r.final_val_loss is not None]
    ratios = [r.nats_per_bpb for r in runs if r.nats_per_bpb is not None]
    ratio = mean(ratios) if ratios else None
    threshold_bpb = threshold_nats / ratio if ratio else None
    report = RecordReport(
        seeds=[r.seed for r in runs],
        logs=[r.path for r in runs],
        new_bpb=new_bpb,
        new_mean_bpb=mean(new_bpb),
        new_std_bpb=sample_std(new_bpb),
        new_population_std_bpb=population_std(new_bpb),
        new_mean_loss=mean(losses) if losses else None,
        new_std_loss=sample_std(losses),
        new_population_std_loss=population_std(losses),
        nats_per_bpb=ratio,
        prev_bpb=list(prev_bpb),
        prev_seeds=prev.seeds,
        prev_mean_bpb=mean(prev_bpb) if prev_bpb else None,
        prev_std_bpb=sample_std(prev_bpb),
        prev_reported_std_bpb=prev.reported_std_bpb,
        prev_std_convention=std_convention(prev_bpb, prev.reported_std_bpb) if prev.reported_std_bpb is not None else None,
        improvement_bpb=None,
        improvement_nats=None,
        threshold_nats=threshold_nats,
        threshold_bpb=threshold_bpb,
        alpha=alpha,
        test=None,
        test_any=None,
        is_record=None,
    )
    if prev_bpb:
        report.improvement_bpb = report.prev_mean_bpb - report.new_mean_bpb
        report.improvement_nats = report.improvement_bpb * ratio if ratio else None
        report.test = improvement_test(new_bpb, prev_bpb, threshold_bpb) if threshold_bpb is not None else None
        report.test_any = improvement_test(new_bpb, prev_bpb, 0.0)
        report.is_record = report.test is not None and report.test.p < alpha
    return report


def _fmt(value: float | None, digits: int = 8) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def format_report(rep: RecordReport) -> str:
    lines = [
        f"new runs: {len(rep.new_bpb)} (seeds {', '.join('?' if s is None else str(s) for s in rep.seeds)}), averaged: {', '.join(str(p) for p in rep.logs)}",
        f"  val_bpb   {_fmt(rep.new_mean_bpb)} ± {_fmt(rep.new_std_bpb)} sample std (ddof=1), ± {_fmt(rep.new_population_std_bpb)} population std (ddof=0)",
        f"  val_loss  {_fmt(rep.new_mean_loss)} ± {_fmt(rep.new_std_loss)} sample std, ± {_fmt(rep.new_population_std_loss)} population std (nats/token)",
        f"  nats per bpb: {_fmt(rep.nats_per_bpb, 6)}  (val_loss / val_bpb = ln 2 * bytes per token)",
        "  records report either std (check val_bpb_std against their seeds); the t-test uses the sample std",
    ]
    if not rep.prev_bpb:
        lines.append("no previous record given (--prev-bpb, --prev-logs or --prev-submission): nothing to test")
        return "\n".join(lines)
    lines += [
        f"previous: {len(rep.prev_bpb)} value(s)" + (f" (seeds {', '.join(map(str, rep.prev_seeds))})" if rep.prev_seeds else ""),
        f"  val_bpb   {_fmt(rep.prev_mean_bpb)} ± {_fmt(rep.prev_std_bpb)} sample std",
    ]
    if rep.prev_reported_std_bpb is not None:
        which = f"the {rep.prev_std_convention} std of its seeds" if rep.prev_std_convention else "neither the sample nor the population std of its seeds"
        lines.append(f"  its submission.json reports val_bpb_std {rep.prev_reported_std_bpb:g}: {which}")
    lines += [
        f"improvement: {_fmt(rep.improvement_bpb)} bpb = {_fmt(rep.improvement_nats, 6)} nats"
        f"  (needed: {rep.threshold_nats:g} nats = {_fmt(rep.threshold_bpb)} bpb)",
    ]
    for label, test in ((f"improvement > {rep.threshold_nats:g} nats", rep.test), ("improvement > 0", rep.test_any)):
        if test is None:
            lines.append(f"  {label}: no test (need >= 2 new runs and val_loss in the logs)")
        else:
            lines.append(f"  {label}: {test.kind} t-test, one-sided: t={test.t:.4f} df={test.df:.2f} p={test.p:.3g}")
    verdict = "RECORD" if rep.is_record else "NOT SHOWN"
    lines.append(f"verdict: {verdict}: improvement >= {rep.threshold_nats:g} nats at p < {rep.alpha:g} {'shown' if rep.is_record else 'not shown'}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI


class StatsError(Exception):
    pass


# Settings that name the run or where it reads and writes its files: they may differ between the runs
# of one configuration (LOGFILE: the official scripts' log path). Any other difference is another configuration.
PER_RUN_SETTINGS = ("SEED", "RUN_ID", "LOGFILE", "LOG_DIR", "ARTIFACT_PATH", "EVAL_DUMP", "QUANTIZE_ONLY", "EVAL_ONLY")


def differing_settings(a: logparse.RunLog, b: logparse.RunLog, per_run=PER_RUN_SETTINGS) -> str | None:
    """The settings two runs set differently, other than per_run, as `NAME (a vs b), ...` (None when the same)."""
    names = sorted(n for n in (set(a.settings) | set(b.settings)) - set(per_run) if a.settings.get(n) != b.settings.get(n))
    return ", ".join(f"{n} ({a.settings.get(n, 'unset')} vs {b.settings.get(n, 'unset')})" for n in names) or None


def exclusion(run: logparse.RunLog) -> str | None:
    """Why a run's score is not a finished, valid run's score (None when it is)."""
    if run.final_val_bpb is None:
        return "no final score: the run stopped before its evaluation"
    if run.code_sha256 is not None and run.submission_valid is None:  # train_gpt.py ends every finished run with it
        return f"no submission_valid line: the run stopped during its evaluation, so its last score ({run.final_path}) is not the run's"
    if run.submission_valid is False:
        return f"submission_valid:no ({run.submission_reason or 'no reason given'})"
    return None


def load_runs(paths: list[str]) -> list[logparse.RunLog]:
    """The runs to average: each log left out (no final score, stopped during its evaluation,
    submission_valid:no) is said on stderr, one line with why. StatsError when none is left, when the
    rest differ in a setting other than PER_RUN_SETTINGS (that is not one configuration), or when a seed
    comes twice: the test assumes independent runs, and the same seed twice (a log given twice, or an
    older log of the same run renamed by the logger) would count one run as two."""
    runs = []
    for run in map(logparse.parse_log, paths):
        if reason := exclusion(run):
            print(f"excluded {run.path}: {reason}", file=sys.stderr)
        else:
            runs.append(run)
    if not runs:
        raise StatsError(f"none of the {len(paths)} log(s) is a finished valid run (see the lines above); nothing to average")
    for run in runs[1:]:
        if differ := differing_settings(runs[0], run):
            raise StatsError(f"{run.path} and {runs[0].path} are different configurations: {differ}; give the runs of one configuration (they may differ only in {', '.join(PER_RUN_SETTINGS)})")
    by_seed: dict[int, list[str]] = {}
    for run in runs:
        if run.seed is not None:
            by_seed.setdefault(run.seed, []).append(Path(run.path).name)
    for seed, names in by_seed.items():
        if len(names) > 1:
            raise StatsError(f"seed {seed} is in {len(names)} logs ({', '.join(names)}): give one log per seed")
    return runs


def previous_record(args: argparse.Namespace) -> PreviousRecord:
    if args.prev_bpb:
        return PreviousRecord(list(args.prev_bpb))
    if args.prev_logs:
        runs = load_runs(args.prev_logs)
        return PreviousRecord([r.final_val_bpb for r in runs], [r.seed for r in runs])
    if args.prev_submission:
        return record_from_submission(Path(args.prev_submission))
    return PreviousRecord([])


def per_seed_bpb(sub: dict) -> dict:
    """seed -> val_bpb from the per-seed forms records use: "seed_results" as {seed: {val_bpb}} or
    [{seed, val_bpb}], or "seeds" with "seed_scores" (a list in the same order, or {seed: val_bpb})."""
    results = sub.get("seed_results")
    if isinstance(results, dict):
        return {seed: float(r["val_bpb"]) for seed, r in results.items()}
    if isinstance(results, list):
        return {r.get("seed", i): float(r["val_bpb"]) for i, r in enumerate(results)}
    scores = sub.get("seed_scores")
    if isinstance(scores, dict):
        return {seed: float(v) for seed, v in scores.items()}
    if isinstance(scores, list):
        seeds = sub.get("seeds") or list(range(len(scores)))
        if len(seeds) != len(scores):
            raise ValueError(f"{len(seeds)} seeds but {len(scores)} seed_scores")
        return {seed: float(v) for seed, v in zip(seeds, scores)}
    return {}


def record_from_submission(path: Path) -> PreviousRecord:
    """Per-seed scores of a submission.json if it has them, else its single val_bpb."""
    try:
        sub = json.loads(path.read_text(encoding="utf-8"))
        per_seed = per_seed_bpb(sub)
        std = sub.get("val_bpb_std")
        if per_seed:
            return PreviousRecord(list(per_seed.values()), list(per_seed), float(std) if std is not None else None)
        return PreviousRecord([float(sub["val_bpb"])])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise StatsError(f"{path}: cannot read val_bpb or its per-seed scores ({type(e).__name__}: {e})") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Mean ± std over seeds and the one-sided t-test for a record "
        f"(improvement >= {THRESHOLD_NATS} nats at p < {ALPHA}). Exit status: 0 record shown or "
        "nothing to compare, 2 not shown, 1 error.",
    )
    parser.add_argument("logs", nargs="+", help="logs of the new runs (one per seed)")
    prev = parser.add_mutually_exclusive_group()
    prev.add_argument("--prev-bpb", type=float, nargs="+", metavar="BPB", help="previous record's per-seed val_bpb (one value = its mean: one-sample test)")
    prev.add_argument("--prev-logs", nargs="+", metavar="LOG", help="previous record's logs")
    prev.add_argument("--prev-submission", metavar="JSON", help="previous record's submission.json (its per-seed scores, else val_bpb)")
    parser.add_argument("--threshold-nats", type=float, default=THRESHOLD_NATS, help="required improvement in nats (default %(default)s)")
    parser.add_argument("--alpha", type=float, default=ALPHA, help="significance level (default %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = record_report(load_runs(args.logs), previous_record(args), args.threshold_nats, args.alpha)
    except (StatsError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(asdict(report), indent=2) if args.json else format_report(report))
    return 2 if report.is_record is False else 0


if __name__ == "__main__":
    sys.exit(main())
