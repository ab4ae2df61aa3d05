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


# ---- two-phase schedule: phase 1 (multi-query over completed blocks) and phase 2 (merge) --------
# Same style as attn_res: an opaque forward op, an opaque backward op, autograd glue between them.
# Optional grads are returned as empty tensors (a custom op cannot return None in a list).


def _listed(grad_sources: List[Tensor], *grads: Optional[Tensor], like: Tensor) -> List[Tensor]:
    """A backward op's flat output list: the sources' gradients, then the others (None -> empty)."""
    return list(grad_sources) + [_or_empty(g, like) for g in grads]


def _or_empty(t: Optional[Tensor], like: Tensor) -> Tensor:
    return t if t is not None else like.new_empty(0)


@torch.library.custom_op(f"{LIB}::attn_res_phase1", mutates_args=())
def attn_res_phase1(
    sources: List[Tensor], queries: Tensor, norm_weights: Optional[Tensor], eps: float
) -> tuple[List[Tensor], Tensor]:
    """sources: m x [..., D]; queries/norm_weights [S, D] -> (outs: S x [..., D] in the input dtype, one
    per query, lse [S, ...] fp32). One tensor per query, not one [S, ..., D]: each merge's gradient
    then reaches the backward as it is, with no [S, ...] gradient assembled from select views."""
    if sources[0].is_cuda:
        from . import dispatch

        return dispatch.phase1_cuda(sources, queries, norm_weights, eps)
    outs, lse = reference.attn_res_phase1_reference(sources, queries, norm_weights, eps)
    return outs, lse.float() if sources[0].dtype != torch.float64 else lse


@attn_res_phase1.register_fake
def _attn_res_phase1_fake(sources, queries, norm_weights, eps):
    reference._check_sources(sources, queries[0])
    S, lead = queries.shape[0], sources[0].shape[:-1]
    lse_dtype = torch.float64 if sources[0].dtype == torch.float64 else torch.float32
    outs = [sources[0].new_empty(sources[0].shape) for _ in range(S)]
    return outs, sources[0].new_empty((S, *lead), dtype=lse_dtype)


@torch.library.custom_op(f"{LIB}::attn_res_phase1_backward", mutates_args=())
def attn_res_phase1_backward(
    grad_outs: List[Tensor],
    grad_lse: Tensor,
    sources: List[Tensor],
    queries: Tensor,
    norm_weights: Optional[Tensor],
    eps: float,
    lse: Tensor,
    accumulate: List[Optional[Tensor]],
) -> List[Tensor]:
    """Returns [grad_source_0..m-1, grad_queries, grad_norm_weights (or empty)]. ``lse`` is the forward's:
    the CUDA kernel takes the softmax weights from it and recomputes each output in fp32 from the
    sources (the forward saves no output). ``accumulate[i]``, when not None, is added to source i's
    gradient (the gradient it gets from its other readers: ``passes/lowering/fold_grad_sums.py``)."""
    if sources[0].is_cuda:
        from . import dispatch

        return _listed(*dispatch.phase1_backward_cuda(grad_outs, grad_lse, sources, queries, norm_weights, eps, lse,
                                                      accumulate), like=queries)
    from .reference_grads import attn_res_phase1_backward_reference, accumulated

    gs, gq, gw = attn_res_phase1_backward_reference(grad_outs, grad_lse, sources, queries, norm_weights, eps)
    return _listed(accumulated(gs, accumulate), gq, gw, like=queries)


@attn_res_phase1_backward.register_fake
def _attn_res_phase1_backward_fake(grad_outs, grad_lse, sources, queries, norm_weights, eps, lse, accumulate):
    gw = torch.empty_like(norm_weights) if norm_weights is not None else queries.new_empty(0)
    return [torch.empty_like(s) for s in sources] + [torch.empty_like(queries), gw]


def _phase1_setup_context(ctx, inputs, output):
    sources, queries, norm_weights, eps = inputs
    ctx.n, ctx.has_weight, ctx.eps = len(sources), norm_weights is not None, eps
    weights = [norm_weights] if norm_weights is not None else []
    ctx.save_for_backward(*sources, queries, *weights, output[1])  # the lse, no output tensor


