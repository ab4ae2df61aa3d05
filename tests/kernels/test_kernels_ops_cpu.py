"""The library ops on CPU. There the ops run the plain-PyTorch reference, so their values are checked
against an independent statement of the math written in this file (float64, relative error <= 1e-10),
their closed-form backward (the registered autograd) against autograd through that statement (same
tolerance) and against finite differences (``torch.autograd.gradcheck``, float64, small odd shapes),
and every registration with ``torch.library.opcheck``."""
from __future__ import annotations

import pytest
import torch

from residual_rewriter.kernels.attn_res import reference_grads as RG  # noqa: F401  (imported: must import)

OPS = torch.ops.residual_rewriter
F64 = torch.float64
SHAPE, D = (2, 5, 7), 7  # odd sizes: no power of two anywhere
EPS, OUT_EPS = 1e-6, 1e-5


def _leaf(*shape, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(True)


def _gain(seed):
    """A norm gain away from ones (a formula that drops it shows)."""
    g = torch.Generator().manual_seed(seed)
    return (1 + 0.5 * torch.randn(D, generator=g, dtype=F64)).requires_grad_(True)


# ---- the math, stated independently of the library (float64) ------------------------------------
# h = scale * sum_i softmax_i(q . (RMSNorm(s_i) * g)) * s_i, RMSNorm(x) = x / sqrt(mean(x^2) + eps)


def _rmsnorm(x, eps, gain=None):
    y = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)
    return y if gain is None else y * gain


def _logits(sources, q, g, eps):
    """[n, ...]: the score of every source."""
    return torch.stack([(_rmsnorm(s, eps, g) * q).sum(-1) for s in sources])


def _softmax_mix(values, logits, scale=1.0):
    a = torch.softmax(logits, dim=0).unsqueeze(-1)  # [n, ..., 1]
    return scale * (a * torch.stack(values)).sum(0)


def f_attn_res(sources, q, g, eps, scale):
    return _softmax_mix(sources, _logits(sources, q, g, eps), scale)


def f_phase1(sources, Q, G, eps):
    """Every query j over the sources: (its plain softmax average [S, ..., D], the log-sum-exp of its scores [S, ...])."""
    logits = [_logits(sources, Q[j], None if G is None else G[j], eps) for j in range(Q.shape[0])]
    return torch.stack([_softmax_mix(sources, l) for l in logits]), torch.stack([torch.logsumexp(l, 0) for l in logits])


def f_phase2(o1, l1, p, q, g, eps, scale):
    """The phase-1 result is one more "source" of value o1 and score l1, merged with the partial."""
    if p is None:
        return scale * o1
    return _softmax_mix([o1, p], torch.stack([l1, _logits([p], q, g, eps)[0]]), scale)


def f_normed(sources, q, g, eps, scale, wo, out_eps):
    mix = f_attn_res(sources, q, g, eps, scale)
    return mix, _rmsnorm(mix, out_eps, wo)


def f_phase2_normed(o1, l1, p, q, g, eps, scale, wo, out_eps):
    mix = f_phase2(o1, l1, p, q, g, eps, scale)
    return mix, _rmsnorm(mix, out_eps, wo)


def f_phase2_add_normed(o1, l1, prev, delta, q, g, eps, scale, wo, out_eps):
    new = prev + delta
    return new, f_phase2_normed(o1, l1, new, q, g, eps, scale, wo, out_eps)[1]


# ---- helpers --------------------------------------------------------------------------------------


def _grads(y, ins, gy):
    ys = y if isinstance(y, (tuple, list)) else (y,)
    gys = gy if isinstance(gy, (tuple, list)) else (gy,)
    loss = sum((a * b).sum() for a, b in zip(ys, gys))
    return torch.autograd.grad(loss, ins, materialize_grads=True)


