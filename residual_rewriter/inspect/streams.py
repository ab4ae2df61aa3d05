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

from collections import Counter
from typing import Union

import networkx as nx

from residual_rewriter.report import ConversionReport


def _report_of(obj) -> ConversionReport:
    if isinstance(obj, ConversionReport):
        return obj
    report = getattr(obj, "attn_res_report", None)
    if isinstance(report, ConversionReport):
        return report
    raise TypeError(f"expected a ConversionReport or a converted model, got {type(obj).__name__}")


def site_labels(stream) -> list[str]:
    """Each site's row label: its sublayer's name, or, where sites share one (a branch ending in
    LayerScale is named after its whole block: timm's ViT, DINOv2), that name and the site's norm."""
    counts = Counter(s.sublayer for s in stream.sites)
    return [s.sublayer if counts[s.sublayer] == 1 else f"{s.sublayer} ({s.norm.removeprefix(s.sublayer + '.')})"
            for s in stream.sites]


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
        for site, label in zip(st.sites, site_labels(st)):
            node = f"{s}:site{site.index}"
            if site.position == 0:
                in_block = []
            g.add_node(
                node, kind="sublayer", stream=st.index, block=site.block, position=site.position, index=site.index,
                norm=site.norm, sublayer=site.sublayer, num_sources=site.num_sources, label=label,
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

GRAPHVIZ_MAX_SUBLAYERS = 8  # backend "auto" draws a node-link graph with Graphviz only up to this depth


def _stream_matrix(g: nx.DiGraph, stream: int) -> dict:
    """What a stream's picture shows, from the graph: columns (b0, then every sublayer in depth order,
    grouped by block), rows (every aggregation: the sublayers, then final) and, per row, the sources
    it reads, each as (first column, last column, kind, source index)."""
    order = depth_order(g, stream)
    subs = [n for n in order if g.nodes[n]["kind"] == "sublayer"]
    col = {n: i + 1 for i, n in enumerate(subs)}  # column 0 is b0
    span = {0: (0, 0)}  # block -> its columns
    for n in subs:
        b = g.nodes[n]["block"]
        lo, _ = span.get(b, (col[n], col[n]))
        span[b] = (lo, col[n])
    rows = subs + [n for n in order if g.nodes[n]["kind"] == "final"]
    reads = []
    for n in rows:
        by_source: dict[int, list] = {}
        for u, _, e in g.in_edges(n, data=True):
            by_source.setdefault(e["source"], []).append((u, e["kind"]))
        cells = []
        for j, edges in sorted(by_source.items()):
            if edges[0][1] == "partial":
                cs = [col[u] for u, _ in edges]
                cells.append((min(cs), max(cs), "partial", j))
            else:
                cells.append((*span[j], "source" if j == 0 else "block", j))
        reads.append(cells)
    blocks = sorted(b for b in span if b > 0)
    return {"subs": subs, "rows": rows, "reads": reads, "span": span, "blocks": blocks, "col": col}


_CELL = {"source": "#e8b400", "block": "#1f77b4", "partial": "#ff7f0e"}


def draw_streams(g: nx.DiGraph):
    """A matplotlib Figure of a stream graph: per stream, a source-by-sublayer matrix with block bands.

    Rows are the aggregations in depth order (each sublayer's input, then the final one); columns are
    what the residual stream is made of: b0 (the embedding) and every sublayer's output, grouped into
    the labelled blocks. Each source a row reads is ONE box spanning the columns it sums: b0 (gold), a
    completed block b_j (blue, spanning the whole block) or the running partial sum of the row's own
    block (orange, spanning the sublayers before it). So the boxes in a row are its sources, counted at
    the right; the small black square marks the sublayer itself (the column its output goes to). Full
    AttnRes is a triangle of single cells; Block AttnRes a staircase of block-wide boxes.
    """
    from matplotlib.patches import Patch, Rectangle

    from .pictures import new_figure

    streams = sorted({d["stream"] for _, d in g.nodes(data=True)})
    mats = {st: _stream_matrix(g, st) for st in streams}
    size = max(len(m["rows"]) for m in mats.values())
    cell = max(0.13, min(0.42, 9.0 / size))  # inches per cell: 9 in across at 64 sublayers
    label_w = [0.065 * max(len(g.nodes[n]["label"]) for n in m["rows"]) + 0.9 for m in mats.values()]
    width = sum(cell * (len(m["subs"]) + 2) + w for m, w in zip(mats.values(), label_w))
    fig = new_figure(width + 0.5, cell * (size + 1) + 2.4)
    fig.set_layout_engine("constrained")  # places the labels, titles and legend around the panels, not on them
    axes = fig.subplots(1, len(streams), squeeze=False,
                        width_ratios=[len(m["subs"]) + 2 for m in mats.values()])[0]
    font = 7 if cell >= 0.2 else 5.5
    for ax, st in zip(axes, streams):
        m = mats[st]
        n_cols, n_rows = len(m["subs"]) + 1, len(m["rows"])
        top = []  # (column, label) along the top: each block's name, then the sources count column
        for b in m["blocks"]:  # block bands: columns, and the rows of the sublayers in the block
            lo, hi = m["span"][b]
            shade = "#f0f0f0" if b % 2 else "#fafafa"
            ax.add_patch(Rectangle((lo - 0.5, -0.5), hi - lo + 1, n_rows, color=shade, zorder=0, lw=0))
            ax.add_patch(Rectangle((-0.5, lo - 1.5), n_cols, hi - lo + 1, color=shade, zorder=0, lw=0, alpha=0.8))
            top.append(((lo + hi) / 2, f"block {b}" if hi - lo >= 2 or cell >= 0.3 else f"{b}"))
            if b > 1:
                ax.axvline(lo - 0.5, color="#bbbbbb", lw=0.6, zorder=1)
                ax.axhline(lo - 1.5, color="#bbbbbb", lw=0.6, zorder=1)
        for r, cells in enumerate(m["reads"]):
            for lo, hi, kind, j in cells:
                ax.add_patch(Rectangle((lo - 0.42, r - 0.38), hi - lo + 0.84, 0.76, facecolor=_CELL[kind],
                                       edgecolor="white", lw=0.5, zorder=2, alpha=0.9))
                if cell >= 0.25 and (hi > lo or cell >= 0.35):
                    ax.text((lo + hi) / 2, r, f"b{j}" if kind != "partial" else "part.", ha="center", va="center",
                            fontsize=font - 1, color="white", zorder=3)
            ax.text(n_cols, r, str(len(cells)), ha="center", va="center", fontsize=font, color="#333333")
            if r < len(m["subs"]):  # the sublayer itself: where its output goes
                ax.add_patch(Rectangle((r + 1 - 0.15, r - 0.15), 0.3, 0.3, color="black", zorder=3))
        top.append((n_cols + 0.3, "sources"))
        ax.set_xlim(-0.5, n_cols + 0.5)  # the last column holds each row's number of sources
        ax.set_ylim(n_rows - 0.5, -0.5)
        ax.set_aspect("equal")
        ax.set_yticks(range(n_rows), [g.nodes[n]["label"] for n in m["rows"]], fontsize=font)
        step = 1 if n_cols <= 24 else 2 if n_cols <= 48 else 4
        ticks = [0] + [c for c in range(1, n_cols) if (c - 1) % step == 0]
        ax.set_xticks(ticks, ["b0"] + [str(c - 1) for c in ticks[1:]], fontsize=font)
        header = ax.secondary_xaxis("top")  # a real axis, so the title is placed above it
        header.set_xticks([x for x, _ in top], [t for _, t in top], fontsize=font)
        for label in header.get_xticklabels():
            if label.get_text().isdigit():  # a narrow block: its number, upright
                label.set_rotation(90)
        header.tick_params(length=0)
        ax.set_xlabel("what the stream is made of: b0 (embedding), then sublayer 0, 1, ... outputs", fontsize=font + 1)
        ax.set_ylabel("input of (aggregation)", fontsize=font + 1)
        ax.tick_params(length=0)
        for side in [*ax.spines.values(), *header.spines.values()]:
            side.set_visible(False)
        source = g.nodes[f"s{st}:b0"]["label"]
        blocks = len(m["blocks"])
        ax.set_title(f"stream {st}: {len(m['subs'])} sublayers in {blocks} block{'s' * (blocks != 1)}; {source}",
                     fontsize=font + 1)
    fig.legend(handles=[Patch(color=_CELL["source"], label="reads b0 (embedding)"),
                        Patch(color=_CELL["block"], label="reads a completed block b_j (one source)"),
                        Patch(color=_CELL["partial"], label="reads its own block's partial sum (one source)"),
                        Patch(color="black", label="the sublayer itself")],
               loc="outside lower center", ncol=2, fontsize=7, frameon=False)
    fig.suptitle(f"{g.graph.get('model', '')}: which sources each aggregation reads", fontsize=9)
    return fig


def render_streams(report_or_module, format: str = "svg", *, backend: str = "auto"):
    """Draw the stream graph as PNG/SVG bytes (a ``Picture``).

    matplotlib draws the source-by-sublayer matrix (``draw_streams``), readable at any depth; Graphviz
    draws the node-link graph of ``to_dot``, readable only for a few sublayers. backend "auto": Graphviz
    ``dot`` when it is on PATH and no stream has more than ``GRAPHVIZ_MAX_SUBLAYERS`` sublayers,
    otherwise matplotlib. If ``dot`` is tried but fails, the failure is warned about, written to
    ``Picture.notes``, and matplotlib draws instead. "graphviz" / "matplotlib" force one (forcing
    graphviz without ``dot`` raises).
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
    deep = max(sum(1 for _, d in g.nodes(data=True) if d["kind"] == "sublayer" and d["stream"] == st)
               for st in {d["stream"] for _, d in g.nodes(data=True)}) > GRAPHVIZ_MAX_SUBLAYERS
    if backend == "graphviz" or (backend == "auto" and dot is not None and not deep):
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
