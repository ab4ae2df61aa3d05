"""Triton kernels for the paper's two-phase schedule (specs: ``attn_res_phase1_reference`` and
``attn_res_phase2_reference``; backward specs in ``reference_grads.py``).

Phase 1, forward (``_phase1_fwd_kernel``): one program per token tile computes every query of the
block, so the m completed-block sources of a tile are fetched from DRAM once for all S queries (the
other queries re-read them from L1/L2). Each query's output is a tensor of its own (a tuple of
output pointers): the merges' gradients come back as S tensors, and the backward assembles no
[S, ..., D] gradient from ``select_backward``s.

Phase 1, backward (``_phase1_bwd_kernel``), one kernel, per token tile:
  sweep 1 (DRAM): delta_j = dout_j.out_j - dlse_j = sum_i a_ji dout_j.v_i - dlse_j, with
      a_ji = exp(s_ji - lse_j) from the SAVED lse (fp32) and the sources, into a per-token fp32 scratch;
  sweep 2 (the same tile again, from L2): every source's gradient, accumulated over the S queries,
      ds_ji = a_ji (dout_j.v_i - delta_j);  dv_i = sum_j a_ji dout_j + r_i ds_ji (q'_j - n_i s_ji / D).
The forward saves only the sources and the lse (per-token fp32 scalars), no output or key tensors.
The loops over queries are runtime loops (the query's gradient pointer picked from the tuple by
``_pick``): unrolled, they kept every query's rows live and spilled at 16 warps.
``HEAD_NORMED`` (``attn_res_phase1_normed``): query 0 reads no partial block, so its merge is only its
sublayer's RMSNorm; the forward writes that normed form instead of out_0, and the backward takes its
gradient, recomputes out_0 in fp32 from the sources in sweep 1 and keeps d out_0 in registers.
dq'_j is reduced over tokens into a [programs, S, D] fp32 partial (one slab per persistent program,
summed by torch in fixed order: deterministic).

Phase 2 (``_phase2_fwd_kernel`` / ``_phase2_bwd_kernel``): a two-way online-softmax merge of the
phase-1 result (score lse, value out) with the running partial block; elementwise over tokens.
With ``NORMED`` (the ``attn_res_phase2_normed`` op) the forward also writes the sublayer's RMSNorm of
the fp32 mixture, ``RMSNorm(mix) * wo``, and the backward recomputes the fp32 mixture and folds the
norm's backward into the mixture's gradient (``dmix += r_m (dn wo - nm mean(dn wo nm))``, d wo
reduced per program like d q'), exactly as ``fused.py`` does for ``attn_res_normed``. Without a partial
block (first sublayer of a block) the backward kernel still runs when NORMED (``HAS_P=False``).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from . import _launch as L
from .fused import (
    _online_mix, _prepare, _query_row, _rms_norm_backward, _store_rms_normed, _store_source_grad, triton, tl,
)
from .reference import check_partial_update


@triton.jit
def _phase1_fwd_kernel(
    srcs, strides,  # m pointers to [T, D] rows
    q_ptr, w_ptr,  # queries [S, D], gains [S, D] (HAS_W)
    outs,  # S pointers to [T, D] contiguous outputs, one per query (input dtype); outs[0] unused with HEAD_NORMED
    lse_ptr,  # [S, T] fp32
    normed_ptr, wo_ptr,  # [T, D]: RMSNorm(scale * out_0) * wo (HEAD_NORMED; wo if HAS_WO)
    endp_ptr, endp_stride, endd_ptr, endd_stride,  # [T, D] rows: the previous block's last add (BLOCK_END)
    T, D, eps, scale, out_eps,
    N: tl.constexpr, S: tl.constexpr, HAS_W: tl.constexpr, HEAD_NORMED: tl.constexpr, HAS_WO: tl.constexpr,
    BLOCK_END: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per token tile computes every query: the tile's sources come from DRAM for the
    # first query and from L1/L2 for the others. Each query's output is a tensor of its own, so the
    # merges' gradients come back as S tensors and the backward assembles no [S, T, D] gradient.
    # HEAD_NORMED: query 0 reads no partial block (a block's first sublayer), so its merge is just its
    # sublayer's RMSNorm: written here from the fp32 mixture, and out_0 is not written at all.
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < T
    cmask = cols < D
    mask = rmask[:, None] & cmask[None, :]
    rows64 = rows.to(tl.int64)
    offs = rows64[:, None] * D + cols[None, :]
    if BLOCK_END:  # the last source is the previous block's sum p + d (rounded once, as torch's add):
        # written here into its buffer srcs[N - 1] (contiguous), then read back like the others (from L2)
        p = tl.load(endp_ptr + rows64[:, None] * endp_stride + cols[None, :], mask=mask, other=0.0)
        d = tl.load(endd_ptr + rows64[:, None] * endd_stride + cols[None, :], mask=mask, other=0.0)
        tl.store(srcs[N - 1] + offs, (p.to(tl.float32) + d.to(tl.float32)).to(srcs[N - 1].dtype.element_ty), mask=mask)
        tl.debug_barrier()  # the loads below may be made by other threads of this program
    for j in tl.static_range(S):
        q = _query_row(q_ptr, w_ptr, j * D, cols, cmask, HAS_W)
        m, l, acc = _online_mix(srcs, strides, rows64, cols, mask, q, D, eps, N, BLOCK_T, BLOCK_D)
        if HEAD_NORMED and j == 0:
            _store_rms_normed(normed_ptr, wo_ptr, offs, acc * (scale / l)[:, None], cols, cmask, mask, D, out_eps,
                              HAS_WO)
        else:
            tl.store(outs[j] + offs, (acc / l[:, None]).to(outs[j].dtype.element_ty), mask=mask)
        tl.store(lse_ptr + j * T + rows64, m + tl.log(l), mask=rmask)


@triton.jit
def _pick(ptrs, strides, j, S: tl.constexpr):
    """(ptrs[j], strides[j]) for a RUNTIME j: the loops over queries stay loops (unrolled, they
    kept every query's rows live: 183 registers at D=2048 with 4 queries against 80 with one)."""
    p = ptrs[0]
    st = strides[0]
    for k in tl.static_range(1, S):
        p = tl.where(j == k, ptrs[k], p)
        st = tl.where(j == k, strides[k], st)
    return p, st


@triton.jit
def _source_grad_step(v, n, r, qj, lse, delta, dout, D):
    """Query j's share of one source tile's gradient: (dv term [BLOCK_T, BLOCK_D], ds_ji [BLOCK_T])."""
    s = tl.sum(n * qj[None, :], 1)
    a = tl.exp(s - lse)
    ds = a * (tl.sum(dout * v, 1) - delta)
    return a[:, None] * dout + (r * ds)[:, None] * (qj[None, :] - n * (s / D)[:, None]), ds


@triton.jit
def _add_to_slab(dqg_ptr, row, D, cols, n, ds, cmask):
    """dq'_j += sum over the tile's tokens of ds_ji n_i, in row ``row`` of the fp32 partial: this
    program's own (no other program touches it). The row's pointers are made here, not kept live
    across the sweep (a [BLOCK_D] int64 vector: 32 registers at hidden 4096, which spilled)."""
    pp = dqg_ptr + row * D + cols
    tl.store(pp, tl.load(pp, mask=cmask, other=0.0) + tl.sum(ds[:, None] * n, 0), mask=cmask)


@triton.jit
def _phase1_bwd_kernel(
    srcs, strides,  # m pointers to [T, D] rows
    dsrcs,  # m pointers to [T, D] contiguous gradients
    accs, acc_strides,  # m pointers to [T, D] rows: added to source i's gradient if bit i of ACC_MASK is set
    qg_ptr,  # q' = queries * gains [S, D] fp32 (one row load per query)
    douts, dout_strides,  # S pointers to [T, D] rows: each query's output gradient (douts[0] unused with HEAD_NORMED)
    dlse_ptr, lse_ptr,  # [S, T] fp32 each
    delta_ptr,  # [S, T] fp32 scratch: delta_j of the current tile, written by sweep 1, read by sweep 2
    dqg_ptr,  # [programs, S, D] fp32, zero-initialised, one slab per program
    dn_ptr, wo_ptr, dwo_ptr,  # HEAD_NORMED: d normed_0 [T, D] contiguous, wo [D] (HAS_WO), d wo [programs, D] fp32
    T, D, eps, num_tiles, scale, out_eps,
    N: tl.constexpr, S: tl.constexpr, HEAD_NORMED: tl.constexpr, HAS_WO: tl.constexpr, REG_DQ: tl.constexpr,
    ACC_MASK: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    J0: tl.constexpr = 1 if HEAD_NORMED else 0  # the first query whose gradient comes from DRAM
    # REG_DQ: dq' of every query accumulated in registers over all of this program's tiles, [BLOCK_S,
    # BLOCK_D] fp32, written once at the end; else a read-modify-write of the program's fp32 slab row
    # per (tile, source, query): two rows of L2 traffic each, many times the sources' bytes.
    qidx = tl.arange(0, BLOCK_S)
    dq_acc = tl.zeros([BLOCK_S, BLOCK_D], tl.float32)
    dwo = tl.zeros([BLOCK_D], tl.float32)
    wo = dwo  # a placeholder row unless HAS_WO
    if HAS_WO:
        wo = tl.load(wo_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    for t in range(pid, num_tiles, nprog):
        rows = t * BLOCK_T + tl.arange(0, BLOCK_T)
        rmask = rows < T
        mask = rmask[:, None] & cmask[None, :]
        rows64 = rows.to(tl.int64)
        offs = rows64[:, None] * D + cols[None, :]
        # Sweep 1 (sources and douts from DRAM): delta_j = dout_j . out_j - dlse_j with out_j
        # recomputed in fp32 from the sources and the saved lse. Not from a saved output: rounded to
        # bf16, dout.out carries its error into every ds_ji, and d query sums it over all tokens
        # (measured: 2.6% vs 2e-6 relative error of d queries).
        # Every tile load in the unrolled loops below is predicated on `gate >= -inf`, gate being the
        # latest per-token result (always true, opaque to the compiler), so the loops cannot hoist
        # the N tile loads to their top (see _online_mix): only a few tiles are live at a time.
        gate = tl.zeros([BLOCK_T], tl.float32)
        dout0 = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
        if HEAD_NORMED:  # query 0: d out_0 from its norm's backward on the recomputed fp32 out_0; kept in registers
            q0 = _query_row(qg_ptr, qg_ptr, 0, cols, cmask, False)
            lse0 = tl.load(lse_ptr + rows64, mask=rmask, other=0.0)
            out0 = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
            for i in tl.static_range(N):
                live = mask & (gate >= float("-inf"))[:, None]
                v = tl.load(srcs[i] + rows64[:, None] * strides[i] + cols[None, :], mask=live, other=0.0)
                v = v.to(tl.float32)
                a = tl.exp(tl.sum(v * q0[None, :], 1) * tl.rsqrt(tl.sum(v * v, 1) / D + eps) - lse0)
                out0 += a[:, None] * v
                gate = a
            dn = tl.load(dn_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            d_mix, d_wo = _rms_norm_backward(out0 * scale, dn, wo, D, out_eps, HAS_WO)
            dwo += d_wo
            dout0 = d_mix * scale
            dlse0 = tl.load(dlse_ptr + rows64, mask=rmask, other=0.0)
            tl.store(delta_ptr + rows64, tl.sum(dout0 * out0, 1) - dlse0, mask=rmask)
        for j in range(J0, S):
            qj = _query_row(qg_ptr, qg_ptr, j * D, cols, cmask, False)
            lse = tl.load(lse_ptr + j * T + rows64, mask=rmask, other=0.0)
            live = mask & (gate >= float("-inf"))[:, None]
            dptr, dstride = _pick(douts, dout_strides, j, S)
            dout = tl.load(dptr + rows64[:, None] * dstride + cols[None, :], mask=live, other=0.0).to(tl.float32)
            dot = tl.zeros([BLOCK_T], tl.float32)
            for i in tl.static_range(N):
                live = mask & (gate >= float("-inf"))[:, None]
                v = tl.load(srcs[i] + rows64[:, None] * strides[i] + cols[None, :], mask=live, other=0.0)
                v = v.to(tl.float32)
                s = tl.sum(v * qj[None, :], 1) * tl.rsqrt(tl.sum(v * v, 1) / D + eps)
                dot += tl.exp(s - lse) * tl.sum(dout * v, 1)
                gate = dot
            dlse = tl.load(dlse_ptr + j * T + rows64, mask=rmask, other=0.0)
            tl.store(delta_ptr + j * T + rows64, dot - dlse, mask=rmask)
        tl.debug_barrier()  # sweep 2 reads delta rows that other threads of this program wrote
        # Sweep 2 (the tile again, from L2): every source's gradient, accumulated over the queries
        #   ds_ji = a_ji (dout_j.v_i - delta_j);  dv_i = sum_j a_ji dout_j + r_i ds_ji (q'_j - n_i s_ji / D)
        for i in tl.static_range(N):
            live = mask & (gate >= float("-inf"))[:, None]
            v = tl.load(srcs[i] + rows64[:, None] * strides[i] + cols[None, :], mask=live, other=0.0).to(tl.float32)
            r = tl.rsqrt(tl.sum(v * v, 1) / D + eps)
            n = v * r[:, None]
            dv = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
            for j in range(S):  # with HEAD_NORMED, query 0's gradient is dout0, from registers
                qj = _query_row(qg_ptr, qg_ptr, j * D, cols, cmask, False)
                lse = tl.load(lse_ptr + j * T + rows64, mask=rmask, other=0.0)
                delta = tl.load(delta_ptr + j * T + rows64, mask=rmask, other=0.0)
                live = mask & (gate >= float("-inf"))[:, None] & (j >= J0)
                dptr, dstride = _pick(douts, dout_strides, j, S)
                dout = tl.load(dptr + rows64[:, None] * dstride + cols[None, :], mask=live, other=0.0).to(tl.float32)
                if HEAD_NORMED:
                    dout = tl.where(j == 0, dout0, dout)
                ddv, ds = _source_grad_step(v, n, r, qj, lse, delta, dout, D)
                gate = ds
                dv += ddv
                if REG_DQ:
                    dq_acc += tl.where(qidx[:, None] == j, tl.sum(ds[:, None] * n, 0)[None, :], 0.0)
                else:
                    _add_to_slab(dqg_ptr, pid.to(tl.int64) * S + j, D, cols, n, ds, cmask)
            _store_source_grad(dsrcs[i], offs, dv, accs[i], acc_strides[i], rows64, cols, mask, (ACC_MASK >> i) & 1)
        tl.debug_barrier()  # the next tile's sweep 1 overwrites delta rows this sweep just read
    if REG_DQ:
        slab = dqg_ptr + (pid.to(tl.int64) * S + qidx[:, None]) * D + cols[None, :]
        tl.store(slab, dq_acc, mask=(qidx[:, None] < S) & cmask[None, :])
    if HAS_WO:
        tl.store(dwo_ptr + pid.to(tl.int64) * D + cols, dwo, mask=cmask)


@triton.jit
def _merge_weights(o, p, l1, q, D, eps):
    """Two-way softmax between (score l1, value o) and (score s_p, value p) -> (a1, ap, r, n, s_p)."""
    r = tl.rsqrt(tl.sum(p * p, 1) / D + eps)
    n = p * r[:, None]
    s_p = tl.sum(n * q[None, :], 1)
    mx = tl.maximum(l1, s_p)
    lse = mx + tl.log(tl.exp(l1 - mx) + tl.exp(s_p - mx))
    return tl.exp(l1 - lse), tl.exp(s_p - lse), r, n, s_p


@triton.jit
def _phase2_fwd_kernel(
    o_ptr, o_stride,  # phase-1 output [T, D] rows
    lse_ptr,  # [T] fp32
    p_ptr, p_stride,  # partial block [T, D] rows (HAS_P); with ADD_DELTA the partial BEFORE the update
    d_ptr, d_stride,  # [T, D] rows: the update, the sublayer output added to the partial (ADD_DELTA)
    pn_ptr,  # [T, D] contiguous: the updated partial p + d, in p's dtype (ADD_DELTA)
    q_ptr, w_ptr,  # query [D], gain [D] (HAS_W)
    out_ptr,  # [T, D] contiguous (STORE_MIX)
    normed_ptr, wo_ptr,  # [T, D] RMSNorm(out) * wo (NORMED; wo if HAS_WO)
    T, D, eps, scale, out_eps,
    HAS_P: tl.constexpr, ADD_DELTA: tl.constexpr, HAS_W: tl.constexpr, STORE_MIX: tl.constexpr,
    NORMED: tl.constexpr, HAS_WO: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < T
    cmask = cols < D
    mask = rmask[:, None] & cmask[None, :]
    rows64 = rows.to(tl.int64)
    offs = rows64[:, None] * D + cols[None, :]
    o = tl.load(o_ptr + rows64[:, None] * o_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_P:
        p = tl.load(p_ptr + rows64[:, None] * p_stride + cols[None, :], mask=mask, other=0.0)
        if ADD_DELTA:  # the partial block's update, fused: rounded once to p's dtype, as torch's add is
            d = tl.load(d_ptr + rows64[:, None] * d_stride + cols[None, :], mask=mask, other=0.0)
            p = (p.to(tl.float32) + d.to(tl.float32)).to(pn_ptr.dtype.element_ty)
            tl.store(pn_ptr + offs, p, mask=mask)
        p = p.to(tl.float32)
        l1 = tl.load(lse_ptr + rows64, mask=rmask, other=0.0)
        q = _query_row(q_ptr, w_ptr, 0, cols, cmask, HAS_W)
        a1, ap, r, n, s_p = _merge_weights(o, p, l1, q, D, eps)
        o = a1[:, None] * o + ap[:, None] * p
    mix = o * scale  # fp32
    if STORE_MIX:  # off when only the normed form is read (the compile backend's usual case)
        tl.store(out_ptr + offs, mix.to(out_ptr.dtype.element_ty), mask=mask)
    if NORMED:
        _store_rms_normed(normed_ptr, wo_ptr, offs, mix, cols, cmask, mask, D, out_eps, HAS_WO)


@triton.jit
def _phase2_bwd_kernel(
    dy_ptr,  # [T, D] contiguous: gradient of the mixture (HAS_DY; none when the mix was not returned)
    o_ptr, o_stride, lse_ptr, p_ptr, p_stride, q_ptr, w_ptr,  # as in the forward
    dn_ptr, wo_ptr,  # [T, D] gradient of the normed output, out gain [D] (NORMED / HAS_WO)
    do_ptr, dlse_ptr, dp_ptr,  # [T, D], [T] fp32, [T, D] contiguous (dp: HAS_P)
    gp_ptr,  # [T, D] contiguous: the gradient the partial receives from its other readers, added to dp (HAS_GP)
    dqg_ptr,  # [programs, D] fp32
    dwo_ptr,  # [programs, D] fp32 partial of d wo (HAS_WO)
    T, D, eps, scale, out_eps, num_tiles,
    HAS_P: tl.constexpr, HAS_GP: tl.constexpr, HAS_W: tl.constexpr, HAS_DY: tl.constexpr, NORMED: tl.constexpr,
    HAS_WO: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    q = _query_row(q_ptr, w_ptr, 0, cols, cmask, HAS_W)
    dqg = tl.zeros([BLOCK_D], tl.float32)
    dwo = tl.zeros([BLOCK_D], tl.float32)
    wo = q  # a placeholder row unless HAS_WO
    if HAS_WO:
        wo = tl.load(wo_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    for t in range(pid, num_tiles, nprog):
        rows = t * BLOCK_T + tl.arange(0, BLOCK_T)
        rmask = rows < T
        mask = rmask[:, None] & cmask[None, :]
        rows64 = rows.to(tl.int64)
        offs = rows64[:, None] * D + cols[None, :]
        if HAS_DY:
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        else:
            dy = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
        o = tl.load(o_ptr + rows64[:, None] * o_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_P:
            p = tl.load(p_ptr + rows64[:, None] * p_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            l1 = tl.load(lse_ptr + rows64, mask=rmask, other=0.0)
            a1, ap, r, n, s_p = _merge_weights(o, p, l1, q, D, eps)
        if NORMED:  # fold RMSNorm(mix) * wo's backward into dy, from the recomputed fp32 mixture
            if HAS_P:
                mix = (a1[:, None] * o + ap[:, None] * p) * scale
            else:
                mix = o * scale
            dn = tl.load(dn_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            d_mix, d_wo = _rms_norm_backward(mix, dn, wo, D, out_eps, HAS_WO)
            dy += d_mix
            dwo += d_wo
        if HAS_P:
            da1 = scale * tl.sum(dy * o, 1)
            dap = scale * tl.sum(dy * p, 1)
            # a1 (da1 - abar) with abar = a1 da1 + ap dap and a1 + ap = 1, written without the
            # cancellation (da1 ~ 1e2, ap ~ 1e-4 lost 4 digits of d lse in the subtracted form)
            dlse = a1 * ap * (da1 - dap)
            ds = -dlse  # = ap (dap - abar)
            tl.store(dlse_ptr + rows64, dlse, mask=rmask)
            tl.store(do_ptr + offs, ((scale * a1)[:, None] * dy).to(do_ptr.dtype.element_ty), mask=mask)
            dp = (scale * ap)[:, None] * dy + (r * ds)[:, None] * (q[None, :] - n * (s_p / D)[:, None])
            if HAS_GP:  # fused partial update: the partial's whole gradient, written once
                dp += tl.load(gp_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(dp_ptr + offs, dp.to(dp_ptr.dtype.element_ty), mask=mask)
            dqg += tl.sum(ds[:, None] * n, 0)
        else:  # mix = scale * o: the lse and the query do not matter
            tl.store(dlse_ptr + rows64, tl.zeros([BLOCK_T], tl.float32), mask=rmask)
            tl.store(do_ptr + offs, (scale * dy).to(do_ptr.dtype.element_ty), mask=mask)
    prow = pid.to(tl.int64) * D
    tl.store(dqg_ptr + prow + cols, dqg, mask=cmask)
    if HAS_WO:
        tl.store(dwo_ptr + prow + cols, dwo, mask=cmask)


# ---- launch wrappers ----------------------------------------------------------------------------


def _query_grads(d_qg: Tensor, query: Tensor, norm_weight: Optional[Tensor]):
    """d(q * g) -> (d query, d g or None), in their dtypes. Works row-wise for [S, D] too."""
    gq = d_qg * norm_weight.float() if norm_weight is not None else d_qg
    gw = (d_qg * query.float()).to(norm_weight.dtype) if norm_weight is not None else None
    return gq.to(query.dtype), gw


# The phase-1 backward keeps d q' of every query in registers when that costs at most this many fp32
# registers per thread (BLOCK_S x BLOCK_D over the program's threads): 32 at hidden 2048 with 4 queries
# on 8 warps. Wider accumulators spill (measured with kernel_resources.py); they fall back to the slab.
REGISTER_DQ_ELEMENTS = 32


class HeadNorm(NamedTuple):
    """Query 0's merge fused into phase 1: ``RMSNorm(scale * out_0) * weight`` (weight may be None)."""

    scale: float
    weight: Optional[Tensor]
    eps: float


class BlockEnd(NamedTuple):
    """The previous block's last add, done by phase 1: ``out = partial + delta`` is its last source."""

    partial: Tensor
    delta: Tensor
    out: Tensor  # [..., D] in the partial's dtype (the sources'), written by the kernel


def new_block_end(partial: Tensor, delta: Tensor, like: Tensor, what: str) -> BlockEnd:
    check_partial_update(like, partial, delta, what)
    return BlockEnd(partial, delta, L.empty(partial.shape, partial.dtype, partial.device))


def phase1_fwd(sources: Sequence[Tensor], queries: Tensor, norm_weights: Optional[Tensor], eps: float,
               head: Optional[HeadNorm] = None, block_end: Optional[BlockEnd] = None):
    """(outs: S tensors [..., D] in the sources' dtype, one per query; lse [S, ...] fp32). With ``head``,
    outs[0] is query 0's normed merge instead (out_0 itself is not written). With ``block_end``, the
    kernel writes ``block_end.out`` and reads it as the last source, after ``sources``."""
    what = "attn_res_phase1" + ("_normed" if head else "")
    if block_end is not None:
        sources = [*sources, block_end.out]
    rows, strides, T, D = _prepare(sources, queries[0], what, queries, norm_weights, head.weight if head else None,
                                   *(block_end or ()))
    if norm_weights is not None and norm_weights.shape != queries.shape:
        raise ValueError(f"{what}: norm weights {tuple(norm_weights.shape)} must match queries {tuple(queries.shape)}")
    S, shape, dev = queries.shape[0], sources[0].shape, rows[0].device
    outs = [L.empty(shape, rows[0].dtype, dev) for _ in range(S)]
    lse = L.empty((S, T), torch.float32, dev)
    if T > 0:
        BT, BD, warps = L.tile(T, D, max_warps=32)  # as the single-query forward (_launch.py)
        q = queries.contiguous()
        w = norm_weights.contiguous() if norm_weights is not None else None
        wo = head.weight.contiguous() if head is not None and head.weight is not None else None
        flat = tuple(o.view(-1, D) for o in outs)
        endp, endd = (L.as_rows(t) for t in block_end[:2]) if block_end is not None else (flat[0], flat[0])
        _phase1_fwd_kernel[(triton.cdiv(T, BT),)](
            tuple(rows), strides, q, w if w is not None else q, flat, lse, flat[0], wo if wo is not None else q,
            endp, endp.stride(0), endd, endd.stride(0),
            T, D, float(eps), float(head.scale if head else 1.0), float(head.eps if head else 0.0),
            N=len(rows), S=S, HAS_W=w is not None, HEAD_NORMED=head is not None, HAS_WO=wo is not None,
            BLOCK_END=block_end is not None, BLOCK_T=BT, BLOCK_D=BD, num_warps=warps,
        )
    return outs, lse.view(S, *shape[:-1])


def phase1_bwd(grad_outs: Sequence[Tensor], grad_lse: Optional[Tensor], sources, queries, norm_weights, eps, lse,
               head: Optional[HeadNorm] = None, accumulate: Optional[Sequence[Optional[Tensor]]] = None):
    """(grad_sources, grad_queries [S, D], grad_norm_weights [S, D] or None, grad head weight or None).
    ``grad_outs``: one gradient per query output (any row strides; with ``head``, grad_outs[0] is the
    gradient of query 0's normed merge); ``lse``: the forward's; ``accumulate[i]``, when given, is
    added to source i's gradient in the kernel."""
    what = "attn_res_phase1" + ("_normed" if head else "") + " backward"
    rows, strides, T, D = _prepare(sources, queries[0], what, *grad_outs, norm_weights, lse,
                                   head.weight if head else None)
    S = queries.shape[0]
    if len(grad_outs) != S:
        raise ValueError(f"{what}: {len(grad_outs)} output gradients for {S} queries")
    dev, dt = rows[0].device, rows[0].dtype
    gsrc = [L.empty(s.shape, dt, dev) for s in sources]
    douts = [L.as_rows(g) for g in grad_outs]
    dlse = grad_lse.reshape(S, T).float().contiguous() if grad_lse is not None else torch.zeros((S, T), device=dev)
    delta = L.empty((S, T), torch.float32, dev)  # per-token scratch of the kernel's two sweeps
    # One token per program on a GPU, 8 warps up to hidden 4096: with 16 warps (a 128-register cap)
    # the two sweeps spilled 8-48 bytes; with 8 there are no spills (the register table in
    # benchmarks/results, from kernel_resources.py). Wider rows get 16 warps.
    one_token = None if L.interpreting() else L.next_pow2(D)
    BT, BD, warps = L.tile(T, D, budget=one_token, max_warps=8 if D <= 4096 else 16)
    num_tiles = triton.cdiv(T, BT)
    P = L.num_programs(num_tiles, dev)
    dqg = torch.zeros((P, S, D), dtype=torch.float32, device=dev)  # accumulated in place: must start at 0
    block_s = L.next_pow2(S)
    reg_dq = block_s * BD <= REGISTER_DQ_ELEMENTS * 32 * warps  # the accumulator's registers per thread
    has_wo = head is not None and head.weight is not None
    dwo = L.empty((P, D), torch.float32, dev) if has_wo else dqg
    if T == 0:
        dwo.zero_()
    else:
        qg = queries.float() * norm_weights.float() if norm_weights is not None else queries.float()
        qg = qg.contiguous()  # q' = q * g [S, D] fp32
        dn = douts[0].contiguous() if head is not None else douts[0]
        accs, acc_strides, acc_mask = L.accumulate_rows(accumulate, gsrc, what)
        _phase1_bwd_kernel[(P,)](
            tuple(rows), strides, tuple(g.view(-1, D) for g in gsrc), accs, acc_strides, qg,
            tuple(douts), tuple(int(d.stride(0)) for d in douts), dlse, lse.reshape(S, T).float().contiguous(),
            delta, dqg, dn, head.weight.contiguous() if has_wo else qg, dwo,
            T, D, float(eps), num_tiles, float(head.scale if head else 1.0), float(head.eps if head else 0.0),
            N=len(rows), S=S, HEAD_NORMED=head is not None, HAS_WO=has_wo, REG_DQ=reg_dq, ACC_MASK=acc_mask,
            BLOCK_S=block_s, BLOCK_T=BT, BLOCK_D=BD, num_warps=warps,
        )
    gq, gw = _query_grads(dqg.sum(0), queries, norm_weights)
    return gsrc, gq, gw, (dwo.sum(0).to(head.weight.dtype) if has_wo else None)


def _phase2_inputs(phase1_out, phase1_lse, partial, query, norm_weight, what, *others):
    L.check_dtype(phase1_out.dtype, what)
    L.check_device([t for t in (phase1_out, phase1_lse, partial, query, norm_weight, *others) if t is not None], what)
    D = phase1_out.shape[-1]
    if query.shape != (D,) or (partial is not None and partial.shape != phase1_out.shape):
        raise ValueError(f"{what}: phase1_out {tuple(phase1_out.shape)}, partial "
                         f"{None if partial is None else tuple(partial.shape)}, query {tuple(query.shape)} disagree")
    o = L.as_rows(phase1_out)
    p = L.as_rows(partial.to(phase1_out.dtype)) if partial is not None else o
    lse = phase1_lse.reshape(-1).float().contiguous()
    return o, p, lse, o.shape[0], D


def _phase2_fwd_launch(phase1_out, phase1_lse, partial, query, norm_weight, eps, scale, out_norm_weight, out_eps, what,
                       store_mix=True, delta=None):
    """Launch ``_phase2_fwd_kernel``: (out or None without ``store_mix``, normed or None, updated partial
    ``partial + delta`` or None without ``delta``), ``[..., D]`` in phase1_out's dtype."""
    o, p, lse, T, D = _phase2_inputs(phase1_out, phase1_lse, partial, query, norm_weight, what, out_norm_weight, delta)
    normed = out_eps is not None
    if not (store_mix or normed):
        raise ValueError(f"{what}: store_mix=False leaves nothing to return without the normed epilogue")
    if delta is not None:
        check_partial_update(phase1_out, partial, delta, what)
    out = L.empty(phase1_out.shape, phase1_out.dtype, phase1_out.device) if store_mix else None
    y = L.empty(phase1_out.shape, phase1_out.dtype, phase1_out.device) if normed else None
    pn = L.empty(phase1_out.shape, phase1_out.dtype, phase1_out.device) if delta is not None else None
    if T > 0:
        BT, BD, warps = L.tile(T, D)
        q = query.contiguous()
        w = norm_weight.contiguous() if norm_weight is not None else None
        wo = out_norm_weight.contiguous() if normed and out_norm_weight is not None else None
        # Absent optional buffers get a placeholder pointer: their constexpr flag compiles every access out.
        out_rows = (out if out is not None else y).view(-1, D)
        d = L.as_rows(delta) if delta is not None else o
        _phase2_fwd_kernel[(triton.cdiv(T, BT),)](
            o, o.stride(0), lse, p, p.stride(0), d, d.stride(0), pn.view(-1, D) if pn is not None else out_rows,
            q, w if w is not None else q, out_rows,
            y.view(-1, D) if y is not None else out_rows, wo if wo is not None else q,
            T, D, float(eps), float(scale), float(out_eps if normed else 0.0),
            HAS_P=partial is not None, ADD_DELTA=delta is not None, HAS_W=w is not None, STORE_MIX=store_mix,
            NORMED=normed, HAS_WO=wo is not None, BLOCK_T=BT, BLOCK_D=BD, num_warps=warps,
        )
    return out, y, pn


def phase2_fwd(phase1_out, phase1_lse, partial, query, norm_weight, eps, scale):
    """``[..., D]`` in phase1_out's dtype."""
    return _phase2_fwd_launch(
        phase1_out, phase1_lse, partial, query, norm_weight, eps, scale, None, None, "attn_res_phase2"
    )[0]


def phase2_normed_fwd(phase1_out, phase1_lse, partial, query, norm_weight, eps, scale, out_norm_weight, out_eps,
                      return_mix=True):
    """(mix, RMSNorm(mix) * out_norm_weight), both ``[..., D]`` in phase1_out's dtype; without
    ``return_mix`` the mix is not written and comes back as None."""
    return _phase2_fwd_launch(
        phase1_out, phase1_lse, partial, query, norm_weight, eps, scale, out_norm_weight, out_eps,
        "attn_res_phase2_normed", store_mix=return_mix,
    )[:2]


def phase2_add_normed_fwd(phase1_out, phase1_lse, partial, delta, query, norm_weight, eps, scale, out_norm_weight,
                          out_eps):
    """(partial + delta, RMSNorm(phase 2 with partial + delta) * out_norm_weight), both ``[..., D]``:
    the partial block's update and the merge in one pass (the mix is not written)."""
    _, y, pn = _phase2_fwd_launch(
        phase1_out, phase1_lse, partial, query, norm_weight, eps, scale, out_norm_weight, out_eps,
        "attn_res_phase2_add_normed", store_mix=False, delta=delta,
    )
    return pn, y


def _phase2_bwd_launch(grad_out, grad_normed, phase1_out, phase1_lse, partial, query, norm_weight, eps, scale,
                       out_norm_weight, out_eps, what, grad_partial=None):
    """Launch ``_phase2_bwd_kernel``: (d phase1_out, d lse, d partial or None, d query, d gain or None,
    d out gain or None). ``grad_out`` None: no gradient reaches the mixture (mix not returned).
    ``grad_partial``: a gradient the partial receives from elsewhere, added into d partial."""
    normed = out_eps is not None
    o, p, lse, T, D = _phase2_inputs(phase1_out, phase1_lse, partial, query, norm_weight, what,
                                     grad_out, grad_normed if normed else None, out_norm_weight, grad_partial)
    dev = o.device
    d_o = L.empty(phase1_out.shape, phase1_out.dtype, dev)
    d_lse = L.empty((T,), torch.float32, dev)
    d_p = L.empty(partial.shape, partial.dtype, dev) if partial is not None else None
    BT, BD, warps = L.tile(T, D)
    num_tiles = triton.cdiv(T, BT)
    P = L.num_programs(num_tiles, dev)
    dqg = L.empty((P, D), torch.float32, dev)
    has_wo = normed and out_norm_weight is not None
    dwo = L.empty((P, D), torch.float32, dev) if has_wo else dqg
    if T == 0:
        dqg.zero_(), dwo.zero_()
    else:
        q = query.contiguous()
        w = norm_weight.contiguous() if norm_weight is not None else None
        dn = L.as_rows(grad_normed).contiguous() if normed else None
        dy = L.as_rows(grad_out).contiguous() if grad_out is not None else None
        if dy is None and dn is None:
            raise ValueError(f"{what}: neither a gradient of the mixture nor of its normed form")
        wo = out_norm_weight.contiguous() if has_wo else q
        gp = L.as_rows(grad_partial).contiguous() if grad_partial is not None else None
        if gp is not None and (partial is None or grad_partial.shape != partial.shape):
            raise ValueError(f"{what}: a partial gradient of shape {tuple(grad_partial.shape)} for the partial "
                             f"{None if partial is None else tuple(partial.shape)}")
        _phase2_bwd_kernel[(P,)](
            dy if dy is not None else dn, o, o.stride(0), lse, p, p.stride(0), q, w if w is not None else q,
            dn if dn is not None else dy, wo,
            d_o.view(-1, D), d_lse, d_p.view(-1, D) if d_p is not None else d_o.view(-1, D),
            gp if gp is not None else d_o.view(-1, D), dqg, dwo,
            T, D, float(eps), float(scale), float(out_eps if normed else 0.0), num_tiles,
            HAS_P=partial is not None, HAS_GP=gp is not None, HAS_W=w is not None, HAS_DY=dy is not None,
            NORMED=normed, HAS_WO=has_wo,
            BLOCK_T=BT, BLOCK_D=BD, num_warps=warps,
        )
    gq, gw = _query_grads(dqg.sum(0), query, norm_weight)
    gwo = dwo.sum(0).to(out_norm_weight.dtype) if has_wo else None
    return d_o, d_lse.view(phase1_lse.shape).to(phase1_lse.dtype), d_p, gq, gw, gwo


def phase2_bwd(grad_out, phase1_out, phase1_lse, partial, query, norm_weight, eps, scale):
    """(grad_phase1_out, grad_phase1_lse, grad_partial or None, grad_query, grad_norm_weight or None)."""
    if partial is None:  # out = scale * phase1_out: a plain scaling, no kernel needed
        L.check_device([grad_out, phase1_out], "attn_res_phase2 backward")
        gw = torch.zeros_like(norm_weight) if norm_weight is not None else None
        return ((grad_out.float() * scale).to(phase1_out.dtype), torch.zeros_like(phase1_lse), None,
                torch.zeros_like(query), gw)
    return _phase2_bwd_launch(grad_out, None, phase1_out, phase1_lse, partial, query, norm_weight, eps, scale,
                              None, None, "attn_res_phase2 backward")[:5]


def phase2_normed_bwd(grad_mix, grad_normed, phase1_out, phase1_lse, partial, query, norm_weight, eps, scale,
                      out_norm_weight, out_eps, grad_partial=None):
    """As ``attn_res_phase2_normed_backward_reference``: (d phase1_out, d lse, d partial or None,
    d query, d gain or None, d out gain or None). Without a partial the kernel still runs: the norm's
    backward needs the mixture. ``grad_partial``: the partial's gradient from its other readers, added
    to d partial in the kernel."""
    return _phase2_bwd_launch(grad_mix, grad_normed, phase1_out, phase1_lse, partial, query, norm_weight, eps,
                              scale, out_norm_weight, out_eps, "attn_res_phase2_normed backward", grad_partial)


def phase2_add_normed_bwd(grad_partial, grad_normed, phase1_out, phase1_lse, partial, query, norm_weight, eps, scale,
                          out_norm_weight, out_eps):
    """As ``attn_res_phase2_add_normed_backward_reference``: (d phase1_out, d lse, d partial — the gradient
    of both the old partial and the delta —, d query, d gain or None, d out gain or None). ``partial``
    is the UPDATED partial (the forward's first output); ``grad_partial`` its gradient from its other
    readers, or None."""
    return _phase2_bwd_launch(None, grad_normed, phase1_out, phase1_lse, partial, query, norm_weight, eps, scale,
                              out_norm_weight, out_eps, "attn_res_phase2_add_normed backward", grad_partial=grad_partial)