def _assert_exact(got, want, tol=1e-10):
    """Same shapes and dtypes, max |got - want| <= tol * max |want| for every pair."""
    got = got if isinstance(got, (tuple, list)) else (got,)
    want = want if isinstance(want, (tuple, list)) else (want,)
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape and a.dtype == b.dtype, (i, a.shape, b.shape, a.dtype, b.dtype)
        err = (a - b).abs().max().item() / max(b.abs().max().item(), 1e-300)
        assert err <= tol, f"output {i}: relative error {err:.2e} > {tol:.0e}"


def _assert_all_close(a, b, tol=1e-10):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=tol, rtol=tol)


def _check(op_call, formula, ins, full_jacobian):
    """Values against the formula, closed-form gradients against autograd through the formula (both
    float64, relative 1e-10), and ``gradcheck`` of the op against finite differences: the whole
    Jacobian for each op's fullest case (``full_jacobian``), random projections of it otherwise."""
    y, want = op_call(*ins), formula(*ins)
    _assert_exact(y, want)
    ys = y if isinstance(y, tuple) else (y,)
    gy = tuple(torch.randn(t.shape, generator=torch.Generator().manual_seed(90 + k), dtype=F64) for k, t in enumerate(ys))
    gy = gy if isinstance(y, tuple) else gy[0]
    got_g, want_g = _grads(y, ins, gy), _grads(want, ins, gy)
    for i, (a, b) in enumerate(zip(got_g, want_g)):
        _assert_exact(a, b)
    assert torch.autograd.gradcheck(op_call, tuple(ins), fast_mode=not full_jacobian)


# ---- every op: values, gradients, gradcheck -------------------------------------------------------


@pytest.mark.parametrize("with_weight", [True, False])
@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_attn_res_op(with_weight, scale):
    srcs = [_leaf(*SHAPE, seed=i) for i in range(3)]
    q = _leaf(D, seed=4)
    g = [_gain(5)] if with_weight else []
    ins = srcs + [q] + g

    def op(*t):
        return OPS.attn_res(list(t[:3]), t[3], t[4] if with_weight else None, EPS, scale)

    def formula(*t):
        return f_attn_res(list(t[:3]), t[3], t[4] if with_weight else None, EPS, scale)

    _check(op, formula, ins, with_weight and scale != 1.0)


@pytest.mark.parametrize("with_weight", [True, False])
def test_phase1_op(with_weight):
    srcs = [_leaf(*SHAPE, seed=i) for i in range(3)]
    Q = _leaf(3, D, seed=10)
    G = [(1 + 0.5 * _leaf(3, D, seed=11)).detach().requires_grad_(True)] if with_weight else []
    ins = srcs + [Q] + G

    def op(*t):  # flat: (out_0, .., out_{S-1}, lse)
        outs, lse = OPS.attn_res_phase1(list(t[:3]), t[3], t[4] if with_weight else None, EPS)
        return (*outs, lse)

    def formula(*t):
        out, lse = f_phase1(list(t[:3]), t[3], t[4] if with_weight else None, EPS)
        return (*out.unbind(0), lse)

    *outs, lse = op(*ins)
    assert [o.shape for o in outs] == [SHAPE] * 3 and lse.shape == (3, *SHAPE[:-1])
    assert len({o.untyped_storage().data_ptr() for o in outs}) == 3  # one tensor per query, no shared buffer
    _check(op, formula, ins, with_weight)


