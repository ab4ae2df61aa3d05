"""Hugging Face checkpoints of converted models: ``residual_rewriter.from_pretrained(path)``."""
from __future__ import annotations

from torch import nn

from residual_rewriter import hf
from residual_rewriter.api import convert_
from residual_rewriter.config import AttnResConfig
from residual_rewriter.passes.errors import ConversionError


def from_pretrained(path: str, model_class=None, **from_pretrained_kwargs) -> nn.Module:
    """Load a model saved with ``save_pretrained`` after ``convert_(model)`` or ``convert(model)``.

    After ``convert_`` the checkpoint's ``model_type`` reads ``residual_rewriter-<type>``, so that
    transformers' own Auto* loaders refuse it rather than drop the AttnRes weights.

    Builds the model with its class's ``from_pretrained`` (which skips the ``attn_res.*`` weights it
    does not know), converts it again with the options stored in its config (``residual_rewriter``),
    then loads the saved AttnRes parameters. ``model_class`` defaults to ``AutoModelForCausalLM``.
    """
    import json
    import os

    import transformers

    if model_class is None:
        model_class = transformers.AutoModelForCausalLM
    with open(os.path.join(path, "config.json")) as f:
        saved = json.load(f)
    if not saved.get("model_type", "").startswith(hf.MODEL_TYPE_PREFIX) or not saved.get("residual_rewriter"):
        raise ConversionError(f"{path} holds no residual_rewriter options in its config: it was not saved from a converted model")
    config = hf.saved_config(path)
    options = {k: v for k, v in config.residual_rewriter.items() if k not in ("mode", "model_type")}
    del config.residual_rewriter  # recorded by the save: not a sign of a converted model here
    model = model_class.from_pretrained(path, config=config, **from_pretrained_kwargs)
    converted = convert_(model, AttnResConfig(**options))
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
