"""Pipeline parallelism for converted models (``torch.distributed.pipelining``), with the paper's
cross-stage caching (Attention Residuals, §4.1).

Between two rewritten layers a converted model hands on an ``AttnResState`` (the completed block sums
``b_0 .. b_n`` and the running partial sum of the current block, or ``None`` at a block boundary).
Across a stage boundary that state travels as tensors in one fixed layout, **two tensors**:

    blocks   [m, *hidden]   the block sums this transition sends, stacked, oldest first
    partial  [p, *hidden]   p = 1: the running sum of the current block; p = 0 (an empty tensor):
                            the boundary is at a block's end

``hidden`` is the stream's own shape (``[batch, seq, d]`` for a language model). The receiver rebuilds
the state from the tensors alone (``unpack_state``): ``m`` and ``p`` are the tensors' first sizes.
Without caching, ``blocks`` holds every completed block, ``b_0`` (the embedding output) first. With
caching, it holds only the blocks the receiving rank has not received before (its earlier
transitions); the receiver puts the ones it keeps in front (``unpack_state(..., cached=...)``).
``state_layout(model, layer)`` says, from the conversion plan, how many blocks are complete before a
layer and whether a partial sum exists there.

Two ways to split a converted model:

* ``pipeline(model, mb_args, split_spec=split_spec(model, [2]))``: PyTorch's tracer splits it; the
  state crosses as the flattened ``AttnResState`` (every block, no caching). ``split_spec`` turns layer
  indices into the tracer's split points and checks them.
* ``build_stages(model, [2, 4, 6], rank=r, num_ranks=P, example_kwargs=...)``: the ``PipelineStage``
  objects of this rank (chunk ``c`` on rank ``c % P``: one stage per rank for GPipe / 1F1B, V per rank
  for the interleaved schedules; ``style="v"``: two per rank in a V, for ZBV and DualPipeV), in the
  layout above, caching on by default (``cache=False``: the naive scheme). Every stage runs the model's
  own forward: the code before the first layer (embedding, rotary tables, masks) runs on every stage, so
  every stage is called with the model's inputs as keyword arguments (``schedule.step(idx=x, target=y)``
  on every rank); the layers before the stage pass their input on untouched, the stage's first layer
  takes the received state, and the forward stops where the next stage's first layer begins.

Cross-stage caching: each rank keeps, per microbatch, the block sums it has received; a transition
sends only the blocks its receiver does not hold. In the backward, the gradients that a rank's later
chunks produce for a kept block are summed on that rank (a tap) and added once, to the gradient the
chunk that received the block sends back: the gradient reaches the block's producer once, complete.
Bytes sent per transition are counted from the P2P send ops the stages hand to the transport
(``stage.sent``).
"""
from __future__ import annotations

import contextlib
import functools
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from residual_rewriter.passes.errors import ConversionError
from residual_rewriter.passes.layerwise import bind_call, installed_forward
from residual_rewriter.passes.state import AttnResState

__all__ = [
    "StateLayout",
    "pack_state",
    "unpack_state",
    "state_layout",
    "split_spec",
    "build_stages",
    "AttnResPipelineStage",
    "transition_bytes",
    "reduce_outside_grads",
    "layers_of",
]


# ---------------------------------------------------------------------------------------------------
# The layout
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StateLayout:
    """The state at a stage boundary: ``num_blocks`` complete block sums (``b_0`` included) and,
    when ``has_partial``, the running sum of the current block."""

    num_blocks: int
    has_partial: bool

    def sent_blocks(self, cached: int = 0) -> int:
        """Block sums a transition sends when the receiver already holds ``cached`` of them."""
        return self.num_blocks - cached


TORCH_VERSION = torch.__version__  # a TorchVersion: compares with (2, 13)


