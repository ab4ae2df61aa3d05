"""``fold_grad_sums`` (passes/lowering/fold_grad_sums.py): the stream tensors' gradient sums folded into
our backward ops' ``accumulate`` inputs, on the backward graph AOT autograd derives. The library ops
are kept (``lower=None``: their CPU implementations run), so the folded graph itself runs here."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from residual_rewriter.backend import make_attnres_backend
from residual_rewriter.passes.lowering.common import PHASE1, PHASE1_NORMED, library_op, value
from residual_rewriter.passes.lowering.fold_grad_sums import fold_grad_sums

from test_backend import _converted, assert_matches_eager

OPS = torch.ops.residual_rewriter


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _traffic_model():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "backend" / "traffic_model.py"
    sys.path.insert(0, str(path.parent))
    try:
        spec = importlib.util.spec_from_file_location("traffic_model", path)
        tool = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tool)
    finally:
        sys.path.remove(str(path.parent))
    return tool


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
    assert folded == _traffic_model().converted_passes(graph, stream_shape)["folded"] >= 3


def test_switched_off_folds_nothing():
    conv, x, _ = _converted("llama", 2)
    backend = make_attnres_backend(compiler="aot_eager", lower=None, fold_grad_sums=False)
    assert_matches_eager(conv, x, backend)
    assert "fold_grad_sums" not in backend.last_log.passes


def test_inductor_runs_the_fold_as_its_post_grad_pass():
    """The same through inductor (its post_grad_custom_pre_pass), the ops as fallback kernels."""
    conv, x, _ = _converted("llama", 2)
    backend = make_attnres_backend(lower=None)
    assert_matches_eager(conv, x, backend, grad_tol=1e-3)
    assert backend.last_log["fold_grad_sums"]["folded"] >= 3


# ---- the rule, on hand-made backward graphs ----------------------------------------------------


def _merge_backward_graph(other_first: bool, two_readers: bool = False, other_dtype=torch.float32):
    """A backward graph as AOT autograd writes it: a merge's backward op, and its source-1 gradient
    summed with ``other`` (computed before the op when ``other_first``)."""
    def fn(gn, s0, s1, q, g, extra):
        other = extra * 2 if other_first else None
        grads = OPS.attn_res_normed_backward.default(None, gn, [s0, s1], q, g, 1e-6, 2.0, None, 1e-5, [None, None])
        if other is None:
            other = extra * 2
        total = torch.ops.aten.add.Tensor(grads[1], other)
        return (total, grads[1] * 3) if two_readers else (total, grads[0])

    t = [torch.randn(2, 3, 8) for _ in range(3)]
    extra = torch.randn(2, 3, 8, dtype=other_dtype)
    return torch.fx.experimental.proxy_tensor.make_fx(fn)(t[0], t[1], t[2], torch.randn(8), torch.rand(8) + 1, extra)


def _accumulate_of(gm):
    (bwd,) = [n for n in gm.graph.nodes if n.op == "call_function" and "attn_res_normed_backward" in str(n.target)]
    return bwd.args[-1]


def test_rule_folds_a_sum_computed_before_the_op():
    gm = _merge_backward_graph(other_first=True)
    counts = fold_grad_sums(gm.graph)
    gm.graph.lint()
    assert counts == {"folded": 1, "candidates_left": 0}
    acc = _accumulate_of(gm)
    assert acc[0] is None and acc[1] is not None and acc[1].target is torch.ops.aten.mul.Tensor
    assert not [n for n in gm.graph.nodes if n.target is torch.ops.aten.add.Tensor]


@pytest.mark.parametrize("case", ["sum computed after the op", "gradient read twice", "dtypes differ"])
def test_rule_leaves_what_it_cannot_fold(case):
    gm = _merge_backward_graph(other_first=case != "sum computed after the op", two_readers=case == "gradient read twice",
                               other_dtype=torch.float64 if case == "dtypes differ" else torch.float32)
    assert fold_grad_sums(gm.graph) == {"folded": 0, "candidates_left": 1}
    assert _accumulate_of(gm) == [None, None]
