"""Pass 4, accumulate_in_gemm (graphs without autograd only): the partial block's add done by the
output GEMM of the sublayer it adds, in place.

    f = linear(x, W);  p2 = p + f          ->   add_linear_(p, x, W)   # p += x @ W.T; readers of p2 read p

``add_linear_`` is ``addmm_`` (cuBLAS ``beta = 1``): the GEMM reads p in its epilogue and writes the
sum over it, so f is never written and no add kernel runs (``kernels/partial_add``). Inductor keeps
the in-place form through functionalization (re-inplacing: tested), with no copy of p.

On CUDA tensors (``"auto"``, the default; ``True`` applies it on any device), and only when the graph is compiled with grad disabled (Dynamo guards on grad mode, so the graph never
runs with autograd): training needs p itself for the merge's backward. Matches an add of two tensors
of one shape and dtype, one of them a ``linear`` without bias whose only reader is the add (through
an identity dropout: eval mode or p = 0), the other
(p) contiguous and not a graph input or parameter (never mutated: a user's tensor), where no reader of
p, or of what p is a view or alias of, comes after the add. Runs before ``fuse_add``, which would
otherwise fold the add into the next merge. Rounding: one rounding of the sum instead of two (see
``kernels/partial_add``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from .common import ADDS, CountingPass, copy_location, erase_unused, node_order, tensor_value

_LINEARS = {torch._C._nn.linear, F.linear}
_ALIASING_METHODS = {"to", "view", "reshape", "contiguous", "type_as", "view_as", "reshape_as"}



def _identity_dropout_input(node) -> Optional[fx.Node]:
    """The input of ``dropout(x, p, training=False)`` (or p = 0), an identity: the graph of a model in
    eval mode keeps it (GPT-style sublayers end with one)."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is F.dropout):
        return None
    names = ("input", "p", "training", "inplace")
    bound = dict(zip(names, (None, 0.5, True, False)))
    bound.update(zip(names, node.args))
    bound.update(node.kwargs)
    if bound["training"] and bound["p"] != 0:
        return None
    return bound["input"] if isinstance(bound["input"], fx.Node) else None


def _linear_without_bias(node) -> Optional[tuple[fx.Node, fx.Node]]:
    """(x, W) when ``node`` is ``linear(x, W)`` / ``linear(x, W, None)``."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target in _LINEARS):
        return None
    args = list(node.args) + [node.kwargs.get("bias")] * (3 - len(node.args))
    if len(args) != 3 or args[2] is not None or set(node.kwargs) - {"bias"}:
        return None
    x, w = args[0], args[1]
    return (x, w) if isinstance(x, fx.Node) and isinstance(w, fx.Node) else None


def _is_alias(node: fx.Node) -> bool:
    return node.op == "call_method" and node.target in _ALIASING_METHODS and isinstance(node.args[0], fx.Node)


def _storage_sharers(node: fx.Node) -> tuple[fx.Node, set]:
    """(where ``node``'s storage was made, every node that may share that storage): back through
    view/alias methods to the root, then forward through every view/alias of it."""
    root = node
    while _is_alias(root):
        root = root.args[0]
    sharers, todo = {root}, [root]
    while todo:
        for u in todo.pop().users:
            if _is_alias(u) and u not in sharers:
                sharers.add(u)
                todo.append(u)
    return root, sharers


class AccumulateInGemm(CountingPass):
    """Replaces ``p + linear(x, W)`` by ``add_linear_(p, x, W)`` in graphs compiled without autograd.
    ``cuda_only``: leave CPU tensors alone (there inductor fuses the add into its own kernels, and an
    opaque in-place GEMM measured slower: 1.106x against 1.036x of the original's no_grad forward)."""

    name = "accumulate_in_gemm"

    def __init__(self, cuda_only: bool = False):
        super().__init__()
        self.cuda_only = cuda_only

    def rewrite(self, gm: fx.GraphModule) -> bool:
        graph = gm.graph
        modified = False
        for add in [n for n in graph.nodes if n.op == "call_function" and n.target in ADDS]:
            match = self._match(graph, add)
            if match is None:
                continue
            partial, dead, (x, w) = match
            with graph.inserting_before(add):
                acc = graph.call_function(torch.ops.residual_rewriter.add_linear_.default, (partial, x, w))
            copy_location(acc, dead[-1])
            acc.meta["example_value"] = None
            add.replace_all_uses_with(partial)  # readers of the sum read the partial, updated in place
            erase_unused([add, *dead])
            modified = True
            self.stats["accumulated_in_gemm"] += 1
        return modified

    def _match(self, graph: fx.Graph, add: fx.Node):
        if len(add.args) != 2 or add.kwargs:
            return None
        total = tensor_value(add)
        if total is None:
            return None
        order = node_order(graph)
        for p, f in (add.args, tuple(reversed(add.args))):
            dead = [f] if isinstance(f, fx.Node) else []  # nodes that go with the add: f (and an identity dropout)
            inner = _identity_dropout_input(f)
            if inner is not None:
                dead.append(inner)
            xw = _linear_without_bias(dead[-1] if dead else None)
            if xw is None or any(len(n.users) != 1 for n in dead) or not isinstance(p, fx.Node):
                continue
            pv, fv, xv, wv = (tensor_value(n) for n in (p, f, *xw))
            if any(v is None for v in (pv, fv, xv, wv)):
                continue
            if not (pv.shape == fv.shape == total.shape and pv.dtype == fv.dtype == total.dtype == xv.dtype == wv.dtype):
                self.stats["dtype_or_shape_differs"] += 1
                continue
            if self.cuda_only and pv.device.type != "cuda":
                self.stats["not_cuda"] += 1
                continue
            if wv.dim() != 2 or not pv.is_contiguous():
                self.stats["not_contiguous"] += 1
                continue
            root, sharers = _storage_sharers(p)
            if root.op in ("placeholder", "get_attr"):
                self.stats["partial_is_an_input"] += 1  # never mutate the user's tensors
                continue
            if any(order[u] > order[add] for n in sharers for u in n.users if u is not add and u not in sharers):
                self.stats["partial_read_after_the_add"] += 1
                continue
            return p, dead, xw
        return None
