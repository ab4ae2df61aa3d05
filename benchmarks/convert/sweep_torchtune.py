"""Run ``residual_rewriter.convert_`` over torchtune's model component builders, built tiny.

Builders: every public model builder of ``torchtune.models.<family>._component_builders`` (15 in torchtune 0.6.1:
the decoders llama2, llama3, llama3_1, llama3_2, mistral, gemma, gemma2, phi3, qwen2; the classifiers llama2 and
mistral; the CLIP text and vision encoders, the T5 encoder, and Llama 3.2 Vision's encoder and fusion decoder,
the latter with and without an image); MLP builders and LoRA variants are not models. ``BUILDERS`` gives each its
tiny arguments (common ones in ``TINY``: 2 layers, width 64, 4 heads of 16, 2 KV heads, MLP width 128, vocabulary
128, context 64, sliding window 8) and its input: a seeded (2, 12) batch of token ids, or 2 images of one 16x16
tile. Seeded (``torch.manual_seed(0)``), float64, eval mode; a parameter the builder leaves uninitialised
(``torch.empty``: CLIP's text position embedding, ``UNINITIALISED``; or any non-finite one) is drawn from
N(0, 0.02) (the row's ``drawn``). A
builder of a later torchtune with no row shows as "not in this sweep".

    OMP_NUM_THREADS=1 python benchmarks/convert/sweep_torchtune.py         # ~1 min
    python benchmarks/convert/sweep_torchtune.py --only 'llama|clip' --out /tmp/t.json

Outcomes, the checks (eval, training with gradients, the oracle with non-zero queries) and the output are
``sweep_timm.py``'s (``sweep_common.py``). Writes benchmarks/results/torchtune-sweep-torchtune<version>-<date>.json
(``-partial`` with --only). Exits 1 when a row is a crash or any mismatch.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import inspect
import logging
import os
import pkgutil
import re
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torchtune  # noqa: E402
import torchtune.models  # noqa: E402

import residual_rewriter as rr  # noqa: E402
from residual_rewriter.passes.errors import first_line  # noqa: E402
from sweep_common import check_converted, run_with_timeout, sweep, write_results  # noqa: E402  (beside this file)

VOCAB, TOKENS, TILE = 128, 12, 16
TINY = dict(vocab_size=VOCAB, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, max_seq_len=64, intermediate_dim=128)
DECODER = TINY
GEMMA = {**TINY, "head_dim": 16}
CLIP_VISION = dict(tile_size=TILE, patch_size=8, embed_dim=32, num_layers=2, num_heads=2, cls_output_dim=32, max_num_tiles=1)


def tokens() -> dict:
    return {"tokens": torch.randint(0, VOCAB, (2, TOKENS), generator=torch.Generator().manual_seed(0))}


def images(*lead: int) -> torch.Tensor:
    return torch.randn(*lead, 3, TILE, TILE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def vision_decoder_with_image() -> dict:  # the fusion layers' cross-attention runs on an encoder output
    encoder = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return {**tokens(), "encoder_input": encoder, "encoder_mask": torch.ones(2, TOKENS, 5, dtype=torch.bool)}


VISION_DECODER = dict(vocab_size=VOCAB, num_layers=4, fusion_interval=2, num_special_tokens=2, num_heads=4, num_kv_heads=2,
                      embed_dim=64, max_seq_len=64, encoder_max_seq_len=5, intermediate_dim=128)
# row id -> (family, builder, arguments, inputs)
BUILDERS = {
    "llama2": ("llama2", "llama2", DECODER, tokens),
    "llama3": ("llama3", "llama3", DECODER, tokens),
    "llama3_1": ("llama3_1", "llama3_1", DECODER, tokens),
    "llama3_2": ("llama3_2", "llama3_2", DECODER, tokens),
    "mistral": ("mistral", "mistral", DECODER, tokens),
    "gemma": ("gemma", "gemma", GEMMA, tokens),
    "gemma2": ("gemma2", "gemma2", {**GEMMA, "sliding_window_size": 8}, tokens),
    "phi3": ("phi3", "phi3", DECODER, tokens),
    "qwen2": ("qwen2", "qwen2", DECODER, tokens),
    "llama2_classifier": ("llama2", "llama2_classifier", {**DECODER, "num_classes": 3}, tokens),
    "mistral_classifier": ("mistral", "mistral_classifier", {**DECODER, "num_classes": 3}, tokens),
    "clip_text_encoder": ("clip", "clip_text_encoder", dict(embed_dim=64, num_heads=4, num_layers=2, vocab_size=VOCAB,
                                                            max_seq_len=TOKENS), tokens),
    "clip_vision_encoder": ("clip", "clip_vision_encoder", CLIP_VISION, lambda: {"images": images(2, 1, 1)}),
    "t5_encoder": ("t5", "t5_encoder", dict(embed_dim=64, mlp_dim=128, num_heads=4, head_dim=16, num_layers=2,
                                            rel_pos_num_buckets=8, rel_pos_max_dist=16, vocab_size=VOCAB, norm_eps=1e-6,
                                            max_seq_len=TOKENS), tokens),
    "llama3_2_vision_encoder": ("llama3_2_vision", "llama3_2_vision_encoder", dict(
        patch_size=8, num_heads=2, clip_embed_dim=32, clip_num_layers=2, clip_hidden_states=[0], num_layers_projection=1,
        decoder_embed_dim=64, tile_size=TILE, max_num_tiles=1), lambda: {"images": images(2, 1, 1),
                                                                         "aspect_ratio": torch.ones(2, 1, 2, dtype=torch.long)}),
    "llama3_2_vision_decoder": ("llama3_2_vision", "llama3_2_vision_decoder", VISION_DECODER, tokens),
    "llama3_2_vision_decoder+image": ("llama3_2_vision", "llama3_2_vision_decoder", VISION_DECODER, vision_decoder_with_image),
}
UNINITIALISED = ("position_embedding",)  # torch.empty in the builder, any value at all: CLIPTextEncoder's
NOT_MODELS = re.compile(r"(_mlp|_projection_head)$|^lora_")


def unlisted() -> list[str]:
    """Public builders of this torchtune that ``BUILDERS`` has no row for (a newer version's)."""
    listed = {(family, builder) for family, builder, _, _ in BUILDERS.values()}
    found = []
    for info in pkgutil.iter_modules(torchtune.models.__path__):
        try:
            module = importlib.import_module(f"torchtune.models.{info.name}._component_builders")
        except ImportError:
            continue
        found += [f"{info.name}.{n}" for n, f in vars(module).items() if inspect.isfunction(f) and f.__module__ == module.__name__
                  and not n.startswith("_") and not NOT_MODELS.search(n) and (info.name, n) not in listed]
    return found


def sweep_one(row_id: str) -> dict:
    family, builder, kwargs, make_inputs = BUILDERS[row_id]
    row = {"builder": row_id, "outcome": None, "rel_err": None, "reason": ""}
    try:
        build = getattr(importlib.import_module(f"torchtune.models.{family}._component_builders"), builder)
        torch.manual_seed(0)
        original = build(**kwargs).double().eval()
        drawn = [n for n, p in original.named_parameters() if n in UNINITIALISED or not p.isfinite().all()]
        with torch.no_grad():  # a checkpoint would fill them
            for name in drawn:
                torch.nn.init.normal_(original.get_parameter(name), std=0.02)
        row["drawn"] = drawn
        inputs = make_inputs()
        with torch.no_grad():
            original(**inputs)
        model = copy.deepcopy(original)
    except Exception as exc:  # noqa: BLE001
        return {**row, "outcome": "build failed", "reason": first_line(exc)}
    return check_converted(row, original, model, lambda m, **o: rr.convert_(m, example_inputs=inputs, **o), inputs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", help="only builders matching this (a regular expression, case-insensitive)")
    p.add_argument("--timeout", type=int, default=120, help="seconds per builder, build included (default 120)")
    p.add_argument("--out", type=Path, help="the JSON file (default: benchmarks/results/torchtune-sweep-...json)")
    args = p.parse_args(argv)
    logging.getLogger("torch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    todo = [(b,) for b in BUILDERS if not args.only or re.search(args.only, b, re.IGNORECASE)]
    t0 = time.perf_counter()
    rows = sweep(todo, lambda b: run_with_timeout(args.timeout, {"builder": b}, sweep_one, b), {"builder": 32, "outcome": 15}, 170)
    rows += [{"builder": name, "outcome": "not in this sweep", "rel_err": None, "reason": "a builder with no row in BUILDERS"}
             for name in unlisted() if not args.only or re.search(args.only, name, re.IGNORECASE)]
    wall = round(time.perf_counter() - t0, 1)
    name = f"torchtune-sweep-torchtune{torchtune.__version__}-{{date}}" + ("-partial" if args.only else "")
    return write_results(rows, args.out, name, f"builders in {wall:.0f} s", torchtune,
                         omp_num_threads=os.environ.get("OMP_NUM_THREADS"), only=args.only, timeout_s=args.timeout, wall_s=wall)


if __name__ == "__main__":
    sys.exit(main())
