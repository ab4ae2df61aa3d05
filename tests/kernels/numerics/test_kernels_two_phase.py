"""Two-phase (phase 1 multi-query, phase 2 merge, phase 2 + RMSNorm, phase 2 + the partial's update +
RMSNorm) and normed kernels, interpreted or on CUDA (conftest.py): forward and every gradient against the
float64 references (but the single-pass composition, forward only, and a one-source aggregation's query
and gain gradients, which are zero up to cancellation noise), with a launch spy on every kernel each test
expects to run, so a number that came from a reference path fails. Where no kernel runs by design (phase 2
without a partial, backward: a plain scaling), none is spied."""
from __future__ import annotations

import pytest
import torch

from kernel_tiers import DEVICE, assert_close_tier, cpu_randn
from residual_rewriter.kernels.attn_res import MAX_SOURCES, attn_res_normed_reference, attn_res_reference
from residual_rewriter.kernels.attn_res import _launch, dispatch, fused, two_phase
from residual_rewriter.kernels.attn_res.reference import (
    attn_res_phase1_normed_reference,
    attn_res_phase1_reference,
    attn_res_phase2_add_normed_reference,
    attn_res_phase2_normed_reference,
    attn_res_phase2_reference,
)
from residual_rewriter.kernels.attn_res.reference_grads import (
    attn_res_normed_backward_reference,
    attn_res_phase1_backward_reference,
    attn_res_phase1_normed_backward_reference,
    attn_res_phase2_add_normed_backward_reference,
    attn_res_phase2_backward_reference,
    attn_res_phase2_normed_backward_reference,
)
from spies import spy_on

F64 = torch.float64


def _rand(*shape, dtype=torch.float32, seed=0, shift=0.5):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return (cpu_randn(*shape, generator=g) * 2 + shift).to(dtype)


def _param_tier(dtype):
    # query/gain gradients are fp32 parameters; their error follows the inputs' precision
    return dtype


@pytest.mark.parametrize(
    "shape,m,S,dtype",
    [
        ((7, 96), 3, 4, torch.float32),
        ((1, 200), 1, 2, torch.float32),
        ((2, 5, 96), MAX_SOURCES, 3, torch.float32),
        ((33, 96), 4, 3, torch.bfloat16),
        ((7, 200), 2, 2, torch.float16),
    ],
)
@pytest.mark.parametrize("with_weight", [True, False])
def test_phase1(monkeypatch, shape, m, S, dtype, with_weight, kernels=("_phase1_fwd_kernel", "_phase1_bwd_kernel")):
    sources = [_rand(*shape, dtype=dtype, seed=i) for i in range(m)]
    D = shape[-1]
    Q = _rand(S, D, seed=100, shift=0.0) * 0.25
    G = (1 + 0.3 * _rand(S, D, seed=101, shift=0.0)) if with_weight else None
    with spy_on(monkeypatch, two_phase, kernels[0]):
        outs, lse = dispatch.phase1_cuda(sources, Q, G, 1e-6)
    s64, Q64, G64 = [s.to(F64) for s in sources], Q.to(F64), (G.to(F64) if G is not None else None)
    ros, rl = attn_res_phase1_reference(s64, Q64, G64, 1e-6)
    assert len(outs) == S and lse.dtype == torch.float32
    for j, (o, ro) in enumerate(zip(outs, ros)):
        assert o.dtype == dtype
        assert_close_tier(o, ro, dtype, "out", f"phase1 out {j}")
    assert_close_tier(lse, rl, torch.float32, "out", "phase1 lse")
    # one gradient per query, as the merges hand them back; every other one non-contiguous
    douts = [_rand(*shape[:-1], D + 8 * (j % 2), dtype=dtype, seed=7 + j, shift=0.0)[..., :D] for j in range(S)]
    dlse = _rand(*lse.shape, seed=8, shift=0.0)
    with spy_on(monkeypatch, two_phase, kernels[1]):
        gs, gq, gw = dispatch.phase1_backward_cuda(douts, dlse, sources, Q, G, 1e-6, lse)
    rgs, rgq, rgw = attn_res_phase1_backward_reference([d.to(F64) for d in douts], dlse.to(F64), s64, Q64, G64, 1e-6)
    for i, (a, b) in enumerate(zip(gs, rgs)):
        assert a.dtype == dtype
        assert_close_tier(a, b, dtype, "grad", f"grad source {i}")
    assert_close_tier(gq, rgq, _param_tier(dtype), "grad", "grad queries")
    if with_weight:
        assert_close_tier(gw, rgw, _param_tier(dtype), "grad", "grad norm_weights")
    else:
        assert gw is None


