"""The library ops' math as plain torch ops, for the CPU lowering (inductor fuses these; the opaque
ops would run as unfused extern calls into the Python reference).

Each function follows its spec in ``kernels/attn_res/reference.py`` step for step (same compute
dtype, same rounding points), but is written so it can be called on ``torch.fx.Proxy`` values: no
Python branches on tensor values; the dtype is passed in (taken from the graph's metadata).
Autograd of these ops gives the backward, so the training graph is fused by inductor too.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _to(x, dtype: torch.dtype, current: torch.dtype):
    return x if dtype == current else x.to(dtype)


def _dtype_of(x) -> Optional[torch.dtype]:
    """A tensor's dtype, or the recorded dtype of a Proxy's node (None when unknown)."""
    if isinstance(x, torch.Tensor):
        return x.dtype
    meta = getattr(getattr(x, "node", None), "meta", {})
    v = meta.get("example_value", meta.get("val"))
    return v.dtype if isinstance(v, torch.Tensor) else None


def _cast(x, dtype: torch.dtype):
    """An INPUT in the compute dtype; the cast is left out when it would be a no-op."""
    return x if _dtype_of(x) == dtype else x.to(dtype)


def _rms(x, eps: float):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)  # [..., D]


def _gained_query(query, gain, cd):
    q = _cast(query, cd)  # [D] (or [S, D])
    return q * _cast(gain, cd) if gain is not None else q  # (w . (k * g)) == ((w * g) . k)


def _scores(xs: Sequence, q, eps: float):
    return torch.stack([(_rms(x, eps) * q).sum(-1) for x in xs])  # [n, ...]


def _mix(xs: Sequence, weights):
    out = weights[0].unsqueeze(-1) * xs[0]
    for i in range(1, len(xs)):
        out = out + weights[i].unsqueeze(-1) * xs[i]
    return out  # [..., D]


def attn_res(sources, query, norm_weight, eps: float, scale: float, *, dtype):
    """= attn_res_reference. ``dtype``: the sources' dtype (the output's)."""
    cd = compute_dtype(dtype)
    xs = [_cast(s, cd) for s in sources]
    w = torch.softmax(_scores(xs, _gained_query(query, norm_weight, cd), eps), dim=0)
    return _to(_mix(xs, w) * scale, dtype, cd)


def attn_res_normed(sources, query, norm_weight, eps, scale, out_norm_weight, out_eps, *, return_mix=True, dtype):
    """= attn_res_normed_reference: (mix, RMSNorm(mix) * out_norm_weight), normed from the unrounded mix;
    (None, normed) without ``return_mix``."""
    cd = compute_dtype(dtype)
    xs = [_cast(s, cd) for s in sources]
    w = torch.softmax(_scores(xs, _gained_query(query, norm_weight, cd), eps), dim=0)
    mix = _mix(xs, w) * scale
    return _with_out_norm(mix, out_norm_weight, out_eps, return_mix, dtype, cd)


def _with_out_norm(mix, out_norm_weight, out_eps, return_mix, dtype, cd):
    normed = _rms(mix, out_eps)
    if out_norm_weight is not None:
        normed = normed * _cast(out_norm_weight, cd)
    return (_to(mix, dtype, cd) if return_mix else None), _to(normed, dtype, cd)


def _phase1_mixes(sources, queries, norm_weights, eps: float, cd, num_queries: int):
    """Every query's mixture in the compute dtype, unrounded, and the lse [S, ...]."""
    xs = [_cast(s, cd) for s in sources]
    ns = [_rms(x, eps) for x in xs]  # m x [..., D]
    q = _gained_query(queries, norm_weights, cd)  # [S, D]
    mixes, lses = [], []
    for j in range(num_queries):
        scores = torch.stack([(n * q[j]).sum(-1) for n in ns])  # [m, ...]
        lse = torch.logsumexp(scores, dim=0)  # [...]
        mixes.append(_mix(xs, torch.exp(scores - lse)))
        lses.append(lse)
    return mixes, torch.stack(lses)


