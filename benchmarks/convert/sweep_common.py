"""What ``sweep_hf.py``, ``sweep_timm.py``, ``sweep_litgpt.py`` and ``sweep_torchtune.py`` share: converting one model and checking it against the
original (``check_converted``: eval, then ``training_check``, which holds the near-zero gradient rule, then
``oracle_check``, with non-zero queries), the per-model timeout, the printed rows, and the JSON of results
with its counts and exit code."""
from __future__ import annotations

import collections
import copy
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
from torch import nn

import residual_rewriter as rr
from residual_rewriter.passes.errors import first_line

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
import attnres_oracle as oracle  # noqa: E402  (the suite's independent Block AttnRes oracle)
from model_zoo import compare_steps  # noqa: E402  (the suite's rule for a training step)

OUR_DIRS = tuple(str(REPO / d) + os.sep for d in ("residual_rewriter", "passes", "kernels"))
# oracle_check's conversion: ceil(L / 3) != floor(L / 3) for most depths; not the default eps (a configured
# value ignored would show)
ORACLE_OPTIONS = {"num_blocks": 3, "key_norm_eps": 1e-4}


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


def check_converted(row: dict, original, model, convert, inputs: dict, pairs=()) -> dict:
    """``row`` with the outcome of ``convert(model)`` (in place; ``original`` an unconverted deep copy, both in
    eval mode, run as ``net(**inputs)``; ``convert(net, **options)`` takes conversion options): "refused"
    (``ConversionError``), "crash" (any other exception, in converting or running), "mismatch" (the first
    floating outputs differ, eval, no grad: rel err by norm > 1e-9 in float64, 1e-4 in float32; NaN too),
    else what ``training_check`` says, and where that is "exact", what ``oracle_check`` says (``pairs`` its)."""
    def run(net):
        return net(**inputs)

    spare = copy.deepcopy(original)  # for oracle_check: a training step can leave tensors no deepcopy takes
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
    row = {**row, "rel_err": rel, **training_check(original, model, run)}
    if row["outcome"] != "exact":
        return row
    try:
        return {**row, **oracle_check(spare, convert, inputs, pairs)}
    except Exception as exc:  # noqa: BLE001
        return {**row, "outcome": "crash", "reason": f"with non-zero queries: {first_line(exc)}",
                "error_type": type(exc).__name__, "frame": innermost_frame(exc), "traceback": traceback.format_exc()}


def training_check(original, model, run) -> dict:
    """Both models in training mode (dropout, DropPath, LayerDrop: the sweeps turn them on), with the same
    random draws (``torch.manual_seed(0)`` and ``random.seed(0)``, which LayerDrop in some HF models draws from,
    before each ``run(net)``): the converted one's first floating output and the gradient of every parameter of
    a loss on it must equal the original's at init. -> outcome "exact", "train mismatch" (a bug: silently
    wrong in training), or "crash" where only the converted model fails.

    Compared by the suite's rule (``model_zoo.compare_steps``): output rel err <= 1e-9, gradients <= 1e-8 in
    float64 (1e-4 and 1e-3 in float32), each relative to its own size with a floor at the whole model's
    gradient scale for near-zero ones; a parameter without its gradient, or a NaN, is a train mismatch."""
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
    check, why = compare_steps(*runs[0], *runs[1])
    if why is None:
        return {**check, "outcome": "exact"}
    return {**check, "outcome": "train mismatch", "reason": f"in training, same random draws: {why}"}


