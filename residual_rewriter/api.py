"""Public entry points: ``detect`` (what would be converted) and ``convert`` (do it)."""
from __future__ import annotations

import copy
import warnings
from typing import Any, Optional

import torch
from torch import nn

from residual_rewriter import hf
from residual_rewriter.config import AttnResConfig
from residual_rewriter.converted import ORIGINAL_GRAPH, REPORT, ConvertedModule
from residual_rewriter.errors import ConversionError, conversion_boundary, first_line
from residual_rewriter.passes.capture import capture
from residual_rewriter.passes.checkpointing import checkpointed_layers, keep_checkpointing, sites_to_checkpoint, within
from residual_rewriter.passes.detect import build_plan, record_values
from residual_rewriter.passes.modes import in_mode
from residual_rewriter.passes.rewrite import apply_plan
from residual_rewriter.report import ConversionReport, module_label


def _normalize_inputs(model: nn.Module, example_inputs: Any) -> tuple:
    if example_inputs is None:
        if hf.is_hf_model(model):
            return hf.example_inputs(model)
        if callable(getattr(model, "example_inputs", None)):
            return tuple(model.example_inputs())
        raise ConversionError(
            f"{type(model).__name__} needs example inputs to be traced: pass example_inputs=(tensor, ...) "
            "(a tuple of the positional arguments of its forward; a lone tensor is accepted)"
        )
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    if not isinstance(example_inputs, tuple):
        raise TypeError(f"example_inputs must be a tuple of positional arguments or a tensor, got {type(example_inputs).__name__}")
    return example_inputs


def _check_model(model: Any) -> None:
    """Refuse, with a message of its own, what the pipeline cannot take (before touching it)."""
    if not isinstance(model, nn.Module):
        hint = ": load the model first (torch.load, AutoModel.from_pretrained, ...)" if isinstance(model, str) else ""
        raise TypeError(f"residual_rewriter needs a torch.nn.Module to convert, got {type(model).__name__}{hint}")
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):  # FX cannot trace through Dynamo
        raise ConversionError(
            f"{type(model._orig_mod).__name__} is wrapped by torch.compile; convert the module itself and compile "
            "the result: torch.compile(residual_rewriter.convert(model._orig_mod), backend='attnres')"
        )
    _check_not_converted(model)
    _check_not_meta(model)


def _check_not_converted(model: nn.Module) -> None:
    name = type(model).__name__
    if isinstance(model, ConvertedModule):
        why = "it is a ConvertedModule returned by residual_rewriter.convert"
    elif hasattr(model, "attn_res_report"):
        why = "convert(..., keep_class=True) gave it Block AttnRes: it has model.attn_res_report"
    elif hf.is_hf_model(model) and getattr(model.config, "residual_rewriter", None):
        why = ("its config holds residual_rewriter options: it was saved from a converted model. Load it with "
               "residual_rewriter.from_pretrained(path), which restores the AttnRes parameters")
    else:
        return
    raise ConversionError(
        f"{name} is already converted ({why}). Use it as it is; to convert with other options, convert the "
        "original model."
    )


def _check_not_meta(model: nn.Module) -> None:
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


def copy_to_convert(model: nn.Module) -> nn.Module:
    """The deep copy ``convert`` works on, so that the original stays untouched."""
    try:
        return copy.deepcopy(model)
    except Exception as exc:  # noqa: BLE001 - e.g. a lock or a file handle held by a module
        raise ConversionError(
            f"convert works on a deep copy of {type(model).__name__} (the original stays untouched), and copying "
            f"it fails: {first_line(exc)}.\nMake the model deep-copyable, or "
            "pass inplace=True to convert the model object itself (it then shares its parameters with the result)."
        ) from exc


def _forward_call(model: nn.Module, inputs: tuple, call=None, input_names=None):
    """How the model is called for tracing: ``(call, input_names)``; Hugging Face models are called
    with keyword arguments and the KV cache off."""
    if call is None and hf.is_hf_model(model):
        input_names = hf.input_names(model, len(inputs))
        call = hf.traced_call(model, input_names)
    return call, input_names


def _boundary(model: nn.Module, inputs: tuple, call=None):
    """Every failure past this point is a ConversionError; when the model itself fails on ``inputs``
    (run eagerly, as traced: eval mode, no grad, on a copy of the inputs), the message says so."""
    call = _forward_call(model, inputs, call)[0] or model.forward

    def run_model():
        with in_mode(model, False), torch.no_grad():
            call(*copy.deepcopy(inputs))

    return conversion_boundary(model, run_model)


def _capture_and_plan(model: nn.Module, inputs: tuple, config: AttnResConfig, call=None, input_names=None):
    # keep_class passes its call: the inputs may hold a KV cache, which running the model would fill
    fresh = (lambda: copy.deepcopy(inputs)) if call is not None else (lambda: inputs)
    call, input_names = _forward_call(model, inputs, call, input_names)
    captured = capture(model, fresh(), call=call, input_names=input_names)
    with in_mode(model, False):  # recording: no dropout noise, no BatchNorm statistics updates
        values = record_values(captured.graph_module, fresh())
    plan = build_plan(
        captured.graph_module,
        values,
        num_blocks=config.num_blocks,
        block_size=config.block_size,
        mixing=config.mixing,
        opaque_modules=captured.opaque_modules,
        opaque_with_norms=captured.opaque_with_norms,
    )
    return captured, values, plan


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


