"""Canonicalise residual sums before detection.

A parallel block written ``(x + f(n(x))) + g(n(x))`` (Cohere) or ``x + f(n1(x)) + g(n2(x))``
(GPT-J style with two norms) adds the skip to its branches in an order that hides the pattern
``x + branch(x)``. ``regroup_residual_sums`` re-associates ``(x + f) + g`` into ``x + (f + g)`` when:
  * the inner add is used only by the outer one (nothing else sees the partial sum), and
  * ``x`` is an ancestor of both ``f`` and ``g``, which do not depend on each other.
Float addition is re-associated, so results change at rounding level only.

A sublayer written on a reshaped stream, ``(R(x) + g(n(R(x)))).view(x.shape)`` (OPT flattens the
tokens around its MLP: ``R = reshape(-1, D)``), hides the stream ``x``. ``sink_residual_reshapes``
rewrites it to ``x + g(n(R(x))).reshape(x.shape)`` when the sum is read only by that view back to
``x``'s own shape. Reshapes keep the elements' logical order, so this is exact.

A layer that routes the stream through identity modules (``x = self.tap_mid(x)``: taps that inspection
tools insert to read or patch activations) hides its adds from each other. ``look_through_identities``
erases the calls of ``nn.Identity`` modules that have no hooks, which is exact. The converted forward
does not call them (their hooks, if added later, do not fire); a hooked one is kept, and detection then
says where the stream is read.
"""
from __future__ import annotations

import operator

from typing import Callable

import networkx as nx
import torch
import torch.fx as fx
from torch import nn

from .rewrite import in_stream_dtype

_ADDS = {operator.add, torch.add}


def _is_add(n) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target in _ADDS and len(n.args) == 2 and not n.kwargs


def regroup_residual_sums(gm: fx.GraphModule) -> int:
    """Rewrite ``gm`` in place; returns how many adds were regrouped."""
    changed = 0
    progress = True
    while progress:
        progress = False
        dag = nx.DiGraph((i, n) for n in gm.graph.nodes for i in n.all_input_nodes)
        for outer in list(gm.graph.nodes):
            if not _is_add(outer):
                continue
            for inner, g in ((outer.args[0], outer.args[1]), (outer.args[1], outer.args[0])):
                if not (_is_add(inner) and isinstance(g, fx.Node) and len(inner.users) == 1):
                    continue
                for x, f in ((inner.args[0], inner.args[1]), (inner.args[1], inner.args[0])):
                    if not (isinstance(x, fx.Node) and isinstance(f, fx.Node)):
                        continue
                    anc_f, anc_g = nx.ancestors(dag, f), nx.ancestors(dag, g)
                    if x in anc_f and x in anc_g and f not in anc_g and g not in anc_f:
                        with gm.graph.inserting_before(outer):
                            # f in the stream's dtype first: ``(x + f) + g`` added f and g to an fp32
                            # stream under autocast; ``f + g`` alone would round their sum to bf16
                            f32 = gm.graph.call_function(in_stream_dtype, (f, x))
                            branch = gm.graph.call_function(operator.add, (f32, g))
                        outer.args = (x, branch)
                        gm.graph.erase_node(inner)
                        changed += 1
                        progress = True
                        break
                if progress:
                    break
            if progress:
                break
    if changed:
        gm.graph.lint()
        gm.recompile()
    return changed


# Tensor methods that re-lay out elements without changing them (also used by streams.py's messages).
RESHAPE_METHODS = {"reshape", "view", "flatten", "unflatten"}


def _is_reshape_of(n, x=None) -> bool:
    return (isinstance(n, fx.Node) and n.op == "call_method" and n.target in RESHAPE_METHODS
            and (x is None or n.args[0] is x))


def _is_shape_of(n) -> fx.Node | None:
    """``x.shape`` / ``x.size()`` -> x."""
    if not isinstance(n, fx.Node):
        return None
    if n.op == "call_function" and n.target is getattr and n.args[1] == "shape":
        return n.args[0]
    if n.op == "call_method" and n.target == "size" and len(n.args) == 1:
        return n.args[0]
    return None


def sink_residual_reshapes(gm: fx.GraphModule) -> int:
    """Rewrite ``gm`` in place; returns how many reshaped residual adds were moved back onto the stream."""
    changed = 0
    for back in list(gm.graph.nodes):
        # back = (R(x) + g).view(x.shape)
        if not (_is_reshape_of(back) and back.target in ("view", "reshape") and len(back.args) == 2 and not back.kwargs):
            continue
        add, x = back.args[0], _is_shape_of(back.args[1])
        if x is None or not _is_add(add) or set(add.users) != {back}:
            continue
        for r, g in ((add.args[0], add.args[1]), (add.args[1], add.args[0])):
            if _is_reshape_of(r, x) and isinstance(g, fx.Node):
                with gm.graph.inserting_before(back):
                    g_back = gm.graph.call_method("reshape", (g, back.args[1]))
                    new_add = gm.graph.call_function(operator.add, (x, g_back))
                back.replace_all_uses_with(new_add)
                gm.graph.erase_node(back)
                gm.graph.erase_node(add)
                changed += 1
                break
    if changed:
        gm.graph.lint()
        gm.recompile()
    return changed


def look_through_identities(gm: fx.GraphModule, hooked: Callable[[nn.Module], bool]) -> list[str]:
    """Erase the calls of hook-free ``nn.Identity`` modules from ``gm``; returns their module paths."""
    erased = []
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        module = gm.get_submodule(node.target)
        if type(module) is nn.Identity and not hooked(module):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            erased.append(node.target)
    if erased:
        gm.graph.lint()
        gm.recompile()
    return erased
