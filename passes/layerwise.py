"""Layerwise: rewrite only the forwards that hold residual adds, leaving the model's own Python intact.

    observe ─▶ holders ─▶ chains (streams) ─▶ global blocks ─▶ per holder: rewrite + install

* **Observe.** One run with hooks on every module records each call's very arguments and outputs
  (the model's own forward may not be traceable at all: shape checks, einops, caches).
* **Holders.** Module calls, outermost first, each traced alone on the arguments the model gave it,
  its own children kept whole. One whose sites take the stream as an argument and return it is a
  holder (a decoder layer, T5's ``T5LayerSelfAttention``); else its children are tried (T5's
  ``T5Block``). When no module holds them, the model itself is the one holder (``trace_model``).
* **Chains.** Holders where the tensor one returns is the very tensor the next receives form a
  stream; its sublayers are split into blocks over the whole chain.
* **Install.** Each holder's graph takes and returns an ``AttnResState`` in place of the stream
  tensor (the first takes b_0, the last returns the final aggregation); ``LayerForward`` becomes the
  holder's ``forward`` and runs that code with the holder as ``self``, one graph per mode and call
  signature (``self.training`` branches and constants such as ``use_cache`` specialised). Sites are
  found once, in eval mode; every other graph is traced symbolically and mapped onto them (``retrace``).
"""
from __future__ import annotations

import copy
import inspect
import operator
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Optional

import networkx as nx
import torch
import torch.fx as fx
from torch import nn
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map, tree_unflatten

from .capture import Captured, capture, has_hooks, in_mode, is_direct_child, is_opaque_by_class, state_restored
from .detect import MULTIPLIES, build_plan, common_prefix, is_norm_module, record_values, split_residual_children, uncast
from .errors import ConversionError, first_line
from .graph_pickle import graph_module_to_pickle, graph_to_pickle, unpickled_graph, unpickled_graph_module
from .plan import Plan, Site, assign_parameter_names, place_blocks, place_in_blocks
from .rewrite import AttnResParameters, LayerBoundary, apply_plan
from .state import AttnResState, aligned

_CONSTANT_TYPES = (bool, int, float, str, type(None))
_PLAIN = {tuple: "tuple", list: "list", dict: "dict", AttnResState: "AttnResState"}


# Observing the model's module calls
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
    """``value`` (containers rebuilt by pytree: namedtuples, ModelOutputs) with every object that is
    neither a tensor nor a plain constant deep-copied. A torch.Size stays one (pytree would make it a tuple:
    another graph key than the model's own calls, BEiT's ``resolution``)."""
    return tree_map(_snapshot_leaf, value, is_leaf=lambda v: isinstance(v, torch.Size))


def _snapshot_leaf(value: Any) -> Any:
    if value is None or isinstance(value, (torch.Tensor, bool, int, float, str, torch.dtype, torch.device)):
        return value
    try:
        return copy.deepcopy(value)
    except Exception:  # noqa: BLE001 - not copyable: keep the object itself
        return value