@pytest.mark.parametrize(
    "shape,m,S,dtype",
    [((7, 96), 3, 4, torch.float32), ((1, 200), 1, 1, torch.float32), ((33, 96), 4, 3, torch.bfloat16),
     ((2, 5, 96), 2, 2, torch.float16)],
)
@pytest.mark.parametrize("with_weights", [True, False])
def test_phase1_normed(monkeypatch, shape, m, S, dtype, with_weights, chunks=False):
    """Query 0's merge fused into phase 1 (its normed form written, out_0 not), forward and every
    gradient, the other queries' outputs too; gradients of the later queries non-contiguous."""
    sources = [_rand(*shape, dtype=dtype, seed=i) for i in range(m)]
    D = shape[-1]
    Q = _rand(S, D, seed=100, shift=0.0) * 0.25
    G = (1 + 0.3 * _rand(S, D, seed=101, shift=0.0)) if with_weights else None
    wo = (1 + 0.3 * _rand(D, seed=102, shift=0.0)) if with_weights else None
    scale = float(m + 1)
    kernels = ("_phase1_fwd_kernel", "_phase1_bwd_kernel")
    with spy_on(monkeypatch, two_phase, kernels[0]) as spy:
        normed0, outs, lse, _ = dispatch.phase1_normed_cuda(sources, Q, G, 1e-6, scale, wo, 1e-5)
    assert chunks or all(c["HEAD_NORMED"] for c in spy[kernels[0]].constexprs)
    s64, Q64 = [s.to(F64) for s in sources], Q.to(F64)
    G64, wo64 = (G.to(F64), wo.to(F64)) if with_weights else (None, None)
    rn, ros, rl = attn_res_phase1_normed_reference(s64, Q64, G64, 1e-6, scale, wo64, 1e-5)
    assert normed0.dtype == dtype and len(outs) == S - 1
    assert_close_tier(normed0, rn, dtype, "out", "normed_0")
    for j, (o, ro) in enumerate(zip(outs, ros)):
        assert_close_tier(o, ro, dtype, "out", f"phase1 out {j + 1}")
    assert_close_tier(lse, rl, torch.float32, "out", "phase1 lse")
    dn = _rand(*shape, dtype=dtype, seed=6, shift=0.0)
    douts = [_rand(*shape[:-1], D + 8, dtype=dtype, seed=7 + j, shift=0.0)[..., :D] for j in range(S - 1)]
    dlse = _rand(*lse.shape, seed=8, shift=0.0)
    with spy_on(monkeypatch, two_phase, kernels[1]):
        gs, gq, gw, gwo = dispatch.phase1_normed_backward_cuda(dn, douts, dlse, sources, Q, G, 1e-6, scale, wo, 1e-5,
                                                                lse)
    rgs, rgq, rgw, rgwo = attn_res_phase1_normed_backward_reference(
        dn.to(F64), [d.to(F64) for d in douts], dlse.to(F64), s64, Q64, G64, 1e-6, scale, wo64, 1e-5)
    for i, (a, b) in enumerate(zip(gs, rgs)):
        assert a.dtype == dtype
        assert_close_tier(a, b, dtype, "grad", f"grad source {i}")
    if m > 1:  # one source: the query gradients are zero up to cancellation noise
        assert_close_tier(gq, rgq, _param_tier(dtype), "grad", "grad queries")
    if with_weights:
        if m > 1:
            assert_close_tier(gw, rgw, _param_tier(dtype), "grad", "grad norm_weights")
        assert_close_tier(gwo, rgwo, _param_tier(dtype), "grad", "grad out_norm_weight")
    else:
        assert gw is None and gwo is None


