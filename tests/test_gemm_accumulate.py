"""``accumulate_in_gemm``: in graphs compiled with grad disabled, the partial block's add
``p + linear(x, W)`` becomes ``add_linear_(p, x, W)`` (``p += x @ W.T`` in place, cuBLAS beta = 1).

What must hold: it applies exactly where the adds are (every partial and block-end add of a bias-free
GPT), the compiled model equals the eager converted model (and the ORIGINAL model at init, in
float64), it never applies with autograd on, never mutates the user's tensor or a tensor read after
the add, inductor keeps it in place (no copy), and its rounding is the documented one.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import residual_rewriter as rr
from residual_rewriter.backend import make_attnres_backend
from residual_rewriter.passes.lowering import run_passes
from residual_rewriter.passes.op_names import op_name

from model_zoo import logits_of, make_gpt, perturb_attn_res

ADD_LINEAR = "residual_rewriter::add_linear_"


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compiled(model, x, grad=False, **options):
    options.setdefault("accumulate_in_gemm", True)  # the default ("auto") applies it on CUDA only
    backend = make_attnres_backend(compiler="aot_eager", keep_graphs=True, **options)
    with torch.set_grad_enabled(grad):
        out = torch.compile(model, backend=backend, fullgraph=True)(x)
    return logits_of(out), backend


def _gemm_adds(graph) -> int:
    return sum(n.op == "call_function" and op_name(n) == ADD_LINEAR for n in graph.nodes)


@pytest.mark.parametrize("block_size", [2, 3])
def test_every_partial_add_goes_into_its_gemm_and_the_model_is_unchanged(block_size):
    """A bias-free GPT (4 layers, 8 sublayers): each block's outputs after its first are added to the
    partial by c_proj's GEMM. Non-zero queries; against the eager converted model."""
    model = make_gpt(bias=False)
    x = model.example_inputs()[0]
    conv = rr.convert(model, block_size=block_size).eval()
    perturb_attn_res(conv, seed=block_size, scale=0.5)
    for lower in (None, "decompose"):
        torch._dynamo.reset()
        out, backend = _compiled(conv, x, lower=lower)
        blocks = [range(b, min(b + block_size, 8)) for b in range(0, 8, block_size)]
        adds = sum(len(b) - 1 for b in blocks)  # in each block, every output after the first is an add
        assert backend.last_log["accumulate_in_gemm"]["accumulated_in_gemm"] == adds
        assert _gemm_adds(backend.graphs[-1]) == adds
        with torch.no_grad():
            torch.testing.assert_close(out, logits_of(conv(x)), rtol=1e-5, atol=1e-5)


def test_exact_at_init_in_float64():
    model = make_gpt(bias=False).double()
    x = model.example_inputs()[0]
    conv = rr.convert(model, block_size=2).eval()
    out, backend = _compiled(conv, x, lower="decompose")
    assert backend.last_log["accumulate_in_gemm"]["accumulated_in_gemm"] == 4
    with torch.no_grad():
        torch.testing.assert_close(out, logits_of(model(x)), rtol=1e-12, atol=1e-12)


def test_not_with_autograd():
    model = make_gpt(bias=False)
    x = model.example_inputs()[0]
    conv = rr.convert(model, block_size=2).train()
    _, backend = _compiled(conv, x, grad=True)
    assert backend.last_log["accumulate_in_gemm"] == {"modified": False, "skipped_grad_enabled": 1}
    assert _gemm_adds(backend.graphs[-1]) == 0


class _Adds(nn.Module):
    """``p + linear(x, W)`` where p is the caller's tensor, an intermediate read again after the add, or
    a fresh intermediate (the one case to rewrite)."""

    def __init__(self, case: str, d: int = 16):
        super().__init__()
        self.case = case
        self.w = nn.Parameter(torch.randn(d, d, generator=torch.Generator().manual_seed(1)) / 4)

    def forward(self, p, x):
        if self.case == "input":
            return p + F.linear(x, self.w)
        q = p * 2.0
        s = q + F.linear(x, self.w)
        return s + q if self.case == "read_after" else s  # read_after: q must not have been overwritten


def _traced(mod, *inputs):
    """``mod`` traced by FX, with the fake values the pass reads recorded as Dynamo records them."""
    from torch.fx.passes.shape_prop import ShapeProp

    gm = torch.fx.symbolic_trace(mod)
    ShapeProp(gm).propagate(*inputs)
    for n in gm.graph.nodes:
        if "tensor_meta" in n.meta:
            n.meta["example_value"] = torch.empty_strided(n.meta["tensor_meta"].shape, n.meta["tensor_meta"].stride)
    return gm


