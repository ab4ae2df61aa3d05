"""Learned depth-attention weights of a converted model: which earlier blocks each sublayer reads.

The converted model is run once under a ``TorchFunctionMode`` that, at every aggregation op it calls,
also computes the softmax weights over its sources with the plain-PyTorch reference
(``attn_res_weights_reference``) and averages them over every token of the inputs (each batch row
and position counts equally, unless a ``token_mask`` says which count). The op itself still runs, so
what is recorded is what the model computes; each aggregation is named by its query parameter.

Layout of ``DepthWeights.weights`` ([rows, columns], float32):

* rows: one per aggregation in graph (= depth) order — each sublayer's input, then the stream's final
  aggregation (the final norm's input); several streams follow each other.
* column j: source j of the aggregation, which is always block j of the stream: b_0 (the embedding
  output), the completed block b_j, or — in the last column a sublayer reads, where ``partial`` flags
  the row — the partial sum of its own block (the sublayers of the block before it). A sublayer that
  starts a block and the final aggregation read completed blocks only. For Full AttnRes (blocks of one
  sublayer) column j is sublayer j-1's output, as in the paper's Figure 8.
* sources a row does not read are NaN (not 0, so a plot leaves them blank and nothing mistakes them
  for a learned zero); ``torch.nansum(weights, 1)`` is 1 for every row.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from residual_rewriter.kernels.attn_res import attn_res_weights_reference
from residual_rewriter.passes.op_names import is_attn_res_op

from .streams import site_labels


@dataclass
class DepthWeights:
    weights: Tensor  # [rows, max_sources], NaN where a row reads fewer sources
    rows: list[str]  # row labels: the sublayer whose input the aggregation builds, or "final -> <consumer>"
    prefixes: list[str]  # attn_res.<key> parameter prefix of each row
    num_sources: list[int]
    partial: list[bool]  # the row's last source is the partial sum of its own block, not a completed block
    stream_tokens: list[int]  # tokens the means of each stream's rows are over (T5: encoder, decoder)

    @property
    def num_tokens(self) -> Union[int, tuple[int, ...]]:
        """The tokens each row's mean is over: one count, or a tuple per stream where they differ."""
        counts = tuple(self.stream_tokens)
        return counts[0] if len(set(counts)) == 1 else counts

    @property
    def tokens_text(self) -> str:
        """'32 tokens', or '14 tokens (stream 0), 6 tokens (stream 1)'."""
        if isinstance(self.num_tokens, int):
            return f"{self.num_tokens} tokens"
        return ", ".join(f"{n} tokens (stream {i})" for i, n in enumerate(self.stream_tokens))

    @property
    def columns(self) -> list[str]:
        return [f"b{j}" for j in range(self.weights.shape[1])]

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": list(self.rows),
            "columns": self.columns,
            "prefixes": list(self.prefixes),
            "num_sources": list(self.num_sources),
            "partial": list(self.partial),
            "num_tokens": self.num_tokens,
            "stream_tokens": list(self.stream_tokens),
            # JSON has no NaN: sources a row does not read are null
            "weights": [[None if v != v else round(float(v), 6) for v in row] for row in self.weights.tolist()],
        }

    def __str__(self) -> str:
        w_label = max(len(r) for r in self.rows) if self.rows else 4
        head = (f"{'':<{w_label}}  " + " ".join(f"{c:>6} " for c in self.columns)).rstrip()
        lines = [f"mean depth-attention weights over {self.tokens_text} (rows: inputs, columns: sources)", head]
        for label, row, n, partial in zip(self.rows, self.weights.tolist(), self.num_sources, self.partial):
            marks = ["*" if partial and j == n - 1 else " " for j in range(len(row))]
            cells = " ".join("     . " if v != v else f"{v:6.3f}{m}" for v, m in zip(row, marks))
            lines.append(f"{label:<{w_label}}  {cells}".rstrip())
        lines.append("b0 = embedding, bj = completed block j"
                     + ("; * = the partial sum of the row's own block (its sublayers so far)" if any(self.partial) else ""))
        return "\n".join(lines)


class _WeightRecorder(TorchFunctionMode):
    """Lets every op run; at each aggregation records the token-mean softmax weights over its sources,
    keyed by the aggregation's parameter prefix (its query's name without ``.query``)."""

    def __init__(self, prefixes: dict[int, str], token_mask: Optional[Tensor] = None):
        super().__init__()
        self.prefixes = prefixes  # id(query parameter) -> prefix
        self.records: dict[str, Tensor] = {}
        self.num_tokens: dict[str, int] = {}  # prefix -> tokens its mean is over
        self.token_mask = token_mask

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if is_attn_res_op(func):
            self._record(*args[:4])
        return func(*args, **(kwargs or {}))

    def _record(self, sources, query, norm_weight, eps) -> None:
        w = attn_res_weights_reference(sources, query, norm_weight, eps)  # [n_sources, *token dims]
        prefix = self.prefixes.get(id(query), f"aggregation {len(self.records)}")
        if self.token_mask is None:
            self.records[prefix] = w.reshape(w.shape[0], -1).float().mean(1)  # [n_sources]
            self.num_tokens[prefix] = w[0].numel()
            return
        if self.token_mask.shape != w.shape[1:]:  # the mean over the tokens the mask keeps (not padding)
            raise ValueError(
                f"token_mask has shape {tuple(self.token_mask.shape)}, but {prefix} mixes tokens "
                f"of shape {tuple(w.shape[1:])} (the sources' shape without the hidden dim): pass one "
                "flag per token, e.g. the attention_mask [batch, seq]"
            )
        keep = self.token_mask.to(device=w.device, dtype=torch.float32).reshape(-1)
        self.records[prefix] = (w.reshape(w.shape[0], -1).float() * keep).sum(1) / keep.sum()
        self.num_tokens[prefix] = int(keep.sum().item())


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


