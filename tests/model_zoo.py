"""Small random-weight models and helpers shared by the tests (nothing is downloaded)."""
from __future__ import annotations

import warnings

import pytest
import torch

from residual_rewriter.models import GPT, GPTConfig

# the KV-cache argument of a model's forward: ``cache`` since transformers 5.24 (``past_key_values``,
# deprecated there, before)
CACHE_ARGUMENT_NAMES = ("cache", "past_key_values")

SMALL_DECODER = dict(
    vocab_size=128, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2
)


def make_hf(name: str):
    """A small random-weight Hugging Face model by architecture name, in eval mode."""
    transformers = pytest.importorskip("transformers")
    warnings.filterwarnings("ignore", message=".*token_id.*")
    if name == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL_DECODER))
    elif name == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**SMALL_DECODER))
    elif name == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SMALL_DECODER))
    elif name == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=128, n_embd=48, n_layer=3, n_head=4, bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(cfg)
    elif name == "vit":
        cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=80)
        model = transformers.ViTForImageClassification(cfg)
    elif name == "gemma4":  # E2B/E4B-like, 4 layers, 12 sublayers: each third reads the stream itself, no norm (its
        # per-layer input); each layer returns its stream times its layer_scalar (set here: ones at init); the model
        # hands the last two layers (which share the first two's keys and values) a token slice of the stream
        cfg = transformers.AutoConfig.for_model(
            "gemma4_text", **{**SMALL_DECODER, "num_hidden_layers": 4}, head_dim=12, hidden_size_per_layer_input=8,
            vocab_size_per_layer_input=128, layer_types=["sliding_attention", "full_attention"] * 2, num_kv_shared_layers=2)
        model = transformers.AutoModelForCausalLM.from_config(cfg)
        for i, layer in enumerate(model.model.layers):
            layer.layer_scalar.fill_(0.7 + 0.6 * i)
    elif name == "bert":
        cfg = transformers.BertConfig(vocab_size=128, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=80)
        model = transformers.BertModel(cfg)
    else:
        raise KeyError(name)
    return model.eval()


# Every Hugging Face architecture the README says converts, at a tiny random-weight size:
# name -> (extra config options, dtype). Mixtral / Qwen2-MoE run in fp32 (grouped_mm has no fp64).
_TINY_DECODER = dict(vocab_size=128, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4)
_TINY_VISION = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
_GQA, _HEAD12, _PAD0 = dict(num_key_value_heads=2), dict(head_dim=12, num_key_value_heads=2), dict(pad_token_id=0, bos_token_id=0, eos_token_id=0)
DECODERS = {
    "llama": _GQA, "mistral": _GQA, "qwen2": _GQA, "qwen3": _HEAD12, "gemma": _HEAD12, "gemma2": _HEAD12,
    "gemma3_text": _HEAD12, "phi": {}, "phi3": {**_GQA, **_PAD0}, "olmo": _GQA, "mixtral": _GQA, "qwen2_moe": _GQA,
    "gpt_neox": {}, "gptj": dict(rotary_dim=12), "codegen": dict(rotary_dim=12), "falcon": {},
    "stablelm": dict(_GQA, partial_rotary_factor=0.5), "starcoder2": {}, "granite": _GQA, "smollm3": {**_GQA, **_PAD0},
    "glm": {**_GQA, **_PAD0}, "gpt_bigcode": {}, "cohere": {}, "gpt2": {}, "opt": {},
    "bloom": {},  # its attention and MLP add the residual themselves: passes/detect.py (split_residual_children)
    # `residual.to(float32) + mixer(norm(x))`: a cast that keeps the values (float32: a no-op) is looked
    # through; in float64 it rounds the stream, so these run without it
    "mamba": dict(residual_in_fp32=False, state_size=8), "falcon_mamba": dict(residual_in_fp32=False, state_size=8),
    "rwkv": dict(attention_hidden_size=48),  # its stream starts inside the first layer, at pre_ln
    "modernbert-decoder": {**_PAD0, "cls_token_id": 0, "sep_token_id": 0},  # layer 0's attention has no norm
    "megatron-bert": dict(is_decoder=True),  # its attention child adds its residual, the layer adds the MLP's
    # each layer returns its stream times `layer_scalar` (set to trained-like values below); 26B-A4B / 31B-like:
    # no per-layer inputs
    "gemma4_text": dict(_HEAD12, hidden_size_per_layer_input=0),
}
VISION = ["vit", "deit", "dinov2", "clip_vision_model", "siglip_vision_model", "data2vec-vision"]  # Data2Vec: BEiT-style
T5_LIKE = {"t5": ("T5Config", "T5ForConditionalGeneration"), "umt5": ("UMT5Config", "UMT5ForConditionalGeneration"),
           "longt5": ("LongT5Config", "LongT5ForConditionalGeneration")}