@pytest.mark.parametrize("shape,dtype,delta_dtype", [
    ((7, 96), torch.float32, torch.float32), ((33, 96), torch.bfloat16, torch.bfloat16),
    ((2, 5, 200), torch.float32, torch.bfloat16),  # an fp32 stream, a bf16 branch (autocast)
])
@pytest.mark.parametrize("chunks", [False, True])
def test_phase1_normed_with_the_block_end(monkeypatch, shape, dtype, delta_dtype, chunks):
    """The previous block's last add done by phase 1 (fuse_block_end): its sum equals torch's add bit
    for bit and is the last source of every output; the delta non-contiguous. ``chunks``: more sources
    than one launch takes (torch adds, the chunked path mixes)."""
    if chunks:
        monkeypatch.setattr(_launch, "MAX_SOURCES", 2)
    sources = [_rand(*shape, dtype=dtype, seed=i) for i in range(2)]
    D = shape[-1]
    p = _rand(*shape, dtype=dtype, seed=5)
    f = _rand(*shape[:-1], D + 8, dtype=delta_dtype, seed=6)[..., :D]
    Q, G, wo = _rand(3, D, seed=100, shift=0.0) * 0.25, 1 + 0.3 * _rand(3, D, seed=101), 1 + 0.3 * _rand(D, seed=102)
    with spy_on(monkeypatch, two_phase, "_phase1_fwd_kernel") as spy:
        normed0, outs, lse, end = dispatch.phase1_normed_cuda(sources, Q, G, 1e-6, 3.0, wo, 1e-5, block_end=(p, f))
    assert chunks or all(c["BLOCK_END"] for c in spy["_phase1_fwd_kernel"].constexprs)
    assert end.dtype == dtype
    if dtype == torch.bfloat16 and DEVICE != "cuda" and not chunks:  # the interpreter truncates (kernel_tiers.py)
        torch.testing.assert_close(end, torch.add(p, f), atol=0, rtol=2**-7)
    else:
        assert torch.equal(end, torch.add(p, f))
    s64 = [s.to(F64) for s in sources] + [end.to(F64)]  # the outputs are those of the sum as written
    rn, ros, rl = attn_res_phase1_normed_reference(s64, Q.to(F64), G.to(F64), 1e-6, 3.0, wo.to(F64), 1e-5)
    assert_close_tier(normed0, rn, dtype, "out", "normed_0")
    for j, (o, ro) in enumerate(zip(outs, ros)):
        assert_close_tier(o, ro, dtype, "out", f"phase1 out {j + 1}")
    assert_close_tier(lse, rl, torch.float32, "out", "phase1 lse")


def test_phase1_normed_in_chunks(monkeypatch):
    monkeypatch.setattr(_launch, "MAX_SOURCES", 2)
    test_phase1_normed(monkeypatch, (7, 96), 5, 3, torch.float32, True, chunks=True)


@pytest.mark.parametrize("reg_dq", [True, False])
def test_phase1_query_gradient_in_registers_or_slab(monkeypatch, reg_dq):
    """The phase-1 backward's two ways of reducing d q' over tokens: a register accumulator written
    once per program, or the per-program fp32 slab (when the accumulator would not fit)."""
    monkeypatch.setattr(two_phase, "REGISTER_DQ_ELEMENTS", 32 if reg_dq else 0)
    seen = []
    real = two_phase._phase1_bwd_kernel

    class Record:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                seen.append(kw["REG_DQ"])
                return real[grid](*args, **kw)
            return launch

    monkeypatch.setattr(two_phase, "_phase1_bwd_kernel", Record())
    test_phase1(monkeypatch, (7, 96), 3, 4, torch.float32, True, kernels=("_phase1_fwd_kernel", "_phase1_bwd_kernel"))
    test_phase1_normed(monkeypatch, (33, 96), 4, 3, torch.bfloat16, True)
    assert seen == [reg_dq, reg_dq]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_phase1_in_chunks(monkeypatch, dtype):
    """5 sources with a launch limit of 2: three chunks merged by log-sum-exp (chunked.py), with an
    lse gradient flowing through the merge."""
    monkeypatch.setattr(_launch, "MAX_SOURCES", 2)
    test_phase1(monkeypatch, (7, 96), 5, 3, dtype, True)


