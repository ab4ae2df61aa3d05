"""Detection: find pre-norm residual sites ``add(x, f(norm(x)))`` in a captured graph, link them
into streams, check what reads each stream, and explain everything that is not converted.

Contract: reads the GraphModule and a recording of every node's value on the example inputs; never
changes the graph. Returns a ``Plan`` (plain data) or raises ``ConversionError``.

How a site is recognised (by meaning):
  1. an add of two floating tensors of the same shape where one operand, the skip ``x``, is an
     ancestor of the other, the branch ``y``;
  2. networkx's dominators on the sub-DAG from ``x`` to ``y`` give the nodes every path from x to y
     passes through; the first of them that is a normalization of ``x`` is the norm; everything
     after it (dropout, a constant scale, a second norm) is the sublayer ``f``.
So ``x`` reaches the branch only through its norm, which is what makes the rewrite exact.

A normalization is recognised by meaning too: as a function of ``x`` it is scale-invariant
(``n(c x) == n(x)``) and not constant, which covers ``nn.LayerNorm``, a model's own RMSNorm class,
``F.rms_norm`` and an inlined ``x * rsqrt(mean(x^2) + eps) * w`` alike. Known norm modules and
functions fed directly by ``x`` skip the numeric probe.
"""
from __future__ import annotations

import copy
import dataclasses
import operator
import os
from typing import Any, Iterable, Optional

import networkx as nx
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .capture import RESHAPE_METHODS, SOURCE_LOCATION, forked_rng, has_hooks, in_mode, state_restored
from .errors import CONTROL_FLOW_HINT, ConversionError, GraphRunError, is_control_flow
from .plan import LeftOut, Plan, Site, Stream

_ADD_TARGETS = {operator.add, operator.iadd, torch.add, torch.Tensor.add}
NOT_PRE_NORM = "the branch does not read x through a norm over its last dimension (post-norm, plain residual, channels-first)"


NORM_FUNCTIONS = {F.layer_norm, torch.layer_norm, F.rms_norm, getattr(torch, "rms_norm", F.rms_norm)}
NORM_MODULE_TYPES = (nn.LayerNorm, nn.RMSNorm)


def is_norm_module(m: nn.Module) -> bool:
    return isinstance(m, NORM_MODULE_TYPES) or type(m).__name__.endswith(("RMSNorm", "LayerNorm", "RmsNorm"))


def is_known_norm(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return is_norm_module(gm.get_submodule(node.target))
    return node.op == "call_function" and node.target in NORM_FUNCTIONS


def describe(node: fx.Node) -> str:
    """A module path for a norm node, or what it is and where it sits."""
    if node.op == "call_module":
        return str(node.target)
    return ":".join(p for p in (module_path(node), node.name) if p)  # node names tell two inlined norms apart


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


def _holds_state(value: Any) -> bool:
    """An object a run may change (a KV cache): not a tensor, a module, a plain value or a config (a dataclass)."""
    return not isinstance(value, (torch.Tensor, nn.Module, int, float, bool, str, tuple, list, dict, torch.dtype, torch.device,
                                  slice, type(None), type(Ellipsis))) and not dataclasses.is_dataclass(value)


@torch.no_grad()
def probe_scale_invariant(
    gm: fx.GraphModule,
    recorded: dict[fx.Node, Any],
    region: list[fx.Node],
    x_node: fx.Node,
    out: fx.Node,
    *,
    must_depend: bool = True,
) -> bool:
    """True when ``out`` (computed from ``x_node`` through ``region``) normalises each position of ``x`` over
    its last dimension: unchanged when every position is scaled by a factor of its own. Block AttnRes mixes
    those rows; a norm over other dimensions (GroupNorm over [C, H, W]; ConvNeXt's depthwise convolution
    before a LayerNorm over C of a [N, C, H, W] stream) is invariant to one factor only, and is no such norm.
    ``must_depend``: ``out`` must also change with ``x`` (else a zero-weight norm would qualify)."""
    x = recorded.get(x_node)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return False
    if any(_holds_state(recorded.get(i)) for n in region for i in n.all_input_nodes):
        return False  # a KV cache holds what the recorded run added to it: re-run, the region attends to that too
    runner = _RegionRunner(gm, recorded)
    base, other = _random_like(x, seed=1234), _random_like(x, seed=1235)
    # [..., 1]: 4 or 16 per position; powers of two scale exactly in any dtype (bf16 rounding is ~4e-3)
    factor = 2.0 ** (3 + _random_like(x[..., :1], seed=1236).sign())
    try:
        y_small = runner.evaluate(region, x_node, base * 4, out)
        y_large = runner.evaluate(region, x_node, base * factor, out)
        y_other = runner.evaluate(region, x_node, other * 4, out)
    except Exception:  # noqa: BLE001 - a region that cannot be re-run is not a norm we can vouch for
        return False
    if not all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in (y_small, y_large, y_other)):
        return False
    y_small, y_large, y_other = (t.double() for t in (y_small, y_large, y_other))
    mag = y_small.abs().max().clamp_min(1e-30)
    scaled = ((y_small - y_large).abs().max() / mag).item()  # what scaling x changes: nothing, for a norm
    other = ((y_small - y_other).abs().max() / mag).item()  # what other values of x change
    # far less than other values change: a branch that barely reads x (a near-zero gain at init) is no norm
    return scaled < 1e-2 and (not must_depend or (other > 1e-3 and scaled < 1e-2 * other))


