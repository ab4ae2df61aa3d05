"""Run ``residual_rewriter.convert_`` over every Hugging Face model class that builds tiny.

Classes come from four of transformers' auto mappings (``transformers.models.auto.modeling_auto``):
MODEL_FOR_CAUSAL_LM, MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM, MODEL_FOR_MASKED_LM and
MODEL_FOR_IMAGE_CLASSIFICATION (``*_MAPPING_NAMES``), deduplicated by class (331 entries, 318 classes
in 5.25). They are the task heads whose main input is ``input_ids`` or ``pixel_values``, which
``convert_`` derives example inputs for, one class per architecture and task; the base MODEL_MAPPING
would repeat every architecture without its head. ``--mappings`` picks others.

Each class gets a tiny config: ``AutoConfig.for_model(model_type)`` (the class's own model type)
rebuilt with the common size fields it has shrunk (2 layers, width 32, 2 heads, vocab 256, 32x32
images, ...), sub-configs (``text_config``, ...) likewise. Nothing is downloaded. The model is built
with ``_from_config`` (random weights, seed 0), in eval mode, in float64 when it runs there, else float32.

    python benchmarks/convert/sweep_hf.py                      # all (~15 min on 2 CPU cores)
    python benchmarks/convert/sweep_hf.py --only Llama --limit 5 --timeout 30 --out /tmp/s.json
    python benchmarks/convert/sweep_hf.py --only '^(Llama|T5|ViT)For'    # --only is a regex

Outcomes:
    exact              converted, and the converted model's first floating output equals the original's
                       (a deep copy taken before conversion; same inputs, eval, no grad); rel err shown
    mismatch           converted, but the outputs differ (rel err > 1e-9 in float64, 1e-4 in float32): a bug
    refused            ``ConversionError``: its first line shown, the full reason in the JSON
    crash              any other exception from ``convert_`` or the converted model: a bug in residual_rewriter;
                       the row shows the innermost residual_rewriter frame, the JSON also the traceback
    timeout            the class took more than --timeout seconds (default 60)
    build failed       the tiny model cannot be built, or fails on its example inputs (first line of the error)
    no example inputs  ``convert_`` cannot derive inputs for its main input (nothing was converted)

Prints one row per class as it finishes, then the count per outcome, and writes
benchmarks/results/hf-sweep-transformers<version>-<date>.json (``-partial`` with --only/--limit).
Exits 1 when a row is a crash or a mismatch.
"""
from __future__ import annotations

import argparse
import collections
import copy
import datetime
import inspect
import json
import logging
import os
import re
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers.models.auto import modeling_auto  # noqa: E402

import residual_rewriter as rr  # noqa: E402
from residual_rewriter import hf  # noqa: E402
from residual_rewriter.passes.errors import first_line  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
OUR_DIRS = tuple(str(REPO / d) + os.sep for d in ("residual_rewriter", "passes", "kernels"))
MAPPINGS = ["MODEL_FOR_CAUSAL_LM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM", "MODEL_FOR_MASKED_LM", "MODEL_FOR_IMAGE_CLASSIFICATION"]

# size fields set where a config's __init__ takes them (as ints); lists are handled in tiny_overrides
SIZES = {
    "hidden_size": 32, "d_model": 32, "n_embd": 32, "embed_dim": 32, "embedding_size": 32, "dim": 32,
    "intermediate_size": 64, "d_ff": 64, "n_inner": 64, "ffn_dim": 64, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
    "num_hidden_layers": 2, "num_layers": 2, "n_layer": 2, "encoder_layers": 2, "decoder_layers": 2, "num_decoder_layers": 2,
    "num_attention_heads": 2, "n_head": 2, "num_heads": 2, "encoder_attention_heads": 2, "decoder_attention_heads": 2,
    "num_key_value_heads": 1, "head_dim": 16, "d_kv": 16,
    "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2,
    "vocab_size": 256, "image_size": 32, "patch_size": 4,
}
DEPTHS = ("num_hidden_layers", "num_layers", "n_layer", "encoder_layers", "decoder_layers", "num_decoder_layers")
TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "sep_token_id", "cls_token_id")


class Timeout(BaseException):
    """Raised by the alarm; a BaseException, so that no ``except Exception`` on the way swallows it."""


