"""residual_rewriter.inspect: graphs before/after and their diff, the stream graph, pictures, weights."""
from __future__ import annotations

import math
import xml.etree.ElementTree as ET

import networkx as nx
import pytest
import torch
import torch.fx as fx

import residual_rewriter as rr
from residual_rewriter import inspect as rri
from residual_rewriter.models import GPT, GPTConfig
from torch.utils._python_dispatch import TorchDispatchMode

from model_zoo import aggregations

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def small_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=3, n_embd=32, n_head=2, block_size=16, vocab_size=64))


@pytest.fixture(scope="module")
def model():
    return small_gpt()


@pytest.fixture(scope="module", params=[None, 2], ids=["full", "block2"])
def converted(request, model):
    """Full AttnRes (6 sublayers, default 8 blocks) and Block AttnRes with blocks of 2."""
    return rr.convert(model, block_size=request.param)


# ---- graphs ------------------------------------------------------------------------------------


def test_diff_of_unconverted_is_empty(model):
    assert rri.graph_diff(rr.detect(model)) == ""
    assert rri.graph_diff(fx.symbolic_trace(model)) == ""  # a GraphModule convert never touched
    assert rri.graph_diff(model) == ""  # a plain module


def test_diff_of_converted_shows_only_the_rewrite(converted):
    diff = rri.graph_diff(converted)
    report = converted.attn_res_report
    assert diff.startswith("# transformer.h.0\n--- transformer.h.0 before\n+++ transformer.h.0 after (AttnRes)")
    assert [l[2:] for l in diff.splitlines() if l.startswith("# ")] == report.holders
    changed = [l for l in diff.splitlines() if l[:1] in "+-" and not l.startswith(("---", "+++"))]
    added = [l for l in changed if l.startswith("+")]
    removed = [l for l in changed if l.startswith("-")]
    # every aggregation is added, every residual add is erased, every norm is rewired
    assert sum("AttnRes[attn_res." in l for l in added) == len(aggregations(converted))
    assert sum(l.startswith(("-add =", "-add_")) for l in removed) >= len(report.sites)
    for site in report.sites:
        if site.num_sources > 1:  # (a single-source "aggregation" is the identity and may be left out)
            assert any(f"= {site.norm.rsplit('.', 1)[1]}(attn_res" in l for l in added), site.norm
    # nodes the rewrite did not touch (the sublayers themselves) are not in the diff
    assert not any(l[1:].startswith(f"{s.sublayer.rsplit('.', 1)[1]} =") for s in report.sites for l in changed)


def test_readable_graph_is_module_level(converted):
    before, after = rri.graphs_before_after(converted)
    for text in (before, after):
        assert "num_users" not in text and "get_attr" not in text
        assert "attn_res.default" not in text  # aggregations print as AttnRes[prefix](...)
    assert "AttnRes[" not in before and "AttnRes[" in after
    # one line per node and a header per rewritten module, except the query/gain get_attrs folded
    # into their aggregation line
    graphs = [g for _, _, g in rri.holder_graphs(converted)]
    folded = sum(n.op == "get_attr" and all(rri.is_aggregation(u) for u in n.users) for g in graphs for n in g.nodes)
    assert len(after.splitlines()) == sum(len(g.nodes) for g in graphs) + len(graphs) - folded


def test_graph_changes_counts(converted):
    c = rri.graph_changes(converted)
    n_sites = len(converted.attn_res_report.sites)
    assert len(c.removed) == n_sites  # the residual adds
    assert c.aggregations == len(aggregations(converted))
    assert n_sites <= c.aggregations + 1 <= n_sites + 1  # the first site's single-source one may be elided
    assert "added" in str(c)


# ---- stream graph ------------------------------------------------------------------------------


