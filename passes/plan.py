"""The Plan: what detection found, as plain data (the report users read is this plan, printed), and
how each stream's sublayers are split into blocks and their parameters named.

Graph nodes are referred to by name (``Site.add_node`` ...) so a plan can be printed, compared and
serialised without holding the graph.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class Site:
    """One residual sublayer: ``x + f(norm(x))``."""

    stream: int
    index: int  # depth order within its stream, 0-based
    norm: str  # module path of the norm (or a description of an inlined/functional norm)
    sublayer: str  # module path of f (common prefix of what the branch calls)
    block: int = -1  # 1-based; block 0 is the stream's source (the embedding)
    position: int = -1  # 0-based position within its block
    num_sources: int = 0  # sources its aggregation reads
    param_prefix: str = ""  # where its query/gain live on the converted module
    # graph handles
    add_node: str = ""
    skip_node: str = ""
    branch_node: str = ""
    norm_node: str = ""
    norm_entry_nodes: list[str] = field(default_factory=list)  # nodes of the norm that read x directly
    metadata_readers: list[str] = field(default_factory=list)  # read this site's output for shape/dtype only
    skip_upcast: str = ""  # the add reads x.to(this dtype), which keeps x's values and widens the sum
    skip_gain: str = ""  # the add reads x times a factor not fed by the stream, this node (Doge's ``w * residual + f``)
    skip_view: str = ""  # the skip is this token view of the stream (``x.reshape(B, -1, C)``: Swin)
    unnormalized: bool = False  # its sublayer reads x itself, no norm between (``norm``: what reads it; Gemma 4's PLE)
    end_scale: str = ""  # a layer's last site: it returns the stream times s, this node (Gemma 4's layer_scalar)


@dataclass
class Stream:
    """A chain of sites from a source (the embedding output) to its consumers (the final norm)."""

    index: int
    source: str  # module path (or node) that produces b_0
    source_node: str
    hidden_size: int
    sites: list[Site] = field(default_factory=list)
    consumers: list[str] = field(default_factory=list)  # what reads the stream's end
    consumer_nodes: list[str] = field(default_factory=list)
    final_param_prefix: str = ""
    num_blocks: int = 0
    block_size: int = 0
    dtype: str = ""  # b_0 is cast to this dtype first (the first add widened it: Mamba's residual_in_fp32)
    end_view: str = ""  # the output is this token view (or view of views) of the end, in the source's shape


@dataclass
class LeftOut:
    """A residual-looking add that was not converted, and why."""

    node: str
    module: str
    reason: str


@dataclass
class Plan:
    streams: list[Stream] = field(default_factory=list)
    left_out: list[LeftOut] = field(default_factory=list)
    opaque_modules: dict[str, str] = field(default_factory=dict)
    opaque_with_norms: list[str] = field(default_factory=list)  # opaque by class name, hold a norm
    residual_children: list = field(default_factory=list)  # (node name, slot): detect.split_residual_children
    inlined_children: list = field(default_factory=list)  # children traced into (layerwise.trace_alone)

    @property
    def sites(self) -> list[Site]:
        return [s for st in self.streams for s in st.sites]


def place_blocks(plan: Plan, num_blocks, block_size) -> None:
    """Each stream's sites split into blocks, and the parameters named (a plan of the whole model;
    a stream spread over several layers: ``layerwise.assign_global_blocks``)."""
    for stream in plan.streams:
        blocks = place_in_blocks(stream.sites, num_blocks, block_size)
        stream.num_blocks, stream.block_size = max(blocks), blocks.count(1)
    assign_parameter_names(plan)


def place_in_blocks(sites: list, num_blocks: Optional[int], block_size: Optional[int]) -> list[int]:
    """Set each site's block (1-based), position in it and source count (sites in depth order);
    returns the blocks. ``block_size`` S: blocks of S consecutive sublayers, the last one takes the
    remainder. ``num_blocks`` N: S = ceil(L / N) (so N = L is Full AttnRes; fewer blocks result when
    N does not divide L evenly into non-empty blocks, e.g. L=10, N=4 -> S=3 -> 3+3+3+1)."""
    if block_size is None:
        block_size = math.ceil(len(sites) / min(num_blocks or 8, len(sites)))
    blocks = [i // block_size + 1 for i in range(len(sites))]
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


def param_key(path: str) -> str:
    """A module path (or a description of an inlined norm) as a ModuleDict key: an identifier."""
    return re.sub(r"\W+", "_", path.replace(".", "__").replace(":", "__").replace("<", "").replace(">", "")).strip("_")