def _phase1_backward(ctx, grad_outs, grad_lse):
    saved = ctx.saved_tensors
    sources, queries = list(saved[: ctx.n]), saved[ctx.n]
    norm_weights = saved[ctx.n + 1] if ctx.has_weight else None
    lse = saved[-1]
    grad_outs = [torch.zeros_like(sources[0]) if g is None else g for g in grad_outs]
    grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse.contiguous()
    grads = torch.ops.residual_rewriter.attn_res_phase1_backward(
        grad_outs, grad_lse, sources, queries, norm_weights, ctx.eps, lse, [None] * ctx.n
    )
    return list(grads[: ctx.n]), grads[ctx.n], grads[ctx.n + 1] if ctx.has_weight else None, None


attn_res_phase1.register_autograd(_phase1_backward, setup_context=_phase1_setup_context)


@torch.library.custom_op(f"{LIB}::attn_res_phase1_normed", mutates_args=())
def attn_res_phase1_normed(
    sources: List[Tensor], queries: Tensor, norm_weights: Optional[Tensor], eps: float, scale: float,
    out_norm_weight: Optional[Tensor], out_eps: float, end_partial: Optional[Tensor] = None,
    end_delta: Optional[Tensor] = None,
) -> tuple[Tensor, List[Tensor], Tensor, Tensor]:
    """``attn_res_phase1`` with query 0's merge fused in (query 0 reads no partial block, so its merge
    is ``RMSNorm(scale * out_0) * out_norm_weight``, from the unrounded out_0): returns (normed_0,
    outs_1..S-1, lse [S, ...], block_end). out_0 itself is not written.

    With ``end_partial``/``end_delta``, the previous block's last add is done here: its sum
    ``block_end = end_partial + end_delta`` (rounded once to end_partial's dtype, as torch's add) is
    the last source, and returned (else an empty tensor)."""
    if (end_partial is None) != (end_delta is None):
        raise ValueError("attn_res_phase1_normed: end_partial and end_delta come together")
    args = (sources, queries, norm_weights, eps, scale, out_norm_weight, out_eps)
    if sources[0].is_cuda:
        from . import dispatch

        block_end = (end_partial, end_delta) if end_partial is not None else None
        normed0, outs, lse, end = dispatch.phase1_normed_cuda(*args, block_end=block_end)
    else:
        end = torch.add(end_partial, end_delta) if end_partial is not None else None
        normed0, outs, lse = reference.attn_res_phase1_normed_reference(
            [*sources, end] if end is not None else sources, *args[1:])
        lse = lse.float() if sources[0].dtype != torch.float64 else lse
    return normed0, outs, lse, end if end is not None else queries.new_empty(0)


@attn_res_phase1_normed.register_fake
def _attn_res_phase1_normed_fake(sources, queries, norm_weights, eps, scale, out_norm_weight, out_eps,
                                 end_partial=None, end_delta=None):
    outs, lse = _attn_res_phase1_fake(sources, queries, norm_weights, eps)
    end = torch.empty_like(end_partial) if end_partial is not None else queries.new_empty(0)
    return outs[0], outs[1:], lse, end


@torch.library.custom_op(f"{LIB}::attn_res_phase1_normed_backward", mutates_args=())
def attn_res_phase1_normed_backward(
    grad_normed0: Tensor,
    grad_outs: List[Tensor],
    grad_lse: Tensor,
    sources: List[Tensor],
    queries: Tensor,
    norm_weights: Optional[Tensor],
    eps: float,
    scale: float,
    out_norm_weight: Optional[Tensor],
    out_eps: float,
    lse: Tensor,
    accumulate: List[Optional[Tensor]],
) -> List[Tensor]:
    """Returns [grad_source_0..m-1, grad_queries, grad_norm_weights (or empty), grad_out_norm_weight (or
    empty)]; ``accumulate`` as in ``attn_res_phase1_backward``."""
    args = (grad_normed0, grad_outs, grad_lse, sources, queries, norm_weights, eps, scale, out_norm_weight, out_eps)
    if sources[0].is_cuda:
        from . import dispatch

        return _listed(*dispatch.phase1_normed_backward_cuda(*args, lse, accumulate), like=queries)
    from .reference_grads import attn_res_phase1_normed_backward_reference, accumulated

    gs, gq, gw, gwo = attn_res_phase1_normed_backward_reference(*args)
    return _listed(accumulated(gs, accumulate), gq, gw, gwo, like=queries)