@torch.no_grad()
def reads_only_metadata(gm: fx.GraphModule, recorded: dict[fx.Node, Any], user: fx.Node, x_node: fx.Node) -> bool:
    """True when ``user`` reads ``x_node`` only for its shape/dtype/device (a mask builder, a rotary
    embedding taking x for its dtype): its output does not change when x's values do."""
    x = recorded.get(x_node)
    if not isinstance(x, torch.Tensor) or user.op == "output" or (user.op == "call_module" and _module_has_parameters(gm, user.target)):
        return False  # (a module computing with weights reads values: zeros at init, ControlNet's, only hide it)
    noise = _random_like(x, seed=4321)

    def unchanged(values: dict) -> bool:  # re-run both ways (not compared with the recording: a KV cache has changed)
        runner = _RegionRunner(gm, values)
        return _same_values(runner.evaluate([user], x_node, x, user), runner.evaluate([user], x_node, noise, user))

    # the user's other floating inputs drawn too: a gate at zero (torch.tanh(0) * x, ReZero) hides x's values at init
    others = {i: _random_like(v, seed=4322 + k) for k, i in enumerate(user.all_input_nodes)
              if i is not x_node and isinstance(v := recorded.get(i), torch.Tensor) and v.is_floating_point()}
    try:
        return unchanged(recorded) and (not others or unchanged({**recorded, **others}))
    except Exception:  # noqa: BLE001
        return False


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


def record_values(gm: fx.GraphModule, example_inputs: tuple) -> dict[fx.Node, Any]:
    """Run the graph once (eval mode, no grad) and keep every node's value. A node that fails raises
    ``GraphRunError`` naming where the user's code made it (the original exception is its cause)."""
    values: dict[fx.Node, Any] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            try:
                out = super().run_node(n)
            except Exception as exc:
                raise GraphRunError(_calling_module(n), n.meta.get(SOURCE_LOCATION)) from exc
            values[n] = out
            return out

    recorder = Recorder(gm, garbage_collect_values=False)
    recorder.extra_traceback = False  # no graph dump appended to the model's own message
    with torch.no_grad():
        recorder.run(*example_inputs)
    return values


def _calling_module(node: fx.Node) -> str:
    """Path of the module whose forward made ``node`` (for a module call: the caller, not the callee)."""
    stack = list(node.meta.get("nn_module_stack", {}).values())
    if node.op == "call_module" and stack and stack[-1][0] == node.target:
        stack = stack[:-1]
    return stack[-1][0] if stack else ""


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _ADD_TARGETS:
        return True
    return node.op == "call_method" and node.target in ("add", "__add__")


_CASTS = {"to", "type", "float", "double", "half", "bfloat16"}


def uncast(node: fx.Node) -> fx.Node:
    """``x`` for a dtype cast ``x.to(dtype)`` (``.float()``, ...) read by one node; else ``node``."""
    dtype_only = all(isinstance(a, torch.dtype) for a in [*node.args[1:], *node.kwargs.values()])
    if node.op == "call_method" and node.target in _CASTS and dtype_only and len(node.users) == 1:
        return node.args[0] if isinstance(node.args[0], fx.Node) else node
    return node


def _same_float_tensors(a: Any, b: Any) -> bool:
    return (
        isinstance(a, torch.Tensor)
        and isinstance(b, torch.Tensor)
        and a.is_floating_point()
        and a.shape == b.shape
        and a.dim() >= 2
    )


