"""The memory traffic Block AttnRes adds to a model, counted on the graphs the ``attnres`` backend
emits — the floor under what a converted model can cost over the original. No GPU needed.

A MODEL, not a measurement. Unit: one pass over a [tokens, hidden] activation (read or write). The
aggregation is memory-bound, so (extra passes) x (bytes per pass) / (copy bandwidth) is the least
time the converted model can add, however fast the kernels. Counted per library op from the kernels'
own I/O (``kernels/attn_res``): every activation input read once from DRAM and every output written
once; re-reads a kernel makes of its own tile (L1/L2) are not counted, nor [tokens]-sized statistics
(lse, their gradients). The stream's adds (the partial
blocks) read 2 and write 1; a stream tensor read by k > 1 ops gets k gradients, summed in one
kernel (k reads, 1 write), except those that ``fold_grad_sums`` folds into a backward kernel's
``accumulate`` input: 1 read each in that kernel (``folds`` below; the test suite checks its count
against the pass run on the AOT backward graph). The ORIGINAL model, per sublayer, as inductor fuses it: the residual add
+ the next RMSNorm read (x, f) and write (x + f, normed) — 4 passes; backward, the norm's backward
and the residual gradient's sum read (dnormed, x + f, the stream gradient) and write one — 4 passes.

    python benchmarks/backend/traffic_model.py                         # the H100 backend benchmark's model
    python benchmarks/backend/traffic_model.py --layers 32 --num-blocks 8 --hidden 4096

Prints, per backend variant, the passes per forward (training graph, and the graph compiled under
``torch.no_grad``, which the forward benchmark runs) and per training step, the floor in ms at the
given copy bandwidth, and that floor as a share of the original's measured times when given.
"""
from __future__ import annotations

import argparse
from collections import Counter

import torch

import residual_rewriter as rr
from residual_rewriter.backend import make_attnres_backend
from residual_rewriter.passes.lowering.common import ADDS, library_op, value
from residual_rewriter.passes.lowering.fold_grad_sums import FOLDABLE
from residual_rewriter.passes.op_names import op_name

VARIANTS = {
    "all passes": {},
    "-fold_grad_sums": {"fold_grad_sums": False},
    "-fuse_block_end": {"fuse_block_end": False},
    "-fuse_head": {"fuse_head": False},
    "-accumulate_in_gemm": {"accumulate_in_gemm": False},
    "-fuse_add": {"fuse_add": False},
    "-fuse_norm": {"fuse_norm": False},
    "-batch": {"batch_two_phase": False},
}


def _is_stream(node, shape) -> bool:
    v = value(node)
    return isinstance(v, torch.Tensor) and tuple(v.shape) == shape


def op_passes(node) -> tuple[int, int]:
    """(forward passes, backward passes) of one library-op node, in [tokens, hidden] units."""
    name = library_op(node).split("::")[1]
    args, mix = node.args, int(node.kwargs.get("return_mix", True))
    # an unfused op's mixture is normalised by a kernel of its own: reads it, writes the normed form;
    # backward reads (dnormed, mix), writes d mix
    norm_fwd, norm_bwd = (2, 3) if name in ("attn_res", "attn_res_phase2") else (0, 0)
    if name in ("attn_res", "attn_res_normed"):
        n, normed = len(args[0]), name.endswith("normed")
        # fwd: n sources -> out (+ normed); bwd: the sources (recompute) + dy (+ dnormed) -> n grads
        fwd = n + (1 + mix if normed else 1)
        bwd = n + (mix + 1 if normed else 1) + n
        return fwd + norm_fwd, bwd + norm_bwd
    if name in ("attn_res_phase1", "attn_res_phase1_normed"):  # _normed: query 0's normed merge instead of out_0
        m, S = len(args[0]), int(value(args[1]).shape[0])
        # fwd: m sources -> S outputs. bwd: one kernel; its first sweep reads the m sources and the S
        # douts (one tensor per query: nothing assembled), its second re-reads the tile from L2
        # (not counted) and writes m gradients
        if node.kwargs.get("end_partial") is None:
            return m + S, (m + S) + m
        # with the previous block's last add (fuse_block_end): fwd reads p and f and writes their sum
        # b (read back from L2); bwd as above with b one more source, and b's gradient from its later
        # readers read once to be summed into it (when it has any)
        later = int(any(u.args[1] == 3 and u.users for u in node.users))
        return m + 3 + S, (m + 1 + S) + (m + 1) + later
    has_p = args[2] is not None
    if name == "attn_res_phase2":
        return 1 + has_p + 1 + norm_fwd, 1 + 1 + has_p + 1 + has_p + norm_bwd  # (dy, o, p) -> (d o, d p)
    if name == "attn_res_phase2_normed":
        return 1 + has_p + 1 + mix, (1 + mix) + 1 + has_p + 1 + has_p
    if name == "attn_res_phase2_add_normed":
        gp = int(bool(node.users) and any(u.args[1] == 0 for u in node.users))  # the new partial read elsewhere
        return 3 + 2, 1 + 1 + 1 + gp + 2  # (dn, o, p, g p) -> (d o, d p)
    raise AssertionError(name)


