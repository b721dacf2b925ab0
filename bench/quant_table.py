#!/usr/bin/env python3
"""Quantization benchmark: train once, then export every (bits, quantizer, compressor) combination.

    DATA_PATH=... TOKENIZER_PATH=... NUM_LAYERS=4 ... python3 bench/quant_table.py [--bits 8 6 5]

The model and training come from the usual environment settings (see README). After training
(EMA/SWA applied, Hessians from training batches), each combination is quantized, packed,
compressed, written, rebuilt from the file and scored with the standard evaluation. Prints one
markdown table: pre-quant bpb, roundtrip bpb, gap, artifact bytes, the packing that won and the
time of each stage. Runs on one process (CPU or one GPU).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402


def export_and_score(model, hessians, args, rt, tables, val_tokens, bits: int, method: str, compressor: str, workdir: Path) -> dict:
    trial = tg.Hyperparameters(
        {**{s.name: str(v) for s, v in zip(tg.SETTINGS, args.as_dict().values())}, "QUANT_BITS_ATTN": str(bits), "QUANT_BITS_MLP": str(bits),
         "GPTQ_ENABLED": "1" if method == "gptq" else "0", "ARTIFACT_COMPRESSOR": compressor, "ARTIFACT_LEVEL": "22" if compressor == "zstd" else "9",
         "QUANT_FIT_TO_CAP": "0"}
    )
    t0 = tg.sync_time(rt)
    qstate = tg.quantize_state_dict(model.state_dict(), trial, hessians if method == "gptq" else None)
    quant_s = tg.sync_time(rt) - t0
    sizes = {}
    for packing in ("int8", "bitpack"):
        blob, _ = tg.encode_artifact(qstate, model.cfg, compressor, trial.artifact_level, packing)
        sizes[packing] = len(blob)
    path = workdir / f"int{bits}_{method}_{compressor}.pgz"
    t0 = time.perf_counter()
    report, packing, timings = tg.write_artifact(qstate, model.cfg, trial, path, lambda line: None)
    compress_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    rebuilt = tg.load_model_from_artifact(path, rt.device)
    decompress_s = time.perf_counter() - t0
    result = tg.evaluate_standard(rebuilt, val_tokens, tables, trial, rt)
    return dict(bits=bits, method=method, compressor=compressor, bpb=result.val_bpb, artifact=report.artifact_bytes,
                total=report.total_bytes, packing=packing, int8=sizes["int8"], bitpack=sizes["bitpack"],
                quant_s=quant_s, compress_s=compress_s, decompress_s=decompress_s)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 6, 5], help="bits of attention and MLP matrices")
    parser.add_argument("--compressors", nargs="+", default=["zstd", "lzma"], choices=tg.COMPRESSORS)
    parser.add_argument("--methods", nargs="+", default=["rtn", "gptq"], choices=["rtn", "gptq"])
    opts = parser.parse_args()
    args = tg.Hyperparameters()
    rt = tg.setup_runtime()
    tables = tg.load_tokenizer_tables(args.tokenizer_path, args.vocab_size)
    val_tokens = tg.load_validation_tokens(args.data_path, args.vocab_size, args.val_max_tokens).to(rt.device)
    torch_seed = args.seed
    tg.torch.manual_seed(torch_seed)
    model = tg.GPT(tg.ModelConfig.from_args(args), tg.select_attention_backend(args.attn_backend, rt.device)).to(rt.device)
    print(f"model_params:{tg.count_parameters(model)} val_targets:{val_tokens.numel() - 1}", flush=True)
    trained = tg.train_model(model, args, rt, print, lambda m: tg.evaluate_standard(m, val_tokens, tables, args, rt))
    hessians = trained.hessians
    if hessians is None:
        hessians = tg.collect_hessians(model, tg.train_batches_for_calibration(tg.DistributedTokenLoader(args.data_path, rt), args, rt), rt)
    pre = tg.evaluate_standard(model, val_tokens, tables, args, rt)
    print(f"pre_quant weights:{trained.exported_weights} val_bpb:{pre.val_bpb:.4f} steps:{trained.steps} train_time:{trained.train_time_ms / 1000:.1f}s", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for bits in opts.bits:
            for method in opts.methods:
                for compressor in opts.compressors:
                    rows.append(export_and_score(model, hessians, args, rt, tables, val_tokens, bits, method, compressor, Path(tmp)))
                    print(f"done int{bits} {method} {compressor}", flush=True)
    print(f"\npre-quant bpb ({trained.exported_weights} weights): {pre.val_bpb:.4f}\n")
    print("| bits (attn/MLP) | quantizer | compressor | roundtrip bpb | gap | artifact bytes | packing won | int8 / bitpack bytes | quantize s | compress s | decompress s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| int{r['bits']} | {r['method']} | {r['compressor']} | {r['bpb']:.4f} | {r['bpb'] - pre.val_bpb:+.4f} | {r['artifact']:,} | {r['packing']} | "
              f"{r['int8']:,} / {r['bitpack']:,} | {r['quant_s']:.2f} | {r['compress_s']:.2f} | {r['decompress_s']:.3f} |")


if __name__ == "__main__":
    main()