@attn_res_phase1_normed_backward.register_fake
def _attn_res_phase1_normed_backward_fake(grad_normed0, grad_outs, grad_lse, sources, queries, norm_weights, eps,
                                          scale, out_norm_weight, out_eps, lse, accumulate):
    gw = torch.empty_like(norm_weights) if norm_weights is not None else queries.new_empty(0)
    gwo = torch.empty_like(out_norm_weight) if out_norm_weight is not None else queries.new_empty(0)
    return [torch.empty_like(s) for s in sources] + [torch.empty_like(queries), gw, gwo]


def _phase1_normed_setup_context(ctx, inputs, output):
    sources, queries, norm_weights, eps, scale, out_norm_weight, out_eps, end_partial, end_delta = (*inputs, None, None)[:9]
    ctx.has_end = end_partial is not None
    sources = [*sources, output[3]] if ctx.has_end else sources  # the block end: a source like the others
    ctx.delta_dtype = end_delta.dtype if ctx.has_end else None
    ctx.n, ctx.eps, ctx.scale, ctx.out_eps = len(sources), eps, scale, out_eps
    ctx.has_weight, ctx.has_wo = norm_weights is not None, out_norm_weight is not None
    opt = [t for t in (norm_weights, out_norm_weight) if t is not None]
    ctx.save_for_backward(*sources, queries, *opt, output[2])  # the lse, no output tensor


def _phase1_normed_backward(ctx, grad_normed0, grad_outs, grad_lse, grad_end):
    saved = list(ctx.saved_tensors)
    sources, queries, rest = saved[: ctx.n], saved[ctx.n], saved[ctx.n + 1:]
    norm_weights = rest.pop(0) if ctx.has_weight else None
    out_norm_weight = rest.pop(0) if ctx.has_wo else None
    lse = rest.pop(0)
    zeros = torch.zeros_like(sources[0])
    grad_normed0 = zeros if grad_normed0 is None else grad_normed0.contiguous()
    grad_outs = [zeros if g is None else g for g in grad_outs]
    grad_lse = torch.zeros_like(lse) if grad_lse is None else grad_lse.contiguous()
    # the block end's gradient from its later readers is summed into its source gradient in the kernel
    accumulate = [None] * (ctx.n - 1) + [grad_end if ctx.has_end else None]
    grads = torch.ops.residual_rewriter.attn_res_phase1_normed_backward(
        grad_normed0, grad_outs, grad_lse, sources, queries, norm_weights, ctx.eps, ctx.scale, out_norm_weight,
        ctx.out_eps, lse, accumulate,
    )
    n = ctx.n
    if ctx.has_end:  # block_end = end_partial + end_delta: both get its whole gradient
        d_end = grads[n - 1]
        ends, n = (d_end, d_end.to(ctx.delta_dtype)), n - 1
    else:
        ends = (None, None)
    return (list(grads[:n]), grads[ctx.n], grads[ctx.n + 1] if ctx.has_weight else None, None, None,
            grads[ctx.n + 2] if ctx.has_wo else None, None, *ends)[: len(ctx.needs_input_grad)]  # as called


attn_res_phase1_normed.register_autograd(_phase1_normed_backward, setup_context=_phase1_normed_setup_context)


