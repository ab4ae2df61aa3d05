"""Public entry points: ``convert_`` (in place), ``convert`` (a converted copy) and ``detect`` (look first).

All three run the same steps (``driver.py``); these functions check what they are given and say
clearly what is wrong with it before anything touches the model.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Any, Callable, Optional

import torch
from torch import nn

from residual_rewriter import checkpoint, driver, hf
from residual_rewriter.config import AttnResConfig
from residual_rewriter.passes.errors import ConversionError, first_line
from residual_rewriter.passes.layerwise import installed_forwards
from residual_rewriter.passes.rewrite import is_attn_res_parameter
from residual_rewriter.report import ConversionReport


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
    key_norm_eps: Optional[float] = None,
) -> nn.Module:
    """Give ``model`` Block Attention Residuals in place (torchao's ``quantize_`` convention); returns it.

    The model keeps its class, module tree, parameter names and Python forward: only the forwards
    that hold residual adds (its decoder layers; the model itself when the adds sit in its own
    forward) are rewritten. New parameters live in the module that uses them
    (``model.layers.3.attn_res.mlp.query``). The converted model is run once on the example inputs and
    must compute what the original computed (exact at init with "sum" mixing); else it is restored.

    Args:
        config: an ``AttnResConfig``, or the keyword options: ``num_blocks`` (the paper's N, default 8),
            ``block_size`` (the paper's S; 1 is Full AttnRes), ``mixing`` ("sum", exact at init, or the
            paper's "mean"), ``key_norm_eps``.
        example_inputs: positional arguments of its forward (a tuple or a lone tensor), or a dict of
            keyword arguments. Optional for Hugging Face models and models with ``example_inputs()``.
        filter_fn: ``filter_fn(module, path) -> bool``: only modules it accepts may be rewritten
            (their sublayers must still form one stream).
        verify: run the converted model on the example inputs and compare with the original's output
            (on by default; a mismatch restores the model and raises).

    ``model.attn_res_report`` says what was rewritten and in which mode.
    """
    _check_model(model)
    peft = next(((path, m) for path, m in model.named_modules() if type(m).__module__.startswith("peft.")), None)
    if peft is not None:  # the model or a layer in it (LoRA applied to the base model before converting)
        what = f"{type(model).__name__} is a PEFT model" if not peft[0] else f"{peft[0]} is a PEFT layer ({type(peft[1]).__name__})"
        raise ConversionError(
            f"{what}: its adapter would be saved without the AttnRes parameters. Convert the base model first, "
            "then apply PEFT with them trainable and saved: "
            "get_peft_model(residual_rewriter.convert_(base), LoraConfig(..., modules_to_save=['attn_res']))"
        )
    config = _make_config(config, num_blocks=num_blocks, block_size=block_size, mixing=mixing, key_norm_eps=key_norm_eps)
    args, kwargs = _example_call(model, example_inputs)
    report = driver.run(driver.Conversion(model, config, args, kwargs, filter_fn, verify=verify))
    model.attn_res_report = report
    if hf.is_hf_model(model):  # save_pretrained records it; residual_rewriter.from_pretrained restores it
        shared, model.config = model.config, copy.copy(model.config)  # a copy: other models may share the object
        model.config.residual_rewriter = {**dataclasses.asdict(config), "mode": "in_place"}
        for module in model.modules():  # the model's own modules read the copy: `model.config.use_cache = False` reaches them
            if vars(module).get("config") is shared:
                module.config = model.config
        model.save_pretrained = functools.partial(checkpoint.save_pretrained, model)  # (a bound method pickles as the class's)
    return model


def convert(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    config: Optional[AttnResConfig] = None,
    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
    verify: bool = True,
    num_blocks: Optional[int] = None,
    block_size: Optional[int] = None,
    mixing: Optional[str] = None,
    key_norm_eps: Optional[float] = None,
) -> nn.Module:
    """``convert_`` on a deep copy of ``model``: returns the converted copy, of the user's own class
    (a Hugging Face model keeps ``generate``, ``save_pretrained``, ``config``); ``model`` is untouched.
    Arguments as for ``convert_``."""
    _check_model(model)
    try:
        copied = copy.deepcopy(model)
    except Exception as exc:  # noqa: BLE001 - e.g. a lock or a file handle held by a module
        raise ConversionError(
            f"convert works on a deep copy of {type(model).__name__} (the original stays untouched), and copying "
            f"it fails: {first_line(exc)}.\nMake the model deep-copyable, or convert the model object itself with "
            "residual_rewriter.convert_(model)."
        ) from exc
    return convert_(copied, config, example_inputs=example_inputs, filter_fn=filter_fn, verify=verify,
                    num_blocks=num_blocks, block_size=block_size, mixing=mixing, key_norm_eps=key_norm_eps)


def detect(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    config: Optional[AttnResConfig] = None,
    filter_fn: Optional[Callable[[nn.Module, str], bool]] = None,
    num_blocks: Optional[int] = None,
    block_size: Optional[int] = None,
    mixing: Optional[str] = None,
) -> ConversionReport:
    """Find the residual sites ``convert_`` would rewrite, without changing ``model`` (it is converted,
    checked and restored: the report is what ``convert_`` would do).

    Returns a report whose ``.sites`` lists one entry per residual sublayer in depth order (norm and
    sublayer module paths, block), and ``.holders`` the modules whose forward would be rewritten;
    ``print(report)`` shows a table. Raises ``ConversionError`` when nothing can be converted.
    """
    _check_model(model)
    config = _make_config(config, num_blocks=num_blocks, block_size=block_size, mixing=mixing)
    args, kwargs = _example_call(model, example_inputs)
    return driver.run(driver.Conversion(model, config, args, kwargs, filter_fn), keep=False)


def attn_res_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters conversion added (each aggregation's query and key-norm gain), e.g. for their own
    optimizer group: ``torch.optim.AdamW([{"params": rr.attn_res_parameters(model), "lr": 1e-3}, ...])``."""
    return [p for name, p in model.named_parameters() if is_attn_res_parameter(name)]


def _example_call(model: nn.Module, example_inputs: Any) -> tuple[tuple, dict]:
    """``(args, kwargs)`` to call the model with; a Hugging Face model by keyword (as users call it,
    so that the common signature needs no tracing later, under torch.compile)."""
    if example_inputs is None and hf.is_hf_model(model):
        example_inputs = hf.example_inputs(model)
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if example_inputs is None:
        if not callable(getattr(model, "example_inputs", None)):
            raise ConversionError(
                f"{type(model).__name__} needs example inputs to be traced: pass example_inputs=(tensor, ...) "
                "(a tuple of the positional arguments of its forward; a lone tensor is accepted)"
            )
        example_inputs = tuple(model.example_inputs())
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise TypeError(f"example_inputs must be a tuple of positional arguments or a tensor, got {type(example_inputs).__name__}")


def _check_model(model: Any) -> None:
    """Refuse, with a message of its own, what the pipeline cannot take (before touching it)."""
    if not isinstance(model, nn.Module):
        hint = ": load the model first (torch.load, AutoModel.from_pretrained, ...)" if isinstance(model, str) else ""
        raise TypeError(f"residual_rewriter needs a torch.nn.Module to convert, got {type(model).__name__}{hint}")
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):  # FX cannot trace through Dynamo
        raise ConversionError(
            f"{type(model._orig_mod).__name__} is wrapped by torch.compile; convert the module itself and compile "
            "the result: torch.compile(residual_rewriter.convert_(model._orig_mod), backend='attnres')"
        )
    if torch.distributed.is_available():  # (our runs would leave its parameters unsharded behind FSDP's back)
        from torch.distributed.fsdp import FSDPModule

        sharded = next((path for path, m in model.named_modules() if isinstance(m, FSDPModule)), None)
        if sharded is not None:
            raise ConversionError(f"{sharded or type(model).__name__} is sharded by FSDP2 (fully_shard): convert the "
                                  "model first, then shard it (fully_shard on each layer, then the root)")
    _check_not_converted(model)
    _check_not_meta(model)


def _check_not_converted(model: nn.Module) -> None:
    inside = [path for path, m in model.named_modules() if hasattr(m, "attn_res_report")] + [p for p, _ in installed_forwards(model)]
    if hasattr(model, "attn_res_report"):
        why = "it has model.attn_res_report"
    elif inside:  # a part of it was converted (model.model), or it is a part of a converted model
        why = f"its module {inside[0]!r} was rewritten by a conversion"
    elif hf.is_hf_model(model) and getattr(model.config, "residual_rewriter", None):
        why = ("its config holds residual_rewriter options: it was saved from a converted model. Load it with "
               "residual_rewriter.from_pretrained(path), which restores the AttnRes parameters")
    else:
        return
    raise ConversionError(
        f"{type(model).__name__} is already converted ({why}). Use it as it is; to convert with other options, convert the "
        "original model."
    )


def _check_not_meta(model: nn.Module) -> None:
    if torch.get_default_device().type == "meta":
        raise ConversionError("residual_rewriter is called under torch.device('meta'), where the example inputs and the "
                              "AttnRes parameters would have no data: call it outside that context")
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    on_meta = [n for n, t in tensors if t.is_meta]
    if not on_meta:
        return
    shown = ", ".join(on_meta[:3]) + (", ..." if len(on_meta) > 3 else "")
    raise ConversionError(
        f"{type(model).__name__} has tensors on the meta device ({shown}): detection runs the model on real "
        "values to find its norms. Convert it on the CPU or a GPU and move the result afterwards, or "
        "materialize it first: model.to_empty(device='cpu'), then initialize or load its weights "
        "(load_state_dict, or init_weights() for a Hugging Face model)."
    )


def _make_config(config: Optional[AttnResConfig], **options) -> AttnResConfig:
    if config is not None:
        if not isinstance(config, AttnResConfig):
            raise TypeError(f"config must be a residual_rewriter.AttnResConfig, got {type(config).__name__}")
        if any(v is not None for v in options.values()):
            raise TypeError("pass either config=AttnResConfig(...) or keyword options, not both")
        return config
    options = {k: v for k, v in options.items() if v is not None}
    if "block_size" in options and "num_blocks" in options:
        raise ValueError("pass num_blocks (the paper's N) or block_size (the paper's S), not both")
    if "block_size" in options:
        options["num_blocks"] = None
    return AttnResConfig(**options)


