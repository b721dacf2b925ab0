"""Side-by-side table of several runs, for ablations.

    python3 records/compare.py logs/*.txt
    python3 records/compare.py logs/base.txt logs/no_ttt.txt --markdown --sort bpb

One row per log: the final bpb of each evaluation path of the reloaded artifact (roundtrip,
sliding window, TTT), the quantization gap, the TTT gain, steps, ms per step, counted bytes and
evaluation time. A field a log does not hold is shown as "-".
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import logparse

COLUMNS = ("run", "seed", "roundtrip", "sliding", "ttt", "score", "quant_gap", "ttt_gain", "steps", "ms/step", "total_bytes", "eval_s")
NUMERIC_FROM = 1  # every column after "run" is right-aligned


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def row(run: logparse.RunLog) -> list[str]:
    return [
        run.run_id or Path(run.path or "?").stem,
        _fmt(run.seed, "d"),
        _fmt(run.path_bpb("roundtrip"), ".4f"),
        _fmt(run.path_bpb("sliding_window"), ".4f"),
        _fmt(run.path_bpb("ttt"), ".4f"),
        _fmt(run.final_val_bpb, ".6f"),
        _fmt(run.quant_gap_bpb, "+.4f"),
        _fmt(run.ttt_gain_bpb, "+.4f"),
        _fmt(run.steps, "d"),
        _fmt(run.step_avg_ms, ".2f"),
        _fmt(run.total_bytes, ",d"),
        _fmt(run.eval_time_s, ".1f"),
    ]


def render(rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        head = "| " + " | ".join(COLUMNS) + " |"
        rule = "|" + "|".join(":---" if i < NUMERIC_FROM else "---:" for i in range(len(COLUMNS))) + "|"
        return "\n".join([head, rule] + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(COLUMNS)]

    def line(cells) -> str:
        return "  ".join(c.ljust(w) if i < NUMERIC_FROM else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(COLUMNS), line("-" * w for w in widths)] + [line(r) for r in rows])


def sort_key(run: logparse.RunLog, by: str):
    if by == "bpb":
        return (run.final_val_bpb is None, run.final_val_bpb or 0.0)
    return (run.seed is None, run.seed or 0) if by == "seed" else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Print a side-by-side table of several runs' logs (ablations).")
    parser.add_argument("logs", nargs="+", help="logs to compare")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--sort", choices=("given", "bpb", "seed"), default="given", help="row order (default: as given)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        runs = [logparse.parse_log(p) for p in args.logs]
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    runs.sort(key=lambda r: sort_key(r, args.sort))  # stable: "given" keeps the order
    print(render([row(r) for r in runs], args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