@pytest.mark.parametrize("with_weights", [True, False])
def test_normed_in_chunks(monkeypatch, with_weights):
    monkeypatch.setattr(_launch, "MAX_SOURCES", 2)
    _check_normed(monkeypatch, (7, 200), 5, torch.float32, with_weights, bwd_kernel=(two_phase, "_phase1_bwd_kernel"),
                  fwd_kernel=(two_phase, "_phase1_fwd_kernel"))


def test_phase1_non_contiguous_sources(monkeypatch):
    sources = [_rand(14, 100, seed=i)[::2, :96] for i in range(3)]  # token stride 200, row-padded
    Q = _rand(2, 96, seed=3, shift=0.0) * 0.3
    with spy_on(monkeypatch, two_phase, "_phase1_fwd_kernel"):
        outs, lse = two_phase.phase1_fwd(sources, Q, None, 1e-6)
    s64 = [s.to(F64) for s in sources]
    ros, rl = attn_res_phase1_reference(s64, Q.to(F64), None, 1e-6)
    for o, ro in zip(outs, ros):
        assert_close_tier(o, ro, torch.float32)
    assert_close_tier(lse, rl, torch.float32)
    douts = list(_rand(2, 7, 104, seed=7, shift=0.0)[..., :96])  # non-contiguous upstream gradients too
    dlse = _rand(2, 14, seed=8, shift=0.0)[:, ::2]
    with spy_on(monkeypatch, two_phase, "_phase1_bwd_kernel"):
        gs, gq, gw = dispatch.phase1_backward_cuda(douts, dlse, sources, Q, None, 1e-6, lse)
    rgs, rgq, _ = attn_res_phase1_backward_reference([d.to(F64) for d in douts], dlse.to(F64), s64, Q.to(F64), None,
                                                     1e-6)
    for i, (a, b) in enumerate(zip(gs, rgs)):
        assert_close_tier(a, b, torch.float32, "grad", f"grad source {i}")
    assert_close_tier(gq, rgq, torch.float32, "grad", "grad queries")
    assert gw is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_partial", [True, False])
@pytest.mark.parametrize("with_weight", [True, False])
def test_phase2(monkeypatch, dtype, with_partial, with_weight):
    shape = (3, 11, 200)
    o1 = _rand(*shape, dtype=dtype, seed=1)
    l1 = _rand(3, 11, seed=2)
    partial = _rand(*shape, dtype=dtype, seed=3) if with_partial else None
    q = _rand(200, seed=4, shift=0.0) * 0.3
    g = (1 + 0.3 * _rand(200, seed=5, shift=0.0)) if with_weight else None
    with spy_on(monkeypatch, two_phase, "_phase2_fwd_kernel"):
        y = dispatch.phase2_cuda(o1, l1, partial, q, g, 1e-6, 4.0)
    p64 = partial.to(F64) if partial is not None else None
    g64 = g.to(F64) if g is not None else None
    yr = attn_res_phase2_reference(o1.to(F64), l1.to(F64), p64, q.to(F64), g64, 1e-6, 4.0)
    assert y.dtype == dtype
    assert_close_tier(y, yr, dtype, "out", "phase2 out")
    dy = _rand(*shape, dtype=dtype, seed=9, shift=0.0)
    names = ("_phase2_bwd_kernel",) if with_partial else ()
    with spy_on(monkeypatch, two_phase, *names):
        got = dispatch.phase2_backward_cuda(dy, o1, l1, partial, q, g, 1e-6, 4.0)
    ref = attn_res_phase2_backward_reference(dy.to(F64), o1.to(F64), l1.to(F64), p64, q.to(F64), g64, 1e-6, 4.0)
    for name, a, b in zip(("d out", "d lse", "d partial", "d query", "d gain"), got, ref):
        if b is None:
            assert a is None, name
            continue
        assert_close_tier(a, b, dtype, "grad", name)


def test_two_phase_composes_to_the_single_pass(monkeypatch):
    """phase 1 over the completed blocks + phase 2 with the partial == one aggregation over all."""
    blocks = [_rand(9, 96, seed=i) for i in range(4)]
    partial = _rand(9, 96, seed=10)
    Q = _rand(3, 96, seed=11, shift=0.0) * 0.3
    with spy_on(monkeypatch, two_phase, "_phase1_fwd_kernel"):
        out, lse = two_phase.phase1_fwd(blocks, Q, None, 1e-6)
    for j in range(3):
        with spy_on(monkeypatch, two_phase, "_phase2_fwd_kernel"):
            y = two_phase.phase2_fwd(out[j], lse[j], partial, Q[j], None, 1e-6, 5.0)
        ref = attn_res_reference([b.to(F64) for b in blocks + [partial]], Q[j].to(F64), None, 1e-6, 5.0)
        assert_close_tier(y, ref, torch.float32)


