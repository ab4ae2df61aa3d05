"""Learned depth-attention weights of a converted model: which earlier blocks each sublayer reads.

The converted module is run once with an ``fx.Interpreter`` that, at every aggregation node, also
computes the softmax weights over its sources with the plain-PyTorch reference
(``attn_res_weights_reference``) and averages them over every token of the inputs (each batch row
and position counts equally; padding is not masked out). The op itself still runs, so what is
recorded is what the model computes.

Layout of ``DepthWeights.weights`` ([rows, columns], float32):

* rows: one per aggregation in graph (= depth) order — each sublayer's input, then the stream's final
  aggregation (the final norm's input); several streams follow each other.
* column j: source j of the aggregation, which is always block j of the stream: b_0 (the embedding
  output), the completed block b_j, or — in the last column a sublayer reads — the partial sum of its
  own block. For Full AttnRes (blocks of one sublayer) column j is sublayer j-1's output, as in the
  paper's Figure 8.
* sources a row does not read are NaN (not 0, so a plot leaves them blank and nothing mistakes them
  for a learned zero); ``torch.nansum(weights, 1)`` is 1 for every row.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.fx as fx
from torch import Tensor

from residual_rewriter.kernels.attn_res import attn_res_weights_reference

from .graphs import is_aggregation


@dataclass
class DepthWeights:
    weights: Tensor  # [rows, max_sources], NaN where a row reads fewer sources
    rows: list[str]  # row labels: the sublayer whose input the aggregation builds, or "final -> <consumer>"
    prefixes: list[str]  # attn_res.<key> parameter prefix of each row
    num_sources: list[int]
    num_tokens: int  # tokens each row's mean is over

    @property
    def columns(self) -> list[str]:
        return [f"b{j}" for j in range(self.weights.shape[1])]

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": list(self.rows),
            "columns": self.columns,
            "prefixes": list(self.prefixes),
            "num_sources": list(self.num_sources),
            "num_tokens": self.num_tokens,
            # JSON has no NaN: sources a row does not read are null
            "weights": [[None if v != v else round(float(v), 6) for v in row] for row in self.weights.tolist()],
        }

    def __str__(self) -> str:
        w_label = max(len(r) for r in self.rows) if self.rows else 4
        head = f"{'':<{w_label}}  " + " ".join(f"{c:>6}" for c in self.columns)
        lines = [f"mean depth-attention weights over {self.num_tokens} tokens (rows: inputs, columns: sources)", head]
        for label, row in zip(self.rows, self.weights.tolist()):
            cells = " ".join("     ." if v != v else f"{v:6.3f}" for v in row)
            lines.append(f"{label:<{w_label}}  {cells}")
        return "\n".join(lines)


class _WeightRecorder(fx.Interpreter):
    """Runs the graph; at each aggregation records the token-mean softmax weights over its sources."""

    def __init__(self, module: fx.GraphModule, token_mask: Optional[Tensor] = None):
        super().__init__(module)
        self.records: list[tuple[fx.Node, Tensor]] = []
        self._node: Optional[fx.Node] = None
        self.num_tokens = 0
        self.token_mask = token_mask

    def run_node(self, n: fx.Node) -> Any:
        self._node = n
        return super().run_node(n)

    def call_function(self, target, args, kwargs):
        if is_aggregation(self._node):
            sources, query, norm_weight, eps = args[:4]
            w = attn_res_weights_reference(sources, query, norm_weight, eps)  # [n_sources, *token dims]
            if self.token_mask is None:
                self.records.append((self._node, w.reshape(w.shape[0], -1).float().mean(1)))  # [n_sources]
                self.num_tokens = w[0].numel()
            else:  # the mean over the tokens the mask keeps (e.g. not padding)
                if self.token_mask.shape != w.shape[1:]:
                    raise ValueError(
                        f"token_mask has shape {tuple(self.token_mask.shape)}, but {self._node.name} mixes tokens "
                        f"of shape {tuple(w.shape[1:])} (the sources' shape without the hidden dim): pass one "
                        "flag per token, e.g. the attention_mask [batch, seq]"
                    )
                keep = self.token_mask.to(device=w.device, dtype=torch.float32).reshape(-1)
                self.records.append((self._node, (w.reshape(w.shape[0], -1).float() * keep).sum(1) / keep.sum()))
                self.num_tokens = int(keep.sum().item())
        return super().call_function(target, args, kwargs)


@contextlib.contextmanager
def _eval(module: torch.nn.Module):
    """Eval mode for the measurement (no dropout noise), restored afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _rows_from_report(module: fx.GraphModule) -> list[tuple[str, str, int]]:
    """(prefix, label, num_sources) of every sublayer and final aggregation, in depth order, from the
    report the converted module carries; [] without one."""
    report = getattr(module, "meta", {}).get("residual_rewriter_report")
    if report is None:
        return []
    many = len(report.streams) > 1
    rows = []
    for st in report.streams:
        tag = f"[{st.index}] " if many else ""
        rows += [(s.param_prefix, f"{tag}{s.sublayer}", s.num_sources) for s in st.sites]
        rows.append((st.final_param_prefix, f"{tag}final -> {', '.join(st.consumers)}", st.num_blocks + 1))
    return rows


