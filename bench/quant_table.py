#!/usr/bin/env python3
"""Quantization and packing benchmark: train once (or load --checkpoint), then print three tables.

    DATA_PATH=... TOKENIZER_PATH=... NUM_LAYERS=6 ... python3 bench/quant_table.py --checkpoint .bench/m.pt

1. quantizers: each variant of the settings (the old packing of format 1, the defaults, each feature
   switched off, the SDClip k and the search bits swept) is quantized, packed, written, rebuilt from
   the file and scored with the standard evaluation: artifact and code bytes, roundtrip bpb, gap;
   then SDClip's bpb at the bytes of each search point, interpolated along the SDClip sweep.
2. roles: the bytes and bits per value of each stream of the default artifact.
3. packing: the default quantized model packed every way (grouping x transpose x row order x
   int8/bitpack x compressor), each decoded and checked lossless: bytes, compress and decompress
   seconds; `auto` = per stream the smallest compressor (derived from the others; one real auto run
   of the default layout confirms the bytes).

The model and training come from the usual environment settings (see README); --checkpoint saves the
trained weights after the first run and loads them afterwards. One process (CPU or one GPU).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_gpt as tg  # noqa: E402

HEADER = tg._ARTIFACT_HEADER.size
STREAM_HEADER = tg._STREAM_HEADER.size
OLD_PACKING = dict(  # format 1 on main before issue 9: search clip, int8 RTN embedding, one zstd stream, raw source counted (controls fp16; they were fp32)
    QUANT_CLIP="search", QUANT_BITS_EMBED="8", GPTQ_EMBED="0", LQER_RANK="0", QUANT_CONTROL_INT8="", ARTIFACT_COMPRESSOR="zstd",
    ARTIFACT_GROUPING="single", ARTIFACT_PACKING="auto", ARTIFACT_TRANSPOSE="0", ARTIFACT_REORDER_ROWS="",
)


def settings_env(args: tg.Hyperparameters) -> dict[str, str]:
    return {name: str(int(v) if isinstance(v, bool) else v) for name, v in args.as_dict().items()}


def quantizer_variants(args: tg.Hyperparameters, k_scales: list[float], search_bits: list[int]) -> list[tuple[str, dict]]:
    """(label, settings) of every row of the quantizer table."""
    ks = {f"QUANT_CLIP_K_{r}": getattr(args, f"quant_clip_k_{r.lower()}") for r in ("ATTN", "MLP", "EMBED", "OTHER")}
    variants = [("old packing (format 1)", OLD_PACKING), ("defaults", {})]
    variants += [("GPTQ_EMBED=0", {"GPTQ_EMBED": "0"}), ("LQER_RANK=0", {"LQER_RANK": "0"}), ("QUANT_BITS_EMBED=8", {"QUANT_BITS_EMBED": "8"})]
    variants += [(f"LQER_A_CLIP_SEARCH={int(not args.lqer_a_clip_search)}", {"LQER_A_CLIP_SEARCH": str(int(not args.lqer_a_clip_search))})]
    variants += [(f"QUANT_CONTROL_INT8={c or '(none)'}", {"QUANT_CONTROL_INT8": c}) for c in ("", "out_gate", "all") if c != args.quant_control_int8]
    variants += [(f"sdclip k x{f:g}", {"QUANT_CLIP": "sdclip", **{n: str(k * f) for n, k in ks.items()}}) for f in k_scales]
    for bits in search_bits:
        variants.append((f"search int{bits}/int{bits + 1} emb", {"QUANT_CLIP": "search", "QUANT_BITS_ATTN": str(bits), "QUANT_BITS_MLP": str(bits), "QUANT_BITS_EMBED": str(bits + 1)}))
    return variants


def export_and_score(model, hessians, base: dict, overrides: dict, rt, tables, val_tokens, code_bytes: dict, workdir: Path) -> dict:
    trial = tg.Hyperparameters({**base, **overrides, "QUANT_FIT_TO_CAP": "0"})
    t0 = tg.sync_time(rt)
    qstate = tg.quantize_state_dict(model.state_dict(), trial, hessians)
    quant_s = tg.sync_time(rt) - t0
    old = overrides is OLD_PACKING
    code = code_bytes["raw" if old else "shipped"]
    path = workdir / "trial.pgz"
    t0 = time.perf_counter()
    report, streams, _ = tg.write_artifact(qstate, model.cfg, trial, path, code, lambda line: None)
    compress_s = time.perf_counter() - t0
    rebuilt = tg.load_model_from_artifact(path, rt.device)
    bpb = tg.evaluate_standard(rebuilt, val_tokens, tables, trial, rt).val_bpb
    return dict(artifact=report.artifact_bytes, code=code, total=report.total_bytes, bpb=bpb, quant_s=quant_s, compress_s=compress_s, streams=streams)


def interpolate(points: list[tuple[int, float]], x: int) -> float | None:
    """y at x on the polyline through (bytes, bpb) points sorted by bytes; None outside their range."""
    points = sorted(points)
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 + (y1 - y0) * (x - x0) / max(x1 - x0, 1)
    return None


def quantizer_table(rows: list[tuple[str, dict]], pre_bpb: float):
    print(f"\npre-quant bpb: {pre_bpb:.4f}\n")
    print("| variant | artifact bytes | code bytes | total bytes | roundtrip bpb | gap | quantize s | pack s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, r in rows:
        print(f"| {label} | {r['artifact']:,} | {r['code']:,} | {r['total']:,} | {r['bpb']:.4f} | {r['bpb'] - pre_bpb:+.4f} | {r['quant_s']:.1f} | {r['compress_s']:.1f} |")
    sd = [(r["artifact"], r["bpb"]) for label, r in rows if label.startswith("sdclip k")]
    search = [(label, r) for label, r in rows if label.startswith("search int")]
    if sd and search:
        print("\nAt equal bytes (SDClip bpb interpolated along the k sweep at each search point's artifact bytes):\n")
        print("| search point | bytes | search bpb | sdclip bpb at those bytes | sdclip - search |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for label, r in search:
            y = interpolate(sd, r["artifact"])
            cell = "outside the sweep" if y is None else f"{y:.4f} | {y - r['bpb']:+.4f}"
            print(f"| {label} | {r['artifact']:,} | {r['bpb']:.4f} | {cell} |" + ("" if y is not None else " |"))


def role_table(streams: list[tg.StreamReport]):
    print("\n| stream | values | bytes | bits per value | compressor | layout |")
    print("| --- | ---: | ---: | ---: | --- | --- |")
    for s in streams:
        per_value = f"{8 * s.bytes / s.numel:.3f}" if s.numel else "-"
        print(f"| {s.name} | {s.numel:,} | {s.bytes:,} | {per_value} | {s.compressor} | {s.values} |")


ROW_ORDERS = ("none", "tok_emb", "tok_emb+attn.c_q+mlp.fc", "all")  # the groups whose rows are reordered, + for the setting's commas
LAYOUTS = [f"{g},{t},{r},{v}" for g, t, r, v in itertools.product(("single", "role"), (0, 1), ROW_ORDERS, ("int8", "bitpack"))]


def packing_table(qstate, cfg, compressors: list[str], default: tg.Packing, layouts: list[str]):
    """Each layout (grouping,transpose,row order,values) with each compressor; auto derived per stream and
    checked once against a real auto run."""
    reference = tg.dequantize_state_dict(qstate)
    print("\n| grouping | transpose | row order | values | " + " | ".join(compressors) + " | auto (derived) |")
    print("| --- | --- | --- | --- | " + "---: | " * (len(compressors) + 1))
    times = {c: [0.0, 0.0, 0] for c in compressors}
    for grouping, transpose, row_order, values in (layout.split(",") for layout in layouts):
        transpose, reorder = transpose == "1", "" if row_order == "none" else row_order.replace("+", ",")
        sizes, per_stream = {}, {}
        for c in compressors:
            t0 = time.perf_counter()
            blob, streams = tg.encode_artifact(qstate, cfg, tg.Packing(c, grouping, values, transpose, reorder))
            t1 = time.perf_counter()
            _, back = tg.decode_artifact(blob[HEADER:])
            t2 = time.perf_counter()
            rebuilt = tg.dequantize_state_dict(back)
            assert all(tg.torch.equal(rebuilt[n], reference[n]) for n in reference), (grouping, transpose, row_order, values, c)
            times[c][0] += t1 - t0
            times[c][1] += t2 - t1
            times[c][2] += 1
            sizes[c], per_stream[c] = len(blob), {s.name: s.bytes for s in streams}
        auto = HEADER + sum(STREAM_HEADER + min(per_stream[c][name] for c in compressors) for name in per_stream[compressors[0]])
        layout = tg.Packing("auto", grouping, values, transpose, reorder)
        if layout == replace(default, compressor="auto") and set(compressors) == set(layout.compressors):
            real = len(tg.encode_artifact(qstate, cfg, layout)[0])
            assert real == auto, f"a real auto run gave {real} bytes, the per-stream minimum {auto}"
        best = min(sizes.values())
        cells = " | ".join(f"**{sizes[c]:,}**" if sizes[c] == best else f"{sizes[c]:,}" for c in compressors)
        print(f"| {grouping} | {int(transpose)} | {row_order} | {values} | {cells} | {auto:,} |", flush=True)
    print("\n| compressor | mean compress s | mean decompress s |")
    print("| --- | ---: | ---: |")
    for c, (comp, dec, n) in times.items():
        print(f"| {c} | {comp / n:.1f} | {dec / n:.2f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="trained weights: loaded if the file exists, else written after training")
    parser.add_argument("--tables", nargs="+", default=["quant", "roles", "packing"], choices=["quant", "roles", "packing"])
    parser.add_argument("--k-scales", type=float, nargs="+", default=[0.5, 0.75, 1.0, 1.5, 2.0], help="SDClip sweep: every role's k times these")
    parser.add_argument("--search-bits", type=int, nargs="+", default=[4, 5, 6], help="search-clip points: attention/MLP bits (embedding one more)")
    parser.add_argument("--compressors", nargs="+", default=[c for c in tg.COMPRESSORS if tg.compressor_installed(c)], choices=tg.COMPRESSORS)
    parser.add_argument("--layouts", nargs="+", default=LAYOUTS, choices=LAYOUTS, help="packing layouts: grouping,transpose,row order (none, all or groups joined by +),values")
    parser.add_argument("--variants", nargs="+", help="quantizer rows to run, by the start of their label (default: all)")
    opts = parser.parse_args()
    args = tg.Hyperparameters()
    rt = tg.setup_runtime()
    tables = tg.load_tokenizer_tables(args.tokenizer_path, args.vocab_size)
    val_tokens = tg.load_validation_tokens(args.data_path, args.vocab_size, args.val_max_tokens).to(rt.device)
    tg.torch.manual_seed(args.seed)
    model = tg.GPT(tg.ModelConfig.from_args(args), tg.select_attention_backend(args.attn_backend, rt.device)).to(rt.device)
    print(f"model_params:{tg.count_parameters(model)} val_targets:{val_tokens.numel() - 1}", flush=True)
    if opts.checkpoint and Path(opts.checkpoint).is_file():
        model.load_state_dict(tg.torch.load(opts.checkpoint, map_location=rt.device))
        print(f"loaded {opts.checkpoint}", flush=True)
    else:
        trained = tg.train_model(model, args, rt, print, lambda m: tg.evaluate_standard(m, val_tokens, tables, args, rt))
        print(f"trained: weights:{trained.exported_weights} steps:{trained.steps} train_time:{trained.train_time_ms / 1000:.1f}s", flush=True)
        if opts.checkpoint:
            tg.torch.save(model.state_dict(), opts.checkpoint)
    model.requires_grad_(False)
    hessians = tg.collect_hessians(model, tg.train_batches_for_calibration(tg.DistributedTokenLoader.for_model(args, rt, model), args, rt), rt)
    pre = tg.evaluate_standard(model, val_tokens, tables, args, rt)
    source = tg.running_source()
    code_bytes = {"raw": len(source), "shipped": len(tg.shipped_code(source, args.code_minify))}
    print(f"pre_quant val_bpb:{pre.val_bpb:.4f} code bytes: raw {code_bytes['raw']:,}, shipped {code_bytes['shipped']:,}", flush=True)
    base = settings_env(args)
    defaults = None
    with tempfile.TemporaryDirectory() as tmp:
        if "quant" in opts.tables:
            rows = []
            for label, overrides in quantizer_variants(args, opts.k_scales, opts.search_bits):
                if opts.variants and not label.startswith(tuple(opts.variants)):
                    continue
                row = export_and_score(model, hessians, base, overrides, rt, tables, val_tokens, code_bytes, Path(tmp))
                rows.append((label, row))
                print(f"done {label}: {row['artifact']:,} bytes, bpb {row['bpb']:.4f}", flush=True)
                if label == "defaults":
                    defaults = row
            quantizer_table(rows, pre.val_bpb)
        if "roles" in opts.tables:
            defaults = defaults or export_and_score(model, hessians, base, {}, rt, tables, val_tokens, code_bytes, Path(tmp))
            role_table(defaults["streams"])
    if "packing" in opts.tables:
        packing_table(tg.quantize_state_dict(model.state_dict(), args, hessians), model.cfg, opts.compressors, tg.Packing.from_args(args), opts.layouts)


if __name__ == "__main__":
    main()