def test_stream_graph_matches_the_plan(converted):
    g = rri.stream_graph(converted)
    assert nx.is_directed_acyclic_graph(g)
    (st,) = converted.attn_res_report.streams
    for site in st.sites:
        node = f"s0:site{site.index}"
        assert g.nodes[node]["block"] == site.block and g.nodes[node]["sublayer"] == site.sublayer
        sources = {d["source"] for _, _, d in g.in_edges(node, data=True)}
        assert sources == set(range(site.num_sources))  # sources are b_0, b_1, ... in order
        assert g.has_edge(node, f"s0:b{site.block}")  # and it adds into its block summary
    final_sources = {d["source"] for _, _, d in g.in_edges("s0:final", data=True)}
    assert final_sources == set(range(st.num_blocks + 1))
    order = rri.depth_order(g, 0)
    assert order[0] == "s0:b0" and order[-1] == "s0:final"
    assert [n for n in order if n.startswith("s0:site")] == [f"s0:site{s.index}" for s in st.sites]


def test_stream_graph_from_detect_report(model):
    report = rr.detect(model, block_size=2)
    g = rri.stream_graph(report)
    assert sum(d["kind"] == "sublayer" for _, d in g.nodes(data=True)) == len(report.sites)
    assert sum(d["kind"] == "block" for _, d in g.nodes(data=True)) == report.streams[0].num_blocks


def test_dot_text(converted):
    dot = rri.to_dot(rri.stream_graph(converted))
    assert dot.startswith("digraph attnres {") and dot.rstrip().endswith("}")
    assert dot.count("subgraph cluster_") == converted.attn_res_report.streams[0].num_blocks
    assert dot.count('" -> "') == rri.stream_graph(converted).number_of_edges()


@pytest.mark.parametrize("fmt", ["png", "svg"])
def test_stream_pictures_with_matplotlib(converted, fmt, tmp_path):
    pic = rri.render_streams(converted, fmt, backend="matplotlib")
    assert pic.backend == "matplotlib" and pic.format == fmt
    path = pic.save(tmp_path / f"streams.{fmt}")
    _assert_valid_picture(path.read_bytes(), fmt)


def test_stream_picture_auto_backend_never_fails(converted):
    # Graphviz is used when `dot` is on PATH, matplotlib otherwise; either way a picture comes back
    pic = rri.render_streams(converted, "svg")
    assert pic.backend in ("graphviz", "matplotlib")
    _assert_valid_picture(pic.data, "svg")


def test_failing_graphviz_is_reported_not_swallowed(converted, monkeypatch, tmp_path):
    fake_dot = tmp_path / "dot"
    fake_dot.write_text("#!/bin/sh\necho 'dot: simulated crash' >&2\nexit 3\n")
    fake_dot.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{__import__('os').environ['PATH']}")
    with pytest.warns(RuntimeWarning, match="simulated crash"):
        pic = rri.render_streams(converted, "png")
    assert pic.backend == "matplotlib" and "graphviz dot failed" in pic.notes[0]
    _assert_valid_picture(pic.data, "png")
    with pytest.raises(RuntimeError, match="graphviz dot failed"):
        rri.render_streams(converted, "png", backend="graphviz")


def _boxes(fig):
    """(row, first column, last column, colour) of every source box drawn, from the figure's patches."""
    from matplotlib.colors import to_hex

    from residual_rewriter.inspect.streams import _CELL

    colours = {to_hex(c): k for k, c in _CELL.items()}
    out = []
    for ax in fig.axes:
        for p in ax.patches:
            kind = colours.get(to_hex(p.get_facecolor()))
            if kind is not None and p.get_zorder() == 2:
                x, y = p.get_xy()
                out.append((round(y + 0.38), round(x + 0.42), round(x + p.get_width() - 0.42), kind))
    return out


