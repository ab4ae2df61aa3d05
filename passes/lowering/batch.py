"""Pass 2, batch: the paper's two-phase schedule (its Algorithm 1).

Inside block n every sublayer reads the same completed blocks ``C = [b_0 .. b_{n-1}]``; sublayer i > 0
also reads the running partial block ``p_i``. Queries are parameters, not activations, so the scores
of ALL the block's queries against C can be computed in one pass before the block runs:

    outs, lse = attn_res_phase1(C, stack([q_0 .. q_{S-1}]), stack([g_0 ..]), eps)  # reads C once
    h_i = attn_res_phase2(outs[i], lse[i], p_i or None, q_i, g_i, eps, scale_i)      # per sublayer

``attn_res_phase2`` merges with the partial block by online softmax, so ``h_i`` equals the original
``attn_res(C + [p_i], q_i, g_i, eps, scale_i)`` (the library ops' spec; tested).

Grouping, from the graph alone (Dynamo's graph keeps none of ``convert``'s metadata): an aggregation
is a group HEAD when its source list is exactly the "all but last" prefix of a later aggregation (the
first sublayer of a block: the next one adds the partial block); otherwise it is a TAIL of the group
keyed by its own sources minus the last one (that last one is its partial block). This reproduces the
block structure ``convert`` builds: each block is one group, and the stream's final aggregation
(``C_N + [b_N]``) joins the last block's group. With Full AttnRes (block size 1) every site is a head
of its own group, so nothing batches except the last site together with the final aggregation.

Matches: ``attn_res`` nodes; groups of two or more members with equal eps and the same presence of
key-norm gains, whose shared sources and parameters are all defined before the group's first member.
Leaves: singleton groups as plain ``attn_res`` (the fuse-norm pass may still take them); groups whose
completed blocks are ONE tensor (the first block, which has only b_0): phase 1 over one source is a
copy of it (o = b_0, written once per query and read back by the merges), so each aggregation reading
b_0 and its partial itself moves less (counted as ``one_completed_block``); everything else.
"""
from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx as fx
from .common import PHASE1, PHASE2, CountingPass, copy_location, erase_unused, infer_meta, node_order, op, value
from .find import Aggregation, find_aggregations

log = logging.getLogger("residual_rewriter.backend")


@dataclass
class Group:
    """Aggregations that share the phase-1 sources ``shared``; ``partials[i]`` is member i's extra source."""

    shared: tuple[fx.Node, ...]
    eps: float
    members: list[Aggregation] = field(default_factory=list)
    partials: list[Optional[fx.Node]] = field(default_factory=list)


def _key(sources, agg: Aggregation):
    return (tuple(sources), agg.eps, agg.norm_weight is not None)


def plan_groups(aggs: list[Aggregation]) -> list[Group]:
    """Assign every aggregation to one group (see the module docstring), in graph order."""
    later_prefixes: set = set()
    heads = set()
    for agg in reversed(aggs):  # a head's sources are the prefix of a LATER aggregation
        if _key(agg.sources, agg) in later_prefixes:
            heads.add(agg.node)
        if len(agg.sources) >= 2:
            later_prefixes.add(_key(agg.sources[:-1], agg))
    groups: dict = {}
    for agg in aggs:
        is_tail = agg.node not in heads and len(agg.sources) >= 2
        shared = agg.sources[:-1] if is_tail else agg.sources
        key = _key(shared, agg)
        group = groups.setdefault(key, Group(tuple(shared), agg.eps))
        group.members.append(agg)
        group.partials.append(agg.sources[-1] if is_tail else None)
    return list(groups.values())


def _remap(group: Group, replaced: dict) -> None:
    group.shared = tuple(replaced.get(s, s) for s in group.shared)
    group.partials = [replaced.get(p, p) if p is not None else None for p in group.partials]
    for agg in group.members:
        agg.sources = [replaced.get(s, s) for s in agg.sources]


