"""Each rewritten module's graph before and after the rewrite, one readable line per node, and a
diff of what changed.

A converted model's holders (its decoder layers, or the model itself) each run a rewritten graph
(``layer.forward.graph_module``; the graph before it is ``layer.forward.original_graph``). The
graphs are module level (``call_module`` nodes for norms, attention, MLPs), so a readable view only
has to drop FX's bookkeeping (``get_attr`` nodes that only feed an aggregation) and print each node as
``name = callee(inputs)``. Node names are shared before and after, so a line-based diff shows
exactly the nodes the rewrite added, erased or rewired, and nothing else.
"""
from __future__ import annotations

import difflib
import operator
from dataclasses import dataclass
from typing import Any, Union

import torch
import torch.fx as fx
from torch import nn

from residual_rewriter.passes.layerwise import installed_forwards
from residual_rewriter.passes.op_names import is_attn_res
from residual_rewriter.report import ConversionReport

_OPERATOR_NAMES = {operator.add: "add", operator.mul: "mul", operator.sub: "sub", operator.getitem: "getitem"}


def is_aggregation(node: fx.Node) -> bool:
    """An AttnRes aggregation inserted by ``convert``: ``attn_res(sources, query, key_norm_weight, eps, scale)``.

    Matched by op name, not identity: building some models refreshes ``torch.ops`` caches, after which
    ``torch.ops.residual_rewriter.attn_res.default`` is a new object (see ``passes/op_names.py``).
    """
    return is_attn_res(node)


def _folded(node: fx.Node) -> bool:
    """get_attr nodes that only feed aggregations are shown inside the aggregation's line instead."""
    return node.op == "get_attr" and bool(node.users) and all(is_aggregation(u) for u in node.users)


def _fmt(arg: Any) -> str:
    if isinstance(arg, fx.Node):
        return arg.name
    if isinstance(arg, (list, tuple)):
        inner = ", ".join(_fmt(a) for a in arg)
        return f"[{inner}]" if isinstance(arg, list) else f"({inner}{',' if len(arg) == 1 else ''})"
    if isinstance(arg, dict):
        return "{" + ", ".join(f"{k!r}: {_fmt(v)}" for k, v in arg.items()) + "}"
    return repr(arg)


def _call(args: tuple, kwargs: dict) -> str:
    parts = [_fmt(a) for a in args] + [f"{k}={_fmt(v)}" for k, v in kwargs.items()]
    return "(" + ", ".join(parts) + ")"


def _function_name(target: Any) -> str:
    if target in _OPERATOR_NAMES:
        return _OPERATOR_NAMES[target]
    if isinstance(target, torch._ops.OpOverload):
        return str(target)  # e.g. aten.add.Tensor
    return getattr(target, "__name__", repr(target))


def node_line(node: fx.Node) -> str:
    """One node as ``name = callee(inputs)``; stable across the rewrite for nodes it did not touch."""
    if node.op == "placeholder":
        return f"input {node.name}"
    if node.op == "output":
        return f"return {_fmt(node.args[0])}"
    if node.op == "get_attr":
        return f"{node.name} = self.{node.target}"
    if node.op == "call_module":
        return f"{node.name} = {node.target}{_call(node.args, node.kwargs)}"
    if node.op == "call_method":
        obj, *rest = node.args
        return f"{node.name} = {_fmt(obj)}.{node.target}{_call(tuple(rest), node.kwargs)}"
    if is_aggregation(node):
        sources, query, _gain, _eps, scale = node.args
        prefix = node.meta.get("residual_rewriter", {}).get("prefix") or getattr(query, "target", "?").rsplit(".", 1)[0]
        return f"{node.name} = AttnRes[{prefix}]({', '.join(_fmt(s) for s in sources)}; scale={scale:g})"
    return f"{node.name} = {_function_name(node.target)}{_call(node.args, node.kwargs)}"


