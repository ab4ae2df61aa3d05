"""The conversion driver: the steps ``convert_`` runs, in order, and the rollback when one fails.

    observe ─▶ find holders ─▶ place blocks ─▶ other signatures ─▶ rewrite + install ─▶ verify ─▶ finish

Each step reads and extends one ``Conversion`` (each says what it adds). The holders are the modules
whose own forward holds the residual adds (``passes/layerwise.py``), or else the model itself.
``detect`` runs every step and rolls back, so it names exactly the sites ``convert_`` rewrites, in
the same mode. A step that fails leaves the model as it was: ``run`` undoes every install first.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from residual_rewriter import hf
from residual_rewriter.config import AttnResConfig
from residual_rewriter.passes import layerwise
from residual_rewriter.passes.errors import (ConversionError, GraphRunError, conversion_boundary, conversion_failed_message,
                                             first_line, module_label)
from residual_rewriter.passes.capture import in_mode, state_restored
from residual_rewriter.passes.layerwise import leaves, observe_calls
from residual_rewriter.passes.plan import Plan, Stream
from residual_rewriter.passes.rewrite import is_attn_res_parameter
from residual_rewriter.passes.state import states_in_output_to_tensors
from residual_rewriter.report import IN_PLACE, WHOLE_MODEL, ConversionReport


@dataclass
class Conversion:
    """What the steps know about one conversion, filled in as they run."""

    model: nn.Module
    config: AttnResConfig
    args: tuple
    kwargs: dict
    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None
    verify: bool = True  # run the converted model once and compare (verify); detect always does
    calls: list = field(default_factory=list)  # observe: every module call, in start order
    reference: Any = None  # observe: the original model's output
    streams: list[list[layerwise.Holder]] = field(default_factory=list)  # holders chained per stream
    mode: str = IN_PLACE
    mode_reason: str = ""  # why the layers could not be the holders
    other_calls: list = field(default_factory=list)  # (holder, BoundCall, modes): HF calls prepared at conversion
    installed: list[layerwise.Holder] = field(default_factory=list)
    hooks: list = field(default_factory=list)  # finish: the handles of the hooks it registers
    detect_only: bool = False  # detect(): converted, verified and rolled back

    @property
    def holders(self) -> list[layerwise.Holder]:
        return [h for chain in self.streams for h in chain]


# The steps
def observe(c: Conversion) -> None:
    """-> ``c.calls``, ``c.reference``. Runs the model once (eval, no grad; buffers restored)."""
    c.calls, c.reference = observe_calls(c.model, c.args, c.kwargs)


def find_holders(c: Conversion) -> None:
    """-> ``c.streams`` (non-empty) and ``c.mode``, or ``ConversionError`` naming why not."""
    try:
        found = layerwise.find_holders(c.model, c.calls, c.filter_fn)
        if found.streams:
            c.streams, c.mode = found.streams, IN_PLACE
            return
        why = _nothing_found(c.model, found)
    except layerwise.NotLayerwise as exc:
        why = str(exc)
    _model_as_holder(c, why)


def _model_as_holder(c: Conversion, why: str) -> None:
    if c.filter_fn is not None:
        raise ConversionError(f"cannot convert {type(c.model).__name__} layer by layer: {why}")
    if hf.is_hf_model(c.model) and "use_cache" in inspect.signature(c.model.forward).parameters:
        # one graph cannot create the KV cache object inside it: traced, verified and run without one
        c.kwargs = {"use_cache": False, **c.kwargs}
    try:
        bound = layerwise.bind_call(c.model, c.args, c.kwargs)
        traced = layerwise.trace_model(c.model, bound, num_blocks=c.config.num_blocks, block_size=c.config.block_size)
    except ConversionError as exc:  # the model's own reason first: it says the most about the model
        raise ConversionError(f"{exc}\n(Not layer by layer either: {why})") from exc
    except Exception as exc:  # noqa: BLE001 - the model's own forward cannot be traced (Gemma 4's shape check)
        cause = exc.__cause__ if isinstance(exc, GraphRunError) else exc  # as conversion_boundary chains it
        raise ConversionError(f"{conversion_failed_message(c.model, exc)}\n(Not layer by layer either: {why})") from cause
    root_call = next((call for call in c.calls if call.path == ""), None)
    c.streams = [[layerwise.Holder("", c.model, root_call, bound, traced)]]
    c.mode, c.mode_reason = WHOLE_MODEL, why


def place_blocks(c: Conversion) -> None:
    """Each stream's sublayers split into blocks in depth order; each holder learns where it joins."""
    if c.mode == WHOLE_MODEL:
        return  # blocks were placed when the model was traced: its streams are wholly inside it
    for i, chain in enumerate(c.streams):
        layerwise.assign_global_blocks(chain, i, num_blocks=c.config.num_blocks, block_size=c.config.block_size)


