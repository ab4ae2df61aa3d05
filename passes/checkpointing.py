"""Keep activation checkpointing through the conversion.

FX tracing runs ``torch.utils.checkpoint.checkpoint(fn, ...)`` as a plain call of ``fn``, so a traced
model silently loses its checkpointing (measured: Hugging Face layers after
``gradient_checkpointing_enable()`` came out of ``convert`` with no checkpoint at all). This pass puts
it back for every Hugging Face layer that had it on. Each of the layer's sublayers is checkpointed
on its own: the nodes strictly after the sublayer's pre-norm up to its branch output (attention, MLP)
are outlined into a small graph and called through the layer's own checkpoint function (its
``_gradient_checkpointing_func``, with the user's kwargs) while training with grad enabled, as the
layer did. The aggregations and the norms stay in the main graph, where the compile backend batches
and fuses them. Activations saved: each sublayer's normed input (the layer saved its input).

The outlined graph takes the modules and parameters it uses as inputs instead of holding them, so
nothing is registered twice (``state_dict`` keys unchanged) and ``.to()``/``train()`` act on the
modules it runs.
"""
from __future__ import annotations

import operator
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
from torch import nn

from residual_rewriter.errors import ConversionError

from .plan import Plan, Site

REGIONS = "_rr_checkpointed"  # the submodule holding the outlined sublayers (no parameters)


