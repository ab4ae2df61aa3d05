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

from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from . import _launch as L
from .reference import _with_out_norm
from .reference_grads import _fold_out_norm
from .two_phase import phase1_bwd as chunk_bwd, phase1_fwd as chunk_fwd


def needs_chunks(sources: Sequence[Tensor]) -> bool:
    return len(sources) > L.MAX_SOURCES


def _chunks(sources: Sequence[Tensor]):
    k = L.MAX_SOURCES
    return [list(sources[i:i + k]) for i in range(0, len(sources), k)]


class _Merged(NamedTuple):
    parts: list  # per chunk: (o_c — S tensors [..., D] in the input dtype —, l_c [S, ...] fp32)
    weights: Tensor  # w_c [C, S, ...]
    lse: Tensor  # [S, ...]
    out: list  # S tensors [..., D] fp32


def _forward(sources, queries, norm_weights, eps) -> _Merged:
    parts = [chunk_fwd(chunk, queries, norm_weights, eps) for chunk in _chunks(sources)]
    lses = torch.stack([lse for _, lse in parts])  # [C, S, ...] fp32
    lse = torch.logsumexp(lses, 0)  # [S, ...]
    weights = torch.exp(lses - lse)  # [C, S, ...]
    out = [sum(w[j][..., None] * o[j].float() for w, (o, _) in zip(weights, parts)) for j in range(len(queries))]
    return _Merged(parts, weights, lse, out)


def _backward(fw: _Merged, G: Sequence[Tensor], GL: Optional[Tensor], sources, queries, norm_weights, eps):
    """(grad_sources, grad_queries [S, D], grad_norm_weights [S, D] or None) from G = dL/d out (S fp32
    tensors) and GL = dL/d lse (or None), through the merge and each chunk's phase-1 backward kernel."""
    def dots(outs):  # [S, ...]: G_j . outs_j per token
        return torch.stack([(g * o.float()).sum(-1) for g, o in zip(G, outs)])

    g_dot_out = dots(fw.out)
    grad_sources, grad_q, grad_w = [], 0, 0
    for chunk, w, (o, l) in zip(_chunks(sources), fw.weights, fw.parts):
        d_l = w * (dots(o) - g_dot_out + (GL.float() if GL is not None else 0))
        gs, gq, gw, _ = chunk_bwd([w_j[..., None] * g for w_j, g in zip(w, G)], d_l, chunk, queries, norm_weights,
                                  eps, l)
        grad_sources += gs
        grad_q = grad_q + gq.float()
        grad_w = grad_w + gw.float() if gw is not None else None
    grad_q = grad_q.to(queries.dtype)
    grad_w = grad_w.to(norm_weights.dtype) if norm_weights is not None else None
    return grad_sources, grad_q, grad_w


def phase1_fwd(sources, queries: Tensor, norm_weights: Optional[Tensor], eps: float):
    """(outs — S tensors [..., D] in the sources' dtype —, lse [S, ...] fp32) over any number of sources."""
    fw = _forward(sources, queries, norm_weights, eps)
    return [o.to(sources[0].dtype, copy=True) for o in fw.out], fw.lse


def phase1_bwd(grad_outs: Sequence[Tensor], grad_lse: Optional[Tensor], sources, queries, norm_weights, eps):
    """(grad_sources, grad_queries [S, D], grad_norm_weights [S, D] or None); recomputes the forward."""
    fw = _forward(sources, queries, norm_weights, eps)
    return _backward(fw, [g.float() for g in grad_outs], grad_lse, sources, queries, norm_weights, eps)


def phase1_normed_fwd(sources, queries, norm_weights, eps, scale, out_norm_weight, out_eps):
    """As ``attn_res_phase1_normed_reference`` over any number of sources: (normed_0, outs_1.., lse)."""
    fw = _forward(sources, queries, norm_weights, eps)
    normed0 = _with_out_norm(scale * fw.out[0], out_norm_weight, out_eps, sources[0].dtype)[1]
    return normed0, [o.to(sources[0].dtype, copy=True) for o in fw.out[1:]], fw.lse


def phase1_normed_bwd(grad_normed0, grad_outs, grad_lse, sources, queries, norm_weights, eps, scale, out_norm_weight,
                      out_eps):
    """(grad_sources, grad_queries, grad_norm_weights or None, grad_out_norm_weight or None)."""
    fw = _forward(sources, queries, norm_weights, eps)
    dmix0, grad_wo = _fold_out_norm(0.0, grad_normed0.float(), scale * fw.out[0], out_norm_weight, out_eps)
    G = [scale * dmix0] + [g.float() for g in grad_outs]
    return (*_backward(fw, G, grad_lse, sources, queries, norm_weights, eps), grad_wo)


def _one_query(query, norm_weight):
    return query[None], (norm_weight[None] if norm_weight is not None else None)


def _single_query_backward(fw, G, sources, query, norm_weight, eps):
    gs, gq, gw = _backward(fw, [G], None, sources, *_one_query(query, norm_weight), eps)
    return gs, gq[0], (gw[0] if gw is not None else None)


def attn_res_fwd(sources, query, norm_weight, eps, scale) -> Tensor:
    out = _forward(sources, *_one_query(query, norm_weight), eps).out[0]  # fp32
    return (scale * out).to(sources[0].dtype)


def attn_res_bwd(grad_out, sources, query, norm_weight, eps, scale):
    fw = _forward(sources, *_one_query(query, norm_weight), eps)
    return _single_query_backward(fw, scale * grad_out.float(), sources, query, norm_weight, eps)


def attn_res_normed_fwd(sources, query, norm_weight, eps, scale, out_norm_weight, out_eps):
    out = _forward(sources, *_one_query(query, norm_weight), eps).out[0]  # fp32
    return _with_out_norm(scale * out, out_norm_weight, out_eps, sources[0].dtype)


def attn_res_normed_bwd(grad_mix, grad_normed, sources, query, norm_weight, eps, scale, out_norm_weight, out_eps):
    """(grad_sources, grad_query, grad_norm_weight, grad_out_norm_weight), as the reference."""
    fw = _forward(sources, *_one_query(query, norm_weight), eps)
    dmix = grad_mix.float() if grad_mix is not None else 0.0
    G, grad_wo = _fold_out_norm(dmix, grad_normed.float(), scale * fw.out[0], out_norm_weight, out_eps)
    gs, gq, gw = _single_query_backward(fw, scale * G, sources, query, norm_weight, eps)
    return gs, gq, gw, grad_wo
