"""The residual streams as a graph: sublayers in depth order, grouped into blocks, and what each
aggregation reads. Built from the report's plan, so it works for ``detect()`` reports too.

Node ids (``s<stream>:...``) and their ``kind`` attribute:

* ``s0:b0``      kind "source"   — the stream's source b_0 (the embedding output)
* ``s0:site3``   kind "sublayer" — sublayer 3 (attrs: block, position, norm, sublayer, num_sources)
* ``s0:b2``      kind "block"    — the completed block summary b_2 = sum of block 2's sublayer outputs
* ``s0:final``   kind "final"    — the aggregation the stream's consumers (the final norm) read

Edges ``u -> v``:

* kind "reads"    — v's aggregation reads the completed block u (``source`` = its index in v's sources)
* kind "partial"  — v's aggregation reads the running partial sum of its own block, to which the
                    earlier sublayer u contributes (one edge per contributing sublayer, same ``source``)
* kind "sums"     — sublayer u's output is part of block summary v

So the distinct ``source`` values on a sublayer's in-edges are exactly ``Site.num_sources``.
"""
from __future__ import annotations

from typing import Union

import networkx as nx

from residual_rewriter.report import ConversionReport


def _report_of(obj) -> ConversionReport:
    if isinstance(obj, ConversionReport):
        return obj
    report = getattr(obj, "report", None)
    if isinstance(report, ConversionReport):
        return report
    raise TypeError(f"expected a ConversionReport or the module convert() returned, got {type(obj).__name__}")


def stream_graph(report_or_module: Union[ConversionReport, object]) -> nx.DiGraph:
    """A networkx DiGraph of every residual stream (see the module docstring for its schema)."""
    report = _report_of(report_or_module)
    g = nx.DiGraph(model=report.model, converted=report.converted)
    for st in report.streams:
        s = f"s{st.index}"
        block_node = {0: f"{s}:b0"}
        g.add_node(f"{s}:b0", kind="source", stream=st.index, block=0, label=f"b0 = {st.source}")
        for n in range(1, st.num_blocks + 1):
            block_node[n] = f"{s}:b{n}"
            g.add_node(block_node[n], kind="block", stream=st.index, block=n, label=f"b{n}")
        in_block: list[str] = []  # sublayers of the current block so far (they make up the partial sum)
        for site in st.sites:
            node = f"{s}:site{site.index}"
            if site.position == 0:
                in_block = []
            g.add_node(
                node, kind="sublayer", stream=st.index, block=site.block, position=site.position, index=site.index,
                norm=site.norm, sublayer=site.sublayer, num_sources=site.num_sources, label=site.sublayer,
            )
            for j in range(site.block):  # completed blocks b_0 .. b_{n-1}
                g.add_edge(block_node[j], node, kind="reads", source=j)
            for earlier in in_block:  # the partial sum of this block, if any sublayer came before
                g.add_edge(earlier, node, kind="partial", source=site.block)
            g.add_edge(node, block_node[site.block], kind="sums")
            in_block.append(node)
        final = f"{s}:final"
        g.add_node(final, kind="final", stream=st.index, block=st.num_blocks + 1,
                   num_sources=st.num_blocks + 1, label="final -> " + ", ".join(st.consumers))
        for j in range(st.num_blocks + 1):
            g.add_edge(block_node[j], final, kind="reads", source=j)
    return g


def depth_order(g: nx.DiGraph, stream: int) -> list[str]:
    """Nodes of one stream top to bottom: b0, then each block's sublayers followed by its summary, final."""
    nodes = [n for n, d in g.nodes(data=True) if d["stream"] == stream]
    rank = {"source": 0, "sublayer": 1, "block": 2, "final": 3}

    def key(n):
        d = g.nodes[n]
        return (d["block"], rank[d["kind"]], d.get("index", 0))

    return sorted(nodes, key=key)


def _dot_quote(text: str) -> str:
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"') + '"'


_DOT_EDGE_STYLE = {
    "reads": 'color="#1f77b4"',
    "partial": 'color="#ff7f0e", style=dashed',
    "sums": 'color="#7f7f7f", arrowhead=none',
}


