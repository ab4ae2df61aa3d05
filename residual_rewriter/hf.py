"""Hugging Face transformers support: example inputs, and ``save_pretrained`` of a converted model.

Nothing here imports transformers at module import time; a model is recognised as a Hugging Face
model by duck typing (``config`` + ``main_input_name``), so the library works without transformers.
"""
from __future__ import annotations


import torch
from torch import nn


# the KV-cache argument of a model's forward: ``cache`` since transformers 5.24 (``past_key_values``,
# deprecated there, before)
CACHE_ARGUMENT_NAMES = ("cache", "past_key_values")


def is_hf_model(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model, "main_input_name") and hasattr(model.config, "to_dict")


def example_inputs(model: nn.Module, batch_size: int = 2, seq_len: int = 8) -> tuple:
    """Random inputs for ``model.main_input_name`` built from the config (nothing downloaded)."""
    cfg = model.config
    name = model.main_input_name
    g = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    if name == "input_ids":
        vocab = getattr(cfg, "vocab_size", None) or getattr(cfg.get_text_config(), "vocab_size")
        ids = torch.randint(0, vocab, (batch_size, seq_len), generator=g).to(device)
        if getattr(cfg, "is_encoder_decoder", False):  # (input_ids, decoder_input_ids)
            return ids, torch.randint(0, vocab, (batch_size, max(1, seq_len - 3)), generator=g).to(device)
        return (ids,)
    if name == "pixel_values" and hasattr(cfg, "image_size"):
        size = cfg.image_size if isinstance(cfg.image_size, int) else cfg.image_size[0]
        dtype = next(model.parameters()).dtype
        x = torch.randn(batch_size, getattr(cfg, "num_channels", 3), size, size, generator=g)
        return (x.to(device=device, dtype=dtype),)
    raise TypeError(
        f"cannot derive example inputs for {type(model).__name__} (main input {name!r}"
        + (", and its config has no image_size" if name == "pixel_values" else "")
        + "): pass example_inputs={...} (its forward's keyword arguments) to convert/detect"
    )


def input_names(model: nn.Module, n: int) -> list[str]:
    """Names of the ``n`` example inputs ``example_inputs`` builds."""
    names = [model.main_input_name]
    if getattr(model.config, "is_encoder_decoder", False):
        names.append("decoder_input_ids")
    return names[:n]


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