@pytest.mark.parametrize(
    "shape,n,dtype", [((7, 200), 3, torch.float32), ((1, 96), 1, torch.float32), ((33, 96), 4, torch.bfloat16)]
)
@pytest.mark.parametrize("with_weights", [True, False])
def test_normed(monkeypatch, shape, n, dtype, with_weights):
    _check_normed(monkeypatch, shape, n, dtype, with_weights, bwd_kernel=(fused, "_bwd_kernel"))


def _check_normed(monkeypatch, shape, n, dtype, with_weights, bwd_kernel, fwd_kernel=(fused, "_fwd_kernel")):
    sources = [_rand(*shape, dtype=dtype, seed=i) for i in range(n)]
    D = shape[-1]
    q = _rand(D, seed=20, shift=0.0) * 0.3
    w = (1 + 0.3 * _rand(D, seed=21, shift=0.0)) if with_weights else None
    wo = (1 + 0.3 * _rand(D, seed=22, shift=0.0)) if with_weights else None
    with spy_on(monkeypatch, *fwd_kernel):
        mix, normed = dispatch.normed_cuda(sources, q, w, 1e-6, float(n), wo, 1e-5)
    s64 = [s.to(F64) for s in sources]
    w64, wo64 = (w.to(F64), wo.to(F64)) if with_weights else (None, None)
    rmix, rnormed = attn_res_normed_reference(s64, q.to(F64), w64, 1e-6, float(n), wo64, 1e-5)
    assert_close_tier(mix, rmix, dtype, "out", "mix")
    assert_close_tier(normed, rnormed, dtype, "out", "normed")
    gm = _rand(*shape, dtype=dtype, seed=30, shift=0.0)
    gn = _rand(*shape, dtype=dtype, seed=31, shift=0.0)
    with spy_on(monkeypatch, *bwd_kernel):
        gs, gq, gw, gwo = dispatch.normed_backward_cuda(gm, gn, sources, q, w, 1e-6, float(n), wo, 1e-5)
    rgs, rgq, rgw, rgwo = attn_res_normed_backward_reference(
        gm.to(F64), gn.to(F64), s64, q.to(F64), w64, 1e-6, float(n), wo64, 1e-5
    )
    for i, (a, b) in enumerate(zip(gs, rgs)):
        assert_close_tier(a, b, dtype, "grad", f"grad source {i}")
    if n > 1:  # one source: the query gradient is exactly zero up to cancellation noise
        assert_close_tier(gq, rgq, dtype, "grad", "grad query")
    if with_weights:
        if n > 1:
            assert_close_tier(gw, rgw, dtype, "grad", "grad norm_weight")
        assert_close_tier(gwo, rgwo, dtype, "grad", "grad out_norm_weight")
    else:
        assert gw is None and gwo is None


