"""What ``sweep_hf.py`` and ``sweep_timm.py`` share: converting one model and checking it against the
original (``check_converted``: eval, then ``training_check``, which holds the near-zero gradient rule), the
per-model timeout, the printed rows, and the JSON of results with its counts and exit code."""
from __future__ import annotations

import collections
import datetime
import json
import os
import random
import signal
import sys
import time
import traceback
from pathlib import Path

import torch

import residual_rewriter as rr
from residual_rewriter.passes.errors import first_line

REPO = Path(__file__).resolve().parents[2]
OUR_DIRS = tuple(str(REPO / d) + os.sep for d in ("residual_rewriter", "passes", "kernels"))
GRAD_FLOOR = 1e-6  # see training_check


class Timeout(BaseException):
    """Raised by the alarm; a BaseException, so that no ``except Exception`` on the way swallows it."""


def first_float(output):
    """The first floating-point tensor of a model output (tensor, ModelOutput, tuple, dict), depth first."""
    if isinstance(output, torch.Tensor):
        return output if output.is_floating_point() else None
    items = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else ()
    return next((t for t in map(first_float, items) if t is not None), None)


def innermost_frame(exc: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename.startswith(OUR_DIRS)]
    if not frames:
        return "(no residual_rewriter frame)"
    return f"{os.path.relpath(frames[-1].filename, REPO)}:{frames[-1].lineno} in {frames[-1].name}: {frames[-1].line}"


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-300)).item()


def check_converted(row: dict, original, model, convert, run) -> dict:
    """``row`` with the outcome of ``convert(model)`` (in place; ``original`` an unconverted deep copy, both in
    eval mode, ``run(net)`` calls one on the example inputs): "refused" (``ConversionError``), "crash" (any
    other exception, in converting or running), "mismatch" (the first floating outputs differ, eval, no grad:
    rel err by norm > 1e-9 in float64, 1e-4 in float32; NaN too), else what ``training_check`` says."""
    try:
        convert(model)
        with torch.no_grad():
            want, got = first_float(run(original)), first_float(run(model))
    except rr.ConversionError as exc:
        return {**row, "outcome": "refused", "reason": first_line(exc).removeprefix("ConversionError: "),
                "detail": str(exc)}
    except Exception as exc:  # noqa: BLE001 - anything else is a bug in residual_rewriter
        return {**row, "outcome": "crash", "reason": first_line(exc), "error_type": type(exc).__name__,
                "detail": str(exc), "frame": innermost_frame(exc), "traceback": traceback.format_exc()}
    report = model.attn_res_report
    row = {**row, "reason": f"{len(report.sites)} sites, {len(report.streams)} stream(s), {report.mode}",
           "holders": len(report.holders)}
    if want is None or got is None or want.shape != got.shape:
        return {**row, "outcome": "mismatch", "reason": "no floating output to compare, or another shape"}
    rel = rel_err(got, want)
    if not rel <= (1e-9 if want.dtype == torch.float64 else 1e-4):  # NaN too
        return {**row, "outcome": "mismatch", "rel_err": rel}
    return {**row, "rel_err": rel, **training_check(original, model, run)}


