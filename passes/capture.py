"""Capture: an unmodified model becomes an FX graph whose nodes still point at its own submodules.

* The trace's root is a throw-away wrapper sharing the model's children: module paths in the graph
  are the model's own (``transformer.h.0.ln_1``), parameters are shared, not copied.
* Norms, attention, rotary embeddings and ``torch.nn`` built-ins stay opaque ``call_module`` nodes,
  leaving the residual stream visible. A submodule FX cannot trace (data-dependent control flow) is
  rolled back and kept opaque, and listed, so that the report can say where residuals may hide.
* Hugging Face v5 models build masks with Python control flow: each model's own modeling modules'
  mask builders and output classes are autowrapped (recorded as one call, not traced into).
* Traced in one mode (``training``): a converted module runs the graph traced in its current mode
  (``layerwise.LayerForward``). Residual sums are made canonical (``canonicalize``) so that the pattern
  ``x + branch(x)`` shows.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import operator
import random
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import networkx as nx
import torch
import torch.fx as fx
from torch import nn
from torch.nn.utils import parametrize
from torch.utils._pytree import tree_leaves

from .errors import first_line, frame_location, is_user_code, module_in_traceback, tb_location
from .rewrite import in_stream_dtype

# Class names of submodules that stay opaque: their insides hold no residual stream.
# Matched at the END of the class name: `LlamaRMSNorm`, `CausalSelfAttention`, `LlamaRotaryEmbedding`
# are opaque; a user's `PreNormBlock` or `AttnBlock` is traced into (its residual add is inside).
_OPAQUE_CLASS_NAME = re.compile(r"(Norm|Attention|Attn|Rotary|RoPE|Embedding|Embeddings)$", re.IGNORECASE)
_ATTENTION_CLASS_NAME = re.compile(r"(Attention|Attn)", re.IGNORECASE)


@dataclass
class Captured:
    graph_module: fx.GraphModule
    opaque_modules: dict[str, str] = field(default_factory=dict)  # path -> why it was kept opaque
    # kept opaque by class name although they hold a norm: where a residual could hide if none is found
    opaque_with_norms: list[str] = field(default_factory=list)
    # modules whose forward called torch.utils.checkpoint (in the traced mode): the graph runs it inline
    checkpoint_calls: list[str] = field(default_factory=list)
    # traced-through modules (and the model itself, "") with hooks: the graph never calls those hooks
    hooked_inlined: list[str] = field(default_factory=list)
    # what the trace did for real that the graph cannot repeat: refused where the graph would be installed
    not_repeatable: str = ""


class ResidualTracer(fx.Tracer):
    """The model's own modeling modules are searched for autowrapped functions too (FX only looks at
    the globals of the forwards it traces; a decorated forward's globals are the decorator's module)."""

    def __init__(self, model: nn.Module, example_inputs: tuple, *, opaque_children: bool, inline: tuple = (),
                 opaque: dict, opaque_if_reads_training: bool):
        import math

        names = {type(m).__module__ for m in model.modules()}
        modules = [sys.modules[n] for n in sorted(names) if n in sys.modules and not n.startswith("torch.")]
        super().__init__(autowrap_modules=(math,), autowrap_functions=tuple(_autowrap_candidates(modules)))
        self._autowrap_search.extend(modules)
        self.example_inputs = example_inputs
        self.opaque_children = opaque_children  # in-place conversion: the root's own children stay whole
        self.inline = set(inline)  # ... but these, which hold a residual add of the root's stream
        self.opaque_modules: dict[str, str] = dict(opaque)  # path -> why; another trace keeps what the first did
        self.opaque_if_reads_training = opaque_if_reads_training
        self.opaque_with_norms: list[str] = []
        self.checkpoint_calls: list[str] = []
        self.hooked_inlined: list[str] = []
        self._rr_constants: dict[str, Any] = {}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.opaque_modules:
            return True
        if self.opaque_children and is_direct_child(self.root, qualname) and qualname not in self.inline:
            return True
        if is_opaque_by_class(m):
            if _OPAQUE_CLASS_NAME.search(type(m).__name__) and any(
                "norm" in type(c).__name__.lower() for c in m.modules() if c is not m
            ):
                self.opaque_with_norms.append(qualname)
            return True
        # inside a child traced into (it holds an add), one branching on self.training follows the mode when run
        inside_inlined = any(qualname.startswith(child + ".") for child in self.inline)  # (timm's DropPath)
        if (self.opaque_if_reads_training or inside_inlined) and _reads_training_flag(type(m)):
            self.opaque_modules[qualname] = "its forward branches on self.training"  # it follows the mode when run
            return True
        return False

    def to_bool(self, obj: fx.Proxy) -> bool:
        # Python branching on a traced value. Allowed only when the condition depends on nothing but
        # dtypes/devices (e.g. ViT's `if pixel_values.dtype != expected_dtype`): those do not change
        # with batch size or sequence length, so the branch taken on the example inputs is the branch.
        if not _depends_only_on_metadata(obj.node):
            return super().to_bool(obj)
        return bool(self._evaluate(obj.node))

    def _evaluate(self, node: fx.Node) -> Any:
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for n in self.graph.nodes:
            env[n] = graph.node_copy(n, env.__getitem__)
            if n is node:
                break
        graph.output(env[node])
        from torch.fx._symbolic_trace import _maybe_revert_all_patches  # run for real, not traced

        with _maybe_revert_all_patches(), torch.no_grad(), forked_rng():  # (a dropout in it draws)
            gm = fx.GraphModule(self.root, graph)
            with in_mode(gm, False):  # no BatchNorm statistics update, no dropout: must not touch the model
                return gm(*self.example_inputs)

    def create_node(self, *args, **kwargs) -> fx.Node:
        node = super().create_node(*args, **kwargs)
        # where the user's code made this node, for messages about it (cheaper than FX's stack traces)
        node.meta[SOURCE_LOCATION] = _calling_user_line()
        return node

    def create_arg(self, a: Any):
        # FX rebuilds dataclass instances (e.g. a Hugging Face config) by calling their constructor on
        # every forward. A dataclass holding no proxy is a constant: keep the object itself instead.
        if dataclasses.is_dataclass(a) and not isinstance(a, type) and not _holds_proxy(a):
            name = f"_rr_constant_{len(self._rr_constants)}"
            self._rr_constants[name] = a
            setattr(self.root, name, a)
            return self.create_node("get_attr", name, (), {})
        return super().create_arg(a)

    def call_module(self, m, forward, args, kwargs):
        qualname = self.path_of_module(m)
        if self.is_leaf_module(m, qualname):
            return super().call_module(m, forward, args, kwargs)
        # Trace into the module; if its Python cannot be traced, undo what it recorded and keep it opaque.
        if has_hooks(m):
            self.hooked_inlined.append(qualname)
        last_node = self.graph._root.prev
        saved_stack = self.module_stack.copy()
        saved_calls = dict(self.num_calls)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as exc:  # noqa: BLE001 - any trace failure means "keep this module opaque"
            _erase_after(self.graph, last_node)
            self.module_stack.clear()
            self.module_stack.update(saved_stack)
            self.num_calls = saved_calls
            self.opaque_modules[qualname] = self._why_opaque(qualname, exc)
            return super().call_module(m, forward, args, kwargs)

    def _why_opaque(self, qualname: str, exc: Exception) -> str:
        """``Type: message [in inner.module] at file:line`` of the construct tracing stopped at."""
        why = first_line(exc)[:160]
        inner = module_in_traceback(self.root, exc.__traceback__)
        if inner and inner != qualname:
            why += f", in {inner}"
        location = tb_location(exc.__traceback__)
        return why + (f", at {location}" if location else "")


def _erase_after(graph: fx.Graph, last: fx.Node) -> None:
    """Erase what was recorded after ``last``, last node first; except an attribute of an earlier value
    (``x.dtype``): FX's Attribute proxy made that node lazily in there and hands it to later code."""
    region = []
    node = last.next
    while node is not graph._root:
        region.append(node)
        node = node.next
    inside = set(region)
    for node in reversed(region):
        if not (node.op == "call_function" and node.target is getattr and node.args[0] not in inside):
            graph.erase_node(node)