def readable_graph(graph: Union[fx.Graph, fx.GraphModule]) -> str:
    """The graph as text, one line per node (module-level calls, aggregations on one line each)."""
    if isinstance(graph, fx.GraphModule):
        graph = graph.graph
    return "\n".join(node_line(n) for n in graph.nodes if not _folded(n))


def holder_graphs(model: Union[nn.Module, ConversionReport]) -> list[tuple[str, fx.Graph, fx.Graph]]:
    """``(holder path, graph before, graph after)`` for every module whose forward was rewritten."""
    if isinstance(model, ConversionReport):
        raise TypeError(
            "a ConversionReport holds no graph: pass the converted model "
            "(a detect() report changes nothing, so there is nothing to show)"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a converted model (an nn.Module), got {type(model).__name__}")
    return [(path, f.original_graph, f.graph_module.graph) for path, f in installed_forwards(model)]


def _header(path: str) -> str:
    return f"# {path or '(the model itself)'}"


def graphs_before_after(model: Union[nn.Module, ConversionReport]) -> tuple[str, str]:
    """``(before, after)`` readable listings, one section per rewritten module. A model that was never
    converted gives two empty listings."""
    before, after = [], []
    for path, original, rewritten in holder_graphs(model):
        before += [_header(path), readable_graph(original)]
        after += [_header(path), readable_graph(rewritten)]
    return "\n".join(before), "\n".join(after)


def graph_diff(model: Union[nn.Module, ConversionReport], *, context: int = 1) -> str:
    """A unified diff of each rewritten module's readable graph, before -> after: only what changed.

    Empty when nothing was rewritten: a ``detect()`` report, or any unconverted ``nn.Module``.
    """
    if isinstance(model, ConversionReport):
        if model.converted:
            raise TypeError("a ConversionReport holds no graph: pass the converted model to diff it")
        return ""
    sections = []
    for path, original, rewritten in holder_graphs(model):
        lines = difflib.unified_diff(readable_graph(original).splitlines(), readable_graph(rewritten).splitlines(),
                                     f"{path or 'model'} before", f"{path or 'model'} after (AttnRes)", n=context, lineterm="")
        sections.append("\n".join([_header(path), *lines]))
    return "\n".join(sections)


@dataclass
class GraphChanges:
    """Counts of what the rewrite did to the graph, from the two listings (node names are shared)."""

    nodes_before: int
    nodes_after: int
    added: list[str]  # node names only in the rewritten graph (aggregations, partial block sums)
    removed: list[str]  # node names only in the captured graph (the residual adds)
    rewired: list[str]  # nodes in both whose inputs changed (the norms now read an aggregation)
    aggregations: int

    def __str__(self) -> str:
        return (
            f"graph: {self.nodes_before} nodes before, {self.nodes_after} after; "
            f"{len(self.added)} added ({self.aggregations} aggregations), {len(self.removed)} removed, "
            f"{len(self.rewired)} rewired"
        )


def graph_changes(model: nn.Module) -> GraphChanges:
    """What the rewrite did, summed over the rewritten modules (node names prefixed by their module)."""
    b, a, aggregations = {}, {}, 0

    def by_name(path: str, graph: fx.Graph) -> dict[str, str]:
        # "name = ..." lines by name; inputs by themselves; the return line as "return" (rewired when
        # the layer now returns the AttnRes state)
        lines = readable_graph(graph).splitlines()
        return {f"{path}:{'return' if line.startswith('return ') else line.split(' = ', 1)[0]}": line for line in lines}

    for path, original, rewritten in holder_graphs(model):
        b.update(by_name(path, original))
        a.update(by_name(path, rewritten))
        aggregations += sum(1 for n in rewritten.nodes if is_aggregation(n))
    return GraphChanges(
        nodes_before=len(b),
        nodes_after=len(a),
        added=[k for k in a if k not in b],
        removed=[k for k in b if k not in a],
        rewired=[k for k in a if k in b and a[k] != b[k]],
        aggregations=aggregations,
    )