@pytest.mark.parametrize("with_weight", [True, False])
def test_phase1_normed_op(with_weight):
    """Query 0's merge (no partial: RMSNorm(scale * out_0) * wo) fused into phase 1: the formula's
    normed head, the other queries' outputs and every lse, and all their gradients."""
    srcs = [_leaf(*SHAPE, seed=i) for i in range(3)]
    Q = _leaf(3, D, seed=10)
    extra = [(1 + 0.5 * _leaf(3, D, seed=11)).detach().requires_grad_(True), _gain(12)] if with_weight else []
    ins = srcs + [Q] + extra

    def op(*t):  # flat: (normed_0, out_1, out_2, lse)
        G, wo = (t[4], t[5]) if with_weight else (None, None)
        normed0, outs, lse, end = OPS.attn_res_phase1_normed(list(t[:3]), t[3], G, EPS, 3.0, wo, OUT_EPS)
        assert end.numel() == 0  # no block end given: an empty output
        return (normed0, *outs, lse)

    def formula(*t):
        G, wo = (t[4], t[5]) if with_weight else (None, None)
        out, lse = f_phase1(list(t[:3]), t[3], G, EPS)
        return (_rmsnorm(3.0 * out[0], OUT_EPS, wo), *out[1:].unbind(0), lse)

    normed0, *outs, lse = op(*ins)
    assert normed0.shape == SHAPE and [o.shape for o in outs] == [SHAPE] * 2 and lse.shape == (3, *SHAPE[:-1])
    _check(op, formula, ins, with_weight)


@pytest.mark.parametrize("later_readers", [True, False])
def test_phase1_normed_op_with_the_block_end(later_readers):
    """The previous block's last add done by phase 1 (fuse_block_end): b = p + f is the last source and
    the fourth output; p and f get b's whole gradient, from this op and (``later_readers``: b read
    after the op too) from b's other readers, summed in the backward op."""
    srcs = [_leaf(*SHAPE, seed=i) for i in range(2)]
    p, f = _leaf(*SHAPE, seed=5), _leaf(*SHAPE, seed=6)
    Q, G, wo = _leaf(3, D, seed=10), (1 + 0.5 * _leaf(3, D, seed=11)).detach().requires_grad_(True), _gain(12)
    ins = srcs + [p, f, Q, G, wo]

    def op(*t):
        normed0, outs, lse, end = OPS.attn_res_phase1_normed(list(t[:2]), t[4], t[5], EPS, 3.0, t[6], OUT_EPS,
                                                             end_partial=t[2], end_delta=t[3])
        return (normed0, *outs, lse) + ((end,) if later_readers else ())

    def formula(*t):
        end = t[2] + t[3]
        out, lse = f_phase1([t[0], t[1], end], t[4], t[5], EPS)
        return (_rmsnorm(3.0 * out[0], OUT_EPS, t[6]), *out[1:].unbind(0), lse) + ((end,) if later_readers else ())

    _check(op, formula, ins, True)


def test_opcheck_phase1_normed():
    srcs = [_leaf(2, 3, 8, seed=i, dtype=torch.float32) for i in range(3)]
    Q, G, wo = (_leaf(*s, seed=k, dtype=torch.float32) for k, s in ((7, (4, 8)), (8, (4, 8)), (9, (8,))))
    _opcheck(OPS.attn_res_phase1_normed.default, (srcs, Q, G, 1e-6, 2.0, wo, 1e-5))
    _opcheck(OPS.attn_res_phase1_normed.default, (srcs, Q, None, 1e-6, 1.0, None, 1e-6))
    p, f = _leaf(2, 3, 8, seed=20, dtype=torch.float32), _leaf(2, 3, 8, seed=21, dtype=torch.bfloat16)
    _opcheck(OPS.attn_res_phase1_normed.default, (srcs[:2], Q, G, 1e-6, 2.0, wo, 1e-5), {"end_partial": p, "end_delta": f})


def _phase2_ins(with_partial, with_weight, extra=()):
    o1, l1 = _leaf(*SHAPE, seed=1), _leaf(*SHAPE[:-1], seed=2)
    p = [_leaf(*SHAPE, seed=3)] if with_partial else []
    q = _leaf(D, seed=4)
    g = [_gain(5)] if with_weight else []
    return [o1, l1, q] + p + g + list(extra)


def _unpack_phase2(t, with_partial, with_weight):
    """(o1, l1, partial or None, q, gain or None, rest) from _phase2_ins's flat list."""
    o1, l1, q, *rest = t
    p = rest.pop(0) if with_partial else None
    g = rest.pop(0) if with_weight else None
    return o1, l1, p, q, g, rest


