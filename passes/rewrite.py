"""Rewrite: turn a Plan into Block AttnRes in the graph.

For each stream (sites in depth order, source node b_0):
  * site l in block n, position i: ``h_l = attn_res([b_0 .. b_{n-1}] (+ partial if i > 0), q_l, g_l)``
    is inserted right after the previous residual add, and the site's norm reads ``h_l`` instead of x;
  * its branch output v_l starts (i == 0) or extends the running partial block sum; at a block's
    end the partial sum becomes the completed block b_n. A block's sum is kept in the dtype the
    original's residual adds would give it, ``promote_types(v, b_0)`` (``in_stream_dtype``): under
    autocast the stream stays fp32 while the branches are bf16, as in the original model, and every
    aggregation's sources share one dtype;
  * the stream's consumers (the final norm) read ``attn_res([b_0 .. b_N], q_final, g_final)``;
  * the original residual adds are erased.

New parameters (query zeros, key-norm gain ones) live in ``attn_res.<site>``. ``scale`` = number of
sources ("sum" mixing: a zero query gives back exactly the sum, the original model) or 1 ("mean").
"""
from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from .errors import ConversionError
from .plan import Plan, Stream
from .state import AttnResState, aligned


def in_stream_dtype(branch: torch.Tensor, stream_source: torch.Tensor) -> torch.Tensor:
    """A block's first branch output in the dtype the original ``stream + branch`` had (no copy when
    the dtypes already agree)."""
    return branch.to(torch.promote_types(branch.dtype, stream_source.dtype))


def scaled_like(t: torch.Tensor, s) -> torch.Tensor:
    """``t * s`` in ``t``'s dtype, out of place: what the original's ``t *= s`` computed (autograd may keep ``t``)."""
    return (t * s).to(t.dtype)


class AttnResQuery(nn.Module):
    """The learned pseudo-query of one aggregation and the gain of its key RMSNorm.

    ``reads``: what it mixes, ``(n, partial, mean)``: the completed block sums b_0..b_{n-1}, then the
    current block's partial sum if ``partial``; ``mean``: "mean" mixing. It travels in the state_dict
    (``<...>.attn_res.<site>._extra_state``) and a load checks it: a query trained on other sources
    (another num_blocks, block_size or mixing) would otherwise load silently and compute something else."""

    def __init__(self, hidden_size: int, reads: tuple[int, int, int], dtype=None, device=None):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(hidden_size, dtype=dtype, device=device))  # [D]
        self.key_norm_weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device))  # [D]
        self.reads = reads

    def extra_repr(self) -> str:
        return f"hidden_size={self.query.shape[0]}, reads {describe_reads(self.reads)}"

    def get_extra_state(self) -> torch.Tensor:
        return torch.tensor(self.reads)  # a tensor: safetensors (save_pretrained) saves nothing else

    def set_extra_state(self, state: torch.Tensor) -> None:
        saved = tuple(int(v) for v in state.tolist())
        if saved != self.reads:
            raise RuntimeError(
                f"this AttnRes query mixes {describe_reads(self.reads)}; the state_dict's was trained mixing "
                f"{describe_reads(saved)}. The state_dict comes from a model converted with other options "
                "(num_blocks, block_size, mixing): convert with the options it was saved with")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "query" in state_dict and prefix + "_extra_state" not in state_dict:
            warnings.warn("the state_dict records no AttnRes block layout (saved before residual_rewriter recorded "
                          "it); loaded as is: it must come from a model converted with the same num_blocks, "
                          "block_size and mixing", stacklevel=2)  # one message, shown once
            state_dict[prefix + "_extra_state"] = self.get_extra_state()  # load_state_dict's own copy of the dict
        try:
            super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        except RuntimeError as e:  # from set_extra_state: name the query
            raise RuntimeError(f"Error loading {prefix}_extra_state: {e}") from None


def describe_reads(reads: tuple[int, int, int]) -> str:
    n, partial, mean = reads
    blocks = "b_0" if n == 1 else f"b_0..b_{n - 1}"
    return blocks + (" + its block's partial sum" if partial else "") + (" (mean)" if mean else " (sum)")


@dataclass(frozen=True)
class LayerBoundary:
    """How one layer traced alone joins the stream (in-place conversion, ``passes/layerwise.py``).

    ``first``: its stream input is the plain tensor b_0. Otherwise it is an ``AttnResState`` holding
    ``blocks_in`` completed sums (b_0 included) and, when the layer starts inside a block (``partial_in``),
    the partial.
    ``last``: it returns the final aggregation (a tensor); otherwise the state, for the next layer.
    ``ends_block``: its last sublayer completes a block, so the state hands that sum over as a block."""

    first: bool
    last: bool
    blocks_in: int = 1
    ends_block: bool = False
    partial_in: bool = False


