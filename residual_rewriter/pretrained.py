"""Hugging Face checkpoints of converted models: ``residual_rewriter.from_pretrained(path)``."""
from __future__ import annotations

from torch import nn

from residual_rewriter import hf
from residual_rewriter.api import convert_
from residual_rewriter.config import AttnResConfig
from residual_rewriter.passes.errors import ConversionError
from residual_rewriter.passes.rewrite import is_attn_res_parameter


def from_pretrained(path: str, model_class=None, **from_pretrained_kwargs) -> nn.Module:
    """Load a model saved with ``save_pretrained`` after ``convert_(model)`` or ``convert(model)``.

    After ``convert_`` the checkpoint's ``model_type`` reads ``residual_rewriter-<type>``, so that
    transformers' own Auto* loaders refuse it rather than drop the AttnRes weights.

    Builds the model with its class's ``from_pretrained`` (which skips the ``attn_res.*`` weights it
    does not know), converts it again with the options stored in its config (``residual_rewriter``),
    then loads the saved AttnRes parameters. ``model_class`` defaults to the class the checkpoint
    records (``config.architectures``).
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
    if not saved.get("model_type", "").startswith(hf.MODEL_TYPE_PREFIX) or not saved.get("residual_rewriter"):
        raise ConversionError(f"{path} holds no residual_rewriter options in its config: it was not saved from a converted model")
    config = hf.saved_config(path)
    options = {k: v for k, v in config.residual_rewriter.items() if k not in ("mode", "model_type")}
    del config.residual_rewriter  # recorded by the save: not a sign of a converted model here
    model = model_class.from_pretrained(path, config=config, **from_pretrained_kwargs)
    converted = convert_(model, AttnResConfig(**options))
    _load_attn_res(converted, path)
    return converted


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
    missing = sorted(k for k, disk in on_disk.items() if disk not in saved)
    if missing:
        raise ConversionError(f"{path} lacks AttnRes parameters {missing[:4]}: saved from another conversion?")
    model.load_state_dict({k: saved[disk] for k, disk in on_disk.items()}, strict=False)
