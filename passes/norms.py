"""What counts as a normalization: by meaning, not by spelling.

A node ``n`` is the output of a norm of ``x`` when, as a function of ``x`` (everything else fixed),
it is scale-invariant (``n(c x) == n(x)``) and not constant. This covers ``nn.LayerNorm``,
``nn.RMSNorm``, a model's own RMSNorm class, ``F.layer_norm``/``F.rms_norm`` and an inlined
``x * rsqrt(mean(x^2) + eps) * w`` alike. Known norm modules/functions fed directly by ``x`` skip the
numeric probe.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

NORM_FUNCTIONS = {F.layer_norm, torch.layer_norm, F.rms_norm, getattr(torch, "rms_norm", F.rms_norm)}
NORM_MODULE_TYPES = (nn.LayerNorm, nn.RMSNorm)


def is_norm_module(m: nn.Module) -> bool:
    return isinstance(m, NORM_MODULE_TYPES) or type(m).__name__.endswith(("RMSNorm", "LayerNorm", "RmsNorm"))


def is_known_norm(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return is_norm_module(gm.get_submodule(node.target))
    return node.op == "call_function" and node.target in NORM_FUNCTIONS


def describe(gm: fx.GraphModule, node: fx.Node) -> str:
    """A module path for a norm node, or what it is and where it sits."""
    if node.op == "call_module":
        return str(node.target)
    where = module_path(node)
    return f"{where}:{node.name}" if where else node.name  # node names tell two inlined norms apart


def module_path(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    return next(reversed(stack.values()))[0]


def _random_like(x: torch.Tensor, seed: int) -> torch.Tensor:
    """Standard normal values of x's shape, dtype and device, reproducible (drawn on the CPU)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(x.shape, generator=gen, dtype=torch.float32).to(device=x.device, dtype=x.dtype)


class _RegionRunner(fx.Interpreter):
    """Re-evaluates a few nodes of a graph with one input replaced, everything else from a recording."""

    def __init__(self, gm: fx.GraphModule, recorded: dict[fx.Node, Any]):
        super().__init__(gm, garbage_collect_values=False)
        self.recorded = recorded

    def evaluate(self, region: Iterable[fx.Node], x_node: fx.Node, x_value: torch.Tensor, out: fx.Node):
        self.env = dict(self.recorded)
        self.env[x_node] = x_value
        for node in region:
            self.env[node] = self.run_node(node)
        return self.env[out]


@torch.no_grad()
def probe_scale_invariant(
    gm: fx.GraphModule,
    recorded: dict[fx.Node, Any],
    region: list[fx.Node],
    x_node: fx.Node,
    out: fx.Node,
) -> bool:
    """True when ``out`` (computed from ``x_node`` through ``region``) is a normalization of ``x``."""
    x = recorded.get(x_node)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return False
    runner = _RegionRunner(gm, recorded)
    base, other = _random_like(x, seed=1234), _random_like(x, seed=1235)
    try:
        y_small = runner.evaluate(region, x_node, base * 4, out)
        y_large = runner.evaluate(region, x_node, base * 16, out)
        y_other = runner.evaluate(region, x_node, other * 4, out)
    except Exception:  # noqa: BLE001 - a region that cannot be re-run is not a norm we can vouch for
        return False
    if not all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in (y_small, y_large, y_other)):
        return False
    y_small, y_large, y_other = (t.double() for t in (y_small, y_large, y_other))
    mag = y_small.abs().max().clamp_min(1e-30)
    invariant = ((y_small - y_large).abs().max() / mag) < 1e-2
    depends_on_x = ((y_small - y_other).abs().max() / mag) > 1e-3
    return bool(invariant and depends_on_x)


@torch.no_grad()
def reads_only_metadata(gm: fx.GraphModule, recorded: dict[fx.Node, Any], user: fx.Node, x_node: fx.Node) -> bool:
    """True when ``user`` reads ``x_node`` only for its shape/dtype/device (a mask builder, a rotary
    embedding taking x for its dtype): its output does not change when x's values do."""
    x = recorded.get(x_node)
    if not isinstance(x, torch.Tensor) or user.op == "output":
        return False
    noise = _random_like(x, seed=4321)
    # Re-run both ways now rather than comparing with the recording: objects among the inputs (a KV
    # cache) may have changed state since it was made.
    runner = _RegionRunner(gm, recorded)
    try:
        before = runner.evaluate([user], x_node, x, user)
        after = runner.evaluate([user], x_node, noise, user)
    except Exception:  # noqa: BLE001
        return False
    return _same_values(before, after)


def _same_values(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
            and a.dtype == b.dtype and bool(torch.equal(a, b))
        )
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same_values(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_values(a[k], b[k]) for k in a)
    if a is b:
        return True
    if type(a) is not type(b) or not isinstance(a, (int, float, bool, str, torch.device, torch.dtype)):
        return False
    return bool(a == b)