def test_stream_matrix_boxes_are_the_sources(model):
    """Each row of the picture holds one box per source its aggregation reads, spanning exactly the
    columns (b0, sublayer outputs) that source sums, all left of the row's own sublayer."""
    report = rr.detect(model, block_size=2)  # 6 sublayers in blocks of 2
    st = report.streams[0]
    boxes = _boxes(rri.draw_streams(rri.stream_graph(report)))
    rows = {}
    for r, lo, hi, kind in boxes:
        rows.setdefault(r, []).append((lo, hi, kind))
    assert sorted(rows) == list(range(len(st.sites) + 1))  # every sublayer, then the final aggregation
    for site in st.sites:
        got = sorted(rows[site.index])
        assert len(got) == site.num_sources
        block_cols = {0: (0, 0), **{b: (2 * b - 1, 2 * b) for b in range(1, st.num_blocks + 1)}}  # columns 1.. = sublayers
        want = [(*block_cols[j], "source" if j == 0 else "block") for j in range(site.block)]
        if site.position > 0:  # the partial sum of its own block so far
            want.append((block_cols[site.block][0], site.index, "partial"))
        assert got == sorted(want), site
        assert max(hi for _, hi, _ in got) < site.index + 1  # never reads itself or later sublayers
    assert sorted(rows[len(st.sites)]) == [(0, 0, "source")] + [(2 * b - 1, 2 * b, "block") for b in range(1, 4)]


def test_stream_picture_readable_at_32_layers():
    """64 sublayers in 8 blocks: every block labelled, one box per source (no pile of arcs), a page-sized figure."""
    torch.manual_seed(0)
    deep = GPT(GPTConfig(n_layer=32, n_embd=16, n_head=2, block_size=16, vocab_size=32))
    report = rr.detect(deep, num_blocks=8)
    fig = rri.draw_streams(rri.stream_graph(report))
    assert max(fig.get_size_inches()) <= 16
    from matplotlib.text import Text

    texts = [t.get_text() for t in fig.findobj(Text)]
    assert all(f"block {b}" in texts for b in range(1, 9))
    assert len(_boxes(fig)) == sum(s.num_sources for s in report.sites) + 9
    ticks = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert ticks[0] == "transformer.h.0.attn" and ticks[-1] == "final -> transformer.ln_f" and len(ticks) == 65
    # a deep stream is drawn as the matrix even when Graphviz is there
    svg = rri.render_streams(report, "svg").data.decode()
    assert "block 8" in svg


def _overlaps(a, b, tol=1.0):
    return a.x0 + tol < b.x1 and b.x0 + tol < a.x1 and a.y0 + tol < b.y1 and b.y0 + tol < a.y1


def _assert_no_text_overlaps(fig):
    """No two labels of the figure overlap, and no label of one panel lies on another panel."""
    from matplotlib.text import Text

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    boxes = [(t, t.get_window_extent(renderer)) for t in texts]
    for i, (t, a) in enumerate(boxes):
        for u, b in boxes[i + 1:]:
            assert not _overlaps(a, b), (t.get_text(), u.get_text())
        for ax in fig.axes:
            if t.axes is not None and ax is not t.axes:
                assert not _overlaps(a, ax.get_window_extent(renderer)), (t.get_text(), ax.get_title())


@pytest.mark.hf
def test_stream_picture_of_two_streams_does_not_overlap():
    """T5: an encoder and a decoder stream of different depths side by side, long row labels."""
    from model_zoo import make_architecture

    report = rr.detect(make_architecture("t5"))
    assert len(report.streams) == 2
    _assert_no_text_overlaps(rri.draw_streams(rri.stream_graph(report)))


@pytest.mark.parametrize("block_size", [None, 2])
def test_stream_picture_of_one_stream_does_not_overlap(model, block_size):
    _assert_no_text_overlaps(rri.draw_streams(rri.stream_graph(rr.detect(model, block_size=block_size))))