# encoder-decoders whose encoder and decoder stacks sit under one module (model.encoder, model.decoder)
ENCODER_DECODERS = ["mbart", "pegasus", "m2m_100", "blenderbot", "bigbird_pegasus"]
_TINY_SEQ2SEQ = dict(vocab_size=128, d_model=48, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=80, decoder_ffn_dim=80, max_position_embeddings=64,
                     pad_token_id=1, decoder_start_token_id=2)
FP32_ONLY = {"mixtral", "qwen2_moe"}


def make_architecture(name: str):
    """A tiny random-weight model of one of ``DECODERS`` / ``VISION`` / ``ENCODER_DECODERS`` (or T5, MPT), in
    eval mode, in float64 unless it is in ``FP32_ONLY``."""
    transformers = pytest.importorskip("transformers")
    warnings.filterwarnings("ignore", message=".*token_id.*")
    if name in T5_LIKE:  # the sublayers are the holders (T5LayerSelfAttention, T5LayerFF, ...)
        config_class, model_class = T5_LIKE[name]
        cfg = getattr(transformers, config_class)(vocab_size=128, d_model=48, d_ff=80, num_layers=2, num_heads=4, d_kv=12,
                                                  decoder_start_token_id=0)
        model = getattr(transformers, model_class)(cfg)
    elif name == "mpt":  # its blocks' adds convert with the model as the one holder
        cfg = transformers.MptConfig(vocab_size=128, d_model=48, n_heads=4, n_layers=2, max_seq_len=32)
        model = transformers.MptForCausalLM(cfg)
    elif name in VISION:
        model = transformers.AutoModel.from_config(transformers.AutoConfig.for_model(name, **_TINY_VISION))
    elif name in ENCODER_DECODERS:
        extra = dict(attention_type="original_full") if name == "bigbird_pegasus" else {}
        cfg = transformers.AutoConfig.for_model(name, **_TINY_SEQ2SEQ, **extra)
        model = transformers.AutoModelForSeq2SeqLM.from_config(cfg)
    else:
        cfg = transformers.AutoConfig.for_model(name, **_TINY_DECODER, **DECODERS[name])
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    if name == "gemma4_text":  # ones at init; a checkpoint's are not (a scale applied to the sum would then show)
        for i, layer in enumerate(model.model.layers):
            layer.layer_scalar.fill_(0.7 + 0.6 * i)
    return model.to(torch.float32 if name in FP32_ONLY else torch.float64).eval()


def make_gpt(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**overrides)).eval()


def logits_of(out):
    return out if isinstance(out, torch.Tensor) else out.logits


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def perturb_attn_res(converted, seed: int = 0, scale: float = 1.0) -> None:
    """Random queries and gains, so the mixture is far from uniform (it is really AttnRes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in converted.named_parameters():
            if ".attn_res." not in f".{name}":
                continue
            if name.endswith(".query"):
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * scale)
            elif name.endswith(".key_norm_weight"):
                p.copy_(1 + 0.5 * torch.rand(p.shape, generator=g, dtype=torch.float64))


def aggregations(converted) -> list[tuple[str, "torch.fx.Node"]]:
    """``(holder path, node)`` of every aggregation in the converted model's rewritten graphs."""
    from residual_rewriter.passes.layerwise import installed_forwards
    from residual_rewriter.passes.op_names import is_attn_res

    return [(path, n) for path, f in installed_forwards(converted) for n in f.graph_module.graph.nodes if is_attn_res(n)]


