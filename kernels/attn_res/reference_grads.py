"""Closed-form backward passes of the two-phase and normed references (plain PyTorch).

These are what the library ops run on CPU and what the Triton backward kernels implement; the
tests check them against autograd through ``reference.py`` in float64. Notation as in
``attn_res_backward_reference``: r_i = rsqrt(mean(v_i^2) + eps), n_i = v_i r_i, q' = query * g,
s_i = q'.n_i, a = softmax(s). For a score s_i = q'.n_i the gradient into v_i is
``r_i (ds_i q' - n_i ds_i s_i / D)`` (RMSNorm backward with dn_i = ds_i q').
Math in float32 for low precision inputs (float64 stays float64); grads in the inputs' dtypes.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .reference import (
    _check_sources, _compute_dtype, _phase1_mixes, _phase2_mix, attn_res_backward_reference, attn_res_scores,
)


def accumulated(grads: Sequence[Tensor], accumulate: Sequence[Optional[Tensor]]) -> list[Tensor]:
    """``grads[i] + accumulate[i]`` where an accumulate entry is given (in the compute dtype, rounded to
    the gradient's dtype), as a backward op with an ``accumulate`` argument returns them. Here ``grads``
    are already rounded, so this sum is rounded twice; the Triton kernels round it once."""
    if len(accumulate) != len(grads):
        raise ValueError(f"accumulate has {len(accumulate)} entries for {len(grads)} gradients")
    out = []
    for g, acc in zip(grads, accumulate):
        if acc is not None:
            if acc.shape != g.shape:
                raise ValueError(f"accumulate: a gradient of shape {tuple(acc.shape)} for one of {tuple(g.shape)}")
            cd = _compute_dtype(g.dtype)
            g = (g.to(cd) + acc.to(cd)).to(g.dtype)
        out.append(g)
    return out


def _rms_parts(v: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """r = rsqrt(mean(v^2) + eps) ``[..., 1]`` and n = v r ``[..., D]``."""
    r = torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps)
    return r, v * r


def _sum_tokens(x: Tensor) -> Tensor:
    """``[..., D] -> [D]``: the reduction of a per-token gradient of a shared [D] parameter."""
    return x.reshape(-1, x.shape[-1]).sum(0)


def attn_res_phase1_backward_reference(
    grad_outs: Optional[Sequence[Tensor]],
    grad_lse: Optional[Tensor],
    sources: Sequence[Tensor],
    queries: Tensor,
    norm_weights: Optional[Tensor],
    eps: float,
) -> tuple[list[Tensor], Tensor, Optional[Tensor]]:
    """Gradients of ``attn_res_phase1_reference``: ``(grad_sources, grad_queries [S,D], grad_norm_weights)``.
    ``grad_outs``: one gradient per query output (or None: zero).

    Per query j: ds_ji = a_ji (dout_j.v_i - dout_j.out_j + dlse_j) (softmax + log-sum-exp);
    dv_i = sum_j a_ji dout_j + r_i ds_ji (q'_j - n_i s_ji / D); dq'_j = sum_tokens sum_i ds_ji n_i.
    """
    _check_sources(sources, queries[0])
    cd = _compute_dtype(sources[0].dtype)
    S, D = queries.shape
    vs = [s.to(cd) for s in sources]
    parts = [_rms_parts(v, eps) for v in vs]
    qs = queries.to(cd)
    gs = norm_weights.to(cd) if norm_weights is not None else None
    qg = qs * gs if gs is not None else qs  # [S, D]
    dvs = [torch.zeros_like(v) for v in vs]
    dqg = torch.zeros_like(qg)
    for j in range(S):
        scores = torch.stack([(n * qg[j]).sum(-1) for _, n in parts])  # [m, ...]
        a = torch.softmax(scores, dim=0)  # [m, ...]
        dout = grad_outs[j].to(cd) if grad_outs is not None else torch.zeros_like(vs[0])
        out = sum(ai.unsqueeze(-1) * v for ai, v in zip(a, vs))  # [..., D]
        delta = (dout * out).sum(-1)  # [...]
        if grad_lse is not None:
            delta = delta - grad_lse[j].to(cd)
        for i, (v, (r, n)) in enumerate(zip(vs, parts)):
            ds = a[i] * ((dout * v).sum(-1) - delta)  # [...]
            dvs[i] += a[i].unsqueeze(-1) * dout + r * ds.unsqueeze(-1) * (qg[j] - n * scores[i].unsqueeze(-1) / D)
            dqg[j] += _sum_tokens(ds.unsqueeze(-1) * n)
    grad_sources = [dv.to(sources[0].dtype) for dv in dvs]
    grad_queries = (dqg * gs if gs is not None else dqg).to(queries.dtype)
    grad_weights = (dqg * qs).to(norm_weights.dtype) if norm_weights is not None else None
    return grad_sources, grad_queries, grad_weights


def attn_res_phase1_normed_backward_reference(
    grad_normed0: Tensor,
    grad_outs: Sequence[Tensor],
    grad_lse: Optional[Tensor],
    sources: Sequence[Tensor],
    queries: Tensor,
    norm_weights: Optional[Tensor],
    eps: float,
    scale: float,
    out_norm_weight: Optional[Tensor],
    out_eps: float,
) -> tuple[list[Tensor], Tensor, Optional[Tensor], Optional[Tensor]]:
    """Gradients of ``attn_res_phase1_normed_reference``: ``(grad_sources, grad_queries, grad_norm_weights,
    grad_out_norm_weight)``. The head's norm backward gives d out_0 = scale * d mix_0; the rest is
    phase 1's backward with that gradient as query 0's."""
    cd = _compute_dtype(sources[0].dtype)
    mix0 = scale * _phase1_mixes(sources, queries[:1], norm_weights[:1] if norm_weights is not None else None, eps)[0][0]
    dmix0, grad_wo = _fold_out_norm(0.0, grad_normed0.to(cd), mix0, out_norm_weight, out_eps)
    gs, gq, gw = attn_res_phase1_backward_reference([scale * dmix0, *grad_outs], grad_lse, sources, queries,
                                                    norm_weights, eps)
    return gs, gq, gw, grad_wo


def attn_res_phase2_backward_reference(
    grad_out: Tensor,
    phase1_out: Tensor,
    phase1_lse: Tensor,
    partial: Optional[Tensor],
    query: Tensor,
    norm_weight: Optional[Tensor],
    eps: float,
    scale: float,
) -> tuple[Tensor, Tensor, Optional[Tensor], Tensor, Optional[Tensor]]:
    """Gradients of ``attn_res_phase2_reference``:
    ``(grad_phase1_out, grad_phase1_lse, grad_partial, grad_query, grad_norm_weight)``.

    A two-way softmax between the phase-1 "source" (score lse, value out) and the partial:
    a_1 = exp(lse - L), a_p = exp(s_p - L), L = logaddexp(lse, s_p);
    da_x = scale dy.x; abar = a_1 da_1 + a_p da_p; dlse = a_1 (da_1 - abar); ds_p = a_p (da_p - abar).
    """
    cd = _compute_dtype(phase1_out.dtype)
    dy = grad_out.to(cd)
    o = phase1_out.to(cd)
    if partial is None:  # out = scale * o: lse and the query do not matter
        gq = torch.zeros_like(query)
        gw = torch.zeros_like(norm_weight) if norm_weight is not None else None
        return (scale * dy).to(phase1_out.dtype), torch.zeros_like(phase1_lse), None, gq, gw
    q = query.to(cd)
    g = norm_weight.to(cd) if norm_weight is not None else None
    qg = q * g if g is not None else q
    p = partial.to(cd)
    r, n = _rms_parts(p, eps)
    s_p = (n * qg).sum(-1)  # [...]
    lse1 = phase1_lse.to(cd)
    L = torch.logaddexp(lse1, s_p)
    a1, ap = torch.exp(lse1 - L), torch.exp(s_p - L)
    da1, dap = scale * (dy * o).sum(-1), scale * (dy * p).sum(-1)
    abar = a1 * da1 + ap * dap
    d_lse = a1 * (da1 - abar)
    ds_p = ap * (dap - abar)
    d_o = scale * a1.unsqueeze(-1) * dy
    d_p = scale * ap.unsqueeze(-1) * dy + r * ds_p.unsqueeze(-1) * (qg - n * s_p.unsqueeze(-1) / qg.shape[-1])
    dqg = _sum_tokens(ds_p.unsqueeze(-1) * n)
    gq = (dqg * g if g is not None else dqg).to(query.dtype)
    gw = (dqg * q).to(norm_weight.dtype) if norm_weight is not None else None
    return d_o.to(phase1_out.dtype), d_lse.to(phase1_lse.dtype), d_p.to(partial.dtype), gq, gw


def attn_res_normed_backward_reference(
    grad_mix: Optional[Tensor],
    grad_normed: Optional[Tensor],
    sources: Sequence[Tensor],
    query: Tensor,
    norm_weight: Optional[Tensor],
    eps: float,
    scale: float,
    out_norm_weight: Optional[Tensor],
    out_eps: float,
) -> tuple[list[Tensor], Tensor, Optional[Tensor], Optional[Tensor]]:
    """Gradients of ``attn_res_normed_reference``:
    ``(grad_sources, grad_query, grad_norm_weight, grad_out_norm_weight)``.

    The output RMSNorm's backward folds into the mixture's upstream gradient:
    dmix += r_m (dnm - nm mean(dnm nm)) with nm = mix r_m, dnm = dnormed * out_norm_weight;
    then it is the plain aggregation backward.
    """
    _check_sources(sources, query)
    cd = _compute_dtype(sources[0].dtype)
    weights = torch.softmax(attn_res_scores(sources, query, norm_weight, eps), dim=0)  # [n, ...]
    mix = sum(w.unsqueeze(-1) * s.to(cd) for w, s in zip(weights, sources)) * scale  # [..., D] fp32
    dmix = grad_mix.to(cd) if grad_mix is not None else torch.zeros_like(mix)
    grad_w_out = None
    if grad_normed is not None:
        rm, nm = _rms_parts(mix, out_eps)
        dnormed = grad_normed.to(cd)
        dnm = dnormed * out_norm_weight.to(cd) if out_norm_weight is not None else dnormed
        dmix = dmix + rm * (dnm - nm * (dnm * nm).mean(-1, keepdim=True))
        if out_norm_weight is not None:
            grad_w_out = _sum_tokens(dnormed * nm).to(out_norm_weight.dtype)
    elif out_norm_weight is not None:
        grad_w_out = torch.zeros_like(out_norm_weight)
    gs, gq, gw = attn_res_backward_reference(dmix, sources, query, norm_weight, eps, scale)
    return gs, gq, gw, grad_w_out


def _fold_out_norm(dmix, grad_normed, mix, out_norm_weight, out_eps):
    """Fold the output RMSNorm's backward into the mixture's upstream gradient (all in the compute
    dtype): ``(dmix + r_m (dnm - nm mean(dnm nm)), grad_out_norm_weight or None)``."""
    rm, nm = _rms_parts(mix, out_eps)
    dnm = grad_normed * out_norm_weight.to(mix.dtype) if out_norm_weight is not None else grad_normed
    dmix = dmix + rm * (dnm - nm * (dnm * nm).mean(-1, keepdim=True))
    gwo = _sum_tokens(grad_normed * nm).to(out_norm_weight.dtype) if out_norm_weight is not None else None
    return dmix, gwo


def attn_res_phase2_normed_backward_reference(
    grad_mix: Optional[Tensor],
    grad_normed: Optional[Tensor],
    phase1_out: Tensor,
    phase1_lse: Tensor,
    partial: Optional[Tensor],
    query: Tensor,
    norm_weight: Optional[Tensor],
    eps: float,
    scale: float,
    out_norm_weight: Optional[Tensor],
    out_eps: float,
) -> tuple[Tensor, Tensor, Optional[Tensor], Tensor, Optional[Tensor], Optional[Tensor]]:
    """Gradients of ``attn_res_phase2_normed_reference``:
    ``(grad_phase1_out, grad_phase1_lse, grad_partial, grad_query, grad_norm_weight, grad_out_norm_weight)``.

    The output RMSNorm's backward folds into the mixture's upstream gradient (recomputing the fp32
    mixture), then it is ``attn_res_phase2_backward_reference``.
    """
    cd = _compute_dtype(phase1_out.dtype)
    mix = _phase2_mix(phase1_out, phase1_lse, partial, query, norm_weight, eps, scale)  # [..., D] unrounded
    dmix = grad_mix.to(cd) if grad_mix is not None else torch.zeros_like(mix)
    gwo = None
    if grad_normed is not None:
        dmix, gwo = _fold_out_norm(dmix, grad_normed.to(cd), mix, out_norm_weight, out_eps)
    elif out_norm_weight is not None:
        gwo = torch.zeros_like(out_norm_weight)
    go, gl, gp, gq, gw = attn_res_phase2_backward_reference(
        dmix, phase1_out, phase1_lse, partial, query, norm_weight, eps, scale
    )
    return go, gl, gp, gq, gw, gwo


def attn_res_phase2_add_normed_backward_reference(
    grad_partial: Optional[Tensor],
    grad_normed: Optional[Tensor],
    phase1_out: Tensor,
    phase1_lse: Tensor,
    partial: Tensor,
    query: Tensor,
    norm_weight: Optional[Tensor],
    eps: float,
    scale: float,
    out_norm_weight: Optional[Tensor],
    out_eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """Gradients of ``attn_res_phase2_add_normed_reference`` from the UPDATED partial (its first output)
    and that output's gradient from its other readers (``grad_partial``, or None):
    ``(grad_phase1_out, grad_phase1_lse, grad_partial_total, grad_query, grad_norm_weight, grad_out_norm_weight)``.
    ``grad_partial_total`` is the gradient of both the old partial and the delta (d(a + b)/da = d/db = 1)."""
    go, gl, gp, gq, gw, gwo = attn_res_phase2_normed_backward_reference(
        None, grad_normed, phase1_out, phase1_lse, partial, query, norm_weight, eps, scale, out_norm_weight, out_eps
    )
    if grad_partial is not None:
        gp = (gp.to(_compute_dtype(gp.dtype)) + grad_partial.to(_compute_dtype(gp.dtype))).to(gp.dtype)
    return go, gl, gp, gq, gw, gwo