@pytest.mark.parametrize("case,counts", [
    ("fresh", {"accumulated_in_gemm": 1}),
    ("input", {"partial_is_an_input": 1}),
    ("read_after", {"partial_read_after_the_add": 1}),
])
def test_never_mutates_a_tensor_someone_still_reads(case, counts):
    """The pass alone on a traced graph (graphs without an aggregation never reach it in the backend)."""
    from residual_rewriter.passes.lowering import AccumulateInGemm

    mod = _Adds(case)
    g = torch.Generator().manual_seed(0)
    p, x = torch.randn(3, 16, generator=g), torch.randn(3, 16, generator=g)
    gm = _traced(mod, p, x)
    want, p_before = mod(p, x), p.clone()
    pass_ = AccumulateInGemm()
    with torch.no_grad():
        result = pass_(gm)
        got = gm(p, x)
    assert pass_.summary() == counts
    assert result.modified == (case == "fresh") and _gemm_adds(gm.graph) == (case == "fresh")
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(p, p_before)  # the caller's tensor is untouched


def test_inductor_keeps_it_in_place():
    """Functionalization turns the mutation into a functional op; inductor must re-inplace it, or every
    site pays a copy of the partial (two more passes than the unfused add)."""
    from torch._inductor.utils import run_and_get_code

    model = make_gpt(bias=False, n_layer=2)
    x = model.example_inputs()[0]
    conv = rr.convert(model, block_size=4).eval()
    backend = make_attnres_backend(accumulate_in_gemm=True)  # inductor
    with torch.no_grad():
        out, (code, *_) = run_and_get_code(torch.compile(conv, backend=backend), x)
        torch.testing.assert_close(logits_of(out), logits_of(conv(x)), rtol=1e-5, atol=1e-5)
    calls = [line for line in code.splitlines() if "residual_rewriter.add_linear_.default(" in line]
    assert len(calls) == backend.last_log["accumulate_in_gemm"]["accumulated_in_gemm"] == 3
    assert len({c.split("(")[1].split(",")[0] for c in calls}) == 1  # one buffer, accumulated 3 times
    assert "clone" not in code and ".copy_(" not in code


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rounding_once_against_twice(dtype):
    """Fused, the GEMM's fp32 accumulator is added to p and the sum rounded ONCE; unfused, f is rounded
    to the dtype first and the sum again. So the fused result is the fp32 sum rounded once (up to the
    GEMM's accumulation order: one unit in the last place), it is off by more than one unit of the
    exact sum far less often than the unfused one (where p and f nearly cancel, f's rounding error is
    many units of the small sum), and it is closer on average."""
    g = torch.Generator().manual_seed(0)
    T, K, N = 512, 256, 192
    p = torch.randn(T, N, generator=g).to(dtype)
    x = torch.randn(T, K, generator=g).to(dtype)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype)
    exact = p.double() + x.double() @ w.double().T
    fused = p.clone()
    torch.ops.residual_rewriter.add_linear_(fused, x, w)
    unfused = p + F.linear(x, w)
    once = (p.float() + x.float() @ w.float().T).to(dtype)

    def ulp(t):
        return torch.finfo(dtype).eps * torch.exp2(torch.floor(torch.log2(t.double().abs().clamp_min(1e-30))))

    # the two fp32 accumulators differ by the GEMM's summation order: a few fp32 units of sum |x||w|
    order = 4 * torch.finfo(torch.float32).eps * (p.double().abs() + x.double().abs() @ w.double().abs().T)
    assert ((fused.double() - once.double()).abs() <= ulp(once) + order).all()
    fused_err, unfused_err = (fused.double() - exact).abs(), (unfused.double() - exact).abs()
    assert 10 * (fused_err > ulp(exact)).sum() < (unfused_err > ulp(exact)).sum()
    assert fused_err.mean() < 0.9 * unfused_err.mean()


def test_op_checks_its_arguments():
    ops = torch.ops.residual_rewriter
    with pytest.raises(ValueError, match="contiguous"):
        ops.add_linear_(torch.zeros(8, 4).t(), torch.zeros(4, 3), torch.zeros(8, 3))
    with pytest.raises(ValueError, match="do not fit"):
        ops.add_linear_(torch.zeros(4, 8), torch.zeros(4, 3), torch.zeros(8, 5))


def test_run_passes_reports_it():
    model = make_gpt(bias=False)
    conv = rr.convert(model, block_size=2).eval()
    gm = None

    def grab(g, _):
        nonlocal gm
        gm = g
        return g.forward

    with torch.no_grad():
        torch.compile(conv, backend=grab, fullgraph=True)(model.example_inputs()[0])
        auto = run_passes(copy.deepcopy(gm), lower=None)  # the default: CUDA tensors only
        plog = run_passes(gm, lower=None, accumulate_in_gemm=True)
    assert auto["accumulate_in_gemm"] == {"modified": False, "not_cuda": 4}
    assert plog["accumulate_in_gemm"]["accumulated_in_gemm"] == 4
