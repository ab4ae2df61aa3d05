"""Run ``residual_rewriter.convert_`` over litgpt's built-in model configs, built tiny.

Configs: ``litgpt.config.configs`` (210 in litgpt 0.5.13). By default ONE per architecture: configs that
agree on every field that changes what the model computes, sizes aside (``ARCHITECTURE``: the MLP and norm
classes, parallel residual, extra norms, biases, MoE, rotary fraction, sliding windows, softcapping, ...),
are one architecture, represented by its first config (26 in 0.5.13); ``--all`` takes every config.

Each config is made TINY, nothing downloaded (``tiny``): 2 layers, width 64, 4 heads of 16 (its grouping
kept: multi-query stays multi-query, full multi-head stays full), MLP width 128, vocabulary 128, context 32,
sliding windows of 8, at most 4 experts (2 per token, 1 shared); per-layer lists (Gemma 3's sliding-window and
rope layers) keep both kinds of layer. ``litgpt.model.GPT(config)``, seeded (``torch.manual_seed(0)``), float64,
eval mode; its input ``idx`` is a seeded (2, 12) batch of token ids, which ``convert_`` gets as example inputs.

    OMP_NUM_THREADS=1 python benchmarks/convert/sweep_litgpt.py            # one per architecture (~2 min)
    python benchmarks/convert/sweep_litgpt.py --all --out /tmp/l.json         # every config (~10 min)
    python benchmarks/convert/sweep_litgpt.py --only 'gemma|phi'              # --only is a regex

Outcomes, the checks (eval, training with gradients, the oracle with non-zero queries) and the output are
``sweep_timm.py``'s (``sweep_common.py``). Writes benchmarks/results/litgpt-sweep-litgpt<version>-<date>.json
(``-partial`` with --only/--limit, ``-all`` with --all). Exits 1 when a row is a crash or any mismatch.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import logging
import os
import re
import sys
import time
import types
import warnings
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from litgpt.config import Config, configs  # noqa: E402
from litgpt.model import GPT  # noqa: E402

import residual_rewriter as rr  # noqa: E402
from residual_rewriter.passes.errors import first_line  # noqa: E402
from sweep_common import check_converted, run_with_timeout, sweep, write_results  # noqa: E402  (beside this file)

VOCAB, TOKENS = 128, 12
# the Config fields that change what the model computes (sizes aside): configs equal on all of them are one
# architecture
ARCHITECTURE = (
    "mlp_class_name", "norm_class_name", "norm_qk", "norm_qk_type", "post_attention_norm", "post_mlp_norm",
    "parallel_residual", "shared_attention_norm", "bias", "attn_bias", "lm_head_bias", "n_expert", "n_shared_expert",
    "n_expert_groups", "first_k_dense_replace", "latent_attention", "rotary_percentage", "rope_adjustments",
    "rope_interleave", "sliding_window_size", "sliding_window_indices", "rope_indices", "attention_logit_softcapping",
    "final_logit_softcapping", "scale_embeddings", "attention_scores_scalar", "norm_1", "norm_2",
)
DEFAULTS = {f.name: f.default for f in dataclasses.fields(Config) if f.default is not dataclasses.MISSING}


def architecture(config: dict) -> tuple:
    """What the config computes, sizes aside: set or not for sizes (a window, a scalar), values for the rest."""
    full = {**DEFAULTS, **config}
    sized = ("sliding_window_size", "attention_scores_scalar", "attention_logit_softcapping", "final_logit_softcapping",
             "n_expert", "n_shared_expert", "n_expert_groups", "first_k_dense_replace")
    return tuple((k, bool(full.get(k)) if k in sized else
                  "per layer" if isinstance(full.get(k), list) else repr(full.get(k))) for k in ARCHITECTURE)


def chosen(every: bool) -> list[tuple[str, str]]:
    """(config name, its architecture's first config name) for every config, or the first of each architecture."""
    first: dict[tuple, str] = {}
    todo = []
    for config in configs:
        rep = first.setdefault(architecture(config), config["name"])
        if every or rep == config["name"]:
            todo.append((config["name"], rep))
    return todo


def _two_layers(per_layer: list) -> list:
    """A per-layer list for 2 layers keeping both kinds where there are two ([1, 1, 1, 1, 1, 0, ...] -> [1, 0])."""
    kinds = sorted(set(per_layer), key=per_layer.index)
    return (kinds * 2)[:2]


def tiny(name: str) -> Config:
    full = {**DEFAULTS, **next(c for c in configs if c["name"] == name)}
    heads = 4
    groups = 1 if full["n_query_groups"] == 1 else heads if full["n_query_groups"] == full["n_head"] else 2
    sizes = dict(n_layer=2, n_embd=64, n_head=heads, head_size=16, n_query_groups=groups, intermediate_size=128,
                 vocab_size=VOCAB, padded_vocab_size=VOCAB, block_size=32)
    if full.get("sliding_window_size"):
        sizes["sliding_window_size"] = 8  # shorter than the input: the window acts
    if full.get("n_expert"):
        sizes.update(n_expert=4, n_expert_per_token=min(full["n_expert_per_token"], 2), moe_intermediate_size=64,
                     n_shared_expert=min(full.get("n_shared_expert") or 0, 1) or None,
                     n_expert_groups=min(full.get("n_expert_groups") or 0, 1) or None,
                     n_topk_groups=min(full.get("n_topk_groups") or 0, 1) or None,
                     first_k_dense_replace=min(full.get("first_k_dense_replace") or 0, 1) or None)
    for key in ("sliding_window_indices", "rope_indices"):
        if isinstance(full.get(key), list):
            sizes[key] = _two_layers(full[key])
    return Config.from_name(name, **{k: v for k, v in sizes.items() if v is not None or k in full})


def sweep_one(name: str, architecture_of: str) -> dict:
    row = {"config": name, "architecture": architecture_of, "outcome": None, "rel_err": None, "reason": ""}
    try:
        config = tiny(name)
        torch.manual_seed(0)
        original = GPT(config).double().eval()
        row.update(mlp=config.mlp_class_name, norm=config.norm_class_name, params=sum(p.numel() for p in original.parameters()))
        idx = torch.randint(0, VOCAB, (2, TOKENS), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            original(idx)
        model = copy.deepcopy(original)
    except Exception as exc:  # noqa: BLE001
        return {**row, "outcome": "build failed", "reason": first_line(exc)}
    inputs = {"idx": idx}
    return check_converted(row, original, model, lambda m, **o: rr.convert_(m, example_inputs=inputs, **o), inputs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--all", action="store_true", help="every config, not one per architecture")
    p.add_argument("--only", help="only config names matching this (a regular expression, case-insensitive)")
    p.add_argument("--limit", type=int, help="at most this many configs (after --only)")
    p.add_argument("--timeout", type=int, default=120, help="seconds per config, build included (default 120)")
    p.add_argument("--out", type=Path, help="the JSON file (default: benchmarks/results/litgpt-sweep-...json)")
    args = p.parse_args(argv)
    logging.getLogger("torch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    todo = [t for t in chosen(args.all) if not args.only or re.search(args.only, t[0], re.IGNORECASE)]
    t0 = time.perf_counter()
    rows = sweep(todo[: args.limit], lambda name, rep: run_with_timeout(
        args.timeout, {"config": name, "architecture": rep}, sweep_one, name, rep),
        {"config": 36, "outcome": 15}, 170)
    wall = round(time.perf_counter() - t0, 1)
    partial = ("-partial" if args.only or args.limit else "") + ("-all" if args.all else "")
    litgpt = types.SimpleNamespace(__name__="litgpt", __version__=version("litgpt"))  # (the module has no __version__)
    name = f"litgpt-sweep-litgpt{litgpt.__version__}-{{date}}{partial}"
    return write_results(rows, args.out, name, f"configs in {wall:.0f} s", litgpt,
                         omp_num_threads=os.environ.get("OMP_NUM_THREADS"), all=args.all, only=args.only,
                         limit=args.limit, timeout_s=args.timeout, wall_s=wall)


if __name__ == "__main__":
    sys.exit(main())