def _check_split_backward() -> None:
    """torch < 2.13's split backward (the zero-bubble schedules) cannot take weight gradients through a custom
    autograd op such as ``attn_res`` (``_input_metadata`` of its node)."""
    if TORCH_VERSION < (2, 13):
        raise ConversionError(
            f"the zero-bubble schedules' split backward (ScheduleInterleavedZeroBubble, ScheduleZBVZeroBubble, "
            f"ScheduleDualPipeV) needs torch >= 2.13 for a converted model (this is {torch.__version__}: its "
            "weight backward cannot pass the attn_res op). Use ScheduleInterleaved1F1B, Schedule1F1B or GPipe, or "
            "torch >= 2.13.")


def pack_state(state: AttnResState, cached: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(blocks, partial)``: the state as the two tensors of the layout, leaving out the first
    ``cached`` block sums (those the receiver already holds)."""
    if not isinstance(state, AttnResState):
        raise TypeError(
            f"pack_state takes the AttnResState a rewritten layer returns, got {type(state).__name__}: a split "
            "point must lie between two rewritten layers (not after the last one)"
        )
    if not 0 <= cached <= len(state.blocks):
        raise ValueError(f"cached={cached}, but the state holds {len(state.blocks)} block sums")
    ref = state.blocks[0]
    new = state.blocks[cached:]
    # new tensors, not views (the zero-bubble backward detaches stage outputs in place); on torch < 2.13 an empty one
    # is computed from b_0, so that it has a gradient (an older PipelineStage's backward asks every output for one)
    empty = ref.unsqueeze(0)[:0].clone() if TORCH_VERSION < (2, 13) else ref.new_zeros((0, *ref.shape))
    blocks = torch.stack(new) if new else empty
    partial = torch.stack([state.partial]) if state.partial is not None else empty.clone()
    return blocks, partial


def unpack_state(blocks: torch.Tensor, partial: torch.Tensor, cached: Sequence[torch.Tensor] = ()) -> AttnResState:
    """The ``AttnResState`` that ``pack_state`` packed: ``cached`` (the block sums the receiver holds)
    then the rows of ``blocks``; a partial sum when ``partial`` has a row."""
    if not isinstance(blocks, torch.Tensor) or not isinstance(partial, torch.Tensor):
        raise TypeError("unpack_state takes the two tensors of the layout: (blocks [m, *hidden], partial [0 or 1, *hidden])")
    if partial.shape[0] not in (0, 1) or blocks.shape[1:] != partial.shape[1:]:
        raise ValueError(
            f"not the state layout: blocks {tuple(blocks.shape)}, partial {tuple(partial.shape)} (expected "
            "[m, *hidden] and [0 or 1, *hidden])"
        )
    all_blocks = [*cached, *blocks.unbind(0)]
    if not all_blocks:
        raise ValueError("the state has no block sums: b_0 (the embedding output) is always one")
    empty = [t for t in (blocks, partial) if t.shape[0] == 0 and t.requires_grad]
    if empty and TORCH_VERSION < (2, 13):  # an older PipelineStage fails on an input without a gradient: a zero one
        all_blocks[0] = all_blocks[0] + sum(t.sum() for t in empty)
    return AttnResState(tuple(all_blocks), partial[0] if partial.shape[0] else None)


# ---------------------------------------------------------------------------------------------------
# The plan: layers and the layout before each
# ---------------------------------------------------------------------------------------------------
def _report(model: nn.Module):
    report = getattr(model, "attn_res_report", None)
    if report is None or not report.converted:
        raise ConversionError(f"{type(model).__name__} is not converted: run residual_rewriter.convert_(model) first")
    if len(report.streams) != 1:
        raise ConversionError(f"pipelining takes a model with one residual stream; this one has {len(report.streams)}")
    if report.holders == [""]:
        raise ConversionError(
            f"{type(model).__name__} was converted as one holder (its adds sit in its own forward): there are no "
            "rewritten layers to split between"
        )
    return report


def layers_of(model: nn.Module) -> list[str]:
    """Module paths of the rewritten layers, in depth order (the split points index this list)."""
    return list(_report(model).holders)


def state_layout(model: nn.Module, layer: int) -> StateLayout:
    """The layout of the state entering rewritten layer ``layer`` (0-based; 1 .. L-1), from the plan."""
    report = _report(model)
    holders = report.holders
    _check_split_points(holders, [layer])
    prefix = holders[layer] + "."
    first = next((s for s in report.sites if s.sublayer.startswith(prefix) or s.norm.startswith(prefix)), None)
    if first is None:
        raise ConversionError(f"the plan lists no sublayer under {holders[layer]}")
    # the first sublayer of block n reads b_0 .. b_{n-1}; a later one also the partial sum of block n
    return StateLayout(num_blocks=first.block, has_partial=first.position > 0)


def _check_split_points(holders: list[str], points: Sequence[int]) -> list[int]:
    points = list(points)
    num = len(holders)
    for p in points:
        if isinstance(p, bool) or not isinstance(p, int):
            raise TypeError(f"split points are layer indices (int), got {p!r}")
        if not 1 <= p <= num - 1:
            raise ValueError(
                f"split point {p} is not between two rewritten layers: the model has {num} ({holders[0]} .. "
                f"{holders[-1]}); a split point i puts layer i first in its stage, so 1 <= i <= {num - 1}"
            )
    if points != sorted(set(points)):
        raise ValueError(f"split points must be increasing and distinct, got {points}")
    return points


def split_spec(model: nn.Module, split_points: Sequence[int]) -> dict:
    """``split_spec`` for ``torch.distributed.pipelining.pipeline``: a stage begins at each of the
    rewritten layers ``split_points`` (indices into ``layers_of(model)``)."""
    from torch.distributed.pipelining import SplitPoint

    holders = layers_of(model)
    return {holders[p]: SplitPoint.BEGINNING for p in _check_split_points(holders, split_points)}


# ---------------------------------------------------------------------------------------------------
# Running a range of layers through the model's own forward
# ---------------------------------------------------------------------------------------------------
class _Stop(BaseException):  # not an Exception: a model's own `except Exception` must not swallow it
    def __init__(self, value: Any):
        super().__init__("stage output")
        self.value = value


@contextlib.contextmanager
def _forwards(replacements: dict[nn.Module, Callable]):
    saved = {m: m.__dict__.get("forward") for m in replacements}
    try:
        for m, f in replacements.items():
            m.__dict__["forward"] = f
        yield
    finally:
        for m, f in saved.items():
            if f is None:
                m.__dict__.pop("forward", None)
            else:
                m.__dict__["forward"] = f


def _pass_on(x, *args, **kwargs):
    return x


def _stop(x, *args, **kwargs):
    raise _Stop(x)


def _model_output(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot take a tensor from the model's output ({type(out).__name__}): pass output_fn=")


def run_layers(model: nn.Module, layers: list[nn.Module], lo: int, hi: int, state: Optional[AttnResState],
               kwargs: dict, output_fn: Callable = _model_output) -> Any:
    """Run ``model(**kwargs)`` with only layers ``lo .. hi-1`` computing: earlier layers pass their input
    on, layer ``lo`` takes ``state`` (when ``lo > 0``), and the forward stops at layer ``hi``'s input,
    which is returned (the model's output, through ``output_fn``, when ``hi`` is the end)."""
    replacements: dict[nn.Module, Callable] = {layers[i]: _pass_on for i in range(lo)}
    if lo > 0:
        own = layers[lo].forward

        def enter(x, *args, **kw):
            return own(state, *args, **kw)

        replacements[layers[lo]] = enter
    if hi < len(layers):
        replacements[layers[hi]] = _stop
    try:
        with _forwards(replacements):
            out = model(**kwargs)
    except _Stop as stop:
        return stop.value
    if hi < len(layers):
        raise RuntimeError(f"the model's forward returned before reaching layer {hi}")
    return output_fn(out)


# ---------------------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------------------
@dataclass
class _RankCache:
    """Per rank: the block sums its chunks received, per microbatch, and the gradients its later
    chunks produced for them (summed, handed back once by the chunk that received them)."""

    enabled: bool
    kept: dict = field(default_factory=lambda: defaultdict(list))  # mb -> [(value, (stage, row))]
    leaves: dict = field(default_factory=dict)  # (stage, mb) -> [(leaf, (stage, row))]
    taps: dict = field(default_factory=lambda: defaultdict(dict))  # mb -> {(stage, row): grad sum}
    current_mb: Optional[int] = None

    def clear(self) -> None:
        self.kept.clear()
        self.leaves.clear()
        self.taps.clear()


@dataclass(frozen=True)
class _Chunk:
    index: int
    lo: int
    hi: int
    layout_in: Optional[StateLayout]  # None: the first chunk (takes the model's inputs)
    layout_out: Optional[StateLayout]  # None: the last chunk (returns the model's output)
    rank: int  # the rank it runs on
    cached_in: int  # block sums its rank holds before it receives (sent: layout_in.num_blocks - cached_in)
    cached_out: int  # block sums the next chunk's rank holds


class _StageModule(nn.Module):
    """One chunk of a converted model: ``forward(*layout tensors, **model inputs)``."""

    def __init__(self, model: nn.Module, layers: list[nn.Module], chunk: _Chunk, cache: _RankCache,
                 other_parameters: list[nn.Parameter], model_kwargs: dict, output_fn: Callable,
                 scales_outside: bool = True):
        super().__init__()
        self._model = [model]  # not a submodule: parameters() is this chunk's own
        self._layers = layers
        self.layers = nn.ModuleList(layers[chunk.lo:chunk.hi])
        # the parameters outside the layers (embedding, final norm, head): held by the first and the last chunk's
        # module (a split backward computes the weight gradients of its module's parameters only), their
        # gradients scaled by one of them per rank (build_stages)
        self.outside = nn.ParameterList(other_parameters)
        self.scales_outside = scales_outside
        self.chunk, self.cache = chunk, cache
        self.model_kwargs, self.output_fn = model_kwargs, output_fn

    def forward(self, *packed: torch.Tensor, **inputs):
        ch, cache = self.chunk, self.cache
        mb = cache.current_mb
        state = None
        if ch.layout_in is None and packed:
            raise TypeError(
                "the stages run the model's own forward and every one of them needs the model's inputs: pass them "
                "as keyword arguments on every rank (schedule.step(input_ids=x, target=y)), not positionally"
            )
        if ch.layout_in is not None:
            if len(packed) != 2:
                raise TypeError(f"chunk {ch.index} takes the two layout tensors (blocks, partial), got {len(packed)}")
            blocks, partial = packed
            cached = []
            if ch.cached_in:
                kept = cache.kept[mb][: ch.cached_in]
                if len(kept) != ch.cached_in:
                    raise RuntimeError(f"chunk {ch.index}, microbatch {mb}: the rank holds {len(kept)} block sums, "
                                       f"{ch.cached_in} expected (chunks must run in order per microbatch)")
                leaves = [(value.detach().requires_grad_(blocks.requires_grad), origin) for value, origin in kept]
                self.cache.leaves[(ch.index, mb)] = leaves
                cached = [leaf for leaf, _ in leaves]
            if cache.enabled:
                kept_now = cache.kept[mb]
                del kept_now[ch.cached_in:]
                kept_now.extend((row, (ch.index, j)) for j, row in enumerate(blocks.detach().unbind(0)))
            state = unpack_state(blocks, partial, cached)
            expected = ch.layout_in
            if len(state.blocks) != expected.num_blocks or (state.partial is not None) != expected.has_partial:
                raise RuntimeError(f"chunk {ch.index} received {len(state.blocks)} block sums and "
                                   f"{'a' if state.partial is not None else 'no'} partial sum; the plan says {expected}")
        # a chunk without the outside parameters: their gradient through its layers would be lost or not scaled
        guards = [] if len(self.outside) or not torch.is_grad_enabled() else [layer.register_forward_pre_hook(
            functools.partial(_reads_no_outside_parameters, stream=installed_forward(layer).stream_argument),
            with_kwargs=True) for layer in self.layers]
        try:
            out = run_layers(self._model[0], self._layers, ch.lo, ch.hi, state, {**self.model_kwargs, **inputs},
                             self.output_fn)
        finally:
            for guard in guards:
                guard.remove()
        if ch.layout_out is None:
            return out
        return pack_state(out, cached=ch.cached_out)


def _reads_no_outside_parameters(layer: nn.Module, args: tuple, kwargs: dict, *, stream: str) -> None:
    """A layer of a middle chunk takes, beside the stream, only tensors that need no gradient: one computed from the
    parameters outside the layers (Gemma 4's per-layer embeddings) would give them a gradient that a split
    backward never computes and the schedule never scales (its chunk's module does not hold them)."""
    bound = bind_call(layer, args, kwargs)
    needing = [n for n, v in zip(bound.names, bound.values)
               if n != stream and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tree_leaves(v))]
    if needing:
        raise ConversionError(
            f"{type(layer).__name__} takes {needing} computed from parameters outside the rewritten layers (the model's "
            "own code before its layers): pipelining gives those parameters to the first and the last chunk only, so "
            "their gradient through a middle chunk would be lost or not scaled. Such a model cannot be pipelined here.")


def transition_bytes(stages: Sequence["AttnResPipelineStage"]) -> dict:
    """``{(direction, to_stage, microbatch): bytes}`` sent by ``stages`` (from ``stage.sent``)."""
    out: dict = {}
    for s in stages:
        for (direction, dst, mb), n in s.sent.items():
            out[(direction, dst, mb)] = out.get((direction, dst, mb), 0) + n
    return out


@functools.cache
def _stage_class():
    from torch.distributed.pipelining import PipelineStage

    class AttnResPipelineStage(PipelineStage):
        """A ``PipelineStage`` of a converted model: sets the rank's cache for the microbatch it runs,
        adds the summed gradients of the block sums this chunk received and its rank kept (the tap), and
        counts the bytes its P2P sends hand to the transport in ``self.sent`` (the last step's):
        ``{("forward" | "backward", destination stage, microbatch): bytes}``."""

        def __init__(self, submodule: _StageModule, *args, **kwargs):
            super().__init__(submodule, *args, **kwargs)
            self.chunk: _Chunk = submodule.chunk
            self.rank_cache: _RankCache = submodule.cache
            self.sent: dict = defaultdict(int)
            self._bwd_chunk: Optional[int] = None

        def forward_one_chunk(self, fwd_chunk_id, *args, **kwargs):
            self.rank_cache.current_mb = fwd_chunk_id
            try:
                out = super().forward_one_chunk(fwd_chunk_id, *args, **kwargs)
            finally:
                self.rank_cache.current_mb = None
            # the kept block sums this chunk read (fresh leaves) become inputs of its backward: their
            # gradients come back with the inputs' (both the full and the input-only backward)
            extra = [leaf for leaf, _ in self.rank_cache.leaves.get((self.chunk.index, fwd_chunk_id), [])]
            states = getattr(self, "_forward_chunk_states", None)  # torch >= 2.15: chunk -> _ForwardChunkState
            if extra and states is not None and fwd_chunk_id in states:
                states[fwd_chunk_id].input_values = [*states[fwd_chunk_id].input_values, *extra]
            elif extra and states is None and fwd_chunk_id in self.fwd_cache:  # torch < 2.15: (outputs, inputs)
                outputs, inputs = self.fwd_cache[fwd_chunk_id]
                self.fwd_cache[fwd_chunk_id] = (outputs, [*inputs, *extra])
            return out

        def backward_maybe_with_nosync(self, backward_type, bwd_kwargs, last_backward=False):
            if backward_type in ("input", "weight"):
                _check_split_backward()
            grads, param_groups = super().backward_maybe_with_nosync(backward_type, bwd_kwargs, last_backward)
            if backward_type in ("full", "input") and self._bwd_chunk is not None:
                leaves = self.rank_cache.leaves.pop((self.chunk.index, self._bwd_chunk), [])
                if leaves:  # the gradients this chunk produced for the kept block sums: into the tap
                    taps = self.rank_cache.taps[self._bwd_chunk]
                    for (_, origin), g in zip(leaves, grads[-len(leaves):]):
                        if g is not None:
                            taps[origin] = taps[origin] + g if origin in taps else g
                    grads = tuple(grads[: -len(leaves)])
            return grads, param_groups

        def backward_one_chunk(self, bwd_chunk_id, *args, **kwargs):
            self._bwd_chunk = bwd_chunk_id
            try:
                super().backward_one_chunk(bwd_chunk_id, *args, **kwargs)
            finally:
                self._bwd_chunk = None
            cache, ch = self.rank_cache, self.chunk
            # the tap of the block sums this chunk received: added once to the gradient it sends back
            if ch.layout_in is not None and bwd_chunk_id in self.bwd_cache:
                taps = cache.taps.get(bwd_chunk_id, {})
                mine = {row: taps.pop((i, row)) for (i, row) in list(taps) if i == ch.index}
                if mine:
                    grads = list(self.bwd_cache[bwd_chunk_id])
                    g = grads[0]
                    if g is None:
                        g = torch.zeros_like(self._retrieve_recv_blocks(bwd_chunk_id))
                    else:
                        g = g.clone()
                    for row, extra in mine.items():
                        g[row] += extra
                    grads[0] = g
                    self.bwd_cache[bwd_chunk_id] = tuple(grads)

        def _retrieve_recv_blocks(self, chunk_id):
            return self.args_recv_info[chunk_id][0].buffer

        def scale_grads(self, grad_scale_factor: int) -> None:
            """As PipelineStage's, except the outside parameters another stage module of this rank scales."""
            skip = set() if self.submod.scales_outside else {id(p) for p in self.submod.outside}
            if grad_scale_factor != 1:
                for p in self.submod.parameters():
                    if p.grad is not None and id(p) not in skip:
                        p.grad.div_(grad_scale_factor)

        def clear_runtime_states(self) -> None:  # at the start of each schedule step
            super().clear_runtime_states()
            self.rank_cache.clear()
            self.sent.clear()

        def _count(self, direction: str, chunk_id: int, ops) -> None:
            for op in ops:
                if op.op is torch.distributed.isend or getattr(op.op, "__name__", "") == "isend":
                    dst = self.chunk.index + (1 if direction == "forward" else -1)
                    self.sent[(direction, dst, chunk_id)] += op.tensor.numel() * op.tensor.element_size()

        def get_fwd_send_ops(self, fwd_chunk_id):
            ops = super().get_fwd_send_ops(fwd_chunk_id)
            self._count("forward", fwd_chunk_id, ops)
            return ops

        def get_bwd_send_ops(self, bwd_chunk_id):
            ops = super().get_bwd_send_ops(bwd_chunk_id)
            self._count("backward", bwd_chunk_id, ops)
            return ops

    AttnResPipelineStage.__qualname__ = "AttnResPipelineStage"
    AttnResPipelineStage.__module__ = __name__
    return AttnResPipelineStage


def __getattr__(name: str):
    if name == "AttnResPipelineStage":
        return _stage_class()
    raise AttributeError(name)


def reduce_outside_grads(model: nn.Module, group=None) -> None:
    """Sum, over the pipeline ``group``, the gradients of the parameters outside the rewritten layers
    (embedding, final norm, head: the first and the last stage compute parts of them, tied weights
    included), so that every rank holds the whole gradient before its optimizer step. Collective:
    call it on every rank of the group, after ``schedule.step``."""
    import torch.distributed as dist

    layer_params = {id(p) for h in layers_of(model) for p in model.get_submodule(h).parameters()}
    for p in model.parameters():
        if id(p) in layer_params or p.is_meta:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, group=group)