def prepare_other_signatures(c: Conversion) -> None:
    """Hugging Face models: observe the model's other common calls (see ``_other_calls``) before
    install, so that ``install`` traces the layers for them too: no tracer ever meets a layer
    signature it would have to run the model for. -> ``c.other_calls``: (holder, bound call, modes)."""
    if not hf.is_hf_model(c.model) or c.args or c.mode != IN_PLACE or c.detect_only:
        return
    holders = {id(h.module): h for h in c.holders}
    others = _other_calls(c.model, c.kwargs)  # each, and the example call, also as export makes it (its masks)
    variants = [(o, m, False) for o, m in others] + [(o, m, True) for o, m in [(c.kwargs, (False, True)), *others]]
    for other, modes, exported in variants:
        try:
            with hf.masks_as_under_export() if exported else contextlib.nullcontext():
                calls, _ = observe_calls(c.model, (), other)
        except Exception as exc:  # noqa: BLE001 - the model itself refuses this call: nothing to prepare
            warnings.warn(f"residual_rewriter: {type(c.model).__name__} fails when called with "
                          f"{sorted(set(other) - set(c.kwargs))}{' as under torch.export' if exported else ''} "
                          f"({first_line(exc)}): the converted model is not prepared for that call under "
                          "torch.compile/export", stacklevel=_users_frame())
            continue
        for call in calls:
            holder = holders.get(id(call.module))
            if holder is not None:
                bound = layerwise.bind_call(call.module, call.args, call.kwargs).with_inputs(holder.traced.int_inputs)
                c.other_calls.append((holder, bound, modes))


def install(c: Conversion) -> None:
    """Each holder's rewritten graph becomes its forward (``c.installed`` lists them for rollback),
    with a graph for each of its other prepared calls."""
    for holder in c.holders:
        c.installed.append(holder)
        layerwise.install(holder, c.config)
    for holder, bound, modes in c.other_calls:
        key = bound.installed_key(holder.traced.stream_argument, holder.boundary.first)
        layerwise.installed_forward(holder.module).add_signature(bound, key, modes)


def verify(c: Conversion) -> None:
    """Run the converted model on the example call; with "sum" mixing its output must equal the
    original's up to the dtype's rounding."""
    if not c.verify and not c.detect_only:
        return
    model = c.model
    try:
        out = _run_original(c)
    except Exception as exc:  # noqa: BLE001
        if "AttnResState" in f"{type(exc).__name__}: {exc}":
            raise layerwise.NotLayerwise(f"the model's own code uses the stream between layers ({first_line(exc)})") from exc
        raise ConversionError(f"the converted {type(model).__name__} fails on the example inputs: {first_line(exc)}") from exc
    if c.config.mixing != "sum":
        return
    got, want = _first_tensor(out), _first_tensor(c.reference)
    if got is None or got.shape != want.shape:
        raise ConversionError(f"the converted {type(model).__name__} returns {type(out).__name__}, not what the original returned")
    if want.isnan().any():
        raise ConversionError(f"the original {type(model).__name__} returns NaN on the example inputs: there is nothing to "
                              "check the conversion against. Is every weight initialised (torch.empty leaves any value)?")
    tolerance, dtype = {torch.float64: 1e-10, torch.float32: 1e-4}.get(want.dtype, 3e-2), want.dtype
    err = _rel_err(got, want)
    if not err <= tolerance and want.dtype in _HALF:  # decided in float32 (see _error_in_float32)
        err, tolerance, dtype = _error_in_float32(c, err), 1e-4, f"{want.dtype} ({err:.2e}), then in float32"
    if not err <= tolerance:
        raise ConversionError(
            f"the converted {type(model).__name__} does not compute what the original computed at initialisation "
            f"(relative error {err:.2e} > {tolerance:g} in {dtype}); the model is restored. Please report it."
        )