@pytest.mark.parametrize("with_partial", [True, False])
@pytest.mark.parametrize("with_weight", [True, False])
def test_phase2_op(with_partial, with_weight):
    ins = _phase2_ins(with_partial, with_weight)

    def op(*t):
        o1, l1, p, q, g, _ = _unpack_phase2(t, with_partial, with_weight)
        return OPS.attn_res_phase2(o1, l1, p, q, g, EPS, 2.5)

    def formula(*t):
        o1, l1, p, q, g, _ = _unpack_phase2(t, with_partial, with_weight)
        return f_phase2(o1, l1, p, q, g, EPS, 2.5)

    _check(op, formula, ins, with_partial and with_weight)


def test_two_phase_equals_single_pass():
    """Phase 1 over the completed blocks, then phase 2 with the partial: the formula over all of them."""
    srcs = [_leaf(3, 5, D, seed=i) for i in range(4)]
    Q, G = _leaf(2, D, seed=8), (1 + 0.5 * _leaf(2, D, seed=9)).detach()
    partial = _leaf(3, 5, D, seed=12)
    out, lse = OPS.attn_res_phase1(srcs, Q, G, EPS)
    for j in range(2):
        y = OPS.attn_res_phase2(out[j], lse[j], partial, Q[j], G[j], EPS, 5.0)
        _assert_exact(y, f_attn_res(srcs + [partial], Q[j], G[j], EPS, 5.0))


@pytest.mark.parametrize("with_weight", [True, False])
@pytest.mark.parametrize("with_out_weight", [True, False])
def test_normed_op(with_weight, with_out_weight):
    srcs = [_leaf(*SHAPE, seed=i) for i in range(3)]
    q = _leaf(D, seed=4)
    g = [_gain(5)] if with_weight else []
    wo = [_gain(6)] if with_out_weight else []
    ins = srcs + [q] + g + wo

    def unpack(t):
        rest = list(t[4:])
        return list(t[:3]), t[3], rest.pop(0) if with_weight else None, rest.pop(0) if with_out_weight else None

    def op(*t):
        s, q, g, wo = unpack(t)
        return OPS.attn_res_normed(s, q, g, EPS, 3.0, wo, OUT_EPS)

    def formula(*t):
        s, q, g, wo = unpack(t)
        return f_normed(s, q, g, EPS, 3.0, wo, OUT_EPS)

    _check(op, formula, ins, with_weight and with_out_weight)
    for k in (0, 1):  # only one output read: the other's gradient arrives as None
        y, want = op(*ins), formula(*ins)
        gy = torch.randn(SHAPE, generator=torch.Generator().manual_seed(k), dtype=F64)
        for a, b in zip(_grads(y[k], ins, gy), _grads(want[k], ins, gy)):
            _assert_exact(a, b)


@pytest.mark.parametrize("with_partial", [True, False])
@pytest.mark.parametrize("with_weights", [True, False])
def test_phase2_normed_op(with_partial, with_weights):
    ins = _phase2_ins(with_partial, with_weights, extra=[_gain(6)] if with_weights else [])

    def unpack(t):
        o1, l1, p, q, g, rest = _unpack_phase2(t, with_partial, with_weights)
        return o1, l1, p, q, g, (rest[0] if with_weights else None)

    def op(*t):
        o1, l1, p, q, g, wo = unpack(t)
        return OPS.attn_res_phase2_normed(o1, l1, p, q, g, EPS, 2.5, wo, OUT_EPS)

    def formula(*t):
        o1, l1, p, q, g, wo = unpack(t)
        return f_phase2_normed(o1, l1, p, q, g, EPS, 2.5, wo, OUT_EPS)

    _check(op, formula, ins, with_partial and with_weights)
    for k in (0, 1):  # only one output read: the other's gradient arrives as None
        y, want = op(*ins), formula(*ins)
        gy = torch.randn(SHAPE, generator=torch.Generator().manual_seed(k), dtype=F64)
        for a, b in zip(_grads(y[k], ins, gy), _grads(want[k], ins, gy)):
            _assert_exact(a, b)


