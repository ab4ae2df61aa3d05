"""Run ``residual_rewriter.convert_`` over every Hugging Face model class that builds tiny.

Classes come from four of transformers' auto mappings (``transformers.models.auto.modeling_auto``):
MODEL_FOR_CAUSAL_LM, MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM, MODEL_FOR_MASKED_LM and
MODEL_FOR_IMAGE_CLASSIFICATION (``*_MAPPING_NAMES``), deduplicated by class (331 entries, 318 classes
in 5.25). They are the task heads whose main input is ``input_ids`` or ``pixel_values``, which
``convert_`` derives example inputs for, one class per architecture and task; the base MODEL_MAPPING
would repeat every architecture without its head. ``--mappings`` picks others.

Each class gets a tiny config: ``AutoConfig.for_model(model_type)`` (the class's own model type)
rebuilt with the common size fields it has shrunk (2 layers, width 32, 2 heads, vocab 256, 32x32
images, ...) by general rules that keep it consistent (``tiny_overrides``: derived sizes follow, per-layer
lists are recomputed for the new depth, validators are satisfied), sub-configs (``text_config``, ...)
likewise, then a few per-type OVERRIDES where no rule exists (each with its reason; several mend a
default config that cannot run at any size). Nothing is downloaded. The model is built with
``_from_config`` (random weights, seed 0), in eval mode, in float64 when it runs there, else float32; a model
that keeps its residual in float32 (``config.residual_in_fp32``: Mamba, Mamba2, FalconMamba) in float32 as its
users run it (in float64 that cast rounds the stream before each add: refused, and the refusal says so).

Example inputs: ``convert_`` derives them itself (``residual_rewriter.hf.example_inputs``: ``input_ids``,
or ``pixel_values`` of the config's image size, or its vision sub-config's). Where it cannot, the sweep
passes them like a user would (``convert_(model, example_inputs={...})``, ``user_inputs``; the row's
``inputs`` says "passed"): a 2x3x64x64 image for the conv nets whose config has no image size at all
(ResNet, RegNet, BiT, CvT, PoolFormer, SegFormer, HGNetV2, PP-LCNet), Siglip2's patch sequences, and
Perceiver's generic ``inputs`` (token ids, or an image).

    python benchmarks/convert/sweep_hf.py                      # all (~20 min on 2 CPU cores)
    python benchmarks/convert/sweep_hf.py --only Llama --limit 5 --timeout 30 --out /tmp/s.json
    python benchmarks/convert/sweep_hf.py --only '^(Llama|T5|ViT)For'    # --only is a regex

Outcomes:
    exact              converted, and the converted model's first floating output equals the original's
                       (a deep copy taken before conversion; same inputs, eval, no grad); rel err shown. Then
                       in training mode with the same random draws (dropout), that output and the gradient of
                       every parameter of a loss on it equal the original's too (``training_check``); and
                       again with Hugging Face's gradient checkpointing on both, reentrant and not, where the
                       class supports it (``checkpointing_check``; a reentrant checkpoint around a converted
                       layer, T5's, is refused at its first forward: recorded, not a bug)
    oracle mismatch    exact, but with non-zero queries (a second conversion, num_blocks=3, its queries drawn at
                       random) a norm does not read what the independent oracle (tests/attnres_oracle.py) says, or
                       the training graphs (no randomness on) compute other than eval's, or two calls the original
                       computes alike do not agree (``hf_pairs``: a right-padded batch and the unpadded one; a
                       cached decode step and the full forward) (``sweep_common.oracle_check``; the row's ``oracle`` says
                       what was checked, and what was skipped and why): a bug
    export failed      exact, and the original exports, but ``torch.export`` of a freshly converted copy (no
                       eager call first) fails, traces a layer again, or computes other than the original's exported
                       program (``export_check``): a bug
    mismatch           converted, but the outputs differ (rel err > 1e-9 in float64, 1e-4 in float32): a bug
    train mismatch     exact in eval, but not in training (output > 1e-9 / gradient > 1e-8 in float64; 1e-4 /
                       1e-3 in float32; each gradient relative to its own size, with a floor at the whole
                       model's gradient scale for near-zero ones: ``sweep_common.training_check``), or a
                       parameter without its gradient: a bug, silently wrong in training
    refused            ``ConversionError``: its first line shown, the full reason in the JSON
    crash              any other exception from ``convert_`` or the converted model (in eval or training): a bug;
                       the row shows the innermost residual_rewriter frame, the JSON also the traceback
    timeout            the class took more than --timeout seconds (default 120)
    build failed       the tiny model cannot be built, or fails on its example inputs (first line of the error)
    no example inputs  ``convert_`` cannot derive inputs for its main input, nor the sweep (nothing was converted)

The conversion, the checks and the output are shared with ``sweep_timm.py`` (``sweep_common.py``).
Prints one row per class as it finishes, then the count per outcome, and writes
benchmarks/results/hf-sweep-transformers<version>-<date>.json (``-partial`` with --only/--limit).
Exits 1 when a row is a crash, a mismatch, a train mismatch, an oracle mismatch or an export failure.
"""
from __future__ import annotations