def _accumulates(reader, tensor) -> bool:
    """Whether ``reader``'s backward op takes ``tensor``'s other gradients as an ``accumulate`` input."""
    what = FOLDABLE.get(f"{library_op(reader)}_backward") if library_op(reader) else None
    if what == "sources":  # phase 1 (+ head merge), the unbatched merge: args[0] is the source list
        return tensor in reader.args[0]
    return what == "partial" and reader.args[2] is tensor  # phase-2 merge: (phase1_out, lse, partial, ...)


def folds(readers: list, tensor, fold: bool = True) -> tuple[int, int]:
    """(passes of the gradient-sum kernel, gradients folded) of a stream tensor read by ``readers`` (in
    graph order). Backward runs in reverse: the last reader's gradient comes first, and each earlier
    reader whose backward op can accumulate adds the running sum in its kernel (1 read there, not
    counted here); the other k gradients are summed by one kernel (k reads + 1 write)."""
    if len(readers) < 2:
        return 0, 0
    folded = sum(_accumulates(r, tensor) for r in readers[:-1]) if fold else 0
    summed = len(readers) - folded
    return (summed + 1 if summed > 1 else 0), folded


def converted_passes(graph: torch.fx.Graph, stream_shape, fold: bool = True) -> dict:
    """Forward and backward passes of the AttnRes ops and the stream's adds in one rewritten graph."""
    ops = [n for n in graph.nodes if library_op(n)]
    adds = [n for n in graph.nodes if n.op == "call_function" and n.target in ADDS and _is_stream(n, stream_shape)]
    # the partial block's add done by the output GEMM in place (no_grad graphs): the GEMM reads the
    # partial in its epilogue (1 pass); its write replaces the original's write of f
    gemm_adds = [n for n in graph.nodes if n.op == "call_function" and op_name(n) == "residual_rewriter::add_linear_"]
    fwd = bwd = 0
    for n in ops:
        f, b = op_passes(n)
        fwd, bwd = fwd + f, bwd + b
    fwd += 3 * len(adds) + len(gemm_adds)
    readers, counted = {}, set(ops) | set(adds)  # stream tensors read by several ops/adds get several gradients
    for n in graph.nodes:
        if n in counted:
            for a in n.all_input_nodes:
                if _is_stream(a, stream_shape):
                    readers.setdefault(a, []).append(n)
    sums = [folds(r, t, fold) for t, r in readers.items()]
    bwd += sum(p + f for p, f in sums)  # the sum kernels, and each folded gradient's read in its op's kernel
    return {"ops": Counter(library_op(n).split("::")[1] for n in ops), "adds": len(adds), "gemm_adds": len(gemm_adds),
            "fwd": fwd, "bwd": bwd, "folded": sum(f for _, f in sums)}


def graphs_of(layers: int, num_blocks: int, options: dict, grad: bool = True):
    """The graph the backend emits for the benchmark's model in training (``grad``) or under no_grad."""
    from bench_backend import llama_like

    torch.manual_seed(0)
    model = rr.convert(llama_like(layers, 64), num_blocks=num_blocks).train(grad)
    options = {"accumulate_in_gemm": True, **options}  # what the backend does on CUDA ("auto"), traced on CPU
    backend = make_attnres_backend(compiler="eager", lower=None, keep_graphs=True, **options)
    ids = torch.randint(0, 4096, (1, 8))
    torch._dynamo.reset()
    with torch.set_grad_enabled(grad):
        torch.compile(model, backend=backend)(ids)
    return backend.graphs[-1], (1, 8, 64), len(model.attn_res_report.plan.sites)


