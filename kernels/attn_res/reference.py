"""Plain-PyTorch reference for the AttnRes aggregation: the spec every kernel implements.

One aggregation (the paper's `h_l = sum_i softmax_i(w_l . RMSNorm(v_i)) v_i`), generalised with
two knobs the library needs:

* ``norm_weight`` — the learnable gain of the key RMSNorm (None means ones).
* ``scale`` — multiplies the mixture. ``convert`` passes the number of sources so that, with a zero
  query (uniform weights ``1/n``), ``scale * mean = sum``: the converted model then computes exactly
  what the original pre-norm residual computed. ``scale=1`` is the paper's plain average.

Math is done in float32 for low-precision inputs (float64 stays float64); the output has the
sources' dtype. Shapes: every source is ``[..., D]`` (same shape), query and gains are ``[D]``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

DEFAULT_EPS = 1e-6


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_sources(sources: Sequence[Tensor], query: Tensor) -> None:
    if len(sources) == 0:
        raise ValueError("attn_res needs at least one source, got an empty list")
    shape, dtype = sources[0].shape, sources[0].dtype
    for i, s in enumerate(sources):
        if s.shape != shape or s.dtype != dtype:
            raise ValueError(
                f"attn_res sources must share shape and dtype: source 0 is {tuple(shape)} {dtype}, "
                f"source {i} is {tuple(s.shape)} {s.dtype}"
            )
    if query.shape != (shape[-1],):
        raise ValueError(f"attn_res query must have shape [{shape[-1]}] (the hidden size), got {tuple(query.shape)}")


def rms_normalize(x: Tensor, eps: float) -> Tensor:
    """x * rsqrt(mean(x^2, -1) + eps), no gain, in x's dtype."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def attn_res_scores(
    sources: Sequence[Tensor], query: Tensor, norm_weight: Optional[Tensor], eps: float
) -> Tensor:
    """Scores ``w . (RMSNorm(v_i) * g)`` for every source: ``[n, ...]`` in the compute dtype."""
    cd = _compute_dtype(sources[0].dtype)
    q = query.to(cd)
    if norm_weight is not None:
        q = q * norm_weight.to(cd)  # (w . (k * g)) == ((w * g) . k): fold the gain into the query
    return torch.stack([(rms_normalize(s.to(cd), eps) * q).sum(-1) for s in sources])  # [n, ...]


def attn_res_reference(
    sources: Sequence[Tensor],
    query: Tensor,
    norm_weight: Optional[Tensor] = None,
    eps: float = DEFAULT_EPS,
    scale: float = 1.0,
) -> Tensor:
    """``scale * sum_i softmax_i(query . RMSNorm(v_i; norm_weight, eps)) * v_i`` -> ``[..., D]``."""
    _check_sources(sources, query)
    cd = _compute_dtype(sources[0].dtype)
    weights = torch.softmax(attn_res_scores(sources, query, norm_weight, eps), dim=0)  # [n, ...]
    out = sum(w.unsqueeze(-1) * s.to(cd) for w, s in zip(weights, sources))
    return (out * scale).to(sources[0].dtype)


def attn_res_backward_reference(
    grad_out: Tensor,
    sources: Sequence[Tensor],
    query: Tensor,
    norm_weight: Optional[Tensor] = None,
    eps: float = DEFAULT_EPS,
    scale: float = 1.0,
) -> tuple[list[Tensor], Tensor, Optional[Tensor]]:
    """Closed-form gradients of ``attn_res_reference``: ``(grad_sources, grad_query, grad_norm_weight)``.

    With r_i = rsqrt(mean(v_i^2) + eps), n_i = v_i r_i, q' = query * g, s_i = q'.n_i, a = softmax(s),
    out = scale * sum_i a_i v_i and upstream gradient dy:
      da_i = scale * (dy . v_i);  ds_i = a_i (da_i - sum_j a_j da_j);  dq' = sum_tokens ds_i n_i
      dv_i = scale * a_i dy + r_i (dn_i - n_i mean(dn_i n_i))   with dn_i = ds_i q'
      d query = dq' * g;  d g = dq' * query
    """
    _check_sources(sources, query)
    cd = _compute_dtype(sources[0].dtype)
    dy = grad_out.to(cd)
    q = query.to(cd)
    g = norm_weight.to(cd) if norm_weight is not None else None
    qg = q * g if g is not None else q
    vs = [s.to(cd) for s in sources]
    rs = [torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps) for v in vs]  # [..., 1]
    ns = [v * r for v, r in zip(vs, rs)]  # [..., D]
    a = torch.softmax(torch.stack([(n * qg).sum(-1) for n in ns]), dim=0)  # [n, ...]
    da = torch.stack([scale * (dy * v).sum(-1) for v in vs])  # [n, ...]
    ds = a * (da - (a * da).sum(0, keepdim=True))  # [n, ...]
    d_qg = sum((dsi.unsqueeze(-1) * n).reshape(-1, n.shape[-1]).sum(0) for dsi, n in zip(ds, ns))  # [D]
    grad_sources = []
    for ai, dsi, v, r, n in zip(a, ds, vs, rs, ns):
        dn = dsi.unsqueeze(-1) * qg
        dv = scale * ai.unsqueeze(-1) * dy + r * (dn - n * (dn * n).mean(-1, keepdim=True))
        grad_sources.append(dv.to(sources[0].dtype))
    grad_query = (d_qg * g if g is not None else d_qg).to(query.dtype)
    grad_weight = (d_qg * q).to(norm_weight.dtype) if norm_weight is not None else None
    return grad_sources, grad_query, grad_weight