def detect(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    num_blocks: Optional[int] = None,
    block_size: Optional[int] = None,
    config: Optional[AttnResConfig] = None,
) -> ConversionReport:
    """Find the pre-norm residual sites of ``model`` without changing it.

    Returns a report whose ``.sites`` lists one entry per residual sublayer in depth order (norm and
    sublayer module paths, block); ``print(report)`` shows a table. Raises ``ConversionError`` when
    nothing can be converted.
    """
    _check_model(model)
    config = _make_config(config, num_blocks=num_blocks, block_size=block_size)
    inputs = _normalize_inputs(model, example_inputs)
    with _boundary(model, inputs):
        captured, _, plan = _capture_and_plan(model, inputs, config)
        # what convert would keep under checkpointing, and what it could not
        checkpointed = [s.sublayer for s, _ in sites_to_checkpoint(plan, checkpointed_layers(model))]
        dropped, hooks = _lost_in_tracing(captured, checkpointed, root_called=False)
    return ConversionReport(model=type(model).__name__, config=config, plan=plan, converted=False,
                            checkpointed=checkpointed, checkpoint_dropped=dropped, hooks_not_called=hooks)


def _lost_in_tracing(captured, checkpointed: list[str], root_called: bool) -> tuple[list[str], list[str]]:
    """What the traced graph cannot keep: (modules whose torch.utils.checkpoint calls are not kept by
    ``checkpointed`` sublayers, inlined modules whose hooks will not run)."""
    # a checkpoint called in module p's forward is kept when a sublayer inside p is checkpointed again
    dropped = [p for p in captured.checkpoint_calls if not any(within(s, p) for s in checkpointed)]
    hooks = [p for p in captured.hooked_inlined if p or not root_called]
    return dropped, hooks


def convert(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    num_blocks: Optional[int] = None,
    block_size: Optional[int] = None,
    mixing: Optional[str] = None,
    key_norm_eps: Optional[float] = None,
    config: Optional[AttnResConfig] = None,
    inplace: bool = False,
    keep_class: bool = False,
) -> nn.Module:
    """Give ``model`` Block Attention Residuals.

    Args:
        model: any ``nn.Module`` with pre-norm residuals (hand-written, Hugging Face, ...).
        example_inputs: positional arguments to trace with (a lone tensor is accepted). Optional for
            Hugging Face models and models with an ``example_inputs()`` method.
        num_blocks: the paper's N (default 8). block_size: the paper's S; 1 is Full AttnRes.
        mixing: "sum" (default; computes exactly what ``model`` computed at init) or "mean".
        inplace: share ``model``'s parameters instead of converting a deep copy. By default the
            original model is left untouched.
        keep_class: Hugging Face models only: return the model object itself (its class, config,
            ``generate`` with the KV cache, ``save_pretrained``) with its forward running converted
            graphs, one per call signature (see ``hf_class.py``).

    Returns a ``ConvertedModule`` (a GraphModule) holding the model's submodules and the new
    parameters; ``.report`` says what was rewritten. With ``keep_class=True``, the model's own class.
    """
    _check_model(model)
    config = _make_config(config, num_blocks=num_blocks, block_size=block_size, mixing=mixing, key_norm_eps=key_norm_eps)
    if keep_class:
        from residual_rewriter.hf_class import convert_keeping_class

        return convert_keeping_class(model, example_inputs, config, inplace=inplace)
    target = model if inplace else copy_to_convert(model)
    return convert_graph(target, _normalize_inputs(target, example_inputs), config, model_name=type(model).__name__)


def convert_graph(
    target: nn.Module,
    inputs: tuple,
    config: AttnResConfig,
    *,
    model_name: str,
    call=None,
    input_names=None,
    attn_res: Optional[nn.Module] = None,
    root_called: bool = False,
) -> ConvertedModule:
    """Capture ``target`` called as ``call(*inputs)``, detect and rewrite: one converted graph."""
    with _boundary(target, inputs, call):
        captured, values, plan = _capture_and_plan(target, inputs, config, call=call, input_names=input_names)
        original_graph = copy.deepcopy(captured.graph_module.graph)  # kept for before/after views
        gm = apply_plan(captured.graph_module, plan, values, eps=config.key_norm_eps, mixing=config.mixing, attn_res=attn_res)
        checkpointed = keep_checkpointing(gm, plan, checkpointed_layers(target))  # tracing dropped it: put it back
        dropped, hooks_lost = _lost_in_tracing(captured, checkpointed, root_called)
    if dropped:
        warnings.warn(
            f"residual_rewriter.convert: {', '.join(map(module_label, dropped))} call "
            "torch.utils.checkpoint in their forward. Tracing "
            "runs the checkpointed function inline, so the converted model does NOT checkpoint there (more "
            "activation memory). Checkpoint the converted model's submodules yourself; Hugging Face layers' "
            "gradient checkpointing is kept by convert.",
            UserWarning,
            stacklevel=3,
        )
    if hooks_lost:
        warnings.warn(
            f"residual_rewriter.convert: forward/backward hooks on {', '.join(map(module_label, hooks_lost))} "
            "are NOT called by the converted model: it runs those modules' forward inline, and their outputs "
            "(residual-stream values) no longer exist as such. Hook the sublayers or norms instead (leaf modules "
            "such as attention, MLP projections and norms keep their hooks).",
            UserWarning,
            stacklevel=3,
        )
    converted = ConvertedModule(gm, gm.graph, class_name=f"AttnRes{model_name}")
    converted.attn_res = gm.attn_res  # keep the AttnResQuery modules (GraphModule copied bare containers)
    converted.train(target.training)
    report = ConversionReport(
        model=model_name,
        config=config,
        plan=plan,
        converted=True,
        new_parameters={f"attn_res.{n}": p.numel() for n, p in converted.attn_res.named_parameters()},
        checkpointed=checkpointed,
        checkpoint_dropped=dropped,
        hooks_not_called=hooks_lost,
    )
    converted.meta[REPORT] = report
    converted.meta[ORIGINAL_GRAPH] = original_graph
    return converted
