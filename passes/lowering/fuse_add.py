"""Pass 4, fuse_add: the partial block's update folded into the phase-2 merge that reads it.

In Block AttnRes every sublayer after the second of its block reads the partial block
``p = prev + f`` (the block's outputs so far), which an add makes right before the merge. Unfused,
``p`` is written by the add and read straight back by the merge; in the backward the merge's gradient
of ``p`` and ``p``'s gradient from its other readers (the next add, phase 1) are summed by one more
kernel. After this pass:

    p = add(prev, f);  _, y = attn_res_phase2_normed(o, lse, p, q, g, eps, scale, wo, out_eps, return_mix=False)
->  p, y = attn_res_phase2_add_normed(o, lse, prev, f, q, g, eps, scale, wo, out_eps)

one pass reads (o, prev, f) and writes (p, y): one [..., D] read fewer forward, and backward the
gradient of p is summed in the merge's kernel and written once (no add kernel, two passes fewer).
``p`` is rounded to its dtype exactly as the add rounded it, so nothing changes numerically.

Matches: ``attn_res_phase2_normed`` with ``return_mix=False`` (what fuse_norm makes of every converted
model's merges) whose partial is an add of two tensors — ``operator.add`` / ``torch.add`` /
``Tensor.add``, no ``alpha`` — of exactly the sum's shape (no broadcast), one of them and the sum of
phase1_out's dtype, the other of a dtype that promotes to it (bf16 branches into an fp32 stream
under autocast), and whose other readers all come after the merge.
Leaves: merges without a partial or with a partial that is not such an add (a block's first two
sublayers), counted as ``partial_not_an_add``; merges that still return the mix.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx

from .common import (
    ADDS, PHASE2_ADD_NORMED, PHASE2_NORMED, CountingPass, copy_location, erase_unused, getitem_users, infer_meta,
    library_op, node_order, op, tensor_value,
)


def _as_fusable_add(node, like: torch.Tensor) -> Optional[tuple[fx.Node, fx.Node]]:
    """(prev, delta) when ``node`` is ``prev + delta`` over two tensors of ``like``'s shape, the sum and
    ``prev`` of ``like``'s dtype, ``delta`` of that dtype or one that promotes to it (a bf16 branch
    output added to an fp32 partial sum under autocast)."""
    if not isinstance(node, fx.Node) or node.kwargs:
        return None
    is_add = (node.op == "call_function" and node.target in ADDS) or (
        node.op == "call_method" and node.target == "add")
    if not is_add or len(node.args) != 2:
        return None
    total, a, b = (tensor_value(x) for x in (node, *node.args))
    if any(v is None or v.shape != like.shape for v in (total, a, b)) or total.dtype != like.dtype:
        return None
    for prev, delta in ((0, 1), (1, 0)):  # the operand already in the sum's dtype is the partial
        p, d = (a, b)[prev], (a, b)[delta]
        if p.dtype == like.dtype and d.is_floating_point() and torch.promote_types(d.dtype, p.dtype) == p.dtype:
            return node.args[prev], node.args[delta]
    return None


class FusePartialAdd(CountingPass):
    """Replaces ``add`` + ``attn_res_phase2_normed(return_mix=False)`` by ``attn_res_phase2_add_normed``."""

    name = "fuse_add"

    def rewrite(self, gm: fx.GraphModule) -> bool:
        graph = gm.graph
        order = node_order(graph)
        modified = False
        for merge in [n for n in graph.nodes if library_op(n) == PHASE2_NORMED]:
            if merge.kwargs.get("return_mix", True):
                self.stats["mix_returned"] += 1
                continue
            o, lse, partial, *rest = merge.args  # (o, lse, partial, q, g, eps, scale, wo, out_eps)
            like = tensor_value(o)
            add = _as_fusable_add(partial, like) if like is not None else None
            if add is None:
                self.stats["partial_not_an_add"] += 1
                continue
            if any(order[u] < order[merge] for u in partial.users if u is not merge):
                self.stats["partial_read_before_merge"] += 1
                continue
            self._fuse(graph, merge, partial, add, o, lse, rest)
            modified = True
            self.stats["fused_partial_add"] += 1
        return modified

    @staticmethod
    def _fuse(graph: fx.Graph, merge: fx.Node, partial: fx.Node, add: tuple, o, lse, rest) -> None:
        with graph.inserting_before(merge):
            fused = graph.call_function(op(PHASE2_ADD_NORMED), (o, lse, *add, *rest))
            new_partial = graph.call_function(operator.getitem, (fused, 0))  # [..., D]
            normed = graph.call_function(operator.getitem, (fused, 1))  # [..., D]
        for n in (fused, new_partial, normed):
            copy_location(n, merge)
        infer_meta([fused, new_partial, normed])
        old = getitem_users(merge)
        for u in old.get(1, []):
            u.replace_all_uses_with(normed)
        partial.replace_all_uses_with(new_partial, delete_user_cb=lambda user: user is not merge)
        erase_unused([u for users in old.values() for u in users] + [merge, partial])
