"""``fold_grad_sums`` (passes/lowering/fold_grad_sums.py): the stream tensors' gradient sums folded into
our backward ops' ``accumulate`` inputs, on the backward graph AOT autograd derives. The library ops
are kept (``lower=None``: their CPU implementations run), so the folded graph itself runs here."""
from __future__ import annotations

import types

import pytest
import torch

from residual_rewriter.backend import make_attnres_backend
from residual_rewriter.passes.lowering.common import PHASE1, PHASE1_NORMED, library_op, value
from residual_rewriter.passes.lowering.fold_grad_sums import fold_grad_sums, inductor_pass

from model_zoo import logits_of
from test_backend import _converted, _fresh_dynamo, assert_matches_eager, load_traffic_model  # noqa: F401 (fixture)

OPS = torch.ops.residual_rewriter


@pytest.mark.parametrize("kind,block_size", [("llama", 2), ("llama", 3), ("gpt", 2)])
def test_folded_backward_matches_eager_and_the_traffic_model(kind, block_size):
    """Non-zero queries (a wrong slot or a dropped sum changes the gradients); as many sums folded as
    the traffic model counts on the same forward graph (so its training floor is what the backend runs)."""
    conv, x, _ = _converted(kind, block_size)
    backend = make_attnres_backend(compiler="aot_eager", lower=None, keep_graphs=True)
    assert_matches_eager(conv, x, backend)
    folded = backend.last_log["fold_grad_sums"]["folded"]
    graph = backend.graphs[-1]
    first_phase1 = next(n for n in graph.nodes if library_op(n) in (PHASE1, PHASE1_NORMED))
    stream_shape = tuple(value(first_phase1.args[0][0]).shape)
    assert folded == load_traffic_model().converted_passes(graph, stream_shape)["folded"] >= 3


def test_automatic_dynamic_sequence_length_training():
    """A second sequence length recompiles with symbolic shapes (torch.compile's default): the backward
    graph is folded as the static one was, and both lengths train as eager."""
    conv, x, _ = _converted("llama", 2)
    backend = make_attnres_backend(compiler="aot_eager", lower=None)
    compiled = torch.compile(conv, backend=backend)
    for seq in (12, 7, 9):
        conv.zero_grad(set_to_none=True)
        logits_of(compiled(x[:, :seq])).float().pow(2).mean().backward()
        got = {n: p.grad.clone() for n, p in conv.named_parameters() if p.grad is not None}
        conv.zero_grad(set_to_none=True)
        logits_of(conv(x[:, :seq])).float().pow(2).mean().backward()
        for n, p in conv.named_parameters():
            if p.grad is not None:
                torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6)
    static, dynamic = backend.logs  # 7 and 9 share the symbolic graph
    assert dynamic["fold_grad_sums"]["folded"] == static["fold_grad_sums"]["folded"] >= 3


def test_switched_off_folds_nothing():
    conv, x, _ = _converted("llama", 2)
    backend = make_attnres_backend(compiler="aot_eager", lower=None, fold_grad_sums=False)
    assert_matches_eager(conv, x, backend)
    assert "fold_grad_sums" not in backend.last_log.passes


def test_inductor_runs_the_fold_as_its_post_grad_pass():
    """The same through inductor (its post_grad_custom_pre_pass), the ops as fallback kernels. The
    caches are off: a cached backward is not recompiled, so its pass would not run (nor log) again."""
    conv, x, _ = _converted("llama", 2)
    backend = make_attnres_backend(lower=None, inductor_config={"fx_graph_cache": False})
    with torch._functorch.config.patch(enable_autograd_cache=False):
        assert_matches_eager(conv, x, backend, grad_tol=1e-3)
    assert backend.last_log["fold_grad_sums"]["folded"] >= 3


# ---- the rule, on hand-made backward graphs ----------------------------------------------------


