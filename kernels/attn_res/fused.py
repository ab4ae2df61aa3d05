"""Triton kernels for the AttnRes aggregation: fused forward and backward (autograd: ``dispatch.py``).

Spec: ``reference.attn_res_reference``. Per token (row of D values), with n sources v_i:
    r_i = rsqrt(mean(v_i^2) + eps);  s_i = (q * g) . v_i * r_i;  a = softmax(s);  out = scale * sum_i a_i v_i

Forward (``_fwd_kernel``): one program per BLOCK_T tokens (times S queries for phase 1). Each source
tile [BLOCK_T, BLOCK_D] is read ONCE: its RMS, its score and an online-softmax update of a fp32
accumulator happen on the tile in registers. The op is memory bound, so the score is a row reduction
(elementwise multiply + tl.sum), not tl.dot. Optional epilogue: the
sublayer's own RMSNorm of the mixture (``attn_res_normed``). Phase 1 has kernels of its own (``two_phase.py``).

Backward (``_bwd_kernel``): pass 1 recomputes the softmax statistics and the fp32 mixture from the
sources (the op saves only its inputs); pass 2 reads every source again and writes its gradient:
    da_i = scale dy.v_i;  abar = sum_i a_i da_i = dy.mix;  ds_i = a_i (da_i - abar)
    dv_i = scale a_i dy + r_i ds_i (q' - n_i s_i / D)       (n_i = v_i r_i, q' = q * g)
    dq'  = sum_tokens sum_i ds_i n_i                          -> d query = dq' g, d g = dq' q
The dq' reduction over tokens is deterministic: persistent programs each write one fp32 row of a
[programs, D] partial, summed by torch in a fixed order. No atomics.
For the normed variant the output RMSNorm's backward is folded into dy between the two passes.

Sources travel as a Triton tuple of pointers (+ a tuple of row strides): no stacking copy, any
non-contiguous token stride, and a separate specialization per source count (checked against
``MAX_SOURCES``). Offsets are int64. Every load is cast to fp32 before arithmetic (bf16 arithmetic
in the interpreter is silently wrong, and fp32 accumulation is what the GPU wants anyway).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from . import _launch as L
from .reference import _check_sources

try:
    import triton
    import triton.language as tl
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "residual_rewriter.kernels.attn_res.fused needs triton (pip install triton); "
        "the plain PyTorch reference works without it"
    ) from e


# ---- kernels ------------------------------------------------------------------------------------


@triton.jit
def _query_row(q_ptr, w_ptr, qoff, cols, cmask, HAS_W: tl.constexpr):
    q = tl.load(q_ptr + qoff + cols, mask=cmask, other=0.0).to(tl.float32)
    if HAS_W:
        q = q * tl.load(w_ptr + qoff + cols, mask=cmask, other=0.0).to(tl.float32)
    return q  # [BLOCK_D]


@triton.jit
def _store_source_grad(dsrc_ptr, offs, dv, acc_ptr, acc_stride, rows64, cols, mask, ACCUMULATE: tl.constexpr):
    """Store a source's gradient dv [BLOCK_T, BLOCK_D] fp32; with ACCUMULATE, plus the gradient the
    source gets from its other readers (read here, so no separate kernel sums them), rounded once."""
    if ACCUMULATE:
        dv += tl.load(acc_ptr + rows64[:, None] * acc_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(dsrc_ptr + offs, dv.to(dsrc_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_rms_normed(normed_ptr, wo_ptr, offs, mix, cols, cmask, mask, D, out_eps, HAS_WO: tl.constexpr):
    """Store RMSNorm(mix) * wo, the sublayer's own pre-norm, from the fp32 mixture (before rounding)."""
    rm = tl.rsqrt(tl.sum(mix * mix, 1) / D + out_eps)
    y = mix * rm[:, None]
    if HAS_WO:
        y = y * tl.load(wo_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(normed_ptr + offs, y.to(normed_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_backward(mix, dn, wo, D, out_eps, HAS_WO: tl.constexpr):
    """Backward of y = RMSNorm(mix) * wo for one tile: (d mix [BLOCK_T, BLOCK_D], this tile's d wo
    [BLOCK_D], zeros without HAS_WO). ``wo`` is the fp32 gain row (any row without HAS_WO)."""
    rm = tl.rsqrt(tl.sum(mix * mix, 1) / D + out_eps)
    nm = mix * rm[:, None]
    if HAS_WO:
        dwo = tl.sum(dn * nm, 0)
        dn = dn * wo[None, :]
    else:
        dwo = wo * 0.0
    return rm[:, None] * (dn - nm * (tl.sum(dn * nm, 1) / D)[:, None]), dwo


@triton.jit
def _online_mix(srcs, strides, rows64, cols, mask, q, D, eps, N: tl.constexpr, BLOCK_T: tl.constexpr,
                BLOCK_D: tl.constexpr):
    """One pass over the N sources for one tile: returns (m, l, acc) of the online softmax —
    running max [BLOCK_T], running sum [BLOCK_T], unnormalised fp32 mixture [BLOCK_T, BLOCK_D]."""
    m = tl.full([BLOCK_T], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_T], tl.float32)
    acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    l_prev = tl.full([BLOCK_T], 1.0, tl.float32)  # l after the previous source (1 before the first)
    for i in tl.static_range(N):
        # The load of source i is predicated on l_prev >= 0 (always true: l is a sum of exps). The
        # compiler cannot know that, so it cannot hoist all N loads to the top of the unrolled loop,
        # which costs N tiles of registers (measured: 185 registers at D=4096, 9 sources, one
        # program per SM; 255 plus spills at 16 sources). With the predicate at most two tiles are
        # live, registers stay low and several programs share each SM to hide the latency.
        live = mask & (l_prev >= 0.0)[:, None]
        v = tl.load(srcs[i] + rows64[:, None] * strides[i] + cols[None, :], mask=live, other=0.0).to(tl.float32)
        l_prev = l
        r = tl.rsqrt(tl.sum(v * v, 1) / D + eps)  # [BLOCK_T]
        s = tl.sum(v * q[None, :], 1) * r  # [BLOCK_T]
        m_new = tl.maximum(m, s)
        alpha = tl.exp(m - m_new)  # 0 on the first source (m = -inf)
        p = tl.exp(s - m_new)
        l = l * alpha + p
        acc = acc * alpha[:, None] + p[:, None] * v
        m = m_new
    return m, l, acc


@triton.jit
def _fwd_kernel(
    srcs, strides,  # N pointers to [T, D] rows (row stride strides[i], unit column stride)
    q_ptr, w_ptr,  # queries [S, D], gains [S, D] (HAS_W)
    out_ptr,  # [S, T, D] contiguous, input dtype (STORE_MIX)
    normed_ptr, wo_ptr,  # [T, D] RMSNorm(out) * wo (NORMED; wo if HAS_WO)
    T, D, S, eps, scale, out_eps,
    N: tl.constexpr, HAS_W: tl.constexpr, STORE_MIX: tl.constexpr, NORMED: tl.constexpr,
    HAS_WO: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # 1-D grid over (token tile, query), query fastest: the S programs of one tile run side by side
    # and share its sources through L2 (phase 1 reads the completed blocks ~once for all queries).
    pid = tl.program_id(0)
    pid_q = pid % S
    pid_t = pid // S
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < T
    cmask = cols < D
    mask = rmask[:, None] & cmask[None, :]
    rows64 = rows.to(tl.int64)
    q = _query_row(q_ptr, w_ptr, pid_q.to(tl.int64) * D, cols, cmask, HAS_W)
    m, l, acc = _online_mix(srcs, strides, rows64, cols, mask, q, D, eps, N, BLOCK_T, BLOCK_D)
    out = acc * (scale / l)[:, None]  # [BLOCK_T, BLOCK_D] fp32
    obase = pid_q.to(tl.int64) * T * D
    offs = rows64[:, None] * D + cols[None, :]
    if STORE_MIX:  # off when only the normed form is read (the compile backend's usual case)
        tl.store(out_ptr + obase + offs, out.to(out_ptr.dtype.element_ty), mask=mask)
    if NORMED:
        _store_rms_normed(normed_ptr, wo_ptr, offs, out, cols, cmask, mask, D, out_eps, HAS_WO)


@triton.jit
def _bwd_kernel(
    srcs, strides,  # N pointers to [T, D] rows
    dsrcs,  # N pointers to [T, D] contiguous gradient buffers (input dtype)
    accs, acc_strides,  # N pointers to [T, D] rows: added to source i's gradient if bit i of ACC_MASK is set
    q_ptr, w_ptr,  # query [D], gain [D] (HAS_W)
    dy_ptr,  # [T, D] contiguous: gradient of the mixture (HAS_DY; none when the mix was not returned)
    dnormed_ptr, wo_ptr,  # [T, D] gradient of the normed output, out gain [D] (NORMED / HAS_WO)
    dqg_ptr,  # [programs, D] fp32 partial of d(q * g)
    dwo_ptr,  # [programs, D] fp32 partial of d wo (NORMED and HAS_WO)
    T, D, eps, scale, out_eps, num_tiles,
    N: tl.constexpr, HAS_W: tl.constexpr, HAS_DY: tl.constexpr, NORMED: tl.constexpr, HAS_WO: tl.constexpr,
    ACC_MASK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    q = _query_row(q_ptr, w_ptr, 0, cols, cmask, HAS_W)  # q' [BLOCK_D]
    dqg = tl.zeros([BLOCK_D], tl.float32)
    dwo = tl.zeros([BLOCK_D], tl.float32)
    wo = q  # a placeholder row unless HAS_WO
    if HAS_WO:
        wo = tl.load(wo_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    for t in range(pid, num_tiles, nprog):  # persistent: one partial row per program
        rows = t * BLOCK_T + tl.arange(0, BLOCK_T)
        rmask = rows < T
        mask = rmask[:, None] & cmask[None, :]
        rows64 = rows.to(tl.int64)
        offs = rows64[:, None] * D + cols[None, :]
        # pass 1: softmax statistics and the fp32 mixture (recomputed, not saved)
        m, l, acc = _online_mix(srcs, strides, rows64, cols, mask, q, D, eps, N, BLOCK_T, BLOCK_D)
        lse = m + tl.log(l)
        mix = acc * (scale / l)[:, None]  # [BLOCK_T, BLOCK_D]
        if HAS_DY:
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        else:
            dy = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
        if NORMED:  # fold RMSNorm(mix) * wo's backward into dy
            dn = tl.load(dnormed_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            d_mix, d_wo = _rms_norm_backward(mix, dn, wo, D, out_eps, HAS_WO)
            dy += d_mix
            dwo += d_wo
        abar = tl.sum(dy * mix, 1)  # = sum_i a_i * scale * dy.v_i   [BLOCK_T]
        # pass 2: per-source gradients
        for i in tl.static_range(N):
            v = tl.load(srcs[i] + rows64[:, None] * strides[i] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            r = tl.rsqrt(tl.sum(v * v, 1) / D + eps)
            n = v * r[:, None]
            s = tl.sum(n * q[None, :], 1)
            a = tl.exp(s - lse)
            ds = a * (scale * tl.sum(dy * v, 1) - abar)  # [BLOCK_T]
            dv = (scale * a)[:, None] * dy + (r * ds)[:, None] * (q[None, :] - n * (s / D)[:, None])
            _store_source_grad(dsrcs[i], offs, dv, accs[i], acc_strides[i], rows64, cols, mask, (ACC_MASK >> i) & 1)
            dqg += tl.sum(ds[:, None] * n, 0)
    prow = pid.to(tl.int64) * D
    tl.store(dqg_ptr + prow + cols, dqg, mask=cmask)
    if HAS_WO:
        tl.store(dwo_ptr + prow + cols, dwo, mask=cmask)


# ---- launch wrappers ----------------------------------------------------------------------------


def _prepare(sources: Sequence[Tensor], query: Tensor, what: str, *others: Optional[Tensor]):
    """Checks (count, shapes, dtype, one device for sources, query and ``others``), then
    (rows [T, D] views, row strides tuple, T, D)."""
    L.check_num_sources(len(sources), what)
    _check_sources(sources, query)
    L.check_dtype(sources[0].dtype, what)
    L.check_device(list(sources) + [query] + [t for t in others if t is not None], what)
    rows = [L.as_rows(s) for s in sources]
    T, D = rows[0].shape
    return rows, tuple(int(r.stride(0)) for r in rows), T, D


def forward_launch(
    sources: Sequence[Tensor],
    queries: Tensor,  # [S, D]
    norm_weights: Optional[Tensor],  # [S, D] or None
    eps: float,
    scale: float,
    *,
    out_norm_weight: Optional[Tensor] = None,
    out_eps: Optional[float] = None,
    store_mix: bool = True,
    what: str = "attn_res_triton",
):
    """Launch ``_fwd_kernel``. Returns (out [S, T, D] or None without ``store_mix``, normed [T, D] or
    None), flat over tokens; callers reshape."""
    rows, strides, T, D = _prepare(sources, queries[0], what, queries, norm_weights, out_norm_weight)
    S = queries.shape[0]
    if norm_weights is not None and norm_weights.shape != queries.shape:
        raise ValueError(f"{what}: norm weights {tuple(norm_weights.shape)} must match queries {tuple(queries.shape)}")
    dev, dt = rows[0].device, rows[0].dtype
    normed = out_eps is not None
    if normed and S != 1:
        raise ValueError(f"{what}: the normed epilogue takes one query")
    if not (store_mix or normed):
        raise ValueError(f"{what}: store_mix=False leaves nothing to return without the normed epilogue")
    out = L.empty((S, T, D), dt, dev) if store_mix else None
    y = L.empty((T, D), dt, dev) if normed else None
    if T == 0:
        return out, y
    q = queries.contiguous()
    w = norm_weights.contiguous() if norm_weights is not None else None
    wo = out_norm_weight.contiguous() if out_norm_weight is not None else None
    BT, BD, warps = L.tile(T, D, max_warps=32)  # the forward fits 32 warps' 64-register cap (_launch.py)
    grid = (triton.cdiv(T, BT) * S,)
    # Absent optional buffers get a placeholder pointer: their constexpr flag compiles every access out.
    placeholder = out if out is not None else y
    _fwd_kernel[grid](
        tuple(rows), strides, q, w if w is not None else q, placeholder, y if y is not None else placeholder,
        wo if wo is not None else q,
        T, D, S, float(eps), float(scale), float(out_eps if normed else 0.0),
        N=len(rows), HAS_W=w is not None, STORE_MIX=store_mix, NORMED=normed, HAS_WO=wo is not None,
        BLOCK_T=BT, BLOCK_D=BD, num_warps=warps,
    )
    return out, y


def backward_launch(
    grad_out: Tensor,
    sources: Sequence[Tensor],
    query: Tensor,
    norm_weight: Optional[Tensor],
    eps: float,
    scale: float,
    *,
    grad_normed: Optional[Tensor] = None,
    out_norm_weight: Optional[Tensor] = None,
    out_eps: Optional[float] = None,
    what: str = "attn_res_triton backward",
    accumulate: Optional[Sequence[Optional[Tensor]]] = None,
):
    """Launch ``_bwd_kernel``. Returns (grad_sources, grad_query, grad_norm_weight, grad_out_norm_weight).
    ``grad_out`` None: no gradient reaches the mixture (normed variant with the mix not returned).
    ``accumulate[i]``, when given, is added to source i's gradient in the kernel."""
    rows, strides, T, D = _prepare(sources, query, what, grad_out, norm_weight, grad_normed, out_norm_weight)
    dev, dt = rows[0].device, rows[0].dtype
    normed = out_eps is not None
    gsrc = [L.empty(s.shape, dt, dev) for s in sources]  # contiguous
    BT, BD, warps = L.tile(T, D)
    num_tiles = triton.cdiv(T, BT)
    P = L.num_programs(num_tiles, dev)
    dqg = L.empty((P, D), torch.float32, dev)
    has_wo = normed and out_norm_weight is not None
    dwo = L.empty((P, D), torch.float32, dev) if has_wo else dqg
    if T == 0:
        dqg.zero_(), dwo.zero_()
    else:
        dn = L.as_rows(grad_normed).contiguous() if normed else None
        dy = L.as_rows(grad_out).contiguous() if grad_out is not None else None
        if dy is None and dn is None:
            raise ValueError(f"{what}: neither a gradient of the mixture nor of its normed form")
        q = query.contiguous()
        w = norm_weight.contiguous() if norm_weight is not None else None
        wo = out_norm_weight.contiguous() if has_wo else q
        accs, acc_strides, acc_mask = L.accumulate_rows(accumulate, gsrc, what)
        _bwd_kernel[(P,)](
            tuple(rows), strides, tuple(g.view(-1, D) for g in gsrc), accs, acc_strides, q, w if w is not None else q,
            dy if dy is not None else dn, dn if dn is not None else dy, wo, dqg, dwo,
            T, D, float(eps), float(scale), float(out_eps if normed else 0.0), num_tiles,
            N=len(rows), HAS_W=w is not None, HAS_DY=dy is not None, NORMED=normed, HAS_WO=has_wo,
            ACC_MASK=acc_mask, BLOCK_T=BT, BLOCK_D=BD, num_warps=warps,
        )
    d_qg = dqg.sum(0)  # [D] fp32, fixed-order reduction over programs
    qf = query.float()
    grad_query = (d_qg * norm_weight.float() if norm_weight is not None else d_qg).to(query.dtype)
    grad_weight = (d_qg * qf).to(norm_weight.dtype) if norm_weight is not None else None
    grad_wo = dwo.sum(0).to(out_norm_weight.dtype) if has_wo else None
    return gsrc, grad_query, grad_weight, grad_wo


# ---- public functional forms --------------------------------------------------------------------


def attn_res_fwd(sources, query, norm_weight, eps, scale) -> Tensor:
    """Forward only (no autograd): ``[..., D]`` in the sources' dtype."""
    out, _ = forward_launch(sources, query[None], norm_weight[None] if norm_weight is not None else None, eps, scale)
    return out.view(sources[0].shape)


def attn_res_bwd(grad_out, sources, query, norm_weight, eps, scale):
    """(grad_sources, grad_query, grad_norm_weight or None), as ``attn_res_backward_reference``."""
    gs, gq, gw, _ = backward_launch(grad_out, sources, query, norm_weight, eps, scale)
    return gs, gq, gw


def attn_res_normed_fwd(sources, query, norm_weight, eps, scale, out_norm_weight, out_eps, return_mix=True):
    """(mix, RMSNorm(mix) * out_norm_weight), both ``[..., D]`` in the sources' dtype; without
    ``return_mix`` the mix is not written and comes back as None."""
    w = norm_weight[None] if norm_weight is not None else None
    out, y = forward_launch(
        sources, query[None], w, eps, scale, out_norm_weight=out_norm_weight, out_eps=out_eps,
        store_mix=return_mix, what="attn_res_normed",
    )
    shape = sources[0].shape
    return (out.view(shape) if out is not None else None), y.view(shape)


def attn_res_normed_bwd(grad_mix, grad_normed, sources, query, norm_weight, eps, scale, out_norm_weight, out_eps,
                        accumulate=None):
    """(grad_sources, grad_query, grad_norm_weight, grad_out_norm_weight), as the reference (either
    upstream gradient may be None: zero); ``accumulate[i]``, when given, added to source i's gradient."""
    return backward_launch(
        grad_mix, sources, query, norm_weight, eps, scale,
        grad_normed=grad_normed, out_norm_weight=out_norm_weight, out_eps=out_eps, what="attn_res_normed backward",
        accumulate=accumulate,
    )
