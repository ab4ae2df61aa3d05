"""The backward kernels' ``accumulate`` inputs (what ``passes/lowering/fold_grad_sums.py`` gives them):
a source's gradient from its other readers, added in the kernel before the one rounding. Each case
against the float64 reference gradient + the accumulated tensor in float64, with NaN-poisoned outputs
and a launch spy that checks the kernel got the ACC_MASK bits. The accumulated tensors are
non-contiguous and large next to the gradients, so a dropped or misplaced one fails."""
from __future__ import annotations

import pytest
import torch

from kernel_tiers import assert_close_tier, cpu_randn
from residual_rewriter.kernels.attn_res import _launch, dispatch, fused, two_phase
from residual_rewriter.kernels.attn_res.reference import attn_res_phase1_reference
from residual_rewriter.kernels.attn_res.reference_grads import (
    attn_res_normed_backward_reference,
    attn_res_phase1_backward_reference,
    attn_res_phase1_normed_backward_reference,
    attn_res_phase2_normed_backward_reference,
)
from spies import spy_on

F64 = torch.float64


def _rand(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return (cpu_randn(*shape, generator=g) * scale).to(dtype)


def _acc(shape, dtype, seed):
    """A [..., D] gradient to accumulate, non-contiguous (every other column of a wider tensor)."""
    return _rand(*shape[:-1], 2 * shape[-1], dtype=dtype, seed=seed, scale=3.0)[..., ::2]


def _check_sources(got, ref64, accumulate, dtype):
    for i, (g, r, a) in enumerate(zip(got, ref64, accumulate)):
        assert g.dtype == dtype
        want = r + a.to(F64) if a is not None else r
        assert_close_tier(g, want, dtype, "grad", f"grad source {i}" + (" + accumulated" if a is not None else ""))


def _spied_mask(spy) -> int:
    (flags,) = spy.constexprs
    return flags["ACC_MASK"]


CASES = [((7, 96), 3, 3, torch.float32), ((2, 5, 200), 2, 2, torch.bfloat16), ((33, 96), 4, 2, torch.float16)]


@pytest.mark.parametrize("shape,m,S,dtype", CASES)
@pytest.mark.parametrize("head", [False, True], ids=["phase1", "phase1_normed"])
def test_phase1_backward_accumulates(monkeypatch, shape, m, S, dtype, head):
    sources = [_rand(*shape, dtype=dtype, seed=i) for i in range(m)]
    D = shape[-1]
    Q, G = _rand(S, D, seed=100, scale=0.25), 1 + 0.3 * _rand(S, D, seed=101)
    s64, Q64, G64 = [s.to(F64) for s in sources], Q.to(F64), G.to(F64)
    accumulate = [_acc(shape, dtype, 50 + i) if i != 1 else None for i in range(m)]  # all but source 1
    want_mask = sum(1 << i for i, a in enumerate(accumulate) if a is not None)
    douts = [_rand(*shape, dtype=dtype, seed=7 + j) for j in range(S)]
    dlse = _rand(S, *shape[:-1], seed=8)
    if head:
        wo = 1 + 0.3 * _rand(D, seed=102)
        _, _, lse, _ = dispatch.phase1_normed_cuda(sources, Q, G, 1e-6, 2.0, wo, 1e-5)
        with spy_on(monkeypatch, two_phase, "_phase1_bwd_kernel") as spy:
            gs, *_ = dispatch.phase1_normed_backward_cuda(douts[0], douts[1:], dlse, sources, Q, G, 1e-6, 2.0, wo, 1e-5,
                                                          lse, accumulate)
        rgs, *_ = attn_res_phase1_normed_backward_reference(
            douts[0].to(F64), [d.to(F64) for d in douts[1:]], dlse.to(F64), s64, Q64, G64, 1e-6, 2.0, wo.to(F64), 1e-5)
    else:
        _, lse = dispatch.phase1_cuda(sources, Q, G, 1e-6)
        with spy_on(monkeypatch, two_phase, "_phase1_bwd_kernel") as spy:
            gs, _, _ = dispatch.phase1_backward_cuda(douts, dlse, sources, Q, G, 1e-6, lse, accumulate)
        rgs, _, _ = attn_res_phase1_backward_reference([d.to(F64) for d in douts], dlse.to(F64), s64, Q64, G64, 1e-6)
    assert _spied_mask(spy["_phase1_bwd_kernel"]) == want_mask
    _check_sources(gs, rgs, accumulate, dtype)


def test_phase1_backward_accumulates_in_chunks(monkeypatch):
    """More sources than one launch takes: the chunked path adds the accumulated gradients after."""
    monkeypatch.setattr(_launch, "MAX_SOURCES", 2)
    shape, m, S = (5, 96), 3, 2
    sources = [_rand(*shape, seed=i) for i in range(m)]
    Q = _rand(S, shape[-1], seed=100, scale=0.25)
    accumulate = [None, None, _acc(shape, torch.float32, 9)]
    douts, dlse = [_rand(*shape, seed=7 + j) for j in range(S)], _rand(S, shape[0], seed=8)
    _, lse = attn_res_phase1_reference(sources, Q, None, 1e-6)
    with spy_on(monkeypatch, two_phase, "_phase1_bwd_kernel"):
        gs, _, _ = dispatch.phase1_backward_cuda(douts, dlse, sources, Q, None, 1e-6, lse.float(), accumulate)
    rgs, _, _ = attn_res_phase1_backward_reference([d.to(F64) for d in douts], dlse.to(F64),
                                                   [s.to(F64) for s in sources], Q.to(F64), None, 1e-6)
    _check_sources(gs, rgs, accumulate, torch.float32)


@pytest.mark.parametrize("shape,dtype", [((7, 96), torch.float32), ((2, 5, 200), torch.bfloat16)])
def test_normed_backward_accumulates(monkeypatch, shape, dtype):
    """The unbatched merge (first block): [b_0, partial], the partial's other gradient accumulated."""
    sources = [_rand(*shape, dtype=dtype, seed=i) for i in range(2)]
    D = shape[-1]
    q, g, wo = _rand(D, seed=3, scale=0.25), 1 + 0.3 * _rand(D, seed=4), 1 + 0.3 * _rand(D, seed=5)
    gn = _rand(*shape, dtype=dtype, seed=6)
    accumulate = [None, _acc(shape, dtype, 7)]
    with spy_on(monkeypatch, fused, "_bwd_kernel") as spy:
        gs, *_ = dispatch.normed_backward_cuda(None, gn, sources, q, g, 1e-6, 2.0, wo, 1e-5, accumulate)
    assert _spied_mask(spy["_bwd_kernel"]) == 0b10
    rgs, *_ = attn_res_normed_backward_reference(None, gn.to(F64), [s.to(F64) for s in sources], q.to(F64),
                                                 g.to(F64), 1e-6, 2.0, wo.to(F64), 1e-5)
    _check_sources(gs, rgs, accumulate, dtype)


@pytest.mark.parametrize("shape,dtype", [((7, 96), torch.float32), ((2, 5, 200), torch.bfloat16)])
def test_phase2_normed_backward_accumulates(monkeypatch, shape, dtype):
    """A block's first partial (read by its second merge too): that gradient added to d partial."""
    o1, p, gn = (_rand(*shape, dtype=dtype, seed=k) for k in (1, 2, 3))
    l1 = _rand(*shape[:-1], seed=4)
    D = shape[-1]
    q, g, wo = _rand(D, seed=5, scale=0.25), 1 + 0.3 * _rand(D, seed=6), 1 + 0.3 * _rand(D, seed=7)
    acc = _acc(shape, dtype, 8)
    with spy_on(monkeypatch, two_phase, "_phase2_bwd_kernel") as spy:
        got = dispatch.phase2_normed_backward_cuda(None, gn, o1, l1, p, q, g, 1e-6, 4.0, wo, 1e-5, acc)
    assert spy["_phase2_bwd_kernel"].constexprs[0]["HAS_GP"]
    ref = attn_res_phase2_normed_backward_reference(None, gn.to(F64), o1.to(F64), l1.to(F64), p.to(F64), q.to(F64),
                                                    g.to(F64), 1e-6, 4.0, wo.to(F64), 1e-5)
    assert_close_tier(got[0], ref[0], dtype, "grad", "grad phase1_out")
    _check_sources([got[2]], [ref[2]], [acc], dtype)


def test_accumulate_of_the_wrong_shape_is_refused():
    sources = [_rand(7, 96, seed=i) for i in range(2)]
    q = _rand(96, seed=3)
    with pytest.raises(ValueError, match=r"accumulate\[1\] has shape \(7, 95\)"):
        dispatch.normed_backward_cuda(None, _rand(7, 96, seed=4), sources, q, None, 1e-6, 1.0, None, 1e-5,
                                      [None, _rand(7, 95, seed=5)])
