"""Hugging Face transformers support: recognising a model, and its example inputs (saving a converted
model: ``checkpoint.py``).

Nothing here imports transformers at module import time; a model is recognised as a Hugging Face
model by duck typing (``config`` + ``main_input_name``), so the library works without transformers.
"""
from __future__ import annotations

import contextlib
import sys
from unittest import mock

import torch
from torch import nn


def is_hf_model(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model, "main_input_name") and hasattr(model.config, "to_dict")


def example_inputs(model: nn.Module, batch_size: int = 2, seq_len: int = 8) -> dict:
    """Random keyword inputs for ``model.main_input_name`` (and an encoder-decoder's
    ``decoder_input_ids``), built from the config: nothing downloaded."""
    cfg = model.config
    name = model.main_input_name
    g = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    if name == "input_ids":
        vocab = getattr(cfg, "vocab_size", None) or getattr(cfg.get_text_config(), "vocab_size")
        ids = torch.randint(0, vocab, (batch_size, seq_len), generator=g).to(device)
        if getattr(cfg, "is_encoder_decoder", False):
            decoder_ids = torch.randint(0, vocab, (batch_size, max(1, seq_len - 3)), generator=g).to(device)
            return {name: ids, "decoder_input_ids": decoder_ids}
        return {name: ids}
    # the image size is the config's own, or its vision sub-config's (CLIPForImageClassification)
    image_cfg = next((c for c in (cfg, getattr(cfg, "vision_config", None)) if hasattr(c, "image_size")), None)
    if name == "pixel_values" and image_cfg is not None:
        size = image_cfg.image_size if isinstance(image_cfg.image_size, int) else image_cfg.image_size[0]
        dtype = next(model.parameters()).dtype
        x = torch.randn(batch_size, getattr(image_cfg, "num_channels", 3), size, size, generator=g)
        return {name: x.to(device=device, dtype=dtype)}
    raise TypeError(
        f"cannot derive example inputs for {type(model).__name__} (main input {name!r}"
        + (", and its config has no image_size" if name == "pixel_values" else "")
        + "): pass example_inputs={...} (its forward's keyword arguments) to convert/detect"
    )


def masks_as_under_export():
    """A context in which Hugging Face's mask builders (``transformers.masking_utils``) run as under
    ``torch.export``: eager code skips a mask it can (no padding; a cross-attention mask without encoder
    states) and hands the layers None, an exported one always builds the tensor."""
    masking = sys.modules.get("transformers.masking_utils")
    always = {n: lambda *args, **kwargs: True for n in ("is_torchdynamo_exporting", "is_tracing") if hasattr(masking, n)}
    return mock.patch.multiple(masking, **always) if always else contextlib.nullcontext()
