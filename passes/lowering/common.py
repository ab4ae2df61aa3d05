"""Shared helpers of the lowering passes: the op targets, node metadata, and the pass result.

The passes run on the graph Dynamo hands a backend (torch-level ops, modules inlined, parameters as
placeholders). Every node there carries ``meta["example_value"]``: a FakeTensor (or a tuple of them)
in Dynamo's fake mode. A pass that adds nodes fills that in with ``infer_meta`` so the next pass, and
inductor's own pre-grad passes, see true shapes and dtypes ("keep node metadata true").
"""
from __future__ import annotations

import operator
from collections import defaultdict
from typing import Any, Iterable, Optional

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

import residual_rewriter.kernels.attn_res  # noqa: F401  (registers torch.ops.residual_rewriter.*)

from residual_rewriter.passes.op_names import op_name

# Ops are matched by their schema NAME, never by object identity: building some models (Hugging
# Face ones) refreshes torch.ops caches, after which ``torch.ops.residual_rewriter.attn_res.default``
# is a new object (see passes/op_names.py). New nodes get the op looked up at that time (``op()``).
ATTN_RES = "residual_rewriter::attn_res"
PHASE1 = "residual_rewriter::attn_res_phase1"
PHASE1_NORMED = "residual_rewriter::attn_res_phase1_normed"
PHASE2 = "residual_rewriter::attn_res_phase2"
NORMED = "residual_rewriter::attn_res_normed"
PHASE2_NORMED = "residual_rewriter::attn_res_phase2_normed"
PHASE2_ADD_NORMED = "residual_rewriter::attn_res_phase2_add_normed"
LIBRARY_OPS = (ATTN_RES, PHASE1, PHASE1_NORMED, PHASE2, NORMED, PHASE2_NORMED, PHASE2_ADD_NORMED)


def op(name: str):
    """The OpOverload of a library op, looked up now."""
    return getattr(torch.ops.residual_rewriter, name.split("::")[1]).default


def library_op(node: fx.Node) -> Optional[str]:
    """The library op a node calls (one of LIBRARY_OPS), else None."""
    if node.op != "call_function":
        return None
    name = op_name(node)
    return name if name in LIBRARY_OPS else None

META = "example_value"  # the key Dynamo uses for a node's fake value


class LoweringError(RuntimeError):
    """A requested lowering cannot be done (e.g. Triton asked for on CPU tensors). Never swallowed."""


def value(node: Any) -> Any:
    """The fake (or real) value recorded for a node, None when unknown."""
    if not isinstance(node, fx.Node):
        return node
    return node.meta.get(META, node.meta.get("val"))


ADDS = {operator.add, torch.add}  # the targets of a torch-level add in Dynamo's graphs


def tensor_value(node: Any) -> Optional[torch.Tensor]:
    """The recorded value of ``node`` when it is a tensor, else None."""
    v = value(node) if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def getitem_users(node: fx.Node) -> dict[int, list[fx.Node]]:
    """For a node returning a tuple: output index -> the ``operator.getitem`` nodes reading it."""
    out: dict[int, list[fx.Node]] = {}
    for user in node.users:
        if user.op != "call_function" or user.target is not operator.getitem:
            raise LoweringError(f"{node.name} returns a tuple but {user.name} reads it without indexing")
        out.setdefault(user.args[1], []).append(user)
    return out


def _fake_mode_of(values: Iterable[Any]):
    # The mode the recorded values live in. Not torch._guards.detect_fake_mode: inside a backend it
    # returns the TracingContext's mode, a different one from that of Dynamo's example values.
    from torch._subclasses.fake_tensor import FakeTensor

    for v in values:
        if isinstance(v, FakeTensor):
            return v.fake_mode
    return None


def infer_meta(nodes: Iterable[fx.Node]) -> None:
    """Fill ``meta["example_value"]`` of new call_function/call_method nodes by running them on the fake
    values of their inputs (in Dynamo's fake mode, so symbolic shapes stay symbolic). Nodes whose
    inputs have no recorded value are left without one (graphs built outside Dynamo)."""
    for node in nodes:
        if node.op not in ("call_function", "call_method") or value(node) is not None:
            continue
        missing = []

        def get(n: fx.Node):
            v = value(n)
            if v is None:
                missing.append(n)
            return v

        args, kwargs = fx.node.map_arg((node.args, node.kwargs), get)
        if missing:
            continue
        leaves = [v for v in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(v, torch.Tensor)]
        mode = _fake_mode_of(leaves)
        if mode is None:
            continue
        with mode:
            if node.op == "call_function":
                out = node.target(*args, **kwargs)
            else:
                self_arg, *rest = args
                out = getattr(self_arg, node.target)(*rest, **kwargs)
        node.meta[META] = out


def copy_location(new: fx.Node, like: fx.Node) -> None:
    """New nodes inherit where the replaced node came from (module stack, source line) for debugging."""
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if key in like.meta and key not in new.meta:
            new.meta[key] = like.meta[key]


def erase_unused(nodes: Iterable[fx.Node]) -> None:
    """Erase the given nodes once nothing reads them (users first). Only the nodes a pass replaced:
    a graph-wide dead-code sweep could drop a dead random op and shift the RNG stream."""
    pending = list(nodes)
    while pending:
        progress = False
        for node in list(pending):
            if not node.users:
                node.graph.erase_node(node)
                pending.remove(node)
                progress = True
        if not progress:
            raise LoweringError(f"cannot erase {[n.name for n in pending]}: still read by other nodes")


def finish(gm: fx.GraphModule, modified: bool) -> PassResult:
    """Every pass ends here: lint, recompile."""
    if modified:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, modified)


class CountingPass(PassBase):
    """A rewriting pass that counts what it did: ``rewrite(gm) -> modified`` adds to ``self.stats``,
    ``summary()`` reports them (``run_passes`` logs it). ``call`` = fresh counts, rewrite, ``finish``."""

    name = "counting_pass"

    def __init__(self):
        super().__init__()
        self.stats = defaultdict(int)

    def call(self, gm: fx.GraphModule) -> PassResult:
        self.stats.clear()
        return finish(gm, self.rewrite(gm))

    def rewrite(self, gm: fx.GraphModule) -> bool:
        raise NotImplementedError

    def tally(self, reason: Optional[str], done: str) -> bool:
        """Count one candidate under the reason it was left alone, or ``done``; True if it was rewritten."""
        self.stats[reason or done] += 1
        return reason is None

    def summary(self) -> dict:
        return dict(self.stats)


def node_order(graph: fx.Graph) -> dict[fx.Node, int]:
    """Each node's position in the graph (for "is defined before" checks)."""
    return {n: i for i, n in enumerate(graph.nodes)}


def node_device(node: fx.Node) -> Optional[torch.device]:
    v = value(node)
    if isinstance(v, (tuple, list)):
        v = v[0] if v else None
    return v.device if isinstance(v, torch.Tensor) else None
