"""What to inspect: turn a TARGET string into a model (and example inputs for it).

TARGET is one of
* ``None``                     — the built-in GPT (``residual_rewriter.models.GPT``);
* ``package.module:callable``  — a function returning an ``nn.Module`` or an ``nn.Module`` class
                                 (called with no arguments; dotted attributes like ``mod:Cls.make`` work);
* a path to a Hugging Face ``config.json`` or a folder holding one — a random-weight model is built
  from the config (the class its ``architectures`` names, else ``AutoModelForCausalLM``, else
  ``AutoModel``); nothing is downloaded.

Every failure is a ``TargetError`` whose message is one line naming the TARGET and what went wrong.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Optional

from torch import nn


class TargetError(ValueError):
    """TARGET could not be turned into a model."""


def load_target(target: Optional[str]) -> nn.Module:
    if target is None:
        from residual_rewriter.models import GPT

        return GPT()
    path = Path(target)
    if path.exists():
        return _from_hf_config(path)
    if ":" in target:
        return _from_callable(target)
    raise TargetError(
        f"TARGET {target!r} is neither package.module:callable nor an existing config.json file or folder"
    )


def _from_callable(target: str) -> nn.Module:
    module_name, _, attr_path = target.partition(":")
    if not module_name or not attr_path:
        raise TargetError(f"TARGET {target!r} must look like package.module:callable")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or anything the module raises while importing
        raise TargetError(f"cannot import {module_name!r} (from TARGET {target!r}): {type(e).__name__}: {e}") from e
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as e:
            raise TargetError(f"{module_name!r} has no attribute {attr_path!r} (from TARGET {target!r})") from e
    if isinstance(obj, nn.Module):
        return obj
    if not callable(obj):
        raise TargetError(f"TARGET {target!r} is a {type(obj).__name__}, not a callable or a module class")
    try:
        model = obj()
    except Exception as e:
        raise TargetError(f"calling {target!r} failed: {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise TargetError(f"{target!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _from_hf_config(path: Path) -> nn.Module:
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        raise TargetError(f"{str(path)!r} is a folder without a config.json")
    try:
        import transformers
    except ImportError as e:
        raise TargetError(f"building a model from {str(config_file)!r} needs transformers: pip install transformers") from e
    try:
        # local_files_only: a config file is all we read; nothing may be downloaded
        config = transformers.AutoConfig.from_pretrained(str(config_file), local_files_only=True)
    except Exception as e:
        raise TargetError(f"cannot read a Hugging Face config from {str(config_file)!r}: {type(e).__name__}: {e}") from e
    errors = []
    named = [getattr(transformers, name) for name in (config.architectures or [])[:1] if hasattr(transformers, name)]
    for cls in (*named, transformers.AutoModelForCausalLM, transformers.AutoModel):
        try:  # the class the config was saved from (BertForMaskedLM, not BertLMHeadModel), random weights
            return cls._from_config(config) if cls in named else cls.from_config(config)
        except Exception as e:  # e.g. ValueError: unrecognized configuration class for this auto class
            errors.append(f"{cls.__name__}: {type(e).__name__}: {e}".splitlines()[0])
    raise TargetError(f"cannot build a model from {str(config_file)!r}: " + "; ".join(errors))


def example_inputs_for(model: nn.Module) -> dict:
    """The keyword arguments to call ``model`` (and the converted model) with: what ``convert``
    traces with by default."""
    import inspect

    from residual_rewriter import hf

    if hf.is_hf_model(model):
        try:
            return hf.example_inputs(model)
        except TypeError as e:  # a main input (e.g. audio) it cannot make up
            raise TargetError(str(e)) from e
    make = getattr(model, "example_inputs", None)
    if callable(make):
        inputs = make()
        inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
        return inspect.signature(model.forward).bind(*inputs).arguments
    raise TargetError(
        f"{type(model).__name__} has no example_inputs() method and is not a Hugging Face model: "
        "give it one to inspect it from the command line"
    )
