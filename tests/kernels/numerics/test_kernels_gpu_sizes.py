"""GPU-only numerics at the sizes the benchmarks time (the interpreter is too slow for them): the paper's
bf16 shapes, hidden 7168 (a non-power-of-2 tile), and a source of more than 2^31 elements, which only
int64 offsets address correctly. Same float64 references, tiers, NaN poisoning and launch spies."""
from __future__ import annotations

import pytest
import torch

from kernel_tiers import DEVICE, assert_close_tier, cpu_randn
from residual_rewriter.kernels.attn_res import attn_res_reference, attn_res_triton
from residual_rewriter.kernels.attn_res import dispatch, fused, two_phase
from residual_rewriter.kernels.attn_res.reference import attn_res_backward_reference, attn_res_phase1_reference
from spies import spy_on

pytestmark = pytest.mark.skipif(DEVICE != "cuda", reason="sizes for a GPU (RR_KERNELS_DEVICE=cuda)")
F64, BF16 = torch.float64, torch.bfloat16


def _gen(seed):
    return torch.Generator(device="cpu").manual_seed(seed)


def _sources(T, D, n, seed=0):
    g = _gen(seed)
    return [(cpu_randn(T, D, generator=g) * 2 + 0.5).to(BF16) for _ in range(n)]


def _params(D, seed=1):
    g = _gen(seed)
    return cpu_randn(D, generator=g) * 0.3, 1 + 0.3 * cpu_randn(D, generator=g)


@pytest.mark.parametrize("elements_per_thread", [8, 16])  # the default launch config and the one the benchmark sweeps
@pytest.mark.parametrize("T,D,n", [(16384 + 7, 4096, 9), (1000, 7168, 16), (8191, 1024, 2)])
def test_paper_shapes_fwd_bwd(monkeypatch, T, D, n, elements_per_thread):
    from residual_rewriter.kernels.attn_res import _launch

    monkeypatch.setattr(_launch, "ELEMENTS_PER_THREAD", elements_per_thread)
    sources = [s.requires_grad_(True) for s in _sources(T, D, n)]
    q, w = (p.requires_grad_(True) for p in _params(D))
    with spy_on(monkeypatch, fused, "_fwd_kernel", "_bwd_kernel"):
        out = attn_res_triton(sources, q, w, 1e-6, float(n))
        dy = cpu_randn(T, D, generator=_gen(7)).to(BF16)
        out.backward(dy)
    s64 = [s.detach().to(F64) for s in sources]
    q64, w64 = q.detach().to(F64), w.detach().to(F64)
    assert_close_tier(out, attn_res_reference(s64, q64, w64, 1e-6, float(n)), BF16, "out", "out")
    gs, gq, gw = attn_res_backward_reference(dy.to(F64), s64, q64, w64, 1e-6, float(n))
    for i, (s, g) in enumerate(zip(sources, gs)):
        assert_close_tier(s.grad, g, BF16, "grad", f"grad source {i}")
    assert_close_tier(q.grad, gq, BF16, "grad", "grad query")
    assert_close_tier(w.grad, gw, BF16, "grad", "grad norm_weight")


def test_phase1_paper_shape(monkeypatch):
    """All 4 sublayer queries of a block against 8 completed blocks, T=8192, D=2048."""
    sources = _sources(8192, 2048, 8, seed=3)
    g = _gen(4)
    Q, G = cpu_randn(4, 2048, generator=g) * 0.3, 1 + 0.3 * cpu_randn(4, 2048, generator=g)
    with spy_on(monkeypatch, two_phase, "_phase1_fwd_kernel"):
        outs, lse = dispatch.phase1_cuda(sources, Q, G, 1e-6)
    ros, rl = attn_res_phase1_reference([s.to(F64) for s in sources], Q.to(F64), G.to(F64), 1e-6)
    for j, (o, ro) in enumerate(zip(outs, ros)):
        assert_close_tier(o, ro, BF16, "out", f"phase1 out {j}")
    assert_close_tier(lse, rl, torch.float32, "out", "phase1 lse")


def test_int64_offsets_past_2_pow_31_elements(monkeypatch):
    """Each source holds 2^31 + 3·4096 elements: 32-bit offsets would wrap and corrupt the last rows.
    The last rows of the output and of each source gradient are checked against the reference on
    those rows (the mixture is per token, so a row slice of the reference is exact)."""
    D, T = 4096, (1 << 31) // 4096 + 3
    if torch.cuda.get_device_properties(0).total_memory < 40 << 30:
        pytest.skip("needs ~30 GB of GPU memory")
    torch.cuda.manual_seed(5)
    sources = []
    for _ in range(2):
        s = torch.empty(T, D, dtype=BF16)
        s.normal_(0.5, 2.0)  # drawn on the GPU: a 4 GiB CPU draw would dominate the test
        sources.append(s.requires_grad_(True))
    q, w = (p.requires_grad_(True) for p in _params(D, seed=6))
    with spy_on(monkeypatch, fused, "_fwd_kernel", "_bwd_kernel"):
        out = attn_res_triton(sources, q, w, 1e-6, 2.0)
        dy = torch.empty(T, D, dtype=BF16).normal_()
        out.backward(dy)
    tail = slice(T - 64, T)  # rows whose offsets exceed 2^31
    s64 = [s.detach()[tail].to(F64) for s in sources]
    q64, w64 = q.detach().to(F64), w.detach().to(F64)
    assert_close_tier(out[tail], attn_res_reference(s64, q64, w64, 1e-6, 2.0), BF16, "out", "tail out")
    gs, _, _ = attn_res_backward_reference(dy[tail].to(F64), s64, q64, w64, 1e-6, 2.0)
    for i, (s, gref) in enumerate(zip(sources, gs)):
        assert_close_tier(s.grad[tail], gref, BF16, "grad", f"tail grad source {i}")
