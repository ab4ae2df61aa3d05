"""Any number of sources on the Triton path: the phase-1 kernel over chunks of at most ``MAX_SOURCES``
sources, merged by log-sum-exp — forward, and an explicit backward through the merge.

One kernel launch unrolls its sources (a specialization per count), so its cost grows with the
count: registers, and compile time (measured for the backward on 2 CPU cores: 5-9 s at 16 sources,
240 s at 64). Full AttnRes on a deep model reads up to 2L + 1 sources, so the ops split them.
Per chunk c, phase 1 gives (o_c, l_c): the softmax mixture over the chunk and its log-sum-exp. Then

    lse = logsumexp_c l_c;   w_c = exp(l_c - lse);   out = sum_c w_c o_c          (fp32)

and, for upstream gradients G = dL/d out and GL = dL/d lse,

    dL/d o_c = w_c G;        dL/d l_c = w_c (G . o_c - G . out + GL)

which each chunk's phase-1 backward kernel turns into its sources' and the query's gradients.
Each o_c is rounded once to the input dtype, so the merged output carries one extra rounding.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from . import _launch as L


def needs_chunks(sources: Sequence[Tensor]) -> bool:
    return len(sources) > L.MAX_SOURCES


def _chunks(sources: Sequence[Tensor]):
    k = L.MAX_SOURCES
    return [list(sources[i:i + k]) for i in range(0, len(sources), k)]


def _phase1_parts(sources, queries, norm_weights, eps):
    from .two_phase import phase1_fwd

    parts = [phase1_fwd(chunk, queries, norm_weights, eps) for chunk in _chunks(sources)]
    lses = torch.stack([lse for _, lse in parts])  # [C, S, ...] fp32
    lse = torch.logsumexp(lses, 0)  # [S, ...]
    weights = torch.exp(lses - lse)  # [C, S, ...]
    return parts, weights, lse


def phase1_fwd(sources, queries: Tensor, norm_weights: Optional[Tensor], eps: float):
    """(out [S, ..., D] fp32, lse [S, ...] fp32) over any number of sources."""
    parts, weights, lse = _phase1_parts(sources, queries, norm_weights, eps)
    out = sum(w[..., None] * o.float() for w, (o, _) in zip(weights, parts))
    return out, lse


def phase1_bwd(grad_out: Tensor, grad_lse: Optional[Tensor], sources, queries, norm_weights, eps):
    """(grad_sources, grad_queries [S, D], grad_norm_weights [S, D] or None); recomputes the forward."""
    from .two_phase import phase1_bwd as chunk_bwd

    parts, weights, lse = _phase1_parts(sources, queries, norm_weights, eps)
    G = grad_out.float()
    out = sum(w[..., None] * o.float() for w, (o, _) in zip(weights, parts))
    g_dot_out = (G * out).sum(-1)  # [S, ...]
    grad_sources, grad_q, grad_w = [], 0, 0
    for chunk, w, (o, l) in zip(_chunks(sources), weights, parts):
        d_l = w * ((G * o.float()).sum(-1) - g_dot_out + (grad_lse.float() if grad_lse is not None else 0))
        gs, gq, gw = chunk_bwd(w[..., None] * G, d_l, chunk, queries, norm_weights, eps, o, l)
        grad_sources += gs
        grad_q = grad_q + gq.float()
        grad_w = grad_w + gw.float() if gw is not None else None
    grad_q = grad_q.to(queries.dtype)
    grad_w = grad_w.to(norm_weights.dtype) if norm_weights is not None else None
    return grad_sources, grad_q, grad_w


def _one_query(query, norm_weight):
    return query[None], (norm_weight[None] if norm_weight is not None else None)


def attn_res_fwd(sources, query, norm_weight, eps, scale) -> Tensor:
    out, _ = phase1_fwd(sources, *_one_query(query, norm_weight), eps)
    return (scale * out[0]).to(sources[0].dtype)


def attn_res_bwd(grad_out, sources, query, norm_weight, eps, scale):
    gs, gq, gw = phase1_bwd(scale * grad_out.float()[None], None, sources, *_one_query(query, norm_weight), eps)
    return gs, gq[0], (gw[0] if gw is not None else None)


def _rms_norm(mix: Tensor, weight: Optional[Tensor], eps: float):
    """(RMSNorm(mix) * weight, the normalised mix, 1/rms), all fp32; mix is fp32."""
    r = torch.rsqrt(mix.pow(2).mean(-1, keepdim=True) + eps)
    n = mix * r
    return (n * weight.float() if weight is not None else n), n, r


def attn_res_normed_fwd(sources, query, norm_weight, eps, scale, out_norm_weight, out_eps):
    out, _ = phase1_fwd(sources, *_one_query(query, norm_weight), eps)
    mix = scale * out[0]
    y, _, _ = _rms_norm(mix, out_norm_weight, out_eps)
    return mix.to(sources[0].dtype), y.to(sources[0].dtype)


def attn_res_normed_bwd(grad_mix, grad_normed, sources, query, norm_weight, eps, scale, out_norm_weight, out_eps):
    """(grad_sources, grad_query, grad_norm_weight, grad_out_norm_weight), as the reference."""
    out, _ = phase1_fwd(sources, *_one_query(query, norm_weight), eps)
    mix = scale * out[0]
    _, n, r = _rms_norm(mix, out_norm_weight, out_eps)
    dn = grad_normed.float()
    grad_wo = None
    if out_norm_weight is not None:
        grad_wo = (dn * n).reshape(-1, n.shape[-1]).sum(0).to(out_norm_weight.dtype)
        dn = dn * out_norm_weight.float()
    G = r * (dn - n * (dn * n).mean(-1, keepdim=True))  # RMSNorm backward
    if grad_mix is not None:
        G = G + grad_mix.float()
    gs, gq, gw = attn_res_bwd(G, sources, query, norm_weight, eps, scale)
    return gs, gq, gw, grad_wo