@torch.library.custom_op(f"{LIB}::attn_res_phase2", mutates_args=())
def attn_res_phase2(
    phase1_out: Tensor,
    phase1_lse: Tensor,
    partial: Optional[Tensor],
    query: Tensor,
    norm_weight: Optional[Tensor],
    eps: float,
    scale: float,
) -> Tensor:
    """Merge one sublayer's phase-1 result [..., D] / lse [...] with the partial block [..., D] (or None)."""
    if phase1_out.is_cuda:
        from . import dispatch

        return dispatch.phase2_cuda(phase1_out, phase1_lse, partial, query, norm_weight, eps, scale)
    return reference.attn_res_phase2_reference(phase1_out, phase1_lse, partial, query, norm_weight, eps, scale)


@attn_res_phase2.register_fake
def _attn_res_phase2_fake(phase1_out, phase1_lse, partial, query, norm_weight, eps, scale):
    return torch.empty_like(phase1_out)


@torch.library.custom_op(f"{LIB}::attn_res_phase2_backward", mutates_args=())
def attn_res_phase2_backward(
    grad_out: Tensor,
    phase1_out: Tensor,
    phase1_lse: Tensor,
    partial: Optional[Tensor],
    query: Tensor,
    norm_weight: Optional[Tensor],
    eps: float,
    scale: float,
) -> List[Tensor]:
    """Returns [grad_phase1_out, grad_phase1_lse, grad_partial (or empty), grad_query, grad_norm_weight (or empty)]."""
    if grad_out.is_cuda:
        from . import dispatch

        fn = dispatch.phase2_backward_cuda
    else:
        from .reference_grads import attn_res_phase2_backward_reference as fn
    go, gl, gp, gq, gw = fn(grad_out, phase1_out, phase1_lse, partial, query, norm_weight, eps, scale)
    return [go, gl, _or_empty(gp, query), gq, _or_empty(gw, query)]


@attn_res_phase2_backward.register_fake
def _attn_res_phase2_backward_fake(grad_out, phase1_out, phase1_lse, partial, query, norm_weight, eps, scale):
    gp = torch.empty_like(partial) if partial is not None else query.new_empty(0)
    gw = torch.empty_like(norm_weight) if norm_weight is not None else query.new_empty(0)
    return [torch.empty_like(phase1_out), torch.empty_like(phase1_lse), gp, torch.empty_like(query), gw]


def _phase2_setup_context(ctx, inputs, output):
    phase1_out, phase1_lse, partial, query, norm_weight, eps, scale = inputs
    ctx.has_partial, ctx.has_weight = partial is not None, norm_weight is not None
    ctx.eps, ctx.scale = eps, scale
    opt = [t for t in (partial, norm_weight) if t is not None]
    ctx.save_for_backward(phase1_out, phase1_lse, query, *opt)


def _phase2_backward(ctx, grad_out):
    phase1_out, phase1_lse, query, *opt = ctx.saved_tensors
    partial = opt.pop(0) if ctx.has_partial else None
    norm_weight = opt.pop(0) if ctx.has_weight else None
    go, gl, gp, gq, gw = torch.ops.residual_rewriter.attn_res_phase2_backward(
        grad_out.contiguous(), phase1_out, phase1_lse, partial, query, norm_weight, ctx.eps, ctx.scale
    )
    return go, gl, gp if ctx.has_partial else None, gq, gw if ctx.has_weight else None, None, None


attn_res_phase2.register_autograd(_phase2_backward, setup_context=_phase2_setup_context)


# ---- aggregation + the sublayer's own RMSNorm, fused --------------------------------------------
# Both fused ops return (mix, normed). In a converted model only `normed` is read (the mixture feeds
# nothing but its norm), so the compile backend passes return_mix=False: the kernel then skips the
# [..., D] store of the mix, the op returns an EMPTY tensor in its place (a custom op's outputs are
# fixed), and the backward gets no mix gradient (None) instead of a materialised zero [..., D] tensor.
# return_mix is keyword-only: autograd then expects gradients for the positional inputs only.


def _mix_or_empty(mix: Optional[Tensor], normed: Tensor, return_mix: bool) -> Tensor:
    return mix if return_mix else normed.new_empty(0)