def classes(mappings: list[str]) -> list[tuple[str, str, str]]:
    """[(class name, model_type, mapping)]: each class once, where a mapping first lists it."""
    seen = {}
    for mapping in mappings:
        for model_type, names in getattr(modeling_auto, f"{mapping}_MAPPING_NAMES").items():
            for name in (names,) if isinstance(names, str) else names:
                seen.setdefault(name, (name, model_type, mapping))
    return list(seen.values())


def init_args(config) -> dict:
    params = inspect.signature(type(config).__init__).parameters
    return {k: v for k, v in config.to_dict().items() if k in params}


def tiny_overrides(config) -> dict:
    """Keyword arguments that rebuild ``config`` small: the SIZES fields its ``__init__`` takes (derived
    ones, such as Swin's hidden_size, follow; windowed models keep their image size), list depths -> 1,
    list heads -> powers of two, token ids inside the vocabulary; sub-configs likewise, as dicts of their
    arguments less per-layer lists (``layer_types``), which the new depth recomputes."""
    values = init_args(config)
    out = {k: v for k, v in SIZES.items() if type(values.get(k)) is int}
    if "window_size" in values:  # Swin-like: the windows must fit every stage at the full image size
        out = {k: v for k, v in out.items() if k not in ("image_size", "patch_size")}
    if isinstance(values.get("depths"), list):
        out["depths"] = [1] * len(values["depths"])
    for key in ("num_heads", "num_attention_heads"):
        if isinstance(values.get(key), list):
            out[key] = [min(2**i, h) for i, h in enumerate(values[key])]
    for key in TOKEN_IDS:
        if "vocab_size" in out and isinstance(values.get(key), int):
            out[key] = min(values[key], out["vocab_size"] - 1)
    for key, sub in vars(config).items():
        if isinstance(sub, transformers.PreTrainedConfig):
            kept = init_args(sub)
            depths = {v for k, v in kept.items() if k in DEPTHS}
            kept = {k: v for k, v in kept.items() if not (isinstance(v, list) and len(v) in depths)}
            out[key] = {"model_type": sub.model_type, **kept, **tiny_overrides(sub)}
    return out


def build(name: str, model_type: str):
    """(model, its example call as kwargs, or why there is none): the tiny model in eval mode, float64
    when it runs there, else float32 (one that runs in neither did not build)."""
    cls = getattr(transformers, name)
    own = getattr(cls.config_class, "model_type", "")  # LlamaForCausalLM is also listed for "exaone"
    model_type = own if own in modeling_auto.CONFIG_MAPPING_NAMES else model_type
    config = transformers.AutoConfig.for_model(model_type)
    config = transformers.AutoConfig.for_model(model_type, **tiny_overrides(config))
    torch.manual_seed(0)
    model = cls._from_config(config).eval()
    try:  # the inputs convert_ derives (seeded: the same values), to run the original and the result on
        inputs = hf.example_inputs(model)
    except TypeError as exc:
        return model, first_line(exc).removeprefix("TypeError: ")
    kwargs = dict(zip(hf.input_names(model, len(inputs)), inputs))
    with torch.no_grad():
        try:
            model.to(torch.float64)(**cast(kwargs, torch.float64))
        except Exception:  # noqa: BLE001 - some op or buffer is float32-only
            model.to(torch.float32)(**cast(kwargs, torch.float32))
    return model, cast(kwargs, next(model.parameters()).dtype)


def cast(kwargs: dict, dtype: torch.dtype) -> dict:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in kwargs.items()}


def first_float(output):
    """The first floating-point tensor of a model output (ModelOutput, tuple, dict), depth first."""
    if isinstance(output, torch.Tensor):
        return output if output.is_floating_point() else None
    items = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else ()
    return next((t for t in map(first_float, items) if t is not None), None)


def innermost_frame(exc: BaseException) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename.startswith(OUR_DIRS)]
    if not frames:
        return "(no residual_rewriter frame)"
    return f"{os.path.relpath(frames[-1].filename, REPO)}:{frames[-1].lineno} in {frames[-1].name}: {frames[-1].line}"


