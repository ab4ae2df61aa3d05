"""The Plan: what detection found, as plain data. The report users read is this plan, printed.

Graph nodes are referred to by name (``Site.add_node`` ...) so a plan can be printed, compared and
serialised without holding the graph.
"""
from __future__ import annotations

import math
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
    residual_children: list = field(default_factory=list)  # (module path, argument slot): residual_children.py

    @property
    def sites(self) -> list[Site]:
        return [s for st in self.streams for s in st.sites]


def split_blocks(num_sites: int, num_blocks: Optional[int] = None, block_size: Optional[int] = None) -> list[int]:
    """Block index (1-based) of each of ``num_sites`` sublayers.

    ``block_size`` S: blocks of S consecutive sublayers, the last block takes the remainder.
    ``num_blocks`` N: S = ceil(L / N) (so N = L is Full AttnRes; fewer blocks result when N does
    not divide L evenly into non-empty blocks, e.g. L=10, N=4 -> S=3 -> 3+3+3+1).
    """
    if num_sites == 0:
        return []
    if block_size is None:
        n = min(num_blocks or 8, num_sites)
        block_size = math.ceil(num_sites / n)
    return [i // block_size + 1 for i in range(num_sites)]
