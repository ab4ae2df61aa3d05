"""Pass 6, on the BACKWARD graph AOT autograd derives: a stream tensor's gradient sums folded into our
backward kernels.

A tensor read by k ops gets k gradients, which autograd sums: ``add(add(g_1, g_2), g_3)``, one
[tokens, hidden] kernel reading k and writing 1 (b_0 is read by every block's phase 1). Where a
summand g is an output of one of our backward ops and the running sum is computed before that op,
the op takes the running sum as its ``accumulate`` input instead, adds it in its kernel before the one
rounding, and the ``add`` goes: k + 1 passes become k - 1 extra reads.

    add(g_a, getitem(bwd, i))   ->   getitem(bwd', i)   with bwd' = bwd(..., accumulate[slot] = g_a)

Only when g_a does not depend on ``bwd`` (the new edge makes no cycle; when g_a comes later in the
graph, ``bwd`` and what depends on it move after it: a stable topological sort), the getitem has no
other reader, and both summands have the add's shape and dtype. (AOT autograd orders the summands
differently with symbolic shapes, so graph order alone would miss most folds under dynamic=True.) The passes before this one
run on Dynamo's graph, before autograd; this one sees the backward graph: the compile backend runs it
as inductor's ``post_grad_custom_pre_pass`` (``InductorFoldGradSums``) or in the ``aot_eager``
compiler's backward. Each backward op's ``accumulate`` argument and what it adds to are in
``kernels/attn_res/op.py``.
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx

from residual_rewriter.passes.op_names import op_name

# backward op -> the argument whose entries the accumulate slots follow: one slot per source
# ("sources"), or one slot for the gradient of "partial" (output 2)
FOLDABLE = {
    "residual_rewriter::attn_res_phase1_backward": "sources",
    "residual_rewriter::attn_res_phase1_normed_backward": "sources",
    "residual_rewriter::attn_res_normed_backward": "sources",
    "residual_rewriter::attn_res_phase2_normed_backward": "partial",
}
PARTIAL_GRAD_OUTPUT = 2  # attn_res_phase2_normed_backward returns [d phase1_out, d lse, d partial, ...]


def _argument(node: fx.Node, name: str):
    """(position, value) of a schema argument of a call_function node on an OpOverload."""
    names = [a.name for a in node.target._schema.arguments]
    i = names.index(name)
    return i, (node.args[i] if i < len(node.args) else node.kwargs[name])


def _slot(grad: fx.Node) -> Optional[int]:
    """The accumulate slot of ``grad`` if it is an output of one of our backward ops that can take one."""
    if grad.op != "call_function" or grad.target is not operator.getitem:
        return None
    bwd, index = grad.args
    if not isinstance(bwd, fx.Node) or bwd.op != "call_function" or op_name(bwd) not in FOLDABLE:
        return None
    what = FOLDABLE[op_name(bwd)]
    _, inputs = _argument(bwd, what)
    if what == "sources":
        return index if index < len(inputs) else None
    return 0 if index == PARTIAL_GRAD_OUTPUT and inputs is not None else None


def _val(node) -> Optional[torch.Tensor]:
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _same_tensor_type(*nodes) -> bool:
    vals = [_val(n) for n in nodes]
    if any(v is None for v in vals):
        return False
    first = vals[0]  # shapes compared, not hashed: they may be symbolic (dynamic=True)
    return all(v.dtype == first.dtype and tuple(v.shape) == tuple(first.shape) for v in vals[1:])


def _depends_on(node: fx.Node, target: fx.Node, position: dict) -> bool:
    """Whether ``node`` is computed from ``target`` (nodes before ``target`` in the graph cannot be)."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n is target:
            return True
        if n in seen or position[n] < position[target]:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return False


def fold_grad_sums(graph: fx.Graph) -> dict:
    """Fold in place; returns counts: ``folded`` adds, and ``candidates_left`` (adds with a summand
    from a foldable op) left alone."""
    position = {n: i for i, n in enumerate(graph.nodes)}  # kept exact: _depends_on prunes by it
    folded = left = 0
    for add in list(graph.nodes):
        if add.op != "call_function" or add.target is not torch.ops.aten.add.Tensor or add.kwargs or len(add.args) != 2:
            continue
        a, b = add.args
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
            continue
        for grad, other in ((b, a), (a, b)):
            slot = _slot(grad)
            if slot is None:
                continue
            bwd = grad.args[0]
            acc_index, accumulate = _argument(bwd, "accumulate")
            if (len(grad.users) == 1 and accumulate[slot] is None and _same_tensor_type(add, grad, other)
                    and not _depends_on(other, bwd, position)):
                accumulate = list(accumulate)
                accumulate[slot] = other
                bwd.update_arg(acc_index, accumulate)
                add.replace_all_uses_with(grad)
                graph.erase_node(add)
                if position[other] > position[bwd]:  # bwd now reads a later value: move it (and its readers) down
                    from torch._inductor.pattern_matcher import stable_topological_sort

                    stable_topological_sort(graph)
                position = {n: i for i, n in enumerate(graph.nodes)}
                folded += 1
                break
        else:
            left += any(_slot(x) is not None for x in (a, b))
    return {"folded": folded, "candidates_left": left}


def fold_grad_sums_in(gm: fx.GraphModule) -> dict:
    counts = fold_grad_sums(gm.graph)
    gm.graph.lint()
    gm.recompile()
    return counts


def inductor_pass(on_counts=None, then=None):
    """The pass as inductor's ``post_grad_custom_pre_pass`` (run on the forward and the backward graph;
    the forward has nothing to fold). ``on_counts(counts)`` is called after each graph. ``then``: the
    user's own pre-pass or list of them, run after it within this one pass (torch < 2.13 takes no list)."""
    import torch._inductor.custom_graph_pass as passes
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

    theirs = () if then is None else tuple(then) if isinstance(then, (list, tuple)) else (then,)
    aware = getattr(passes, "CustomInferenceAwareGraphPass", None)  # torch >= 2.12: called with is_inference

    class InductorFoldGradSums(aware or CustomGraphPass):
        def __call__(self, graph: fx.Graph, is_inference: bool = False) -> None:
            counts = fold_grad_sums(graph)
            if on_counts is not None:
                on_counts(counts)
            for p in theirs:
                p(graph, is_inference=is_inference) if aware and isinstance(p, aware) else p(graph)

        def uuid(self):  # inductor's FX-graph cache keys on this pass's source (and the op schemas'), and theirs
            from residual_rewriter.kernels.attn_res import op as ops_module

            keys = [p.uuid() if isinstance(p, CustomGraphPass) else None for p in theirs]
            if not all(keys):  # a pass of theirs the cache cannot key on: None makes inductor bypass it
                return None
            return (get_hash_for_files((__file__, ops_module.__file__)), *keys)

    return InductorFoldGradSums()