def attn_res_phase1(sources, queries, norm_weights: Optional[object], eps: float, *, dtype, num_queries: int):
    """= attn_res_phase1_reference: (outs: S x [..., D] in dtype, lse [S, ...] fp32/fp64).

    The sources are RMS-normalised once and shared by every query (the reference recomputes them
    per query; the values are identical)."""
    cd = compute_dtype(dtype)
    mixes, lse = _phase1_mixes(sources, queries, norm_weights, eps, cd, num_queries)
    return [_to(m, dtype, cd) for m in mixes], lse


def attn_res_phase1_normed(sources, queries, norm_weights, eps: float, scale: float, out_norm_weight, out_eps: float,
                           end_partial=None, end_delta=None, *, dtype, num_queries: int):
    """= attn_res_phase1_normed_reference: (RMSNorm(scale * out_0) * out_norm_weight, outs_1.., lse, block
    end), the block end ``end_partial + end_delta`` (the graph's own add) as the last source, or None."""
    cd = compute_dtype(dtype)
    end = torch.add(end_partial, end_delta) if end_partial is not None else None
    sources = [*sources, end] if end is not None else sources
    mixes, lse = _phase1_mixes(sources, queries, norm_weights, eps, cd, num_queries)
    normed0 = _with_out_norm(mixes[0] * scale, out_norm_weight, out_eps, False, dtype, cd)[1]
    return normed0, [_to(m, dtype, cd) for m in mixes[1:]], lse, end


def _phase2_mix(phase1_out, phase1_lse, partial, query, norm_weight, eps: float, scale: float, cd):
    """The merge in the compute dtype, unrounded."""
    o = _cast(phase1_out, cd)
    if partial is None:
        return o * scale
    p = _cast(partial, cd)
    s_p = (_rms(p, eps) * _gained_query(query, norm_weight, cd)).sum(-1)  # [...]
    l1 = _cast(phase1_lse, cd)
    lse = torch.logaddexp(l1, s_p)
    out = torch.exp(l1 - lse).unsqueeze(-1) * o + torch.exp(s_p - lse).unsqueeze(-1) * p
    return out * scale


def attn_res_phase2(phase1_out, phase1_lse, partial, query, norm_weight, eps: float, scale: float, *, dtype):
    """= attn_res_phase2_reference: two-way online-softmax merge with the partial block."""
    cd = compute_dtype(dtype)
    return _to(_phase2_mix(phase1_out, phase1_lse, partial, query, norm_weight, eps, scale, cd), dtype, cd)


def attn_res_phase2_normed(
    phase1_out, phase1_lse, partial, query, norm_weight, eps: float, scale: float, out_norm_weight, out_eps: float,
    *, return_mix=True, dtype,
):
    """= attn_res_phase2_normed_reference: (mix, RMSNorm(mix) * out_norm_weight), normed from the unrounded mix;
    (None, normed) without ``return_mix``."""
    cd = compute_dtype(dtype)
    mix = _phase2_mix(phase1_out, phase1_lse, partial, query, norm_weight, eps, scale, cd)
    return _with_out_norm(mix, out_norm_weight, out_eps, return_mix, dtype, cd)


def attn_res_phase2_add_normed(
    phase1_out, phase1_lse, partial, delta, query, norm_weight, eps: float, scale: float, out_norm_weight,
    out_eps: float, *, dtype,
):
    """= attn_res_phase2_add_normed_reference: (partial + delta, RMSNorm(phase 2 on it) * out_norm_weight).
    Decomposed, the add is an add again: inductor fuses it with the merge."""
    new = partial + delta
    return new, attn_res_phase2_normed(
        phase1_out, phase1_lse, new, query, norm_weight, eps, scale, out_norm_weight, out_eps,
        return_mix=False, dtype=dtype,
    )[1]
