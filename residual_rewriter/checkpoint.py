"""How the checkpoint of a converted Hugging Face model is written: ``model.save_pretrained`` after
``convert_`` saves the model's own files, then marks them so that no transformers loader builds the model
without its AttnRes weights. Loading it back: ``pretrained.py``."""
from __future__ import annotations

import json
import os

from torch import nn

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


def save_pretrained(model: nn.Module, save_directory, *args, **kwargs):
    """``model.save_pretrained`` of a converted model (``convert_`` binds it): the class's own save, then
    config.json marked (see MODEL_TYPE_PREFIX) and CHECKPOINT_CODE written beside it."""
    result = type(model).save_pretrained(model, save_directory, *args, **kwargs)
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
    import transformers

    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    for mark in ("auto_map", REFUSAL):
        config.pop(mark, None)
    config["model_type"] = config["residual_rewriter"].pop("original_model_type")
    return transformers.AutoConfig.for_model(**config)
