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


def _compute(sources: Sequence[Tensor]) -> list[Tensor]:
    """The sources in the compute dtype (no copy for float32/float64 inputs)."""
    cd = _compute_dtype(sources[0].dtype)
    return [s.to(cd) for s in sources]


def _folded_query(query: Tensor, norm_weight: Optional[Tensor], cd: torch.dtype) -> Tensor:
    q = query.to(cd)
    return q * norm_weight.to(cd) if norm_weight is not None else q  # w.(k*g) == (w*g).k


def _scores(vs: Sequence[Tensor], qg: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``(scores [n, ...], r [n, ...])`` with ``r = rsqrt(mean(v^2) + eps)``.

    ``qg . RMSNorm(v) == r * (qg . v)``: the normalised keys are never materialised, and each source
    is read where it lies (no stacked copy): two reductions per source.
    """
    D = vs[0].shape[-1]
    r = torch.stack([torch.rsqrt(torch.linalg.vector_norm(v, dim=-1).square() / D + eps) for v in vs])  # [n, ...]
    return torch.stack([v @ qg for v in vs]) * r, r


def attn_res_scores(
    sources: Sequence[Tensor], query: Tensor, norm_weight: Optional[Tensor], eps: float
) -> Tensor:
    """Scores ``w . (RMSNorm(v_i) * g)`` for every source: ``[n, ...]`` in the compute dtype."""
    vs = _compute(sources)
    return _scores(vs, _folded_query(query, norm_weight, vs[0].dtype), eps)[0]


def _mix(vs: Sequence[Tensor], weights: Tensor, in_place: bool = True) -> Tensor:
    """``sum_i weights[i] * v_i`` accumulated in place (or in functional ops, for graphs): ``[..., D]``."""
    if not in_place:
        return sum(w.unsqueeze(-1) * v for w, v in zip(weights, vs))
    out = vs[0] * weights[0].unsqueeze(-1)
    for w, v in zip(weights[1:], vs[1:]):
        out.addcmul_(w.unsqueeze(-1), v)
    return out


def attn_res_reference(
    sources: Sequence[Tensor],
    query: Tensor,
    norm_weight: Optional[Tensor] = None,
    eps: float = DEFAULT_EPS,
    scale: float = 1.0,
) -> Tensor:
    """``scale * sum_i softmax_i(query . RMSNorm(v_i; norm_weight, eps)) * v_i`` -> ``[..., D]``."""
    _check_sources(sources, query)
    return _aggregate(sources, query, norm_weight, eps, scale).to(sources[0].dtype)


def attn_res_composite(
    sources: Sequence[Tensor],
    query: Tensor,
    norm_weight: Optional[Tensor] = None,
    eps: float = DEFAULT_EPS,
    scale: float = 1.0,
) -> Tensor:
    """``attn_res_reference`` in functional torch ops (no in-place accumulation): the op's
    CompositeImplicitAutograd kernel, which ``ExportedProgram.run_decompositions()`` puts in the op's
    place, so that an exported converted model needs no custom op (ONNX, AOTInductor, loading without
    this library)."""
    return _aggregate(sources, query, norm_weight, eps, scale, in_place=False).to(sources[0].dtype)


def _aggregate(sources, query, norm_weight, eps, scale, in_place: bool = True) -> Tensor:
    """The mixture in the compute dtype (not rounded to the input dtype): ``[..., D]``."""
    vs = _compute(sources)  # n x [..., D]
    weights = torch.softmax(_scores(vs, _folded_query(query, norm_weight, vs[0].dtype), eps)[0], dim=0)  # [n, ...]
    return _mix(vs, weights * scale, in_place)


def _with_out_norm(mix: Tensor, out_norm_weight: Optional[Tensor], out_eps: float, dtype) -> tuple[Tensor, Tensor]:
    """``(mix, RMSNorm(mix) * out_norm_weight)`` rounded to ``dtype``; the norm reads the unrounded mix."""
    normed = rms_normalize(mix, out_eps)
    if out_norm_weight is not None:
        normed = normed * out_norm_weight.to(mix.dtype)
    return mix.to(dtype), normed.to(dtype)


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
    vs = _compute(sources)  # n x [..., D]
    cd, D = vs[0].dtype, vs[0].shape[-1]
    dy = grad_out.to(cd)  # [..., D]
    qg = _folded_query(query, norm_weight, cd)  # [D]
    s, r = _scores(vs, qg, eps)  # [n, ...]
    a = torch.softmax(s, dim=0)
    da = scale * torch.stack([(v * dy).sum(-1) for v in vs])  # [n, ...]
    ds = a * (da - (a * da).sum(0, keepdim=True))  # [n, ...]
    c = ds * r  # [n, ...]
    d_qg = sum((ci.reshape(-1) @ v.reshape(-1, D)) for ci, v in zip(c, vs))  # sum over tokens of ds_i n_i, [D]
    # one tensor per source (not views of one stacked tensor: op outputs must not alias)
    grad_sources = [
        (scale * a[i].unsqueeze(-1) * dy + c[i].unsqueeze(-1) * (qg - vs[i] * (r[i] * s[i] / D).unsqueeze(-1)))
        .to(sources[0].dtype)
        for i in range(len(vs))
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


def _phase1_mixes(sources, queries, norm_weights, eps) -> tuple[list[Tensor], Tensor]:
    """Every query's softmax mixture over the sources, unrounded (compute dtype), and the lse [S, ...]."""
    vs = _compute(sources)  # converted once for all queries
    mixes, lses = [], []
    for j in range(queries.shape[0]):
        g = None if norm_weights is None else norm_weights[j]
        scores = _scores(vs, _folded_query(queries[j], g, vs[0].dtype), eps)[0]  # [m, ...]
        lse = torch.logsumexp(scores, dim=0)
        mixes.append(_mix(vs, torch.exp(scores - lse)))
        lses.append(lse)
    return mixes, torch.stack(lses)


def attn_res_phase1_reference(
    sources: Sequence[Tensor],
    queries: Tensor,
    norm_weights: Optional[Tensor] = None,
    eps: float = DEFAULT_EPS,
) -> tuple[list[Tensor], Tensor]:
    """Phase 1: every query of a block scores the completed blocks in one pass.

    sources: m tensors ``[..., D]``; queries ``[S, D]``; norm_weights ``[S, D]`` or None.
    Returns ``(outs`` — S tensors ``[..., D]`` in the sources' dtype, query j's softmax-normalised
    mixture over these sources — ``, lse [S, ...]`` float32/float64 — log-sum-exp of each query's scores).
    """
    mixes, lse = _phase1_mixes(sources, queries, norm_weights, eps)
    return [m.to(sources[0].dtype) for m in mixes], lse


def attn_res_phase1_normed_reference(
    sources: Sequence[Tensor],
    queries: Tensor,
    norm_weights: Optional[Tensor],
    eps: float,
    scale: float,
    out_norm_weight: Optional[Tensor],
    out_eps: float,
) -> tuple[Tensor, list[Tensor], Tensor]:
    """Phase 1 with its first query's merge fused in: that query reads no partial block (the first
    sublayer of a block), so its merge is ``RMSNorm(scale * out_0) * out_norm_weight``, here taken from
    the unrounded out_0. Returns ``(normed_0, outs_1..S-1, lse [S, ...])``: out_0 itself is not returned
    (only its normed form is read)."""
    mixes, lse = _phase1_mixes(sources, queries, norm_weights, eps)
    normed0 = _with_out_norm(scale * mixes[0], out_norm_weight, out_eps, sources[0].dtype)[1]
    return normed0, [m.to(sources[0].dtype) for m in mixes[1:]], lse


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
    return _with_out_norm(_aggregate(sources, query, norm_weight, eps, scale), out_norm_weight, out_eps, sources[0].dtype)


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
    return _with_out_norm(mix, out_norm_weight, out_eps, phase1_out.dtype)


def check_partial_update(phase1_out: Tensor, partial: Optional[Tensor], delta: Tensor, what: str) -> None:
    """The fused partial update's contract: partial and delta of phase1_out's shape, the partial of its
    dtype, the delta of that dtype or one that promotes to it (a bf16 branch into an fp32 stream)."""
    if (partial is None or not partial.shape == delta.shape == phase1_out.shape or partial.dtype != phase1_out.dtype
            or torch.promote_types(delta.dtype, partial.dtype) != partial.dtype):
        raise ValueError(
            f"{what}: the fused partial update needs partial and delta of phase1_out's shape, the partial of "
            f"its dtype and the delta of one that promotes to it; phase1_out is {tuple(phase1_out.shape)} "
            f"{phase1_out.dtype}; got partial {None if partial is None else (tuple(partial.shape), partial.dtype)}, "
            f"delta {(tuple(delta.shape), delta.dtype)}"
        )


def attn_res_phase2_add_normed_reference(
    phase1_out: Tensor,
    phase1_lse: Tensor,
    partial: Tensor,
    delta: Tensor,
    query: Tensor,
    norm_weight: Optional[Tensor] = None,
    eps: float = DEFAULT_EPS,
    scale: float = 1.0,
    out_norm_weight: Optional[Tensor] = None,
    out_eps: float = DEFAULT_EPS,
) -> tuple[Tensor, Tensor]:
    """The partial block's update fused with the phase-2 merge and the sublayer's RMSNorm:
    ``(new = partial + delta, RMSNorm(attn_res_phase2(phase1_out, phase1_lse, new, ...)) * out_norm_weight)``.
    ``new`` is rounded to the partial's dtype exactly as the add it replaces; the mixture is not returned."""
    check_partial_update(phase1_out, partial, delta, "attn_res_phase2_add_normed")
    new = partial + delta
    return new, attn_res_phase2_normed_reference(
        phase1_out, phase1_lse, new, query, norm_weight, eps, scale, out_norm_weight, out_eps
    )[1]
