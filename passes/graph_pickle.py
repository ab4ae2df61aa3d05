"""How a converted holder's graphs travel through pickle (``torch.save(model)``, multiprocessing): as
lists of node records and the objects their nodes name, their code generated again on load. Neither an
``fx.Graph`` nor a GraphModule pickles as it is: a graph's name table and its operator overloads
(``torch.ops.residual_rewriter.attn_res.default``) refuse to, and a GraphModule traces its code again on
load, with the tracer that made it (ours needs the model)."""
from __future__ import annotations

import operator
from typing import Any, NamedTuple

import torch
import torch.fx as fx
from torch.fx.node import map_aggregate


class OperatorName(NamedTuple):
    namespace: str
    name: str
    overload: str

    def resolve(self) -> torch._ops.OpOverload:
        return getattr(getattr(getattr(torch.ops, self.namespace), self.name), self.overload)


class NodeName(str):
    """A node's argument that is another node."""


def graph_to_pickle(graph: fx.Graph) -> list[tuple]:
    """Each node as ``(op, name, target, args, kwargs, type, meta)``, in order."""
    def target(t):
        return OperatorName(t.namespace, t._opname, t._overloadname) if isinstance(t, torch._ops.OpOverload) else t

    def names(a):
        return fx.map_arg(a, lambda n: NodeName(n.name))

    return [(n.op, n.name, target(n.target), names(n.args), names(n.kwargs), n.type, n.meta) for n in graph.nodes]


def unpickled_graph(records: list[tuple]) -> fx.Graph:
    graph, nodes = fx.Graph(), {}

    def load(a):
        return map_aggregate(a, lambda x: nodes[x] if isinstance(x, NodeName) else x)

    for op, name, target, args, kwargs, type_expr, meta in records:
        target = target.resolve() if isinstance(target, OperatorName) else target
        nodes[name] = node = graph.create_node(op, target, load(args), load(kwargs), name=name, type_expr=type_expr)
        node.meta = meta
    return graph


def graph_module_to_pickle(gm: fx.GraphModule) -> tuple[dict[str, Any], list[tuple]]:
    """The objects ``gm``'s nodes name (shared with the model within one pickle) and its graph."""
    named = {n.target: operator.attrgetter(n.target)(gm) for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}
    return named, graph_to_pickle(gm.graph)


def unpickled_graph_module(named: dict[str, Any], records: list[tuple]) -> fx.GraphModule:
    return fx.GraphModule(named, unpickled_graph(records))