@pytest.mark.parametrize(
    "shape,dtype",
    [
        ((1, 96), torch.float32),  # one token
        ((7, 200), torch.float32),  # ragged tokens, D not a power of two
        ((3, 11, 96), torch.float32),  # leading batch dims (33 tokens)
        ((33, 200), torch.bfloat16),
        ((7, 96), torch.float16),
    ],
)
@pytest.mark.parametrize("with_partial", [True, False])
@pytest.mark.parametrize("with_weights", [True, False])
def test_phase2_normed(monkeypatch, shape, dtype, with_partial, with_weights):
    D = shape[-1]
    o1 = _rand(*shape, dtype=dtype, seed=1)
    # lse far above the partial's score (a_p ~ 1e-4 at one token): the kernel must write d lse as
    # a_1 a_p (da_1 - da_p), not a_1 (da_1 - abar), which loses 4 digits to cancellation (the fp32
    # reference, written the subtracted way, is itself 1.2e-4 off here)
    l1 = _rand(*shape[:-1], seed=2)
    partial = _rand(*shape, dtype=dtype, seed=3) if with_partial else None
    q = _rand(D, seed=4, shift=0.0) * 0.3
    g = (1 + 0.3 * _rand(D, seed=5, shift=0.0)) if with_weights else None
    wo = (1 + 0.3 * _rand(D, seed=6, shift=0.0)) if with_weights else None
    with spy_on(monkeypatch, two_phase, "_phase2_fwd_kernel"):
        mix, normed = dispatch.phase2_normed_cuda(o1, l1, partial, q, g, 1e-6, 4.0, wo, 1e-5)
    o64, l64, q64 = o1.to(F64), l1.to(F64), q.to(F64)
    p64, g64, wo64 = (t.to(F64) if t is not None else None for t in (partial, g, wo))
    rmix, rnormed = attn_res_phase2_normed_reference(o64, l64, p64, q64, g64, 1e-6, 4.0, wo64, 1e-5)
    assert mix.dtype == dtype and normed.dtype == dtype and mix.shape == normed.shape == shape
    assert_close_tier(mix, rmix, dtype, "out", "mix")
    assert_close_tier(normed, rnormed, dtype, "out", "normed")
    gm = _rand(*shape, dtype=dtype, seed=30, shift=0.0)
    gn = _rand(*shape, dtype=dtype, seed=31, shift=0.0)
    with spy_on(monkeypatch, two_phase, "_phase2_bwd_kernel") as spies:
        got = dispatch.phase2_normed_backward_cuda(gm, gn, o1, l1, partial, q, g, 1e-6, 4.0, wo, 1e-5)
    assert len(spies["_phase2_bwd_kernel"].grids) == 1  # one launch, with or without a partial
    ref = attn_res_phase2_normed_backward_reference(
        gm.to(F64), gn.to(F64), o64, l64, p64, q64, g64, 1e-6, 4.0, wo64, 1e-5
    )
    names = ("d out", "d lse", "d partial", "d query", "d gain", "d out gain")
    for name, a, b in zip(names, got, ref):
        if b is None:
            assert a is None, name
            continue
        assert_close_tier(a, b, dtype, "grad", name)


def test_phase2_normed_non_contiguous_inputs(monkeypatch):
    """Token-strided phase-1 output (a select of phase 1's [S, ...] result is contiguous, but a
    slice is not) and a row-padded partial: the kernel reads them in place."""
    o1 = _rand(14, 100, seed=1)[::2, :96]
    partial = _rand(7, 104, seed=3)[:, :96]
    l1 = _rand(14, seed=2)[::2]
    q, wo = _rand(96, seed=4, shift=0.0) * 0.3, 1 + 0.3 * _rand(96, seed=6, shift=0.0)
    with spy_on(monkeypatch, two_phase, "_phase2_fwd_kernel"):
        mix, normed = two_phase.phase2_normed_fwd(o1, l1, partial, q, None, 1e-6, 2.0, wo, 1e-6)
    args64 = (o1.to(F64), l1.to(F64), partial.to(F64), q.to(F64), None, 1e-6, 2.0, wo.to(F64), 1e-6)
    rmix, rnormed = attn_res_phase2_normed_reference(*args64)
    assert_close_tier(mix, rmix, torch.float32)
    assert_close_tier(normed, rnormed, torch.float32)
    gm, gn = _rand(14, 100, seed=30, shift=0.0)[::2, :96], _rand(7, 104, seed=31, shift=0.0)[:, :96]
    with spy_on(monkeypatch, two_phase, "_phase2_bwd_kernel"):
        got = two_phase.phase2_normed_bwd(gm, gn, o1, l1, partial, q, None, 1e-6, 2.0, wo, 1e-6)
    ref = attn_res_phase2_normed_backward_reference(gm.to(F64), gn.to(F64), *args64)
    for name, a, b in zip(("d out", "d lse", "d partial", "d query", "d gain", "d out gain"), got, ref):
        assert (a is None) == (b is None), name
        if b is not None:
            assert_close_tier(a, b, torch.float32, "grad", name)


