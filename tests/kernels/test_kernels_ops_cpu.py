"""The library ops on CPU (reference implementations): values, gradients vs autograd through the
reference in float64, and ``torch.library.opcheck`` on every registration."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from residual_rewriter.kernels.attn_res import reference as R
from residual_rewriter.kernels.attn_res import reference_grads as RG  # noqa: F401  (imported: must import)

OPS = torch.ops.residual_rewriter
F64 = torch.float64


def _leaf(*shape, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(True)


def _grads(y, ins, gy):
    ys = y if isinstance(y, (tuple, list)) else (y,)
    gys = gy if isinstance(gy, (tuple, list)) else (gy,)
    loss = sum((a * b).sum() for a, b in zip(ys, gys))
    return torch.autograd.grad(loss, ins, materialize_grads=True)


def _assert_all_close(a, b, tol=1e-10):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=tol, rtol=tol)


@pytest.mark.parametrize("with_weight", [True, False])
def test_phase1_op_matches_reference_and_grads(with_weight):
    srcs = [_leaf(2, 5, 24, seed=i) for i in range(3)]
    Q = _leaf(4, 24, seed=10)
    G = _leaf(4, 24, seed=11) if with_weight else None
    out, lse = OPS.attn_res_phase1(srcs, Q, G, 1e-6)
    ro, rl = R.attn_res_phase1_reference(srcs, Q, G, 1e-6)
    assert out.shape == (4, 2, 5, 24) and lse.shape == (4, 2, 5)
    ins = srcs + [Q] + ([G] if G is not None else [])
    gy = (torch.randn_like(out), torch.randn_like(lse))
    _assert_all_close(_grads((out, lse), ins, gy), _grads((ro, rl), ins, gy))


@pytest.mark.parametrize("with_partial", [True, False])
@pytest.mark.parametrize("with_weight", [True, False])
def test_phase2_op_matches_reference_and_grads(with_partial, with_weight):
    o1, l1 = _leaf(2, 5, 24, seed=1), _leaf(2, 5, seed=2)
    p = _leaf(2, 5, 24, seed=3) if with_partial else None
    q, g = _leaf(24, seed=4), (_leaf(24, seed=5) if with_weight else None)
    y = OPS.attn_res_phase2(o1, l1, p, q, g, 1e-6, 2.5)
    yr = R.attn_res_phase2_reference(o1, l1, p, q, g, 1e-6, 2.5)
    torch.testing.assert_close(y, yr)
    ins = [o1, l1, q] + [t for t in (p, g) if t is not None]
    gy = torch.randn_like(y)
    _assert_all_close(_grads(y, ins, gy), _grads(yr, ins, gy))


def test_two_phase_equals_single_pass():
    srcs = [_leaf(3, 7, 16, seed=i) for i in range(4)]
    Q, G = _leaf(2, 16, seed=8), _leaf(2, 16, seed=9)
    partial = _leaf(3, 7, 16, seed=12)
    out, lse = OPS.attn_res_phase1(srcs, Q, G, 1e-6)
    for j in range(2):
        y = OPS.attn_res_phase2(out[j], lse[j], partial, Q[j], G[j], 1e-6, 5.0)
        torch.testing.assert_close(y, R.attn_res_reference(srcs + [partial], Q[j], G[j], 1e-6, 5.0))


@pytest.mark.parametrize("with_weight", [True, False])
@pytest.mark.parametrize("with_out_weight", [True, False])
def test_normed_op_matches_reference_and_grads(with_weight, with_out_weight):
    srcs = [_leaf(2, 5, 24, seed=i) for i in range(3)]
    q = _leaf(24, seed=4)
    g = _leaf(24, seed=5) if with_weight else None
    wo = _leaf(24, seed=6) if with_out_weight else None
    y = OPS.attn_res_normed(srcs, q, g, 1e-6, 3.0, wo, 1e-5)
    yr = R.attn_res_normed_reference(srcs, q, g, 1e-6, 3.0, wo, 1e-5)
    ins = srcs + [q] + [t for t in (g, wo) if t is not None]
    gy = (torch.randn_like(y[0]), torch.randn_like(y[1]))
    _assert_all_close(y, yr)
    _assert_all_close(_grads(y, ins, gy), _grads(yr, ins, gy))


@pytest.mark.parametrize("with_partial", [True, False])
@pytest.mark.parametrize("with_weights", [True, False])
def test_phase2_normed_op_matches_reference_and_grads(with_partial, with_weights):
    """The closed-form backward (what the op runs on CPU) against autograd through the reference, float64."""
    o1, l1 = _leaf(2, 5, 24, seed=1), _leaf(2, 5, seed=2)
    p = _leaf(2, 5, 24, seed=3) if with_partial else None
    q = _leaf(24, seed=4)
    g, wo = (_leaf(24, seed=5), _leaf(24, seed=6)) if with_weights else (None, None)
    args = (o1, l1, p, q, g, 1e-6, 2.5, wo, 1e-5)
    y, yr = OPS.attn_res_phase2_normed(*args), R.attn_res_phase2_normed_reference(*args)
    _assert_all_close(y, yr)
    # mix is exactly phase 2; normed is RMSNorm(mix) * wo
    torch.testing.assert_close(y[0], R.attn_res_phase2_reference(o1, l1, p, q, g, 1e-6, 2.5))
    normed = F.rms_norm(y[0], (24,), wo, 1e-5)
    torch.testing.assert_close(y[1], normed)
    ins = [o1, l1, q] + [t for t in (p, g, wo) if t is not None]
    gy = (torch.randn_like(y[0]), torch.randn_like(y[1]))
    _assert_all_close(_grads(y, ins, gy), _grads(yr, ins, gy))
    for k in (0, 1):  # only one output read: the other's gradient arrives as None
        y, yr = OPS.attn_res_phase2_normed(*args), R.attn_res_phase2_normed_reference(*args)
        _assert_all_close(_grads(y[k], ins, gy[k]), _grads(yr[k], ins, gy[k]))


@pytest.mark.parametrize("op", ["attn_res_normed", "attn_res_phase2_normed"])
def test_normed_ops_without_the_mix(op):
    """return_mix=False (what the compile backend emits): the first output is empty, the normed form
    and its gradients are those of return_mix=True with only ``normed`` read."""
    srcs = [_leaf(2, 5, 24, seed=i) for i in range(3)]
    q, g, wo = _leaf(24, seed=4), _leaf(24, seed=5), _leaf(24, seed=6)
    if op == "attn_res_normed":
        args, ins = (srcs, q, g, 1e-6, 3.0, wo, 1e-5), srcs + [q, g, wo]
    else:
        o1, l1, p = _leaf(2, 5, 24, seed=1), _leaf(2, 5, seed=2), _leaf(2, 5, 24, seed=3)
        args, ins = (o1, l1, p, q, g, 1e-6, 2.5, wo, 1e-5), [o1, l1, p, q, g, wo]
    fn = getattr(OPS, op)
    mix, normed = fn(*args, return_mix=False)
    assert mix.numel() == 0
    full = fn(*args, return_mix=True)
    torch.testing.assert_close(normed, full[1], atol=0, rtol=0)
    gy = torch.randn_like(normed)
    _assert_all_close(_grads(normed, ins, gy), _grads(full[1], ins, gy))
    torch.library.opcheck(getattr(OPS, op).default, args, {"return_mix": False})


@pytest.mark.parametrize("other_reader", [True, False])
def test_phase2_add_normed_op_matches_its_unfused_form(other_reader):
    """attn_res_phase2_add_normed == add + attn_res_phase2_normed(return_mix=False), values and all
    gradients (float64, closed-form backward vs autograd through the references), with and without
    another reader of the updated partial (its gradient enters the fused backward)."""
    o1, l1 = _leaf(2, 5, 24, seed=1), _leaf(2, 5, seed=2)
    prev, delta = _leaf(2, 5, 24, seed=3), _leaf(2, 5, 24, seed=7)
    q, g, wo = _leaf(24, seed=4), _leaf(24, seed=5), _leaf(24, seed=6)
    ins = [o1, l1, prev, delta, q, g, wo]
    new, normed = OPS.attn_res_phase2_add_normed(o1, l1, prev, delta, q, g, 1e-6, 2.5, wo, 1e-5)
    ref_new = prev + delta
    ref_normed = R.attn_res_phase2_normed_reference(o1, l1, ref_new, q, g, 1e-6, 2.5, wo, 1e-5)[1]
    _assert_all_close((new, normed), (ref_new, ref_normed))
    gy = (torch.randn_like(new), torch.randn_like(normed))
    outs, ref_outs = ((new, normed), (ref_new, ref_normed)) if other_reader else ((normed,), (ref_normed,))
    gys = gy if other_reader else gy[1:]
    _assert_all_close(_grads(outs, ins, gys), _grads(ref_outs, ins, gys))
    f = torch.float32
    args = tuple(t.detach().to(f).requires_grad_() if isinstance(t, torch.Tensor) else t
                 for t in (o1, l1, prev, delta, q, g, 1e-6, 2.5, wo, 1e-5))
    _opcheck(OPS.attn_res_phase2_add_normed.default, args)


def _opcheck(op, args):
    torch.library.opcheck(op, args)  # schema, autograd registration, fake tensor, aot dispatch (dynamic)


def test_opcheck_attn_res():
    srcs = [_leaf(2, 3, 8, seed=i, dtype=torch.float32) for i in range(3)]
    _opcheck(OPS.attn_res.default, (srcs, _leaf(8, seed=5, dtype=torch.float32), _leaf(8, seed=6, dtype=torch.float32), 1e-6, 3.0))
    _opcheck(OPS.attn_res.default, (srcs, _leaf(8, seed=5, dtype=torch.float32), None, 1e-6, 1.0))


def test_opcheck_phase1():
    srcs = [_leaf(2, 3, 8, seed=i, dtype=torch.float32) for i in range(3)]
    Q, G = _leaf(4, 8, seed=7, dtype=torch.float32), _leaf(4, 8, seed=8, dtype=torch.float32)
    _opcheck(OPS.attn_res_phase1.default, (srcs, Q, G, 1e-6))
    _opcheck(OPS.attn_res_phase1.default, (srcs, Q, None, 1e-6))


def test_opcheck_phase2():
    f = torch.float32
    o1, l1, p = _leaf(2, 3, 8, seed=1, dtype=f), _leaf(2, 3, seed=2, dtype=f), _leaf(2, 3, 8, seed=3, dtype=f)
    q, g = _leaf(8, seed=4, dtype=f), _leaf(8, seed=5, dtype=f)
    _opcheck(OPS.attn_res_phase2.default, (o1, l1, p, q, g, 1e-6, 2.0))
    _opcheck(OPS.attn_res_phase2.default, (o1, l1, None, q, None, 1e-6, 1.0))


def test_opcheck_normed():
    f = torch.float32
    srcs = [_leaf(2, 3, 8, seed=i, dtype=f) for i in range(3)]
    q, g, wo = _leaf(8, seed=4, dtype=f), _leaf(8, seed=5, dtype=f), _leaf(8, seed=6, dtype=f)
    _opcheck(OPS.attn_res_normed.default, (srcs, q, g, 1e-6, 3.0, wo, 1e-5))
    _opcheck(OPS.attn_res_normed.default, (srcs, q, None, 1e-6, 1.0, None, 1e-6))


def test_opcheck_phase2_normed():
    f = torch.float32
    o1, l1, p = _leaf(2, 3, 8, seed=1, dtype=f), _leaf(2, 3, seed=2, dtype=f), _leaf(2, 3, 8, seed=3, dtype=f)
    q, g, wo = _leaf(8, seed=4, dtype=f), _leaf(8, seed=5, dtype=f), _leaf(8, seed=6, dtype=f)
    _opcheck(OPS.attn_res_phase2_normed.default, (o1, l1, p, q, g, 1e-6, 2.0, wo, 1e-5))
    _opcheck(OPS.attn_res_phase2_normed.default, (o1, l1, None, q, None, 1e-6, 1.0, None, 1e-6))


def test_ops_compile_fullgraph_with_backward():
    """The compile backend's view: all five ops trace into one graph (no breaks) and train under
    aot_eager; the graph keeps them as single nodes, findable by target."""
    f = torch.float32
    srcs = [_leaf(2, 3, 16, seed=i, dtype=f) for i in range(3)]
    q, g, wo = _leaf(16, seed=4, dtype=f), _leaf(16, seed=5, dtype=f), _leaf(16, seed=6, dtype=f)
    Q = _leaf(2, 16, seed=7, dtype=f)

    def fn(srcs, q, g, wo, Q):
        mix = OPS.attn_res(srcs, q, g, 1e-6, 3.0)
        m2, normed = OPS.attn_res_normed(srcs, q, g, 1e-6, 3.0, wo, 1e-6)
        out, lse = OPS.attn_res_phase1(srcs, Q, None, 1e-6)
        y = OPS.attn_res_phase2(out[0], lse[0], mix, Q[0], None, 1e-6, 4.0)
        y2, n2 = OPS.attn_res_phase2_normed(out[1], lse[1], mix, Q[1], g, 1e-6, 4.0, wo, 1e-5)
        return (mix + normed + y + n2).sum() + m2.sum() + y2.pow(2).sum()

    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        from functorch.compile import make_boxed_func

        passthrough = lambda g, _: make_boxed_func(g.forward)  # noqa: E731
        return torch._dynamo.backends.common.aot_autograd(fw_compiler=passthrough, bw_compiler=passthrough)(
            gm, example_inputs
        )

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    loss = compiled(srcs, q, g, wo, Q)
    ins = srcs + [q, g, wo, Q]
    got = torch.autograd.grad(loss, ins)
    ref_loss = fn(srcs, q, g, wo, Q)
    torch.testing.assert_close(loss, ref_loss)
    _assert_all_close(got, torch.autograd.grad(ref_loss, ins), tol=1e-5)
    for name in ("attn_res", "attn_res_normed", "attn_res_phase1", "attn_res_phase2", "attn_res_phase2_normed"):
        assert f"residual_rewriter.{name}" in seen or f"residual_rewriter.{name}.default" in seen, (name, seen)


def test_phase2_add_normed_refuses_a_delta_wider_than_the_partial():
    """The CPU op keeps the CUDA launcher's contract: the new partial has the partial's dtype, so a
    delta that would promote it (float64 into float32) is an error, not a silently wider output."""
    f = torch.float32
    o1, l1, p = _leaf(2, 3, 8, seed=1, dtype=f), _leaf(2, 3, seed=2, dtype=f), _leaf(2, 3, 8, seed=3, dtype=f)
    q = _leaf(8, seed=4, dtype=f)
    with pytest.raises(ValueError, match="promotes"):
        OPS.attn_res_phase2_add_normed(o1, l1, p, p.double(), q, None, 1e-6, 2.0, None, 1e-5)
    new, _ = OPS.attn_res_phase2_add_normed(o1, l1, p, p.bfloat16(), q, None, 1e-6, 2.0, None, 1e-5)
    assert new.dtype == f