@torch.library.custom_op(f"{LIB}::attn_res_normed", mutates_args=())
def attn_res_normed(
    sources: List[Tensor],
    query: Tensor,
    norm_weight: Optional[Tensor],
    eps: float,
    scale: float,
    out_norm_weight: Optional[Tensor],
    out_eps: float,
    *,
    return_mix: bool = True,
) -> tuple[Tensor, Tensor]:
    """(mix [..., D], RMSNorm(mix) * out_norm_weight [..., D]), both in the sources' dtype; the mix is
    an empty tensor, not computed into memory, when ``return_mix`` is False."""
    if sources[0].is_cuda:
        from . import dispatch

        mix, normed = dispatch.normed_cuda(
            sources, query, norm_weight, eps, scale, out_norm_weight, out_eps, return_mix=return_mix)
    else:
        mix, normed = reference.attn_res_normed_reference(sources, query, norm_weight, eps, scale, out_norm_weight, out_eps)
    return _mix_or_empty(mix, normed, return_mix), normed


@attn_res_normed.register_fake
def _attn_res_normed_fake(sources, query, norm_weight, eps, scale, out_norm_weight, out_eps, *, return_mix=True):
    reference._check_sources(sources, query)
    normed = torch.empty_like(sources[0])
    return _mix_or_empty(torch.empty_like(sources[0]), normed, return_mix), normed


@torch.library.custom_op(f"{LIB}::attn_res_normed_backward", mutates_args=())
def attn_res_normed_backward(
    grad_mix: Optional[Tensor],
    grad_normed: Tensor,
    sources: List[Tensor],
    query: Tensor,
    norm_weight: Optional[Tensor],
    eps: float,
    scale: float,
    out_norm_weight: Optional[Tensor],
    out_eps: float,
    accumulate: List[Optional[Tensor]],
) -> List[Tensor]:
    """Returns [grad_src_0..n-1, grad_query, grad_norm_weight (or empty), grad_out_norm_weight (or empty)].
    ``grad_mix`` None: no gradient reaches the mix (it was not returned). ``accumulate`` as in
    ``attn_res_phase1_backward``."""
    args = (grad_mix, grad_normed, sources, query, norm_weight, eps, scale, out_norm_weight, out_eps)
    if sources[0].is_cuda:
        from . import dispatch

        return _listed(*dispatch.normed_backward_cuda(*args, accumulate), like=query)
    from .reference_grads import attn_res_normed_backward_reference, accumulated

    gs, gq, gw, gwo = attn_res_normed_backward_reference(*args)
    return _listed(accumulated(gs, accumulate), gq, gw, gwo, like=query)


@attn_res_normed_backward.register_fake
def _attn_res_normed_backward_fake(grad_mix, grad_normed, sources, query, norm_weight, eps, scale, out_norm_weight,
                                   out_eps, accumulate):
    gw = torch.empty_like(norm_weight) if norm_weight is not None else query.new_empty(0)
    gwo = torch.empty_like(out_norm_weight) if out_norm_weight is not None else query.new_empty(0)
    return [torch.empty_like(s) for s in sources] + [torch.empty_like(query), gw, gwo]


def _normed_setup_context(ctx, inputs, keyword_only_inputs, output):
    sources, query, norm_weight, eps, scale, out_norm_weight, out_eps = inputs
    ctx.n, ctx.has_weight, ctx.has_out_weight = len(sources), norm_weight is not None, out_norm_weight is not None
    ctx.eps, ctx.scale, ctx.out_eps = eps, scale, out_eps
    ctx.return_mix = keyword_only_inputs.get("return_mix", True)
    opt = [t for t in (norm_weight, out_norm_weight) if t is not None]
    ctx.save_for_backward(*sources, query, *opt)


