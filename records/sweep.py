"""Ablation sweeps: run a grid of setting overrides one after another, then compare them.

    python3 records/sweep.py --set MATRIX_LR=0.02,0.026 --set NUM_LOOPS=1,2 --seeds 1337 42
    NUM_LAYERS=4 python3 records/sweep.py --set QK_GAIN_INIT=4,5 --launch "python3 train_gpt.py" --name qk

Every combination of the --set values, for each seed, is one run of the launch command (by
default `torchrun --standalone --nproc_per_node=8 train_gpt.py`) with the settings in its
environment and RUN_ID={name}_{setting}{value}..._seed{seed}; the rest of the environment is
passed on as it is. The runs go one after another in the current folder and write
{LOG_DIR}/{RUN_ID}.txt (LOG_DIR from the environment, default `logs`, as train_gpt.py).

Resumable: a run whose log already ends with a final score is not run again (train_gpt.py keeps
an older, unfinished log of the same RUN_ID under a stamped name). At the end it prints the
compare table of the runs, the mean ± sample std of the final val_bpb per combination (over the
seeds) and per value of each setting (over everything else), and writes the plot
({LOG_DIR}/{name}.png unless --plot or --no-plot). Exit status: 0 when every run finished, 1 otherwise.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import compare
import logparse
import stats

DEFAULT_LAUNCH = "torchrun --standalone --nproc_per_node=8 train_gpt.py"
SETTING_NAME = re.compile(r"[A-Z][A-Z0-9_]*")


class SweepError(Exception):
    """A reason the sweep cannot start; main() prints it as one line."""


@dataclass(frozen=True)
class Run:
    settings: tuple[tuple[str, str], ...]  # (NAME, value) of the swept settings, in --set order
    seed: int | None
    run_id: str
    log: Path

    @property
    def env(self) -> dict[str, str]:
        seed = {} if self.seed is None else {"SEED": str(self.seed)}
        return {**dict(self.settings), **seed, "RUN_ID": self.run_id}


def parse_set(text: str) -> tuple[str, list[str]]:
    """`MATRIX_LR=0.02,0.026` -> ("MATRIX_LR", ["0.02", "0.026"])."""
    name, sep, values = text.partition("=")
    if not sep or not SETTING_NAME.fullmatch(name):
        raise SweepError(f"--set {text!r}: write NAME=value1,value2 with an upper-case setting name, e.g. MATRIX_LR=0.02,0.026")
    listed = [v.strip() for v in values.split(",")]
    if not all(listed):
        raise SweepError(f"--set {text!r}: a value is empty")
    return name, listed


def slug(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", value).strip("-") or "empty"


def plan(sets: list[str], seeds: list[int] | None, name: str, log_dir: Path) -> list[Run]:
    """The runs, seed by seed so that a partial sweep already covers every combination once."""
    grid = [parse_set(s) for s in sets]
    names = [n for n, _ in grid]
    if len(set(names)) != len(names):
        raise SweepError(f"a setting is given twice in --set: {', '.join(n for n in names if names.count(n) > 1)}")
    if "SEED" in names and seeds:
        raise SweepError("give the seeds either with --seeds or with --set SEED=..., not both")
    if "RUN_ID" in names:
        raise SweepError("RUN_ID is set by the sweep for each run; it cannot be swept")
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise SweepError(f"--name {name!r}: use letters, digits, '.', '_' or '-'")
    runs = []
    for seed in seeds or [None]:
        for values in itertools.product(*(v for _, v in grid)):
            settings = tuple(zip(names, values))
            parts = [f"{n.lower()}{slug(v)}" for n, v in settings] + ([] if seed is None else [f"seed{seed}"])
            run_id = "_".join([name, *parts])
            runs.append(Run(settings, seed, run_id, log_dir / f"{run_id}.txt"))
    return runs


def finished(log: Path) -> logparse.RunLog | None:
    """The parsed log if the run finished: it has a final score and, for a log of our script
    (which ends every run with submission_valid), that last line too: a run killed during TTT has
    the sliding window's score and is not finished."""
    if not log.is_file():
        return None
    run = logparse.parse_log(log)
    if run.final_val_bpb is None or (run.code_sha256 is not None and run.submission_valid is None):
        return None
    return run


def launch(run: Run, command: list[str], quiet: bool) -> int:
    env = {**os.environ, **run.env}
    out = subprocess.DEVNULL if quiet else None
    try:
        return subprocess.run(command, env=env, stdout=out, stderr=out).returncode
    except FileNotFoundError:
        raise SweepError(f"cannot start {command[0]!r}: not found; check --launch") from None