import argparse
import copy
import inspect
import json
import logging
import os
import re
import sys
import warnings
from pathlib import Path
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers.models.auto import modeling_auto  # noqa: E402

import residual_rewriter as rr  # noqa: E402
from residual_rewriter import hf  # noqa: E402
from residual_rewriter.passes import layerwise  # noqa: E402
from residual_rewriter.passes.errors import first_line  # noqa: E402
from sweep_common import REPO, check_converted, first_float, rel_err, run_with_timeout, sweep, training_check, write_results  # noqa: E402  (beside this file)

sys.path.insert(0, str(REPO / "tests"))
from model_zoo import live_dropout  # noqa: E402  (the suite's: dropout and LayerDrop on)
MAPPINGS = ["MODEL_FOR_CAUSAL_LM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM", "MODEL_FOR_MASKED_LM", "MODEL_FOR_IMAGE_CLASSIFICATION"]

# size fields set where a config's __init__ takes them: an int default shrinks to min(default, size) (a
# size never grows: Zaya allows one expert per token, MobileViTV2's patches are 2 pixels); a None default
# is set only for the REQUIRED ones (None there is "derive it", which some models never do); lists are
# handled in tiny_overrides
SIZES = {
    "hidden_size": 32, "d_model": 32, "n_embd": 32, "embed_dim": 32, "embedding_size": 32, "dim": 32,
    "hidden_size_global": 32, "encoder_hash_byte_group_vocab": 256,  # BLT: its global model's width; a hash vocab
    "intermediate_size": 64, "d_ff": 64, "n_inner": 64, "ffn_dim": 64, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
    "num_hidden_layers": 2, "num_layers": 2, "n_layer": 2, "n_layers": 2, "encoder_layers": 2, "decoder_layers": 2,
    "num_decoder_layers": 2,
    "num_attention_heads": 2, "n_head": 2, "n_heads": 2, "num_heads": 2, "encoder_attention_heads": 2,
    "decoder_attention_heads": 2, "num_self_attention_heads": 2, "num_cross_attention_heads": 1,
    "head_dim": 16, "d_kv": 16, "rotary_dim": 8,
    "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "index_n_heads": 1, "index_num_heads": 1, "index_head_dim": 16,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2,
    "n_shared_experts": 1, "n_group": 1, "topk_group": 1, "num_expert_group": 1, "n_groups": 1, "mamba_n_groups": 1,
    "vocab_size": 256, "vocab_size_per_layer_input": 256, "image_size": 32, "patch_size": 4, "num_codebooks": 2, "d_latents": 32, "num_latents": 8,
}
# set even where the default is None: the model reads them as sizes (Ministral/HunYuan head_dim, ESM
# vocab_size, DeepseekV2 num_experts_per_tok, Dots1 n_routed_experts and n_shared_experts)
REQUIRED = ("head_dim", "vocab_size", "num_experts_per_tok", "n_routed_experts", "n_shared_experts")
HEADS = ("num_attention_heads", "n_head", "n_heads", "num_heads")
DEPTHS = ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "encoder_layers", "decoder_layers", "num_decoder_layers")
TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "sep_token_id", "cls_token_id")