class _SiteFinder:
    def __init__(self, gm: fx.GraphModule, values: dict[fx.Node, Any]):
        self.gm = gm
        self.values = values
        self.dag = nx.DiGraph()  # the graph's data flow; every node, also one nothing reads or feeds
        self.dag.add_nodes_from(gm.graph.nodes)
        self.dag.add_edges_from((i, n) for n in gm.graph.nodes for i in n.all_input_nodes)
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}
        self.metadata_readers: dict[fx.Node, list[fx.Node]] = {}

    def drop_metadata_edges(self, x: fx.Node) -> list[fx.Node]:
        """Users of x that only read its shape/dtype carry no value: cut those edges for analysis."""
        if x not in self.metadata_readers:
            readers = [u for u in x.users if not _is_add(u) and reads_only_metadata(self.gm, self.values, u, x)]
            self.dag.remove_edges_from((x, u) for u in readers)
            self.metadata_readers[x] = readers
        return self.metadata_readers[x]

    def _between(self, src: fx.Node, dst: fx.Node) -> set[fx.Node]:
        """Nodes on some path src -> dst, both ends included."""
        return (nx.descendants(self.dag, src) & nx.ancestors(self.dag, dst)) | {src, dst}

    def _sorted(self, nodes) -> list[fx.Node]:
        return sorted(nodes, key=self.order.__getitem__)

    def _dominators(self, x: fx.Node, y: fx.Node, region: set[fx.Node]) -> list[fx.Node]:
        """The nodes of ``region`` every path x -> y passes through, from just after x down to y."""
        idom = nx.immediate_dominators(self.dag.subgraph(region), x)
        chain = [y]
        while chain[-1] is not x:
            chain.append(idom[chain[-1]])
        return chain[::-1][1:]

    def _known_norm_of(self, node: fx.Node, x: fx.Node) -> bool:
        """A norm module or function reading x, over x's last dimension (HF ConvNeXt's channels-first
        LayerNorm is a known norm over dim 1)."""
        return (is_known_norm(self.gm, node) and bool(node.args) and node.args[0] is x
                and probe_scale_invariant(self.gm, self.values, [node], x, node, must_depend=False))

    def ends_in_norm(self, node: fx.Node) -> bool:
        """``node`` is the output of a norm over the last dimension, or one that modules without parameters hand
        on (dropout, DropPath: Swin V2). With the next site continuing its add, it starts a stream with no norm
        before it (OLMo-2's ``x + norm(f(x))``): a post-norm add ``norm(x + f(x))`` is continued by no site."""
        while node.op == "call_module" and len(node.all_input_nodes) == 1 and not _module_has_parameters(self.gm, node.target):
            node = node.all_input_nodes[0]
        return bool(node.args) and isinstance(node.args[0], fx.Node) and self._known_norm_of(node, node.args[0])

    def match(self, add: fx.Node) -> tuple[Optional[Site], Optional[str]]:
        """A Site for this add, or (None, reason) when it looks like a residual but is not pre-norm."""
        if len(add.args) < 2 or not all(isinstance(a, fx.Node) for a in add.args[:2]):
            return None, None
        a, b = add.args[0], add.args[1]
        if not _same_float_tensors(self.values.get(a), self.values.get(b)):
            return None, None
        for operand, branch in ((a, b), (b, a)):
            skip = self._scaled_stream(operand, branch)  # Doge's `w * residual + f`: the stream times w, w not fed by it
            gain, skip = (None, operand) if skip is None else (operand, skip)
            x = uncast(skip)
            upcast = ""
            if x is not operand and x in nx.ancestors(self.dag, branch):  # Mamba: residual.to(torch.float32) + f
                if not torch.equal(self.values[skip].to(self.values[x].dtype), self.values[x]):
                    return None, (f"the residual {x.name} is cast to {self.values[skip].dtype} before the add, which "
                                  f"rounds the {self.values[x].dtype} stream; convert the model in the dtype the "
                                  "residual is kept in, or without the cast (Mamba: residual_in_fp32=False)")
                if self.values[add].dtype != torch.promote_types(self.values[x].dtype, self.values[branch].dtype):
                    upcast = str(self.values[add].dtype).removeprefix("torch.")  # the sum is wider than x
            self.drop_metadata_edges(x)
            if x in nx.ancestors(self.dag, branch):
                skip = x
                break
        else:
            return None, None  # two independent values (e.g. token + position embeddings)
        region = self._between(skip, branch)
        # x read by known norms only (one, or several as in GPT-NeoX's parallel attention + MLP):
        # x reaches the branch through them alone, whatever comes after.
        entries = self._sorted(set(self.dag.successors(skip)) & region)
        if entries and branch not in entries and all(self._known_norm_of(n, skip) for n in entries):
            return self._site(add, skip, branch, entries, entries, upcast, gain), None
        for cand in self._dominators(skip, branch, region):
            norm_region = self._sorted(self._between(skip, cand) - {skip})
            if self._known_norm_of(cand, skip) or probe_scale_invariant(self.gm, self.values, norm_region, skip, cand):
                return self._site(add, skip, branch, [cand], norm_region, upcast, gain), None
        if not self._has_parameters(region - {skip}):
            return None, None  # elementwise algebra (e.g. x + 0.044715 * x**3 inside a GELU), not a sublayer
        # no norm: the sublayer reads x itself (Gemma 4's per-layer input, x + norm(W(act(V x) * e))), and will read
        # the mixture there. Kept where it continues a stream, or starts one its branch ending in a norm (build_plan)
        return self._site(add, skip, branch, entries, entries, upcast, gain, unnormalized=True), None

    def _scaled_stream(self, operand: fx.Node, branch: fx.Node) -> Optional[fx.Node]:
        """``x`` when ``operand`` is ``x * w`` (or ``x.to(dtype) * w``), out of place (``x.mul_(w)`` would scale what
        else reads x too) and read by the add alone, where ``x`` is an ancestor of ``branch`` and ``w`` is not fed by
        ``x`` (its dtype aside: ``w.to(x.dtype) * x``): the stream scaled before the branch is added. Where x is a
        token view of the stream (Swin), w must scale channels only, as the rewrite scales the sums in the stream's
        shape."""
        if operand.target in (operator.imul, "mul_") or len(operand.users) != 1:
            return None
        for a in operand.args:
            if isinstance(a, fx.Node):
                self.drop_metadata_edges(uncast(a))
        xs = [a for a in operand.args if isinstance(a, fx.Node) and uncast(a) in nx.ancestors(self.dag, branch)
              and _scales(operand, a, uncast(a), self)]
        if len(xs) != 1:
            return None
        w = next(self.values.get(a, a) for a in operand.args if a is not xs[0])
        per_channel = not isinstance(w, torch.Tensor) or w.numel() == (w.shape[-1] if w.dim() else 1)
        return xs[0] if per_channel or _token_view_of(uncast(xs[0]), self.values) is None else None

    def effective_readers(self, node: fx.Node) -> list[tuple[fx.Node, fx.Node]]:
        """``(reader, what it reads)`` for the value of ``node``, looking through containers: a
        Hugging Face output object or a tuple holding the tensor, and the getattr/getitem that take
        the very same tensor object back out (checked on the recorded values, not by spelling)."""
        value = self.values.get(node)
        found = []
        for user in node.users:
            uval = self.values.get(user)
            if uval is value and user.op != "output":  # an alias of the same tensor
                found += self.effective_readers(user)
            elif _selects_tokens(user, uval, value):  # h[:, 0] then a norm: per-token norms commute
                found += self.effective_readers(user)
            elif user.op == "call_function" and _holds(uval, value):
                for taker in user.users:
                    if self.values.get(taker) is value:
                        found += self.effective_readers(taker)
            else:
                found.append((user, node))
        return found

    def inlined_norm_region(self, x: fx.Node) -> set[fx.Node]:
        """Nodes of a norm written out inline right after ``x`` (``x * rsqrt(mean(x^2) + eps) * g``):
        the region up to the first node that every path from x to the output passes through and
        that is scale-invariant in x. Empty when there is none."""
        out = next(n for n in reversed(self.gm.graph.nodes) if n.op == "output")
        reach = nx.descendants(self.dag, x)
        if out not in reach:
            return set()
        for cand in self._dominators(x, out, reach | {x}):
            region = self._between(x, cand) - {x}
            # an inline norm is plain tensor math on x, its own parameters and constants: no module
            # calls, no other inputs (else "the norm" would swallow whole layers)
            if any(n.op not in ("call_function", "call_method") for n in region):
                return set()
            if any(i not in region and i is not x and i.op != "get_attr" for n in region for i in n.all_input_nodes):
                return set()
            if probe_scale_invariant(self.gm, self.values, self._sorted(region), x, cand):
                return region
        return set()

    def is_norm_of(self, node: fx.Node, x: fx.Node) -> bool:
        """``node`` normalises ``x`` directly (a known norm, or a single call that is scale-invariant in x)."""
        return self._known_norm_of(node, x) or probe_scale_invariant(self.gm, self.values, [node], x, node)

    def _has_parameters(self, region: set[fx.Node]) -> bool:
        return any(n.op == "get_attr" or (n.op == "call_module" and _module_has_parameters(self.gm, n.target)) for n in region)

    def _site(self, add, skip, branch, norm_outs: list[fx.Node], norm_region, skip_upcast: str, gain: Optional[fx.Node],
              unnormalized=False) -> Site:
        after_norm = set().union(*(self._between(n, branch) for n in norm_outs)) - (set() if unnormalized else set(norm_outs))
        # The sublayer is the deepest module holding the branch's module calls (and any function
        # call made inside a submodule of its own); glue like `getitem` at the layer level is ignored.
        # Parameter-free modules (a dropout shared by the whole layer) do not define the sublayer.
        add_path = module_path(add)
        modules = [n.target for n in after_norm if n.op == "call_module"]
        with_params = [m for m in modules if _module_has_parameters(self.gm, m)]
        paths = with_params or modules
        paths += [
            p for p in (module_path(n) for n in after_norm if n.op in ("call_function", "call_method"))
            if p and len(p) > len(add_path) and p.startswith(add_path)
        ]
        # no common module below the one holding the add (DINOv2's attention + LayerScale): that one
        sublayer = (common_prefix(paths) or add_path) if paths else f"{add_path}:<inline>"
        return Site(
            stream=-1,
            index=-1,
            norm=" + ".join(describe(n) for n in norm_outs),
            sublayer=sublayer,
            add_node=add.name,
            skip_node=skip.name,
            branch_node=branch.name,
            norm_node=norm_outs[0].name,
            norm_entry_nodes=[n.name for n in norm_region if skip in n.all_input_nodes],
            skip_upcast=skip_upcast,
            skip_gain=gain.name if gain is not None else "",
            unnormalized=unnormalized,
        )