def sweep_one(name: str, model_type: str) -> dict:
    row = {"class": name, "model_type": model_type, "dtype": None, "outcome": None, "rel_err": None, "reason": ""}
    try:
        model, kwargs = build(name, model_type)
        row.update(model_type=model.config.model_type, dtype=str(next(model.parameters()).dtype)[6:])
        original = copy.deepcopy(model)
    except Exception as exc:  # noqa: BLE001
        return {**row, "outcome": "build failed", "reason": first_line(exc)}
    if isinstance(kwargs, str):
        return {**row, "outcome": "no example inputs", "dtype": None, "reason": kwargs}
    try:
        rr.convert_(model)
        with torch.no_grad():
            want, got = first_float(original(**kwargs)), first_float(model(**kwargs))
    except rr.ConversionError as exc:
        return {**row, "outcome": "refused", "reason": first_line(exc).removeprefix("ConversionError: "),
                "detail": str(exc)}
    except Exception as exc:  # noqa: BLE001 - anything else is a bug in residual_rewriter
        return {**row, "outcome": "crash", "reason": first_line(exc), "error_type": type(exc).__name__,
                "detail": str(exc), "frame": innermost_frame(exc), "traceback": traceback.format_exc()}
    report = model.attn_res_report
    row["reason"] = f"{len(report.sites)} sites, {len(report.streams)} stream(s), {report.mode}"
    if want is None or got is None or want.shape != got.shape:
        return {**row, "outcome": "mismatch", "reason": "no floating output to compare, or another shape"}
    rel = ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-300)).item()
    ok = rel <= (1e-9 if want.dtype == torch.float64 else 1e-4)  # False for NaN too
    return {**row, "outcome": "exact" if ok else "mismatch", "rel_err": rel}


def run_with_timeout(name: str, model_type: str, seconds: int) -> dict:
    def on_alarm(signum, frame):
        raise Timeout()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    t0 = time.perf_counter()
    try:
        row = sweep_one(name, model_type)
    except Timeout:
        row = {"class": name, "model_type": model_type, "dtype": None, "outcome": "timeout", "rel_err": None,
               "reason": f"over {seconds} s"}
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return {**row, "seconds": round(time.perf_counter() - t0, 2)}


def format_row(row: dict) -> str:
    detail = f"{row['rel_err']:.1e}  {row['reason']}" if row["rel_err"] is not None else row["reason"]
    if row["outcome"] == "crash":
        detail += f"  @ {row['frame']}"
    return (f"{row['class'][:44]:<44} {row['model_type'][:22]:<22} {row['outcome']:<17} "
            f"{row['seconds']:>6.1f}  {detail[:160]}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", help="only classes whose name contains this (a regular expression, case-insensitive)")
    p.add_argument("--limit", type=int, help="at most this many classes (after --only)")
    p.add_argument("--timeout", type=int, default=60, help="seconds per class (default 60)")
    p.add_argument("--out", type=Path, help="the JSON file (default: benchmarks/results/hf-sweep-...json)")
    p.add_argument("--mappings", nargs="+", default=MAPPINGS, help="auto mappings, without _MAPPING_NAMES")
    args = p.parse_args(argv)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    logging.getLogger("torch").setLevel(logging.ERROR)  # FX's is_fx_tracing notice
    warnings.filterwarnings("ignore")

    todo = [c for c in classes(args.mappings) if not args.only or re.search(args.only, c[0], re.IGNORECASE)]
    print(f"{'class':<44} {'model_type':<22} {'outcome':<17} {'sec':>6}  rel err / reason")
    rows = []
    for name, model_type, mapping in todo[: args.limit]:
        rows.append({**run_with_timeout(name, model_type, args.timeout), "mapping": mapping})
        print(format_row(rows[-1]), flush=True)

    counts = collections.Counter(r["outcome"] for r in rows)
    print(f"\n{len(rows)} classes: " + ", ".join(f"{n} {k}" for k, n in counts.most_common()))
    date = datetime.date.today().isoformat()
    partial = "-partial" if args.only or args.limit else ""
    out = args.out or REPO / "benchmarks" / "results" / f"hf-sweep-transformers{transformers.__version__}-{date}{partial}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "date": date, "torch": torch.__version__, "transformers": transformers.__version__,
        "python": sys.version.split()[0], "mappings": args.mappings, "only": args.only, "limit": args.limit,
        "timeout_s": args.timeout, "counts": dict(counts), "rows": rows,
    }, indent=1))
    print(f"wrote {out}")
    return 1 if counts["crash"] or counts["mismatch"] else 0


if __name__ == "__main__":
    sys.exit(main())
