"""Observe: run a model once and record how its modules are called.

In-place conversion (``passes/layerwise.py``) needs, for each module that could hold residual adds,
the very arguments it was called with (to trace it alone) and the very tensors it returned (to see
that the model hands them unchanged to the next such module). Forward hooks give both without
tracing the model's own forward, which may not be traceable at all (shape checks, einops, caches).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from .modes import buffers_restored, in_mode


@dataclass
class ModuleCall:
    path: str  # the module's path in the model ("" for the model itself)
    module: nn.Module
    args: tuple
    kwargs: dict
    output: Any
    order: int  # calls are numbered in the order they start (a parent before its children)

    def tensor_inputs(self) -> list[torch.Tensor]:
        return [t for t in tree_leaves((self.args, self.kwargs)) if isinstance(t, torch.Tensor)]

    def tensor_outputs(self) -> list[torch.Tensor]:
        return [t for t in leaves(self.output) if isinstance(t, torch.Tensor)]


def leaves(value: Any) -> list:
    """Leaves of nested containers, Hugging Face ModelOutputs (dataclasses) included."""
    if hasattr(value, "__dataclass_fields__") and not isinstance(value, torch.Tensor):
        return [leaf for f in value.__dataclass_fields__ for leaf in leaves(getattr(value, f, None))]
    return tree_leaves(value)


def _snapshot(value: Any) -> Any:
    """``value`` with every object that is neither a tensor nor a plain constant deep-copied."""
    if isinstance(value, (tuple, list)):
        return type(value)(_snapshot(v) for v in value)
    if isinstance(value, dict):
        return {k: _snapshot(v) for k, v in value.items()}
    if value is None or isinstance(value, (torch.Tensor, bool, int, float, str, torch.dtype, torch.device)):
        return value
    try:
        return copy.deepcopy(value)
    except Exception:  # noqa: BLE001 - not copyable: keep the object itself
        return value


def observe_calls(model: nn.Module, inputs: tuple, kwargs: dict | None = None) -> tuple[list[ModuleCall], Any]:
    """Run ``model(*inputs, **kwargs)`` once (eval mode, no grad; modes restored afterwards) and
    return every module call in start order, with the model's output."""
    calls: list[ModuleCall] = []
    open_calls: dict[int, list[ModuleCall]] = {}
    handles = []
    for path, module in model.named_modules():  # a module reachable under two paths: its first

        def pre(mod, args, kw, path=path):
            # objects such as a KV cache are copied as they are now: the calls after this one change them
            args, kw = _snapshot(args), _snapshot(kw)
            call = ModuleCall(path, mod, args, dict(kw), None, len(calls))
            calls.append(call)
            open_calls.setdefault(id(mod), []).append(call)

        def post(mod, args, kw, output):
            open_calls[id(mod)].pop().output = output

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post, with_kwargs=True))
    try:
        with in_mode(model, False), buffers_restored(model), torch.no_grad():
            output = model(*inputs, **(kwargs or {}))
    finally:
        for handle in handles:
            handle.remove()
    return calls, output