def is_attn_res_parameter(name: str) -> bool:
    """A parameter name conversion added: ``<holder>.attn_res.<site>.query`` / ``.key_norm_weight``."""
    return ".attn_res." in f".{name}"


class AttnResParameters(nn.Module):
    """The queries and gains of one layer's aggregations (``<layer>.attn_res.<site>``), in place.

    A plain module rather than a ModuleDict, so that PEFT can train and save it
    (``LoraConfig(modules_to_save=["attn_res"])`` refuses containers); ``attn_res["mlp"]`` indexes it."""

    def __getitem__(self, key: str) -> AttnResQuery:
        return self._modules[key]


def apply_plan(
    gm: fx.GraphModule,
    plan: Plan,
    values: dict,
    *,
    eps: float,
    mixing: str,
    attn_res: nn.Module,
    layer: LayerBoundary | None = None,
) -> fx.GraphModule:
    """Rewrite ``gm`` in place following ``plan``. ``attn_res``: the holder's parameters, created for
    the first graph and shared by later ones (by site key). ``layer``: ``gm`` is one layer of a stream,
    traced alone (one stream; see ``LayerBoundary``); None: the model itself, its streams inside it."""
    keys = [s.param_prefix for s in plan.sites if s.param_prefix]
    keys += [st.final_param_prefix for st in plan.streams if layer is None or layer.last]
    reused = sorted({k for k in keys if keys.count(k) > 1})
    if reused:  # one query per aggregation: a shared one would be exact at init, train, and not be AttnRes
        raise ConversionError(f"internal error: aggregations would share the parameters {reused}; please report it")
    gm.add_module("attn_res", attn_res)
    for stream in plan.streams:
        _rewrite_stream(gm, stream, values, eps=eps, mixing=mixing, layer=layer)
    gm.graph.lint()
    gm.recompile()
    return gm


def _rewrite_stream(
    gm: fx.GraphModule, stream: Stream, values: dict, *, eps: float, mixing: str, layer: LayerBoundary | None
) -> None:
    graph = gm.graph
    nodes = {n.name: n for n in graph.nodes}
    source = nodes[stream.source_node]

    def aggregate(after: fx.Node, blocks: list[fx.Node], partial: fx.Node | None, prefix: str) -> fx.Node:
        sources = blocks + ([partial] if partial is not None else [])
        key, reads = prefix.split(".", 1)[1], (len(blocks), int(partial is not None), int(mixing == "mean"))
        # several graphs of one model (one per call signature) share them. hasattr, not `in`: under
        # PEFT's modules_to_save the container is a wrapper that forwards attribute lookups only
        if not hasattr(gm.attn_res, key):
            example = values[source]  # [..., D]
            gm.attn_res.add_module(key, AttnResQuery(stream.hidden_size, reads, dtype=example.dtype, device=example.device))
        elif getattr(gm.attn_res, key).reads != reads:
            raise ConversionError(f"internal error: two graphs of one layer mix different sources at {prefix}; please report it")
        scale = float(len(sources)) if mixing == "sum" else 1.0
        with graph.inserting_after(after):
            q = graph.get_attr(f"{prefix}.query")
        with graph.inserting_after(q):
            g = graph.get_attr(f"{prefix}.key_norm_weight")
        with graph.inserting_after(g):
            # looked up now, not at import: building some models refreshes torch.ops (passes/op_names.py)
            h = graph.call_function(torch.ops.residual_rewriter.attn_res.default, (list(sources), q, g, eps, scale))
        h.meta["residual_rewriter"] = {"prefix": prefix, "stream": stream.index}
        return h

    blocks, partial, inserted = _stream_entry(graph, source, layer, dtype=stream.dtype)
    b_0 = blocks[0]  # a tensor with the stream's shape and dtype, whatever the entry
    if layer is not None and not layer.first:  # shape/dtype readers of a state input read b_0 instead
        for user in list(source.users):
            if user not in inserted:
                user.replace_input_with(source, b_0)
    cursor = inserted[-1] if inserted else source  # new nodes go right after the value they follow
    for k, site in enumerate(stream.sites):
        if site.position == 0:
            partial = None
        x = nodes[site.skip_node] if k else b_0
        if len(blocks) + (partial is not None) > 1:
            h = aggregate(cursor, blocks, partial, site.param_prefix)
            if site.skip_view:  # its norm (and shape readers) read the same view of h: x.reshape(B, -1, C) -> h.reshape(...)
                with graph.inserting_before(x):  # where the view's sizes are known
                    view = graph.node_copy(x, lambda n: h if n is x.args[0] else n)
                x.replace_all_uses_with(view, delete_user_cb=lambda user: user.name not in (site.add_node, site.skip_gain))
            for name in site.norm_entry_nodes:
                nodes[name].replace_input_with(x, h)
        # else: the very first sublayer has one source, b_0 == x: softmax over one source is 1, so it
        # reads x directly and gets no query (a query there could never receive a gradient).
        add, v = nodes[site.add_node], nodes[site.branch_node]
        if site.skip_view:  # its output back in the stream's shape (a reshape keeps the elements' order)
            with graph.inserting_after(add):
                v = graph.call_method("reshape_as", (v, b_0))
            add = v
        if site.skip_gain:  # the add read w * x: every source so far is scaled before v joins them
            blocks, partial = _scaled(graph, nodes[site.skip_gain], {b_0, nodes[site.skip_node]}, blocks, partial)
        with graph.inserting_after(add):
            if partial is None:  # a block starts
                partial = graph.call_function(in_stream_dtype, (v, b_0))
            else:
                partial = graph.call_function(operator.add, (partial, v))
        cursor = partial
        last_in_block = k + 1 == len(stream.sites) or stream.sites[k + 1].block != site.block
        if last_in_block and (k + 1 < len(stream.sites) or layer is None or layer.last or layer.ends_block):
            blocks.append(partial)
            partial = None
    for site in stream.sites[:-1]:  # shape/dtype-only readers of a stream value now read the source
        for name in site.metadata_readers:
            nodes[name].replace_input_with(nodes[site.add_node], b_0)
    end = nodes[stream.sites[-1].add_node]
    if stream.end_view:  # the output viewed the end back to the stream's shape: the end already has it
        view = nodes[stream.end_view]
        view.replace_all_uses_with(end)
        while view is not end:
            view, erased = view.args[0], view
            graph.erase_node(erased)
    scale = nodes[stream.sites[-1].end_scale] if stream.sites[-1].end_scale else None
    if scale is not None:  # the layer returns end * s: what is read next is s * (b_0 + ... + partial), term by term
        blocks, partial = _scaled(graph, scale, {end}, blocks, partial, in_place=True)
        cursor = partial if partial is not None else blocks[-1]
    if layer is None or layer.last:
        out = aggregate(cursor, blocks, partial, stream.final_param_prefix)
    else:
        with graph.inserting_after(cursor):
            out = graph.call_function(AttnResState, (tuple(blocks), partial))
    if scale is not None:
        scale.replace_all_uses_with(out)
        graph.erase_node(scale)
    end.replace_all_uses_with(out if scale is None else b_0)  # past a scale, the end's readers read its shape or dtype only
    for site in reversed(stream.sites):
        dead = [nodes[site.add_node]]  # and what it read the skip through, now read by nothing: x.to(dtype), w * x
        while dead:
            node = dead.pop()
            dead += [n for n in node.all_input_nodes if n.name not in (site.skip_node, site.branch_node)
                     and n.op in ("call_function", "call_method") and len(n.users) == 1]
            graph.erase_node(node)
        if site.skip_view and not nodes[site.skip_view].users:
            graph.erase_node(nodes[site.skip_view])  # the view of the stream the sublayer read before