def _fmt_mean_std(values: list[float]) -> str:
    std = stats.sample_std(values)
    return f"{stats.mean(values):.6f}" + ("" if std is None else f" ± {std:.6f}")


def summary(done: list[tuple[Run, logparse.RunLog]], names: list[str]) -> str:
    """Mean ± sample std of the final val_bpb per combination (over seeds) and per setting value."""
    lines = ["per combination (mean ± sample std of the final val_bpb over the seeds):"]
    head = [*names, "runs", "val_bpb"]
    rows = []
    for settings in dict.fromkeys(run.settings for run, _ in done):
        scores = [log.final_val_bpb for run, log in done if run.settings == settings]
        rows.append([*(v for _, v in settings), str(len(scores)), _fmt_mean_std(scores)])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    lines += [("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths))).rstrip() for row in [head, ["-" * w for w in widths], *rows]]
    if len(names) > 1:
        lines.append("per setting value (over everything else):")
        for i, name in enumerate(names):
            for value in dict.fromkeys(run.settings[i][1] for run, _ in done):
                scores = [log.final_val_bpb for run, log in done if run.settings[i][1] == value]
                lines.append(f"  {name}={value}  runs {len(scores)}  {_fmt_mean_std(scores)}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Run a grid of setting overrides through the launch command, one run after another "
                                     "(resumable), then print the comparison and write the plot.")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=V1,V2", help="a setting and its values; repeat for a grid")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds to run each combination with (default: the script's SEED)")
    parser.add_argument("--launch", default=DEFAULT_LAUNCH, help="command that runs one training (default: %(default)s)")
    parser.add_argument("--name", default="sweep", help="prefix of the RUN_IDs and of the plot's name (default %(default)s)")
    parser.add_argument("--plot", type=Path, help="PNG to write (default {LOG_DIR}/{name}.png)")
    parser.add_argument("--no-plot", action="store_true", help="do not write the plot")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and which are done, run nothing")
    parser.add_argument("--quiet", action="store_true", help="do not pass the runs' output through (it is in their logs)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log_dir = Path(os.environ.get("LOG_DIR") or "logs")
    try:
        if not args.set and not args.seeds:
            raise SweepError("nothing to sweep: give --set NAME=V1,V2 and/or --seeds")
        command = shlex.split(args.launch)
        if not command:
            raise SweepError("--launch is empty")
        runs = plan(args.set, args.seeds, args.name, log_dir)
        failed = execute(runs, command, args.dry_run, args.quiet)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    if args.dry_run:
        return 0
    report(runs, args, log_dir)
    return 1 if failed else 0


def execute(runs: list[Run], command: list[str], dry_run: bool, quiet: bool) -> list[Run]:
    failed = []
    for i, run in enumerate(runs, 1):
        head = f"[{i}/{len(runs)}] {run.run_id}"
        done = finished(run.log)
        if done is not None:
            print(f"{head}: done already, val_bpb {done.final_val_bpb:.6f} ({run.log})", flush=True)
            continue
        if dry_run:
            print(f"{head}: to run with {' '.join(f'{k}={v}' for k, v in run.env.items())}", flush=True)
            continue
        print(f"{head}: running with {' '.join(f'{k}={v}' for k, v in run.env.items())}", flush=True)
        code = launch(run, command, quiet)
        if code != 0 or finished(run.log) is None:
            failed.append(run)
            print(f"{head}: failed (exit {code}, {'no final score in' if code == 0 else 'see'} {run.log})", flush=True)
    return failed


def report(runs: list[Run], args: argparse.Namespace, log_dir: Path):
    done = [(run, log) for run in runs if (log := finished(run.log)) is not None]
    if not done:
        print("no run finished: nothing to compare")
        return
    logs = [log for _, log in done]
    print()
    print(compare.render([compare.row(log) for log in logs], markdown=False))
    print()
    print(summary(done, [name for name, _ in runs[0].settings]))
    if args.no_plot:
        return
    import plot  # only here: matplotlib is needed for the plot alone

    out = args.plot or log_dir / f"{args.name}.png"
    try:
        print(f"wrote {plot.write_plot(logs, out, [run.run_id for run, _ in done], title=f'sweep {args.name}')}")
    except plot.PlotError as e:
        print(f"plot not written: {e}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