def _normed_backward(ctx, grad_mix, grad_normed):
    saved = ctx.saved_tensors
    sources, query, opt = list(saved[: ctx.n]), saved[ctx.n], list(saved[ctx.n + 1 :])
    norm_weight = opt.pop(0) if ctx.has_weight else None
    out_norm_weight = opt.pop(0) if ctx.has_out_weight else None
    grad_mix = grad_mix.contiguous() if ctx.return_mix and grad_mix is not None else None
    grad_normed = torch.zeros_like(sources[0]) if grad_normed is None else grad_normed.contiguous()
    grads = torch.ops.residual_rewriter.attn_res_normed_backward(
        grad_mix, grad_normed, sources, query, norm_weight, ctx.eps, ctx.scale, out_norm_weight, ctx.out_eps,
        [None] * ctx.n,
    )
    n = ctx.n
    return (
        list(grads[:n]),
        grads[n],
        grads[n + 1] if ctx.has_weight else None,
        None,
        None,
        grads[n + 2] if ctx.has_out_weight else None,
        None,
    )


attn_res_normed.register_autograd(_normed_backward, setup_context=_normed_setup_context)


# ---- phase-2 merge + the sublayer's own RMSNorm, fused ------------------------------------------
# What the compile backend emits when an RMSNorm reads a phase-2 merge (Block AttnRes: most sites).


@torch.library.custom_op(f"{LIB}::attn_res_phase2_normed", mutates_args=())
def attn_res_phase2_normed(
    phase1_out: Tensor,
    phase1_lse: Tensor,
    partial: Optional[Tensor],
    query: Tensor,
    norm_weight: Optional[Tensor],
    eps: float,
    scale: float,
    out_norm_weight: Optional[Tensor],
    out_eps: float,
    *,
    return_mix: bool = True,
) -> tuple[Tensor, Tensor]:
    """(mix = attn_res_phase2(...), RMSNorm(mix) * out_norm_weight), both [..., D] in phase1_out's dtype;
    the mix is an empty tensor, not computed into memory, when ``return_mix`` is False."""
    args = (phase1_out, phase1_lse, partial, query, norm_weight, eps, scale, out_norm_weight, out_eps)
    if phase1_out.is_cuda:
        from . import dispatch

        mix, normed = dispatch.phase2_normed_cuda(*args, return_mix=return_mix)
    else:
        mix, normed = reference.attn_res_phase2_normed_reference(*args)
    return _mix_or_empty(mix, normed, return_mix), normed


@attn_res_phase2_normed.register_fake
def _attn_res_phase2_normed_fake(phase1_out, phase1_lse, partial, query, norm_weight, eps, scale, out_norm_weight, out_eps,
                                 *, return_mix=True):
    normed = torch.empty_like(phase1_out)
    return _mix_or_empty(torch.empty_like(phase1_out), normed, return_mix), normed


@torch.library.custom_op(f"{LIB}::attn_res_phase2_normed_backward", mutates_args=())
def attn_res_phase2_normed_backward(
    grad_mix: Optional[Tensor],
    grad_normed: Tensor,
    phase1_out: Tensor,
    phase1_lse: Tensor,
    partial: Optional[Tensor],
    query: Tensor,
    norm_weight: Optional[Tensor],
    eps: float,
    scale: float,
    out_norm_weight: Optional[Tensor],
    out_eps: float,
    accumulate: List[Optional[Tensor]],
) -> List[Tensor]:
    """Returns [grad_phase1_out, grad_phase1_lse, grad_partial (or empty), grad_query,
    grad_norm_weight (or empty), grad_out_norm_weight (or empty)]. ``grad_mix`` None: no gradient
    reaches the mix (it was not returned). ``accumulate``: [the partial's gradient from its other
    readers, added to grad_partial, or None]."""
    args = (grad_mix, grad_normed, phase1_out, phase1_lse, partial, query, norm_weight, eps, scale, out_norm_weight,
            out_eps)
    (acc,) = accumulate
    if acc is not None and partial is None:
        raise ValueError("attn_res_phase2_normed_backward: a gradient to accumulate, but no partial block")
    if phase1_out.is_cuda:
        from . import dispatch

        go, gl, gp, gq, gw, gwo = dispatch.phase2_normed_backward_cuda(*args, acc)
    else:
        from .reference_grads import attn_res_phase2_normed_backward_reference, accumulated

        go, gl, gp, gq, gw, gwo = attn_res_phase2_normed_backward_reference(*args)
        gp = accumulated([gp], [acc])[0] if gp is not None else None
    return [go, gl, _or_empty(gp, query), gq, _or_empty(gw, query), _or_empty(gwo, query)]


