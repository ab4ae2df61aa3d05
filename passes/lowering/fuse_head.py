"""Pass 3b, fuse_head: each block's first merge folded into its phase-1 call.

A block's first sublayer reads no partial block, so its merge is only its own RMSNorm of phase 1's
output for it (``attn_res_phase2_normed(o_0, lse_0, None, ...)`` = ``RMSNorm(scale * o_0) * w``).
Phase 1 already holds o_0 in fp32 registers, so it writes the normed form itself and never writes
o_0; in the backward, phase 1 takes the normed form's gradient and does the norm's backward on the
recomputed fp32 o_0:

    outs, lse = attn_res_phase1(C, Q, G, eps);  _, n0 = attn_res_phase2_normed(outs[0], lse[0], None, ...)
->  n0, outs_rest, lse = attn_res_phase1_normed(C, Q, G, eps, scale, w, out_eps)     # outs[j] = outs_rest[j-1]

Forward: o_0 is neither written nor read back (2 passes per block); backward: no merge kernel reads
(dn_0, o_0) and writes d o_0 for phase 1 to read (3 passes). The normed form is taken from the
unrounded o_0: one rounding fewer than the unfused graph (as every fused norm here).

Matches: ``attn_res_phase1`` whose output 0 is read only by a ``attn_res_phase2_normed`` without a
partial, with ``return_mix=False`` (what fuse_norm makes), whose lse is ``select(lse, 0, 0)`` of the
same call, and whose out-norm weight is defined before the phase-1 call.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .common import (
    PHASE1, PHASE1_NORMED, PHASE2_NORMED, CountingPass, copy_location, erase_unused, getitem_users, infer_meta,
    library_op, node_order, op,
)


def _is_select0(node, lse: fx.Node) -> bool:
    return (isinstance(node, fx.Node) and node.op == "call_function" and node.target is torch.select
            and node.args[0] is lse and tuple(node.args[1:]) == (0, 0))


class FuseHeadMerge(CountingPass):
    """Replaces ``attn_res_phase1`` + its query-0 merge by ``attn_res_phase1_normed``."""

    name = "fuse_head"

    def rewrite(self, gm: fx.GraphModule) -> bool:
        graph = gm.graph
        modified = False
        for p1 in [n for n in graph.nodes if library_op(n) == PHASE1]:
            modified |= self.tally(self._fuse(graph, p1), "fused_head")
        return modified

    def _fuse(self, graph: fx.Graph, p1: fx.Node):
        readers = getitem_users(p1)
        outs_nodes, lse_nodes = readers.get(0, []), readers.get(1, [])
        if len(outs_nodes) != 1 or len(lse_nodes) > 1:
            return "outputs_read_unusually"
        per_query = {}
        for u in list(outs_nodes[0].users):
            if u.op != "call_function" or u.target is not operator.getitem:
                return "outputs_read_unusually"
            per_query.setdefault(u.args[1], []).append(u)
        head = per_query.get(0, [])
        if len(head) != 1 or len(head[0].users) != 1:
            return "head_read_elsewhere"
        (merge,) = head[0].users
        if library_op(merge) != PHASE2_NORMED or merge.args[0] is not head[0] or merge.args[2] is not None:
            return "head_not_a_merge_without_partial"
        if merge.kwargs.get("return_mix", True):
            return "head_mix_returned"
        lse = lse_nodes[0] if lse_nodes else None
        if lse is None or not _is_select0(merge.args[1], lse):
            return "head_lse_not_its_own"
        scale, wo, out_eps = merge.args[6], merge.args[7], merge.args[8]
        order = node_order(graph)
        if isinstance(wo, fx.Node) and order[wo] > order[p1]:
            return "norm_weight_after_phase1"
        with graph.inserting_before(p1):
            fused = graph.call_function(op(PHASE1_NORMED), (*p1.args, scale, wo, out_eps))
            normed0 = graph.call_function(operator.getitem, (fused, 0))  # [..., D]
            rest = graph.call_function(operator.getitem, (fused, 1))  # S - 1 x [..., D]
            new_lse = graph.call_function(operator.getitem, (fused, 2))  # [S, ...] fp32
        new = [fused, normed0, rest, new_lse]
        for n in new:
            copy_location(n, p1)
        infer_meta(new)
        for j, users in per_query.items():
            if j == 0:
                continue
            for u in users:
                with graph.inserting_before(u):
                    r = graph.call_function(operator.getitem, (rest, j - 1))
                copy_location(r, u)
                infer_meta([r])
                u.replace_all_uses_with(r)
        merge_readers = getitem_users(merge)
        for u in merge_readers.get(1, []):
            u.replace_all_uses_with(normed0)
        lse.replace_all_uses_with(new_lse)
        old = [u for users in merge_readers.values() for u in users] + [merge, merge.args[1]]
        old += [u for users in per_query.values() for u in users] + [outs_nodes[0], lse, p1]
        erase_unused(old)
        return None