@pytest.mark.parametrize("op", ["attn_res_normed", "attn_res_phase2_normed"])
def test_normed_ops_without_the_mix(op):
    """return_mix=False (what the compile backend emits): the first output is empty; the normed form
    and its gradients are the formula's, also against finite differences."""
    srcs = [_leaf(*SHAPE, seed=i) for i in range(3)]
    q, g, wo = _leaf(D, seed=4), _gain(5), _gain(6)
    if op == "attn_res_normed":
        ins = srcs + [q, g, wo]

        def call(*t):
            return OPS.attn_res_normed(list(t[:3]), t[3], t[4], EPS, 3.0, t[5], OUT_EPS, return_mix=False)[1]

        def formula(*t):
            return f_normed(list(t[:3]), t[3], t[4], EPS, 3.0, t[5], OUT_EPS)[1]

        args = (srcs, q, g, EPS, 3.0, wo, OUT_EPS)
    else:
        o1, l1, p = _leaf(*SHAPE, seed=1), _leaf(*SHAPE[:-1], seed=2), _leaf(*SHAPE, seed=3)
        ins = [o1, l1, p, q, g, wo]

        def call(*t):
            return OPS.attn_res_phase2_normed(*t[:5], EPS, 2.5, t[5], OUT_EPS, return_mix=False)[1]

        def formula(*t):
            return f_phase2_normed(*t[:5], EPS, 2.5, t[5], OUT_EPS)[1]

        args = (o1, l1, p, q, g, EPS, 2.5, wo, OUT_EPS)
    mix, normed = getattr(OPS, op)(*args, return_mix=False)
    assert mix.numel() == 0
    _check(call, formula, ins, False)
    torch.library.opcheck(getattr(OPS, op).default, args, {"return_mix": False})


@pytest.mark.parametrize("other_reader", [True, False])
def test_phase2_add_normed_op(other_reader):
    """attn_res_phase2_add_normed: (prev + delta, the phase-2 merge with it, RMS-normed), values and all
    gradients against the formula, with and without another reader of the updated partial (its
    gradient enters the fused backward), and against finite differences."""
    o1, l1 = _leaf(*SHAPE, seed=1), _leaf(*SHAPE[:-1], seed=2)
    prev, delta = _leaf(*SHAPE, seed=3), _leaf(*SHAPE, seed=7)
    q, g, wo = _leaf(D, seed=4), _gain(5), _gain(6)
    ins = [o1, l1, prev, delta, q, g, wo]

    def op(*t):
        y = OPS.attn_res_phase2_add_normed(*t[:6], EPS, 2.5, t[6], OUT_EPS)
        return y if other_reader else y[1]

    def formula(*t):
        y = f_phase2_add_normed(*t[:6], EPS, 2.5, t[6], OUT_EPS)
        return y if other_reader else y[1]

    _check(op, formula, ins, other_reader)
    f = torch.float32
    args = tuple(t.detach().to(f).requires_grad_() if isinstance(t, torch.Tensor) else t
                 for t in (o1, l1, prev, delta, q, g, EPS, 2.5, wo, OUT_EPS))
    _opcheck(OPS.attn_res_phase2_add_normed.default, args)


def _opcheck(op, args, kwargs=None):
    torch.library.opcheck(op, args, kwargs)  # schema, autograd registration, fake tensor, aot dispatch (dynamic)


def test_opcheck_attn_res():
    srcs = [_leaf(2, 3, 8, seed=i, dtype=torch.float32) for i in range(3)]
    _opcheck(OPS.attn_res.default, (srcs, _leaf(8, seed=5, dtype=torch.float32), _leaf(8, seed=6, dtype=torch.float32), 1e-6, 3.0))
    _opcheck(OPS.attn_res.default, (srcs, _leaf(8, seed=5, dtype=torch.float32), None, 1e-6, 1.0))