def training_check(original, model, run) -> dict:
    """Both models in training mode (dropout, DropPath, LayerDrop: the sweeps turn them on), with the same
    random draws (``torch.manual_seed(0)`` and ``random.seed(0)``, which LayerDrop in some HF models draws from,
    before each ``run(net)``): the converted one's first floating output and the gradient of every parameter of
    a loss on it must equal the original's at init. -> outcome "exact", "train mismatch" (a bug: silently
    wrong in training), or "crash" where only the converted model fails.

    Tolerances: output rel err <= 1e-9, gradients <= 1e-8 in float64 (1e-4 and 1e-3 in float32). The gradient
    rule, per parameter p: |g'_p - g_p| / max(|g_p|, GRAD_FLOOR * |g|) (norms; |g| the whole model's gradient,
    every parameter's as one vector; GRAD_FLOOR 1e-6). A gradient that is analytically zero (a bias before a
    softmax or a norm: 1e-17 against ~1, rounding noise in both models, its plain relative error O(1)) is thus
    compared at the model's scale: differences under 1e-14 of |g| (float64) are rounding. A parameter whose
    gradient is at least 1e-6 of |g| is compared to its own size (wrong by O(1) of it: error O(1), flagged); a
    smaller one is still flagged when wrong by more than 1e-14 of |g|. A parameter with a gradient in the
    original and none in the converted model is a train mismatch, as is a NaN. The row also keeps the plain
    worst relative error (``grad_rel_err_plain``, no floor)."""
    runs = []
    for net in (original, model):
        net.train()
        net.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        random.seed(0)
        try:
            out = first_float(run(net))
            out.double().square().mean().backward()
        except Exception as exc:  # noqa: BLE001
            if net is original:  # the original cannot train on this call: nothing to compare
                return {"outcome": "exact", "train": f"original fails in training: {first_line(exc)}"}
            return {"outcome": "crash", "reason": f"in training: {first_line(exc)}", "error_type": type(exc).__name__,
                    "frame": innermost_frame(exc), "traceback": traceback.format_exc()}
        runs.append((out.detach(), {n: p.grad for n, p in net.named_parameters() if p.grad is not None}))
    (want, grads), (got, new_grads) = runs
    tolerance = (1e-9, 1e-8) if want.dtype == torch.float64 else (1e-4, 1e-3)
    out_err = rel_err(got, want) if got.shape == want.shape else float("inf")
    missing = sorted(set(grads) - set(new_grads))
    floor = GRAD_FLOOR * torch.sqrt(sum(g.double().square().sum() for g in grads.values())).item() if grads else 0.0
    diffs = {n: ((new_grads[n].double() - g.double()).norm().item(), g.double().norm().item())
             for n, g in grads.items() if n in new_grads}
    errs = {n: d / max(size, floor, 1e-300) if d == d else float("inf") for n, (d, size) in diffs.items()}
    name = max(errs, key=errs.get, default="")
    worst = errs.get(name, 0.0)
    plain = max((d / max(size, 1e-300) for d, size in diffs.values()), default=0.0)
    check = {"train_rel_err": out_err, "grad_rel_err": worst, "grad_rel_err_plain": plain}
    if out_err <= tolerance[0] and worst <= tolerance[1] and not missing:
        return {**check, "outcome": "exact"}
    why = f"no gradient for {missing[:3]}" if missing else f"output {out_err:.1e}, gradient of {name} {worst:.1e}"
    return {**check, "outcome": "train mismatch", "reason": f"in training, same random draws: {why}"}


def run_with_timeout(seconds: int, row: dict, work, *args) -> dict:
    """``work(*args)`` (a row), or ``row`` as a "timeout" where it takes over ``seconds``; with its seconds."""
    def on_alarm(signum, frame):
        raise Timeout()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    t0 = time.perf_counter()
    try:
        row = work(*args)
    except Timeout:
        row = {**row, "outcome": "timeout", "rel_err": None, "reason": f"over {seconds} s"}
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return {**row, "seconds": round(time.perf_counter() - t0, 2)}


def sweep(todo, one, columns: dict[str, int], detail: int) -> list[dict]:
    """``one(*item)`` (a row) for each item of ``todo``, printed as it finishes: ``columns`` the row's first
    fields and their widths (the outcome's last), then its seconds, its rel err and reason (``detail`` wide)."""
    print(" ".join(f"{k:<{w}}" for k, w in columns.items()) + f" {'sec':>6}  rel err / reason")
    rows = []
    for item in todo:
        rows.append(row := one(*item))
        text = f"{row['rel_err']:.1e}  {row['reason']}" if row["rel_err"] is not None else row["reason"]
        if row["outcome"] == "crash":
            text += f"  @ {row['frame']}"
        print(" ".join(f"{row[k][:w]:<{w}}" for k, w in columns.items()) + f" {row['seconds']:>6.1f}  {text[:detail]}",
              flush=True)
    return rows


def write_results(rows: list[dict], out: Path | None, name: str, what: str, library, **settings) -> int:
    """Prints the count per outcome (after "<n> <what>: "), writes {date, torch, library version, python,
    **settings, counts, rows} to ``out`` (default benchmarks/results/<name with {date}>.json), and returns the
    exit code: 1 when a row is a crash, a mismatch or a train mismatch."""
    counts = collections.Counter(r["outcome"] for r in rows)
    print(f"\n{len(rows)} {what}: " + ", ".join(f"{n} {k}" for k, n in counts.most_common()))
    date = datetime.date.today().isoformat()
    out = out or REPO / "benchmarks" / "results" / f"{name.format(date=date)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "date": date, "torch": torch.__version__, library.__name__: library.__version__,
        "python": sys.version.split()[0], **settings, "counts": dict(counts), "rows": rows,
    }, indent=1, default=str))
    print(f"wrote {out}")
    return 1 if counts["crash"] or counts["mismatch"] or counts["train mismatch"] else 0