# Per model type, where no general rule exists; each says why. Applied over the general rules (a dict, a
# sub-config, updates theirs). Several fix a default config that cannot run at any size.
OVERRIDES = {
    # attention_types is nested ([[kinds, repeats]]) and must expand to exactly num_layers entries
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},
    # the axial position embedding's dims must sum to hidden_size (32)
    "reformer": {"axial_pos_embds_dim": [16, 16]},
    # the modeling reads attn_config.rope_theta, which DbrxAttentionConfig does not define, and clamps q/k/v
    # by clip_qkv even when it is None (the default fails on both)
    "dbrx": {"attn_config": {"rope_theta": 10000.0, "clip_qkv": 8.0}},
    # rope_parameters are per layer type, and the default ({}) has none (default fails with KeyError)
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
    # layer_types is None by default and never derived, yet read per layer (default fails)
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    # the config rounds the q/k and v widths up to multiples of 64 (its cache), the layers use
    # hidden_size * factor exactly: they agree only for a multiple of 128; embedding_dim mirrors it
    "xlstm": {"hidden_size": 128, "embedding_dim": 128},
    # the stem always downsamples by 16, and the attention biases assume image_size / patch_size
    "levit": {"patch_size": 16},
    # position ids come from the padding index, which the default leaves None (default fails)
    "esm": {"pad_token_id": 1},
    # Mamba layers only by default (attn_layer_indices None / layer_types all "linear_attention"): the
    # causal mask needs at least one attention layer, so the default fails
    "bamba": {"attn_layer_indices": [1]},
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"]},
    # the QSA indexer's fields are all None by default, yet every attention layer reads them (default fails)
    "qwen4_exp_text": {"indexer_n_heads": 1, "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 8,
                       "indexer_compress_ratio": 4},
    # the hybrid layers share one transformer whose weights are tied across them: it needs two of them
    "zamba": {"layers_block_type": ["linear_attention", "hybrid", "hybrid"], "num_hidden_layers": 3},
    # with use_cache (the default) its forward builds a cache from a config without num_hidden_layers
    # (transformers: "'BltConfig' object has no attribute 'num_hidden_layers'"; the default fails)
    "blt": {"use_cache": False},
    # the modeling reads yes/no token indices that are not config fields (10784 and 3771 by default), out of
    # the tiny vocabulary
    "shieldgemma2": {"yes_token_index": 1, "no_token_index": 2},
    # five stages downsample by 32, then the last one unfolds 2x2 patches: 64 pixels at least
    "mobilevitv2": {"image_size": 64},
    # its to_dict serializes each layer as two blocks (attention, "mlp") and doubles num_hidden_layers:
    # the layout rule would read "mlp" as a layer kind; it derives its own layer types for 2 layers
    "dory": {"layer_types": None, "num_hidden_layers": 2},
    # the two-call differential attention splits the values along KV heads: needs an even number >= 2
    "diffllama": {"num_key_value_heads": 2},
}
# per class: the class itself asserts it
CLASS_OVERRIDES = {"ReformerModelWithLMHead": {"is_decoder": True}}


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
    """Keyword arguments that rebuild ``config`` small, by general rules that keep it consistent:
    - the SIZES fields its ``__init__`` takes, never larger than the default (derived ones, such as
      Swin's hidden_size, follow; windowed models keep their image size);
    - key/value heads: a default of None or equal to the heads (multi-head attention: ESMC, Dots3 accept
      nothing else) stays equal to the heads, any other (grouped) becomes 1;
    - Mamba-2 widths: heads * head_dim == expand * hidden_size (Mamba2, Bamba, GraniteMoeHybrid);
    - per-layer lists (one entry per layer of the default depth, or a repeating pattern of layer kinds:
      Qwen3-Next's ``layer_types``, RecurrentGemma's ``block_types``, Zamba's ``layers_block_type``) become
      their distinct kinds in order, and the depth grows to hold each kind once (a tiny hybrid keeps its
      attention layers); per-layer sizes become the tiny size; layer periods become 2 (offset mod 2);
      layers sharing a KV cache are the second half (Gemma3n);
    - list depths -> 1, list heads -> powers of two; token ids inside the vocabulary (other special
      tokens out of it take distinct ids from its top); ``default_language`` the first of ``languages``;
    - sub-configs (``text_config``, ...) likewise, as dicts of their arguments less per-layer lists."""
    values = init_args(config)
    out = {}
    for key, size in SIZES.items():
        if type(values.get(key)) is int:
            out[key] = min(values[key], size)
        elif key in REQUIRED and key in values and values[key] is None:
            out[key] = size
    if "window_size" in values:  # Swin-like: the windows must fit every stage at the full image size
        out = {k: v for k, v in out.items() if k not in ("image_size", "patch_size")}
    heads = next((k for k in HEADS if type(values.get(k)) is int), None)
    kv = values.get("num_key_value_heads")
    if heads and "num_key_value_heads" in values and kv in (None, values[heads]):
        out["num_key_value_heads"] = out[heads]
    elif type(kv) is int:
        out["num_key_value_heads"] = 1
    if "qk_rope_head_dim" in out and values.get("head_dim") == values["qk_rope_head_dim"]:
        out["head_dim"] = out["qk_rope_head_dim"]  # LongCat: head_dim is the rope width of its MLA
    hidden = out.get("hidden_size")
    if hidden and type(values.get("expand")) is int and "num_heads" in out and "head_dim" in values:
        out["head_dim"] = values["expand"] * hidden // out["num_heads"]
    if hidden and type(values.get("mamba_expand")) is int and "mamba_n_heads" in values:
        out["mamba_n_heads"] = 2
        if type(values.get("mamba_d_ssm")) is int:  # FalconH1: the Mamba width, when set, else expand * hidden
            out["mamba_d_ssm"] = values["mamba_expand"] * hidden
        if type(values.get("mamba_d_head")) is int:
            out["mamba_d_head"] = values["mamba_expand"] * hidden // 2
    if isinstance(values.get("depths"), list):
        out["depths"] = [1] * len(values["depths"])
    for key in ("num_heads", "num_attention_heads"):
        if isinstance(values.get(key), list):
            out[key] = [min(2**i, h) for i, h in enumerate(values[key])]
    # per-layer lists and patterns of layer kinds
    old_depths = {values[k] for k in DEPTHS if type(values.get(k)) is int}
    kinds = {}
    for key, v in values.items():
        if key in out or not isinstance(v, (list, tuple)) or not v:
            continue
        per_layer = len(v) in old_depths and len(v) > 4  # stage lists (hidden_sizes, ...) are short
        pattern = all(isinstance(x, str) for x in v) and 1 < len(set(v)) < len(v)
        if per_layer and key not in SIZES and all(type(x) is int for x in v):
            continue  # per-layer indices (Kolibri's kv_source_layers): the config derives them again
        if per_layer or pattern:
            kinds[key] = [SIZES[key]] if key in SIZES else list(dict.fromkeys(map(_frozen, v)))
    depth = max([2] + [len(k) for k in kinds.values()])
    if type(values.get("num_kv_shared_layers")) is int and values["num_kv_shared_layers"] > 0:
        depth *= 2  # the second half reads the caches of the first, which must hold every kind
        out["num_kv_shared_layers"] = depth // 2
    for key, ks in kinds.items():
        out[key] = [_thawed(ks[i % len(ks)]) for i in range(depth)]
    if kinds:
        out.update({k: depth for k in DEPTHS if k in out})
    for key, v in values.items():
        offset = key.removesuffix("_period") + "_offset"
        if key.endswith("_period") and type(v) is int and type(values.get(offset)) is int:
            out[key], out[offset] = 2, values[offset] % 2
    # the vocabulary the ids index: this config's, or its text sub-config's (ShieldGemma2's yes/no tokens)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = out.get("vocab_size") or (SIZES["vocab_size"] if type(getattr(text, "vocab_size", None)) is int else None)
    if vocab:
        for key in TOKEN_IDS:
            if isinstance(values.get(key), int):
                out[key] = min(values[key], vocab - 1)
        specials = [k for k, v in values.items() if k.endswith(("_token_id", "_token_index")) and k not in TOKEN_IDS
                    and type(v) is int]
        taken = {values[k] for k in specials if values[k] < vocab} | {vocab - 1}
        free = (i for i in range(vocab - 1, -1, -1) if i not in taken)
        out.update({k: next(free) for k in specials if values[k] >= vocab})
    if values.get("default_language") is None and values.get("languages"):  # X-MOD: else it refuses to run
        out["default_language"] = list(values["languages"])[0]
    for key, sub in vars(config).items():
        if isinstance(sub, transformers.PreTrainedConfig):
            kept = init_args(sub)
            depths = {v for k, v in kept.items() if k in DEPTHS}
            kept = {k: v for k, v in kept.items() if not (isinstance(v, list) and len(v) in depths)}
            out[key] = {"model_type": sub.model_type, **kept, **tiny_overrides(sub)}
    return out


