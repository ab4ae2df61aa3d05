"""``convert_``: Block AttnRes in place, layer by layer. The converted model stays the user's model.

Its class, module tree, parameter names and Python forward are kept; only the forwards that hold
residual adds (decoder layers, T5's ``T5LayerSelfAttention``) are rewritten, to pass the Block
AttnRes state instead of one hidden tensor (``passes/layerwise.py``). New parameters live in the
module that uses them (``model.layers.3.attn_res.mlp.query``).

Where that cannot be done (the adds sit in the model's own forward, or its code transforms the stream
between layers), the model is converted as one graph instead (``api.convert_graph``), and the report
says which mode ran and why.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
from typing import Any, Callable, Optional

import torch
from torch import nn

from residual_rewriter import hf
from residual_rewriter.api import _check_model, _make_config, _normalize_inputs
from residual_rewriter.config import AttnResConfig
from residual_rewriter.errors import ConversionError, first_line
from residual_rewriter.passes import layerwise
from residual_rewriter.passes.modes import buffers_restored, in_mode
from residual_rewriter.passes.observe import leaves, observe_calls
from residual_rewriter.passes.plan import Plan, Stream
from residual_rewriter.report import ConversionReport
from residual_rewriter.state import states_in_output_to_tensors, states_to_tensors

IN_PLACE = "in place, layer by layer"
WHOLE_GRAPH = "whole graph"


def convert_(
    model: nn.Module,
    config: Optional[AttnResConfig] = None,
    *,
    example_inputs: Any = None,
    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
    verify: bool = True,
    num_blocks: Optional[int] = None,
    block_size: Optional[int] = None,
    mixing: Optional[str] = None,
) -> nn.Module:
    """Give ``model`` Block Attention Residuals in place (torchao's ``quantize_`` convention); returns it.

    Args:
        config: an ``AttnResConfig``, or the keyword options ``num_blocks`` / ``block_size`` / ``mixing``.
        example_inputs: positional arguments of its forward (a tuple or a lone tensor), or a dict of
            keyword arguments. Optional for Hugging Face models and models with ``example_inputs()``.
        filter_fn: ``filter_fn(module, path) -> bool``: only modules it accepts may be rewritten
            (their sublayers must still form one stream).
        verify: run the converted model once on the example inputs and compare it with the original's
            output, in the model's dtype (on by default). A mismatch restores the model and raises.

    ``model.attn_res_report`` says what was rewritten and in which mode.
    """
    _check_model(model)
    if type(model).__module__.startswith("peft."):
        raise ConversionError(
            f"{type(model).__name__} is a PEFT model: its adapter would be saved without the AttnRes parameters. "
            "Convert the base model first, then apply PEFT with them trainable and saved: "
            "get_peft_model(residual_rewriter.convert_(base), LoraConfig(..., modules_to_save=['attn_res']))"
        )
    config = _make_config(config, num_blocks=num_blocks, block_size=block_size, mixing=mixing)
    args, kwargs = _example_call(model, example_inputs)
    calls, reference = observe_calls(model, args, kwargs)
    try:
        found = layerwise.find_holders(model, calls, filter_fn)
        if found.streams:
            return _convert_layerwise(model, found, config, args, kwargs, reference, verify)
        why = _nothing_found(model, found)
    except layerwise.NotLayerwise as exc:
        why = str(exc)
    if filter_fn is not None:
        raise ConversionError(f"cannot convert {type(model).__name__} layer by layer: {why}")
    return _convert_whole_graph(model, config, args, kwargs, reference, verify, why)


class WholeGraphForward:
    """``model.forward`` when the model is converted as one graph: the converted graph, which shares the
    model's submodules, run with the model's train/eval flag."""

    def __init__(self, model: nn.Module, graph: nn.Module):
        self.model, self.graph = model, graph

    def __call__(self, *args, **kwargs):
        self.graph.training = self.model.training  # mode_value() nodes read the graph's own flag
        return self.graph(*args, **kwargs)


def _convert_whole_graph(model, config, args, kwargs, reference, verify, why: str) -> nn.Module:
    """The fallback: the whole model as one converted graph, installed as its forward."""
    from residual_rewriter.api import convert_graph
    from residual_rewriter.hf_class import convert_keeping_class

    try:
        if hf.is_hf_model(model):
            convert_keeping_class(model, None, config, inplace=True)
            report = model.attn_res_report
        else:
            if kwargs:
                raise ConversionError("the whole-graph conversion needs example inputs as positional arguments")
            graph = convert_graph(model, args, config, model_name=type(model).__name__)
            model.attn_res = graph.attn_res
            model.forward = WholeGraphForward(model, graph)
            report = graph.report
        if verify:
            _verify(model, args, kwargs, reference, exact=config.mixing == "sum")
    except ConversionError as exc:
        model.__dict__.pop("forward", None)
        model._modules.pop("attn_res", None)
        model.__dict__.pop("attn_res_report", None)
        if hf.is_hf_model(model):
            model.config.__dict__.pop("residual_rewriter", None)
        raise ConversionError(
            f"cannot convert {type(model).__name__} layer by layer: {why}\nnor as one graph: {exc}"
        ) from exc
    report.mode, report.mode_reason = WHOLE_GRAPH, why
    model.attn_res_report = report
    return model


def _nothing_found(model: nn.Module, found: layerwise.Layerwise) -> str:
    lines = [f"no module of {type(model).__name__} holds a pre-norm residual add `x + f(norm(x))` in its own forward, "
             "taking the stream as an argument and returning it (are the adds in the model's own forward?). "
             "Modules tried:"]
    lines += [f"  {path}: {why}" for path, why in list(found.not_holders.items())[:8]]
    return "\n".join(lines)


def _example_call(model: nn.Module, example_inputs: Any) -> tuple[tuple, dict]:
    if example_inputs is None and hf.is_hf_model(model):
        inputs = hf.example_inputs(model)
        example_inputs = dict(zip(hf.input_names(model, len(inputs)), inputs))
    if isinstance(example_inputs, dict):  # called as users call it (a KV cache included), so that the
        return (), dict(example_inputs)  # common signature needs no tracing later, under torch.compile
    return _normalize_inputs(model, example_inputs), {}


def _other_calls(model: nn.Module, kwargs: dict) -> list[dict]:
    """Other ways a Hugging Face model is commonly called, which reach its layers with other kinds of
    arguments: with an attention mask (padding; always a tensor under torch.export or pipeline()), and
    without a KV cache (training with checkpointing, Trainer's evaluation). Their graphs are traced at
    conversion, so that no tracer ever meets a layer signature it would have to run the model for."""
    accepted = inspect.signature(model.forward).parameters
    main = kwargs.get(getattr(model, "main_input_name", None))
    options = []
    if "attention_mask" in accepted and "attention_mask" not in kwargs and isinstance(main, torch.Tensor) and main.dim() == 2:
        mask = torch.ones_like(main)
        mask[0, 0] = 0  # left padding on the first row: the model must build a mask tensor
        options.append({"attention_mask": mask})
    if "use_cache" in accepted and "use_cache" not in kwargs:
        options.append({"use_cache": False})
    variants = [{}]
    for option in options:
        variants += [{**v, **option} for v in variants]
    return [{**kwargs, **v} for v in variants[1:]]


def _prepare_other_signatures(model: nn.Module, holders: list, kwargs: dict) -> list[tuple]:
    """(holder, bound call) for each of ``_other_calls``, observed on the original model before install."""
    by_module = {id(h.module): h for h in holders}
    prepared = []
    for other in _other_calls(model, kwargs):
        calls, _ = observe_calls(model, (), other)
        for call in calls:
            holder = by_module.get(id(call.module))
            if holder is not None:
                prepared.append((holder, layerwise.bind_call(call.module, call.args, call.kwargs)))
    return prepared


def _convert_layerwise(model, found, config, args, kwargs, reference, verify) -> nn.Module:
    holders = [h for chain in found.streams for h in chain]
    for i, chain in enumerate(found.streams):
        layerwise.assign_global_blocks(chain, i, num_blocks=config.num_blocks, block_size=config.block_size)
    other_signatures = _prepare_other_signatures(model, holders, kwargs) if hf.is_hf_model(model) and not args else []
    try:
        for holder in holders:
            layerwise.install(holder, config)
        for holder, bound in other_signatures:
            holder.module.forward.add_signature(bound, bound.installed_key(holder.traced.stream_argument, holder.boundary.first))
        if verify:
            _verify(model, args, kwargs, reference, exact=config.mixing == "sum")
    except Exception:
        for holder in holders:
            layerwise.uninstall(holder.module)
        raise
    for path in _ancestors([h.path for h in holders]):  # output_hidden_states: tensors, not states
        if hf.is_hf_model(model.get_submodule(path)):
            model.get_submodule(path).register_forward_hook(states_to_tensors)
    if not hf.is_hf_model(model):  # on the model only: a parent such as T5Block hands states on
        model.register_forward_hook(states_in_output_to_tensors)
    report = ConversionReport(
        model=type(model).__name__, config=config, plan=_global_plan(found), converted=True,
        new_parameters={n: p.numel() for n, p in model.named_parameters() if ".attn_res." in f".{n}"},
        mode=IN_PLACE,
    )
    model.attn_res_report = report
    if hf.is_hf_model(model):  # save_pretrained records it; residual_rewriter.from_pretrained restores it
        model.config.residual_rewriter = {**dataclasses.asdict(config), "mode": "in_place"}
        model.save_pretrained = SavePretrained(model)
    return model


# A checkpoint of a converted model names this model type, which transformers does not know: its Auto*
# loaders refuse it loudly instead of building the model without AttnRes. residual_rewriter.from_pretrained
# reads the original type back from the config's residual_rewriter entry.
MODEL_TYPE_PREFIX = "residual_rewriter-"


class SavePretrained:
    """``model.save_pretrained`` of a model converted in place: the model's own, then its config.json
    marked with ``model_type = "residual_rewriter-<type>"``."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, save_directory, *args, **kwargs):
        import json
        import os

        result = type(self.model).save_pretrained(self.model, save_directory, *args, **kwargs)
        path = os.path.join(save_directory, "config.json")
        with open(path) as f:
            config = json.load(f)
        config["residual_rewriter"]["model_type"] = config["model_type"]
        config["model_type"] = MODEL_TYPE_PREFIX + config["model_type"]
        with open(path, "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        return result


def saved_config(path: str):
    """The transformers config of a checkpoint saved after ``convert_``, under its original model type."""
    import json
    import os

    import transformers

    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config["model_type"] = config["residual_rewriter"]["model_type"]
    return transformers.AutoConfig.for_model(**config)


def convert_again(model: nn.Module, options: dict) -> nn.Module:
    """``from_pretrained`` of a checkpoint saved after ``convert_``: ``model`` was built by transformers
    from it (the AttnRes weights skipped); convert it as it was (the caller loads those weights)."""
    options = {k: v for k, v in options.items() if k not in ("mode", "model_type")}
    del model.config.residual_rewriter  # recorded by the save: not a sign of a converted model here
    return convert_(model, AttnResConfig(**options))


def _ancestors(paths: list[str]) -> list[str]:
    """The modules whose forward calls the rewritten ones: "" (the model) and every path above them."""
    found = {""}
    for path in paths:
        parts = path.split(".")
        found.update(".".join(parts[:i]) for i in range(1, len(parts)))
    return sorted(found)


def _verify(model, args, kwargs, reference, exact: bool) -> None:
    """Run the converted model on the example inputs; with ``exact`` ("sum" mixing, zero queries), its
    output must equal the original's up to the dtype's rounding."""
    try:
        with torch.no_grad():
            with in_mode(model, False), buffers_restored(model):
                out = model(*copy.deepcopy(args), **copy.deepcopy(kwargs))
    except Exception as exc:  # noqa: BLE001
        if "AttnResState" in f"{type(exc).__name__}: {exc}":
            raise layerwise.NotLayerwise(f"the model's own code uses the stream between layers ({first_line(exc)})") from exc
        raise ConversionError(f"the converted {type(model).__name__} fails on the example inputs: {first_line(exc)}") from exc
    got, want = _first_tensor(out), _first_tensor(reference)
    if not exact:
        return
    if got is None or got.shape != want.shape:
        raise ConversionError(f"the converted {type(model).__name__} returns {type(out).__name__}, not what the original returned")
    tolerance = {torch.float64: 1e-10, torch.float32: 1e-4}.get(want.dtype, 3e-2)
    err = ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
    if not err <= tolerance:
        raise ConversionError(
            f"the converted {type(model).__name__} does not compute what the original computed at initialisation "
            f"(relative error {err:.2e} > {tolerance:g} in {want.dtype}); the model is restored. Please report it."
        )


def _first_tensor(output: Any) -> Optional[torch.Tensor]:
    return next((t for t in leaves(output) if isinstance(t, torch.Tensor) and t.is_floating_point()), None)


def _global_plan(found: layerwise.Layerwise) -> Plan:
    """One Plan over the whole model, paths made absolute, for the report."""
    plan = Plan()  # found.not_holders are the modules tried and not rewritten: no residual hides there
    for i, chain in enumerate(found.streams):
        first = chain[0].traced.plan.streams[0]
        stream = Stream(index=i, source=f"input of {chain[0].path}", source_node="", hidden_size=first.hidden_size,
                        consumers=[f"output of {chain[-1].path}"], num_blocks=first.num_blocks, block_size=first.block_size,
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