_HALF = (torch.float16, torch.bfloat16)


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def _error_in_float32(c: Conversion, half_err: float) -> float:
    """The comparison again with every half-precision parameter, buffer and input in float32 (and back: lossless),
    the original's forwards put back for its run: random weights can move the original more than the tolerance
    with its own half-precision rounding (a tiny Gemma 4 in bfloat16). ``half_err`` where this cannot run."""
    if any(layerwise._forward_slot(h.module) != "forward" for h in c.installed):  # accelerate's hooks hold them
        return half_err
    halves = [t for t in (*c.model.parameters(), *c.model.buffers()) if t.dtype in _HALF]
    dtypes, inputs = [t.dtype for t in halves], (c.args, c.kwargs)
    up = lambda v: v.float() if isinstance(v, torch.Tensor) and v.dtype in _HALF else v  # noqa: E731
    try:
        for t in halves:
            t.data = t.data.float()
        c.args, c.kwargs = tuple(map(up, c.args)), {k: up(v) for k, v in c.kwargs.items()}
        got = _first_tensor(_run_original(c))
        forwards = {h.module: h.module.__dict__.pop("forward") for h in c.installed}
        try:
            want = _first_tensor(_run_original(c))
        finally:
            for module, forward in forwards.items():
                module.__dict__["forward"] = forward
        return _rel_err(got, want)
    except Exception:  # noqa: BLE001 - an input the cast does not reach: the half-precision verdict stands
        return half_err
    finally:
        c.args, c.kwargs = inputs
        for t, dtype in zip(halves, dtypes):
            t.data = t.data.to(dtype)


def finish(c: Conversion) -> ConversionReport:
    """Hooks that hand tensors, not states, to whoever reads the hidden states or a stream's end; the report."""
    model = c.model
    if c.mode == IN_PLACE:  # output_hidden_states: tensors, not states; on the model and the Hugging Face
        for path in _ancestors([h.path for h in c.holders]):  # models in it (not T5Block: it hands states on)
            if path == "" or hf.is_hf_model(model.get_submodule(path)):
                c.hooks.append(model.get_submodule(path).register_forward_hook(states_in_output_to_tensors))
        for chain in c.streams:  # the final aggregation where the model skipped the stream's last layers
            hook = layerwise.FinalAggregation(chain[-1].module, c.config)
            for call in _calls_reading(c, chain[-1]):
                c.hooks.append(call.module.register_forward_pre_hook(hook, with_kwargs=True))
    report = make_report(c, converted=True)
    _warn_lost_in_tracing(report)
    return report


# The driver
FIND_STEPS = (observe, find_holders, place_blocks)
CONVERT_STEPS = (prepare_other_signatures, install, verify)


def run(c: Conversion, *, keep: bool = True) -> ConversionReport:
    """Run the steps on ``c``. Any failure becomes a ``ConversionError`` and leaves the model as it
    was. ``keep=False`` (``detect``) converts, verifies and rolls back: what it reports is exactly
    what ``convert_`` would do, fallbacks included."""
    c.detect_only = not keep
    # (under torch.inference_mode() the new parameters would be inference tensors: never trainable)
    with conversion_boundary(c.model, lambda: _run_original(c)), torch.inference_mode(False):
        for step in FIND_STEPS:
            step(c)
        try:
            return _convert(c)
        except layerwise.NotLayerwise as exc:  # the model's own code reads the stream between layers
            _model_as_holder(c, str(exc))
            return _convert(c)


def _convert(c: Conversion) -> ConversionReport:
    """The convert steps and ``finish``, rolled back if any fails (a warning turned into an error too);
    for ``detect``, rolled back once verified."""
    try:
        for step in CONVERT_STEPS:
            step(c)
        if not c.detect_only:
            return finish(c)
    except BaseException:
        rollback(c)
        raise
    rollback(c)
    return make_report(c, converted=False)