def _merge_backward_graph(other: str = "before", two_readers: bool = False, other_dtype=torch.float32):
    """A backward graph as AOT autograd writes it: a merge's backward op, and its source-1 gradient
    summed with another gradient computed ``other`` = "before" the op, "after" it (independently), or
    "from it" (from the op's source-0 gradient)."""
    def fn(gn, s0, s1, q, g, extra):
        before = extra * 2 if other == "before" else None
        grads = OPS.attn_res_normed_backward.default(None, gn, [s0, s1], q, g, 1e-6, 2.0, None, 1e-5, [None, None])
        summand = {"before": before, "after": extra * 2, "from it": grads[0] * 2}[other]
        total = torch.ops.aten.add.Tensor(grads[1], summand)
        return (total, grads[1] * 3) if two_readers else (total, grads[0])

    t = [torch.randn(2, 3, 8) for _ in range(3)]
    extra = torch.randn(2, 3, 8, dtype=other_dtype)
    return torch.fx.experimental.proxy_tensor.make_fx(fn)(t[0], t[1], t[2], torch.randn(8), torch.rand(8) + 1, extra)


def _accumulate_of(gm):
    (bwd,) = [n for n in gm.graph.nodes if n.op == "call_function" and "attn_res_normed_backward" in str(n.target)]
    return bwd.args[-1]


@pytest.mark.parametrize("other", ["before", "after"])
def test_rule_folds_a_sum_that_does_not_depend_on_the_op(other):
    """Computed after the op, the other summand is folded too: the op moves after it (stable
    topological sort), and the folded graph computes what the original did."""
    gm = _merge_backward_graph(other)
    inputs = [torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    inputs += [torch.randn(8), torch.rand(8) + 1, torch.randn(2, 3, 8)]
    want = gm(*inputs)
    counts = fold_grad_sums(gm.graph)
    gm.graph.lint()  # fails on a node that reads a value computed after it
    gm.recompile()
    assert counts == {"folded": 1, "candidates_left": 0}
    acc = _accumulate_of(gm)
    assert acc[0] is None and acc[1] is not None and acc[1].target is torch.ops.aten.mul.Tensor
    assert not [n for n in gm.graph.nodes if n.target is torch.ops.aten.add.Tensor]
    for a, b in zip(gm(*inputs), want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("case", ["sum computed from the op", "gradient read twice", "dtypes differ"])
def test_rule_leaves_what_it_cannot_fold(case):
    gm = _merge_backward_graph("from it" if case == "sum computed from the op" else "before",
                               two_readers=case == "gradient read twice",
                               other_dtype=torch.float64 if case == "dtypes differ" else torch.float32)
    assert fold_grad_sums(gm.graph) == {"folded": 0, "candidates_left": 1}
    assert _accumulate_of(gm) == [None, None]


def test_inductor_gets_the_pass_before_the_users_own(monkeypatch):
    """The backend hands inductor its post-grad pass, which runs a user's own after it (one pass: torch < 2.13
    takes no list); a graph without our ops gets none (it goes to inductor untouched). Inductor's cache keys
    on both passes, and is bypassed where a user's pass gives it no key."""
    import torch._inductor.compile_fx as cfx

    seen = []

    def fake_compile_fx(gm, example_inputs, config_patches=None):
        seen.append(config_patches or {})
        return gm.forward

    monkeypatch.setattr(cfx, "compile_fx", fake_compile_fx)

    ran = []

    def users_pass(graph):
        ran.append(graph)

    conv, x, _ = _converted("llama", 2)
    backend = make_attnres_backend(lower=None, inductor_config={"post_grad_custom_pre_pass": users_pass})
    torch.compile(conv, backend=backend)(x)
    (patches,) = seen
    ours = patches["post_grad_custom_pre_pass"]
    assert type(ours).__name__ == "InductorFoldGradSums" and ours.uuid() is None  # users_pass has no uuid
    graph = _merge_backward_graph("before").graph
    ours(graph)  # folds, then hands the folded graph to the user's pass
    assert ran == [graph] and _accumulate_of(types.SimpleNamespace(graph=graph))[1] is not None

    from torch._inductor.custom_graph_pass import CustomGraphPass

    class Keyed(CustomGraphPass):
        def __call__(self, graph):
            ran.append(graph)

        def uuid(self):
            return "theirs-v1"

    keys = inductor_pass(then=[Keyed()]).uuid(), inductor_pass().uuid()
    assert keys[0][1:] == ("theirs-v1",) and keys[0][0] == keys[1][0]
    seen.clear()
    torch._dynamo.reset()
    torch.compile(torch.nn.Linear(4, 4), backend=make_attnres_backend())(torch.randn(2, 4))
    assert seen == [{}]