@attn_res_phase2_normed_backward.register_fake
def _attn_res_phase2_normed_backward_fake(
    grad_mix, grad_normed, phase1_out, phase1_lse, partial, query, norm_weight, eps, scale, out_norm_weight, out_eps,
    accumulate,
):
    def like(t):
        return torch.empty_like(t) if t is not None else query.new_empty(0)

    return [torch.empty_like(phase1_out), torch.empty_like(phase1_lse), like(partial), torch.empty_like(query),
            like(norm_weight), like(out_norm_weight)]


def _phase2_normed_setup_context(ctx, inputs, keyword_only_inputs, output):
    phase1_out, phase1_lse, partial, query, norm_weight, eps, scale, out_norm_weight, out_eps = inputs
    ctx.has = tuple(t is not None for t in (partial, norm_weight, out_norm_weight))
    ctx.eps, ctx.scale, ctx.out_eps = eps, scale, out_eps
    ctx.return_mix = keyword_only_inputs.get("return_mix", True)
    opt = [t for t in (partial, norm_weight, out_norm_weight) if t is not None]
    ctx.save_for_backward(phase1_out, phase1_lse, query, *opt)


def _phase2_normed_backward(ctx, grad_mix, grad_normed):
    phase1_out, phase1_lse, query, *opt = ctx.saved_tensors
    partial, norm_weight, out_norm_weight = (opt.pop(0) if has else None for has in ctx.has)
    grad_mix = grad_mix.contiguous() if ctx.return_mix and grad_mix is not None else None
    grad_normed = torch.zeros_like(phase1_out) if grad_normed is None else grad_normed.contiguous()
    go, gl, gp, gq, gw, gwo = torch.ops.residual_rewriter.attn_res_phase2_normed_backward(
        grad_mix, grad_normed, phase1_out, phase1_lse, partial, query, norm_weight, ctx.eps, ctx.scale,
        out_norm_weight, ctx.out_eps, [None],
    )
    has_p, has_w, has_wo = ctx.has
    return (go, gl, gp if has_p else None, gq, gw if has_w else None, None, None, gwo if has_wo else None, None)


attn_res_phase2_normed.register_autograd(_phase2_normed_backward, setup_context=_phase2_normed_setup_context)


# ---- the partial block's update + phase-2 merge + the sublayer's RMSNorm, fused -----------------
# What the compile backend emits when a phase-2 merge (mix not returned) reads a partial block that an
# add just produced, `partial = prev + delta` (Block AttnRes: every sublayer after a block's second).
# The update is written once and not read back; its gradient and the merge's are summed in the kernel.


@torch.library.custom_op(f"{LIB}::attn_res_phase2_add_normed", mutates_args=())
def attn_res_phase2_add_normed(
    phase1_out: Tensor,
    phase1_lse: Tensor,
    partial: Tensor,
    delta: Tensor,
    query: Tensor,
    norm_weight: Optional[Tensor],
    eps: float,
    scale: float,
    out_norm_weight: Optional[Tensor],
    out_eps: float,
) -> tuple[Tensor, Tensor]:
    """(new partial = partial + delta, RMSNorm(attn_res_phase2(..., new partial, ...)) * out_norm_weight),
    both [..., D] in phase1_out's dtype (= the partial's; delta's may be one that promotes to it)."""
    args = (phase1_out, phase1_lse, partial, delta, query, norm_weight, eps, scale, out_norm_weight, out_eps)
    if phase1_out.is_cuda:
        from . import dispatch

        return dispatch.phase2_add_normed_cuda(*args)
    return reference.attn_res_phase2_add_normed_reference(*args)