def _scaled(graph: fx.Graph, mul: fx.Node, stream_values: set, blocks: list, partial, in_place=False):
    """``blocks`` and ``partial`` each times the factor of ``mul`` (``x * s`` with x among ``stream_values``), inserted
    before ``mul``: the stream, their sum, scaled term by term. ``in_place``: in their dtype, as ``x *= s`` is."""
    def is_stream(a) -> bool:  # x itself, or x.to(dtype)
        return isinstance(a, fx.Node) and bool(stream_values & {a, *a.all_input_nodes})

    s = next(a for a in mul.args if not is_stream(a))
    times = scaled_like if in_place else operator.mul
    with graph.inserting_before(mul):
        return [graph.call_function(times, (b, s)) for b in blocks], None if partial is None else graph.call_function(times, (partial, s))


def _stream_entry(graph: fx.Graph, source: fx.Node, layer: LayerBoundary | None, dtype: str):
    """(completed sums, partial, nodes inserted) where the stream enters the graph. ``dtype``: b_0 is
    widened to it first, as the original's first add widened the stream (``x.to(float32) + f``)."""
    if layer is None or layer.first:
        if not dtype:
            return [source], None, []
        with graph.inserting_after(source):
            b_0 = graph.call_method("to", (source, getattr(torch, dtype)))
        return [b_0], None, [b_0]
    # the input is an AttnResState (the layers before may have been skipped); nodes in this order after it
    with graph.inserting_before(source.next):
        state = graph.call_function(aligned, (source, layer.blocks_in, layer.partial_in))
        blocks_tuple = graph.call_function(getattr, (state, "blocks"))
        blocks = [graph.call_function(operator.getitem, (blocks_tuple, i)) for i in range(layer.blocks_in)]
        partial = graph.call_function(getattr, (state, "partial")) if layer.partial_in else None  # starts inside a block
    return blocks, partial, [state, blocks_tuple, *blocks] + ([partial] if partial is not None else [])
