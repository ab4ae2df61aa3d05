"""Registers, spills and barriers of every AttnRes kernel launch, per launch configuration — no GPU.

The library ops' CUDA entry points (``dispatch.py``) are called with CPU tensors of the benchmark's
shapes while every kernel's ``kernel[grid](...)`` is captured instead of launched; each captured
launch is then compiled for sm_90 exactly as the JIT would (``kernels/attn_res/resources.py``) and
its cubin read. Registers decide how many programs share an SM, which for memory-bound kernels
decides how much latency is hidden: read this table before spending GPU time.

    python benchmarks/attn_res/kernel_resources.py                       # both shapes, 8 and 16 elements/thread
    python benchmarks/attn_res/kernel_resources.py --elements-per-thread 8 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
from contextlib import contextmanager

if os.environ.get("TRITON_INTERPRET") == "1":  # the JIT binder is needed, not the interpreter
    raise SystemExit("unset TRITON_INTERPRET: this tool compiles the kernels for sm_90")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402

from residual_rewriter.kernels.attn_res import _launch as L  # noqa: E402
from residual_rewriter.kernels.attn_res import dispatch, fused, resources, two_phase  # noqa: E402

KERNELS = {fused: ("_fwd_kernel", "_bwd_kernel"),
           two_phase: ("_phase1_fwd_kernel", "_phase1_bwd_kernel", "_phase2_fwd_kernel", "_phase2_bwd_kernel")}

# (name, tokens, hidden, sources of the single-query ops, completed blocks and queries of phase 1)
SHAPES = {
    "target": (1024, 4096, 9, 8, 4),  # the kernel benchmark's target shape (tokens only set tiles)
    "backend": (1024, 2048, 5, 4, 4),  # bench_backend --gpu-size: hidden 2048, 8 blocks of 4 sublayers
    "paper-max": (1024, 7168, 16, 15, 4),
}


@contextmanager
def captured_launches():
    """Replace every kernel by a recorder; allow CPU tensors through the device check."""
    log, saved = [], []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kw: log.append((self.kernel, args, kw))

    for mod, names in KERNELS.items():
        for n in names:
            saved.append((mod, n, getattr(mod, n)))
            setattr(mod, n, Recorder(getattr(mod, n)))
    saved.append((L, "check_device", L.check_device))
    L.check_device = lambda tensors, what: None
    try:
        yield log
    finally:
        for mod, n, obj in saved:
            setattr(mod, n, obj)


def launches_of(T, D, n, m, S, dtype=torch.bfloat16):
    """{op: [(kernel, args, kwargs)]} of one call of each CUDA entry point at this shape."""
    def e(*shape, dt=dtype):
        return torch.empty(*shape, dtype=dt)

    srcs, q, w = [e(T, D) for _ in range(n)], e(D, dt=torch.float32), e(D, dt=torch.float32)
    blocks, Q, G = [e(T, D) for _ in range(m)], e(S, D, dt=torch.float32), e(S, D, dt=torch.float32)
    o1, l1, part, dy = e(T, D), e(T, dt=torch.float32), e(T, D), e(T, D)
    ops = {
        "attn_res fwd": lambda: dispatch.forward_cuda(srcs, q, w, 1e-6, float(n)),
        "attn_res bwd": lambda: dispatch.backward_cuda(dy, srcs, q, w, 1e-6, float(n)),
        "phase1 fwd": lambda: dispatch.phase1_cuda(blocks, Q, G, 1e-6),
        # the backward ops as the backend emits them (fold_grad_sums): every source's gradient from its
        # other readers accumulated in the kernel (the most any launch reads)
        "phase1 bwd": lambda: dispatch.phase1_backward_cuda(
            [e(T, D) for _ in range(S)], e(S, T, dt=torch.float32), blocks, Q, G, 1e-6, e(S, T, dt=torch.float32),
            [e(T, D) for _ in range(m)]),
        # with the block's first merge fused in (what the backend emits for every block but the first)
        # ... and with the previous block's last add in it (fuse_block_end): m - 1 blocks + p + f
        "phase1+norm fwd": lambda: dispatch.phase1_normed_cuda(blocks[:-1], Q, G, 1e-6, float(m), w, 1e-5,
                                                               block_end=(e(T, D), e(T, D))),
        "phase1+norm bwd": lambda: dispatch.phase1_normed_backward_cuda(
            e(T, D), [e(T, D) for _ in range(S - 1)], e(S, T, dt=torch.float32), blocks, Q, G, 1e-6, float(m), w,
            1e-5, e(S, T, dt=torch.float32), [e(T, D) for _ in range(m)]),
        # as the compile backend calls them: only the normed form is read (return_mix=False)
        "phase2+norm fwd": lambda: dispatch.phase2_normed_cuda(o1, l1, part, q, w, 1e-6, float(m + 1), w, 1e-5,
                                                                return_mix=False),
        "phase2+norm bwd": lambda: dispatch.phase2_normed_backward_cuda(
            None, dy, o1, l1, part, q, w, 1e-6, float(m + 1), w, 1e-5, e(T, D)),
        # and with the partial block's update fused in (a block's third sublayer on)
        "phase2+add+norm fwd": lambda: dispatch.phase2_add_normed_cuda(
            o1, l1, part, dy, q, w, 1e-6, float(m + 1), w, 1e-5),
        "phase2+add+norm bwd": lambda: dispatch.phase2_add_normed_backward_cuda(
            dy, dy, o1, l1, part, q, w, 1e-6, float(m + 1), w, 1e-5),
    }
    out = {}
    for name, call in ops.items():
        with captured_launches() as log:
            call()
        out[name] = list(log)
    return out


def rows(shapes, elements_per_thread):
    result = []
    for ept in elements_per_thread:
        for shape in shapes:
            T, D, n, m, S = SHAPES[shape]
            with L.elements_per_thread(ept):
                captured = launches_of(T, D, n, m, S)
            for op, launches in captured.items():
                for kernel, args, kw in launches:
                    kw = dict(kw)
                    warps = kw.pop("num_warps")
                    u = resources.usage(resources.compile_launch(kernel, args, warps, **kw))
                    result.append({"shape": shape, "elements_per_thread": ept, "op": op, "kernel": kernel.fn.__name__,
                                   **u, "programs_per_sm": resources.programs_per_sm(u)})
                    print(json.dumps(result[-1]), flush=True)
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated of {list(SHAPES)}")
    ap.add_argument("--elements-per-thread", default="8,16")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    if not resources.cuobjdump().exists():
        raise SystemExit(f"no cuobjdump at {resources.cuobjdump()} (it ships with triton's NVIDIA backend)")
    table = rows(args.shapes.split(","), [int(x) for x in args.elements_per_thread.split(",")])
    print(f"\n{'shape':10} {'ept':>3} {'op':16} {'kernel':22} {'warps':>5} {'regs':>4} {'stack':>5} {'bar':>4} {'prog/SM':>7}")
    for r in table:
        print(f"{r['shape']:10} {r['elements_per_thread']:3} {r['op']:16} {r['kernel']:22} {r['num_warps']:5} "
              f"{r['registers']:4} {r['stack_bytes']:5} {r['barriers']:4} {r['programs_per_sm']:7}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(table, f, indent=1)
    return table


if __name__ == "__main__":
    main()