def extra_passes(layers: int, num_blocks: int, options: dict | None = None) -> dict:
    """What one backend variant (``options``) adds over the original, in passes: the converted graph's
    counts (``converted_passes``) minus the original's 4 per sublayer forward and 4 backward; the
    training graph for the step, the no_grad graph (what the forward benchmark runs) for ``extra_nograd``."""
    graph, shape, sites = graphs_of(layers, num_blocks, options or {})
    c = converted_passes(graph, shape, fold=(options or {}).get("fold_grad_sums", True))
    nograd = converted_passes(graphs_of(layers, num_blocks, options or {}, grad=False)[0], shape)
    orig_fwd, orig_bwd = 4 * sites, 4 * sites  # per sublayer: fused add + RMSNorm, and its backward
    return dict(c, sites=sites, extra_fwd=c["fwd"] - orig_fwd, extra_train=c["fwd"] + c["bwd"] - orig_fwd - orig_bwd,
                nograd_ops=dict(nograd["ops"]), nograd_gemm_adds=nograd["gemm_adds"], extra_nograd=nograd["fwd"] - orig_fwd)


def _percent(ms: float, of_ms: float) -> str:
    return f"{100 * ms / of_ms:6.2f}" if of_ms > 0 else f"{'-':>6}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--num-blocks", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--tokens", type=int, default=4 * 2048)
    p.add_argument("--bytes", type=int, default=2, help="per element (bf16: 2)")
    p.add_argument("--copy-gbps", type=float, default=3002.0, help="measured copy bandwidth (H100, session 2)")
    p.add_argument("--original-fwd-ms", type=float, default=29.51,
                   help="original + inductor forward, measured (default: H100, session 2, this default model); 0: none")
    p.add_argument("--original-train-ms", type=float, default=91.32, help="the same for a training step")
    args = p.parse_args(argv)
    pass_ms = args.tokens * args.hidden * args.bytes / (args.copy_gbps * 1e9) * 1e3
    print(f"{args.layers} layers, {args.num_blocks} blocks, hidden {args.hidden}, {args.tokens} tokens: one pass "
          f"= {args.tokens * args.hidden * args.bytes / 2**20:.0f} MiB = {pass_ms * 1e3:.1f} us at {args.copy_gbps:.0f} GB/s\n")
    print(f"{'variant':20} {'ops (training graph)':58} {'+fwd':>5} {'+nograd':>7} {'ms':>6} {'%fwd':>6} "
          f"{'+train':>6} {'ms':>6} {'%train':>6}")
    rows = []
    for name, options in VARIANTS.items():
        c = extra_passes(args.layers, args.num_blocks, options)
        sites, extra_nograd, extra_train = c["sites"], c["extra_nograd"], c["extra_train"]
        row = dict(variant=name, ops=dict(c["ops"]), adds=c["adds"], fwd=c["fwd"], bwd=c["bwd"], folded=c["folded"],
                   extra_fwd=c["extra_fwd"],
                   extra_nograd=extra_nograd, nograd_ops=c["nograd_ops"], nograd_gemm_adds=c["nograd_gemm_adds"],
                   extra_train=extra_train, extra_nograd_ms=extra_nograd * pass_ms, extra_train_ms=extra_train * pass_ms)
        rows.append(row)
        ops = ", ".join(f"{k.replace('attn_res_', '')} {v}" for k, v in sorted(c["ops"].items())) + f", adds {c['adds']}"
        print(f"{name:20} {ops:58} {c['extra_fwd']:5} {extra_nograd:7} {row['extra_nograd_ms']:6.2f} "
              f"{_percent(row['extra_nograd_ms'], args.original_fwd_ms)} {extra_train:6} "
              f"{row['extra_train_ms']:6.2f} {_percent(row['extra_train_ms'], args.original_train_ms)}")
    print("\n+fwd: the training graph's forward; +nograd: the graph compiled under torch.no_grad (what the forward "
          "benchmark runs; %fwd is of it); no_grad graph of 'all passes': "
          + ", ".join(f"{k.replace('attn_res_', '')} {v}" for k, v in sorted(rows[0]["nograd_ops"].items()))
          + f", GEMM-accumulated adds {rows[0]['nograd_gemm_adds']}")
    print(f"\noriginal: {4 * sites} passes forward, {8 * sites} per training step ({sites} sublayers)")
    return rows


if __name__ == "__main__":
    main()
