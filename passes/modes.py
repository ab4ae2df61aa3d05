"""One graph that follows ``train()``/``eval()``.

Symbolic tracing evaluates ``self.training`` in Python, so a traced-through forward that writes
``F.dropout(x, p, training=self.training)`` or ``p = self.p if self.training else 0.0`` yields a graph
frozen in one mode. ``capture`` traces in both modes; when the two graphs differ only in constants,
``merge_train_eval`` turns each differing constant into ``mode_value(self.training, train, eval)``,
read at run time, so the single graph behaves like the original in either mode.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterator

import torch
import torch.fx as fx
from torch import nn


@contextlib.contextmanager
def in_mode(module: nn.Module, training: bool) -> Iterator[None]:
    """``module.train(training)`` for the block, then every submodule's own flag back as it was."""
    flags = [(m, m.training) for m in module.modules()]
    module.train(training)
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


@fx.wrap
def mode_value(training: bool, if_training: Any, if_eval: Any) -> Any:
    """The value the original code computed in the current mode."""
    return if_training if training else if_eval


class _Structural(Exception):
    """The two traces differ in structure, not just in constants."""


def _merge(a: Any, b: Any, diffs: list) -> Any:
    if isinstance(a, fx.Node) or isinstance(b, fx.Node):
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node) and a.name == b.name):
            raise _Structural
        return a
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) and type(a) is type(b):
        if len(a) != len(b):
            raise _Structural
        return type(a)(_merge(x, y, diffs) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            raise _Structural
        return {k: _merge(a[k], b[k], diffs) for k in a}
    if type(a) is type(b) and a == b:
        return a
    if type(a) in (bool, int, float, type(None)) and type(b) in (bool, int, float, type(None)):
        marker = _Differs(if_eval=a, if_training=b)
        diffs.append(marker)
        return marker
    raise _Structural


class _Differs:
    def __init__(self, if_eval, if_training):
        self.if_eval, self.if_training = if_eval, if_training


def merge_train_eval(gm_eval: fx.GraphModule, gm_train: fx.GraphModule) -> bool:
    """Make ``gm_eval`` follow ``self.training`` where it differs from ``gm_train`` in constants.

    Returns False (and leaves ``gm_eval`` unchanged) when the graphs differ in structure.
    """
    nodes_e, nodes_t = list(gm_eval.graph.nodes), list(gm_train.graph.nodes)
    if len(nodes_e) != len(nodes_t):
        return False
    merged = []
    try:
        for e, t in zip(nodes_e, nodes_t):
            if (e.op, e.target, e.name) != (t.op, t.target, t.name):
                return False
            diffs: list = []
            args = _merge(e.args, t.args, diffs)
            kwargs = _merge(dict(e.kwargs), dict(t.kwargs), diffs)
            if diffs:
                merged.append((e, args, kwargs))
    except _Structural:
        return False
    if not merged:
        return True
    graph = gm_eval.graph
    first = next(iter(graph.nodes))
    with graph.inserting_before(first), warnings.catch_warnings():
        # `training` is a plain attribute of every module, not a parameter/buffer/submodule: FX warns
        warnings.simplefilter("ignore", UserWarning)
        training = graph.get_attr("training")

    def realise(value, node):
        if isinstance(value, _Differs):
            with graph.inserting_before(node):
                return graph.call_function(mode_value, (training, value.if_training, value.if_eval))
        if isinstance(value, (tuple, list)):
            return type(value)(realise(v, node) for v in value)
        if isinstance(value, dict):
            return {k: realise(v, node) for k, v in value.items()}
        return value

    for node, args, kwargs in merged:
        node.args = realise(args, node)
        node.kwargs = realise(kwargs, node)
    graph.lint()
    gm_eval.recompile()
    return True


@contextlib.contextmanager
def buffers_restored(module: nn.Module) -> Iterator[None]:
    """Run ``module`` for our own purposes (observing, tracing, verifying) without changing its state:
    buffers such as a KV cache position (torchtune) get their values back afterwards."""
    saved = [(b, b.detach().clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)