def attn_res_weights_reference(
    sources: Sequence[Tensor], query: Tensor, norm_weight: Optional[Tensor] = None, eps: float = DEFAULT_EPS
) -> Tensor:
    """The softmax weights over sources, ``[n, ...]`` (for inspection and plots)."""
    _check_sources(sources, query)
    return torch.softmax(attn_res_scores(sources, query, norm_weight, eps), dim=0)


# ---- the paper's two-phase schedule -------------------------------------------------------------


def attn_res_phase1_reference(
    sources: Sequence[Tensor],
    queries: Tensor,
    norm_weights: Optional[Tensor] = None,
    eps: float = DEFAULT_EPS,
) -> tuple[Tensor, Tensor]:
    """Phase 1: every query of a block scores the completed blocks in one pass.

    sources: m tensors ``[..., D]``; queries ``[S, D]``; norm_weights ``[S, D]`` or None.
    Returns ``(out [S, ..., D]`` in the sources' dtype — the softmax-normalised mixture over these
    sources for each query — ``, lse [S, ...]`` float32/float64 — log-sum-exp of each query's scores).
    """
    cd = _compute_dtype(sources[0].dtype)
    outs, lses = [], []
    for j in range(queries.shape[0]):
        g = None if norm_weights is None else norm_weights[j]
        scores = attn_res_scores(sources, queries[j], g, eps)  # [m, ...]
        lse = torch.logsumexp(scores, dim=0)
        w = torch.exp(scores - lse)
        outs.append(sum(wi.unsqueeze(-1) * s.to(cd) for wi, s in zip(w, sources)).to(sources[0].dtype))
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses)


def attn_res_phase2_reference(
    phase1_out: Tensor,
    phase1_lse: Tensor,
    partial: Optional[Tensor],
    query: Tensor,
    norm_weight: Optional[Tensor] = None,
    eps: float = DEFAULT_EPS,
    scale: float = 1.0,
) -> Tensor:
    """Phase 2: merge one sublayer's phase-1 result with the running partial block (online softmax).

    phase1_out ``[..., D]``, phase1_lse ``[...]``, partial ``[..., D]`` or None (first sublayer of a
    block). Equals ``attn_res_reference(completed + [partial], ...)``.
    """
    cd = _compute_dtype(phase1_out.dtype)
    if partial is None:
        return (phase1_out.to(cd) * scale).to(phase1_out.dtype)
    s_p = attn_res_scores([partial], query, norm_weight, eps)[0]  # [...]
    lse = torch.logaddexp(phase1_lse.to(cd), s_p)
    out = torch.exp(phase1_lse.to(cd) - lse).unsqueeze(-1) * phase1_out.to(cd)
    out = out + torch.exp(s_p - lse).unsqueeze(-1) * partial.to(cd)
    return (out * scale).to(phase1_out.dtype)


# ---- aggregation followed by the sublayer's own RMSNorm -----------------------------------------


def attn_res_normed_reference(
    sources: Sequence[Tensor],
    query: Tensor,
    norm_weight: Optional[Tensor] = None,
    eps: float = DEFAULT_EPS,
    scale: float = 1.0,
    out_norm_weight: Optional[Tensor] = None,
    out_eps: float = DEFAULT_EPS,
) -> tuple[Tensor, Tensor]:
    """Returns ``(mix, RMSNorm(mix) * out_norm_weight)``, both in the sources' dtype.

    The normalised form is computed from the fp32 mixture (before rounding to the input dtype), as
    a fused kernel would.
    """
    _check_sources(sources, query)
    cd = _compute_dtype(sources[0].dtype)
    weights = torch.softmax(attn_res_scores(sources, query, norm_weight, eps), dim=0)
    mix = sum(w.unsqueeze(-1) * s.to(cd) for w, s in zip(weights, sources)) * scale
    normed = rms_normalize(mix, out_eps)
    if out_norm_weight is not None:
        normed = normed * out_norm_weight.to(cd)
    dt = sources[0].dtype
    return mix.to(dt), normed.to(dt)