def _module_has_parameters(gm: fx.GraphModule, path: str) -> bool:
    return any(True for _ in gm.get_submodule(path).parameters())


def _selects_tokens(node: fx.Node, out: Any, value: Any) -> bool:
    """``node`` indexes tokens of ``value`` (a view keeping the whole hidden dimension)."""
    if not (node.op == "call_function" and node.target is operator.getitem and isinstance(value, torch.Tensor)):
        return False
    if not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[-1] != value.shape[-1]:
        return False
    index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    keeps_last = index[-1] == slice(None) or (Ellipsis not in index and len(index) < value.dim())
    return keeps_last and out.untyped_storage().data_ptr() == value.untyped_storage().data_ptr()


def _holds(container: Any, value: Any) -> bool:
    """``container`` (a tuple, list, dict or dataclass such as a ModelOutput) holds ``value`` itself."""
    if isinstance(container, dict):
        items = container.values()
    elif isinstance(container, (tuple, list)):
        items = container
    elif hasattr(container, "__dataclass_fields__"):
        items = [getattr(container, f, None) for f in container.__dataclass_fields__]
    else:
        return False
    return any(item is value for item in items)


def common_prefix(paths: list[str]) -> str:
    """The deepest module path above all of ``paths`` ("" if none): compared part by part, not by character."""
    return ".".join(os.path.commonprefix([p.split(".") for p in paths]))