def query_of(path: str, node) -> str:
    """The model-level name of the query parameter an aggregation node reads."""
    return ".".join(p for p in (path, node.args[1].target) if p)


def assert_live(converted, inputs: tuple, want: torch.Tensor, label: str = "") -> None:
    """A converted model is really AttnRes: one query per aggregation, perturbed queries move the
    output (``want``: the original's output on ``inputs``), every new parameter gets a gradient."""
    queries = sorted(query_of(path, node) for path, node in aggregations(converted))
    assert queries == sorted(set(queries)), f"{label}: a query read by two aggregations"
    new = {n: p for n, p in converted.named_parameters() if ".attn_res." in f".{n}"}
    assert queries == sorted(n for n in new if n.endswith(".query")), f"{label}: unused queries"
    perturb_attn_res(converted, seed=1)
    out = converted(*inputs)
    assert rel_err(out.detach(), want) > 1e-6, f"{label}: perturbed queries do not move the output"
    out.square().mean().backward()
    dead = [n for n, p in new.items() if p.grad is None or not p.grad.any()]
    assert not dead, f"{label}: no gradient for {dead}"


def live_dropout(model: torch.nn.Module, p: float = 0.25) -> None:
    """Dropout and LayerDrop on (tiny configs leave many at 0): every ``nn.Dropout``, and every float
    attribute named ``*dropout*`` or ``layerdrop`` that a forward passes to F.dropout or compares with."""
    for module in model.modules():
        for name, value in vars(module).items():
            if isinstance(value, float) and ("dropout" in name or name == "layerdrop" or name == "p"):
                setattr(module, name, 0.5 if name == "layerdrop" else p)


def assert_same_training_step(original, converted, run, label: str = "", seed: int = 3, tolerance: float = 1e-10) -> None:
    """In training mode with the same random draws, ``run(model)`` (the first floating output) and the gradient
    of every original parameter of a loss on it are the original's at init: exactness of the output alone
    cannot see a parameter the conversion took out of the computation where it is the identity at init (a
    learned residual scale of ones). Compared by ``compare_steps`` (output to ``tolerance``, gradients to 100x)."""
    results = []
    for net in (original, converted):
        net.train()
        net.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        out = run(net)
        out.double().square().mean().backward()
        results.append((out.detach(), {n: p.grad for n, p in net.named_parameters() if p.grad is not None}))
    _, why = compare_steps(*results[0], *results[1], tolerance=(tolerance, tolerance * 100))
    assert why is None, f"{label}: not the original's training step at init: {why}"


GRAD_FLOOR = 1e-6  # see compare_steps


def compare_steps(want, grads: dict, got, new_grads: dict, tolerance=None) -> tuple[dict, str | None]:
    """(errors, None where the output ``got`` and gradients ``new_grads`` match ``want`` and ``grads``, else why
    not). Tolerances (output, gradients): by default 1e-9 and 1e-8 in float64, 1e-4 and 1e-3 in float32.

    The output by relative error of the norm. The gradients per parameter p: |g'_p - g_p| / max(|g_p|, GRAD_FLOOR
    * |g|) (norms; |g| every parameter's gradient as one vector). A gradient that is analytically zero (a bias
    before a softmax or a norm: 1e-17 against ~1, rounding noise in both models, its plain relative error O(1))
    is thus compared at the model's scale: differences under 1e-14 of |g| (float64) are rounding. A parameter
    whose gradient is at least 1e-6 of |g| is compared to its own size; a smaller one is still flagged when
    wrong by more than 1e-14 of |g|. A parameter with a gradient in ``grads`` and none in ``new_grads`` fails,
    as does a NaN. The errors also hold the plain worst relative error (``grad_rel_err_plain``, no floor)."""
    tolerance = tolerance or ((1e-9, 1e-8) if want.dtype == torch.float64 else (1e-4, 1e-3))
    out_err = _rel_norm(got, want) if got.shape == want.shape else float("inf")
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
        return check, None
    return check, f"no gradient for {missing[:3]}" if missing else f"output {out_err:.1e}, gradient of {name} {worst:.1e}"


def _rel_norm(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-300)).item()