def observe_calls(model: nn.Module, inputs: tuple, kwargs: dict | None = None) -> tuple[list[ModuleCall], Any]:
    """Run ``model(*inputs, **kwargs)`` once (eval mode, no grad; modes restored afterwards) on a copy of
    the inputs (a KV cache passed in is not filled) and return every module call in start order, with
    the model's output."""
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
        inputs, kwargs = detached_copy([inputs, kwargs or {}])
        with in_mode(model, False), state_restored(model), torch.no_grad():
            output = model(*inputs, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return calls, output


# Binding a call to the forward's parameters
def is_constant(value: Any) -> bool:
    """Specialised into a traced graph (a new value means a new graph): plain Python constants."""
    if isinstance(value, _CONSTANT_TYPES):
        return True
    return isinstance(value, (tuple, list)) and all(isinstance(v, _CONSTANT_TYPES) for v in value)


@dataclass
class BoundCall:
    names: list[str]  # arguments passed to the graph, in order (tensors and objects)
    values: list[Any]
    constants: dict[str, Any]  # specialised into the graph

    @property
    def key(self) -> tuple:
        """Which graph runs this call; ``**kwargs`` in another order are another call (a graph keeps the order
        it was traced in). Another object (a StaticCache where a DynamicCache was seen) runs the same graph."""
        return self.installed_key("", first=True)

    def installed_key(self, stream_argument: str, first: bool) -> tuple:
        """The key of this call once the model is converted: every holder but the first receives the
        stream as an ``AttnResState``, not the tensor the original passed."""
        kinds = {n: _kind(v) for n, v in zip(self.names, self.values)}
        if stream_argument and not first:
            kinds[stream_argument] = "AttnResState"
        return tuple(kinds.items()) + tuple(sorted((k, repr(v)) for k, v in self.constants.items()))

    def with_inputs(self, names: tuple[str, ...]) -> BoundCall:
        """The same call with these ints passed to the graph as arguments, after the others (a value that is
        not an int, ``None``, stays a constant: another signature). See ``_capture_layer``."""
        moved = [n for n, v in self.constants.items() if n in names and type(v) is int]
        if not moved:
            return self
        return BoundCall(self.names + moved, self.values + [self.constants[n] for n in moved],
                         {n: v for n, v in self.constants.items() if n not in moved})


def _kind(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return "tensor"
    if type(value) in _PLAIN:  # a literal: Dynamo before torch 2.12 cannot hash `tuple.__name__` (a graph key)
        return _PLAIN[type(value)]
    return type(value).__name__ if isinstance(value, (tuple, list, dict, AttnResState)) else "object"


def bind_call(module: nn.Module, args: tuple, kwargs: dict) -> BoundCall:
    """``module(*args, **kwargs)`` as named arguments of its class's forward, defaults included."""
    signature = inspect.signature(type(module).forward)
    bound = signature.bind(module, *args, **kwargs)
    bound.apply_defaults()
    names, values, constants = [], [], {}
    for name, value in list(bound.arguments.items())[1:]:  # [0] is self
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise ConversionError(f"{type(module).__name__}.forward takes *{name}: cannot be traced by argument name")
            continue
        items = value.items() if kind is inspect.Parameter.VAR_KEYWORD else [(name, value)]
        for n, v in items:
            if is_constant(v):
                constants[n] = v
            else:
                names.append(n)
                values.append(v)
    return BoundCall(names, values, constants)


# Tracing one module alone and finding its sites
@dataclass
class Traced:
    captured: Captured
    values: dict
    plan: Plan  # one stream, end = the output; blocks not yet assigned
    stream_argument: str
    starts_inside: bool = False  # the source is a node computed from the stream argument, not it
    int_inputs: tuple[str, ...] = ()  # int arguments passed to the graph, not specialised (with_inputs)


def _capture_call(module: nn.Module, bound: BoundCall, values: list, *, opaque_children: bool, inline=(),
                  **options) -> Captured:
    """``capture`` of ``module``'s class forward called as ``bound`` (constants specialised); ``options``
    (``training``, ``opaque``, ...) as ``capture`` takes them."""
    forward, names, constants = type(module).forward, bound.names, bound.constants

    def call(*args):
        return forward(module, **dict(zip(names, args)), **constants)

    checkpointing = getattr(module, "gradient_checkpointing", None)
    if checkpointing:  # Hugging Face layers checkpoint their forward: trace the computation itself
        module.gradient_checkpointing = False
    try:
        return capture(module, tuple(values), call=call, input_names=list(names), opaque_children=opaque_children,
                       inline=inline, **options)
    finally:
        if checkpointing:
            module.gradient_checkpointing = checkpointing


def _detect(module: nn.Module, bound: BoundCall, captured: Captured, **options) -> tuple[dict, Plan]:
    # running the module must not change it: a KV cache passed in is copied, one held in its buffers
    # (torchtune's cache_pos) restored; detection's norm probes run nodes again too
    with in_mode(module, False), state_restored(module):
        splits = split_residual_children(captured.graph_module, detached_copy(bound.values))
        values = record_values(captured.graph_module, detached_copy(bound.values))
        plan = build_plan(captured.graph_module, values, opaque_modules=captured.opaque_modules, **options)
    plan.residual_children = splits
    return values, plan


def trace_alone(module: nn.Module, bound: BoundCall, inline: tuple = ()) -> Traced:
    """``inline``: children to trace into (they hold a residual add of this module's stream)."""
    captured, bound, int_inputs = _capture_layer(module, bound, inline)
    values, plan = _detect(module, bound, captured, ends_at_output=True)
    plan.inlined_children = list(inline)
    if len(plan.streams) != 1:
        raise ConversionError(f"{len(plan.streams)} residual streams pass through one call")
    stream = plan.streams[0]
    source = next(n for n in captured.graph_module.graph.nodes if n.name == stream.source_node)
    if source.op == "placeholder":
        return Traced(captured, values, plan, source.target, int_inputs=int_inputs)
    # the stream starts inside (RWKV's first layer normalises its input first; ModernBERT's adds a
    # sublayer without a norm): a stream's first layer only, its argument the one input of that shape
    dag = nx.DiGraph((i, n) for n in captured.graph_module.graph.nodes for i in n.all_input_nodes)
    arguments = [n for n in nx.ancestors(dag, source) if n.op == "placeholder"
                 and isinstance(values.get(n), torch.Tensor) and values[n].shape == values[source].shape]
    if len(arguments) != 1:
        raise ConversionError(f"its residual stream starts inside it (at {stream.source}), not at an argument")
    return Traced(captured, values, plan, arguments[0].target, starts_inside=True, int_inputs=int_inputs)


def _capture_layer(module: nn.Module, bound: BoundCall, inline: tuple) -> tuple[Captured, BoundCall, tuple]:
    """The layer's graph, the call as it binds to it, and its int inputs: ints that only the layer's
    children read (packed sequences' ``max_length_q``, new almost every batch) are graph inputs, so a new
    value is the same signature (no new graph; no refusal under a tracer). An int the layer's own code
    computes with or branches on stays a constant, specialised: it may change the graph."""
    ints = tuple(n for n, v in bound.constants.items() if type(v) is int)
    if ints:
        as_inputs = bound.with_inputs(ints)
        try:  # in both modes: install traces the training graph from this call too
            captured = [_capture_call(module, as_inputs, as_inputs.values, opaque_children=True, inline=inline,
                                      training=training) for training in (False, True)]
        except Exception:  # noqa: BLE001 - e.g. Python control flow on one: traced as constants below
            captured = []
        # each read, by children only (an unread one may have been tested in Python: FX records no isinstance)
        placeholders = [n for c in captured for n in c.graph_module.graph.nodes if n.op == "placeholder" and n.target in ints]
        if captured and not any(c.opaque_modules for c in captured) and all(
                n.users and all(u.op == "call_module" for u in n.users) for n in placeholders):
            return captured[0], as_inputs, ints
    return _capture_call(module, bound, bound.values, opaque_children=True, inline=inline), bound, ()


def trace_model(model: nn.Module, bound: BoundCall, *, num_blocks, block_size) -> Traced:
    """The model itself as its single holder: traced whole, its children inlined down to norms and
    attention; its streams start and end inside it (so its blocks are placed here). Where the training
    graph does not map onto the sites (a DropPath traced into adds nodes in training only), the children
    whose forward reads ``self.training`` are kept whole: they follow the mode when they run."""
    for opaque_if_reads_training in (False, True):
        captured = _capture_call(model, bound, bound.values, opaque_children=False,
                                 opaque_if_reads_training=opaque_if_reads_training)
        values, plan = _detect(model, bound, captured, opaque_with_norms=captured.opaque_with_norms)
        place_blocks(plan, num_blocks, block_size)
        try:
            retrace(model, bound, plan, captured.graph_module.graph, whole=True, training=True)
        except ConversionError:
            if opaque_if_reads_training:
                raise
            continue
        return Traced(captured, values, plan, stream_argument="")


def retrace(module: nn.Module, bound: BoundCall, template: Plan, original: fx.Graph, *, whole: bool,
            training: bool) -> Traced:
    """Another mode or call signature of a converted holder, captured symbolically, its sites taken from
    ``template`` (the first trace's plan) once checked against ``original`` (the first call's graph).
    Detection is not run again: it would run the module on values that, under a tracer, are not data."""
    values = [v.blocks[0] if isinstance(v, AttnResState) else v for v in bound.values]  # shape, dtype
    captured = _capture_call(module, bound, values, opaque_children=not whole, inline=tuple(template.inlined_children),
                             training=training, opaque=template.opaque_modules)
    split_residual_children(captured.graph_module, None, known=template.residual_children)
    plan = copy.deepcopy(template)
    nodes = {n.name: n for n in captured.graph_module.graph.nodes}
    problems = _unmapped(plan, nodes, {n.name: n for n in original.nodes})
    if problems:
        raise ConversionError(f"{_called_as(module, bound)} in {'train' if training else 'eval'} mode traces to a graph "
                              f"whose residual sites are not those found at conversion ({'; '.join(problems[:3])}). "
                              f"{_CONVERT_CALLED_THIS_WAY}")
    # no values: the parameters exist already (the rewrite needs a source's value only to create them)
    return Traced(captured, {}, plan, "" if whole else nodes[plan.streams[0].source_node].target)


def _called_as(module: nn.Module, bound: BoundCall) -> str:
    return f"{type(module).__name__} called with {sorted(bound.constants)} and {bound.names}"


_CONVERT_CALLED_THIS_WAY = "Convert with example inputs called this way (convert_(model, example_inputs={...}))."


def _unmapped(plan: Plan, nodes: dict, original: dict) -> list[str]:
    """What of ``plan`` the graph ``nodes`` lacks, node for node (the stream's values must have the
    readers they had in ``original``)."""
    problems, renamed = [], {}
    for stream in plan.streams:
        for site in stream.sites:
            add, skip = nodes.get(site.add_node), nodes.get(site.skip_node)
            operands = add.all_input_nodes if add is not None else []
            gains = [n for n in operands if n.op != "call_module" and n.target in MULTIPLIES
                     and any(uncast(a) is skip for a in n.all_input_nodes)]
            if site.skip_gain and len(gains) == 1:  # its name may differ (a mul traced in training only comes before it)
                renamed[site.skip_gain] = gains[0].name
                site.skip_gain = gains[0].name
            branch = [n for n in operands if skip not in (n, uncast(n)) and n.name != site.skip_gain]
            if skip is None or len(operands) != 2 or len(branch) != 1 or (site.skip_gain and len(gains) != 1):
                problems.append(f"{site.add_node} is not {site.skip_node} + a branch")
                continue
            site.branch_node = branch[0].name  # its end may differ (a dropout applied in training only)
            for entry in site.norm_entry_nodes:
                if entry not in nodes or skip not in nodes[entry].all_input_nodes:
                    problems.append(f"{entry} does not read {site.skip_node}")
            norm = nodes.get(site.norm_node)
            if norm is None or (norm.op == "call_module" and norm.target not in [n.strip() for n in site.norm.split(" + ")]):
                problems.append(f"{site.norm_node} is not {site.norm}")
            site.metadata_readers = [n for n in site.metadata_readers if n in nodes]
        for name in [stream.source_node, *(site.add_node for site in stream.sites)]:
            readers = sorted(u.name for u in nodes[name].users) if name in nodes else None
            before = sorted(renamed.get(u.name, u.name) for u in original[name].users)
            if readers is not None and readers != before:
                problems.append(f"{name} is read by {readers}, not by {before}")
        for name in [stream.source_node, *stream.consumer_nodes]:
            if name not in nodes:
                problems.append(f"no node {name}")
    return problems


def detached_copy(values: list) -> tuple:
    """A deep copy in which tensors computed under autograd are detached: a KV cache filled during a
    training forward holds such tensors, which ``copy.deepcopy`` refuses to copy."""
    original = torch.Tensor.__deepcopy__

    def detaching(tensor, memo):
        if tensor.grad_fn is None:
            return original(tensor, memo)
        memo[id(tensor)] = copied = tensor.detach().clone()
        return copied

    torch.Tensor.__deepcopy__ = detaching
    try:
        return copy.deepcopy(tuple(values))
    finally:
        torch.Tensor.__deepcopy__ = original


# Holders and chains
@dataclass
class Holder:
    path: str
    module: nn.Module
    call: ModuleCall
    bound: BoundCall
    traced: Traced
    boundary: Optional[LayerBoundary] = None  # None: the model itself, its streams wholly inside it

    @property
    def sites(self) -> list[Site]:
        return self.traced.plan.sites

    def stream_input(self) -> torch.Tensor:
        return self.bound.values[self.bound.names.index(self.traced.stream_argument)]


@dataclass
class Layerwise:
    """What the in-place conversion found: holders grouped into streams, and why modules were not."""

    streams: list[list[Holder]] = field(default_factory=list)
    not_holders: dict[str, str] = field(default_factory=dict)  # module path -> why


def find_holders(model: nn.Module, calls: list[ModuleCall], filter_fn: Optional[Callable] = None) -> Layerwise:
    found = Layerwise()
    calls_per_module = Counter(id(c.module) for c in calls)
    holders: list[Holder] = []
    done: list[str] = []  # holders' paths: their insides are theirs
    candidates = [c for c in calls if c.path and not is_opaque_by_class(c.module) and c.tensor_inputs()
                  and (filter_fn is None or filter_fn(c.module, c.path))]
    for call in candidates:
        if any(call.path.startswith(p + ".") for p in done):
            continue
        try:
            traced = _trace_holder(call, candidates)
            bound = bind_call(call.module, call.args, call.kwargs).with_inputs(traced.int_inputs)
        except Exception as exc:  # noqa: BLE001 - "not a holder", with the reason kept for the report
            found.not_holders.setdefault(call.path, _short_reason(exc))
            continue
        if calls_per_module[id(call.module)] > 1:
            raise NotLayerwise(
                f"{call.path} ({type(call.module).__name__}) holds residual adds and is called "
                f"{calls_per_module[id(call.module)]} times in one forward (a shared layer): its sublayers would "
                "need a query per call"
            )
        holders.append(Holder(call.path, call.module, call, bound, traced))
        done.append(call.path)
    _refuse_a_partial_stack(holders, calls, found.not_holders)
    found.streams = _chains(holders, calls)
    return found


def _forward_slot(module: nn.Module) -> str:
    """The instance attribute the module's call runs as its own forward: ``forward``, or ``_old_forward``
    under an accelerate hook (``device_map``, ``cpu_offload``), whose wrapper is ``forward`` and calls it.
    The converted forward goes in that slot: the hook keeps running around it."""
    return "_old_forward" if "_old_forward" in module.__dict__ and hasattr(module, "_hf_hook") else "forward"


def _check_forward_is_the_class_forward(path: str, module: nn.Module) -> None:
    """Conversion rewrites the class's forward: one replaced on the instance (a patch) would be dropped."""
    own = module.__dict__.get(_forward_slot(module))
    if own is not None and getattr(own, "__func__", None) is not type(module).forward:
        raise ConversionError(
            f"{path or 'the model'} ({type(module).__name__}) holds residual adds, and its forward is replaced on the instance "
            f"({getattr(own, '__qualname__', type(own).__name__)}): the conversion rewrites {type(module).__name__}.forward "
            "and would drop that replacement. Convert the model before patching its layers' forward."
        )


def _trace_holder(call: ModuleCall, candidates: list[ModuleCall]) -> Traced:
    """``trace_alone``; where that fails or the stream starts inside, again with children on the stream traced into:
    Megatron-BERT's attention child adds the attention's residual and the layer the MLP's; DBRX's `norm_attn_norm`
    adds the attention's and normalises for the MLP; Ergo's gates add each residual times a gain."""
    try:
        first = trace_alone(call.module, bind_call(call.module, call.args, call.kwargs))
        if not first.starts_inside:
            return first
    except ConversionError as exc:
        first = exc
    holding = _children_on_the_stream(call, candidates)
    if holding:
        try:
            return trace_alone(call.module, bind_call(call.module, call.args, call.kwargs), inline=tuple(holding))
        except Exception:  # noqa: BLE001 - the first trace's result or reason says more
            pass
    if isinstance(first, Exception):
        raise first
    return first


def _children_on_the_stream(call: ModuleCall, candidates: list[ModuleCall]) -> list[str]:
    """Children to trace into: those adding a branch to the stream (taking it and another tensor of its shape, returning
    one: not a layer), followed call to call (Ergo's ``ResidualGate(h, residual) = a * h + w * residual``: a gain on the
    skip), and the layer's own children taking its input and holding a norm (Megatron-BERT, DBRX)."""
    stream, added, with_norms, adders = list(call.tensor_inputs()), [], [], []
    for child in candidates:  # in call order
        name = child.path.removeprefix(call.path + ".")  # relative: a child, or one in a ModuleList/Dict that is
        taken = [t for t in child.tensor_inputs() if any(_views(t, x) for x in stream)]
        if name == child.path or not is_direct_child(call.module, name) or not taken \
                or any(has_hooks(m) for m in child.module.modules()):
            continue
        norms, out = any(is_norm_module(m) for m in child.module.modules()), child.tensor_outputs()[:1]
        same = [t for t in child.tensor_inputs() if out and t.shape == out[0].shape]
        # one holding a norm (``residual + self.inner(h)``, the norm in inner) adds to one stream value only, read twice
        # or handed on by an earlier adder: a layer takes other tensors of that shape (encoder states, a block's x0)
        if len(same) > 1 and any(t.shape == out[0].shape for t in taken) \
                and (not norms or all(any(_views(t, y) for y in taken[:1] + added) for t in same)):
            adders.append(name)
            stream += out
            added += out
        elif norms:
            if "." not in name and any(t is x for t in taken for x in call.tensor_inputs()):  # (not a ModuleList's layer)
                with_norms.append(name)
    return with_norms + adders


def _views(t: torch.Tensor, x: torch.Tensor) -> bool:
    """``t`` is ``x`` or a view of its tokens (the hidden dimension whole: Swin's ``x.reshape(B, -1, C)``)."""
    return t is x or (t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() and t.shape[-1] == x.shape[-1])


def _short_reason(exc: Exception) -> str:
    """The first line of why, with the first add that looked like a residual and why it is not one."""
    lines = str(exc).splitlines() or [""]
    seen = next((i for i, line in enumerate(lines) if line.startswith("Residual adds that were seen")), None)
    detail = f" ({lines[seen + 1].strip()})" if seen is not None and seen + 1 < len(lines) else ""
    return f"{type(exc).__name__}: {lines[0][:160]}{detail[:240]}"


def _refuse_a_partial_stack(holders: list[Holder], calls: list[ModuleCall], not_holders: dict[str, str]) -> None:
    """A layer of the same class in the same container as a holder (a layer of one stack) that could
    not be traced: rewriting the others would convert the model partly, and quietly."""
    holder_paths = {h.path for h in holders}
    stacks = {(h.path.rpartition(".")[0], type(h.module)) for h in holders}
    for call in calls:
        if call.path in not_holders and call.path not in holder_paths and (call.path.rpartition(".")[0], type(call.module)) in stacks:
            raise NotLayerwise(
                f"{call.path} ({type(call.module).__name__}) is a layer of the same stack as "
                f"{next(h.path for h in holders if type(h.module) is type(call.module))} and cannot be rewritten: "
                f"{not_holders[call.path]}. Converting the other layers only would leave the model partly converted "
                "(exclude such layers with filter_fn to convert the rest)"
            )


def _chains(holders: list[Holder], calls: list[ModuleCall]) -> list[list[Holder]]:
    """Holders in call order, linked where one's output tensor is the next one's stream input.

    A holder that does not link starts a new stream where the previous one ENDED: its last output went
    into a norm module (an encoder's final norm, before the decoder's layers start on their own
    embeddings: mBART, Pegasus), the new one receives a stream of another size (Swin's stages, after
    patch merging), or the two share no module path (T5's ``encoder`` and ``decoder``).
    Otherwise the model's own code did something to the stream between them (``h = layer(h) * 2``),
    which in-place conversion cannot follow."""
    chains: list[list[Holder]] = []
    for holder in holders:
        x = holder.stream_input()
        chain = next((c for c in chains if any(_tokens_of(x, t) for t in c[-1].call.tensor_outputs())), None)
        if chain is not None and holder.traced.starts_inside:
            raise NotLayerwise(f"{holder.path}'s residual stream starts inside it (at {holder.traced.plan.streams[0].source}), "
                               f"yet it receives the stream {chain[-1].path} returns")
        if chain is not None:
            chain.append(holder)
            continue
        common = common_prefix([chains[-1][-1].path, holder.path]) if chains else ""
        if common and not _ends_in_a_norm(chains[-1], calls) and not _resized(chains[-1][-1], x):
            raise NotLayerwise(
                f"the stream {chains[-1][-1].path} returns is not what {holder.path} receives: the model's own "
                f"code (in {common} or its parents) transforms it between them (to convert the rest, leave that stack "
                f"out: filter_fn=lambda module, path: not path.startswith({holder.path.rpartition('.')[0] + '.'!r}))")
        chains.append([holder])
    return chains


def _tokens_of(x: torch.Tensor, out: torch.Tensor) -> bool:
    """``x`` is ``out`` or a view of some of its tokens (``out[:, -n:]``, the hidden dimension whole: Gemma 4 slices
    the stream before its KV-shared layers), which the model's own code makes of the state too (``AttnResState``)."""
    return x is out or (x.untyped_storage().data_ptr() == out.untyped_storage().data_ptr() and x.dim() == out.dim()
                        and x.stride() == out.stride() and x.shape[-1] == out.shape[-1] and x.dtype == out.dtype)


def _resized(last: Holder, x: torch.Tensor) -> bool:
    """``x`` has another width or number of elements than ``last``'s stream output: a new stream (a
    hierarchical model's next stage after patch merging; streams of different sizes cannot be mixed)."""
    out = last.call.tensor_outputs()[0]
    return out.shape[-1] != x.shape[-1] or out.numel() != x.numel()


def _ends_in_a_norm(chain: list[Holder], calls: list[ModuleCall]) -> bool:
    """Whether the chain's last output goes into a norm module that is the stream's final norm: outside
    the module that holds the last holder (a norm inside it belongs to the rest of that layer: Megatron-
    BERT's MLP after its attention holder), and not inside a module that received that output (a sublayer
    norm of a sublayer that could not be made a holder)."""
    ends = chain[-1].call.tensor_outputs()
    layer = chain[-1].path.rpartition(".")[0]

    def reads_end(call: ModuleCall) -> bool:
        return any(t is e for t in call.tensor_inputs() for e in ends)

    return any(is_norm_module(c.module) and reads_end(c) and not c.path.startswith(layer + ".") and not any(
        reads_end(p) for p in calls if p.path == c.path.rpartition(".")[0]) for c in calls)


class NotLayerwise(ConversionError):
    """The layers cannot be rewritten one by one (the model transforms the stream between them, or
    calls one layer twice): ``convert_`` converts the model as one graph instead."""


def assign_global_blocks(chain: list[Holder], stream_index: int, *, num_blocks, block_size) -> None:
    """Blocks over the chain's sublayers in depth order; then each holder's boundary and parameter names."""
    sites = [s for h in chain for s in h.sites]
    blocks = place_in_blocks(sites, num_blocks, block_size)
    for site in sites:
        site.stream = stream_index
    start = 0
    for k, holder in enumerate(chain):
        end = start + len(holder.sites)
        holder.boundary = LayerBoundary(
            first=k == 0, last=k + 1 == len(chain), blocks_in=holder.sites[0].block,
            ends_block=end == len(sites) or blocks[end] != blocks[end - 1], partial_in=holder.sites[0].position > 0,
        )
        stream = holder.traced.plan.streams[0]
        stream.num_blocks, stream.block_size = max(blocks), blocks.count(1)
        assign_parameter_names(holder.traced.plan)
        stream.final_param_prefix = "attn_res.final"
        start = end


# The installed forward
class CompiledGraph(NamedTuple):
    names: list[str]  # the call's argument names, as the graph's placeholders take them
    graph_module: fx.GraphModule  # the rewritten graph
    code: Callable  # its code, a function of ``self`` = the holder: type(graph_module).forward


def _compile(gm: fx.GraphModule, holder: nn.Module) -> CompiledGraph:
    """The rewritten graph's code, run with the holder as ``self``, and its arguments' names (its
    placeholders are named after the call's arguments, in the trace's order). Constants the trace stored on its
    own root (configs, tensor constants) are copied onto the holder under names of their own."""
    renamed = False
    for node in gm.graph.nodes:
        if node.op == "get_attr" and not _reachable(holder, gm, node.target):
            taken = set(holder.__dict__) | set(holder._buffers)
            name = next(f"_rr_constant_{k}" for k in range(len(taken) + 1) if f"_rr_constant_{k}" not in taken)
            value = getattr(gm, node.target)
            if isinstance(value, torch.Tensor):  # moves with .to(); not saved
                holder.register_buffer(name, value, persistent=False)
            else:
                holder.__dict__[name] = value
            setattr(gm, name, value)  # the graph module stays runnable on its own (an fx.Interpreter)
            node.target, renamed = name, True
    if renamed:
        gm.recompile()
    names = [node.target for node in gm.graph.nodes if node.op == "placeholder"]
    return CompiledGraph(names, gm, type(gm).forward)


def _reachable(module: nn.Module, gm: fx.GraphModule, target: str) -> bool:
    """``target`` names the same object on ``module`` as on the graph module (else it is the trace's)."""
    try:
        return operator.attrgetter(target)(module) is operator.attrgetter(target)(gm)
    except AttributeError:
        return False


class LayerForward:
    """A holder's ``forward``: runs the graph for the holder's mode and the call's signature (which
    arguments are tensors or objects; the values of constants) on the holder. The graphs for the
    conversion's calls are made at conversion, in both modes; another is ``retrace``d on first use."""

    def __init__(self, module: nn.Module, plan: Plan, boundary: Optional[LayerBoundary], config, key: tuple,
                 graph_module: fx.GraphModule, original_graph: fx.Graph, stream_argument: str,
                 int_inputs: tuple[str, ...] = ()):
        self.module = module
        self.plan = plan  # the first trace's sites, with their blocks and parameter names: the template
        self.boundary = boundary
        self.stream_argument = stream_argument
        self.int_inputs = int_inputs
        self.config = config
        self.floats = _floats_read_by(module, graph_module)
        # (training, signature key and those floats) -> its graph; the first is detection's, in eval mode
        self.graphs: dict[tuple, CompiledGraph] = {(False, self._key(key)): _compile(graph_module, module)}
        self.original_graph = original_graph  # the first graph before the rewrite

    @property
    def graph_module(self) -> fx.GraphModule:
        """The first graph, for inspection (``print(layer.forward.graph_module.code)``)."""
        return next(iter(self.graphs.values())).graph_module

    def __call__(self, *args, **kwargs):
        if checkpointing := self._checkpointing():  # as Hugging Face's checkpointing forward: no cache to find written
            kwargs = {**kwargs, **({"use_cache": False} if kwargs.get("use_cache") else {}), **{
                k: None for k in ("cache", "layer_past") if kwargs.get(k) is not None
                and not getattr(self.module, "_can_checkpoint_with_cache", False)}}
        bound = bind_call(self.module, args, kwargs).with_inputs(self.int_inputs)
        if self.boundary is not None and not self.boundary.first:  # (the graph aligns a state: state.aligned)
            i = bound.names.index(self.stream_argument)
            if isinstance(bound.values[i], torch.Tensor):  # every layer before was skipped (LayerDrop): b_0 itself
                bound.values[i] = AttnResState((bound.values[i],), None)
        key = (self.module.training, self._key(bound.key))
        entry = self.graphs.get(key)
        if entry is None:
            if _under_a_tracer(bound.values):
                raise ConversionError(self._unseen_signature_message(bound))
            entry = self._rebuild(bound, self.module.training)[0]
            for old in [k for k in self.graphs if k[0] == key[0] and k[1][:len(k[1]) - len(self.floats)] == bound.key]:
                del self.graphs[old]  # the same call with the floats as they were: not kept (a dropout schedule)
            self.graphs[key] = entry
        values = dict(zip(bound.names, bound.values))
        inputs = [values[n] for n in entry.names]
        # (Dynamo cannot trace a reentrant checkpoint: it runs one eagerly, where this check applies)
        if not torch.is_grad_enabled() and not torch.compiler.is_compiling() and _inside_a_reentrant_checkpoint():
            # a reentrant checkpoint AROUND the layer (torch.utils.checkpoint(layer, state, use_reentrant=True),
            # Hugging Face < 5.24's __call__) sees neither the tensors inside the AttnResState it passes nor
            # those in the state returned: every gradient before it would be lost. Refused, not warned.
            raise ConversionError(
                f"{type(self.module).__name__} runs without grad in training on inputs that require it: a reentrant "
                "activation checkpoint (use_reentrant=True) around a converted layer does not see the tensors inside "
                "the AttnResState, and their gradients would be lost. Use use_reentrant=False (Hugging Face: "
                "gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False}))."
            )
        if checkpointing:
            return self._checkpointed(entry.code, inputs)
        return entry.code(self.module, *inputs)

    def _checkpointing(self) -> bool:
        """Hugging Face layers (transformers >= 5.24; older ones in ``__call__``) checkpoint in their
        class's ``forward``, which this forward replaces: do it here, under the same conditions."""
        module = self.module
        return (
            getattr(module, "gradient_checkpointing", False)
            and module.training
            and torch.is_grad_enabled()
            and hasattr(module, "_gradient_checkpointing_func")
            and type(module).__call__ is nn.Module.__call__
        )

    def _checkpointed(self, fn: Callable, inputs: list):
        # every tensor in and out as a flat tuple (the AttnResStates' included): a reentrant checkpoint
        # (use_reentrant=True) tracks only tensors it is given and returns directly
        flat, spec = tree_flatten(inputs)
        output_spec = {}

        def run(*flat_inputs):  # runs again in the backward: same structure
            leaves, output_spec["spec"] = tree_flatten(fn(self.module, *tree_unflatten(list(flat_inputs), spec)))
            return tuple(leaves)

        flat_outputs = self.module._gradient_checkpointing_func(run, *flat)
        return tree_unflatten(list(flat_outputs), output_spec["spec"])

    def _unseen_signature_message(self, bound: BoundCall) -> str:
        seen = [{**dict(k), "training": t} for t, k in self.graphs]
        now = {**dict(self._key(bound.key)), "training": self.module.training}
        closest = min(seen, key=lambda s: len([n for n in set(s) | set(now) if s.get(n) != now.get(n)]))
        differ = sorted(n for n in set(closest) | set(now) if closest.get(n) != now.get(n))
        return (
            f"{type(self.module).__name__} is called under a tracer (torch.compile, torch.export, pipeline()) with a "
            f"signature its conversion did not prepare (the closest prepared one differs in {differ}: now "
            f"{[(n, now.get(n)) for n in differ]}, prepared {[(n, closest.get(n)) for n in differ]}). "
            "A converted layer never runs the model to build a graph under a tracer. Convert with example inputs "
            "called this way (convert_(model, example_inputs={...}))" + ("; an attribute set after conversion gets "
            "its graph from one call outside the tracer." if any("." in n for n in differ) else ".")
        )

    def add_signature(self, bound: BoundCall, key: tuple, modes: tuple[bool, ...] = (False, True)) -> list[Captured]:
        """At conversion: the graphs, in ``modes`` (training?), for a way the model calls this layer (the
        conversion's own call; a mask, no cache). Returns the captures it made."""
        made, key = [], self._key(key)
        for training in modes:
            if (training, key) not in self.graphs:
                self.graphs[training, key], captured = self._rebuild(bound, training)
                made.append(captured)
        return made

    def _key(self, signature: tuple) -> tuple:
        """``signature`` and the floats the graphs hold as constants, as they are now: a dropout probability set
        after conversion (on a layer that passes ``self.dropout`` to F.dropout) is a new graph, not ignored."""
        return signature + tuple((f"{p or 'self'}.{n}", getattr(self.module.get_submodule(p), n, None)) for p, n in self.floats)

    def _rebuild(self, bound: BoundCall, training: bool) -> tuple[CompiledGraph, Captured]:
        params = self.module._modules.pop("attn_res")  # not the module's own: an nn.Sequential runs every child
        try:
            try:
                traced = retrace(self.module, bound, self.plan, self.original_graph, whole=self.boundary is None,
                                 training=training)
            finally:
                self.module._modules["attn_res"] = params
            gm = rewrite_holder(self.module, traced, self.boundary, self.config)
        except ConversionError:
            raise
        except Exception as exc:  # noqa: BLE001 - e.g. a stream value this signature reads elsewhere, a branch on an int input
            raise ConversionError(f"{_called_as(self.module, bound)} cannot be rewritten like the call it was converted "
                                  f"with ({first_line(exc)}). {_CONVERT_CALLED_THIS_WAY}") from exc
        return _compile(gm, self.module), traced.captured

    def __reduce__(self):  # torch.save(model), multiprocessing: passes/graph_pickle.py
        graphs = {key: (g.names, *graph_module_to_pickle(g.graph_module)) for key, g in self.graphs.items()}
        state = {**self.__dict__, "graphs": graphs, "original_graph": graph_to_pickle(self.original_graph)}
        return _unpickled_forward, (state,)

    def __deepcopy__(self, memo):
        twin = object.__new__(LayerForward)
        twin.__dict__.update(self.__dict__)
        twin.module = memo.get(id(self.module), self.module)
        twin.graphs = dict(self.graphs)  # the code is the same; it runs on whichever module is self
        return twin


def _floats_read_by(module: nn.Module, gm: fx.GraphModule) -> list[tuple[str, str]]:
    """(path, name) of the float attributes of the modules the graph was traced through (the holder, children
    traced into; not those it calls whole): their values are constants in it."""
    whole = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    traced = {""} | {p for n in gm.graph.nodes for p, _ in n.meta.get("nn_module_stack", {}).values()} - whole
    return sorted((p, n) for p in traced for n, v in vars(module.get_submodule(p)).items() if type(v) is float)


def _unpickled_forward(state: dict) -> LayerForward:
    forward = object.__new__(LayerForward)
    forward.__dict__.update(state, original_graph=unpickled_graph(state["original_graph"]), graphs={
        key: CompiledGraph(names, gm, type(gm).forward)
        for key, (names, *pickled) in state["graphs"].items() for gm in [unpickled_graph_module(*pickled)]
    })
    return forward


def _under_a_tracer(values: list) -> bool:
    """Dynamo, export or FX is tracing this call: its tensors are not data, and nothing may run eagerly."""
    tracing = getattr(fx._symbolic_trace, "is_fx_symbolic_tracing", fx._symbolic_trace.is_fx_tracing)  # (the latter warns)
    if torch.compiler.is_compiling() or tracing():
        return True
    from torch._subclasses.fake_tensor import is_fake

    return any(isinstance(t, fx.Proxy) or (isinstance(t, torch.Tensor) and is_fake(t)) for t in tree_flatten(values)[0])


def _inside_a_reentrant_checkpoint(depth: int = 12) -> bool:
    """Called (a few frames up) from ``torch.utils.checkpoint``'s reentrant ``CheckpointFunction``."""
    from torch.utils.checkpoint import CheckpointFunction

    target = CheckpointFunction.forward.__code__
    frame = sys._getframe(1)
    for _ in range(depth):
        if frame is None:
            return False
        if frame.f_code is target:
            return True
        frame = frame.f_back
    return False


def rewrite_holder(module: nn.Module, traced: Traced, boundary: LayerBoundary, config) -> fx.GraphModule:
    if traced.captured.not_repeatable:  # (checked here, where the graph would be used: a model without sites says so)
        raise ConversionError(traced.captured.not_repeatable)
    return apply_plan(
        traced.captured.graph_module, traced.plan, traced.values, eps=config.key_norm_eps, mixing=config.mixing,
        attn_res=module.attn_res, layer=boundary,
    )


def install(holder: Holder, config) -> None:
    """Rewrite ``holder``'s graph and make it the module's forward (parameters in ``module.attn_res``)."""
    module = holder.module
    _check_forward_is_the_class_forward(holder.path, module)
    if hasattr(module, "attn_res"):
        raise ConversionError(f"{holder.path} already has an attribute named attn_res: is it converted already?")
    module.attn_res = AttnResParameters()
    original = copy.deepcopy(holder.traced.captured.graph_module.graph)  # for before/after views
    gm = rewrite_holder(module, holder.traced, holder.boundary, config)
    key = holder.bound.installed_key(holder.traced.stream_argument, holder.boundary is None or holder.boundary.first)
    forward = LayerForward(module, copy.deepcopy(holder.traced.plan), holder.boundary, config, key,
                           gm, original, holder.traced.stream_argument, holder.traced.int_inputs)
    module.__dict__[_forward_slot(module)] = forward
    for captured in forward.add_signature(holder.bound, key):  # the same call in training
        holder.traced.captured.checkpoint_calls += captured.checkpoint_calls
    module.attn_res.train(module.training)  # the queries the rewrite made, in the holder's mode


class FinalAggregation:
    """A forward pre-hook (with kwargs) for the modules that read a stream's end (its final norm): where
    the model skipped the stream's last layers (LayerDrop), they are handed a state; they read the final
    aggregation instead, as the last layer computes it (its query; the sums the skipped sublayers did
    not add to, as ``aligned`` completes them). A class, not a closure: a model pickles with its hooks."""

    def __init__(self, last: nn.Module, config):
        self.last, self.config = last, config

    def final(self, value):
        if not isinstance(value, AttnResState):
            return value
        stream = installed_forward(self.last).plan.streams[0]
        params = operator.attrgetter(stream.final_param_prefix)(self.last)  # now: PEFT may have wrapped attn_res since
        blocks = list(aligned(value, stream.num_blocks + 1, False).blocks)
        scale = float(len(blocks)) if self.config.mixing == "sum" else 1.0
        return torch.ops.residual_rewriter.attn_res.default(blocks, params.query, params.key_norm_weight,
                                                             self.config.key_norm_eps, scale)

    def __call__(self, module, args, kwargs):
        if any(isinstance(v, AttnResState) for v in (*args, *kwargs.values())):
            return tuple(self.final(v) for v in args), {k: self.final(v) for k, v in kwargs.items()}
        return None


def installed_forward(module: nn.Module) -> Optional[LayerForward]:
    forward = module.__dict__.get(_forward_slot(module))
    return forward if isinstance(forward, LayerForward) else None


def installed_forwards(model: nn.Module) -> list[tuple[str, LayerForward]]:
    """``(path, forward)`` of every rewritten module of a converted model, in module order."""
    return [(path, f) for path, m in model.named_modules() if (f := installed_forward(m)) is not None]


def uninstall(module: nn.Module) -> None:
    """Undo what ``install`` made, and only that (a failed conversion leaves the model as it was; an
    accelerate hook's wrapper calls the class's forward again)."""
    if installed_forward(module) is not None and _forward_slot(module) == "forward":
        del module.__dict__["forward"]
    elif installed_forward(module) is not None:  # under accelerate: the class's forward, as install found it
        module._old_forward = type(module).forward.__get__(module)
    if isinstance(module._modules.get("attn_res"), AttnResParameters):
        del module._modules["attn_res"]
    for table in (module.__dict__, module._buffers):  # the constants _compile copied onto the holder
        for name in [k for k in table if k.startswith("_rr_constant_")]:
            del table[name]