def checkpointed_layers(model: nn.Module) -> dict[str, Callable]:
    """Module path -> checkpoint function, for the Hugging Face layers with checkpointing on."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # no transformers: nothing of this kind to keep
        return {}
    return {
        name: m._gradient_checkpointing_func
        for name, m in model.named_modules()
        if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing
        and callable(getattr(m, "_gradient_checkpointing_func", None))
    }


def within(path: str, module_path: str) -> bool:
    """``path`` is ``module_path`` or inside it."""
    return path == module_path or path.startswith(module_path + ".")


try:  # Dynamo's hook for side effects inside a checkpoint region (meant for out-of-tree checkpointing)
    from torch._dynamo.utils import _disable_side_effect_safety_checks_for_current_subtracer as _ALLOW_SIDE_EFFECTS
except ImportError:
    _ALLOW_SIDE_EFFECTS = None


def call_module(module: nn.Module, *args, **kwargs):
    # Why: transformers >= 5.25 requires `kernels`, whose `use_kernelized_func` wraps e.g. LlamaAttention's
    # forward to set and then reset a module-global context var (`_ACTIVE_KERNEL_FUNCS`, the per-instance
    # kernel routing). Under torch.compile that store happens inside the checkpoint higher-order op, which
    # Dynamo refuses ("HOP: Unsafe side effect"): a graph break at every checkpointed attention, so the
    # backend saw 4 graphs of <= 2 aggregations instead of one with all 6. The set/reset pair is net-zero
    # (no need to replay it in the recompute), so only for such modules let Dynamo keep it in the region.
    if _ALLOW_SIDE_EFFECTS is not None and torch.compiler.is_compiling() and hasattr(module, "_kernel_funcs"):
        return _ALLOW_SIDE_EFFECTS(module, *args, **kwargs)
    return module(*args, **kwargs)


class CheckpointedSublayer(nn.Module):
    """An outlined sublayer (``body``, a parameter-free GraphModule), run through its layer's checkpoint
    function when the layer would have checkpointed: training, with grad enabled. A plain module, so
    ``deepcopy``/pickling keep ``checkpoint_fn`` (a GraphModule rebuilds itself from its graph and
    would drop it)."""

    def __init__(self, body: fx.GraphModule, checkpoint_fn: Callable):
        super().__init__()
        self.body = body
        self.checkpoint_fn = checkpoint_fn  # e.g. functools.partial(torch.utils.checkpoint.checkpoint, ...)

    def forward(self, *args):
        if self.training and torch.is_grad_enabled():
            return self.checkpoint_fn(self.body, *args)
        return self.body(*args)


def sites_to_checkpoint(plan: Plan, layers: dict[str, Callable]) -> list[tuple[Site, str]]:
    """(site, its layer) for every site inside one of ``layers``. The sublayer is the layer itself in
    parallel blocks (GPT-NeoX, GPT-J, Falcon) and where a branch ends in the layer's own code
    (DINOv2's layer scale)."""
    found = []
    for site in plan.sites:
        layer = next((p for p in layers if within(site.sublayer, p)), None)
        if layer is not None:
            found.append((site, layer))
    return found


def keep_checkpointing(gm: fx.GraphModule, plan: Plan, layers: dict[str, Callable]) -> list[str]:
    """Outline and checkpoint the sublayers of ``layers`` in ``gm`` (after the rewrite). Returns the
    sublayer paths now checkpointed; raises if a sublayer of such a layer cannot be."""
    if not layers:
        return []
    kept = []
    nodes = {n.name: n for n in gm.graph.nodes}
    for site, layer in sites_to_checkpoint(plan, layers):
        region = _region(gm.graph, nodes[site.norm_node], nodes[site.branch_node])
        if region is None:
            raise ConversionError(
                f"{site.sublayer}: its layer {layer} had gradient checkpointing on, and its nodes between the norm "
                f"and the branch output do not form one region this pass can checkpoint. Convert with "
                f"checkpointing off (model.gradient_checkpointing_disable()) and checkpoint the converted model"
            )
        _outline(gm, region, layers[layer], f"{len(kept)}")
        kept.append(site.sublayer)
    gm.graph.lint()
    gm.recompile()
    return kept


def _region(graph: fx.Graph, norm: fx.Node, branch: fx.Node) -> Optional[list[fx.Node]]:
    """The nodes strictly after ``norm`` up to ``branch``, in graph order, if that is a region."""
    nodes = list(graph.nodes)
    start, end = nodes.index(norm) + 1, nodes.index(branch) + 1
    region = nodes[start:end]
    if not region or any(n.op in ("placeholder", "output") for n in region):
        return None
    return region


def _outline(gm: fx.GraphModule, region: list[fx.Node], checkpoint_fn: Callable, key: str) -> None:
    graph, inside = gm.graph, set(region)
    sub = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    inputs: list[Any] = []  # main-graph values passed in: outside nodes and the modules called inside

    def arg_of(n: fx.Node) -> fx.Node:
        if n not in env:  # a value from outside the region: a placeholder
            env[n] = sub.placeholder(f"in_{len(inputs)}")
            inputs.append(n)
        return env[n]

    for node in region:
        if node.op == "get_attr":  # parameters/buffers come in as inputs (nothing held twice)
            env[node] = sub.placeholder(f"in_{len(inputs)}")
            inputs.append(("get_attr", node.target))
        elif node.op == "call_module":
            mod = sub.placeholder(f"in_{len(inputs)}")
            inputs.append(("get_attr", node.target))
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), arg_of)
            env[node] = sub.call_function(call_module, (mod, *args), kwargs)
        else:
            env[node] = sub.node_copy(node, arg_of)
    outputs = [n for n in region if any(u not in inside for u in n.users)]
    sub.output(tuple(env[n] for n in outputs))
    outlined = CheckpointedSublayer(fx.GraphModule(nn.Module(), sub, class_name="SublayerBody"), checkpoint_fn)
    if not hasattr(gm, REGIONS):
        gm.add_module(REGIONS, nn.Module())
    getattr(gm, REGIONS).add_module(key, outlined)

    with graph.inserting_before(region[0]):
        args = [graph.get_attr(v[1]) if isinstance(v, tuple) else v for v in inputs]
        call = graph.call_module(f"{REGIONS}.{key}", tuple(args))
        results = [graph.call_function(operator.getitem, (call, i)) for i in range(len(outputs))]
    for old, new in zip(outputs, results):
        old.replace_all_uses_with(new, delete_user_cb=lambda user: user not in inside)
    for node in reversed(region):
        graph.erase_node(node)
