"""attn_res_triton (fused forward + backward), interpreted or on CUDA (conftest.py), against the float64
reference: output and every gradient (sources, query, norm_weight), odd shapes, 1 and MAX_SOURCES sources,
non-contiguous inputs, three dtypes, NaN-poisoned outputs (conftest), and a spy on every launch."""
from __future__ import annotations

import pytest
import torch

from kernel_tiers import assert_close_tier, cpu_randn
from residual_rewriter.kernels.attn_res import MAX_SOURCES, attn_res_reference, attn_res_triton
from residual_rewriter.kernels.attn_res import dispatch, fused
from residual_rewriter.kernels.attn_res.reference import attn_res_backward_reference
from spies import spy_on

F64 = torch.float64


def _make(shape, n, dtype, seed=0, with_weight=True, layout="contiguous"):
    """n sources of ``shape`` [..., D] (in the given layout), query [D], gain [D] or None."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    D = shape[-1]

    def rand(*s):
        return (cpu_randn(*s, generator=g) * 2 + 0.5).to(dtype)  # nonzero mean and scale: RMSNorm matters

    def one():
        if layout == "token_strided":  # every other token of a bigger tensor: a non-contiguous view
            return rand(*shape[:-2], shape[-2] * 2, D)[..., ::2, :]
        if layout == "row_padded":  # rows of a wider tensor: row stride D + 8
            return rand(*shape[:-1], D + 8)[..., :D]
        if layout == "transposed":  # hidden dim not unit-stride: the wrapper must copy
            return rand(*shape[:-2], D, shape[-2]).transpose(-1, -2)
        return rand(*shape)

    sources = [one() for _ in range(n)]
    query = (cpu_randn(2 * D, generator=g)[::2] * 0.5).to(torch.float32)  # non-contiguous [D]
    weight = (1 + 0.3 * cpu_randn(D, generator=g)) if with_weight else None
    return sources, query, weight


def _check_fwd_bwd(monkeypatch, sources, query, weight, scale, dtype, eps=1e-6, param_grads=True,
                   kernels=("_fwd_kernel", "_bwd_kernel"), floor=0.0):
    srcs = [s.detach().requires_grad_(True) for s in sources]
    q = query.detach().requires_grad_(True)
    w = weight.detach().requires_grad_(True) if weight is not None else None
    with spy_on(monkeypatch, fused, *kernels):
        out = attn_res_triton(srcs, q, w, eps, scale)
        assert out.dtype == dtype and out.shape == sources[0].shape
        dy = cpu_randn(*out.shape, generator=torch.Generator(device="cpu").manual_seed(7)).to(dtype)
        out.backward(dy)
    s64 = [s.detach().to(F64) for s in sources]
    q64, w64 = query.to(F64), (weight.to(F64) if weight is not None else None)
    ref = attn_res_reference(s64, q64, w64, eps, scale)
    assert_close_tier(out, ref, dtype, "out", "out", floor)
    gs, gq, gw = attn_res_backward_reference(dy.to(F64), s64, q64, w64, eps, scale)
    for i, (s, g) in enumerate(zip(srcs, gs)):
        assert s.grad.dtype == dtype
        assert_close_tier(s.grad, g, dtype, "grad", f"grad source {i}", floor)
    assert torch.isfinite(q.grad).all() and (w is None or torch.isfinite(w.grad).all())
    if not param_grads:
        return
    # the query/gain gradients are fp32 parameters reduced over tokens in fp32
    assert_close_tier(q.grad, gq, torch.float32 if dtype == torch.float32 else dtype, "grad", "grad query")
    if w is not None:
        assert_close_tier(w.grad, gw, torch.float32 if dtype == torch.float32 else dtype, "grad", "grad norm_weight")


@pytest.mark.parametrize(
    "shape,n",
    [
        ((1, 96), 1),  # one token, one source
        ((7, 200), 3),  # ragged tokens, D not a power of two
        ((33, 96), 4),
        ((2, 3, 64), 2),  # leading batch dims
    ],
)
@pytest.mark.parametrize("with_weight", [True, False])
def test_fp32_shapes(monkeypatch, shape, n, with_weight):
    sources, q, w = _make(shape, n, torch.float32, seed=n, with_weight=with_weight)
    _check_fwd_bwd(monkeypatch, sources, q, w, scale=float(n), dtype=torch.float32)


def test_max_sources(monkeypatch):
    sources, q, w = _make((5, 96), MAX_SOURCES, torch.float32, seed=3)
    _check_fwd_bwd(monkeypatch, sources, q, w, scale=1.0, dtype=torch.float32)


@pytest.mark.parametrize("layout", ["token_strided", "row_padded", "transposed"])
def test_non_contiguous(monkeypatch, layout):
    sources, q, w = _make((2, 7, 96), 3, torch.float32, seed=5, layout=layout)
    assert not sources[0].is_contiguous()
    _check_fwd_bwd(monkeypatch, sources, q, w, scale=3.0, dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,n", [((33, 200), 5), ((1, 96), 1)])
def test_low_precision(monkeypatch, dtype, shape, n):
    sources, q, w = _make(shape, n, dtype, seed=11)
    _check_fwd_bwd(monkeypatch, sources, q, w, scale=float(n), dtype=dtype)


def test_sharp_softmax_is_stable(monkeypatch):
    """Large scores (|s| ~ 1e3): the online softmax must not overflow. (The query gradient is ~1e-16
    here, all of it cancellation noise in either precision, so only its finiteness is checked.)
    Conditioning: a score of size |s| is known in fp32 only to |s|·2^-24, and the softmax weights
    inherit that as relative error, so the tolerance is 16·max|s|·2^-24 (~1e-3) where that exceeds
    the fp32 tier. The interpreter's numpy sums happened to land under the tier; on an H100 the test
    failed against it (2026-11-22; the run was cut off before the numbers were printed)."""
    sources, q, w = _make((7, 96), 4, torch.float32, seed=2)
    q = q * 100
    s64 = [s.to(F64) for s in sources]
    scores = torch.stack([(s * (q * w).to(F64)).sum(-1) * torch.rsqrt(s.pow(2).mean(-1) + 1e-6) for s in s64])
    floor = 16 * scores.abs().max().item() * 2.0**-24
    _check_fwd_bwd(monkeypatch, sources, q, w, scale=1.0, dtype=torch.float32, param_grads=False, floor=floor)


def test_zero_query_gives_the_residual_sum(monkeypatch):
    """convert's contract: query 0 and scale n -> exactly the plain sum of the sources."""
    sources, _, _ = _make((7, 96), 5, torch.float32, seed=4)
    with spy_on(monkeypatch, fused, "_fwd_kernel"):
        out = attn_res_triton(sources, torch.zeros(96), None, 1e-6, 5.0)
    torch.testing.assert_close(out, sum(sources), rtol=1e-6, atol=1e-5)


