#!/usr/bin/env python3
"""Training throughput: run train_gpt.py for a fixed wall clock, with and without torch.compile,
and print ms/step, tokens/s, peak memory and the attention backend that ran.

    DATA_PATH=... TOKENIZER_PATH=... python3 bench/throughput.py --seconds 60 [--nproc 1] [--compile 1 0]

Model and batch settings come from the environment as usual (the defaults are the record
configuration). Each run skips what does not measure training speed: GPTQ, sliding-window and
TTT evaluation; the final standard evaluation reads only VAL_MAX_TOKENS tokens. Logs go to
logs/throughput_compile{0,1}.txt.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "records"))
import logparse  # noqa: E402

FAST_EVAL = {"GPTQ_ENABLED": "0", "TTT_ENABLED": "0", "EVAL_STRIDE": "0", "VAL_MAX_TOKENS": "65536", "EVAL_AUDIT": "0", "ITERATIONS": "1000000"}


def run(seconds: float, compile_on: bool, nproc: int) -> logparse.RunLog:
    run_id = f"throughput_compile{int(compile_on)}"
    env = {**FAST_EVAL, **os.environ, "MAX_WALLCLOCK_SECONDS": str(seconds), "COMPILE": str(int(compile_on)), "RUN_ID": run_id}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable]
    done = subprocess.run([*launcher, str(REPO / "train_gpt.py")], cwd=REPO, env=env)
    if done.returncode not in (0, 3):  # 3: finished, but submission_valid:no (the timings still count)
        sys.exit(f"error: train_gpt.py exited with {done.returncode} (COMPILE={int(compile_on)}); see logs/{run_id}.txt")
    return logparse.parse_log(REPO / env.get("LOG_DIR", "logs") / f"{run_id}.txt")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="training wall clock of each run")
    parser.add_argument("--nproc", type=int, default=1, help="processes (GPUs); WORLD_SIZE must divide 8")
    parser.add_argument("--compile", type=int, nargs="+", default=[1, 0], choices=[0, 1], help="COMPILE values to run")
    opts = parser.parse_args()
    rows = [(c, run(opts.seconds, bool(c), opts.nproc)) for c in opts.compile]
    print("\n| compile | backend | device | steps | ms/step | tokens/s | peak allocated MiB | peak reserved MiB | params |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for c, r in rows:
        tokens = int(r.settings.get("TRAIN_BATCH_TOKENS", "0"))
        tok_s = tokens / (r.step_avg_ms / 1000) if r.step_avg_ms else float("nan")
        print(f"| {c} | {r.attention_backend} | {r.versions.get('device', r.device)} | {r.steps} | {r.step_avg_ms:.2f} | {tok_s:,.0f} | "
              f"{r.peak_mem_allocated_mib} | {r.peak_mem_reserved_mib} | {r.model_params:,} |")


if __name__ == "__main__":
    main()
