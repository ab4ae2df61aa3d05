"""CUDA dispatch for the library ops in ``op.py``: the Triton kernels of ``fused.py`` and ``two_phase.py``.

float64 is not a Triton dtype here (the kernels compute in fp32): on CUDA it is served by the
reference / closed-form backward, explicitly and for float64 only. Every other case runs the kernel
or raises; nothing falls back silently. More sources than one launch takes (``MAX_SOURCES``) go
through ``chunked.py``. Importing this module imports triton: ``op.py`` imports it on the first CUDA
call, so importing the package does not. Also here: ``attn_res_triton``, the kernel with autograd.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from . import chunked, fused, reference, two_phase
from . import reference_grads as RG
from .two_phase import HeadNorm, new_block_end


def _f64(t: torch.Tensor) -> bool:
    return t.dtype == torch.float64


def forward_cuda(sources, query, norm_weight, eps, scale):
    if _f64(sources[0]):
        return reference.attn_res_reference(sources, query, norm_weight, eps, scale)
    if chunked.needs_chunks(sources):
        return chunked.attn_res_fwd(sources, query, norm_weight, eps, scale)
    return fused.attn_res_fwd(sources, query, norm_weight, eps, scale)


def backward_cuda(grad_out, sources, query, norm_weight, eps, scale):
    if _f64(sources[0]):
        return reference.attn_res_backward_reference(grad_out, sources, query, norm_weight, eps, scale)
    if chunked.needs_chunks(sources):
        return chunked.attn_res_bwd(grad_out, sources, query, norm_weight, eps, scale)
    return fused.attn_res_bwd(grad_out, sources, query, norm_weight, eps, scale)


def phase1_cuda(sources, queries, norm_weights, eps):
    if _f64(sources[0]):
        return reference.attn_res_phase1_reference(sources, queries, norm_weights, eps)
    if chunked.needs_chunks(sources):
        return chunked.phase1_fwd(sources, queries, norm_weights, eps)
    return two_phase.phase1_fwd(sources, queries, norm_weights, eps)


def _accumulated(result, accumulate):
    """A (grad_sources, ...) result of a path that does not accumulate in its kernel, accumulated."""
    return result if accumulate is None else (RG.accumulated(result[0], accumulate), *result[1:])


def phase1_backward_cuda(grad_outs, grad_lse, sources, queries, norm_weights, eps, lse, accumulate=None):
    if _f64(sources[0]):
        return _accumulated(RG.attn_res_phase1_backward_reference(
            grad_outs, grad_lse, sources, queries, norm_weights, eps), accumulate)
    if chunked.needs_chunks(sources):
        return _accumulated(chunked.phase1_bwd(grad_outs, grad_lse, sources, queries, norm_weights, eps), accumulate)
    return two_phase.phase1_bwd(grad_outs, grad_lse, sources, queries, norm_weights, eps, lse,
                                accumulate=accumulate)[:3]


def phase1_normed_cuda(sources, queries, norm_weights, eps, scale, out_norm_weight, out_eps, block_end=None):
    """(normed_0, outs_1.., lse, block end or None). ``block_end``: (partial, delta) whose sum is the
    last source (written by the kernel; added by torch on the paths without one)."""
    args = (queries, norm_weights, eps, scale, out_norm_weight, out_eps)
    counted = [*sources, block_end[0]] if block_end is not None else sources  # the block end is a source too
    if _f64(sources[0]) or chunked.needs_chunks(counted):
        end = torch.add(*block_end) if block_end is not None else None
        sources = [*sources, end] if end is not None else sources
        fn = reference.attn_res_phase1_normed_reference if _f64(sources[0]) else chunked.phase1_normed_fwd
        return (*fn(sources, *args), end)
    end = new_block_end(*block_end, sources[0], "attn_res_phase1_normed") if block_end is not None else None
    head = HeadNorm(scale, out_norm_weight, out_eps)
    outs, lse = two_phase.phase1_fwd(sources, queries, norm_weights, eps, head, end)
    return outs[0], outs[1:], lse, end.out if end is not None else None


def phase1_normed_backward_cuda(grad_normed0, grad_outs, grad_lse, sources, queries, norm_weights, eps, scale,
                                out_norm_weight, out_eps, lse, accumulate=None):
    args = (grad_normed0, grad_outs, grad_lse, sources, queries, norm_weights, eps, scale, out_norm_weight, out_eps)
    if _f64(sources[0]):
        return _accumulated(RG.attn_res_phase1_normed_backward_reference(*args), accumulate)
    if chunked.needs_chunks(sources):
        return _accumulated(chunked.phase1_normed_bwd(*args), accumulate)
    return two_phase.phase1_bwd([grad_normed0, *grad_outs], grad_lse, sources, queries, norm_weights, eps, lse,
                                HeadNorm(scale, out_norm_weight, out_eps), accumulate=accumulate)


def phase2_cuda(phase1_out, phase1_lse, partial, query, norm_weight, eps, scale):
    if _f64(phase1_out):
        return reference.attn_res_phase2_reference(phase1_out, phase1_lse, partial, query, norm_weight, eps, scale)
    return two_phase.phase2_fwd(phase1_out, phase1_lse, partial, query, norm_weight, eps, scale)


def phase2_backward_cuda(grad_out, phase1_out, phase1_lse, partial, query, norm_weight, eps, scale):
    if _f64(phase1_out):
        return RG.attn_res_phase2_backward_reference(
            grad_out, phase1_out, phase1_lse, partial, query, norm_weight, eps, scale
        )
    return two_phase.phase2_bwd(grad_out, phase1_out, phase1_lse, partial, query, norm_weight, eps, scale)


def _drop_mix(result, return_mix):
    """(mix or None, normed) from the paths that always compute the mix (float64, chunks)."""
    return result if return_mix else (None, result[1])


def normed_cuda(sources, query, norm_weight, eps, scale, out_norm_weight, out_eps, *, return_mix=True):
    """(mix, normed); the mix is None without ``return_mix`` (the kernel then does not write it)."""
    if _f64(sources[0]):
        return _drop_mix(reference.attn_res_normed_reference(
            sources, query, norm_weight, eps, scale, out_norm_weight, out_eps), return_mix)
    if chunked.needs_chunks(sources):
        return _drop_mix(chunked.attn_res_normed_fwd(
            sources, query, norm_weight, eps, scale, out_norm_weight, out_eps), return_mix)
    return fused.attn_res_normed_fwd(sources, query, norm_weight, eps, scale, out_norm_weight, out_eps, return_mix)


def normed_backward_cuda(grad_mix, grad_normed, sources, query, norm_weight, eps, scale, out_norm_weight, out_eps,
                         accumulate=None):
    args = (grad_mix, grad_normed, sources, query, norm_weight, eps, scale, out_norm_weight, out_eps)
    if _f64(sources[0]):
        return _accumulated(RG.attn_res_normed_backward_reference(*args), accumulate)
    if chunked.needs_chunks(sources):
        return _accumulated(chunked.attn_res_normed_bwd(*args), accumulate)
    return fused.attn_res_normed_bwd(*args, accumulate=accumulate)


def phase2_normed_cuda(phase1_out, phase1_lse, partial, query, norm_weight, eps, scale, out_norm_weight, out_eps,
                       *, return_mix=True):
    """(mix, normed); the mix is None without ``return_mix`` (the kernel then does not write it)."""
    if _f64(phase1_out):
        return _drop_mix(reference.attn_res_phase2_normed_reference(
            phase1_out, phase1_lse, partial, query, norm_weight, eps, scale, out_norm_weight, out_eps
        ), return_mix)
    return two_phase.phase2_normed_fwd(phase1_out, phase1_lse, partial, query, norm_weight, eps, scale, out_norm_weight,
                                       out_eps, return_mix)


def phase2_normed_backward_cuda(
    grad_mix, grad_normed, phase1_out, phase1_lse, partial, query, norm_weight, eps, scale, out_norm_weight, out_eps,
    grad_partial=None,
):
    """``grad_partial``: the partial's gradient from its other readers, added to its gradient."""
    args = (grad_mix, grad_normed, phase1_out, phase1_lse, partial, query, norm_weight, eps, scale, out_norm_weight, out_eps)
    if _f64(phase1_out):
        go, gl, gp, *rest = RG.attn_res_phase2_normed_backward_reference(*args)
        return (go, gl, RG.accumulated([gp], [grad_partial])[0] if gp is not None else None, *rest)
    return two_phase.phase2_normed_bwd(*args, grad_partial=grad_partial)


