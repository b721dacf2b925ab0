"""One PNG of several runs: learning curves and the final score of each evaluation path.

    python3 records/plot.py logs/record_seed{1337,42,2025}.txt -o logs/record.png
    python3 records/plot.py logs/base.txt logs/no_ttt.txt -o ablation.png --labels base no-ttt

Reads our logs and the official records' logs (through logparse). Five panels: training loss and
validation bpb, each against the step and against the training wall clock, and a bar chart of the
final bpb of each path (pre-quantization, roundtrip, sliding window, TTT) per run, with the
quantization gap (roundtrip minus pre-quant) and the TTT gain (sliding window, or the base model
on the same documents, minus TTT) written on the bars; the run's score is the outlined bar.

Needs matplotlib (`pip install matplotlib`); nothing else in the project does.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import logparse

BAR_PATHS = (("pre-quant", None), ("roundtrip", "roundtrip"), ("sliding", "sliding_window"), ("TTT", "ttt"))
BAR_COLORS = {"pre-quant": "#9e9e9e", "roundtrip": "#1f77b4", "sliding": "#2ca02c", "TTT": "#d62728"}


class PlotError(Exception):
    """A reason the plot cannot be made; main() prints it as one line."""


def run_labels(runs: list[logparse.RunLog]) -> list[str]:
    """The run id (else the log's folder and name); the seed is added where two would read the same."""
    names = [r.run_id or f"{Path(r.path or '?').parent.name}/{Path(r.path or '?').stem}" for r in runs]
    return [f"{n} seed {r.seed}" if names.count(n) > 1 and r.seed is not None else n for n, r in zip(names, runs)]


def time_of_step(run: logparse.RunLog):
    """step -> training wall clock in ms, interpolated between the steps whose lines give a time
    (the official `N/M val_loss:` lines have none); None outside them."""
    known = {0: 0.0}  # step 0 is before any training
    known.update({p.step: p.train_time_ms for p in run.train_curve + run.val_curve if p.train_time_ms is not None})
    known = sorted(known.items())
    if run.steps is not None and run.train_time_ms is not None and run.stopped_early:
        known = sorted(dict(known + [(run.steps, run.train_time_ms)]).items())

    def at(step: int) -> float | None:
        for (s0, t0), (s1, t1) in zip(known, known[1:]):
            if s0 <= step <= s1:
                return t0 + (t1 - t0) * (step - s0) / (s1 - s0)
        return dict(known).get(step)

    return at


def _value(point: logparse.StepPoint) -> float:
    return point.loss if point.bpb is None else point.bpb


def _zoom(axes, curves: list[list[logparse.StepPoint]]):
    """Fit the y axis to the points after the first 2 % of each run: the first steps' loss (about
    ln(vocab)) would flatten everything after them."""
    kept = [_value(p) for points in curves if points for p in points if p.step >= 0.02 * points[-1].step] or [
        _value(p) for points in curves for p in points]
    if not kept:
        return
    low, high = min(kept), max(kept)
    pad = 0.05 * (high - low) or 0.01 * abs(high) or 0.01
    for ax in axes:
        ax.set_ylim(low - pad, high + pad)


def _curves(ax_step, ax_time, points, at, label, color, **style):
    if not points:
        return
    steps = [p.step for p in points]
    values = [_value(p) for p in points]
    if len(points) == 1:
        style = {**style, "marker": "o"}  # a line of one point draws nothing
    ax_step.plot(steps, values, label=label, color=color, **style)
    timed = [(at(p.step) if p.train_time_ms is None else p.train_time_ms, v) for p, v in zip(points, values)]
    timed = [(t / 60_000, v) for t, v in timed if t is not None]
    if timed:
        ax_time.plot(*zip(*timed), label=label, color=color, **style)


def _bars(ax, runs: list[logparse.RunLog], labels: list[str]):
    width = 0.8 / len(BAR_PATHS)
    values, in_legend = [], set()
    for i, run in enumerate(runs):
        scores = {name: (run.pre_quant_val_bpb if path is None else run.path_bpb(path)) for name, path in BAR_PATHS}
        for j, (name, path) in enumerate(BAR_PATHS):
            bpb = scores[name]
            if bpb is None:
                continue
            values.append(bpb)
            x = i + (j - (len(BAR_PATHS) - 1) / 2) * width
            is_score = path is not None and path == run.final_path
            ax.bar(x, bpb, width, color=BAR_COLORS[name], edgecolor="black" if is_score else "none", linewidth=1.5,
                   label=None if name in in_legend else name)
            in_legend.add(name)
            note = f"{bpb:.4f}"
            if name == "roundtrip" and run.quant_gap_bpb is not None:
                note += f"\nquant gap {run.quant_gap_bpb:+.4f}"
            if name == "TTT" and run.ttt_gain_bpb is not None:
                note += f"\nTTT gain {run.ttt_gain_bpb:.4f}"
            ax.annotate(note, (x, bpb), xytext=(0, 3), textcoords="offset points", ha="center", va="bottom", fontsize=7, rotation=90)
    if not values:
        ax.text(0.5, 0.5, "no final scores", ha="center", va="center", transform=ax.transAxes)
        return
    low, high = min(values), max(values)
    pad = max(high - low, 0.005)
    ax.set_ylim(low - 0.5 * pad, high + 1.2 * pad)  # the differences are thousandths of a bpb: zoom in
    ax.set_xticks(range(len(runs)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("final val_bpb (outlined: the run's score)")
    ax.set_title("final bpb per evaluation path")
    ax.legend(fontsize=8)


def make_figure(runs: list[logparse.RunLog], labels: list[str] | None = None, title: str | None = None):
    """The matplotlib Figure (not drawn on screen); one line per run in each curve panel that has data."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotError("plotting needs matplotlib: pip install matplotlib") from None
    labels = labels or run_labels(runs)
    fig = Figure(figsize=(16, 9), layout="constrained")
    grid = fig.add_gridspec(2, 3)
    loss_step, loss_time = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])
    bpb_step, bpb_time = fig.add_subplot(grid[1, 0]), fig.add_subplot(grid[1, 1])
    colors = [f"C{i % 10}" for i in range(len(runs))]
    for run, label, color in zip(runs, labels, colors):
        at = time_of_step(run)
        _curves(loss_step, loss_time, run.train_curve, at, label, color, linewidth=1)
        _curves(bpb_step, bpb_time, run.val_curve, at, label, color, marker="o", markersize=3, linewidth=1)
    for ax, what, x in ((loss_step, "train loss", "step"), (loss_time, "train loss", "training wall clock (min)"),
                        (bpb_step, "validation bpb", "step"), (bpb_time, "validation bpb", "training wall clock (min)")):
        ax.set_xlabel(x)
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=7)
    _zoom((loss_step, loss_time), [r.train_curve for r in runs])
    _zoom((bpb_step, bpb_time), [r.val_curve for r in runs])
    _bars(fig.add_subplot(grid[:, 2]), runs, labels)
    if title:
        fig.suptitle(title)
    return fig


def png_path(out: Path) -> Path:
    """The file a plot goes to: `out` when it ends in .png, else `out` with .png added (matplotlib would
    otherwise pick the format from any other suffix, or add .png to a name without one, unannounced)."""
    return out if out.suffix.lower() == ".png" else out.with_name(out.name + ".png")


def write_plot(runs: list[logparse.RunLog], out: Path, labels: list[str] | None = None, title: str | None = None) -> Path:
    """Writes the PNG and returns the path written: png_path(out)."""
    if not runs:
        raise PlotError("no runs to plot")
    if not any(r.train_curve or r.val_curve or r.finals for r in runs):
        raise PlotError("no step lines and no final scores in these logs: nothing to plot")
    fig = make_figure(runs, labels, title)
    out = png_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, format="png")
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Plot several runs' logs into one PNG: loss and bpb curves by step and wall clock, and the final bpb per evaluation path.")
    parser.add_argument("logs", nargs="+", help="logs to plot (ours or the official records')")
    parser.add_argument("-o", "--output", required=True, type=Path, help="PNG to write (.png is added when the name does not end with it)")
    parser.add_argument("--labels", nargs="+", help="one label per log (default: run id, else folder/name)")
    parser.add_argument("--title", help="figure title")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.labels and len(args.labels) != len(args.logs):
        print(f"error: {len(args.labels)} labels for {len(args.logs)} logs; give one per log", file=sys.stderr)
        return 1
    try:
        runs = [logparse.parse_log(p) for p in args.logs]
        out = write_plot(runs, args.output, args.labels, args.title)
    except (PlotError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}" + ("" if out == args.output else f" (-o {args.output} does not end with .png)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