def build_plan(
    gm: fx.GraphModule,
    values: dict[fx.Node, Any],
    *,
    opaque_modules: Optional[dict[str, str]] = None,
    opaque_with_norms: Optional[list[str]] = None,
    ends_at_output: bool = False,
) -> Plan:
    """``ends_at_output``: ``gm`` is one layer traced alone; its streams end at its output (see
    ``check_stream_readers``)."""
    finder = _SiteFinder(gm, values)
    nodes = {n.name: n for n in gm.graph.nodes}
    plan = Plan(opaque_modules=dict(opaque_modules or {}), opaque_with_norms=list(opaque_with_norms or []))
    sites_by_add: dict[str, Site] = {}
    for node in gm.graph.nodes:
        if not _is_add(node):
            continue
        site, reason = finder.match(node)
        if site is not None:
            sites_by_add[node.name] = site
        elif reason is not None:
            plan.left_out.append(LeftOut(node.name, module_path(node), reason))

    # Link sites into streams: a site continues the stream whose last add is its skip input, or a token
    # view of it (Swin: ``x.reshape(B, -1, C)`` between its sublayers)
    continued = {(_token_view_of(nodes[s.skip_node], values) or nodes[s.skip_node]).name for s in sites_by_add.values()}
    for site in sites_by_add.values():  # graph order
        skip = nodes[site.skip_node]
        viewed = _token_view_of(skip, values)
        prev = sites_by_add.get((viewed or skip).name)
        if prev is not None and prev.stream >= 0:
            site.skip_view = skip.name if viewed is not None else ""
            stream = plan.streams[prev.stream]
            if site.skip_upcast:  # only b_0 can be widened (the block sums are already that wide after it)
                raise ConversionError(f"the residual stream after {prev.sublayer} is widened to {site.skip_upcast} "
                                      f"(cast, or scaled by a gain in that dtype) before {site.sublayer}'s add, which "
                                      "widens the sum mid-stream")
        elif site.unnormalized and not (site.add_node in continued and finder.ends_in_norm(nodes[site.branch_node])):
            plan.left_out.append(LeftOut(site.add_node, module_path(nodes[site.add_node]), NOT_PRE_NORM))
            continue
        else:
            src = nodes[site.skip_node]
            stream = Stream(
                index=len(plan.streams),
                source=module_path(src) or src.name,
                source_node=src.name,
                hidden_size=int(values[src].shape[-1]),
                dtype=site.skip_upcast,
            )
            plan.streams.append(stream)
        site.stream, site.index = stream.index, len(stream.sites)
        stream.sites.append(site)

    if not plan.streams:
        raise ConversionError(nothing_matched_message(plan))

    for stream in plan.streams:
        check_stream_readers(stream, nodes, finder, ends_at_output=ends_at_output)
    return plan