@attn_res_phase2_add_normed.register_fake
def _attn_res_phase2_add_normed_fake(phase1_out, phase1_lse, partial, delta, query, norm_weight, eps, scale,
                                     out_norm_weight, out_eps):
    return torch.empty_like(partial), torch.empty_like(phase1_out)


@torch.library.custom_op(f"{LIB}::attn_res_phase2_add_normed_backward", mutates_args=())
def attn_res_phase2_add_normed_backward(
    grad_partial: Optional[Tensor],
    grad_normed: Tensor,
    phase1_out: Tensor,
    phase1_lse: Tensor,
    partial: Tensor,
    query: Tensor,
    norm_weight: Optional[Tensor],
    eps: float,
    scale: float,
    out_norm_weight: Optional[Tensor],
    out_eps: float,
) -> List[Tensor]:
    """Returns [grad_phase1_out, grad_phase1_lse, grad of the old partial = grad of delta, grad_query,
    grad_norm_weight (or empty), grad_out_norm_weight (or empty)]. ``partial`` is the UPDATED partial;
    ``grad_partial`` its gradient from its other readers (None: it has none)."""
    if phase1_out.is_cuda:
        from . import dispatch

        fn = dispatch.phase2_add_normed_backward_cuda
    else:
        from .reference_grads import attn_res_phase2_add_normed_backward_reference as fn
    go, gl, gp, gq, gw, gwo = fn(
        grad_partial, grad_normed, phase1_out, phase1_lse, partial, query, norm_weight, eps, scale, out_norm_weight,
        out_eps,
    )
    return [go, gl, gp, gq, _or_empty(gw, query), _or_empty(gwo, query)]


@attn_res_phase2_add_normed_backward.register_fake
def _attn_res_phase2_add_normed_backward_fake(
    grad_partial, grad_normed, phase1_out, phase1_lse, partial, query, norm_weight, eps, scale, out_norm_weight, out_eps
):
    def like(t):
        return torch.empty_like(t) if t is not None else query.new_empty(0)

    return [torch.empty_like(phase1_out), torch.empty_like(phase1_lse), torch.empty_like(partial),
            torch.empty_like(query), like(norm_weight), like(out_norm_weight)]


def _phase2_add_normed_setup_context(ctx, inputs, output):
    phase1_out, phase1_lse, partial, delta, query, norm_weight, eps, scale, out_norm_weight, out_eps = inputs
    ctx.has = tuple(t is not None for t in (norm_weight, out_norm_weight))
    ctx.eps, ctx.scale, ctx.out_eps = eps, scale, out_eps
    ctx.delta_dtype = delta.dtype  # may be narrower than the partial's (a bf16 branch under autocast)
    opt = [t for t in (norm_weight, out_norm_weight) if t is not None]
    ctx.save_for_backward(phase1_out, phase1_lse, query, output[0], *opt)  # output[0]: the updated partial


def _phase2_add_normed_backward(ctx, grad_partial, grad_normed):
    phase1_out, phase1_lse, query, partial, *opt = ctx.saved_tensors
    norm_weight, out_norm_weight = (opt.pop(0) if has else None for has in ctx.has)
    grad_partial = grad_partial.contiguous() if grad_partial is not None else None
    grad_normed = torch.zeros_like(phase1_out) if grad_normed is None else grad_normed.contiguous()
    go, gl, gp, gq, gw, gwo = torch.ops.residual_rewriter.attn_res_phase2_add_normed_backward(
        grad_partial, grad_normed, phase1_out, phase1_lse, partial, query, norm_weight, ctx.eps, ctx.scale,
        out_norm_weight, ctx.out_eps,
    )
    has_w, has_wo = ctx.has
    return (go, gl, gp, gp.to(ctx.delta_dtype), gq, gw if has_w else None, None, None, gwo if has_wo else None, None)


attn_res_phase2_add_normed.register_autograd(
    _phase2_add_normed_backward, setup_context=_phase2_add_normed_setup_context
)
