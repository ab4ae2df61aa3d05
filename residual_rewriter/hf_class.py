"""Converting a Hugging Face model while keeping its class: ``generate`` with the KV cache,
``save_pretrained``, its output types, its config.

A single traced graph cannot serve every way a Hugging Face model is called: ``generate`` passes a
cache object, an attention mask, ``use_cache=True``, ``logits_to_keep`` ... and the model's Python
branches on which of them are given. So the model keeps its class and its submodules, and its
``forward`` becomes a ``SignatureDispatch``: for each call signature (which arguments are tensors or
objects, and the values of the plain constants) it captures, detects and rewrites one graph, the
first time that signature is seen, and reuses it afterwards. Every graph shares the model's
submodules and ONE set of AttnRes parameters (``model.attn_res``); each graph's plan is checked to
convert the same sites as the first one.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from residual_rewriter import hf
from residual_rewriter.config import AttnResConfig
from residual_rewriter.errors import ConversionError
from residual_rewriter.passes.layerwise import is_constant

class SignatureDispatch:
    """Stands in for ``model.forward``: runs the converted graph for the call's signature."""

    def __init__(self, model: nn.Module, original_forward, config: AttnResConfig):
        self.model = model
        self.original_forward = original_forward
        self.config = config
        self.signature = inspect.signature(original_forward)
        self.__signature__ = self.signature  # what generate() inspects to decide which kwargs to pass
        self._var_keyword = next((p.name for p in self.signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)
        self.graphs: dict[tuple, Any] = {}
        self.report = None

    def _key(self, arguments: dict) -> tuple:
        key = []
        for name, value in arguments.items():
            if isinstance(value, torch.Tensor):
                key.append((name, "tensor"))
            elif is_constant(value):
                key.append((name, "constant", tuple(value) if isinstance(value, list) else value))
            else:
                key.append((name, "object", type(value).__name__))  # e.g. a DynamicCache, passed through
        return tuple(key)

    def _arguments(self, args, kwargs) -> dict:
        bound = self.signature.bind(*args, **kwargs)
        arguments = dict(bound.arguments)
        arguments.update(arguments.pop(self._var_keyword, {}))  # **kwargs flattened into named arguments
        return {k: v for k, v in arguments.items() if v is not None}

    def _provide_cache(self, arguments: dict) -> None:
        """The model would create its KV cache inside forward; a graph cannot hold a fresh Python
        object per call, so create it here and pass it in, as generate() does."""
        name = next((n for n in hf.CACHE_ARGUMENT_NAMES if n in self.signature.parameters), None)
        if name is None or any(n in arguments for n in hf.CACHE_ARGUMENT_NAMES):
            return
        use_cache = arguments.get("use_cache", getattr(self.model.config, "use_cache", False))
        if use_cache:
            from transformers.cache_utils import DynamicCache

            arguments[name] = DynamicCache(config=self.model.config)

    def __call__(self, *args, **kwargs):
        arguments = self._arguments(args, kwargs)
        self._provide_cache(arguments)
        key = self._key(arguments)
        graph = self.graphs.get(key)
        if graph is None:
            graph = self.graphs[key] = self._build(key, arguments)
        names = graph.meta["residual_rewriter_input_names"]
        return graph(*(arguments[n] for n in names))

    def _build(self, key: tuple, arguments: dict):
        from residual_rewriter.api import convert_graph

        names = [entry[0] for entry in key if entry[1] != "constant"]
        constants = {entry[0]: entry[2] for entry in key if entry[1] == "constant"}
        forward = self.original_forward

        def call(*values):
            return forward(**dict(zip(names, values)), **constants)

        inputs = tuple(arguments[n] for n in names)
        try:
            graph = convert_graph(
                self.model,
                inputs,
                self.config,
                model_name=type(self.model).__name__,
                call=call,
                input_names=names,
                attn_res=self.model.attn_res,
                root_called=True,  # the model object itself is still called: its own hooks still run
            )
        except ConversionError as exc:  # this may be a generate() step: say which call was being converted
            called = ", ".join(names + [f"{k}={v!r}" for k, v in constants.items()])
            raise ConversionError(
                f"{exc}\n(while converting {type(self.model).__name__} for a call with ({called}): keep_class "
                "converts each new call signature the first time it is seen)"
            ) from (exc.__cause__ or exc)
        report = graph.report
        if self.report is not None and _site_list(report) != _site_list(self.report):
            raise ConversionError(
                f"calling {type(self.model).__name__} with {sorted(arguments)} traces to a graph whose residual "
                f"sites differ from the first one's:\n  first: {_site_list(self.report)}\n  now:   {_site_list(report)}"
            )
        graph.meta["residual_rewriter_input_names"] = names
        return graph

    def __deepcopy__(self, memo):
        # graphs are rebuilt lazily on the copy (they point at the original's submodules)
        model = memo.get(id(self.model), self.model)
        twin = SignatureDispatch(model, type(model).forward.__get__(model), self.config)
        twin.report = self.report
        return twin


def _site_list(report) -> list[tuple[str, str, int]]:
    return [(s.norm, s.sublayer, s.block) for s in report.sites]


def convert_keeping_class(model: nn.Module, example_inputs: Any, config: AttnResConfig, *, inplace: bool) -> nn.Module:
    if not hf.is_hf_model(model):
        raise ConversionError(
            f"keep_class=True is for Hugging Face models (with a config and generate); {type(model).__name__} "
            "is not one: call convert(model) without it"
        )
    from residual_rewriter.api import copy_to_convert

    target = model if inplace else copy_to_convert(model)
    target.attn_res = nn.ModuleDict()  # registered on the model: state_dict, save_pretrained, .to()
    dispatch = SignatureDispatch(target, type(target).forward.__get__(target), config)
    if example_inputs is None:
        example_inputs = hf.example_inputs(target)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    try:
        first = dispatch(*example_inputs, use_cache=False) if "use_cache" in dispatch.signature.parameters else dispatch(*example_inputs)
    except BaseException:
        del target.attn_res  # inplace: a failed conversion leaves the model as it was
        raise
    del first
    dispatch.report = next(iter(dispatch.graphs.values())).report
    target.forward = dispatch
    target.attn_res_report = dispatch.report
    target.config.residual_rewriter = {
        "num_blocks": config.num_blocks,
        "block_size": config.block_size,
        "mixing": config.mixing,
        "key_norm_eps": config.key_norm_eps,
    }
    return target


def from_pretrained(path: str, model_class=None, **from_pretrained_kwargs) -> nn.Module:
    """Load a model saved with ``save_pretrained`` after ``convert_(model)`` or ``convert(..., keep_class=True)``.

    After ``convert_`` the checkpoint's ``model_type`` reads ``residual_rewriter-<type>``, so that
    transformers' own Auto* loaders refuse it rather than drop the AttnRes weights.

    Builds the model with its class's ``from_pretrained`` (which skips the ``attn_res.*`` weights it
    does not know), converts it again with the options stored in its config (``residual_rewriter``),
    then loads the saved AttnRes parameters. ``model_class`` defaults to ``AutoModelForCausalLM``.
    """
    import json
    import os

    import transformers

    from residual_rewriter.inplace import MODEL_TYPE_PREFIX, convert_again, saved_config

    if model_class is None:
        model_class = transformers.AutoModelForCausalLM
    with open(os.path.join(path, "config.json")) as f:
        in_place = json.load(f).get("model_type", "").startswith(MODEL_TYPE_PREFIX)
    config = saved_config(path) if in_place else transformers.AutoConfig.from_pretrained(path)
    options = getattr(config, "residual_rewriter", None)
    if not options:
        raise ConversionError(f"{path} holds no residual_rewriter options in its config: it was not saved from a converted model")
    model = model_class.from_pretrained(path, config=config, **from_pretrained_kwargs)
    if in_place:  # saved after convert_
        converted = convert_again(model, options)
    else:
        converted = convert_keeping_class(model, None, AttnResConfig(**options), inplace=True)
    _load_attn_res(converted, path)
    return converted


def _load_attn_res(model: nn.Module, path: str) -> None:
    """Load the AttnRes tensors a checkpoint holds (transformers skipped them) into ``model``."""
    import os

    from safetensors.torch import load_file

    def is_attn_res(key: str) -> bool:
        return ".attn_res." in f".{key}"

    saved = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            saved.update({k: v for k, v in load_file(os.path.join(path, name)).items() if is_attn_res(k)})
    missing = {k for k in model.state_dict() if is_attn_res(k)} - set(saved)
    if missing:
        raise ConversionError(f"{path} lacks AttnRes parameters {sorted(missing)[:4]}: saved from another conversion?")
    model.load_state_dict(saved, strict=False)