def _frozen(x):
    return json.dumps(x) if isinstance(x, (list, dict)) else x


def _thawed(x):
    return json.loads(x) if isinstance(x, str) and x[:1] in "[{" else x


def with_overrides(kwargs: dict, extra: dict) -> dict:
    """``kwargs`` updated by ``extra``; a dict value (a sub-config) is updated, not replaced."""
    return {**kwargs, **{k: {**kwargs[k], **v} if isinstance(v, dict) and isinstance(kwargs.get(k), dict) else v
                         for k, v in extra.items()}}


def build(name: str, model_type: str, mapping: str = ""):
    """(model, its example call as kwargs or why there is none, whether ``convert_`` derives them): the
    tiny model in eval mode, float64 when it runs there, else float32 (one that runs in neither did not
    build). Where ``convert_`` cannot derive the inputs, the sweep passes them like a user would
    (``user_inputs``)."""
    cls = getattr(transformers, name)
    own = getattr(cls.config_class, "model_type", "")  # LlamaForCausalLM is also listed for "exaone"
    model_type = own if own in modeling_auto.CONFIG_MAPPING_NAMES else model_type
    extra = {**OVERRIDES.get(model_type, {}), **CLASS_OVERRIDES.get(name, {})}
    config = transformers.AutoConfig.for_model(model_type)
    config = transformers.AutoConfig.for_model(model_type, **with_overrides(tiny_overrides(config), extra))
    torch.manual_seed(0)
    model = cls._from_config(config).eval()
    derived = True
    try:  # the inputs convert_ derives (seeded: the same values), to run the original and the result on
        kwargs = hf.example_inputs(model)
    except TypeError as exc:
        kwargs, derived = user_inputs(model, mapping), False
        if kwargs is None:
            return model, first_line(exc).removeprefix("TypeError: "), False
    with torch.no_grad():
        try:
            if getattr(config, "residual_in_fp32", False):
                raise TypeError("the residual is kept in float32")
            model.to(torch.float64)(**cast(kwargs, torch.float64))
        except Exception:  # noqa: BLE001 - some op or buffer is float32-only, or the residual kept in float32
            model.to(torch.float32)(**cast(kwargs, torch.float32))
    return model, cast(kwargs, next(model.parameters()).dtype), derived


