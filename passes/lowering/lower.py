"""Pass 4, lower: choose how each library op runs once compiled.

* ``"triton"``: keep the ops. They ARE the Triton kernels on CUDA (``kernels/attn_res/dispatch.py``),
  and inductor calls them as extern kernels between its own fused kernels; AOT autograd takes their
  backward from the ops' autograd registrations (the Triton backward kernels). The pass checks that
  they can run there — CUDA tensors, an importable triton — and raises
  ``LoweringError`` otherwise: asking for Triton never silently gives something else.
* ``"decompose"``: replace each op by its reference math in plain torch ops (``decompose.py``). On
  CPU this is what inductor fuses best: the opaque op would run the Python reference unfused, while
  the decomposed form fuses with the neighbouring norm and adds, and autograd derives the backward.
* ``"auto"`` (default): ``"triton"`` for ops on CUDA tensors, ``"decompose"`` for everything else.

Matches: every ``attn_res`` / ``attn_res_phase1`` / ``attn_res_phase2`` / ``attn_res_normed`` /
``attn_res_phase2_normed`` / ``attn_res_phase2_add_normed`` node.
Leaves: the rest of the graph. With ``"triton"`` the graph is unchanged (the result says so).
"""
from __future__ import annotations

import logging
import torch
import torch.fx as fx
from torch.fx.proxy import GraphAppendingTracer, Proxy

from . import decompose as D
from .common import (
    ATTN_RES, NORMED, PHASE1, PHASE1_NORMED, PHASE2, PHASE2_ADD_NORMED, PHASE2_NORMED, CountingPass, LoweringError,
    copy_location,
    erase_unused, getitem_users, infer_meta, library_op, node_device, value,
)

log = logging.getLogger("residual_rewriter.backend")

TARGETS = ("auto", "triton", "decompose")


def _source_dtype(node: fx.Node) -> torch.dtype:
    first = node.args[0]
    v = value(first[0] if isinstance(first, (list, tuple)) else first)
    if not isinstance(v, torch.Tensor):
        raise LoweringError(f"{node.name}: no recorded dtype for its inputs; cannot decompose it (run in a Dynamo graph)")
    return v.dtype


def _decomposition(node: fx.Node):
    """(function, extra keyword arguments) giving ``node``'s math on Proxy arguments."""
    dtype = _source_dtype(node)
    name = library_op(node)
    if name == ATTN_RES:
        return D.attn_res, {"dtype": dtype}
    if name == NORMED:
        return D.attn_res_normed, {"dtype": dtype}
    if name == PHASE2:
        return D.attn_res_phase2, {"dtype": dtype}
    if name == PHASE2_NORMED:
        return D.attn_res_phase2_normed, {"dtype": dtype}
    if name == PHASE2_ADD_NORMED:
        return D.attn_res_phase2_add_normed, {"dtype": dtype}
    if name == PHASE1:
        return D.attn_res_phase1, {"dtype": dtype, "num_queries": int(value(node.args[1]).shape[0])}
    if name == PHASE1_NORMED:
        return D.attn_res_phase1_normed, {"dtype": dtype, "num_queries": int(value(node.args[1]).shape[0])}
    raise AssertionError(node.target)


def decompose_node(gm: fx.GraphModule, node: fx.Node) -> None:
    """Replace one library-op node by its math, in place (readers of tuple outputs are rewired)."""
    graph = gm.graph
    fn, extra = _decomposition(node)
    tracer = GraphAppendingTracer(graph)
    before = set(graph.nodes)
    with graph.inserting_before(node):
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: Proxy(n, tracer))
        result = fn(*args, **kwargs, **extra)
    new_nodes = [n for n in graph.nodes if n not in before]
    for n in new_nodes:
        copy_location(n, node)
    infer_meta(new_nodes)
    if isinstance(result, tuple):  # phase1 / the normed ops: rewire each `node[i]` reader
        readers = getitem_users(node)
        done = []
        for i, users in readers.items():
            for u in users:
                if isinstance(result[i], list):  # phase 1's per-query outputs: rewire each `node[i][j]`
                    for j, inner in getitem_users(u).items():
                        for w in inner:
                            w.replace_all_uses_with(result[i][j].node)
                        done += inner
                else:
                    u.replace_all_uses_with(result[i].node)
                done.append(u)
        erase_unused(done + [node])
    else:
        node.replace_all_uses_with(result.node)
        erase_unused([node])


def _check_triton(node: fx.Node) -> None:
    dev = node_device(node)
    if dev is None or dev.type != "cuda":
        raise LoweringError(
            f"lower='triton' asked for, but {node.name} ({node.target}) runs on {dev}: the Triton kernels need "
            "CUDA tensors. Use lower='decompose' (or 'auto') on CPU."
        )
    if not torch.cuda.is_available():
        raise LoweringError("lower='triton' asked for, but torch.cuda.is_available() is False")
    try:
        import triton  # noqa: F401
    except ImportError as e:
        raise LoweringError(f"lower='triton' asked for, but triton does not import: {e}") from e


class Lower(CountingPass):
    name = "lower"

    def __init__(self, target: str = "auto"):
        super().__init__()
        if target not in TARGETS:
            raise ValueError(f"lower target must be one of {TARGETS}, got {target!r}")
        self.target = target

    def choice(self, node: fx.Node) -> str:
        """"triton" (the op stays, its kernels run) or "decompose" (torch math) for one library-op node."""
        if self.target != "auto":
            return self.target
        dev = node_device(node)
        return "triton" if dev is not None and dev.type == "cuda" else "decompose"

    def rewrite(self, gm: fx.GraphModule) -> bool:
        modified = False
        for node in [n for n in gm.graph.nodes if library_op(n)]:
            name = library_op(node).split("::")[1]
            if self.choice(node) == "triton":
                _check_triton(node)
                self.stats[f"triton.{name}"] += 1
            else:
                decompose_node(gm, node)
                self.stats[f"decomposed.{name}"] += 1
                modified = True
        return modified