def rollback(c: Conversion) -> None:
    """Undo every install and hook: the model's forwards and attributes are its own again."""
    for handle in c.hooks:
        handle.remove()
    for holder in reversed(c.installed):
        layerwise.uninstall(holder.module)
    c.installed, c.other_calls, c.hooks = [], [], []


def _run_original(c: Conversion) -> Any:
    """The model on the example call, as observed (eval, no grad, buffers restored)."""
    with in_mode(c.model, False), torch.no_grad(), state_restored(c.model):
        args, kwargs = layerwise.detached_copy([c.args, c.kwargs])  # as observe ran it: on a copy
        return c.model(*args, **kwargs)


# Helpers
def _nothing_found(model: nn.Module, found: layerwise.Layerwise) -> str:
    lines = [f"no module of {type(model).__name__} holds a pre-norm residual add `x + f(norm(x))` in its own forward, "
             "taking the stream as an argument and returning it (are the adds in the model's own forward?)"] \
        + (["Modules tried:"] if found.not_holders else [])
    by_reason: dict[str, list[str]] = {}  # one line per reason: most modules fail for the same one
    for path, why in found.not_holders.items():
        by_reason.setdefault(why, []).append(path)
    for why, paths in by_reason.items():
        more = f" and {len(paths) - 6} more" if len(paths) > 6 else ""
        lines.append(f"  {', '.join(paths[:6])}{more}: {why}")
    return "\n".join(lines)


def _other_calls(model: nn.Module, kwargs: dict) -> list[tuple[dict, tuple[bool, ...]]]:
    """Other ways a Hugging Face model is commonly called, which reach its layers with other kinds of
    arguments, and the modes (training?) each is prepared in: with an attention mask (padding; always a
    tensor under torch.export or pipeline()), without a KV cache (training with checkpointing, Trainer's
    evaluation), and in training with Trainer's ``num_items_in_batch`` (passed on to the layers)."""
    accepted = inspect.signature(model.forward).parameters
    main = kwargs.get(getattr(model, "main_input_name", None))
    options = []
    # (also where the example has them: an all-ones mask reaches the layers as None, except under a tracer)
    if "attention_mask" in accepted and isinstance(main, torch.Tensor) and main.dim() == 2:
        mask = torch.ones_like(main)
        mask[0, 0] = 0  # left padding on the first row: the model must build a mask tensor
        options.append({"attention_mask": mask})
    if "use_cache" in accepted and kwargs.get("use_cache") is not False:
        options.append({"use_cache": False})
    variants = [{}]
    for option in options:
        variants += [{**v, **option} for v in variants]
    calls = [({**kwargs, **v}, (False, True)) for v in variants[1:]]
    if "num_items_in_batch" not in kwargs and any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
        calls += [({**kwargs, **v, "num_items_in_batch": torch.tensor(1)}, (True,)) for v in variants]
    return calls


def _ancestors(paths: list[str]) -> list[str]:
    """The modules whose forward calls the rewritten ones: "" (the model) and every path above them."""
    found = {""}
    for path in paths:
        parts = path.split(".")
        found.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return sorted(found)


def _first_tensor(output: Any) -> Optional[torch.Tensor]:
    return next((t for t in leaves(output) if isinstance(t, torch.Tensor) and t.is_floating_point()), None)


def make_report(c: Conversion, *, converted: bool) -> ConversionReport:
    captured = [h.traced.captured for h in c.holders]
    whole = c.mode == WHOLE_MODEL
    return ConversionReport(
        model=type(c.model).__name__, config=c.config, plan=_global_plan(c), converted=converted,
        new_parameters={n: p.numel() for n, p in c.model.named_parameters() if is_attn_res_parameter(n)} if converted else {},
        mode=c.mode, mode_reason=c.mode_reason,
        holders=[h.path for h in c.holders],
        # the model as holder runs its children inline: checkpoint calls and hooks inside them are lost
        checkpoint_dropped=sorted({p for cap in captured for p in cap.checkpoint_calls}) if whole else [],
        # ... or, layer by layer, backward hooks on a layer that takes or returns a state (torch calls them around tensors only)
        hooks_not_called=[p for cap in captured for p in cap.hooked_inlined if p] if whole else [
            h.path for chain in c.streams if len(chain) > 1 for h in chain if h.module._backward_hooks or h.module._backward_pre_hooks],
    )