def oracle_check(original, convert, inputs: dict, pairs=()) -> dict:
    """With non-zero queries, which exactness at init cannot replace (every aggregation of zero queries is the
    plain sum: a wrong source set, block partition or query binding computes the same). ``original`` is
    converted again (``convert(copy, **ORACLE_OPTIONS)``), its queries and key-norm gains drawn at random
    (``attnres_oracle.randomize``), and then, in float64 to 1e-9 (float32: 1e-4):
      - every norm and final norm reads what the independent oracle (tests/attnres_oracle.py) computes from
        the branch outputs the model produced (eval, the graphs traced at conversion);
      - the graphs traced for training compute what eval's do: the output and every gradient (the queries'
        included; ``model_zoo.compare_steps``), with every dropout, DropPath and LayerDrop probability at 0, where the
        original's training and eval forwards then agree (BatchNorm's do not: skipped, said so);
      - each of ``pairs``, ``(label, run_a, run_b)``: two calls that the original computes alike (Hugging
        Face: a padded batch, a cached decode step) agree on the converted model too, to 1e-6 (float32:
        1e-3; a cached step may take another algorithm, a Mamba scan's step, whose rounding the queries' new
        inputs can bring to 1e-9; a wrong binding is off by far more).
    -> {"oracle": what was checked or skipped, "oracle_rel_err": the worst}, with outcome "oracle mismatch"
    (a bug) and its reason where one does not hold. Where the oracle cannot read the model (a module reading
    the stream's end with another first argument: Perceiver's decoder; a holder called twice) it says so."""
    original.eval()
    model, reference = copy.deepcopy(original), copy.deepcopy(original)
    convert(model, **ORACLE_OPTIONS)
    oracle.randomize(model, seed=0)
    dtype = first_float(model(**inputs)).dtype
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    done, worst, failures = [], 0.0, []
    try:
        errs = _oracle_errors(model, inputs)
    except KeyError as exc:  # a holder whose graph traced at conversion did not run on the conversion's own call
        failures.append(f"the oracle recorded nothing for {exc}: its conversion graph did not run")
    except AssertionError as exc:  # what the oracle cannot read (a consumer whose first argument is another tensor)
        done.append(f"oracle n/a ({first_line(exc)[:80]})")
    else:
        worst = max(errs.values(), default=0.0)
        failures += [f"{what} reads {err:.1e} off the oracle" for what, err in errs.items() if not err <= tol]
        done.append(f"oracle ({len(errs)} reads)")
    for label, run_a, run_b in pairs:  # (before the training graphs' check, which sets new floats)
        with torch.no_grad():
            try:
                original_err = rel_err(run_b(original), run_a(original))
            except Exception as exc:  # noqa: BLE001 - the original cannot make this call
                done.append(f"{label} skipped (the original fails: {type(exc).__name__})")
                continue
            if not original_err <= tol:
                done.append(f"{label} skipped (the original differs by {original_err:.1e})")
                continue
            err = rel_err(run_b(model), run_a(model))
        worst = max(worst, err)
        if not err <= (1e-6 if dtype == torch.float64 else 1e-3):
            failures.append(f"{label}: {err:.1e} apart (the original: {original_err:.1e})")
        done.append(label)
    skipped, why = _training_graphs_agree(reference, model, inputs)
    if why is not None:
        failures.append(why)
    done.append(skipped or "training graphs")
    row = {"oracle": ", ".join(done), "oracle_rel_err": worst}
    return {**row, "outcome": "oracle mismatch", "reason": "; ".join(failures)} if failures else row


def _oracle_errors(model, inputs: dict) -> dict[str, float]:
    """{what: rel err} for every norm input and final-norm input against ``attnres_oracle``'s expectation."""
    report, rec = model.attn_res_report, oracle.record(model, inputs)
    errs = {}
    for st in report.streams:
        want = oracle.expected_stream(
            rec.b0[st.index], [rec.branch[(st.index, s.index)] for s in st.sites],
            [oracle.params_at(model, s.param_prefix) if s.param_prefix else None for s in st.sites],
            oracle.params_at(model, st.final_param_prefix), num_blocks=ORACLE_OPTIONS["num_blocks"], block_size=None,
            eps=ORACLE_OPTIONS["key_norm_eps"], mixing="sum",
            scales=[rec.scale.get((st.index, s.index)) for s in st.sites],
            gains=[rec.gain.get((st.index, s.index)) for s in st.sites])
        for site, h in zip(st.sites, want.site_inputs):
            for witness, got in rec.fed[(st.index, site.index)].items():
                errs[f"stream {st.index} site {site.index} ({witness})"] = oracle.rel_err(got, h)
        for witness, got in rec.final_fed[st.index].items():
            errs[f"stream {st.index} final ({witness})"] = oracle.rel_err(got, want.final_input)
    return errs


def _training_graphs_agree(reference, model, inputs: dict) -> tuple[str | None, str | None]:
    """(why the check was skipped, or None; why the converted model's training graphs do not compute what its
    eval graphs do with no randomness on, or None)."""
    def step(net, training: bool):
        net.train(training)
        net.zero_grad(set_to_none=True)
        out = first_float(net(**inputs))
        out.double().square().mean().backward()
        return out.detach(), {n: p.grad for n, p in net.named_parameters() if p.grad is not None}

    _without_randomness(reference)  # (a copy of the original)
    try:
        (want, _), (got, _) = step(reference, False), step(reference, True)
    except Exception as exc:  # noqa: BLE001
        return f"training graphs skipped (the original fails: {type(exc).__name__})", None
    if not rel_err(got, want) <= (1e-9 if want.dtype == torch.float64 else 1e-4):
        return f"training graphs skipped (the original's train and eval differ by {rel_err(got, want):.1e})", None
    eval_step = step(model, False)  # the graphs traced at conversion (dropout is the identity in eval)
    _without_randomness(model)  # a new float: new graphs, traced in eager code
    _, why = compare_steps(*eval_step, *step(model, True))
    model.eval()
    return None, None if why is None else f"the training graphs differ from eval's, no randomness on: {why}"


def _without_randomness(model: nn.Module) -> None:
    """Every dropout, DropPath and LayerDrop probability at 0 (float attributes named ``*drop*``)."""
    for module in model.modules():
        for name, value in list(vars(module).items()):
            if type(value) is float and ("drop" in name or (name == "p" and isinstance(module, nn.modules.dropout._DropoutNd))):
                setattr(module, name, 0.0)


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
    exit code: 1 when a row is a crash, a mismatch, a train mismatch, an oracle mismatch or an export failure."""
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
    bugs = ("crash", "mismatch", "train mismatch", "oracle mismatch", "export failed")
    return 1 if any(counts[b] for b in bugs) else 0
