"""Benchmark of the AttnRes aggregation: ours vs the eager reference vs the torch.compile'd reference
vs the peers that install (liger-kernel, fla-core, flash-attn-res, fast-attnres).

    python benchmarks/attn_res/bench_attn_res.py                 # CUDA: the paper's grid, bf16
    python benchmarks/attn_res/bench_attn_res.py --grid target   # CUDA: H100 target shape only
    python benchmarks/attn_res/bench_attn_res.py --smoke         # no GPU: tiny size, Triton interpreter

Reports per (implementation, shape, mode): milliseconds (median over CUDA-event-timed runs), GB/s of
the IDEAL traffic and that as % of the device copy bandwidth measured in the same run (a plain
``dst.copy_(src)`` of 2 GiB). Ideal traffic: forward reads n sources and writes 1 output
((n + 1) T D bytes*); forward+backward adds reading n sources + dy and writing n gradients
((3n + 2) T D in all). A kernel that reads more than that (ours: the backward re-reads the sources
once) shows it as a lower %. Each implementation is first checked against the float64 reference on
the first shape; a wrong result is reported as such and not timed. A peer that fails to import or
run is recorded with its error, never dropped. Peers that need stacked sources get the stack built
OUTSIDE the timed region (favouring them).

Writes ``benchmarks/results/attn_res-<grid>-<device>-<date>.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import re
import signal
import sys
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]

if not torch.cuda.is_available():
    # No GPU: the Triton kernels can only run through the interpreter, which triton reads at import.
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("no CUDA and triton already imported without TRITON_INTERPRET=1")
    os.environ["TRITON_INTERPRET"] = "1"

sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_timing import copy_bandwidth_gbs, time_ms  # noqa: E402
from residual_rewriter.kernels.attn_res import attn_res_reference, attn_res_triton  # noqa: E402
from residual_rewriter.kernels.attn_res.reference import attn_res_backward_reference  # noqa: E402

EPS = 1e-6
PAPER_GRID = [  # (tokens, hidden, sources): bf16, hidden 1024-7168, 8k-32k tokens, 2-16 sources
    (T, D, n) for D in (1024, 2048, 4096, 7168) for T in (8192, 16384, 32768) for n in (2, 4, 9, 16)
]
GRIDS = {
    "paper": PAPER_GRID,
    "target": [(16384, 4096, 9)],  # the H100 target: >= 85% of copy bandwidth, forward
    "quick": [(16384, 4096, 9), (8192, 1024, 2), (32768, 7168, 16)],
    "smoke": [(64, 96, 3)],
}


# ---- implementations: name -> make(sources, query, weight) -> forward callable -----------------
# Every forward callable returns the [T, D] mixture; forward+backward runs .backward(dy) on it.


def _ours(sources, query, weight):
    return lambda: attn_res_triton(sources, query, weight, EPS, 1.0)


def _ours_op(sources, query, weight):
    op = torch.ops.residual_rewriter.attn_res
    return lambda: op(sources, query, weight, EPS, 1.0)


def _eager(sources, query, weight):
    return lambda: attn_res_reference(sources, query, weight, EPS, 1.0)


def _compiled(sources, query, weight):
    fn = torch.compile(attn_res_reference, dynamic=False)
    return lambda: fn(sources, query, weight, EPS, 1.0)


def _liger(sources, query, weight):
    from liger_kernel.transformers.functional import liger_attn_res

    V = torch.stack([s.detach() for s in sources]).requires_grad_(sources[0].requires_grad)  # [N, T, D]
    return lambda: liger_attn_res(V, query, weight, EPS)


def _fla(sources, query, weight):
    from fla.ops.attnres import fused_attnres

    return lambda: fused_attnres(query, sources, weight, None, EPS, 1.0)


def _fast_attnres(sources, query, weight):
    import attnres

    # no key-norm gain in its API: benchmarked with the gain folded into the query (same math); its
    # query must be bf16 (its own check)
    qg = (query * weight).detach().to(sources[0].dtype).requires_grad_(query.requires_grad)
    return lambda: attnres.attnres(list(sources), qg, eps=EPS, scale=1.0)


def _flash_attn_res(sources, query, weight):
    """The two-phase schedule for ONE query: phase 1 over n-1 stacked sources, phase 2 merges the last."""
    from flash_attn_res.ops.phase_1 import phase_1_batched_attention_triton_op
    from flash_attn_res.ops.phase_2 import phase_2_online_softmax_merge_triton_op

    if len(sources) < 2:
        raise ValueError("needs >= 2 sources")
    blocks = torch.stack([s.detach() for s in sources[:-1]])[:, None]  # [m, B=1, T, D]
    blocks.requires_grad_(sources[0].requires_grad)
    qg = (query * weight).detach()[None].requires_grad_(query.requires_grad)  # [1, D]
    last = sources[-1][None]  # [B=1, T, D]

    def run():
        out, lse = phase_1_batched_attention_triton_op(blocks, qg, EPS)
        return phase_2_online_softmax_merge_triton_op(last, qg[0], out[0], lse[0], EPS)[0]

    return run


def _with_elements_per_thread(make, ept):
    """``make`` carrying a launch knob: ``knobs`` applies it around a whole check or timed point, so
    the forward and the backward launches both use ``_launch.ELEMENTS_PER_THREAD = ept``."""
    def make_ept(sources, query, weight):
        return make(sources, query, weight)

    make_ept.elements_per_thread = ept
    return make_ept


def knobs(make):
    """The launch knobs an implementation carries, applied for the whole of one check or timed point."""
    from residual_rewriter.kernels.attn_res._launch import elements_per_thread

    return elements_per_thread(getattr(make, "elements_per_thread", None))


IMPLS = {
    "ours (attn_res_triton)": _ours,
    "ours (library op)": _ours_op,
    "eager reference": _eager,
    "torch.compile reference": _compiled,
    "liger-kernel": _liger,
    "fla-core": _fla,
    "fast-attnres": _fast_attnres,
    "flash-attn-res (two-phase)": _flash_attn_res,
}
CUDA_ONLY = {"torch.compile reference", "liger-kernel", "fla-core", "fast-attnres", "flash-attn-res (two-phase)"}


# ---- timing ------------------------------------------------------------------------------------


@contextlib.contextmanager
def time_limit(seconds: int):
    """Raise TimeoutError in this (main) thread after ``seconds`` (0: no limit). It interrupts Python
    code, e.g. a peer's autotuning loop, between kernel launches."""
    if not seconds:
        yield
        return

    def _raise(signum, frame):
        raise TimeoutError(f"took longer than {seconds} s (autotuning, compiling or a hang)")

    old = signal.signal(signal.SIGALRM, _raise)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def error_status(e: Exception) -> str:
    msg = str(e).splitlines()[0][:200] if str(e) else ""
    return f"error: {type(e).__name__}: {msg}"