class _LayerScale(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.gamma = torch.nn.Parameter(torch.full((d,), 0.1))

    def forward(self, x):
        return x * self.gamma


class _LayerScaleBlock(torch.nn.Module):
    """A ViT-style block whose branches end in a LayerScale module: both sites' sublayer is the block
    itself (as for timm's ViT and DINOv2)."""

    def __init__(self, d=16):
        super().__init__()
        self.norm1, self.norm2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.attn, self.mlp = torch.nn.Linear(d, d), torch.nn.Linear(d, d)
        self.ls1, self.ls2 = _LayerScale(d), _LayerScale(d)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class _LayerScaleNet(torch.nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.embed = torch.nn.Linear(4, d)
        self.blocks = torch.nn.Sequential(_LayerScaleBlock(d), _LayerScaleBlock(d))
        self.norm = torch.nn.LayerNorm(d)

    def forward(self, x):
        return self.norm(self.blocks(self.embed(x)))


def test_layerscale_sites_get_distinct_labels():
    """Where two sites share a sublayer name, the weights' rows and the picture's rows still tell them apart
    (by the norm feeding each); other labels stay the sublayer's name."""
    torch.manual_seed(0)
    net, x = _LayerScaleNet(), torch.randn(2, 3, 4)
    converted = rr.convert(net, example_inputs=(x,), block_size=1)
    sites = converted.attn_res_report.sites
    assert len({s.sublayer for s in sites}) < len(sites)  # the collision this is about
    dw = rri.depth_attention_weights(converted, x)
    g = rri.stream_graph(converted)
    picture_rows = [g.nodes[f"s0:site{s.index}"]["label"] for s in sites]
    for rows in (dw.rows[: len(sites)], picture_rows):
        assert len(set(rows)) == len(sites)
        for label, site in zip(rows, sites):
            assert label.startswith(site.sublayer) and site.norm.rsplit(".", 1)[1] in label
    gpt = rr.detect(small_gpt())  # no collision: plain sublayer names
    g = rri.stream_graph(gpt)
    assert [g.nodes[f"s0:site{s.index}"]["label"] for s in gpt.sites] == [s.sublayer for s in gpt.sites]


def test_bad_picture_format(converted):
    with pytest.raises(ValueError, match="png, svg"):
        rri.render_streams(converted, "jpg")


# ---- depth-attention weights -------------------------------------------------------------------


def _perturb_queries(converted, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in converted.named_parameters():
            if name.endswith(".query"):
                p.copy_(torch.randn(p.shape, generator=g) * 2.0)


def test_weights_uniform_at_init(converted, model):
    dw = rri.depth_attention_weights(converted, *model.example_inputs())
    for row, n in zip(dw.weights, dw.num_sources):
        torch.testing.assert_close(row[:n], torch.full((n,), 1.0 / n))


def test_weights_rows_sum_to_one_and_are_learned(model):
    converted = rr.convert(model, block_size=2)
    _perturb_queries(converted)
    inputs = model.example_inputs()
    dw = rri.depth_attention_weights(converted, *inputs)
    report = converted.attn_res_report
    st = report.streams[0]
    # one row per sublayer plus the final aggregation, columns b_0 .. b_N
    assert dw.weights.shape == (len(report.sites) + 1, st.num_blocks + 1)
    assert dw.rows[: len(report.sites)] == [s.sublayer for s in report.sites]
    assert dw.rows[-1] == "final -> transformer.ln_f"
    assert dw.num_sources == [s.num_sources for s in report.sites] + [st.num_blocks + 1]
    assert dw.num_tokens == inputs[0].numel()
    for row, n in zip(dw.weights, dw.num_sources):
        assert torch.isnan(row[n:]).all() and not torch.isnan(row[:n]).any()  # padding is NaN, documented
        assert math.isclose(row[:n].sum().item(), 1.0, abs_tol=1e-5)
    torch.testing.assert_close(torch.nansum(dw.weights, 1), torch.ones(dw.weights.shape[0]))
    # the perturbed queries make the weights clearly non-uniform
    multi = [(row, n) for row, n in zip(dw.weights, dw.num_sources) if n > 1]
    assert max((row[:n] - 1.0 / n).abs().max().item() for row, n in multi) > 0.05


def test_weights_token_mask_averages_kept_tokens_only(model):
    """Masking tokens out (padding) equals averaging over the kept tokens alone: with a causal model,
    keeping the first k positions gives the weights of the input cut to those k positions."""
    converted = rr.convert(model, block_size=2)
    _perturb_queries(converted, seed=2)
    (x,) = model.example_inputs()
    k = x.shape[1] // 2
    mask = torch.zeros(x.shape, dtype=torch.bool)
    mask[:, :k] = True
    masked = rri.depth_attention_weights(converted, x, token_mask=mask)
    cut = rri.depth_attention_weights(converted, x[:, :k])
    assert masked.num_tokens == cut.num_tokens == x.shape[0] * k
    torch.testing.assert_close(masked.weights, cut.weights, equal_nan=True)
    assert not torch.allclose(torch.nan_to_num(masked.weights),
                              torch.nan_to_num(rri.depth_attention_weights(converted, x).weights))
    with pytest.raises(ValueError, match="one flag per token"):
        rri.depth_attention_weights(converted, x, token_mask=mask[0])
    with pytest.raises(ValueError, match="keeps no token"):
        rri.depth_attention_weights(converted, x, token_mask=torch.zeros_like(mask))


def test_weights_match_the_reference_directly(model):
    """The recorded mean equals the weights computed by hand (a float64 formula written here, not the
    library's reference) on the final aggregation's inputs, with random queries and gains."""
    converted = rr.convert(model, block_size=2)
    _perturb_queries(converted, seed=1)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # gains away from ones, so a formula that drops or misplaces them shows
        for name, p in converted.named_parameters():
            if name.endswith(".key_norm_weight"):
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
    (x,) = model.example_inputs()
    dw = rri.depth_attention_weights(converted, x)
    captured = {}

    class Grab(TorchDispatchMode):  # the last aggregation's arguments, seen at the dispatcher
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "residual_rewriter" in str(func) and "attn_res" in str(func):
                captured["args"] = args[:4]
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Grab():
        converted.eval()(x)
    sources, q, g, eps = captured["args"]
    # by hand, in float64, independently of the library: RMS-normalise each source over the hidden
    # dim, apply the gain, dot with the query, softmax over sources per token, average over tokens
    v = torch.stack(sources).double()  # [n, B, T, D]
    keys = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps) * g.double()
    logits = keys @ q.double()  # [n, B, T]
    expected = torch.softmax(logits, dim=0).reshape(len(sources), -1).mean(1)
    assert len(sources) > 1 and not torch.allclose(expected, torch.full_like(expected, 1 / len(sources)))
    torch.testing.assert_close(dw.weights[-1, : len(sources)].double(), expected, rtol=1e-5, atol=1e-6)


def test_weights_json_and_text(model):
    converted = rr.convert(model, block_size=2)
    dw = rri.depth_attention_weights(converted, *model.example_inputs())
    d = dw.to_dict()
    assert set(d) == {"rows", "columns", "prefixes", "num_sources", "partial", "num_tokens", "stream_tokens", "weights"}
    assert d["columns"] == [f"b{j}" for j in range(dw.weights.shape[1])]
    assert d["weights"][0][1] is None  # NaN padding becomes null in JSON
    assert "b0" in str(dw) and dw.rows[0] in str(dw)


@pytest.mark.parametrize("blocks", [dict(num_blocks=2), dict(block_size=1)], ids=["blocks-of-3", "full"])
def test_weights_mark_partial_block_sums(model, blocks):
    """Column j is b_j, but the last source a sublayer reads is the partial sum of its own block when an
    earlier sublayer of that block came before it: text, JSON and picture mark those cells, and only those."""
    from matplotlib.patches import Rectangle

    converted = rr.convert(model, **blocks)
    sites = converted.attn_res_report.sites
    want = [i > 0 and sites[i - 1].block == s.block for i, s in enumerate(sites)] + [False]  # final: completed
    assert any(want) == ("num_blocks" in blocks)
    dw = rri.depth_attention_weights(converted, *model.example_inputs())
    assert dw.partial == want and dw.to_dict()["partial"] == want
    lines = str(dw).splitlines()
    for label, n, flag in zip(dw.rows, dw.num_sources, want):
        (line,) = [l for l in lines if l.startswith(label + " ")]
        cells = line[len(label):].split()
        assert [c.endswith("*") for c in cells] == [flag and j == n - 1 for j in range(len(cells))], line
    assert any("*" in l for l in lines if not any(l.startswith(r + " ") for r in dw.rows)) == any(want)  # the key
    ax = rri.draw_depth_weights(dw).axes[0]
    hatched = {(round(p.get_y() + 0.5), round(p.get_x() + 0.5)) for p in ax.patches
               if isinstance(p, Rectangle) and p.get_hatch()}
    assert hatched == {(i, n - 1) for i, (n, flag) in enumerate(zip(dw.num_sources, want)) if flag}
    assert ("partial" in ax.get_xlabel()) == any(want)


@pytest.mark.hf
def test_weights_token_count_per_stream():
    """T5's encoder and decoder streams mix different numbers of tokens: each stream's rows say their own."""
    from model_zoo import make_architecture

    converted = rr.convert(make_architecture("t5"))
    ids, dec = torch.randint(0, 128, (2, 7)), torch.randint(0, 128, (2, 3))
    dw = rri.depth_attention_weights(converted, input_ids=ids, decoder_input_ids=dec)
    assert [st.source for st in converted.attn_res_report.streams] == ["encoder.dropout", "decoder.dropout"]
    assert dw.stream_tokens == [ids.numel(), dec.numel()] and dw.to_dict()["stream_tokens"] == dw.stream_tokens
    assert dw.num_tokens == (ids.numel(), dec.numel())  # no single count is right for every row
    for text in (str(dw).splitlines()[0], rri.draw_depth_weights(dw).axes[0].get_title()):
        assert f"{ids.numel()} tokens (stream 0)" in text and f"{dec.numel()} tokens (stream 1)" in text


@pytest.mark.parametrize("fmt", ["png", "svg"])
def test_heatmap_files(model, fmt, tmp_path):
    converted = rr.convert(model, block_size=2)
    _perturb_queries(converted)
    dw = rri.depth_attention_weights(converted, *model.example_inputs())
    path = rri.plot_depth_weights(dw, tmp_path / f"weights.{fmt}")
    _assert_valid_picture(path.read_bytes(), fmt)


def test_weights_need_a_converted_model(model):
    with pytest.raises(TypeError, match="converted by residual_rewriter"):
        rri.depth_attention_weights(model, *model.example_inputs())


# ---- targets -----------------------------------------------------------------------------------


def test_load_target_default_and_errors():
    assert isinstance(rri.load_target(None), GPT)
    assert isinstance(rri.load_target("residual_rewriter.models:GPT"), GPT)  # a module class
    with pytest.raises(rri.TargetError, match="cannot import 'no_such_pkg_xyz.models'.*No module named"):
        rri.load_target("no_such_pkg_xyz.models:make")
    with pytest.raises(rri.TargetError, match="has no attribute"):
        rri.load_target("residual_rewriter.models:NoSuchThing")
    with pytest.raises(rri.TargetError, match="neither"):
        rri.load_target("not-a-target")
    with pytest.raises(rri.TargetError, match="not a torch.nn.Module"):
        rri.load_target("builtins:dict")


@pytest.mark.hf
def test_a_config_builds_the_class_it_names(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64)
    transformers.BertForMaskedLM(config).save_pretrained(tmp_path)
    assert type(rri.load_target(str(tmp_path))).__name__ == "BertForMaskedLM"  # not AutoModelForCausalLM's BertLMHeadModel
    config.architectures = None
    config.save_pretrained(tmp_path)
    assert type(rri.load_target(str(tmp_path))).__name__ == "BertLMHeadModel"


def _assert_valid_picture(data: bytes, fmt: str) -> None:
    if fmt == "png":
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    else:
        root = ET.fromstring(data)  # parses as XML
        assert root.tag.endswith("svg")
