"""Issue 13's open question, on a GPU in a few minutes: how fast are the schedule's kernels, and what
training-step and no_grad-forward ratios do they give at the H100 backend benchmark's configuration?

    python benchmarks/backend/project_floor.py            # CUDA: T=8192, hidden 2048, bf16, m = 2..8
    python benchmarks/backend/project_floor.py --smoke    # no GPU: tiny shapes, Triton interpreter

1. The unit: the device's copy bandwidth.
2. Each op the backend emits, timed alone (median, CUDA events), as % of copy bandwidth for its IDEAL
   traffic (its [tokens, hidden] reads and writes, once each): phase 1 with the block's first merge
   and the previous block's last add in it, forward and backward (every source's other gradients
   accumulated), for m = 2..8 completed blocks (S queries), its backward with d q'
   reduced through the fp32 slab instead of registers at m = 2 and 8 (an A/B of that choice), plain
   phase 1 at m = 8, the merges with and without the partial's add, forward and
   backward, the first block's unbatched two-source aggregation, a stream add, and the partial's add
   done by the output GEMM (``add_linear_``) against ``linear`` + add.
3. The projection: the graphs the backend emits for the benchmark's model (training, and under
   no_grad), every op node priced by its measured time (phase 1 by its m; other query counts scaled
   by ideal passes), stream adds and the gradient sums that ``fold_grad_sums`` leaves (k + 1 passes
   at copy bandwidth; the backward ops are timed with every source's other gradients accumulated),
   minus the original's 4 + 4 passes per sublayer at copy bandwidth (its fused add + RMSNorm, an
   optimistic price: the projection errs high). Divided by the original's measured times (H100,
   session 2, unless given): the ratio the converted model would have if only these ops changed.
4. Inductor's ``mix_order_reduction`` on this torch: off, the original's norm backward pays about
   two more passes per sublayer, which lowers every training ratio here.

Writes ``project_floor-<device>-<date>.json`` and ``.md`` to --out.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import sys
from collections import Counter
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "attn_res"), str(HERE.parent)]
from bench_attn_res import ROOT, device_slug, versions  # noqa: E402  (sets TRITON_INTERPRET without CUDA)
from bench_timing import copy_bandwidth_gbs, time_ms  # noqa: E402

import traffic_model as TM  # noqa: E402
from residual_rewriter.kernels.attn_res import dispatch  # noqa: E402
from residual_rewriter.passes.lowering.common import ADDS, library_op, value  # noqa: E402
from residual_rewriter.passes.op_names import op_name  # noqa: E402

EPS = 1e-6
SIZES = {"gpu": dict(T=8192, D=2048, ms=range(2, 9), S=4), "smoke": dict(T=16, D=96, ms=range(2, 4), S=2)}


def measure(T: int, D: int, ms, S: int, dtype, device, reps: int) -> dict:
    """{op key: (median ms, ideal passes)} for every op the projection prices."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def act(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    def par(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device)

    def timed(fn):
        return time_ms(fn, device, warmup=1 if device.type != "cuda" else 3, reps=reps)

    out = {}
    Q, G, wo = par(S, D, scale=D ** -0.5), 1 + par(S, D, scale=0.1), 1 + par(D, scale=0.1)
    for m in ms:  # what the backend emits for every batched block: phase 1 with its first merge in it
        blocks = [act(T, D) for _ in range(m)]
        normed0, outs, lse, _ = dispatch.phase1_normed_cuda(blocks, Q, G, EPS, float(m), wo, EPS)
        douts, dlse = [act(T, D) for _ in range(S)], par(S, T)
        # ... and the previous block's last add (fuse_block_end): m - 1 blocks + (p, f) -> b, the m-th
        end = (act(T, D), act(T, D))
        out[f"phase1+norm fwd m={m}"] = (timed(lambda: dispatch.phase1_normed_cuda(
            blocks[:-1], Q, G, EPS, float(m), wo, EPS, block_end=end)), m + 2 + S)
        # backward ops as fold_grad_sums leaves them: every source's other gradients accumulated (all but
        # the last block's phase 1 do): m reads more
        accs = [act(T, D) for _ in range(m)]
        out[f"phase1+norm bwd m={m}"] = (timed(lambda: dispatch.phase1_normed_backward_cuda(
            douts[0], douts[1:], dlse, blocks, Q, G, EPS, float(m), wo, EPS, lse, accs)), 3 * m + S)
    # d q' reduced through the per-program slab instead of registers (the fallback for wide rows), A/B
    with _register_dq(0):
        for m in (min(ms), max(ms)):
            blocks = [act(T, D) for _ in range(m)]
            normed0, outs, lse, _ = dispatch.phase1_normed_cuda(blocks, Q, G, EPS, float(m), wo, EPS)
            accs = [act(T, D) for _ in range(m)]
            out[f"phase1+norm bwd, dq' slab, m={m}"] = (timed(lambda: dispatch.phase1_normed_backward_cuda(
                douts[0], douts[1:], dlse, blocks, Q, G, EPS, float(m), wo, EPS, lse, accs)), 3 * m + S)
    m = max(ms)  # plain phase 1 at the largest m, for comparison (the backend emits it only without a head)
    blocks = [act(T, D) for _ in range(m)]
    outs, lse = dispatch.phase1_cuda(blocks, Q, G, EPS)
    out[f"phase1 fwd m={m}"] = (timed(lambda: dispatch.phase1_cuda(blocks, Q, G, EPS)), m + S)
    accs = [act(T, D) for _ in range(m)]
    out[f"phase1 bwd m={m}"] = (timed(lambda: dispatch.phase1_backward_cuda(douts, dlse, blocks, Q, G, EPS, lse, accs)),
                                3 * m + S)
    o, l1, q, w = act(T, D), par(T), Q[0], G[0]
    p, f, dn, dp = act(T, D), act(T, D), act(T, D), act(T, D)
    out["merge fwd"] = (timed(lambda: dispatch.phase2_normed_cuda(o, l1, p, q, w, EPS, 3.0, wo, EPS,
                                                                  return_mix=False)), 3)
    out["merge bwd"] = (timed(lambda: dispatch.phase2_normed_backward_cuda(None, dn, o, l1, p, q, w, EPS, 3.0, wo,
                                                                           EPS, dp)), 6)  # + the partial's other grad
    out["merge+add fwd"] = (timed(lambda: dispatch.phase2_add_normed_cuda(o, l1, p, f, q, w, EPS, 3.0, wo, EPS)), 5)
    out["merge+add bwd"] = (timed(lambda: dispatch.phase2_add_normed_backward_cuda(dp, dn, o, l1, p, q, w, EPS, 3.0,
                                                                                   wo, EPS)), 6)
    # the first block's aggregations, unbatched: b_0 and the partial -> the normed form
    out["normed fwd (2 sources)"] = (timed(lambda: dispatch.normed_cuda([o, p], q, w, EPS, 2.0, wo, EPS,
                                                                        return_mix=False)), 3)
    out["normed bwd (2 sources)"] = (timed(lambda: dispatch.normed_backward_cuda(None, dn, [o, p], q, w, EPS, 2.0, wo,
                                                                                 EPS, [dp, dn])), 7)
    out["stream add"] = (timed(lambda: torch.add(p, f)), 3)
    x, W = act(T, D), act(D, D) / D ** 0.5
    acc = p.clone()
    linear_ms = timed(lambda: torch.nn.functional.linear(x, W))
    out["linear + add"] = (timed(lambda: torch.nn.functional.linear(x, W) + p) - linear_ms, 3)
    out["add_linear_"] = (timed(lambda: torch.ops.residual_rewriter.add_linear_(acc, x, W)) - linear_ms, 1)
    return out