def plan_chunks(model: nn.Module, split_points: Sequence[int], num_ranks: int, cache: bool = True,
                style: str = "loop") -> list[_Chunk]:
    """The chunks of a split with the layout of each transition: what it sends with and without caching.
    Chunk ``c`` runs on rank ``ranks[c]``, as the schedules place them (``style``: "loop", ``c % num_ranks``;
    "v", rank 0 holding the first and the last chunk). Computed from the plan alone, the same on every rank."""
    holders = layers_of(model)
    points = _check_split_points(holders, split_points)
    bounds = [0, *points, len(holders)]
    num_chunks = len(bounds) - 1
    if isinstance(num_ranks, bool) or not isinstance(num_ranks, int) or num_ranks < 2:
        raise ValueError(f"a pipeline needs at least 2 ranks, got num_ranks={num_ranks!r}")
    if num_chunks % num_ranks:
        raise ValueError(f"{num_chunks} chunks ({len(points)} split points) do not divide over {num_ranks} ranks: "
                         "give num_ranks x V - 1 split points (V chunks per rank)")
    if style == "v" and num_chunks != 2 * num_ranks:
        raise ValueError(f"style='v' places two chunks on each rank: give 2 x {num_ranks} - 1 split points, "
                         f"got {len(points)}")
    ranks = _stage_ranks(num_ranks, num_chunks, style)
    layouts = [None] + [state_layout(model, p) for p in points] + [None]

    def held(k):  # block sums rank(k) holds before chunk k receives: what its previous chunk there received
        prev = max((j for j in range(1, k) if ranks[j] == ranks[k]), default=None)
        return layouts[prev].num_blocks if cache and prev is not None else 0

    return [_Chunk(index=c, lo=bounds[c], hi=bounds[c + 1], layout_in=layouts[c], layout_out=layouts[c + 1],
                   rank=ranks[c], cached_in=held(c) if c > 0 else 0, cached_out=held(c + 1) if c + 1 < num_chunks else 0)
            for c in range(num_chunks)]