@pytest.mark.parametrize("op", ["normed", "phase2_normed"])
def test_only_the_normed_form_is_read(monkeypatch, op):
    """What the compile backend runs: ``return_mix=False`` stores no mix (the kernel's STORE_MIX is
    off and the mix comes back as None), and the backward gets ``grad_mix=None`` (HAS_DY off, no
    zero tensor read). The normed form and every gradient still match the float64 reference."""
    shape, n = (2, 7, 96), 3
    q, wo = _rand(96, seed=4, shift=0.0) * 0.3, 1 + 0.3 * _rand(96, seed=6, shift=0.0)
    gn = _rand(*shape, seed=9, shift=0.0)
    if op == "normed":
        sources = [_rand(*shape, seed=i) for i in range(n)]
        args = (sources, q, None, 1e-6, float(n), wo, 1e-5)
        fwd, bwd, module, kernels = dispatch.normed_cuda, dispatch.normed_backward_cuda, fused, ("_fwd_kernel", "_bwd_kernel")
        ref_fwd, ref_bwd = attn_res_normed_reference, attn_res_normed_backward_reference
    else:
        args = (_rand(*shape, seed=1), _rand(*shape[:-1], seed=2), _rand(*shape, seed=3), q, None, 1e-6, 3.0, wo, 1e-5)
        fwd, bwd, module = dispatch.phase2_normed_cuda, dispatch.phase2_normed_backward_cuda, two_phase
        kernels = ("_phase2_fwd_kernel", "_phase2_bwd_kernel")
        ref_fwd, ref_bwd = attn_res_phase2_normed_reference, attn_res_phase2_normed_backward_reference
    args64 = tuple([a.to(F64) for a in x] if isinstance(x, list) else x.to(F64) if isinstance(x, torch.Tensor) else x
                   for x in args)
    with spy_on(monkeypatch, module, kernels[0]) as spies:
        mix, normed = fwd(*args, return_mix=False)
    assert mix is None and [c["STORE_MIX"] for c in spies[kernels[0]].constexprs] == [False]
    assert_close_tier(normed, ref_fwd(*args64)[1], torch.float32, "out", "normed")
    with spy_on(monkeypatch, module, kernels[1]) as spies:
        got = bwd(None, gn, *args)
    assert [c["HAS_DY"] for c in spies[kernels[1]].constexprs] == [False]
    ref = ref_bwd(None, gn.to(F64), *args64)
    got, ref = (list(got[0]) + list(got[1:]), list(ref[0]) + list(ref[1:])) if op == "normed" else (got, ref)
    assert len(got) == len(ref)
    for i, (a, b) in enumerate(zip(got, ref)):
        assert (a is None) == (b is None), i
        if b is not None:
            assert_close_tier(a, b, torch.float32, "grad", f"gradient {i}")