def _warn_lost_in_tracing(report: ConversionReport) -> None:
    if report.checkpoint_dropped:
        warnings.warn(
            f"residual_rewriter: {', '.join(map(module_label, report.checkpoint_dropped))} call torch.utils.checkpoint "
            f"in their forward, which the converted {report.model} runs inline (converted as one holder: "
            f"{report.mode_reason.splitlines()[0]}): it does NOT checkpoint there (more activation memory).",
            UserWarning, stacklevel=_users_frame(),
        )
    if report.hooks_not_called:
        why = ("converted as one holder, it runs those modules' forward inline" if report.mode == WHOLE_MODEL else
               "those layers take or return an AttnResState, and torch's backward hooks see tensors only (the last "
               "layer's is called with grad_input None)")
        warnings.warn(
            f"residual_rewriter: forward/backward hooks on {', '.join(map(module_label, report.hooks_not_called))} "
            f"are NOT called by the converted {report.model}: {why}. Hook the sublayers or norms instead (attention, "
            "MLP projections and norms keep theirs).", UserWarning, stacklevel=_users_frame(),
        )


def _users_frame() -> int:
    """The ``stacklevel`` of the first frame outside this library: a warning names the user's line."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith("residual_rewriter"):
        frame, level = frame.f_back, level + 1
    return level


def _global_plan(c: Conversion) -> Plan:
    """One Plan over the whole model, paths made absolute, for the report."""
    if c.mode == WHOLE_MODEL:
        return c.streams[0][0].traced.plan
    plan = Plan()
    for holder in c.holders:  # what each holder's trace kept opaque or left out, with absolute paths
        inner = holder.traced.plan
        plan.opaque_modules.update({_join(holder.path, k): why for k, why in inner.opaque_modules.items()})
        plan.opaque_with_norms += [_join(holder.path, k) for k in inner.opaque_with_norms]
        plan.left_out += [dataclasses.replace(lo, module=_join(holder.path, lo.module)) for lo in inner.left_out]
    for i, chain in enumerate(c.streams):
        first = chain[0].traced.plan.streams[0]
        stream = Stream(index=i, source=_producer(c, chain[0]), source_node="", hidden_size=first.hidden_size,
                        consumers=_readers(c, chain[-1]), num_blocks=first.num_blocks, block_size=first.block_size,
                        final_param_prefix=f"{chain[-1].path}.attn_res.final")
        for holder in chain:
            for site in holder.sites:
                stream.sites.append(dataclasses.replace(
                    site, stream=i, index=len(stream.sites), norm=f"{holder.path}.{site.norm}",
                    sublayer=f"{holder.path}.{site.sublayer}".rstrip("."),
                    param_prefix=f"{holder.path}.{site.param_prefix}" if site.param_prefix else "",
                ))
        plan.streams.append(stream)
    return plan


def _producer(c: Conversion, first: layerwise.Holder) -> str:
    """The module whose output the first holder receives as the stream (innermost), as observed."""
    x = first.stream_input()
    made = [call.path for call in c.calls if call.order < first.call.order and any(t is x for t in call.tensor_outputs())]
    return made[-1] if made else f"input of {module_label(first.path)}"


def _readers(c: Conversion, last: layerwise.Holder) -> list[str]:
    return [call.path for call in _calls_reading(c, last)] or [f"output of {module_label(last.path)}"]


def _calls_reading(c: Conversion, last: layerwise.Holder) -> list:
    """The module calls that read what the last holder returns (the final norm), as observed; not its
    own children (an identity tap on the stream's end inside it: hooked, it would be traced again)."""
    outputs = last.call.tensor_outputs()[:1]
    return [call for call in c.calls if call.order > last.call.order and not call.path.startswith(last.path + ".")
            and any(t is o for t in call.tensor_inputs() for o in outputs)]


def _join(path: str, inner: str) -> str:
    return ".".join(p for p in (path, inner) if p)
