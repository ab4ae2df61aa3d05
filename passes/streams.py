"""Streams: what may read a residual stream, how its sublayers are split into blocks, and the message
when nothing was found. Used by ``detect.build_plan`` once the sites are linked into streams.

Contract: reads the graph (through detect's site finder) and fills in the Stream/Site fields for
blocks and parameter names; raises ``ConversionError`` for streams that cannot be converted exactly.
"""
from __future__ import annotations

import operator

import re
from collections import Counter

import torch.fx as fx

from .errors import CONTROL_FLOW_HINT, ConversionError, is_control_flow

from . import norms
from .canonicalize import RESHAPE_METHODS
from .plan import Plan, Stream, split_blocks


def param_key(path: str) -> str:
    """A module path (or a description of an inlined norm) as a ModuleDict key: an identifier."""
    return re.sub(r"\W+", "_", path.replace(".", "__").replace(":", "__").replace("<", "").replace(">", "")).strip("_")


def check_stream_readers(stream: Stream, nodes: dict[str, fx.Node], finder, *, ends_at_output: bool = False) -> None:
    """Every intermediate stream value may only be read by the next site's norm and add (and by
    nodes that only look at its shape/dtype, which the rewrite points at the source instead).

    The stream's end must feed a norm (the final norm) or, with ``ends_at_output`` (one layer traced
    alone, whose output hands the stream to the next layer), only the graph's output."""
    problems = []
    source, first = nodes[stream.source_node], stream.sites[0]
    meta_readers = {r.name for r in finder.drop_metadata_edges(source)}
    allowed = set(first.norm_entry_nodes) | {first.add_node} | meta_readers
    for user in source.users:
        if user.name not in allowed:
            problems.append(
                f"the input of {first.sublayer} is also read by {norms.module_path(user) or '?'} "
                f"({user.op} {getattr(user.target, '__name__', user.target)})"
            )
    for site, nxt in zip(stream.sites, stream.sites[1:]):
        readers = finder.drop_metadata_edges(nodes[site.add_node])
        site.metadata_readers = [r.name for r in readers]
        allowed = set(nxt.norm_entry_nodes) | {nxt.add_node} | set(site.metadata_readers)
        for user in nodes[site.add_node].users:
            if user.name not in allowed:
                problems.append(
                    f"the stream after {site.sublayer} is also read by {norms.module_path(user) or '?'} "
                    f"({user.op} {getattr(user.target, '__name__', user.target)})"
                )
    if problems:
        raise ConversionError(
            "cannot convert exactly: a residual stream is read by something other than the next "
            "sublayer's norm and residual add (parallel branches, or a hidden state taken out mid-stream):\n  "
            + "\n  ".join(problems)
            + "\nAttnRes replaces these intermediate sums; convert a model whose stream is only read by norms."
        )
    last = nodes[stream.sites[-1].add_node]
    if ends_at_output:
        _check_stream_ends_at_output(stream, last, finder)
        return
    for user, alias in finder.effective_readers(last):  # the stream's end must feed a norm (the final norm)
        if user in finder.drop_metadata_edges(alias):
            continue  # reads only its dtype/shape (T5: `if hidden_states.dtype == torch.float16`)
        if not finder.is_norm_of(user, alias) and user not in finder.inlined_norm_region(alias):
            raise ConversionError(
                f"cannot convert exactly: the residual stream after {stream.sites[-1].sublayer} is read by "
                f"{norms.module_path(user) or user.name} ({user.op} {getattr(user.target, '__name__', user.target)}), "
                "which is not a normalization. AttnRes streams must end in a norm (the final norm); "
                + _why_not_a_norm(user)
            )
    readers = [u for u in last.users if u not in finder.drop_metadata_edges(last)]
    stream.consumer_nodes = [u.name for u in readers]
    inline = finder.inlined_norm_region(last)
    names = [norms.module_path(u) or u.name for u in readers if u not in inline]
    if inline & set(readers):  # an inlined final norm: name it by its output node
        names.append("inline norm " + norms.describe(finder.gm, finder._sorted(inline)[-1]))
    stream.consumers = names


def _check_stream_ends_at_output(stream: Stream, last: fx.Node, finder) -> None:
    metadata = finder.drop_metadata_edges(last)
    # FX puts a returned tuple (hidden_states, attn_weights) in the output node's own arguments; a tuple
    # built by concatenation, ``(hidden_states,) + attention_output[1:]`` (T5-style), is an add node
    others = [u for u in last.users if u not in metadata and u.op != "output" and not _returned_tuple_concat(u, last)]
    if others:
        user = others[0]
        raise ConversionError(
            f"the residual stream after {stream.sites[-1].sublayer} is read by "
            f"{norms.module_path(user) or user.name} ({user.op} {getattr(user.target, '__name__', user.target)}) "
            "inside the module that holds it, besides being returned"
        )
    stream.consumer_nodes, stream.consumers = [], ["output"]