def user_inputs(model, mapping: str) -> dict | None:
    """The example inputs a user passes where ``convert_`` cannot derive them, or None:
    - an image classifier without an image size anywhere in its config (conv nets: ResNet, RegNet, BiT,
      CvT, PoolFormer, SegFormer, HGNetV2, PP-LCNet): a 2x3x64x64 image (its ``num_channels``);
    - Siglip2, whose images are patch sequences: ``pixel_values`` (2, patches, channels * patch ** 2),
      all patches valid, on a square grid;
    - Perceiver's generic ``inputs``: token ids (masked LM), or an image of its ``image_size``."""
    cfg, name = model.config, model.main_input_name
    g = torch.Generator().manual_seed(0)
    image = mapping == "MODEL_FOR_IMAGE_CLASSIFICATION"
    vision = getattr(cfg, "vision_config", None) or cfg
    if name == "pixel_values" and hasattr(vision, "num_patches"):
        n, side = vision.num_patches, int(vision.num_patches**0.5)
        return {"pixel_values": torch.randn(2, n, vision.num_channels * vision.patch_size**2, generator=g),
                "pixel_attention_mask": torch.ones(2, n, dtype=torch.long),
                "spatial_shapes": torch.tensor([[side, n // side]] * 2)}
    if image and name in ("pixel_values", "inputs"):
        size = getattr(cfg, "image_size", None) or 64
        return {name: torch.randn(2, getattr(cfg, "num_channels", None) or 3, size, size, generator=g)}
    if name == "inputs" and isinstance(getattr(cfg, "vocab_size", None), int):
        return {name: torch.randint(0, cfg.vocab_size, (2, 8), generator=g)}
    return None


def cast(kwargs: dict, dtype: torch.dtype) -> dict:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in kwargs.items()}


def sweep_one(name: str, model_type: str, mapping: str = "") -> dict:
    row = {"class": name, "model_type": model_type, "dtype": None, "outcome": None, "rel_err": None, "reason": "",
           "inputs": None}
    try:
        model, kwargs, derived = build(name, model_type, mapping)
        live_dropout(model)  # for the training check; eval is unchanged
        row.update(model_type=model.config.model_type, dtype=str(next(model.parameters()).dtype)[6:])
        original, fresh = copy.deepcopy(model), copy.deepcopy(model)
    except Exception as exc:  # noqa: BLE001
        return {**row, "outcome": "build failed", "reason": first_line(exc)}
    if isinstance(kwargs, str):
        return {**row, "outcome": "no example inputs", "dtype": None, "reason": kwargs}
    row["inputs"] = "derived" if derived else "passed"  # by convert_ itself, or by the sweep (user_inputs)
    def convert(m, **options):
        return rr.convert_(m, example_inputs=None if derived else kwargs, **options)

    row = check_converted(row, original, model, convert, kwargs, hf_pairs(original, kwargs))
    if row["outcome"] == "exact":
        row.update(export_check(fresh, convert, kwargs))
    if row["outcome"] == "exact" and getattr(original, "supports_gradient_checkpointing", False):
        row.update(checkpointing_check(original, model, lambda net: net(**kwargs)))
    return row


def export_check(original, convert, kwargs: dict) -> dict:
    """``torch.export`` of a freshly converted copy of ``original`` (no eager call first: ``verify=False``), any
    trace of a layer after conversion refused, computes what the original's exported program does (1e-9 in
    float64, 1e-4 in float32; the original's own program may differ from its eager forward: Qwen3.5's and
    OLMo-Hybrid's linear attention by ~1e-8). -> {"export": "exact" or why it was skipped}, or outcome
    "export failed" (a bug) where the original exports and the converted model does not."""
    if "use_cache" in inspect.signature(original.forward).parameters:
        kwargs = {**kwargs, "use_cache": False}  # an exported program cannot return a cache object
    try:
        reference = torch.export.export(original, (), kwargs)
    except Exception as exc:  # noqa: BLE001
        return {"export": f"skipped (the original does not export: {type(exc).__name__})"}
    model = copy.deepcopy(original)
    try:
        convert(model, verify=False)
        with mock.patch.object(layerwise, "retrace", side_effect=AssertionError("a layer was traced after conversion")):
            program = torch.export.export(model, (), kwargs)
        with torch.no_grad():
            want, got = first_float(reference.module()(**kwargs)), first_float(program.module()(**kwargs))
        err = rel_err(got, want)
    except Exception as exc:  # noqa: BLE001
        return {"outcome": "export failed", "reason": f"torch.export: {first_line(exc)}"}
    if not err <= (1e-9 if want.dtype == torch.float64 else 1e-4):
        return {"outcome": "export failed", "reason": f"the exported program is {err:.1e} off the original's"}
    return {"export": "exact"}


def hf_pairs(model, kwargs: dict) -> list:
    """For ``oracle_check``, where the call is ``input_ids`` alone: calls the original computes alike, each
    reaching the layers with another signature (another graph): a right-padded batch (the masked graphs) and
    the unpadded one agree on the real tokens; with a KV cache, one cached decode step after the others and
    the full forward agree on the last token."""
    ids = kwargs.get("input_ids")
    if set(kwargs) != {"input_ids"}:
        return []
    pairs, real = [], ids.shape[1] - 2
    if "attention_mask" in inspect.signature(model.forward).parameters:
        mask = torch.ones_like(ids)
        mask[:, real:] = 0

        def unpadded(net):
            return first_float(net(input_ids=ids[:, :real]))

        def padded(net):
            return first_float(net(input_ids=ids, attention_mask=mask))[:, :real]

        pairs.append(("a right-padded batch", unpadded, padded))
    if hasattr(model, "generate") and getattr(model.config, "use_cache", None) is not False:
        def full(net):
            return net(input_ids=ids).logits[:, -1]

        def cached(net):
            past = net(input_ids=ids[:, :-1], use_cache=True).past_key_values
            return net(input_ids=ids[:, -1:], past_key_values=past, use_cache=True).logits[:, -1]

        pairs.append(("a cached decode step", full, cached))
    return pairs


def checkpointing_check(original, model, run) -> dict:
    """``training_check`` with Hugging Face's gradient checkpointing on both models, non-reentrant then
    reentrant (the converted layers checkpoint in their own forward: ``LayerForward._checkpointing``)."""
    done = []
    for reentrant in (False, True):
        for net in (original, model):
            net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        check = training_check(original, model, run)
        if check["outcome"] == "crash" and check["error_type"] == "ConversionError":
            done.append(f"reentrant refused ({check['reason'][:80]})")
            continue
        if check["outcome"] != "exact":
            return {**check, "reason": f"checkpointed (use_reentrant={reentrant}): {check['reason']}"}
        done.append("reentrant" if reentrant else "non-reentrant")
    return {"checkpointing": ", ".join(done)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", help="only classes whose name contains this (a regular expression, case-insensitive)")
    p.add_argument("--limit", type=int, help="at most this many classes (after --only)")
    p.add_argument("--timeout", type=int, default=120, help="seconds per class (default 120)")
    p.add_argument("--out", type=Path, help="the JSON file (default: benchmarks/results/hf-sweep-...json)")
    p.add_argument("--mappings", nargs="+", default=MAPPINGS, help="auto mappings, without _MAPPING_NAMES")
    args = p.parse_args(argv)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    logging.getLogger("torch").setLevel(logging.ERROR)  # FX's is_fx_tracing notice
    warnings.filterwarnings("ignore")

    def one(name: str, model_type: str, mapping: str) -> dict:
        timeout = {"class": name, "model_type": model_type, "dtype": None}  # the row if it times out
        return {**run_with_timeout(args.timeout, timeout, sweep_one, name, model_type, mapping), "mapping": mapping}

    todo = [c for c in classes(args.mappings) if not args.only or re.search(args.only, c[0], re.IGNORECASE)]
    rows = sweep(todo[: args.limit], one, {"class": 44, "model_type": 22, "outcome": 17}, 160)
    partial = "-partial" if args.only or args.limit else ""
    name = f"hf-sweep-transformers{transformers.__version__}-{{date}}{partial}"
    return write_results(rows, args.out, name, "classes", transformers, mappings=args.mappings, only=args.only,
                         limit=args.limit, timeout_s=args.timeout)


if __name__ == "__main__":
    sys.exit(main())