def to_dot(g: nx.DiGraph) -> str:
    """Graphviz DOT text of a stream graph (needs no graphviz): one cluster per block, depth top-down."""
    lines = ["digraph attnres {", "  rankdir=TB;", '  node [fontname="Helvetica", fontsize=10];',
             '  edge [arrowsize=0.6];']
    streams = sorted({d["stream"] for _, d in g.nodes(data=True)})
    for st in streams:
        order = depth_order(g, st)
        blocks = sorted({g.nodes[n]["block"] for n in order if g.nodes[n]["kind"] in ("sublayer", "block")})
        for b in blocks:
            lines.append(f"  subgraph cluster_s{st}_b{b} {{")
            lines.append(f'    label={_dot_quote(f"stream {st}, block {b}")}; style=filled; color="#eeeeee";')
            for n in order:
                d = g.nodes[n]
                if d["block"] == b and d["kind"] in ("sublayer", "block"):
                    shape = "box" if d["kind"] == "sublayer" else "ellipse"
                    lines.append(f"    {_dot_quote(n)} [label={_dot_quote(d['label'])}, shape={shape}];")
            lines.append("  }")
        for n in order:
            d = g.nodes[n]
            if d["kind"] in ("source", "final"):
                lines.append(f"  {_dot_quote(n)} [label={_dot_quote(d['label'])}, shape=doubleoctagon];")
    for u, v, d in g.edges(data=True):
        lines.append(f"  {_dot_quote(u)} -> {_dot_quote(v)} [{_DOT_EDGE_STYLE[d['kind']]}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


# ---- pictures ------------------------------------------------------------------------------------

_MPL_EDGE_STYLE = {  # kind -> (colour, line style, arc3 rad sign: for a downward edge -1 bulges right)
    "reads": ("#1f77b4", "-", -1),
    "partial": ("#ff7f0e", "--", 1),
    "sums": ("#7f7f7f", ":", 1),
}


def draw_streams(g: nx.DiGraph):
    """A matplotlib Figure of a stream graph: an arc diagram, depth top-down, blocks shaded.

    Each stream is a column of nodes in depth order (b0, block 1's sublayers, b1, ...); arcs on the
    right are completed blocks an aggregation reads, arcs on the left the partial block sum and the
    sublayers each block summary adds up.
    """
    from matplotlib.patches import FancyArrowPatch, Rectangle

    from .pictures import new_figure

    streams = sorted({d["stream"] for _, d in g.nodes(data=True)})
    orders = {st: depth_order(g, st) for st in streams}
    rows = max(len(o) for o in orders.values())
    width = 7.0 * len(streams)
    fig = new_figure(width, max(3.0, 0.42 * rows + 1))
    ax = fig.add_subplot()
    pos = {}
    for k, st in enumerate(streams):
        for i, n in enumerate(orders[st]):
            pos[n] = (k * 7.0, -float(i))
    for u, v, d in g.edges(data=True):
        colour, style, side = _MPL_EDGE_STYLE[d["kind"]]
        ax.add_patch(FancyArrowPatch(
            pos[u], pos[v], arrowstyle="-|>", mutation_scale=8, color=colour, linestyle=style, linewidth=0.8,
            connectionstyle=f"arc3,rad={side * 0.35}", shrinkA=6, shrinkB=6, alpha=0.8,
        ))
    for k, st in enumerate(streams):
        for n in orders[st]:
            d = g.nodes[n]
            if d["kind"] == "sublayer":
                y = pos[n][1]
                ax.add_patch(Rectangle((k * 7.0 - 1.6, y - 0.5), 3.2, 1.0, color=f"C{d['block'] % 10}", alpha=0.12,
                                       linewidth=0))
            face = {"sublayer": "white", "block": "#dddddd", "source": "#ffe9a8", "final": "#ffe9a8"}[d["kind"]]
            ax.text(*pos[n], d["label"], ha="center", va="center", fontsize=7,
                    bbox=dict(boxstyle="round,pad=0.25", facecolor=face, edgecolor="#555555", linewidth=0.6))
    ax.set_xlim(-3.5, 7.0 * (len(streams) - 1) + 3.5)
    ax.set_ylim(-rows, 1)
    ax.axis("off")
    title = f"{g.graph.get('model', '')}: residual streams (blue: reads block, orange: reads partial block sum)"
    ax.set_title(title, fontsize=9)
    return fig


def render_streams(report_or_module, format: str = "svg", *, backend: str = "auto"):
    """Draw the stream graph as PNG/SVG bytes (a ``Picture``).

    backend "auto": Graphviz ``dot`` when it is on PATH, otherwise matplotlib. If ``dot`` is there but
    fails, the failure is warned about, written to ``Picture.notes``, and matplotlib draws instead.
    "graphviz" / "matplotlib" force one (forcing graphviz without ``dot`` raises).
    """
    import shutil
    import subprocess
    import warnings

    from .pictures import Picture, check_format, figure_bytes

    fmt = check_format(format)
    g = stream_graph(report_or_module)
    if backend not in ("auto", "graphviz", "matplotlib"):
        raise ValueError(f"backend must be 'auto', 'graphviz' or 'matplotlib', got {backend!r}")
    notes = []
    dot = shutil.which("dot")
    if backend == "graphviz" and dot is None:
        raise RuntimeError("backend='graphviz' needs Graphviz's `dot` on PATH (not found)")
    if backend != "matplotlib" and dot is not None:
        proc = subprocess.run([dot, f"-T{fmt}"], input=to_dot(g).encode(), capture_output=True, timeout=120)
        if proc.returncode == 0 and proc.stdout:
            return Picture(proc.stdout, fmt, "graphviz")
        why = proc.stderr.decode(errors="replace").strip().splitlines()
        msg = f"graphviz dot failed (exit {proc.returncode}: {why[-1] if why else 'no output'}); drew with matplotlib"
        if backend == "graphviz":
            raise RuntimeError(msg.split(";")[0])
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        notes.append(msg)
    return Picture(figure_bytes(draw_streams(g), fmt), fmt, "matplotlib", notes)