@contextlib.contextmanager
def _register_dq(elements: int):
    from residual_rewriter.kernels.attn_res import two_phase

    old, two_phase.REGISTER_DQ_ELEMENTS = two_phase.REGISTER_DQ_ELEMENTS, elements
    try:
        yield
    finally:
        two_phase.REGISTER_DQ_ELEMENTS = old


def _phase1_ms(times: dict, op: str, kind: str, m: int, S: int, end: bool) -> float:
    """Phase 1 (``op``: "phase1" or "phase1+norm") of m sources (``end``: the last one the previous
    block's add, done in phase 1) and S queries: the measurement at the nearest m, scaled by ideal
    passes (S and m differ from the measured ones). Backward as timed: every source's gradient
    accumulated (the last block's phase 1 accumulates none: errs high)."""
    ms_at = sorted(int(k.split("m=")[1]) for k in times if k.startswith(f"{op} {kind} m="))  # not the A/B rows
    m_key = min(ms_at, key=lambda x: abs(x - m))
    t, passes = times[f"{op} {kind} m={m_key}"]
    return t * ((m + S + 2 * end) if kind == "fwd" else (3 * m + S)) / passes


def graph_ms(graph, shape, times: dict, pass_ms: float, grad: bool) -> tuple[float, float, Counter]:
    """(forward ms, backward ms — 0 without ``grad`` —, what was priced) of the AttnRes work in one
    emitted graph."""
    fwd = bwd = 0.0
    priced = Counter()
    readers = {}
    for n in graph.nodes:
        if n.op != "call_function":
            continue
        name = library_op(n)
        if name:
            short = name.split("::")[1]
            priced[short] += 1
            if short in ("attn_res_phase1", "attn_res_phase1_normed"):
                end = n.kwargs.get("end_partial") is not None
                m, S = len(n.args[0]) + end, int(value(n.args[1]).shape[0])
                op = "phase1+norm" if short.endswith("normed") else "phase1"
                fwd += _phase1_ms(times, op, "fwd", m, S, end)
                bwd += _phase1_ms(times, op, "bwd", m, S, end)
            elif short == "attn_res_phase2_add_normed":
                fwd, bwd = fwd + times["merge+add fwd"][0], bwd + times["merge+add bwd"][0]
            elif short == "attn_res_phase2_normed":
                has_p = n.args[2] is not None  # without a partial: 2 of the 3 forward and 3 of the 6 backward passes
                fwd += times["merge fwd"][0] * (1 if has_p else 2 / 3)
                bwd += times["merge bwd"][0] * (1 if has_p else 3 / 6)
            elif short == "attn_res_normed" and len(n.args[0]) == 2:
                fwd, bwd = fwd + times["normed fwd (2 sources)"][0], bwd + times["normed bwd (2 sources)"][0]
            else:  # an op not timed here (e.g. Full AttnRes's many-source aggregations): its ideal passes
                f, b = TM.op_passes(n)
                fwd, bwd = fwd + f * pass_ms, bwd + b * pass_ms
        elif op_name(n) == "residual_rewriter::add_linear_":
            priced["add_linear_"] += 1
            fwd += times["add_linear_"][0]
        elif n.target in ADDS and TM._is_stream(n, shape):
            priced["stream add"] += 1
            fwd += times["stream add"][0]
        else:
            continue
        for a in n.all_input_nodes:
            if TM._is_stream(a, shape):
                readers.setdefault(a, []).append(n)
    if not grad:
        return fwd, 0.0, priced
    # the sums fold_grad_sums leaves (the folded gradients' reads are in the timed backward kernels)
    grad_sums = sum(TM.folds(r, t)[0] for t, r in readers.items())
    priced["gradient-sum passes"] = grad_sums
    return fwd, bwd + grad_sums * pass_ms, priced