def test_dispatch_routes_to_the_kernels(monkeypatch):
    """The op's CUDA entry points run the Triton kernels (exercised here on CPU under the interpreter)."""
    sources, q, w = _make((7, 96), 3, torch.bfloat16, seed=8)
    dy = torch.randn(7, 96).to(torch.bfloat16)
    with spy_on(monkeypatch, fused, "_fwd_kernel", "_bwd_kernel"):
        out = dispatch.forward_cuda(sources, q, w, 1e-6, 3.0)
        gs, gq, gw = dispatch.backward_cuda(dy, sources, q, w, 1e-6, 3.0)
    s64 = [s.to(F64) for s in sources]
    assert_close_tier(out, attn_res_reference(s64, q.to(F64), w.to(F64), 1e-6, 3.0), torch.bfloat16)
    rgs, rgq, rgw = attn_res_backward_reference(dy.to(F64), s64, q.to(F64), w.to(F64), 1e-6, 3.0)
    for a, b in zip(gs + [gq, gw], rgs + [rgq, rgw]):
        assert_close_tier(a, b, torch.bfloat16, "grad")


def test_one_launch_refuses_too_many_sources():
    sources, q, w = _make((3, 32), MAX_SOURCES + 1, torch.float32)
    with pytest.raises(ValueError, match="MAX_SOURCES"):
        fused.forward_launch(sources, q[None], w[None], 1e-6, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_more_sources_than_one_launch_go_in_chunks(monkeypatch, dtype):
    """8 sources with a launch limit of 3: chunks of 3, 3, 2 through the phase-1 kernels, merged by
    log-sum-exp; output and every gradient against the float64 reference (bf16: one more rounding)."""
    from residual_rewriter.kernels.attn_res import _launch, two_phase

    monkeypatch.setattr(_launch, "MAX_SOURCES", 3)
    sources, q, w = _make((7, 96), 8, dtype, seed=12)
    with spy_on(monkeypatch, two_phase, "_phase1_fwd_kernel", "_phase1_bwd_kernel") as spies:
        _check_fwd_bwd(monkeypatch, sources, q, w, scale=8.0, dtype=dtype, kernels=())
    assert len(spies["_phase1_bwd_kernel"].grids) == 3  # one backward launch per chunk


def test_float64_is_refused():
    sources, q, w = _make((3, 32), 2, F64)
    with pytest.raises(ValueError, match="float64"):
        attn_res_triton(sources, q.double(), w)


def test_mismatched_sources_are_refused():
    a, b = torch.randn(3, 32), torch.randn(4, 32)
    with pytest.raises(ValueError, match="share shape"):
        attn_res_triton([a, b], torch.randn(32))


def test_empty_token_dim(monkeypatch):
    sources = [torch.randn(0, 96, requires_grad=True) for _ in range(2)]
    q = torch.randn(96, requires_grad=True)
    out = attn_res_triton(sources, q, None, 1e-6, 2.0)
    assert out.shape == (0, 96)
    out.sum().backward()
    assert q.grad is not None and torch.count_nonzero(q.grad) == 0