# ---- one benchmark point -----------------------------------------------------------------------


def make_inputs(T, D, n, dtype, device, requires_grad, seed=0):
    """Random (never zero) inputs drawn on the device itself: a CPU draw of GBs would dominate the run."""
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=device)

    sources = [(randn(T, D) * 2 + 0.5).to(dtype).requires_grad_(requires_grad) for _ in range(n)]
    query = (randn(D) * 0.1).requires_grad_(requires_grad)
    weight = (1 + 0.1 * randn(D)).requires_grad_(requires_grad)
    return sources, query, weight


def check_against_reference(make, T, D, n, dtype, device):
    """Relative error (max abs / max abs of the float64 reference) of the output and the source grads."""
    sources, query, weight = make_inputs(min(T, 1024), D, n, dtype, device, True, seed=1)
    out = make(sources, query, weight)()
    dy = torch.randn_like(out)
    out.backward(dy)
    s64 = [s.detach().double() for s in sources]
    ref = attn_res_reference(s64, query.detach().double(), weight.detach().double(), EPS, 1.0)
    gs, _, _ = attn_res_backward_reference(dy.double(), s64, query.detach().double(), weight.detach().double(), EPS, 1.0)

    def rel(a, b):
        return ((a.double() - b).abs().max() / b.abs().max()).item()

    grads = [rel(s.grad, g) for s, g in zip(sources, gs) if s.grad is not None]
    return rel(out.detach(), ref), (max(grads) if grads else None)


def _time_one(make, T, D, n, dtype, device, mode) -> float:
    sources, query, weight = make_inputs(T, D, n, dtype, device, mode == "fwd+bwd")
    fwd = make(sources, query, weight)
    if mode == "fwd":
        with torch.no_grad():
            return time_ms(fwd, device)
    dy = torch.randn(T, D, dtype=dtype, device=device)

    def step():
        for t in sources + [query, weight]:
            t.grad = None
        fwd().backward(dy)

    return time_ms(step, device)


def bench_point(name, make, T, D, n, dtype, device, mode, copy_gbs, timeout_s=0):
    elt = torch.finfo(dtype).bits // 8
    ideal = (n + 1) * T * D * elt if mode == "fwd" else (3 * n + 2) * T * D * elt
    row = {"impl": name, "tokens": T, "hidden": D, "sources": n, "dtype": str(dtype).replace("torch.", ""), "mode": mode}
    try:
        with time_limit(timeout_s):
            with knobs(make):
                ms = _time_one(make, T, D, n, dtype, device, mode)
        gbs = ideal / (ms * 1e-3) / 1e9
        row.update(status="ok", ms=round(ms, 4), gbs=round(gbs, 1), pct_copy=round(100 * gbs / copy_gbs, 1) if copy_gbs else None)
    except Exception as e:  # a peer that cannot run a shape is REPORTED, not dropped
        row.update(status=error_status(e))
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


# ---- driver ------------------------------------------------------------------------------------


