#!/usr/bin/env python3
"""Size plan: will a configuration fit under the cap? Learn it before a paid run.

    NUM_LAYERS=12 MLP_MULT=4 ... python3 bench/size_plan.py --steps 20

Builds the model of the environment's settings (every setting as for train_gpt.py), trains it for a
few steps on a small batch (--steps, --batch-tokens, --seq-len; 0 steps = the initial weights),
quantizes it with the run's own quantization settings and Hessians from training batches, packs it
exactly as the run would, and prints the bytes and bits per value of each stream, the shipped code
bytes, the total against SIZE_CAP_BYTES and whether it fits. With QUANT_CLIP=sdclip the bits per
value depend on the shape of each row's distribution, not on its scale, so a short run is a fair
guide (README: how far the plan of a short run was from the trained model); with search they move
with training. One process, CPU or one GPU; no validation data is read.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402


def short_run_settings(args: tg.Hyperparameters, steps: int, batch_tokens: int, seq_len: int) -> tg.Hyperparameters:
    """The run's settings with a training budget of `steps` small steps, the raw weights exported (an EMA of a
    few steps would be mostly the initial weights), and no warm-up, compile or evaluation."""
    env = {name: str(int(v) if isinstance(v, bool) else v) for name, v in args.as_dict().items()}
    env.update(ITERATIONS=str(max(steps, 1)), TRAIN_BATCH_TOKENS=str(batch_tokens), TRAIN_SEQ_LEN=str(seq_len), WARMUP_STEPS="0",
               MAX_WALLCLOCK_SECONDS="0", VAL_LOSS_EVERY="0", EMA_DECAY="0", SWA_ENABLED="0", COMPILE="0", GPTQ_CALIB_SEQS=str(min(args.gptq_calib_seqs, 8)), TRAIN_LOG_EVERY="0")
    return tg.Hyperparameters(env)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="training steps before quantizing (0 = the initial weights)")
    parser.add_argument("--batch-tokens", type=int, default=8 * 2048, help="tokens per step (a multiple of 8 x --seq-len)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--checkpoint", help="weights of this configuration to plan from instead of a short run")
    opts = parser.parse_args()
    args = tg.Hyperparameters()
    tg.check_artifact_packages(args)
    rt = tg.setup_runtime()
    short = short_run_settings(args, opts.steps, opts.batch_tokens, opts.seq_len)
    tg.torch.manual_seed(args.seed)
    model = tg.GPT(tg.ModelConfig.from_args(args), tg.select_attention_backend(args.attn_backend, rt.device)).to(rt.device)
    print(f"model_params:{tg.count_parameters(model)}", flush=True)
    t0 = time.perf_counter()
    if opts.checkpoint:
        model.load_state_dict(tg.torch.load(opts.checkpoint, map_location=rt.device))
    elif opts.steps:
        tg.train_model(model, short, rt, lambda line: None, None)
    model.requires_grad_(False)
    hessians = None
    if args.gptq_enabled:
        hessians = tg.collect_hessians(model, tg.train_batches_for_calibration(tg.DistributedTokenLoader.for_model(short, rt, model), short, rt), rt)
    t1 = time.perf_counter()
    qstate = tg.quantize_state_dict(model.state_dict(), args, hessians)
    t2 = time.perf_counter()
    blob, streams = tg.encode_artifact(qstate, model.cfg, tg.Packing.from_args(args))
    t3 = time.perf_counter()
    code = len(tg.shipped_code(tg.running_source(), args.code_minify))
    source = f"checkpoint {opts.checkpoint}" if opts.checkpoint else f"{opts.steps} steps of {opts.batch_tokens} tokens"
    print(f"weights: {source}; train {t1 - t0:.0f}s, quantize {t2 - t1:.0f}s, pack {t3 - t2:.0f}s (wall clock of this machine)\n")
    print("| stream | values | bytes | bits per value | compressor |")
    print("| --- | ---: | ---: | ---: | --- |")
    for s in streams:
        per_value = f"{8 * s.bytes / s.numel:.3f}" if s.numel else "-"
        print(f"| {s.name} | {s.numel:,} | {s.bytes:,} | {per_value} | {s.compressor} |")
    total = len(blob) + code
    framing = len(blob) - sum(s.bytes for s in streams)
    print(f"| (headers) | | {framing:,} | | |")
    print(f"| artifact | | {len(blob):,} | | |")
    print(f"| shipped code | | {code:,} | | |")
    print(f"| **total** | | **{total:,}** | | |")
    margin = args.size_cap_bytes - total
    print(f"\nsize_plan total_bytes:{total} cap_bytes:{args.size_cap_bytes} fits:{'yes' if margin >= 0 else 'no'} margin_bytes:{margin}")


if __name__ == "__main__":
    main()
