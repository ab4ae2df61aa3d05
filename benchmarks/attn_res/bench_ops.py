"""Each op the compile backend runs, timed alone: phase 1 (multi-query over the completed blocks), the
fused merges (phase 2 + RMSNorm, and with the partial block's add), their backwards, and the
single-query aggregation. Where ``bench_attn_res.py`` compares our aggregation with the peers, this
one says which of OUR kernels is short of the copy bandwidth at the shapes the backend uses.

    python benchmarks/attn_res/bench_ops.py                  # CUDA: the backend benchmark's shapes
    python benchmarks/attn_res/bench_ops.py --preset target  # CUDA: the kernel benchmark's target
    python benchmarks/attn_res/bench_ops.py --smoke          # no GPU: tiny shapes, Triton interpreter

Per op: median milliseconds (CUDA events), its IDEAL traffic — the [tokens, hidden] activations it
must read and write, once each — as GB/s, and that as % of the device copy bandwidth measured in the
same run. A kernel that moves more than the ideal (re-reads, recomputation) shows a lower %.
Writes ``benchmarks/results/attn_res_ops-<preset>-<device>-<date>.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from bench_attn_res import ROOT, device_slug, versions  # noqa: E402  (sets TRITON_INTERPRET without CUDA)
from bench_timing import copy_bandwidth_gbs, time_ms  # noqa: E402

from residual_rewriter.kernels.attn_res import dispatch  # noqa: E402

EPS = 1e-6
# (tokens, hidden, completed blocks m, queries S): "backend" = bench_backend --gpu-size (4 x 2048 tokens,
# hidden 2048, blocks of 4 sublayers, a middle block); "target" = the kernel benchmark's target shape
PRESETS = {"backend": (8192, 2048, 4, 4), "target": (16384, 4096, 8, 4), "smoke": (16, 96, 2, 2)}


def op_cases(T: int, D: int, m: int, S: int, dtype, device) -> dict:
    """op name -> (callable running it once, ideal traffic in [T, D] activation passes)."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def act(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    def par(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device)

    blocks = [act(T, D) for _ in range(m)]
    Q, G = par(S, D, scale=D ** -0.5), 1 + par(S, D, scale=0.1)
    outs, lse = dispatch.phase1_cuda(blocks, Q, G, EPS)
    douts, dlse = [act(T, D) for _ in range(S)], par(S, T)
    o, l1, q, w, wo = outs[1], lse[1], Q[1], G[1], 1 + par(D, scale=0.1)
    partial, delta, dnormed, dpartial = act(T, D), act(T, D), act(T, D), act(T, D)
    sources, dy, n = blocks + [partial], act(T, D), m + 1
    scale = float(n)
    return {
        "phase1 fwd": (lambda: dispatch.phase1_cuda(blocks, Q, G, EPS), m + S),
        "phase1 bwd": (lambda: dispatch.phase1_backward_cuda(douts, dlse, blocks, Q, G, EPS, lse), 2 * m + S),
        "phase2+norm fwd": (lambda: dispatch.phase2_normed_cuda(o, l1, partial, q, w, EPS, scale, wo, EPS,
                                                                 return_mix=False), 3),
        "phase2+norm bwd": (lambda: dispatch.phase2_normed_backward_cuda(None, dnormed, o, l1, partial, q, w, EPS,
                                                                          scale, wo, EPS), 5),
        "phase2+add+norm fwd": (lambda: dispatch.phase2_add_normed_cuda(o, l1, partial, delta, q, w, EPS, scale,
                                                                         wo, EPS), 5),
        "phase2+add+norm bwd": (lambda: dispatch.phase2_add_normed_backward_cuda(dpartial, dnormed, o, l1, partial,
                                                                                  q, w, EPS, scale, wo, EPS), 6),
        f"attn_res fwd ({n} sources)": (lambda: dispatch.forward_cuda(sources, q, w, EPS, scale), n + 1),
        f"attn_res bwd ({n} sources)": (lambda: dispatch.backward_cuda(dy, sources, q, w, EPS, scale), 2 * n + 1),
    }


def markdown(results: dict) -> str:
    T, D, m, S = results["shape"]
    lines = [
        f"# AttnRes ops, {results['preset']}: {T} tokens, hidden {D}, {m} completed blocks, {S} queries, "
        f"{results['dtype']} ({results['device']}, {results['date']})",
        "",
        f"Copy bandwidth measured in the same run: {results['copy_gbs']:.0f} GB/s. Ideal traffic: the activations "
        "each op must read and write once.",
        "",
        "| op | ms | ideal passes | GB/s | % copy |",
        "|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        lines.append(f"| {r['op']} | {r['ms']:.3f} | {r['passes']} | {r['gbs']:.0f} | {r['pct_copy']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None, help="shapes (default: backend on CUDA)")
    ap.add_argument("--smoke", action="store_true", help="tiny interpreter-sized run (the default without CUDA)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    smoke = args.smoke or device.type != "cuda"
    preset = "smoke" if smoke else (args.preset or "backend")
    T, D, m, S = PRESETS[preset]
    dtype = torch.float32 if smoke else getattr(torch, args.dtype)  # the interpreter: fp32 only
    copy_gbs = copy_bandwidth_gbs(device, nbytes=(64 << 20) if smoke else (2 << 30))
    results = {"preset": preset, "shape": [T, D, m, S], "dtype": str(dtype).replace("torch.", ""),
               "device": device_slug(device), "date": _dt.date.today().isoformat(), "copy_gbs": copy_gbs,
               "smoke": smoke, "versions": versions(), "rows": []}
    pass_bytes = T * D * dtype.itemsize
    for name, (fn, passes) in op_cases(T, D, m, S, dtype, device).items():
        ms = time_ms(fn, device, warmup=1 if smoke else 3, reps=2 if smoke else args.reps)
        gbs = passes * pass_bytes / (ms * 1e-3) / 1e9
        results["rows"].append({"op": name, "ms": ms, "passes": passes, "gbs": gbs, "pct_copy": 100 * gbs / copy_gbs})
        print(f"{name:28} {ms:9.3f} ms  {passes:3d} passes  {gbs:8.0f} GB/s  {100 * gbs / copy_gbs:6.1f}% of copy",
              flush=True)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"attn_res_ops-{preset}-{results['device']}-{results['date']}"
    Path(f"{stem}.json").write_text(json.dumps(results, indent=1))
    Path(f"{stem}.md").write_text(markdown(results))
    print(f"wrote {stem}.json and .md")
    return results


if __name__ == "__main__":
    main()