def _stage_ranks(num_ranks: int, num_chunks: int, style: str) -> dict[int, int]:
    """Chunk -> rank, the mapping the schedules themselves use (ZBV and DualPipeV set "v")."""
    from torch.distributed.pipelining._utils import generate_stage_to_rank_mapping

    if style not in ("loop", "v"):
        raise ValueError(f"style is 'loop' (GPipe, 1F1B, the interleaved schedules) or 'v' (ScheduleZBVZeroBubble, "
                         f"ScheduleDualPipeV), got {style!r}")
    return generate_stage_to_rank_mapping(num_ranks, num_chunks, style=style)


def build_stages(
    model: nn.Module,
    split_points: Sequence[int],
    *,
    rank: int,
    num_ranks: int,
    example_kwargs: dict,
    num_microbatches: int,
    cache: bool = True,
    device: Optional[torch.device] = None,
    group=None,
    model_kwargs: Optional[dict] = None,
    output_fn: Callable = _model_output,
    free_other_layers: bool = False,
    style: str = "loop",
) -> list:
    """The ``PipelineStage`` objects of ``rank`` for a converted ``model`` split before the rewritten
    layers ``split_points`` (indices into ``layers_of(model)``): chunk ``c`` on rank ``c % num_ranks``
    (``style="loop"``) or in a V (``style="v"``).

    One stage per rank (``num_ranks - 1`` split points) goes to ``ScheduleGPipe`` / ``Schedule1F1B``
    (``stages[0]``); V per rank (``V * num_ranks - 1`` split points) to ``ScheduleInterleaved1F1B`` /
    ``ScheduleLoopedBFS`` / ``ScheduleInterleavedZeroBubble``; with ``style="v"`` (``2 * num_ranks - 1`` split
    points) two per rank in a V, rank r holding chunks r and 2P-1-r, to ``ScheduleZBVZeroBubble`` /
    ``ScheduleDualPipeV``. Every stage takes the model's inputs as keyword arguments
    (``schedule.step(**inputs, target=...)`` on every rank); ``example_kwargs`` is the WHOLE batch of
    such inputs (the stages' tensor shapes are taken from one run of the model on its first microbatch).
    ``cache=False`` sends every completed block sum at every transition (the naive scheme).
    ``model_kwargs`` are added to every call (``{"use_cache": False}`` for Hugging Face models);
    ``output_fn`` takes the tensor the loss reads from the model's output (default: the tensor, or
    ``.logits``). Parameters outside the layers belong to the first and the last chunk's stage module
    (sum their gradients over ranks, as for tied weights in any pipeline). ``free_other_layers=True``
    moves the layers of the other ranks' chunks to the meta device (after the one run that takes the
    shapes): their memory is freed; the model's embedding and head stay on every rank.
    """
    from torch.distributed.pipelining.microbatch import split_args_kwargs_into_chunks

    chunks = plan_chunks(model, split_points, num_ranks, cache, style)
    if not 0 <= rank < num_ranks:
        raise ValueError(f"rank {rank} is not in 0 .. {num_ranks - 1}")
    holders = layers_of(model)
    layers = [model.get_submodule(h) for h in holders]
    model_kwargs = dict(model_kwargs or {})
    device = torch.device(device) if device is not None else next(model.parameters()).device
    # one run on the first microbatch: the tensors' shapes at each boundary and of the output
    _, kwargs_split = split_args_kwargs_into_chunks((), example_kwargs, num_microbatches)
    mb_kwargs = {**model_kwargs, **kwargs_split[0]}
    seen: dict[int, Any] = {}

    def record(i):
        def hook(module, args):
            seen[i] = args[0]
        return hook

    handles = [layers[c.lo].register_forward_pre_hook(record(c.lo)) for c in chunks[1:]]
    try:
        with torch.no_grad():
            output = output_fn(model(**mb_kwargs))
    finally:
        for h in handles:
            h.remove()
    for c in chunks[1:]:
        got = seen[c.lo]
        if not isinstance(got, AttnResState) or len(got.blocks) != c.layout_in.num_blocks or \
                (got.partial is not None) != c.layout_in.has_partial:
            raise ConversionError(f"layer {holders[c.lo]} received {type(got).__name__} "
                                  f"({len(getattr(got, 'blocks', ()))} block sums), the plan says {c.layout_in}")

    def example(chunk: _Chunk, which: str):
        if which == "in":
            if chunk.layout_in is None:
                return ()
            blocks, partial = pack_state(seen[chunk.lo], cached=chunk.cached_in)
        else:
            if chunk.layout_out is None:
                return (output.detach().to(device),)
            blocks, partial = pack_state(seen[chunk.hi], cached=chunk.cached_out)
        return tuple(t.detach().to(device).requires_grad_(True) for t in (blocks, partial))

    layer_params = {id(p) for layer in layers for p in layer.parameters()}
    other = [p for p in model.parameters() if id(p) not in layer_params]
    rank_cache = _RankCache(enabled=cache)
    stage_cls = __getattr__("AttnResPipelineStage")
    mine = [c for c in chunks if c.rank == rank]
    if free_other_layers:
        own = {i for c in mine for i in range(c.lo, c.hi)}
        for i, layer in enumerate(layers):
            if i not in own:
                layer.to("meta")
    # the parameters outside the layers go to the first and the last chunk's module (rank 0 holds both with
    # style="v"); the schedule scales each module's gradients: the outside ones are scaled by the first of them
    stages, scaled = [], False
    for chunk in mine:
        holds_outside = chunk.layout_in is None or chunk.layout_out is None
        module = _StageModule(model, layers, chunk, rank_cache, other if holds_outside else [], model_kwargs, output_fn,
                              scales_outside=not scaled)
        scaled = scaled or holds_outside
        stages.append(stage_cls(module, chunk.index, len(chunks), device,
                                input_args=example(chunk, "in"), output_args=example(chunk, "out"),
                                group=group))
    return stages