def _returned_tuple_concat(user: fx.Node, value: fx.Node) -> bool:
    """``user`` is ``(..., value, ...) + rest``, a tuple only the output reads."""
    return (user.op == "call_function" and user.target is operator.add and isinstance(user.args[0], tuple)
            and value in user.args[0] and all(u.op == "output" for u in user.users))


def assign_blocks(stream: Stream, num_blocks, block_size, mixing) -> None:
    blocks = place_in_blocks(stream.sites, num_blocks, block_size)
    stream.num_blocks = max(blocks)
    stream.block_size = blocks.count(1)


def place_in_blocks(sites: list, num_blocks, block_size) -> list[int]:
    """Set each site's block, position in it and source count (sites in depth order); returns the
    blocks (also for a stream spread over several layers, ``layerwise.assign_global_blocks``)."""
    blocks = split_blocks(len(sites), num_blocks, block_size)
    position = 0
    for i, (site, block) in enumerate(zip(sites, blocks)):
        position = 0 if i == 0 or blocks[i - 1] != block else position + 1
        site.block, site.position = block, position
        site.num_sources = block + (1 if position > 0 else 0)  # b_0..b_{n-1} + partial
    return blocks


def assign_parameter_names(plan: Plan) -> None:
    """One query and one key-norm gain per aggregation, named after what it feeds.

    A site is named after its sublayer. Where two sites share a sublayer path (the branch ends in a
    LayerScale or a post-norm, so its common module prefix is the whole layer: DINOv2, Gemma2), both
    are named after their own norm instead, which is always the site's own; a name still shared
    (several stream ends read by one module) gets the site's stream and depth appended."""
    sites = [s for s in plan.sites if s.num_sources > 1]  # the first sublayer reads b_0 directly: no query
    by_sublayer = Counter(s.sublayer for s in plan.sites)
    # a sublayer "" is the layer traced alone itself (in-place conversion): named after its norm too
    names = [param_key(s.sublayer if s.sublayer and by_sublayer[s.sublayer] == 1 else s.norm) for s in sites]
    finals = [f"final__{param_key(st.consumers[0] if st.consumers else 'output')}" for st in plan.streams]
    taken = Counter(names + finals)
    for site, name in zip(sites, names):
        site.param_prefix = "attn_res." + (name if taken[name] == 1 else f"{name}__stream{site.stream}_{site.index}")
    for stream, name in zip(plan.streams, finals):
        stream.final_param_prefix = "attn_res." + (name if taken[name] == 1 else f"{name}__stream{stream.index}")


def nothing_matched_message(plan: Plan) -> str:
    lines = ["no pre-norm residual site `x + f(norm(x))` was found; nothing to convert."]
    if plan.left_out:
        lines.append("Residual adds that were seen but are not pre-norm:")
        for lo in plan.left_out[:8]:
            lines.append(f"  {lo.module or lo.node}: {lo.reason}")
        if len(plan.left_out) > 8:
            lines.append(f"  ... and {len(plan.left_out) - 8} more")
        lines.append("Post-norm models (norm(x + f(x)), e.g. BERT) cannot be given AttnRes exactly.")
    lines += _opaque_lines(plan.opaque_modules)
    if plan.opaque_with_norms:
        shown = ", ".join(plan.opaque_with_norms[:6]) + (" ..." if len(plan.opaque_with_norms) > 6 else "")
        lines.append(
            "These modules are kept whole because of their class name (attention/norm/embedding) but contain "
            f"a norm, so a residual may be inside: {shown}"
        )
    return "\n".join(lines)


def _opaque_lines(opaque_modules: dict[str, str]) -> list[str]:
    """Each module kept whole with the reason capture recorded (error, inner module, file:line)."""
    if not opaque_modules:
        return []
    lines = ["These modules could not be traced into and may hide residuals:"]
    lines += [f"  {path}: {why}" for path, why in opaque_modules.items()]
    if any(is_control_flow(why) for why in opaque_modules.values()):
        lines.append(CONTROL_FLOW_HINT)
    return lines


def _why_not_a_norm(user) -> str:
    name = getattr(user.target, "__name__", user.target)
    if name in RESHAPE_METHODS:
        return ("here the stream is reshaped between sublayers. The rewrite follows a sublayer run on a "
                "reshaped stream only when its residual sum is viewed straight back to the stream's shape "
                "(OPT's `(x.reshape(-1, D) + mlp(...)).view(x.shape)`, see passes/canonicalize.py).")
    return "this is typical of post-norm sublayers (x + norm(f(x))) or a model without a final norm."

