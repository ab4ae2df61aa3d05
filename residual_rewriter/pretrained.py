"""Loading the Hugging Face checkpoint of a converted model: ``residual_rewriter.from_pretrained(path)``
(how it is written and marked: ``checkpoint.py``)."""
from __future__ import annotations

import functools
import logging
import warnings

from torch import nn

from residual_rewriter import checkpoint
from residual_rewriter.api import convert_
from residual_rewriter.config import AttnResConfig
from residual_rewriter.passes.errors import ConversionError
from residual_rewriter.passes.rewrite import is_attn_res_parameter


def from_pretrained(path: str, model_class=None, example_inputs=None, **from_pretrained_kwargs) -> nn.Module:
    """Load a model saved with ``save_pretrained`` after ``convert_(model)`` or ``convert(model)``.

    ``save_pretrained`` marks the checkpoint so that transformers never loads it without its AttnRes
    weights (``checkpoint.MODEL_TYPE_PREFIX``): its Auto classes load it through this function when given
    ``trust_remote_code=True`` and refuse it otherwise, and the saved class refuses it.

    Builds the model with its class's ``from_pretrained`` (which skips the ``attn_res.*`` weights it
    does not know), converts it again with the options stored in its config (``residual_rewriter``),
    then loads the saved AttnRes parameters. ``model_class`` defaults to the class the checkpoint
    records (``config.architectures``); ``example_inputs`` are ``convert_``'s (for a model whose inputs
    cannot be derived from its config). Other keyword arguments go to the class's ``from_pretrained``
    (``dtype``, ``device_map``, ...).
    """
    import json
    import os

    import transformers

    with open(os.path.join(path, "config.json")) as f:
        saved = json.load(f)
    if model_class is None:  # the class that was saved, as config.json records it
        architecture = (saved.get("architectures") or [None])[0]
        model_class = getattr(transformers, architecture, None) if architecture else None
        if model_class is None:
            raise ConversionError(f"{path}/config.json names no transformers class in `architectures` "
                                  f"({saved.get('architectures')}): pass model_class=...")
    if not saved.get("model_type", "").startswith(checkpoint.MODEL_TYPE_PREFIX) or not saved.get("residual_rewriter"):
        raise ConversionError(f"{path} holds no residual_rewriter options in its config: it was not saved from a converted model")
    config = checkpoint.saved_config(path)
    options = {k: v for k, v in config.residual_rewriter.items() if k != "mode"}
    del config.residual_rewriter  # recorded by the save: not a sign of a converted model here
    model = _load_without_attn_res(model_class, path, config, from_pretrained_kwargs)
    converted = convert_(model, AttnResConfig(**options), example_inputs=example_inputs)
    _load_attn_res(converted, path)
    return converted


class _WithoutLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()


def _load_without_attn_res(model_class, path: str, config, kwargs: dict) -> nn.Module:
    """The class's own ``from_pretrained``, which skips the AttnRes keys it does not know (loaded after the
    conversion). Its load report would list them as unexpected keys: it is replaced by a warning that
    names only the other keys, if any."""
    report = logging.getLogger("transformers.modeling_utils")
    quiet = _WithoutLoadReport()
    report.addFilter(quiet)
    try:
        model, info = model_class.from_pretrained(path, config=config, output_loading_info=True, **kwargs)
    finally:
        report.removeFilter(quiet)
    unexpected = [k for k in info["unexpected_keys"] if not is_attn_res_parameter(k)]
    if unexpected or info["missing_keys"] or info["mismatched_keys"]:
        warnings.warn(f"{model_class.__name__}.from_pretrained({path!r}): missing keys {sorted(info['missing_keys'])}, "
                      f"unexpected keys {sorted(unexpected)}, mismatched {info['mismatched_keys']}")
    return model


def _safetensors(path: str) -> dict:
    import os

    from safetensors.torch import load_file

    tensors = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(path, name)))
    return tensors


def _names_on_disk(model: nn.Module) -> dict[str, str]:
    """In-memory AttnRes key -> the key ``save_pretrained`` writes for it. transformers renames module
    paths on save for some models (Mixtral's ``mlp`` -> ``block_sparse_moe``, ViT's ``layers.N`` ->
    ``encoder.layer.N``), the AttnRes parameters under them included: ask its own save which names it
    writes, by saving tensors that each carry their index (a few values each, nothing else)."""
    import tempfile

    import torch

    state = {k: v for k, v in model.state_dict().items() if is_attn_res_parameter(k)}
    keys = list(state)
    marked = {k: torch.full_like(v, float(i), device="cpu") for i, (k, v) in enumerate(state.items())}
    with tempfile.TemporaryDirectory() as directory:
        type(model).save_pretrained(model, directory, state_dict=marked)  # the class's own: not the marking wrapper
        written = _safetensors(directory)
    return {keys[int(v.flatten()[0].item())]: k for k, v in written.items()}


