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


def _stacked(sources: Sequence[Tensor]) -> Tensor:
    """``[n, ..., D]`` in the compute dtype (one copy; the kernels read the list in place instead)."""
    cd = _compute_dtype(sources[0].dtype)
    return torch.stack([s.to(cd) for s in sources])


def _folded_query(query: Tensor, norm_weight: Optional[Tensor], cd: torch.dtype) -> Tensor:
    q = query.to(cd)
    return q * norm_weight.to(cd) if norm_weight is not None else q  # w.(k*g) == (w*g).k


def _scores(V: Tensor, qg: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``(scores [n, ...], r [n, ...])`` with ``r = rsqrt(mean(v^2) + eps)``.

    ``qg . RMSNorm(v) == r * (qg . v)``: the normalised keys are never materialised.
    """
    r = torch.rsqrt(V.pow(2).mean(-1) + eps)  # [n, ...]
    return (V @ qg) * r, r


def attn_res_scores(
    sources: Sequence[Tensor], query: Tensor, norm_weight: Optional[Tensor], eps: float
) -> Tensor:
    """Scores ``w . (RMSNorm(v_i) * g)`` for every source: ``[n, ...]`` in the compute dtype."""
    V = _stacked(sources)
    return _scores(V, _folded_query(query, norm_weight, V.dtype), eps)[0]


def attn_res_reference(
    sources: Sequence[Tensor],
    query: Tensor,
    norm_weight: Optional[Tensor] = None,
    eps: float = DEFAULT_EPS,
    scale: float = 1.0,
) -> Tensor:
    """``scale * sum_i softmax_i(query . RMSNorm(v_i; norm_weight, eps)) * v_i`` -> ``[..., D]``."""
    _check_sources(sources, query)
    V = _stacked(sources)  # [n, ..., D]
    weights = torch.softmax(_scores(V, _folded_query(query, norm_weight, V.dtype), eps)[0], dim=0)  # [n, ...]
    out = (weights.unsqueeze(-1) * V).sum(0)  # [..., D]
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
           = scale * a_i dy + r_i ds_i (q' - n_i s_i / D)       since dn_i . n_i = ds_i s_i
      d query = dq' * g;  d g = dq' * query
    """
    _check_sources(sources, query)
    V = _stacked(sources)  # [n, ..., D]
    cd, D = V.dtype, V.shape[-1]
    dy = grad_out.to(cd)  # [..., D]
    qg = _folded_query(query, norm_weight, cd)  # [D]
    s, r = _scores(V, qg, eps)  # [n, ...]
    a = torch.softmax(s, dim=0)
    da = scale * (V * dy).sum(-1)  # [n, ...]
    ds = a * (da - (a * da).sum(0, keepdim=True))  # [n, ...]
    d_qg = ((ds * r).unsqueeze(-1) * V).reshape(-1, D).sum(0)  # sum over sources and tokens of ds_i n_i, [D]
    # one tensor per source (not views of one stacked tensor: op outputs must not alias)
    grad_sources = [
        (scale * a[i].unsqueeze(-1) * dy + (r[i] * ds[i]).unsqueeze(-1) * (qg - V[i] * (r[i] * s[i] / D).unsqueeze(-1)))
        .to(sources[0].dtype)
        for i in range(V.shape[0])
    ]
    q = query.to(cd)
    grad_query = (d_qg * norm_weight.to(cd) if norm_weight is not None else d_qg).to(query.dtype)
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
    return _phase2_mix(phase1_out, phase1_lse, partial, query, norm_weight, eps, scale).to(phase1_out.dtype)


def _phase2_mix(phase1_out, phase1_lse, partial, query, norm_weight, eps, scale) -> Tensor:
    """The phase-2 merge in the compute dtype (not rounded to the input dtype)."""
    cd = _compute_dtype(phase1_out.dtype)
    if partial is None:
        return phase1_out.to(cd) * scale
    s_p = attn_res_scores([partial], query, norm_weight, eps)[0]  # [...]
    lse = torch.logaddexp(phase1_lse.to(cd), s_p)
    out = torch.exp(phase1_lse.to(cd) - lse).unsqueeze(-1) * phase1_out.to(cd)
    out = out + torch.exp(s_p - lse).unsqueeze(-1) * partial.to(cd)
    return out * scale


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


def attn_res_phase2_normed_reference(
    phase1_out: Tensor,
    phase1_lse: Tensor,
    partial: Optional[Tensor],
    query: Tensor,
    norm_weight: Optional[Tensor] = None,
    eps: float = DEFAULT_EPS,
    scale: float = 1.0,
    out_norm_weight: Optional[Tensor] = None,
    out_eps: float = DEFAULT_EPS,
) -> tuple[Tensor, Tensor]:
    """Phase 2 followed by the sublayer's RMSNorm: ``(mix, RMSNorm(mix) * out_norm_weight)``, both in
    phase1_out's dtype, ``mix = attn_res_phase2_reference(...)``. As in ``attn_res_normed_reference``
    the normalised form is computed from the fp32 mixture (before rounding to the input dtype)."""
    mix = _phase2_mix(phase1_out, phase1_lse, partial, query, norm_weight, eps, scale)
    normed = rms_normalize(mix, out_eps)
    if out_norm_weight is not None:
        normed = normed * out_norm_weight.to(mix.dtype)
    dt = phase1_out.dtype
    return mix.to(dt), normed.to(dt)
