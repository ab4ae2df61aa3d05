"""The aggregation as ONE library op, ``torch.ops.residual_rewriter.attn_res``.

``convert`` emits one call of this op per residual site, so the compile backend can find every
aggregation in a Dynamo graph by its target. Registrations:

* implementation: the plain PyTorch reference (``reference.py``) on CPU; the Triton kernel on CUDA
  (``fused.py``, wired in by ``_impl_for``);
* fake (meta) kernel, so FakeTensor tracing (torch.compile, export) sees the output's shape;
* autograd: the backward is a second opaque op, ``attn_res_backward`` (closed-form reference on
  CPU, Triton on CUDA); only the inputs are saved, the softmax is recomputed.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from . import reference

LIB = "residual_rewriter"


def _forward_impl(sources, query, norm_weight, eps, scale):
    if sources[0].is_cuda:
        from . import dispatch

        return dispatch.forward_cuda(sources, query, norm_weight, eps, scale)
    return reference.attn_res_reference(sources, query, norm_weight, eps, scale)


@torch.library.custom_op(f"{LIB}::attn_res", mutates_args=())
def attn_res(
    sources: List[Tensor], query: Tensor, norm_weight: Optional[Tensor], eps: float, scale: float
) -> Tensor:
    """out[..., D] = scale * sum_i softmax_i(query . RMSNorm(sources[i]) * norm_weight) sources[i]."""
    return _forward_impl(sources, query, norm_weight, eps, scale)


@attn_res.register_fake
def _attn_res_fake(sources, query, norm_weight, eps, scale):
    reference._check_sources(sources, query)
    return torch.empty_like(sources[0])


@torch.library.custom_op(f"{LIB}::attn_res_backward", mutates_args=())
def attn_res_backward(
    grad_out: Tensor,
    sources: List[Tensor],
    query: Tensor,
    norm_weight: Optional[Tensor],
    eps: float,
    scale: float,
) -> List[Tensor]:
    """Returns [grad_source_0, ..., grad_source_{n-1}, grad_query, grad_norm_weight (or empty)]."""
    if grad_out.is_cuda:
        from . import dispatch

        gs, gq, gw = dispatch.backward_cuda(grad_out, sources, query, norm_weight, eps, scale)
    else:
        gs, gq, gw = reference.attn_res_backward_reference(grad_out, sources, query, norm_weight, eps, scale)
    return gs + [gq, gw if gw is not None else query.new_empty(0)]


@attn_res_backward.register_fake
def _attn_res_backward_fake(grad_out, sources, query, norm_weight, eps, scale):
    gw = torch.empty_like(norm_weight) if norm_weight is not None else query.new_empty(0)
    return [torch.empty_like(s) for s in sources] + [torch.empty_like(query), gw]


def _setup_context(ctx, inputs, output):
    sources, query, norm_weight, eps, scale = inputs
    ctx.n = len(sources)
    ctx.has_weight = norm_weight is not None
    ctx.eps, ctx.scale = eps, scale
    ctx.save_for_backward(*sources, query, *([norm_weight] if norm_weight is not None else []))


def _backward(ctx, grad_out):
    saved = ctx.saved_tensors
    sources, query = list(saved[: ctx.n]), saved[ctx.n]
    norm_weight = saved[ctx.n + 1] if ctx.has_weight else None
    grads = torch.ops.residual_rewriter.attn_res_backward(
        grad_out.contiguous(), sources, query, norm_weight, ctx.eps, ctx.scale
    )
    grad_weight = grads[ctx.n + 1] if ctx.has_weight else None
    return list(grads[: ctx.n]), grads[ctx.n], grad_weight, None, None


attn_res.register_autograd(_backward, setup_context=_setup_context)