def mix_order_reduction():
    try:
        import torch._inductor.config as ic

        return getattr(ic.triton, "mix_order_reduction", "absent in this torch")
    except Exception as e:  # pragma: no cover - reported, not fatal
        return f"unreadable: {e}"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes under the interpreter (the default without CUDA)")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--num-blocks", type=int, default=8)
    ap.add_argument("--original-fwd-ms", type=float, default=29.51, help="original + inductor no_grad forward (H100, session 2)")
    ap.add_argument("--original-train-ms", type=float, default=91.32, help="original + inductor training step (H100, session 2)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    smoke = args.smoke or device.type != "cuda"
    size = SIZES["smoke" if smoke else "gpu"]
    T, D, S = size["T"], size["D"], size["S"]
    dtype = torch.float32 if smoke else torch.bfloat16  # the interpreter: fp32 only
    copy_gbs = copy_bandwidth_gbs(device, nbytes=(64 << 20) if smoke else (2 << 30))
    pass_ms = T * D * dtype.itemsize / (copy_gbs * 1e9) * 1e3
    print(f"{device_slug(device)}: copy {copy_gbs:.0f} GB/s; one pass over [{T}, {D}] {dtype} = {pass_ms * 1e3:.1f} us")
    print(f"inductor mix_order_reduction: {mix_order_reduction()}\n")
    times = measure(T, D, size["ms"], S, dtype, device, 2 if smoke else args.reps)
    rows = []
    for name, (ms, passes) in times.items():
        pct = 100 * passes * pass_ms / ms if ms > 0 else float("nan")
        rows.append({"op": name, "ms": ms, "passes": passes, "pct_copy": pct})
        print(f"{name:18} {ms:8.3f} ms  {passes:3d} passes  {pct:6.1f}% of copy")

    sites = None
    projection = {}
    for mode, grad in (("training", True), ("no_grad forward", False)):
        graph, shape, sites = TM.graphs_of(args.layers, args.num_blocks, {}, grad=grad)
        fwd, bwd, priced = graph_ms(graph, shape, times, pass_ms, grad)
        original = (4 * sites + (4 * sites if grad else 0)) * pass_ms
        added = fwd + bwd - original
        base = args.original_train_ms if grad else args.original_fwd_ms
        projection[mode] = {"attnres_ms": fwd + bwd, "original_attnres_part_ms": original,
                            "added_ms": added, "original_ms": base, "ratio": (base + added) / base,
                            "priced": dict(priced)}
        print(f"\n{mode}: AttnRes ops {fwd + bwd:.3f} ms, the original's adds + norms "
              f"{original:.3f} ms at copy bandwidth -> +{added:.3f} ms on {base} ms = {(base + added) / base:.4f}x")
        print("  priced: " + ", ".join(f"{k} {v}" for k, v in sorted(priced.items())))
    if smoke:
        print("\n(smoke: interpreter times, shapes and the original's ms are not comparable; only the plumbing is tested)")
    results = {"device": device_slug(device), "date": _dt.date.today().isoformat(), "smoke": smoke,
               "shape": {"T": T, "D": D, "S": S, "dtype": str(dtype).replace("torch.", "")},
               "model": {"layers": args.layers, "num_blocks": args.num_blocks, "sublayers": sites},
               "copy_gbs": copy_gbs, "pass_ms": pass_ms, "mix_order_reduction": str(mix_order_reduction()),
               "ops": rows, "projection": projection, "versions": versions()}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"project_floor-{'smoke-' if smoke else ''}{results['device']}-{results['date']}"
    Path(f"{stem}.json").write_text(json.dumps(results, indent=1))
    md = [f"# Projected ratios from timed ops ({results['device']}, {results['date']})", "",
          f"Copy {copy_gbs:.0f} GB/s; [{T}, {D}] {results['shape']['dtype']}; mix_order_reduction: "
          f"{results['mix_order_reduction']}", "", "| op | ms | ideal passes | % copy |", "|---|---|---|---|"]
    md += [f"| {r['op']} | {r['ms']:.3f} | {r['passes']} | {r['pct_copy']:.1f} |" for r in rows]
    md += ["", "| mode | added ms | original ms | projected ratio |", "|---|---|---|---|"]
    md += [f"| {k} | {v['added_ms']:.3f} | {v['original_ms']} | {v['ratio']:.4f} |" for k, v in projection.items()]
    Path(f"{stem}.md").write_text("\n".join(md) + "\n")
    print(f"wrote {stem}.json and .md")
    return results


if __name__ == "__main__":
    main()