def _rows_from_report(report) -> list[tuple[str, str, int, bool]]:
    """(prefix, label, num_sources, partial) of every sublayer and final aggregation, in depth order."""
    many = len(report.streams) > 1
    rows = []
    for st in report.streams:
        tag = f"[{st.index}] " if many else ""
        rows += [(s.param_prefix, f"{tag}{label}", s.num_sources, s.position > 0)
                 for s, label in zip(st.sites, site_labels(st))]
        rows.append((st.final_param_prefix, f"{tag}final -> {', '.join(st.consumers)}", st.num_blocks + 1, False))
    return rows


def depth_attention_weights(model: torch.nn.Module, *inputs: Any, token_mask: Optional[Tensor] = None, **kwargs: Any) -> DepthWeights:
    """The mean depth-attention weight of every aggregation of a converted ``model`` over one call.

    ``model`` is what ``convert``/``convert_`` returned (trained or not), called as
    ``model(*inputs, **kwargs)``. At init (zero queries) every row is uniform, 1 / its number of
    sources. ``token_mask`` (one flag per token, e.g. an attention mask ``[batch, seq]``) averages over
    the kept tokens only, so padding does not count.

    Rows follow the report (every sublayer, then the final aggregation, per stream). A sublayer that
    reads a single source (the first one, b_0) has no aggregation (a softmax over one source is the
    identity); its row is exactly [1].
    """
    report = getattr(model, "attn_res_report", None)
    if not isinstance(model, torch.nn.Module) or report is None:
        raise TypeError(f"expected a model converted by residual_rewriter (with .attn_res_report), got {type(model).__name__}")
    if token_mask is not None and not token_mask.any():
        raise ValueError("token_mask keeps no token: there is nothing to average")
    prefixes = {id(p): name[: -len(".query")] for name, p in model.named_parameters(remove_duplicate=False) if name.endswith(".query")}
    recorder = _WeightRecorder(prefixes, token_mask)
    with torch.no_grad(), _eval(model), recorder:
        model(*inputs, **kwargs)
    rows = _rows_from_report(report)
    per_row = []
    for prefix, _label, n_sources, _partial in rows:
        w = recorder.records.get(prefix)
        if w is None:
            if n_sources != 1:
                raise ValueError(f"no aggregation for {prefix} (reads {n_sources} sources) ran in the model")
            w = torch.ones(1)  # a single source has softmax weight 1
        elif w.shape[0] != n_sources:
            raise ValueError(f"{prefix}: the model aggregates {w.shape[0]} sources, the report says {n_sources}")
        per_row.append(w)
    weights = torch.full((len(rows), max(w.shape[0] for w in per_row)), float("nan"))
    for i, w in enumerate(per_row):
        weights[i, : w.shape[0]] = w
    return DepthWeights(
        weights=weights,
        rows=[row[1] for row in rows],
        prefixes=[row[0] for row in rows],
        num_sources=[int(w.shape[0]) for w in per_row],
        partial=[row[3] for row in rows],
        # a stream's final aggregation reads b_0 and at least one block, so it always ran and was recorded
        stream_tokens=[recorder.num_tokens[st.final_param_prefix] for st in report.streams],
    )


def draw_depth_weights(dw: DepthWeights, title: Optional[str] = None):
    """A heatmap like the paper's Figure 8: inputs (sublayers) down, sources across; a matplotlib Figure."""
    import numpy as np
    from matplotlib.patches import Rectangle

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
    for i, (n, partial) in enumerate(zip(dw.num_sources, dw.partial)):
        if partial:  # the partial sum of the row's own block, not the completed block of its column
            ax.add_patch(Rectangle((n - 1.5, i - 0.5), 1, 1, fill=False, hatch="//", edgecolor=(1, 1, 1, 0.35), lw=0))
    ax.set_xticks(range(n_cols), dw.columns, fontsize=7)
    ax.set_yticks(range(n_rows), dw.rows, fontsize=7)
    partial = "; hatched = the partial sum of the row's own block so far" if any(dw.partial) else ""
    ax.set_xlabel(f"source (b0 = embedding, bj = completed block j{partial})", fontsize=8)
    ax.set_ylabel("input of", fontsize=8)
    ax.set_title(title or f"Depth-attention weights (mean over {dw.tokens_text})", fontsize=9)
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
