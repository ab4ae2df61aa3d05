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
    # the image size is the config's own, or its vision sub-config's (CLIPForImageClassification)
    image_cfg = next((c for c in (cfg, getattr(cfg, "vision_config", None)) if hasattr(c, "image_size")), None)
    if name == "pixel_values" and image_cfg is not None:
        size = image_cfg.image_size if isinstance(image_cfg.image_size, int) else image_cfg.image_size[0]
        dtype = next(model.parameters()).dtype
        x = torch.randn(batch_size, getattr(image_cfg, "num_channels", 3), size, size, generator=g)
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


# How a checkpoint of a converted model is marked (config.json), so that no transformers loader builds it
# without its AttnRes weights:
# - ``model_type`` is ``residual_rewriter-<type>``, unknown to transformers;
# - ``auto_map`` points the Auto classes at CHECKPOINT_CODE, a file saved beside the weights that hands the
#   load to ``residual_rewriter.from_pretrained`` (transformers' route for custom models:
#   ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``); an Auto class that would build
#   another class than the saved one is refused there;
# - the saved class itself (``LlamaForCausalLM.from_pretrained(path)``) only warns on a model type it does
#   not know, then adopts any nested dict whose ``model_type`` is its own: REFUSAL is that dict, and its
#   ``dtype`` (``getattr(torch, dtype)`` in every config's init) is the message, so the load stops before any
#   model is built.
MODEL_TYPE_PREFIX = "residual_rewriter-"
CHECKPOINT_CODE = "residual_rewriter_checkpoint"
REFUSAL = "load_with_residual_rewriter"
_CHECKPOINT_CODE_TEXT = '''"""A model converted to Block Attention Residuals by residual_rewriter: transformers alone would load it
without its AttnRes weights. Load it with residual_rewriter.from_pretrained(path), or with an Auto class and
trust_remote_code=True (this file hands the load to residual_rewriter)."""
from residual_rewriter.pretrained import AttnResCheckpointConfig
from residual_rewriter.pretrained import checkpoint_loader as __getattr__  # auto_map's AutoModel... names
'''


def auto_model_classes() -> list[str]:
    """Names of transformers' Auto model classes (those that pick a model class from a config)."""
    from transformers.models.auto import modeling_auto

    return sorted(name for name in dir(modeling_auto)
                  if name.startswith("AutoModel") and hasattr(getattr(modeling_auto, name), "_model_mapping"))


class SavePretrained:
    """``model.save_pretrained`` of a model converted in place: the model's own, then its config.json
    marked (see MODEL_TYPE_PREFIX) and CHECKPOINT_CODE beside it."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, save_directory, *args, **kwargs):
        import json
        import os

        result = type(self.model).save_pretrained(self.model, save_directory, *args, **kwargs)
        path = os.path.join(save_directory, "config.json")
        with open(path) as f:
            config = json.load(f)
        model_type, architecture = config["model_type"], config["architectures"][0]
        config["residual_rewriter"]["original_model_type"] = model_type
        config["model_type"] = MODEL_TYPE_PREFIX + model_type
        config["auto_map"] = {"AutoConfig": f"{CHECKPOINT_CODE}.AttnResCheckpointConfig",
                              **{auto: f"{CHECKPOINT_CODE}.{auto}" for auto in auto_model_classes()}}
        config[REFUSAL] = {"model_type": model_type, "dtype": (
            f"this {architecture} checkpoint was converted by residual_rewriter (Block AttnRes) and its class alone "
            f"would drop the AttnRes weights. Load it with residual_rewriter.from_pretrained(path), or an Auto class "
            f"with trust_remote_code=True")}
        with open(path, "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        with open(os.path.join(save_directory, CHECKPOINT_CODE + ".py"), "w") as f:
            f.write(_CHECKPOINT_CODE_TEXT)
        return result


def saved_config(path: str):
    """The transformers config of a checkpoint saved after ``convert_``, under its original model type."""
    import json
    import os

    import transformers

    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    for mark in ("auto_map", REFUSAL):
        config.pop(mark, None)
    config["model_type"] = config["residual_rewriter"].pop("original_model_type")
    return transformers.AutoConfig.for_model(**config)
