"""Errors raised by residual_rewriter, and the boundary that turns any failure while converting a
user's model into a ``ConversionError`` saying what failed, where (module path, file:line) and what
to do. The original exception stays chained (``__cause__``)."""
from __future__ import annotations

import contextlib
import os
import sysconfig
import types
from typing import Callable, Iterator, Optional

import torch
from torch import nn

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_STDLIB_DIR = sysconfig.get_paths()["stdlib"] + os.sep


class ConversionError(ValueError):
    """A model (or part of one) cannot be converted exactly. The message names module paths and why."""


class GraphRunError(RuntimeError):
    """Internal: a captured graph failed at one node (``module``, ``location``); ``__cause__`` is
    the original exception. The boundary reports it with that node's place in the user's code."""

    def __init__(self, module: str, location: Optional[str]):
        super().__init__(f"the captured graph failed in {module or 'the model itself'} at {location}")
        self.module, self.location = module, location  # raised "from" the original: __cause__ is set


# passes/ sits beside residual_rewriter/ and kernels/ in a checkout, inside residual_rewriter/ once installed from a wheel
_PASSES = os.path.dirname(os.path.abspath(__file__))
_PARENT = os.path.dirname(_PASSES)
_OUR_DIRS = tuple(os.path.join(d, "") for d in [_PASSES, os.path.join(_PARENT, "kernels"), os.path.join(_PARENT, "residual_rewriter")]
                  + ([_PARENT] if os.path.basename(_PARENT) == "residual_rewriter" else []))


def is_user_code(filename: str) -> bool:
    """Code the user can act on: the model's own (or its library's, e.g. transformers) source, not
    torch, not residual_rewriter, not the Python standard library, not generated code (``<...>``)."""
    if filename.startswith("<") or filename.startswith(_TORCH_DIR) or filename.startswith(_OUR_DIRS):
        return False
    in_stdlib = filename.startswith(_STDLIB_DIR) and "-packages" + os.sep not in filename
    return not in_stdlib


def _user_frames(tb: Optional[types.TracebackType]) -> Iterator[tuple[types.FrameType, int]]:
    """``(frame, line being run)`` of each user-code frame of a traceback, outermost first."""
    while tb is not None:
        if is_user_code(tb.tb_frame.f_code.co_filename):
            yield tb.tb_frame, tb.tb_lineno
        tb = tb.tb_next


def frame_location(frame: types.FrameType, lineno: Optional[int] = None) -> str:
    return f"{frame.f_code.co_filename}:{lineno or frame.f_lineno}"


def tb_location(tb: Optional[types.TracebackType]) -> Optional[str]:
    """``file:line`` of the innermost user frame of a traceback: the construct that failed."""
    frames = list(_user_frames(tb))
    return frame_location(*frames[-1]) if frames else None


def module_in_traceback(model: nn.Module, tb: Optional[types.TracebackType]) -> Optional[str]:
    """Path of the innermost module of ``model`` whose user code is on the traceback. torch's own
    modules (a Linear called with the wrong shape) are skipped: the module to name is the one whose
    code made the call."""
    paths = {id(m): p for p, m in model.named_modules(remove_duplicate=False)}
    owners = [paths.get(id(frame.f_locals.get("self"))) for frame, _ in _user_frames(tb)]
    return next((p for p in reversed(owners) if p is not None), None)


def module_label(path: str) -> str:
    """A module path for messages; "" is the converted model itself."""
    return path or "(the model itself)"


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (FX appends graph dumps to messages; they do not help)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _where(model: nn.Module, module: Optional[str], location: Optional[str]) -> str:
    """``in blocks.0 (Block), at file.py:12``; module "" is the model itself. Never raises: it runs
    while another exception is being reported."""
    if module is None:
        where = "in a module residual_rewriter could not name"
    elif module:
        owner = dict(model.named_modules(remove_duplicate=False)).get(module)
        where = f"in {module} ({type(owner).__name__})" if owner is not None else f"in {module}"
    else:
        where = f"in the model itself ({type(model).__name__})"
    return where + (f", at {location}" if location else "")


CONTROL_FLOW_HINT = (
    "FX symbolic tracing cannot follow Python control flow on tensor values (`if x.sum() > 0:`): compute "
    "both branches and select with torch.where, or branch on shapes/dtypes/constants only."
)


def is_control_flow(reason: str) -> bool:
    """The message (or a recorded reason) is FX refusing to branch on a traced value."""
    return "TraceError" in reason and "control flow" in reason


def _hint(exc: BaseException) -> str:
    if is_control_flow(first_line(exc)):
        return CONTROL_FLOW_HINT
    if "NoneType" in first_line(exc):  # XLNet: `if output_g is not None:` on an attention module's output
        return ("A value that is None here was a traced value while tracing, where `x is None` is always False (FX "
                "cannot see `is`): the code after such a test was traced as if x were not None. Pass the value as "
                "an argument, or test something FX can trace (a constant flag).")
    return ("The model itself runs on these inputs, so this is a construct residual_rewriter cannot convert: "
            "please report it with this message (the original exception is chained as __cause__).")


def model_fails_message(model: nn.Module, exc: BaseException) -> str:
    where = _where(model, module_in_traceback(model, exc.__traceback__), tb_location(exc.__traceback__))
    return (
        f"{type(model).__name__} itself fails on these example inputs (called directly, without tracing): "
        f"{first_line(exc)}\n  {where}\n"
        "Pass example_inputs that the model's forward accepts (shapes, dtypes, device, argument order)."
    )


def conversion_failed_message(model: nn.Module, exc: BaseException) -> str:
    if isinstance(exc, GraphRunError):  # the graph failed: name the node's place in the user's code
        where, cause = _where(model, exc.module, exc.location), exc.__cause__
    else:
        where, cause = _where(model, module_in_traceback(model, exc.__traceback__), tb_location(exc.__traceback__)), exc
    return f"cannot convert {type(model).__name__}: {first_line(cause)}\n  {where}\n{_hint(cause)}"


@contextlib.contextmanager
def conversion_boundary(model: nn.Module, run_model: Callable[[], object]) -> Iterator[None]:
    """Around capture, detection and rewrite: a ``ConversionError`` passes unchanged; anything else
    becomes one, chained to the original. ``run_model`` calls the model eagerly on the example
    inputs: when that fails too, the model itself is at fault and the message says so."""
    try:
        yield
    except (ConversionError, Warning):  # a warning is an error only where the user made it one (-W error)
        raise
    except Exception as exc:  # noqa: BLE001 - every other failure is reported as a ConversionError
        try:
            run_model()
        except Exception as own:  # noqa: BLE001 - what the model itself raises
            raise ConversionError(model_fails_message(model, own)) from own
        raise ConversionError(conversion_failed_message(model, exc)) from (exc.__cause__ if isinstance(exc, GraphRunError) else exc)