def _token_view_of(node: fx.Node, values: dict) -> Optional[fx.Node]:
    """``x`` when ``node`` is ``x.reshape(...)`` (``view``, ``flatten``, ...) keeping the last dimension:
    the same tokens, grouped otherwise (reshapes keep the elements' order). Else None."""
    x = node.args[0] if node.op == "call_method" and node.target in RESHAPE_METHODS else None
    a, b = values.get(x), values.get(node)
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.numel() == b.numel() and a.dim() and b.dim() \
            and a.shape[-1] == b.shape[-1]:
        return x
    return None


def check_stream_readers(stream: Stream, nodes: dict[str, fx.Node], finder, *, ends_at_output: bool = False) -> None:
    """Every intermediate stream value may only be read by the next site's norm and add (and by
    nodes that only look at its shape/dtype, which the rewrite points at the source instead).

    The stream's end must feed a norm (the final norm) or, with ``ends_at_output`` (one layer traced
    alone, whose output hands the stream to the next layer), only the graph's output."""
    problems = []
    source = nodes[stream.source_node]
    # each stream value (the source, then every add but the last), what it is, and the site that reads it next
    values = [(source, f"the input of {stream.sites[0].sublayer}", None)]
    values += [(nodes[site.add_node], f"the stream after {site.sublayer}", site) for site in stream.sites[:-1]]
    for (value, what, site), nxt in zip(values, stream.sites):
        metadata_readers = [r.name for r in finder.drop_metadata_edges(value)]
        if site is not None:
            site.metadata_readers = metadata_readers
        allowed = set(nxt.norm_entry_nodes) | _reading_add(nxt, nodes) | set(metadata_readers)
        read = [value]
        if nxt.skip_view:  # a view of the stream is read as the stream is (its own shape readers read h's view)
            allowed |= {nxt.skip_view} | {r.name for r in finder.drop_metadata_edges(nodes[nxt.skip_view])}
            read.append(nodes[nxt.skip_view])
        for user in [u for v in read for u in v.users]:
            if user.name not in allowed:
                problems.append(f"{what} is also read by {module_path(user) or '?'} "
                                f"({user.op} {getattr(user.target, '__name__', user.target)})")
    if problems:
        raise ConversionError(
            "cannot convert exactly: a residual stream is read by something other than the next "
            "sublayer's norm and residual add (parallel branches, or a hidden state taken out mid-stream):\n  "
            + "\n  ".join(problems)
            + "\nAttnRes replaces these intermediate sums; convert a model whose stream is only read by norms."
        )
    last = nodes[stream.sites[-1].add_node]
    if ends_at_output:
        _check_stream_ends_at_output(stream, last, source, finder)
        return
    for user, alias in finder.effective_readers(last):  # the stream's end must feed a norm (the final norm)
        if user in finder.drop_metadata_edges(alias):
            continue  # reads only its dtype/shape (T5: `if hidden_states.dtype == torch.float16`)
        if not finder.is_norm_of(user, alias) and user not in finder.inlined_norm_region(alias):
            raise ConversionError(
                f"cannot convert exactly: the residual stream after {stream.sites[-1].sublayer} is read by "
                f"{module_path(user) or user.name} ({user.op} {getattr(user.target, '__name__', user.target)}), "
                "which is not a normalization. AttnRes streams must end in a norm (the final norm); "
                + _why_not_a_norm(user)
            )
    readers = [u for u in last.users if u not in finder.drop_metadata_edges(last)]
    stream.consumer_nodes = [u.name for u in readers]
    inline = finder.inlined_norm_region(last)
    names = [module_path(u) or u.name for u in readers if u not in inline]
    if inline & set(readers):  # an inlined final norm: name it by its output node
        names.append("inline norm " + describe(finder._sorted(inline)[-1]))
    stream.consumers = names


def _reading_add(site: Site, nodes: dict[str, fx.Node]) -> set[str]:
    """The site's add, and what it reads the skip through: a cast (``x.to(float32) + f``), a gain (``w * x + f``)."""
    add, x = nodes[site.add_node], nodes[site.skip_node]
    through = [add] + ([nodes[site.skip_gain]] if site.skip_gain else [])
    return {n.name for n in through} | {n.name for r in through for n in r.all_input_nodes if n is not x and uncast(n) is x}


def _returned_tuple_concat(user: fx.Node, value: fx.Node) -> bool:
    """``user`` is ``(..., value, ...) + rest``, a tuple only the output reads."""
    return (user.op == "call_function" and user.target is operator.add and isinstance(user.args[0], tuple)
            and value in user.args[0] and all(u.op == "output" for u in user.users))