def depth_attention_weights(module: fx.GraphModule, *inputs: Any, token_mask: Optional[Tensor] = None) -> DepthWeights:
    """The mean depth-attention weight of every aggregation of ``module`` over ``inputs``.

    ``module`` is what ``convert`` returned (trained or not); ``inputs`` are its forward's positional
    arguments (for example ``model.example_inputs()`` of the original model). At init (zero queries)
    every row is uniform, 1 / its number of sources. ``token_mask`` (one flag per token, e.g. an
    attention mask ``[batch, seq]``) averages over the kept tokens only, so padding does not count.

    Rows follow the report (every sublayer, then the final aggregation, per stream). A sublayer that
    reads a single source (the first one, b_0) may have no aggregation node in the graph (a softmax
    over one source is the identity); its row is then exactly [1].
    """
    if not isinstance(module, fx.GraphModule):
        raise TypeError(f"expected the module convert() returned (an fx.GraphModule), got {type(module).__name__}")
    if not any(is_aggregation(n) for n in module.graph.nodes):
        raise ValueError("this module has no AttnRes aggregations: pass the module convert() returned")
    if token_mask is not None and not token_mask.any():
        raise ValueError("token_mask keeps no token: there is nothing to average")
    recorder = _WeightRecorder(module, token_mask)
    with torch.no_grad(), _eval(module):
        recorder.run(*inputs)
    measured = {node.meta.get("residual_rewriter", {}).get("prefix", node.name): w for node, w in recorder.records}
    rows = _rows_from_report(module) or [(p, p, int(w.shape[0])) for p, w in measured.items()]
    per_row = []
    for prefix, _label, n_sources in rows:
        w = measured.get(prefix)
        if w is None:
            if n_sources != 1:
                raise ValueError(f"no aggregation node for {prefix} (reads {n_sources} sources) ran in the graph")
            w = torch.ones(1)  # a single source has softmax weight 1
        elif w.shape[0] != n_sources:
            raise ValueError(f"{prefix}: the graph aggregates {w.shape[0]} sources, the report says {n_sources}")
        per_row.append(w)
    weights = torch.full((len(rows), max(w.shape[0] for w in per_row)), float("nan"))
    for i, w in enumerate(per_row):
        weights[i, : w.shape[0]] = w
    return DepthWeights(
        weights=weights,
        rows=[label for _, label, _ in rows],
        prefixes=[prefix for prefix, _, _ in rows],
        num_sources=[int(w.shape[0]) for w in per_row],
        num_tokens=recorder.num_tokens,
    )


def draw_depth_weights(dw: DepthWeights, title: Optional[str] = None):
    """A heatmap like the paper's Figure 8: inputs (sublayers) down, sources across; a matplotlib Figure."""
    import numpy as np

    from .pictures import new_figure

    n_rows, n_cols = dw.weights.shape
    fig = new_figure(max(4.0, 0.55 * n_cols + 3.5), max(3.0, 0.32 * n_rows + 1.5))
    ax = fig.add_subplot()
    data = np.ma.masked_invalid(dw.weights.numpy())
    import matplotlib

    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")  # sources a row does not read
    im = ax.imshow(data, cmap=cmap, vmin=0.0, vmax=max(float(np.nanmax(dw.weights.numpy())), 1e-6), aspect="auto")
    if n_rows * n_cols <= 600:  # values in the cells while they stay legible
        for i in range(n_rows):
            for j in range(n_cols):
                v = dw.weights[i, j].item()
                if v == v:
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if v < 0.6 * im.norm.vmax else "black")
    ax.set_xticks(range(n_cols), dw.columns, fontsize=7)
    ax.set_yticks(range(n_rows), dw.rows, fontsize=7)
    ax.set_xlabel("source (b0 = embedding, bj = block j; last one read = partial block sum)", fontsize=8)
    ax.set_ylabel("input of", fontsize=8)
    ax.set_title(title or f"Depth-attention weights (mean over {dw.num_tokens} tokens)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04)
    return fig


def render_depth_weights(dw: DepthWeights, format: str = "png", title: Optional[str] = None):
    """The heatmap as PNG/SVG bytes (a ``Picture``; matplotlib)."""
    from .pictures import Picture, check_format, figure_bytes

    fmt = check_format(format)
    return Picture(figure_bytes(draw_depth_weights(dw, title), fmt), fmt, "matplotlib")


def plot_depth_weights(dw: DepthWeights, path: Union[str, Path], format: Optional[str] = None) -> Path:
    """Save the heatmap to ``path`` (format from its suffix, .png or .svg, unless given)."""
    from .pictures import format_of

    return render_depth_weights(dw, format or format_of(path)).save(path)