def phase2_add_normed_cuda(phase1_out, phase1_lse, partial, delta, query, norm_weight, eps, scale, out_norm_weight,
                           out_eps):
    args = (phase1_out, phase1_lse, partial, delta, query, norm_weight, eps, scale, out_norm_weight, out_eps)
    if _f64(phase1_out):
        return reference.attn_res_phase2_add_normed_reference(*args)
    return two_phase.phase2_add_normed_fwd(*args)


def phase2_add_normed_backward_cuda(
    grad_partial, grad_normed, phase1_out, phase1_lse, partial, query, norm_weight, eps, scale, out_norm_weight, out_eps
):
    args = (grad_partial, grad_normed, phase1_out, phase1_lse, partial, query, norm_weight, eps, scale, out_norm_weight,
            out_eps)
    if _f64(phase1_out):
        return RG.attn_res_phase2_add_normed_backward_reference(*args)
    return two_phase.phase2_add_normed_bwd(*args)


# ---- the Triton kernel with autograd, any number of sources -------------------------------------


class _AttnResTriton(torch.autograd.Function):
    """Autograd for ``attn_res_triton``. Saves only the inputs; the backward recomputes the softmax."""

    @staticmethod
    def forward(ctx, query, norm_weight, eps, scale, *sources):
        ctx.eps, ctx.scale, ctx.has_weight = eps, scale, norm_weight is not None
        ctx.save_for_backward(query, norm_weight, *sources)
        fwd = chunked.attn_res_fwd if chunked.needs_chunks(sources) else fused.attn_res_fwd
        return fwd(list(sources), query, norm_weight, eps, scale)

    @staticmethod
    def backward(ctx, grad_out):
        query, norm_weight, *sources = ctx.saved_tensors
        bwd = chunked.attn_res_bwd if chunked.needs_chunks(sources) else fused.attn_res_bwd
        gs, gq, gw = bwd(grad_out, sources, query, norm_weight, ctx.eps, ctx.scale)
        return (gq, gw, None, None, *gs)


def attn_res_triton(
    sources: Sequence[Tensor],
    query: Tensor,
    norm_weight: Optional[Tensor] = None,
    eps: float = 1e-6,
    scale: float = 1.0,
) -> Tensor:
    """Triton ``attn_res_reference``: same signature, same result, autograd-capable (no float64
    fallback: the kernels refuse it)."""
    return _AttnResTriton.apply(query, norm_weight, eps, scale, *sources)