def _check_stream_ends_at_output(stream: Stream, last: fx.Node, source: fx.Node, finder) -> None:
    metadata = finder.drop_metadata_edges(last)
    view = last  # token views of the end, the last one back to the source's shape (Swin: to (B, H, W, C))
    while len(readers := [u for u in view.users if u not in finder.drop_metadata_edges(view)]) == 1 \
            and _token_view_of(readers[0], finder.values) is view:
        view = readers[0]
    if view is not last and finder.values[view].shape == finder.values[source].shape:
        stream.end_view, last, metadata = view.name, view, []
    scaled = [u for u in last.users if u not in metadata]
    if len(scaled) == 1 and _scales(scaled[0], last, source, finder, keeps_dtype=True):  # Gemma 4: `h *= self.layer_scalar`
        stream.sites[-1].end_scale, last, metadata = scaled[0].name, scaled[0], finder.drop_metadata_edges(scaled[0])
    # FX puts a returned tuple (hidden_states, attn_weights) in the output node's own arguments; a tuple
    # built by concatenation, ``(hidden_states,) + attention_output[1:]`` (T5-style), is an add node
    others = [u for u in last.users if u not in metadata and u.op != "output" and not _returned_tuple_concat(u, last)]
    if others:
        user = others[0]
        raise ConversionError(
            f"the residual stream after its last residual add ({stream.sites[-1].add_node}) is read by "
            f"{module_path(user) or user.name} ({user.op} {getattr(user.target, '__name__', user.target)}) "
            "inside the module that holds it, besides being returned"
        )
    stream.consumer_nodes, stream.consumers = [], ["output"]


MULTIPLIES = {operator.mul, operator.imul, torch.mul, "mul", "mul_", "__mul__"}


def _scales(node: fx.Node, end: fx.Node, source: fx.Node, finder, keeps_dtype=False) -> bool:
    """``node`` is ``end * s``, ``s`` not fed by the stream (``source``), in ``end``'s shape (and dtype): the rewrite
    scales every block sum (``s * (b_0 + ... + partial)`` is their sum scaled, term by term)."""
    s = [a for a in node.args if a is not end]
    if node.op not in ("call_function", "call_method") or node.target not in MULTIPLIES or len(node.args) != 2 \
            or len(s) != 1 or node.kwargs:  # (``out=``)
        return False
    out, value = finder.values.get(node), finder.values.get(end)
    fed = isinstance(s[0], fx.Node) and (s[0] is source or source in nx.ancestors(finder.dag, s[0]))
    return (not fed and isinstance(out, torch.Tensor) and isinstance(value, torch.Tensor) and out.shape == value.shape
            and (out.dtype == value.dtype or not keeps_dtype))


def nothing_matched_message(plan: Plan) -> str:
    lines = ["no pre-norm residual site `x + f(norm(x))` was found; nothing to convert."]
    if plan.left_out:
        lines.append("Residual adds that were seen but are not pre-norm:")
        for lo in plan.left_out[:8]:
            lines.append(f"  {lo.module or lo.node}: {lo.reason}")
        if len(plan.left_out) > 8:
            lines.append(f"  ... and {len(plan.left_out) - 8} more")
        lines.append("Post-norm models (norm(x + f(x)), e.g. BERT) cannot be given AttnRes exactly.")
    lines += _opaque_lines(plan.opaque_modules)
    if plan.opaque_with_norms:
        shown = ", ".join(plan.opaque_with_norms[:6]) + (" ..." if len(plan.opaque_with_norms) > 6 else "")
        lines.append(
            "These modules are kept whole because of their class name (attention/norm/embedding) but contain "
            f"a norm, so a residual may be inside: {shown}"
        )
    return "\n".join(lines)


def _opaque_lines(opaque_modules: dict[str, str]) -> list[str]:
    """Each module kept whole with the reason capture recorded (error, inner module, file:line)."""
    if not opaque_modules:
        return []
    lines = ["These modules could not be traced into and may hide residuals:"]
    lines += [f"  {path}: {why}" for path, why in opaque_modules.items()]
    if any(is_control_flow(why) for why in opaque_modules.values()):
        lines.append(CONTROL_FLOW_HINT)
    return lines


def _why_not_a_norm(user) -> str:
    name = getattr(user.target, "__name__", user.target)
    if name in RESHAPE_METHODS:
        return ("here the stream is reshaped between sublayers. The rewrite follows reshapes that keep the last "
                "dimension (Swin's `x.reshape(B, -1, C)`) and a residual sum viewed straight back to the stream's "
                "shape (OPT's `(x.reshape(-1, D) + mlp(...)).view(x.shape)`), not this one.")
    return "this is typical of post-norm sublayers (x + norm(f(x))) or a model without a final norm."