def test_opcheck_phase1():
    srcs = [_leaf(2, 3, 8, seed=i, dtype=torch.float32) for i in range(3)]
    Q, G = _leaf(4, 8, seed=7, dtype=torch.float32), _leaf(4, 8, seed=8, dtype=torch.float32)
    _opcheck(OPS.attn_res_phase1.default, (srcs, Q, G, 1e-6))
    _opcheck(OPS.attn_res_phase1.default, (srcs, Q, None, 1e-6))


def test_opcheck_phase1_backward_ops():
    """The backward ops themselves (schema, fake kernel, dispatch), one gradient per query."""
    f = torch.float32
    srcs = [_leaf(2, 3, 8, seed=i, dtype=f).detach() for i in range(3)]
    Q, G, wo = (_leaf(*s, seed=k, dtype=f).detach() for k, s in ((7, (4, 8)), (8, (4, 8)), (9, (8,))))
    douts = [_leaf(2, 3, 8, seed=20 + j, dtype=f).detach() for j in range(4)]
    _, lse = OPS.attn_res_phase1(srcs, Q, G, 1e-6)
    dlse = _leaf(4, 2, 3, seed=30, dtype=f).detach()
    acc = [None, _leaf(2, 3, 8, seed=40, dtype=f).detach(), None]  # accumulated into source 1's gradient
    _opcheck(OPS.attn_res_phase1_backward.default, (douts, dlse, srcs, Q, G, 1e-6, lse, [None] * 3))
    _opcheck(OPS.attn_res_phase1_backward.default, (douts, dlse, srcs, Q, G, 1e-6, lse, acc))
    _opcheck(OPS.attn_res_phase1_normed_backward.default,
             (douts[0], douts[1:], dlse, srcs, Q, G, 1e-6, 2.0, wo, 1e-5, lse, acc))
    _opcheck(OPS.attn_res_phase1_normed_backward.default,
             (douts[0], douts[1:], dlse, srcs, Q, None, 1e-6, 1.0, None, 1e-6, lse, [None] * 3))


def test_opcheck_add_linear_():
    """The in-place GEMM accumulate (a mutating op: opcheck checks the declared mutation too)."""
    f = torch.float32
    p = _leaf(2, 3, 8, seed=1, dtype=f).detach()
    x, w = _leaf(2, 3, 5, seed=2, dtype=f).detach(), _leaf(8, 5, seed=3, dtype=f).detach()
    _opcheck(OPS.add_linear_.default, (p, x, w))


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


def test_opcheck_merge_backward_ops_with_accumulate():
    """The merges' backward ops with a gradient to accumulate (what fold_grad_sums gives them)."""
    f = torch.float32
    srcs = [_leaf(2, 3, 8, seed=i, dtype=f).detach() for i in range(2)]
    q, g, wo = (_leaf(8, seed=k, dtype=f).detach() for k in (4, 5, 6))
    gn, acc = _leaf(2, 3, 8, seed=7, dtype=f).detach(), _leaf(2, 3, 8, seed=8, dtype=f).detach()
    _opcheck(OPS.attn_res_normed_backward.default, (None, gn, srcs, q, g, 1e-6, 3.0, wo, 1e-5, [acc, None]))
    _opcheck(OPS.attn_res_normed_backward.default, (gn, gn, srcs, q, None, 1e-6, 1.0, None, 1e-6, [None, acc]))
    o1, l1, p = srcs[0], _leaf(2, 3, seed=2, dtype=f).detach(), srcs[1]
    _opcheck(OPS.attn_res_phase2_normed_backward.default, (None, gn, o1, l1, p, q, g, 1e-6, 2.0, wo, 1e-5, [acc]))
    _opcheck(OPS.attn_res_phase2_normed_backward.default, (gn, gn, o1, l1, None, q, None, 1e-6, 1.0, None, 1e-6, [None]))


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
