"""Canonicalise residual sums before detection.

A parallel block written ``(x + f(n(x))) + g(n(x))`` (Cohere) or ``x + f(n1(x)) + g(n2(x))``
(GPT-J style with two norms) adds the skip to its branches in an order that hides the pattern
``x + branch(x)``. ``regroup_residual_sums`` re-associates ``(x + f) + g`` into ``x + (f + g)`` when:
  * the inner add is used only by the outer one (nothing else sees the partial sum), and
  * ``x`` is an ancestor of both ``f`` and ``g``, which do not depend on each other.
Float addition is re-associated, so results change at rounding level only.
"""
from __future__ import annotations

import operator

import networkx as nx
import torch
import torch.fx as fx

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
                            branch = gm.graph.call_function(operator.add, (f, g))
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