def device_slug(device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = "cpu-interpret"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod, dist in (("triton", "triton"), ("liger_kernel", "liger-kernel"), ("fla", "fla-core"),
                      ("flash_attn_res", "flash-attn-res"), ("attnres", "fast-attnres")):
        try:
            from importlib.metadata import version

            out[dist] = version(dist)
        except Exception:
            out[dist] = None
    return out


def markdown(results: dict) -> str:
    lines = [
        f"# AttnRes aggregation benchmark: {results['device']}, grid {results['grid']} ({results['date']})",
        "",
        f"Copy bandwidth measured in this run: {results['copy_gbs']:.0f} GB/s. GB/s = ideal traffic / time "
        f"(fwd: (n+1)·T·D·bytes; fwd+bwd: (3n+2)·T·D·bytes). Versions: "
        + ", ".join(f"{k} {v}" for k, v in results["versions"].items() if v),
        "",
        "## Correctness at the first shape (relative error vs float64 reference)",
        "",
        "| impl | out | grad sources | status |",
        "|---|---|---|---|",
    ]
    for name, c in results["checks"].items():
        fmt = lambda x: "-" if x is None else f"{x:.2e}"  # noqa: E731
        lines.append(f"| {name} | {fmt(c.get('out'))} | {fmt(c.get('grad'))} | {c['status']} |")
    lines += ["", "## Timings", "", "| mode | T | D | n | impl | ms | GB/s | % copy | status |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(
            f"| {r['mode']} | {r['tokens']} | {r['hidden']} | {r['sources']} | {r['impl']} | "
            f"{r.get('ms', '-')} | {r.get('gbs', '-')} | {r.get('pct_copy', '-')} | {r['status']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--grid", choices=sorted(GRIDS), default=None, help="shape grid (default: paper on CUDA, smoke on CPU)")
    ap.add_argument("--smoke", action="store_true", help="tiny interpreter-sized run (the default without CUDA)")
    ap.add_argument("--modes", default="fwd,fwd+bwd")
    ap.add_argument("--impls", default="all", help="comma-separated substrings of implementation names")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--sweep-elements-per-thread", default="",
                    help="also time our kernel with these ELEMENTS_PER_THREAD values (comma-separated, e.g. 16)")
    ap.add_argument("--point-timeout", type=int, default=90,
                    help="seconds one check or timed point may take (a peer's autotuning or a hang) before it is reported as such")
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    smoke = args.smoke or device.type != "cuda"
    grid_name = "smoke" if smoke else (args.grid or "paper")
    grid = GRIDS[grid_name]
    dtype = getattr(torch, args.dtype)
    impls = {k: v for k, v in IMPLS.items() if args.impls == "all" or any(s in k for s in args.impls.split(","))}
    for ept in (int(x) for x in args.sweep_elements_per_thread.split(",") if x):
        # our kernel again with another launch configuration, timed side by side in this run
        impls[f"ours (attn_res_triton, {ept} elements/thread)"] = _with_elements_per_thread(_ours, ept)
    copy_gbs = copy_bandwidth_gbs(device, nbytes=(64 << 20) if smoke else (2 << 30))

    date = _dt.date.today().isoformat()
    results = {
        "device": device_slug(device),
        "date": date,
        "copy_gbs": copy_gbs,
        "smoke": smoke,
        "grid": grid_name,
        "versions": versions(),
        "checks": {},
        "rows": [],
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"attn_res-{grid_name}-{results['device']}-{date}"

    def save():  # after every point: a run stopped midway still leaves what it measured
        Path(f"{stem}.json").write_text(json.dumps(results, indent=1))
        Path(f"{stem}.md").write_text(markdown(results))

    checks = results["checks"]
    for name, make in list(impls.items()):
        if device.type != "cuda" and name in CUDA_ONLY:
            checks[name] = {"status": "skipped: needs CUDA"}
            del impls[name]
            continue
        T, D, n = grid[0]
        try:
            with time_limit(args.point_timeout):
                with knobs(make):
                    out_err, grad_err = check_against_reference(make, T, D, n, dtype, device)
            tol = 5e-2 if dtype in (torch.bfloat16, torch.float16) else 1e-4
            ok = out_err <= tol and (grad_err is None or grad_err <= tol)
            checks[name] = {"status": "ok" if ok else "WRONG RESULT (not timed)", "out": out_err, "grad": grad_err}
            if not ok:
                del impls[name]
        except Exception as e:
            checks[name] = {"status": error_status(e)}
            if os.environ.get("BENCH_DEBUG"):
                traceback.print_exc()
            del impls[name]
        print(f"check {name}: {checks[name]}", flush=True)
        save()

    for mode in args.modes.split(","):
        for T, D, n in grid:
            for name, make in impls.items():
                row = bench_point(name, make, T, D, n, dtype, device, mode, copy_gbs, args.point_timeout)
                results["rows"].append(row)
                print(json.dumps(row), flush=True)
                save()
    print(f"wrote {stem}.json and {stem}.md")
    return results

if __name__ == "__main__":
    main()
