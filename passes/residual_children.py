"""Children that add the residual themselves: ``self.mlp(h, residual)`` returning ``residual + g(h)``.

BLOOM's attention and MLP end in ``dropout_add(out, residual)``; Megatron-BERT's ``SelfOutput(h,
input_tensor)`` returns ``input_tensor + dropout(dense(h))``. Seen from the layer that holds them, the
stream goes into a module that is not a norm, and the residual add is hidden inside it.

``split_residual_children`` finds such a call by probing it while the graph runs on the example inputs:
with a stream-like argument replaced by random ``r``, its (first) tensor output must be exactly ``r +``
its output with zeros there, for two different ``r``. Then it rewrites ``child(h, x)`` as ``x + child(h, zeros_like(x))``:
the same function, and exact, since the child computes ``residual + out`` and ``out + 0 == out``. A
child that does anything else with the argument (a post-norm ``norm(x + out)``) fails the probe and is
left alone. The splits are returned, so that another trace of the same module (another call signature,
traced symbolically) applies the same ones without running anything.
"""
from __future__ import annotations

import copy
import operator
from typing import Any

import torch
import torch.fx as fx

from .capture import has_hooks
from .norms import is_norm_module

Split = tuple[str, Any]  # (the child's module path, its argument slot: a position or a keyword)


def split_residual_children(gm: fx.GraphModule, inputs: tuple | None, known: list[Split] | None = None) -> list[Split]:
    """Rewrite ``gm`` in place: the residual children found by running it on ``inputs`` (probing each
    call that takes a stream-like value as it comes, before the call changes anything it was given, a
    KV cache), or the ``known`` splits without running anything. Returns the splits made."""
    if known is None:
        prober = _Prober(gm)
        try:
            with torch.no_grad():
                prober.run(*inputs)
        except Exception:  # noqa: BLE001 - the graph fails on these inputs: record_values says where
            return []
        known = prober.found
    splits: list[Split] = []
    for node in list(gm.graph.nodes):
        if node.op == "call_module":
            for target, slot in known:
                if target == node.target:
                    _split(gm, node, slot)
                    splits.append((target, slot))
    if splits:
        gm.graph.lint()
        gm.recompile()
    return splits


class _Prober(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.extra_traceback = False
        self.found: list[Split] = []
        self.adders: set[fx.Node] = set()  # calls found to add a residual

    def _stream_like(self, arg) -> bool:
        """An argument of the graph, a sum, or the output of a call that added the residual."""
        if not isinstance(arg, fx.Node):
            return False
        if arg.op == "call_function" and arg.target is operator.getitem and arg.args[1] == 0:
            arg = arg.args[0]
        return arg.op == "placeholder" or (arg.op == "call_function" and arg.target is operator.add) or arg in self.adders

    def run_node(self, node: fx.Node):
        slots = []
        module = self.module.get_submodule(node.target) if node.op == "call_module" else None
        # a probe calls the child again: not one whose hooks (or its children's) would see it
        if module is not None and not is_norm_module(module) and _users_read_its_first_tensor(node) \
                and not any(has_hooks(m) for m in module.modules()):
            slots = [slot for slot, arg in _slots(node) if self._stream_like(arg)]
        if not slots:
            return super().run_node(node)
        args, kwargs = self.fetch_args_kwargs_from_env(node)
        before = copy.deepcopy((args, kwargs))  # as the call gets them: it may fill a cache among them
        out = super().run_node(node)
        first = _first_tensor(out)
        for slot in slots:
            x = args[slot] if isinstance(slot, int) else kwargs[slot]
            if (isinstance(x, torch.Tensor) and x.is_floating_point() and first is not None and first.shape == x.shape
                    and _adds_it(self.module.get_submodule(node.target), before, slot, x)):
                self.found.append((node.target, slot))
                self.adders.add(node)
        return out


def _users_read_its_first_tensor(node: fx.Node) -> bool:
    """Every user takes an element of the output (``out[0]``, ``out[1:]``...), or there is no tuple: a
    user of the whole tuple would see the child's output without the residual."""
    getitems = [u for u in node.users if u.op == "call_function" and u.target is operator.getitem]
    return len(getitems) in (0, len(node.users))


def _slots(node: fx.Node) -> list[tuple[Any, Any]]:
    return list(enumerate(node.args)) + list(node.kwargs.items())


def _with(args: tuple, kwargs: dict, slot, value) -> tuple[tuple, dict]:
    args, kwargs = list(args), dict(kwargs)
    if isinstance(slot, int):
        args[slot] = value
    else:
        kwargs[slot] = value
    return tuple(args), kwargs


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


def _adds_it(module, call: tuple, slot, x: torch.Tensor) -> bool:
    """``module(*call)`` with ``x`` at ``slot`` replaced by r is ``r +`` the call with zeros there."""
    generator = torch.Generator().manual_seed(0)

    def run(replacement):
        args, kwargs = _with(*copy.deepcopy(call), slot, replacement)
        try:
            return _first_tensor(module(*args, **kwargs))
        except Exception:  # noqa: BLE001 - a call the probe cannot make: not split
            return None

    base = run(torch.zeros_like(x))
    if base is None or base.shape != x.shape:
        return False
    for _ in range(2):
        r = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        out = run(r)
        if out is None or not torch.equal(out, r + base):
            return False
    return True


def _split(gm: fx.GraphModule, node: fx.Node, slot) -> None:
    x = node.args[slot] if isinstance(slot, int) else node.kwargs[slot]
    with gm.graph.inserting_before(node):
        zeros = gm.graph.call_function(torch.zeros_like, (x,))
    node.args, node.kwargs = _with(node.args, node.kwargs, slot, zeros)
    getitems = [u for u in node.users if u.op == "call_function" and u.target is operator.getitem and u.args[1] == 0]
    for out in getitems or [node]:  # a tuple's first element, or the tensor itself
        with gm.graph.inserting_after(out):
            added = gm.graph.call_function(operator.add, (x, out))
        out.replace_all_uses_with(added, delete_user_cb=lambda user: user is not added)
