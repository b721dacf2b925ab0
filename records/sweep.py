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

Before anything runs (and with --dry-run, which runs nothing), the environment of every run still to
do is checked with the Hyperparameters of the script --launch names, and every problem is printed,
each once with the runs it would stop. A failed run is reported with its reason (the `error:` lines of
its log, else of its stderr with --quiet) and its log, or the note that it wrote none.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
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
            runs.append(Run(settings, seed, run_id, Path(dict(settings).get("LOG_DIR", log_dir)) / f"{run_id}.txt"))
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


def check_launcher(command: list[str]):
    if shutil.which(command[0]) is None:
        raise SweepError(f"cannot start {command[0]!r}: not found; check --launch")


def launched_script(command: list[str]) -> Path | None:
    """The .py file the launch command runs (None if it names none); SweepError if it is not there."""
    script = next((Path(arg) for arg in command if arg.endswith(".py")), None)
    if script is not None and not script.is_file():
        raise SweepError(f"--launch runs {script}, which is not in {Path.cwd()}; start the sweep from the folder that holds it")
    return script


def has_settings(script: Path) -> bool:
    """A train_gpt.py-like script (its settings can be checked by importing it; another script is not imported)."""
    text = script.read_text(encoding="utf-8", errors="replace")
    return "class Hyperparameters" in text and "class SettingsError" in text


def settings_check(runs: list[Run], command: list[str]) -> list[str]:
    """The settings problems of the runs still to do, headed by one line (empty when there are none)."""
    script = launched_script(command)
    if script is None or not has_settings(script):
        print("note: --launch runs no train_gpt.py-like script, so the settings are not checked before the runs", file=sys.stderr)
        return []
    problems = settings_problems([run for run in runs if finished(run.log) is None], script)
    return [f"{script} refuses these settings, so nothing was run:", *problems] if problems else []


def settings_problems(runs: list[Run], script: Path) -> list[str]:
    """What the script's Hyperparameters refuses in each run's environment: every problem once, with the runs it stops."""
    spec = importlib.util.spec_from_file_location("train_gpt_for_sweep", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the script loads
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as e:
        raise SweepError(f"cannot load {script} to check the settings ({type(e).__name__}: {e})") from None
    finally:
        sys.modules.pop(spec.name, None)
    stopped: dict[str, list[str]] = {}
    for run in runs:
        try:
            module.Hyperparameters({**os.environ, **run.env})
        except module.SettingsError as e:
            stopped.setdefault(str(e), []).append(run.run_id)
    return [f"{ids[0]}{f' and {len(ids) - 1} more run(s)' if len(ids) > 1 else ''}: {problem}" for problem, ids in stopped.items()]


def error_lines(text: str) -> list[str]:
    """The `error:` lines train_gpt.py writes (its log's last lines, or stderr), else the last line of the text."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return [line[line.index("error:"):] for line in lines if "error:" in line] or lines[-1:]


def launch(run: Run, command: list[str], quiet: bool) -> tuple[int, bool, list[str]]:
    """(exit status, whether it wrote its log, why it failed): the error lines of that log, else of its
    stderr (captured with quiet). A log older than the launch is an earlier attempt's, not this run's."""
    env = {**os.environ, **run.env}
    start = time.time()
    with tempfile.TemporaryFile("w+", errors="replace") as stderr:
        try:
            code = subprocess.run(command, env=env, stdout=subprocess.DEVNULL if quiet else None, stderr=stderr if quiet else None).returncode
        except FileNotFoundError:
            raise SweepError(f"cannot start {command[0]!r}: not found; check --launch") from None
        stderr.seek(0)
        captured = stderr.read()
    if run.log.is_file() and run.log.stat().st_mtime >= start - 2:  # 2 s: file systems with a coarse clock
        return code, True, error_lines(run.log.read_text(encoding="utf-8", errors="replace"))
    return code, False, error_lines(captured) if quiet else ["(its output is above)"]


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
    parser.add_argument("--dry-run", action="store_true", help="list the runs and which are done, check their settings, run nothing")
    parser.add_argument("--quiet", action="store_true", help="do not pass the runs' output through (it is in their logs; a failed run's error lines are printed)")
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
        check_launcher(command)
        problems = settings_check(runs, command)
        if problems and not args.dry_run:
            raise SweepError("\n".join(problems))
        failed = execute(runs, command, args.dry_run, args.quiet)
        if problems:  # --dry-run: the list of runs, then what stops them
            raise SweepError("\n".join(problems))
        if args.dry_run and (script := launched_script(command)) and has_settings(script):
            print(f"{script} accepts the settings of every run to do")
    except SweepError as e:
        for line in str(e).splitlines():
            print(f"error: {line}", file=sys.stderr)
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
        code, wrote_log, reasons = launch(run, command, quiet)
        if code != 0 or finished(run.log) is None:
            failed.append(run)
            print(f"{head}: failed (exit {code}; {f'log {run.log}' if wrote_log else 'it wrote no log'}):", flush=True)
            for reason in reasons[-10:] if code else ["its log has no final score"]:
                print(f"  {reason}", flush=True)
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