def _load_attn_res(model: nn.Module, path: str) -> None:
    """Load the AttnRes tensors a checkpoint holds (transformers skipped them) into ``model``."""
    on_disk = _names_on_disk(model)
    saved = _safetensors(path)
    # a checkpoint saved before layouts were recorded has no `_extra_state`: the load warns
    missing = sorted(k for k, disk in on_disk.items() if disk not in saved and not k.endswith("._extra_state"))
    if missing:
        raise ConversionError(f"{path} lacks AttnRes parameters {missing[:4]}: saved from another conversion?")
    model.load_state_dict({k: saved[disk] for k, disk in on_disk.items() if disk in saved}, strict=False)


def _builds(auto_class, config, model_class) -> bool:
    """Whether ``auto_class.from_pretrained`` would build ``model_class`` from ``config``."""
    try:
        built = auto_class._model_mapping[type(config)]
    except (KeyError, ValueError):
        return False
    return model_class in (built if isinstance(built, (tuple, list)) else (built,))


class AttnResCheckpointConfig:
    """What ``AutoConfig.from_pretrained(path, trust_remote_code=True)`` returns for a converted checkpoint
    (through ``checkpoint.CHECKPOINT_CODE``). Deliberately no transformers config class: an Auto class that the
    checkpoint's ``auto_map`` does not name then finds no model for it and refuses, rather than building
    the model without AttnRes. ``original`` is the saved model's own config."""

    sub_configs: dict = {}  # read by the Auto classes' refusal of a config they have no model for

    def __init__(self, auto_map: dict, original):
        self.auto_map, self.original = auto_map, original

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoConfig") -> None:
        pass  # transformers asks; nothing to record

    @classmethod
    def from_pretrained(cls, path, return_unused_kwargs: bool = False, **kwargs):
        import json
        import os

        with open(os.path.join(path, "config.json")) as f:
            auto_map = json.load(f)["auto_map"]
        config = cls(auto_map, checkpoint.saved_config(path))
        # what transformers' own configs consume from the Auto class's keyword arguments
        for used in ("_from_auto", "_from_pipeline", "name_or_path", "cache_dir", "force_download", "local_files_only",
                     "proxies", "token", "revision", "subfolder", "trust_remote_code", "code_revision"):
            kwargs.pop(used, None)
        return (config, kwargs) if return_unused_kwargs else config


class AttnResCheckpointModel:
    """What an Auto model class loads a converted checkpoint with (``auto_map``; one subclass per Auto class,
    made by ``checkpoint_loader``): the saved class, through ``residual_rewriter.from_pretrained``, when the
    Auto class would build that class; a refusal otherwise."""

    auto_class_name = ""

    @classmethod
    def register_for_auto_class(cls, auto_class) -> None:
        pass  # transformers asks; nothing to record

    @classmethod
    def from_pretrained(cls, path, *model_args, config=None, **kwargs):
        import transformers

        if model_args:
            raise ConversionError(f"positional model arguments {model_args} cannot be passed on: use keywords")
        saved = getattr(transformers, config.original.architectures[0])
        if not _builds(getattr(transformers, cls.auto_class_name), config.original, saved):
            right = [name for name in checkpoint.auto_model_classes() if _builds(getattr(transformers, name), config.original, saved)]
            raise ConversionError(
                f"{path} holds a {saved.__name__} converted by residual_rewriter; {cls.auto_class_name} builds "
                f"another class from its config, without the AttnRes weights. Load it with "
                f"residual_rewriter.from_pretrained(path)" + (f" or {' / '.join(right)}" if right else ""))
        for hub_only in ("trust_remote_code", "adapter_kwargs", "_from_auto", "code_revision"):
            kwargs.pop(hub_only, None)
        return from_pretrained(str(path), **kwargs)


@functools.cache
def checkpoint_loader(auto_class_name: str) -> type:
    """``AttnResCheckpointModel`` for one Auto class: the ``__getattr__`` of ``checkpoint.CHECKPOINT_CODE``, so
    that ``auto_map``'s ``residual_rewriter_checkpoint.AutoModelForCausalLM`` names it. One class per
    Auto class, because transformers registers the class it loaded in that Auto class's mapping."""
    if not auto_class_name.startswith("AutoModel"):
        raise AttributeError(auto_class_name)
    return type(f"AttnResCheckpointFor{auto_class_name}", (AttnResCheckpointModel,), {"auto_class_name": auto_class_name})
