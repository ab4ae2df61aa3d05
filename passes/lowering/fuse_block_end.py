"""Pass 4c, fuse_block_end: each block's last add done by the next block's phase-1 call.

A block's sum b_n = p + f (its partial plus its last sublayer's output) is first read by block n+1's
phase 1, as its last source, and later by the phase 1 of every block after it. That phase 1 reads p
and f, writes b_n once and reads it back from L2, so the add's own kernel (read 2, write 1) goes:

    b = p + f;  n0, outs, lse, _ = attn_res_phase1_normed([b_0, ..., b], Q, G, ...)
->  n0, outs, lse, b = attn_res_phase1_normed([b_0, ...], Q, G, ..., end_partial=p, end_delta=f)

b's later readers read the op's fourth output. Rounding: b is rounded once to p's dtype, as the add
was (bit-identical). In the backward, b's gradient from its later readers is summed into its source
gradient inside the phase-1 backward kernel (its ``accumulate`` input); p and f both receive it.

Matches: an ``attn_res_phase1_normed`` whose last source is a torch-level add of two tensors of that
source's shape, its dtype being the sources' and the first (or second) operand's, read by nothing
before that phase-1 call. In graphs compiled under no_grad ``accumulate_in_gemm`` has made that add an
in-place GEMM already (better: f is never written); nothing is left here to fuse. Not run where the
ops will be decomposed into torch math (CPU under lower="auto", or "decompose": ``run_passes``): the
add would come back as it was, only moved, and inductor's CPU schedule measured no better for it.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .common import ADDS, PHASE1_NORMED, CountingPass, copy_location, infer_meta, library_op, node_order, op, tensor_value


def _operands(add: fx.Node):
    """(partial, delta) of a fusable block-end add: the partial of the sum's dtype, the delta of that
    dtype or one that promotes to it, all three of one shape; else None."""
    if add.op != "call_function" or add.target not in ADDS or add.kwargs or len(add.args) != 2:
        return None
    a, b = add.args
    out, va, vb = tensor_value(add), tensor_value(a), tensor_value(b)
    if out is None or va is None or vb is None or not (out.shape == va.shape == vb.shape):
        return None
    for partial, delta, vp, vd in ((a, b, va, vb), (b, a, vb, va)):
        if vp.dtype == out.dtype and torch.promote_types(vd.dtype, vp.dtype) == vp.dtype:
            return partial, delta
    return None


class FuseBlockEnd(CountingPass):
    """Folds a block-end add into the ``attn_res_phase1_normed`` call that reads it first."""

    name = "fuse_block_end"

    def rewrite(self, gm: fx.GraphModule) -> bool:
        graph = gm.graph
        modified = False
        for p1 in [n for n in graph.nodes if library_op(n) == PHASE1_NORMED]:
            modified |= self.tally(self._fuse(graph, p1), "fused_block_end")
        return modified

    def _fuse(self, graph: fx.Graph, p1: fx.Node):
        sources = p1.args[0]
        end = sources[-1]
        if p1.kwargs.get("end_partial") is not None or len(p1.args) > 7:
            return "already_fused"
        operands = _operands(end) if isinstance(end, fx.Node) else None
        if operands is None:
            return "last_source_not_an_add"
        src = tensor_value(sources[0])
        if src is None or tensor_value(end).dtype != src.dtype or sources.count(end) != 1:
            return "last_source_unlike_the_others"
        order = node_order(graph)
        if any(order[u] < order[p1] for u in end.users):
            return "block_end_read_before_phase1"
        with graph.inserting_before(p1):
            fused = graph.call_function(op(PHASE1_NORMED), (list(sources[:-1]), *p1.args[1:]),
                                        {"end_partial": operands[0], "end_delta": operands[1]})
            block_end = graph.call_function(operator.getitem, (fused, 3))  # [..., D], the add's value
        for n in (fused, block_end):
            copy_location(n, p1)
        infer_meta([fused, block_end])
        p1.replace_all_uses_with(fused)  # its readers index outputs 0..2, which keep their meaning
        graph.erase_node(p1)
        end.replace_all_uses_with(block_end)
        graph.erase_node(end)
        return None