@pytest.mark.parametrize(
    "shape,dtype",
    [((1, 96), torch.float32), ((7, 200), torch.float32), ((3, 11, 96), torch.float32), ((33, 200), torch.bfloat16),
     ((7, 96), torch.float16)],
)
@pytest.mark.parametrize("with_grad_partial", [True, False])
def test_phase2_add_normed(monkeypatch, shape, dtype, with_grad_partial):
    """The partial block's update fused into the merge: the updated partial equals torch's add
    bit for bit (the same single rounding), the normed form and every gradient match float64, and the
    partial's gradient from its other readers (``grad_partial``) is summed in the kernel."""
    D = shape[-1]
    o1, l1 = _rand(*shape, dtype=dtype, seed=1), _rand(*shape[:-1], seed=2)
    prev = _rand(*shape, dtype=dtype, seed=3)
    delta = _rand(*shape[:-1], D + 8, dtype=dtype, seed=7)[..., :D]  # a row-padded (non-contiguous) delta
    q, g = _rand(D, seed=4, shift=0.0) * 0.3, 1 + 0.3 * _rand(D, seed=5, shift=0.0)
    wo = 1 + 0.3 * _rand(D, seed=6, shift=0.0)
    with spy_on(monkeypatch, two_phase, "_phase2_fwd_kernel") as spies:
        new, normed = dispatch.phase2_add_normed_cuda(o1, l1, prev, delta, q, g, 1e-6, 4.0, wo, 1e-5)
    flags = spies["_phase2_fwd_kernel"].constexprs
    assert [(c["ADD_DELTA"], c["STORE_MIX"]) for c in flags] == [(True, False)]
    assert new.dtype == normed.dtype == dtype and new.shape == normed.shape == shape
    if dtype == torch.bfloat16 and DEVICE != "cuda":
        # the interpreter casts fp32 -> bf16 by truncation (triton/runtime/interpreter.py passes no
        # rounding mode); compiled kernels round to nearest even as torch does, and must match exactly
        torch.testing.assert_close(new, prev + delta, atol=0, rtol=2**-7)
    else:
        assert torch.equal(new, prev + delta)
    o64, l64, n64, q64, g64, wo64 = (t.to(F64) for t in (o1, l1, new, q, g, wo))
    # reference on the (rounded) updated partial, split as prev=new, delta=0: only the merge is compared
    _, rnormed = attn_res_phase2_add_normed_reference(o64, l64, n64, torch.zeros_like(n64), q64, g64, 1e-6, 4.0, wo64, 1e-5)
    assert_close_tier(normed, rnormed, dtype, "out", "normed")
    gn = _rand(*shape, dtype=dtype, seed=31, shift=0.0)
    gp = _rand(*shape, dtype=dtype, seed=32, shift=0.0) if with_grad_partial else None
    with spy_on(monkeypatch, two_phase, "_phase2_bwd_kernel") as spies:
        got = dispatch.phase2_add_normed_backward_cuda(gp, gn, o1, l1, new, q, g, 1e-6, 4.0, wo, 1e-5)
    assert [c["HAS_GP"] for c in spies["_phase2_bwd_kernel"].constexprs] == [with_grad_partial]
    ref = attn_res_phase2_add_normed_backward_reference(
        gp.to(F64) if gp is not None else None, gn.to(F64), o64, l64, n64, q64, g64, 1e-6, 4.0, wo64, 1e-5
    )
    for name, a, b in zip(("d out", "d lse", "d partial", "d query", "d gain", "d out gain"), got, ref):
        assert_close_tier(a, b, dtype, "grad", name)


def test_phase2_add_normed_with_a_narrower_delta(monkeypatch):
    """Autocast: a bf16 branch output added to the fp32 partial block. The update is fp32 (as torch's
    add promotes it, exactly), the delta's gradient comes back in its own dtype through the op (the
    old partial's gradient, rounded once)."""
    shape, D = (7, 200), 200
    o1, l1, prev = _rand(*shape, seed=1), _rand(shape[0], seed=2), _rand(*shape, seed=3)
    delta = _rand(*shape, dtype=torch.bfloat16, seed=7)
    q, wo = _rand(D, seed=4, shift=0.0) * 0.3, 1 + 0.3 * _rand(D, seed=6, shift=0.0)
    with spy_on(monkeypatch, two_phase, "_phase2_fwd_kernel"):
        new, normed = dispatch.phase2_add_normed_cuda(o1, l1, prev, delta, q, None, 1e-6, 3.0, wo, 1e-5)
    assert new.dtype == torch.float32 and torch.equal(new, prev + delta)
    n64 = new.to(F64)
    _, rnormed = attn_res_phase2_add_normed_reference(
        o1.to(F64), l1.to(F64), n64, torch.zeros_like(n64), q.to(F64), None, 1e-6, 3.0, wo.to(F64), 1e-5)
    assert_close_tier(normed, rnormed, torch.float32, "out", "normed")
    p, d = prev.clone().requires_grad_(True), delta.clone().requires_grad_(True)
    _, normed2 = torch.ops.residual_rewriter.attn_res_phase2_add_normed(o1, l1, p, d, q, None, 1e-6, 3.0, wo, 1e-5)
    normed2.backward(_rand(*shape, seed=31, shift=0.0))
    assert p.grad.dtype == torch.float32 and d.grad.dtype == torch.bfloat16
    assert p.grad.abs().sum() > 0 and torch.equal(d.grad, p.grad.to(torch.bfloat16))
    with pytest.raises(ValueError, match="promotes"):  # a wider delta than the partial cannot be fused
        dispatch.phase2_add_normed_cuda(o1.bfloat16(), l1, prev.bfloat16(), prev, q, None, 1e-6, 3.0, wo, 1e-5)