# ---------------------------------------------------------------------------------------------------
# Children that add the residual themselves: ``self.mlp(h, residual)`` returning ``residual + g(h)``.
#
# BLOOM's attention and MLP end in ``dropout_add(out, residual)``; Megatron-BERT's ``SelfOutput(h,
# input_tensor)`` returns ``input_tensor + dropout(dense(h))``. Seen from the layer that holds them, the
# stream goes into a module that is not a norm, and the residual add is hidden inside it.
#
# ``split_residual_children`` finds such a call by probing it while the graph runs on the example inputs:
# with a stream-like argument replaced by random ``r``, its (first) tensor output must be exactly ``r +``
# its output with zeros there, for two different ``r``. Then it rewrites ``child(h, x)`` as ``x + child(h, zeros_like(x))``:
# the same function, and exact, since the child computes ``residual + out`` and ``out + 0 == out``. A
# child that does anything else with the argument (a post-norm ``norm(x + out)``) fails the probe and is
# left alone. The splits are returned, so that another trace of the same module (another call signature,
# traced symbolically) applies the same ones without running anything.
# ---------------------------------------------------------------------------------------------------
Split = tuple[str, Any]  # (the call's node name, its argument slot: a position or a keyword)


def split_residual_children(gm: fx.GraphModule, inputs: tuple | None, known: list[Split] | None = None) -> list[Split]:
    """Rewrite ``gm`` in place: the residual children found by running it on ``inputs`` (probing each
    call that takes a stream-like value as it comes, before the call changes anything it was given, a
    KV cache), or the ``known`` splits without running anything. Returns the splits made."""
    if known is None:
        prober = _Prober(gm)
        try:
            with torch.no_grad():
                prober.run(*inputs)
        except ConversionError:
            raise
        except Exception:  # noqa: BLE001 - the graph fails on these inputs: record_values says where
            return []
        known = prober.found
    splits: list[Split] = []
    for node in list(gm.graph.nodes):
        if node.op == "call_module":
            for name, slot in known:
                if name == node.name:  # node names are the same in every trace of the module's class code
                    _split(gm, node, slot)
                    splits.append((name, slot))
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
        """An argument of the graph, a sum, or the output of a call that added the residual (or a view of one)."""
        if not isinstance(arg, fx.Node):
            return False
        if arg.op == "call_function" and arg.target is operator.getitem and arg.args[1] == 0:
            arg = arg.args[0]
        if arg.op == "call_method" and arg.target in RESHAPE_METHODS:  # a view of the stream (Swin)
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
                    and _adds_it(node.target, module, before, slot, x)):
                self.found.append((node.name, slot))
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


def _perturbed(module) -> dict[str, torch.Tensor]:
    return {n: p * (1 + 0.1 * _random_like(p, 2 * i)) + 0.01 * _random_like(p, 2 * i + 1)
            for i, (n, p) in enumerate(module.named_parameters()) if p.is_floating_point()}


def _adds_it(name: str, module, call: tuple, slot, x: torch.Tensor) -> bool:
    """``module(*call)`` with ``x`` at ``slot`` replaced by r is ``r +`` the call with zeros there, in eval and
    in training (the same random draws: a dropout around the sum fails), also with the module's parameters
    perturbed, where the call with zeros must add something (a dropout or a scale on a sum adds nothing).
    Refused where it holds at the module's own parameters only: Zaya's learned residual scale (ones at init)."""
    generator = torch.Generator().manual_seed(0)
    rs = [torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device) for _ in range(2)]

    def run(replacement, params: dict, training: bool):
        args, kwargs = _with(*copy.deepcopy(call), slot, replacement)
        with in_mode(module, training), state_restored(module), forked_rng():
            torch.manual_seed(0)
            try:
                return _first_tensor(torch.func.functional_call(module, params, args, kwargs))
            except Exception:  # noqa: BLE001 - a call the probe cannot make: not split
                return None

    def holds(params: dict) -> Optional[bool]:  # None: it holds, and the call with zeros adds nothing
        added = False
        for training in (False, True):
            base = run(torch.zeros_like(x), params, training)
            if base is None or base.shape != x.shape:
                return False
            if not all((out := run(r, params, training)) is not None and torch.equal(out, r + base) for r in rs):
                return False
            added = added or bool(base.any())
        return True if added else None

    own = holds({})
    if own is False:
        return False
    perturbed = holds(_perturbed(module))
    if perturbed is False and own:
        raise ConversionError(f"{name} ({type(module).__name__}) adds the residual it is given through parameters that "
                              "are the identity only at init: AttnRes replaces that residual, and they would not train")
    return perturbed is True


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
