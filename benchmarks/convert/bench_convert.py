"""Conversion cost and eager overhead of convert() on a 32-layer (64-sublayer) Llama-like model.

Prints a table and writes benchmarks/results/convert-<device>-<date>.json (+ .md). Timings of the
original and converted models are interleaved in one run and reported as a ratio (the machines are
noisy; absolute numbers are for orientation only).

    python benchmarks/convert/bench_convert.py [--layers 32] [--hidden 256] [--seq 128] [--batch 4]
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import residual_rewriter as rr

RESULTS = Path(__file__).resolve().parents[1] / "results"


def llama_like(layers: int, hidden: int):
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=1024, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 8 * 8,
        num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 128),
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def interleaved_ms(fns: dict, repeats: int) -> dict:
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    model = llama_like(args.layers, args.hidden).to(args.device)
    t0 = time.perf_counter()
    report = rr.detect(model)
    detect_s = time.perf_counter() - t0
    rows = []
    x = torch.randint(0, 1024, (args.batch, args.seq), device=args.device)
    for blocks in (dict(num_blocks=8), dict(block_size=1)):
        t0 = time.perf_counter()
        converted = rr.convert(model, **blocks)
        convert_s = time.perf_counter() - t0
        with torch.no_grad():
            model(x), converted(x)  # warm-up
            ms = interleaved_ms({"original": lambda: model(x), "converted": lambda: converted(x)}, args.repeats)
        rows.append(
            {
                "blocks": "Full (S=1)" if blocks.get("block_size") == 1 else f"N={blocks['num_blocks']}",
                "sublayers": len(converted.attn_res_report.sites),
                "convert_s": round(convert_s, 3),
                "original_ms": round(ms["original"], 2),
                "converted_ms": round(ms["converted"], 2),
                "ratio": round(ms["converted"] / ms["original"], 3),
            }
        )
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu-{platform.machine()}-{torch.get_num_threads()}threads"
    result = {
        "benchmark": "convert",
        "date": datetime.date.today().isoformat(),
        "device": device_name,
        "torch": torch.__version__,
        "shape": vars(args),
        "detect_s": round(detect_s, 3),
        "rows": rows,
    }
    header = "| blocks | sublayers | convert (s) | original fwd (ms) | converted fwd (ms) | converted / original |\n|---|---|---|---|---|---|"
    lines = [header] + [
        f"| {r['blocks']} | {r['sublayers']} | {r['convert_s']} | {r['original_ms']} | {r['converted_ms']} | {r['ratio']} |" for r in rows
    ]
    table = "\n".join(lines)
    print(f"{args.layers}-layer Llama-like, hidden {args.hidden}, batch {args.batch} x {args.seq} tokens, eager forward, {device_name}")
    print(f"detect: {detect_s:.2f} s ({len(report.sites)} sites)")
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"convert-{device_name.replace(' ', '_')}-{result['date']}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(f"# convert benchmark, {result['date']}, {device_name}, torch {torch.__version__}\n\n"
                                       f"{args.layers} layers, hidden {args.hidden}, batch {args.batch} x {args.seq}\n\n{table}\n")
    return result


if __name__ == "__main__":
    main()