class BatchTwoPhase(CountingPass):
    """Rewrites each multi-member group into one ``attn_res_phase1`` plus one ``attn_res_phase2`` per member."""

    name = "batch_two_phase"

    def rewrite(self, gm: fx.GraphModule) -> bool:
        graph = gm.graph
        modified = False
        replaced: dict[fx.Node, fx.Node] = {}  # erased aggregation -> its phase-2 replacement
        for group in plan_groups(find_aggregations(graph)):
            if len(group.members) < 2:
                self.stats["singletons"] += 1
                continue
            if len(group.shared) == 1:  # the first block: see the module docstring
                self.stats["one_completed_block"] += len(group.members)
                continue
            if replaced:  # a group reading an aggregation rewritten earlier (not in convert's graphs)
                _remap(group, replaced)
            reason = self._rewrite(gm, group, replaced)
            if reason:
                log.info("batch_two_phase: left a group of %d as is: %s", len(group.members), reason)
                self.stats["skipped_groups"] += 1
                continue
            modified = True
            self.stats["phase1"] += 1
            self.stats["phase2"] += len(group.members)
        return modified

    def _rewrite(self, gm: fx.GraphModule, group: Group, replaced: dict) -> Optional[str]:
        graph = gm.graph
        order = node_order(graph)
        members = sorted(group.members, key=lambda a: order[a.node])
        partial_of = dict(zip((a.node for a in group.members), group.partials))
        first = members[0].node
        queries = [a.query for a in members]
        gains = [a.norm_weight for a in members] if members[0].norm_weight is not None else None
        dtypes = {getattr(value(q), "dtype", None) for q in queries + (gains or [])}
        if len(dtypes) > 1:
            return f"queries/gains of mixed dtypes {dtypes}"

        # Phase 1 goes right before the group's first member: the shared sources must exist there,
        # and so must every query and gain (placeholders in a Dynamo graph; a get_attr that comes
        # later is re-read at the insertion point).
        def available(node: fx.Node) -> Optional[fx.Node]:
            if order[node] < order[first]:
                return node
            if node.op == "get_attr":
                with graph.inserting_before(first):
                    return graph.get_attr(node.target)
            return None

        if any(order[s] >= order[first] for s in group.shared):
            return "a shared source is computed after the group's first member"
        late = [n for n in queries + (gains or []) if order[n] >= order[first]]
        if any(n.op != "get_attr" for n in late):
            return "a query or gain is computed after the group's first member"
        q_nodes = [available(q) for q in queries]
        g_nodes = [available(g) for g in gains] if gains is not None else None

        new_nodes = []
        with graph.inserting_before(first):
            q_stack = graph.call_function(torch.stack, (q_nodes,))  # [S, D]
            g_stack = graph.call_function(torch.stack, (g_nodes,)) if g_nodes is not None else None  # [S, D]
            p1 = graph.call_function(op(PHASE1), (list(group.shared), q_stack, g_stack, group.eps))
            outs = graph.call_function(operator.getitem, (p1, 0))  # S x [..., D]
            lse = graph.call_function(operator.getitem, (p1, 1))  # [S, ...] fp32
            new_nodes += [q_stack] + ([g_stack] if g_stack is not None else []) + [p1, outs, lse]
        for j, agg in enumerate(members):
            with graph.inserting_before(agg.node):
                o_j = graph.call_function(operator.getitem, (outs, j))  # [..., D]
                l_j = graph.call_function(torch.select, (lse, 0, j))  # [...]
                h = graph.call_function(
                    op(PHASE2), (o_j, l_j, partial_of[agg.node], agg.query, agg.norm_weight, agg.eps, agg.scale)
                )
            for n in (o_j, l_j, h):
                copy_location(n, agg.node)
            new_nodes += [o_j, l_j, h]
            agg.node.replace_all_uses_with(h)
            replaced[agg.node] = h
        copy_location(p1, first)
        infer_meta(new_nodes)
        erase_unused([a.node for a in members])
        return None