SOURCE_LOCATION = "residual_rewriter_source"  # node.meta key: "file:line" of the code that made the node


def _calling_user_line() -> str | None:
    frame = sys._getframe(2)
    while frame is not None and not is_user_code(frame.f_code.co_filename):
        frame = frame.f_back
    return frame_location(frame) if frame is not None else None


def is_direct_child(root: nn.Module, qualname: str) -> bool:
    """``qualname`` names a child of ``root``, or a child of a container (ModuleList ...) that is one."""
    *parents, _ = qualname.split(".")
    module = root
    for name in parents:
        module = getattr(module, name)
        if not isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            return False
    return True


def is_opaque_by_class(m: nn.Module) -> bool:
    """Kept whole by its class: ``torch.nn`` built-ins (not containers), and norm / attention /
    rotary / embedding classes, unless they wrap an attention module (T5LayerSelfAttention = norm +
    T5Attention + residual add: the residual is inside and must be traced)."""
    cls = type(m).__bases__[0] if parametrize.is_parametrized(m) else type(m)  # (its class is parametrize's own)
    if cls.__module__.startswith("torch.nn") and not isinstance(m, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        return True
    if _OPAQUE_CLASS_NAME.search(cls.__name__):
        return not any(_ATTENTION_CLASS_NAME.search(type(c).__name__) for c in m.children())
    return False


def has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


_METADATA_ATTRS = {"dtype", "device"}
_COMPARISONS = {operator.eq, operator.ne, operator.not_, operator.is_, operator.is_not, operator.and_, operator.or_}


def _depends_only_on_metadata(node: fx.Node) -> bool:
    """The node is computed from tensors' dtype/device only (and constants)."""
    if node.op == "call_function" and node.target is getattr and node.args[1] in _METADATA_ATTRS:
        return True
    if node.op == "call_function" and node.target in _COMPARISONS:
        return all(_depends_only_on_metadata(n) for n in node.all_input_nodes)
    return False


@functools.lru_cache(maxsize=None)
def _reads_training_flag(cls: type) -> bool:
    try:
        return "self.training" in inspect.getsource(cls.forward)
    except (OSError, TypeError):  # no source (a class made at run time): assume it does
        return True


def _holds_proxy(obj: Any) -> bool:
    values = [getattr(obj, f.name, None) for f in dataclasses.fields(obj)]
    return any(isinstance(v, fx.Proxy) for v in tree_leaves(values))


def _make_root(model: nn.Module, input_names: list[str], call: Callable) -> nn.Module:
    """A module sharing ``model``'s children/parameters whose forward has explicit arguments."""
    args = ", ".join(input_names)
    namespace: dict[str, Any] = {}
    exec(f"def forward(self, {args}):\n    return self._rr_call({args})\n", namespace)  # noqa: S102
    root_cls = type(f"{type(model).__name__}Traced", (nn.Module,), {"forward": namespace["forward"]})
    root = root_cls()
    root._modules = model._modules  # same children, same dict: paths are the model's own
    root._parameters = model._parameters
    root._buffers = model._buffers
    root._rr_call = call
    root.training = model.training
    return root


def _autowrap_candidates(modules: Sequence[Any]) -> list[Callable]:
    """Recorded as one call each instead of traced into: Hugging Face mask builders (Python control
    flow on tensor values) and output dataclasses (so the graph returns the model's own output type)."""
    found = []
    for mod in modules:
        for name, value in vars(mod).items():
            if name.startswith("_"):
                continue
            if inspect.isfunction(value) and value.__module__.endswith("masking_utils"):
                found.append(value)
            elif inspect.isclass(value) and any(c.__name__ == "ModelOutput" for c in value.__mro__):
                found.append(value)
    return found


# Factory functions that take the size as varargs: ``torch.ones(n, seq_len)`` with traced sizes fails
# in torch's argument parser before FX sees it ("ones() takes 1 positional argument but 2 were
# given"; OPT and BART decoders do this), while ``torch.ones((n, seq_len))`` traces fine.
_VARARG_SIZE_FACTORIES = ("ones", "zeros", "empty", "rand", "randn")


@contextlib.contextmanager
def _traceable_size_varargs():
    """While tracing, these factories pack traced varargs sizes into the tuple form they also accept."""
    def packing(fn):
        @functools.wraps(fn)
        def factory(*args, **kwargs):
            if len(args) > 1 and any(isinstance(a, fx.Proxy) for a in args):
                return fn(tuple(args), **kwargs)
            return fn(*args, **kwargs)
        return factory

    originals = {name: getattr(torch, name) for name in _VARARG_SIZE_FACTORIES}
    try:
        for name, fn in originals.items():
            setattr(torch, name, packing(fn))
        yield
    finally:
        for name, fn in originals.items():
            setattr(torch, name, fn)


@contextlib.contextmanager
def _recording_checkpoints(tracer: ResidualTracer):
    """Record which module's forward calls ``torch.utils.checkpoint.checkpoint`` while tracing. Its two
    paths are patched where ``checkpoint`` looks them up at call time (module globals), so calls
    through names bound earlier (``from torch.utils.checkpoint import checkpoint``, Hugging Face's
    partial) are seen too."""
    import torch.utils.checkpoint as ckpt

    def where():
        return tracer.module_stack[next(reversed(tracer.module_stack))][0] if tracer.module_stack else ""

    # torch >= 2.14 calls the ..._impl (the other name: a shim to it); torch 2.11-2.13 the other
    name = next(n for n in ("_checkpoint_without_reentrant_generator_impl", "_checkpoint_without_reentrant_generator") if hasattr(ckpt, n))
    generator, function = getattr(ckpt, name), ckpt.CheckpointFunction

    def non_reentrant(*args, **kwargs):
        tracer.checkpoint_calls.append(where())
        return generator(*args, **kwargs)

    class Reentrant(function):
        @classmethod
        def apply(cls, *args, **kwargs):
            tracer.checkpoint_calls.append(where())
            return function.apply(*args, **kwargs)

    vars(ckpt)[name], ckpt.CheckpointFunction = non_reentrant, Reentrant
    try:
        yield
    finally:
        vars(ckpt)[name], ckpt.CheckpointFunction = generator, function


def capture(model: nn.Module, example_inputs: tuple, *, call: Callable, input_names: list[str],
            opaque_children: bool = False, inline: tuple = (), training: bool = False, opaque: Optional[dict] = None,
            opaque_if_reads_training: bool = False) -> Captured:
    """Trace ``model`` called as ``call(*example_inputs)`` in mode ``training`` (Python branches on
    ``self.training`` take that mode's side): a GraphModule whose ``call_module`` targets are
    ``model``'s own module paths, its residual sums canonical.

    ``opaque_children``: ``model``'s own children (through containers) stay ``call_module`` nodes:
    in-place conversion rewrites one layer's forward and keeps its MLP, attention and norms whole;
    except the children named in ``inline``, which are traced into. ``opaque``: module paths kept whole
    (another trace of a module keeps what its first kept); ``opaque_if_reads_training``: so is every
    module traced into whose forward reads ``self.training``.
    """
    for proxy_buffers in (True, False):  # buffers as graph values (updated in place: in the graph); else as constants
        tracer = ResidualTracer(model, tuple(example_inputs), opaque_children=opaque_children, inline=tuple(inline),
                                opaque=opaque or {}, opaque_if_reads_training=opaque_if_reads_training)
        tracer.proxy_buffer_attributes = proxy_buffers
        with in_mode(model, training), state_restored(model):
            root = _make_root(model, input_names, call)
            scalars, rng = _python_scalars(model), _rng_states()
            buffers = {} if proxy_buffers else {n: b.detach().clone() for n, b in model.named_buffers()}  # (concrete: may change)
            try:
                with _traceable_size_varargs(), _recording_checkpoints(tracer):
                    gm = fx.GraphModule(root, tracer.trace(root), class_name=type(model).__name__ + "Graph")
            except Exception:  # noqa: BLE001 - a buffer read as a Python value (a flag, a count): traced as a constant
                if proxy_buffers:
                    continue
                raise
            not_repeatable = _what_the_graph_cannot_repeat(model, scalars, rng, buffers)
        break
    for node in gm.graph.nodes:  # a child named `self` (Megatron-BERT's attention) would shadow the code's `self`
        if node.name == "self":
            node._rename("self_")
    canonicalize(gm)
    hooked = ([""] if has_hooks(model) else []) + [p for p in tracer.hooked_inlined if p not in tracer.opaque_modules]
    return Captured(
        gm, dict(tracer.opaque_modules), sorted(set(tracer.opaque_with_norms)),
        sorted(set(tracer.checkpoint_calls)), sorted(set(hooked)), not_repeatable,
    )


def _python_scalars(model: nn.Module) -> dict:
    return {(path, k): v for path, m in model.named_modules() for k, v in vars(m).items() if type(v) in (bool, int, float)}


def forked_rng():  # torch.random.fork_rng over the CPU and every CUDA device in use: draws inside leave no trace
    return torch.random.fork_rng(devices=range(torch.cuda.device_count()) if torch.cuda.is_initialized() else [])


def _rng_states() -> list:
    return [random.getstate(), torch.get_rng_state(), *(torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [])]


def _what_the_graph_cannot_repeat(model: nn.Module, scalars: dict, rng: list, buffers: dict) -> str:
    """The trace ran the model's Python for real: what it did there beside the tensor math is not in the
    graph, which would never do it again (silently wrong): a Python number or a buffer changed (a call
    counter), a random draw from no traced value (``torch.rand(())``: the graph would replay this one draw)."""
    now = _python_scalars(model)  # (a number become a proxy is scratch state within one call, like Funnel's seq_len)
    changed = [f"{path or 'self'}.{k} ({v} -> {now[path, k]})" for (path, k), v in scalars.items()
               if now.get((path, k), v) != v and v == v]  # (v != v: a NaN)
    changed += [f"buffer {n}" for n, b in model.named_buffers() if n in buffers and not torch.equal(b, buffers[n])]
    if changed:
        return (f"{type(model).__name__}'s forward changes {', '.join(changed[:3])} while it runs: a traced graph "
                "cannot repeat Python state changes, and the converted model would stop making them")
    if not all(a == b if isinstance(a, tuple) else torch.equal(a, b) for a, b in zip(_rng_states(), rng)):
        random.setstate(rng[0])
        torch.set_rng_state(rng[1])
        if rng[2:]:
            torch.cuda.set_rng_state_all(rng[2:])
        return (f"{type(model).__name__}'s forward draws random numbers that no traced value feeds (torch.rand(()) or "
                "random.random() for stochastic depth): the converted graph would replay one draw on every call. Draw from a tensor of "
                "the stream instead (torch.rand_like(x[..., :1]), x.new_empty(...).bernoulli_(p)).")
    return ""


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


@contextlib.contextmanager
def state_restored(module: nn.Module) -> Iterator[None]:
    """Run or trace ``module`` for our own purposes (observing, tracing, verifying) without changing its
    state: its buffers' values (a KV cache position: torchtune) and what its Python code stores on its modules
    (a counter, a reassigned buffer; a tensor cached in a dict attribute while traced, LeViT's
    ``attention_bias_cache``, would keep a proxy there for the next trace or forward) are put back afterwards."""
    saved = [(b, b.detach().clone()) for b in module.buffers() if not b.is_inference()]  # (those cannot change here)
    attributes = [(m, dict(m.__dict__), {k: copy.copy(v) for k, v in m.__dict__.items() if type(v) in (dict, list, set)})
                  for m in module.modules()]
    try:
        yield
    finally:
        for m, kept, containers in attributes:  # attributes first: a reassigned buffer is the saved one again
            for key in set(m.__dict__) - set(kept):
                del m.__dict__[key]
            m.__dict__.update(kept)
            for key, value in containers.items():  # changed in place: their contents back
                kept[key].clear()
                if isinstance(value, list):
                    kept[key].extend(value)
                else:
                    kept[key].update(value)
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


_ADDS = {operator.add, torch.add}
# Tensor methods that re-lay out elements without changing them (also named in detect.py's messages).
RESHAPE_METHODS = {"reshape", "view", "flatten", "unflatten"}


def canonicalize(gm: fx.GraphModule) -> None:
    """Rewrite ``gm``'s residual sums in place so that each shows ``x + branch(x)``:

    * ``(R(x) + g(n(R(x)))).view(x.shape)`` -> ``x + g(...).reshape(x.shape)`` (OPT flattens the tokens
      around its MLP) when the sum is read only by that view back to ``x``'s shape: exact, reshapes
      keep the elements' order;
    * ``(x + f) + g`` -> ``x + (f + g)`` (Cohere's parallel block, GPT-J style with two norms; LongCat-Flash's
      shortcut MoE, computed from an earlier sublayer's norm) when nothing else reads ``x + f``, ``x`` is an
      ancestor of ``f``, and ``f`` and ``g`` do not depend on each other: float addition re-associated, so
      results change at rounding level only;
    * calls of hook-free ``nn.Identity`` modules are erased: taps that inspection tools put on the
      stream (``x = self.tap_mid(x)``) hid the adds from each other. Exact; the converted forward does
      not call them (hooks added later do not fire). A hooked one is kept: detection says where;
    * ``((h,) + rest)[0]`` -> ``h``: a tuple built and taken apart again (an attention child traced
      into, Megatron-BERT) hid the stream from its next sublayer. Exact.
    """
    changed = _look_through_identities(gm)
    changed = _take_from_tuple_concats(gm) or changed
    changed = _sink_residual_reshapes(gm) or changed
    while _regroup_one_sum(gm):
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()


def _look_through_identities(gm: fx.GraphModule) -> bool:
    erased = False
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and len(node.args) == 1 and not node.kwargs:
            module = gm.get_submodule(node.target)
            if type(module) is nn.Identity and not has_hooks(module):
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
                erased = True
    return erased


def _take_from_tuple_concats(gm: fx.GraphModule) -> bool:
    """``((h,) + rest)[0]`` -> ``h`` and ``((h,) + rest)[1:]`` -> ``rest``; the concat, then unread, goes."""
    taken = False
    for node in list(gm.graph.nodes):
        concat = node.args[0] if node.op == "call_function" and node.target is operator.getitem else None
        if not (isinstance(concat, fx.Node) and concat.op == "call_function" and concat.target is operator.add
                and isinstance(concat.args[0], tuple)):
            continue
        head, index = concat.args[0], node.args[1]
        if isinstance(index, int) and 0 <= index < len(head):
            node.replace_all_uses_with(head[index])
        elif index == slice(len(head), None, None):
            node.replace_all_uses_with(concat.args[1])
        else:
            continue
        gm.graph.erase_node(node)
        if not concat.users:
            gm.graph.erase_node(concat)
        taken = True
    return taken


def _is_add(n) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target in _ADDS and len(n.args) == 2 and not n.kwargs


def _regroup_one_sum(gm: fx.GraphModule) -> bool:
    dag = nx.DiGraph((i, n) for n in gm.graph.nodes for i in n.all_input_nodes)
    for outer in list(gm.graph.nodes):
        if not _is_add(outer):
            continue
        for inner, g in ((outer.args[0], outer.args[1]), (outer.args[1], outer.args[0])):
            if not (_is_add(inner) and isinstance(g, fx.Node) and len(inner.users) == 1):
                continue
            for x, f in ((inner.args[0], inner.args[1]), (inner.args[1], inner.args[0])):
                if not (isinstance(x, fx.Node) and isinstance(f, fx.Node)):
                    continue
                anc_f, anc_g = nx.ancestors(dag, f), nx.ancestors(dag, g)
                if x in anc_f and f not in anc_g and g not in anc_f:
                    with gm.graph.inserting_before(outer):
                        # f in the stream's dtype first: ``(x + f) + g`` added f and g to an fp32
                        # stream under autocast; ``f + g`` alone would round their sum to bf16
                        f32 = gm.graph.call_function(in_stream_dtype, (f, x))
                        branch = gm.graph.call_function(operator.add, (f32, g))
                    outer.args = (x, branch)
                    gm.graph.erase_node(inner)
                    return True
    return False


def _is_reshape_of(n, x=None) -> bool:
    return (isinstance(n, fx.Node) and n.op == "call_method" and n.target in RESHAPE_METHODS
            and (x is None or n.args[0] is x))


def _is_shape_of(n) -> fx.Node | None:
    """``x.shape`` / ``x.size()`` -> x."""
    if not isinstance(n, fx.Node):
        return None
    if n.op == "call_function" and n.target is getattr and n.args[1] == "shape":
        return n.args[0]
    if n.op == "call_method" and n.target == "size" and len(n.args) == 1:
        return n.args[0]
    return None


def _sink_residual_reshapes(gm: fx.GraphModule) -> bool:
    changed = False
    for back in list(gm.graph.nodes):
        # back = (R(x) + g).view(x.shape)
        if not (_is_reshape_of(back) and back.target in ("view", "reshape") and len(back.args) == 2 and not back.kwargs):
            continue
        add, x = back.args[0], _is_shape_of(back.args[1])
        if x is None or not _is_add(add) or set(add.users) != {back}:
            continue
        for r, g in ((add.args[0], add.args[1]), (add.args[1], add.args[0])):
            if _is_reshape_of(r, x) and isinstance(g, fx.Node):
                with gm.graph.inserting_before(back):
                    g_back = gm.graph.call_method("reshape", (g, back.args[1]))
                    new_add = gm.graph.call_function(operator.add, (x, g_back))
                back.replace_all_uses_with(new_add)
                gm.graph.erase_node(back)
                gm.graph.erase_node(add)
                changed = True
                break
    return changed
