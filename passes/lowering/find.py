"""Pass 1, find: the aggregation ops in a captured graph.

Matches: ``call_function`` nodes calling ``residual_rewriter::attn_res`` (by name)
(the one op ``convert`` emits per residual site), in graph order.
Leaves: the graph unchanged (``PassResult.modified`` is always False). The later passes take the
list this pass returns; ``counts`` also reports the other library ops already in the graph
(a graph captured twice, or a model that calls them itself).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Optional

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from .common import ATTN_RES, library_op


@dataclass
class Aggregation:
    """One ``attn_res(sources, query, norm_weight, eps, scale)`` call, its arguments by name."""

    node: fx.Node
    sources: list[fx.Node]
    query: fx.Node
    norm_weight: Optional[fx.Node]
    eps: float
    scale: float

    @classmethod
    def of(cls, node: fx.Node) -> "Aggregation":
        args = dict(zip(("sources", "query", "norm_weight", "eps", "scale"), node.args))
        args.update(node.kwargs)
        return cls(node, list(args["sources"]), args["query"], args.get("norm_weight"), args["eps"], args["scale"])


def find_aggregations(graph: fx.Graph) -> list[Aggregation]:
    return [Aggregation.of(n) for n in graph.nodes if library_op(n) == ATTN_RES]


class FindAggregations(PassBase):
    """Collects the aggregations (``self.found``) and counts every library op (``self.counts``)."""

    name = "find"

    def __init__(self):
        super().__init__()
        self.found: list[Aggregation] = []
        self.counts: Counter = Counter()

    def call(self, gm: fx.GraphModule) -> PassResult:
        self.found = find_aggregations(gm.graph)
        self.counts = Counter(library_op(n).split("::")[1] for n in gm.graph.nodes if library_op(n))
        return PassResult(gm, False)

    def summary(self) -> dict:
        return {"aggregations": len(self.found), **{f"ops.{k}": v for k, v in sorted(self.counts.items())}}
