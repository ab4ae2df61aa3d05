"""Detection: every way of writing a pre-norm residual is found; what is not pre-norm is refused."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import residual_rewriter as rr
from model_zoo import assert_same_training_step, make_gpt, make_hf, perturb_attn_res, rel_err
from toy_models import (
    NORM_KINDS,
    ParallelLM,
    ParallelSharedInputLM,
    PlainMLP,
    PostNormLM,
    PostSublayerNormLM,
    ReadsMidStreamLM,
    ToyLM,
)


def test_gpt_sites_in_depth_order():
    report = rr.detect(make_gpt(), num_blocks=2)
    assert [(s.norm, s.sublayer) for s in report.sites] == [
        (f"transformer.h.{i}.{n}", f"transformer.h.{i}.{f}") for i in range(4) for n, f in (("ln_1", "attn"), ("ln_2", "mlp"))
    ]
    assert [s.block for s in report.sites] == [1, 1, 1, 1, 2, 2, 2, 2]
    (stream,) = report.streams
    assert stream.source == "transformer.drop" and stream.consumers == ["transformer.ln_f"]
    assert not report.converted
    text = str(report)
    assert "transformer.h.3.mlp" in text and "transformer.ln_f" in text
    assert "block 1: 4 sublayers, 1-2 sources; block 2: 4 sublayers, 2-3 sources" in text


def test_the_report_counts_in_words():
    text = str(rr.detect(make_gpt(n_layer=1), block_size=1))
    assert "block 1: 1 sublayer, 1 source; block 2: 1 sublayer, 2 sources" in text, text
    assert "GPT — 2 residual sublayers in 1 stream," in text and "(1 stream)," in text, text


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "gpt2"])
def test_hf_decoders_sites(name):
    model = make_hf(name)
    report = rr.detect(model)
    assert len(report.sites) == 6  # 3 layers x (attention, MLP)
    attn, mlp = report.sites[0].sublayer, report.sites[1].sublayer
    assert attn.endswith(("self_attn", "attn")) and mlp.endswith("mlp")
    assert report.streams[0].consumers[0].endswith(("model.norm", "ln_f"))
    assert report.left_out == []


@pytest.mark.parametrize("kind", NORM_KINDS)
def test_every_norm_form_is_found_and_exact(kind):
    torch.manual_seed(0)
    model = ToyLM(kind).double().eval()
    report = rr.detect(model)
    assert len(report.sites) == 4
    converted = rr.convert(model, num_blocks=2)
    x = model.example_inputs()[0]
    assert rel_err(converted(x), model(x)) <= 1e-10


def test_operand_order_and_branch_extras():
    torch.manual_seed(0)
    model = ToyLM("rmsnorm", swap_operands=True, extras=True).double().eval()
    report = rr.detect(model)
    assert [s.norm for s in report.sites] == [f"blocks.{i}.norm" for i in range(4)]
    # the second norm, the constant scale and dropout after the norm belong to the sublayer
    assert [s.sublayer for s in report.sites] == [f"blocks.{i}" for i in range(4)]
    converted = rr.convert(model, block_size=1)
    x = model.example_inputs()[0]
    assert rel_err(converted(x), model(x)) <= 1e-10


def test_post_norm_bert_is_refused_with_reason():
    with pytest.raises(rr.ConversionError, match="post-norm") as info:
        rr.convert(make_hf("bert"))
    assert "encoder.layer.0" in str(info.value)


def test_post_norm_toy_is_refused():
    with pytest.raises(rr.ConversionError, match="no pre-norm residual"):
        rr.detect(PostNormLM())


def test_parallel_branches_are_regrouped_into_one_site():
    """x + f(n1(x)) + g(n2(x)) (GPT-J style) is re-associated into x + (f + g): one site, two norms."""
    torch.manual_seed(0)
    model = ParallelLM().double().eval()
    report = rr.detect(model)
    assert [s.norm for s in report.sites] == [f"blocks.{i}.norm + n2.{i}" for i in range(2)]
    converted = rr.convert(model, block_size=1)
    x = model.example_inputs()[0]
    assert rel_err(converted(x), model(x)) <= 1e-10


def test_stream_read_mid_way_is_refused():
    with pytest.raises(rr.ConversionError, match="read by") as info:
        rr.convert(ReadsMidStreamLM())
    assert "blocks.1" in str(info.value)  # names where the stream is taken out


def test_nothing_to_convert():
    with pytest.raises(rr.ConversionError, match="nothing to convert"):
        rr.convert(PlainMLP(), torch.randn(2, 3, 8))
    assert issubclass(rr.ConversionError, ValueError)


def test_missing_example_inputs_is_a_clear_error():
    with pytest.raises(rr.ConversionError, match="example_inputs"):
        rr.convert(PlainMLP())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_blocks=2, block_size=2), "not both"),
        (dict(block_size=0), "block_size"),
        (dict(num_blocks=0), "num_blocks"),
        (dict(mixing="max"), "mixing"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        rr.convert(make_gpt(), **kwargs)


def test_parallel_block_read_through_two_norms_is_one_site():
    torch.manual_seed(0)
    model = ParallelSharedInputLM().double().eval()
    report = rr.detect(model)
    assert [s.norm for s in report.sites] == [f"n2.{i} + blocks.{i}.norm" for i in range(3)]
    converted = rr.convert(model, block_size=1)
    x = model.example_inputs()[0]
    assert rel_err(converted(x), model(x)) <= 1e-10


def test_post_sublayer_norm_is_refused():
    with pytest.raises(rr.ConversionError, match="not a normalization|no pre-norm"):
        rr.convert(PostSublayerNormLM())


@pytest.mark.parametrize("name", ["bert", "roberta"])
def test_hugging_face_post_norm_models_are_refused(name):
    """norm(x + f(x)): the x of each add is a norm's output, never a stream's, so the add is not taken for a
    sublayer reading the stream itself (OLMo-2's x + norm(f(x)) is: tests/test_oracle.py). (BLOOM, whose attention
    and MLP add the residual inside themselves, was refused here too: it converts since split_residual_children.)"""
    transformers = pytest.importorskip("transformers")
    kw = dict(vocab_size=128, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(name, **kw, is_decoder=True))
    match = r"(?s)no pre-norm residual site.*layer\.0\.attention\.output: the branch does not read x through a norm"
    with pytest.raises(rr.ConversionError, match=match):
        rr.convert(model)


def _seq2seq_decoder(name):
    """OPT / BART / mBART causal-LM decoders: their forward builds masks with ``torch.ones(b, t)``."""
    transformers = pytest.importorskip("transformers")
    if name == "opt":
        cfg = transformers.OPTConfig(vocab_size=128, hidden_size=48, num_hidden_layers=2, ffn_dim=80,
                                     num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=48)
        return transformers.OPTForCausalLM(cfg).eval()
    kw = dict(vocab_size=128, d_model=48, decoder_layers=2, encoder_layers=2, decoder_ffn_dim=80, encoder_ffn_dim=80,
              decoder_attention_heads=4, encoder_attention_heads=4, max_position_embeddings=64)
    cls = {"bart": (transformers.BartConfig, transformers.BartForCausalLM),
           "mbart": (transformers.MBartConfig, transformers.MBartForCausalLM)}[name]
    return cls[1](cls[0](**kw)).eval()


@pytest.mark.parametrize("name", ["mbart", "opt"])
def test_mbart_and_opt_decoders_convert_exactly(name):
    """Traced through since varargs factory sizes (``torch.ones(b, t)`` with traced sizes) are packed
    for FX; before, their decoders stayed opaque and nothing was found. OPT also runs its MLP on the
    stream flattened to [tokens, D] and views it back: ``capture.canonicalize`` moves that add back
    onto the stream."""
    model = _seq2seq_decoder(name).double()
    converted = rr.convert(model, block_size=1)
    assert len(converted.attn_res_report.sites) == 4 and not converted.attn_res_report.plan.opaque_modules
    x = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_err(converted(x).logits, model(x).logits) <= 1e-10


def test_bart_decoder_is_refused_as_post_norm():
    """Traced into now, and refused for what it is rather than for an untraceable decoder."""
    with pytest.raises(rr.ConversionError, match="post-norm") as info:
        rr.convert(_seq2seq_decoder("bart"))
    assert "could not be traced" not in str(info.value)


class FlattenedMLPBlockLM(torch.nn.Module):
    """OPT's layout in miniature: the MLP sublayer runs on the stream flattened to [tokens, D]."""

    def __init__(self, d=24, layers=2):
        super().__init__()
        self.emb = torch.nn.Embedding(50, d)
        self.n1 = torch.nn.ModuleList(torch.nn.LayerNorm(d) for _ in range(layers))
        self.f1 = torch.nn.ModuleList(torch.nn.Linear(d, d) for _ in range(layers))
        self.n2 = torch.nn.ModuleList(torch.nn.LayerNorm(d) for _ in range(layers))
        self.f2 = torch.nn.ModuleList(torch.nn.Linear(d, d) for _ in range(layers))
        self.norm = torch.nn.LayerNorm(d)

    def forward(self, ids):
        h = self.emb(ids)
        for n1, f1, n2, f2 in zip(self.n1, self.f1, self.n2, self.f2):
            h = h + f1(n1(h))
            shape = h.shape
            flat = h.reshape(-1, h.size(-1))
            h = (flat + f2(n2(flat))).view(shape)
        return self.norm(h)


def test_sublayer_on_a_flattened_stream_converts():
    model = FlattenedMLPBlockLM().double()
    converted = rr.convert(model, example_inputs=(torch.randint(0, 50, (2, 5)),), block_size=1)
    assert len(converted.attn_res_report.sites) == 4
    x = torch.randint(0, 50, (3, 7))
    assert rel_err(converted(x), model(x)) <= 1e-10
    perturb_attn_res(converted, seed=1)  # a real mixture still runs forward and backward
    converted(x).pow(2).mean().backward()
    assert all(p.grad is not None for n, p in converted.named_parameters() if n.endswith(".query"))


def test_varargs_factory_sizes_trace():
    from residual_rewriter.passes.capture import capture

    class MaskedLM(torch.nn.Module):
        def forward(self, x):
            return x * torch.ones(x.shape[0], x.shape[1], 1, dtype=x.dtype) + torch.zeros(x.shape[0], 1, x.shape[2])

    import torch.utils.checkpoint as ckpt

    from residual_rewriter.passes.capture import _VARARG_SIZE_FACTORIES

    # every function capture patches while tracing: the varargs factories and checkpoint's two paths
    patched = [(torch, name) for name in _VARARG_SIZE_FACTORIES]
    patched += [(ckpt, "_checkpoint_without_reentrant_generator"), (ckpt, "CheckpointFunction")]
    before = [getattr(owner, name) for owner, name in patched]
    model = MaskedLM()
    captured = capture(model, (torch.randn(2, 3, 4),), call=model.forward, input_names=["x"])
    x = torch.randn(5, 6, 4)
    torch.testing.assert_close(captured.graph_module(x), MaskedLM()(x))
    # the patches are gone after tracing: the very objects saved before (a wrapper that passes ints
    # through would compute the same values, so values cannot tell)
    assert {"ones", "zeros"} <= set(_VARARG_SIZE_FACTORIES)
    for (owner, name), original in zip(patched, before):
        assert getattr(owner, name) is original, f"{owner.__name__}.{name} still patched after capture"


def test_elementwise_adds_are_not_reported_as_left_out():
    report = rr.detect(make_hf("gpt2"))  # GPT-2's GELU computes x + 0.044715 * x**3
    assert report.left_out == []


@pytest.mark.parametrize("name", ["gpt_neox", "falcon", "phi", "cohere", "gemma", "starcoder2", "qwen3", "dinov2", "clip_vision_model"])
def test_more_hugging_face_architectures(name):
    """Parallel blocks (GPT-NeoX, Falcon, Phi, Cohere), scaled embeddings (Gemma), functional dropout
    reading self.training (StarCoder2), vision backbones whose stream ends in an output object or a
    token slice before the norm (DINOv2, CLIP): all exact at init in float64."""
    transformers = pytest.importorskip("transformers")
    kw = dict(vocab_size=128, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4)
    if name in ("gemma", "qwen3"):
        kw.update(head_dim=12, num_key_value_heads=2)
    if name in ("dinov2", "clip_vision_model"):
        kw = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
        model = transformers.AutoModel.from_config(transformers.AutoConfig.for_model(name, **kw))
    else:
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(name, **kw))
    model = model.double().eval()
    converted = rr.convert(model, num_blocks=2)
    assert len(converted.attn_res_report.sites) >= 2 and not converted.attn_res_report.plan.opaque_modules
    from residual_rewriter import hf

    (x,) = hf.example_inputs(model, batch_size=3, seq_len=7).values()
    with torch.no_grad():
        ref, out = model(x), converted(x)
    key = "logits" if hasattr(ref, "logits") else "last_hidden_state"
    assert rel_err(getattr(out, key), getattr(ref, key)) <= 1e-10


def test_encoder_decoder_t5_has_two_streams():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.T5Config(vocab_size=128, d_model=48, d_ff=80, num_layers=2, num_heads=4, d_kv=12, decoder_start_token_id=0)
    model = transformers.T5ForConditionalGeneration(cfg).double().eval()
    converted = rr.convert(model, num_blocks=2)  # example inputs: (input_ids, decoder_input_ids)
    enc, dec = converted.attn_res_report.streams
    assert enc.consumers == ["encoder.final_layer_norm"] and dec.consumers == ["decoder.final_layer_norm"]
    assert [s.sublayer.rsplit(".", 1)[1] for s in dec.sites[:3]] == ["SelfAttention", "EncDecAttention", "DenseReluDense"]
    ids = torch.randint(0, 128, (2, 9))
    dec_ids = torch.randint(0, 128, (2, 4))
    with torch.no_grad():
        ref = model(input_ids=ids, decoder_input_ids=dec_ids).logits
        out = converted(input_ids=ids, decoder_input_ids=dec_ids).logits
    assert rel_err(out, ref) <= 1e-10


def test_user_block_named_like_a_norm_and_an_inlined_final_norm():
    from toy_models import InlineFinalNormLM

    torch.manual_seed(0)
    model = InlineFinalNormLM().double()
    x = torch.randn(2, 5, 24, dtype=torch.float64)
    converted = rr.convert(model, x, block_size=1)
    assert [s.sublayer for s in converted.attn_res_report.sites] == [f"blocks.{i}.ff" for i in range(3)]
    assert len({s.norm for s in converted.attn_res_report.sites}) == 3  # inlined norms are told apart
    assert rel_err(converted(x), model(x)) <= 1e-10


def test_residual_hidden_in_an_attention_named_module_is_hinted():
    import torch.nn as nn

    class MyAttention(nn.Module):  # holds its own pre-norm residual, but its name makes it opaque
        def __init__(self):
            super().__init__()
            self.norm, self.proj = nn.LayerNorm(16), nn.Linear(16, 16)

        def forward(self, x):
            return x + self.proj(self.norm(x))

    model = nn.Sequential(MyAttention(), MyAttention(), nn.LayerNorm(16))
    with pytest.raises(rr.ConversionError, match="class name") as info:
        rr.convert(model, torch.randn(2, 3, 16))
    assert "0, 1" in str(info.value)


def test_residual_first_parallel_block_keeps_its_fp32_adds_under_autocast():
    """Cohere adds ``residual + attn + mlp``: fp32 + bf16, then + bf16, under autocast. Regrouping it to
    ``residual + (attn + mlp)`` must not round attn + mlp to bf16 first (canonicalize promotes attn to
    the stream's dtype): the converted model equals the original at init, exactly in bf16."""
    transformers = pytest.importorskip("transformers")
    kw = dict(vocab_size=128, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model("cohere", **kw)).eval()
    converted = rr.convert(model, num_blocks=2)
    from residual_rewriter import hf

    (x,) = hf.example_inputs(model, batch_size=2, seq_len=7).values()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(converted(x).logits, model(x).logits, rtol=0, atol=0)


def test_an_image_classifier_without_image_size_gets_clear_errors():
    """ResNet's config has no image_size: without example inputs the error says what to pass (it was
    a raw AttributeError from the Hugging Face fallback); with them, it is refused as having no
    pre-norm residual, as a plain ConversionError."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.AutoConfig.for_model("resnet", embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1])
    model = transformers.AutoModel.from_config(cfg)
    with pytest.raises(TypeError, match=r"no image_size.*example_inputs="):
        rr.convert(model)
    with pytest.raises(rr.ConversionError, match="no pre-norm residual"):
        rr.convert(model, {"pixel_values": torch.randn(1, 3, 32, 32)})


def _agreement_cases():
    from toy_models import InlineFinalNormLM

    x24 = torch.randn(2, 5, 24, dtype=torch.float64)
    return {
        "gpt": (make_gpt, None),
        "toy-rmsnorm": (lambda: ToyLM("rmsnorm").double(), None),
        "inline-norms": (lambda: InlineFinalNormLM().double(), (x24,)),
        "adds-in-the-model": (lambda: FlattenedMLPBlockLM().double(), (torch.randint(0, 50, (2, 5)),)),
        "llama": (lambda: make_hf("llama"), None),
        "t5": (lambda: __import__("model_zoo").make_architecture("t5"), None),
        "mid-stream-probe": (lambda: ReadsMidStreamLM(), None),
    }


@pytest.mark.parametrize("case", list(_agreement_cases()))
def test_detect_reports_exactly_what_convert_does(case):
    """``detect`` runs the conversion's own steps and rolls back: the same mode, holders, sites and
    blocks as ``convert_``, or the same refusal."""
    build, inputs = _agreement_cases()[case]
    try:
        converted = rr.convert(build(), inputs, num_blocks=2).attn_res_report
    except rr.ConversionError as exc:
        with pytest.raises(rr.ConversionError) as info:
            rr.detect(build(), inputs, num_blocks=2)
        assert str(info.value) == str(exc)
        return
    detected = rr.detect(build(), inputs, num_blocks=2)
    assert not detected.converted and detected.holders == converted.holders and detected.mode == converted.mode
    assert [(s.norm, s.sublayer, s.block, s.num_sources, s.param_prefix) for s in detected.sites] == [
        (s.norm, s.sublayer, s.block, s.num_sources, s.param_prefix) for s in converted.sites]
    assert detected.totals() == converted.totals()


def test_image_size_of_a_vision_sub_config_gives_the_example_inputs():
    """CLIPForImageClassification's config keeps its image size (and channels) in ``vision_config``:
    ``convert_`` derives its example inputs from there (it said "no image_size" before) and converts."""
    transformers = pytest.importorskip("transformers")
    from residual_rewriter import hf

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=32, patch_size=8, num_channels=3)
    cfg = transformers.AutoConfig.for_model("clip", vision_config=vision, text_config=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=64))
    torch.manual_seed(0)
    model = transformers.CLIPForImageClassification(cfg).eval()
    (x,) = hf.example_inputs(model, batch_size=2).values()
    assert x.shape == (2, 3, 32, 32)
    original = copy.deepcopy(model)
    rr.convert_(model)
    assert len(model.attn_res_report.sites) == 4
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, original(x).logits, rtol=0, atol=0)


class _ResidualAdd(torch.nn.Module):
    """A sublayer that adds the residual itself (BLOOM's ``dropout_add``); with ``scaled``, through a learned
    scale initialised to ones (Zaya's ``ZayaResidualScaling``): the identity at init only."""

    def __init__(self, d: int, scaled: bool):
        super().__init__()
        self.proj = torch.nn.Linear(d, d)
        self.scale = torch.nn.Parameter(torch.ones(d)) if scaled else None

    def forward(self, h, residual):
        return (residual if self.scale is None else residual * self.scale) + self.proj(h)


class _ResidualChildLayer(torch.nn.Module):
    def __init__(self, d: int, scaled: bool):
        super().__init__()
        self.norm, self.mlp = torch.nn.LayerNorm(d), _ResidualAdd(d, scaled)

    def forward(self, x):
        return self.mlp(self.norm(x), x)  # the layer's children are kept whole: the add is inside one


class _ResidualChildLM(torch.nn.Module):
    def __init__(self, scaled: bool, d=16, layers=2):
        super().__init__()
        self.emb = torch.nn.Embedding(50, d)
        self.layers = torch.nn.ModuleList(_ResidualChildLayer(d, scaled) for _ in range(layers))
        self.norm = torch.nn.LayerNorm(d)

    def forward(self, ids):
        x = self.emb(ids)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


class _DropoutOnASumLM(torch.nn.Module):
    """timm's ParallelScalingBlock in miniature: ``x + drop(a(h) + b(h))``, the dropout taking a sum (not the
    stream): in eval it is the identity, and ``drop(r) == r + drop(0)``; splitting it would skip the dropout
    in training."""

    def __init__(self, d=16, layers=3):
        super().__init__()
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(d) for _ in range(layers))
        self.a = torch.nn.ModuleList(torch.nn.Linear(d, d) for _ in range(layers))
        self.b = torch.nn.ModuleList(torch.nn.Linear(d, d) for _ in range(layers))
        self.drop, self.norm = torch.nn.Dropout(0.5), torch.nn.LayerNorm(d)

    def forward(self, x):
        for norm, a, b in zip(self.norms, self.a, self.b):
            h = norm(x)
            x = x + self.drop(a(h) + b(h))
        return self.norm(x)


def test_a_dropout_on_a_sum_is_not_taken_for_a_child_adding_the_residual():
    torch.manual_seed(0)
    model, x = _DropoutOnASumLM().double(), torch.randn(2, 5, 16, dtype=torch.float64)
    original = copy.deepcopy(model)
    rr.convert_(model, example_inputs=(x,), num_blocks=2)
    assert len(model.attn_res_report.sites) == 3
    assert_same_training_step(original, model, lambda net: net(x), "dropout on a sum", tolerance=1e-12)


class _MixBeforeNormLayer(torch.nn.Module):
    """ConvNeXt's order: ``x + mlp(norm(mix(x)))``, the stream going first into a child whose bias is zero at
    init (its depthwise conv; a Linear here): the call with zeros is zero, and the child is no residual adder."""

    def __init__(self, d=16):
        super().__init__()
        self.mix, self.norm, self.mlp = torch.nn.Linear(d, d), torch.nn.LayerNorm(d), torch.nn.Linear(d, d)
        torch.nn.init.zeros_(self.mix.bias)

    def forward(self, x):
        return x + self.mlp(self.norm(self.mix(x)))


def test_a_child_with_a_zero_bias_taking_the_stream_is_not_taken_for_an_adder():
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(_MixBeforeNormLayer() for _ in range(3)), torch.nn.LayerNorm(16)).double()
    x, original = torch.randn(2, 5, 16, dtype=torch.float64), copy.deepcopy(model)
    rr.convert_(model, example_inputs=(x,), num_blocks=2)
    assert len(model.attn_res_report.sites) == 3 and model.attn_res_report.holders == ["0", "1", "2"]
    assert_same_training_step(original, model, lambda net: net(x), "a zero bias", tolerance=1e-12)


class ChannelsFirstLayerNorm(torch.nn.Module):
    """A LayerNorm over dim 1 of [N, C, H, W] (timm's LayerNorm2d, HF ConvNeXt's channels_first): a known norm
    by its name, normalising each pixel over C, which is not the stream's last dimension."""

    def __init__(self, c):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(c))

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight).permute(0, 3, 1, 2)


class _ChannelsFirstBlock(torch.nn.Module):
    """A block of a [N, C, H, W] stream: ``x + mlp(norm(x))``, normalised over C (or, ConvNeXt's order, a
    depthwise convolution with a zero bias first), or over [C, H, W] (PoolFormer's GroupNorm(1, C))."""

    def __init__(self, kind, c=8):
        super().__init__()
        self.kind, self.mlp = kind, torch.nn.Conv2d(c, c, 1)
        self.dw = torch.nn.Conv2d(c, c, 3, padding=1, groups=c)
        torch.nn.init.zeros_(self.dw.bias)
        self.norm = torch.nn.GroupNorm(1, c) if kind == "groupnorm" else ChannelsFirstLayerNorm(c)

    def forward(self, x):
        return x + self.mlp(self.norm(self.dw(x) if self.kind == "convnext" else x))


@pytest.mark.parametrize("kind", ["convnext", "groupnorm", "layernorm2d"])
def test_a_stream_whose_norms_do_not_normalise_its_last_dimension_is_refused(kind):
    """Block AttnRes mixes each position's features, along the stream's last dimension. A [N, C, H, W] stream
    (ConvNeXt, PoolFormer) was converted with W taken for the features: exact at init, a query of size W,
    mixing each row of pixels (and failing on another image width). Refused, naming the dimension."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(_ChannelsFirstBlock(kind) for _ in range(3)), ChannelsFirstLayerNorm(8)).double()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(rr.ConversionError, match="a norm over its last dimension"):
        rr.convert_(model, example_inputs=(torch.randn(2, 8, 6, 5, dtype=torch.float64),))
    assert model.state_dict().keys() == before.keys() and not hasattr(model[0], "attn_res")


def test_a_child_adding_the_residual_through_a_learned_scale_is_not_split():
    """Split as ``x + child(h, 0)``, a child that adds the residual is exact; one that scales it first by a
    parameter (ones at init) would be exact at init too, and would train without that scale: not split. Traced
    into its layer (a child handing the stream on), its ``residual * scale + f`` is a gain on the skip, kept (scales
    not ones here)."""
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (2, 5))
    plain = _ResidualChildLM(scaled=False).double()
    report = rr.detect(plain, example_inputs=(ids,))  # the control: split, and converted layer by layer
    assert len(report.sites) == 2 and report.holders == ["layers.0", "layers.1"]
    for layer in plain.layers:  # a branch zero at init adds nothing with its own parameters: split too
        torch.nn.init.zeros_(layer.mlp.proj.weight), torch.nn.init.zeros_(layer.mlp.proj.bias)
    report = rr.detect(plain, example_inputs=(ids,))
    assert len(report.sites) == 2 and report.holders == ["layers.0", "layers.1"]
    model = _ResidualChildLM(scaled=True).double()
    with torch.no_grad():
        for layer in model.layers:
            layer.mlp.scale.uniform_(0.5, 1.5)
    original = copy.deepcopy(model)
    rr.convert_(model, example_inputs=(ids,))
    report = model.attn_res_report
    assert report.holders == ["layers.0", "layers.1"] and [s.skip_gain != "" for s in report.sites] == [True] * 2
    with torch.no_grad():
        assert rel_err(model(ids), original(ids)) <= 1e-12
    assert_same_training_step(original, model, lambda net: net(ids), "a learned residual scale", tolerance=1e-12)


class _ZeroGatedLM(torch.nn.Module):
    """``tanh(g) * f(norm(x)) + x`` with g = 0 at init (Flamingo's and Llama 3.2 Vision's cross-attention gates,
    ReZero): at init the branch adds zeros whatever f computes."""

    def __init__(self, d=16, layers=3):
        super().__init__()
        self.emb = torch.nn.Embedding(50, d)
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(d) for _ in range(layers))
        self.ffs = torch.nn.ModuleList(torch.nn.Linear(d, d) for _ in range(layers))
        self.gates = torch.nn.Parameter(torch.zeros(layers))
        self.norm = torch.nn.LayerNorm(d)

    def forward(self, ids):
        x = self.emb(ids)
        for i, (norm, ff) in enumerate(zip(self.norms, self.ffs)):
            x = torch.tanh(self.gates[i]) * ff(norm(x)) + x  # the branch first, as torchtune's ca_scale(attn_out) + x
        return self.norm(x)


def test_a_branch_gated_at_zero_is_a_site():
    """A gate at zero hides the branch's values at init, not the branch: taking ``tanh(0) * f`` for a read of f's
    shape alone (its output unchanged when f's values change) lost the site. With the gates opened after the
    conversion, the converted model still computes the original's (every branch wired where it was)."""
    torch.manual_seed(0)
    model = _ZeroGatedLM().double()
    ids = torch.randint(0, 50, (2, 7))
    converted = rr.convert(model, example_inputs=(ids,))
    assert len(converted.attn_res_report.sites) == 3, str(converted.attn_res_report)
    with torch.no_grad():
        for m in (model, converted):
            m.gates.copy_(torch.tensor([0.5, -0.3, 0.8]))
        assert rel_err(converted(ids), model(ids)) <= 1e-12


class _SkipGainLM(torch.nn.Module):
    """``x = w * x + f(norm(x))``: the stream scaled before each branch joins it (Doge's learned residual gains).
    ``gain``: "param" (per channel, not ones), "cast" (``w.to(x.dtype) * x``), "float32" (a float32 parameter in a
    bfloat16 model: the first add widens the stream), "fed" (computed from x itself: a gate, not a gain) or
    "in_place" (``x.mul_(w)`` before the norm reads x: the norm reads w * x)."""

    def __init__(self, gain: str, d=16, layers=3):
        super().__init__()
        self.gain = gain
        self.emb = torch.nn.Embedding(50, d)
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(d, elementwise_affine=gain != "float32") for _ in range(layers))
        self.ffs = torch.nn.ModuleList(torch.nn.Linear(d, d) for _ in range(layers))
        self.w = torch.nn.ParameterList(torch.nn.Parameter(0.5 + torch.rand(d)) for _ in range(layers))
        self.norm = torch.nn.LayerNorm(d, elementwise_affine=gain != "float32")

    def forward(self, ids):
        x = self.emb(ids)
        for norm, ff, w in zip(self.norms, self.ffs, self.w):
            if self.gain == "in_place":
                x = x.mul_(w) + ff(norm(x))
                continue
            g = torch.sigmoid(x.mean(-1, keepdim=True)) if self.gain == "fed" else w.to(x.dtype) if self.gain == "cast" else w
            x = g * x + ff(norm(x).to(ff.weight.dtype))
        return self.norm(x)


def test_a_stream_scaled_before_the_branch_joins_it_converts_exactly():
    """Every source so far is scaled (the oracle checks the scaled sources with non-zero queries: Doge in
    test_oracle.py); here: exact at init and in a training step, in float64 and with a float32 gain widening a
    bfloat16 stream, which the rewrite must widen at b_0 (a bfloat16 partial sum would round)."""
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (2, 7))
    for gain in ("param", "cast"):
        model = _SkipGainLM(gain).double()
        original = copy.deepcopy(model)
        rr.convert_(model, example_inputs=(ids,), num_blocks=2)
        assert len(model.attn_res_report.sites) == 3
        with torch.no_grad():
            assert rel_err(model(ids), original(ids)) <= 1e-12
        assert_same_training_step(original, model, lambda net: net(ids), f"skip gains ({gain})", tolerance=1e-12)

    model = _SkipGainLM("float32").to(torch.bfloat16)
    for w in model.w:
        w.data = w.data.float()
    original = copy.deepcopy(model)
    rr.convert_(model, example_inputs=(ids,), num_blocks=2)
    assert model.attn_res_report.streams[0].dtype == "float32"
    with torch.no_grad():
        got, want = model(ids), original(ids)
    assert got.dtype == want.dtype == torch.float32 and rel_err(got, want) <= 1e-6


@pytest.mark.parametrize("gain", ["fed", "in_place"])
def test_a_stream_scaled_by_a_value_of_its_own_or_in_place_is_refused(gain):
    """``sigmoid(g(x)) * x``: a gate read from the stream, which AttnRes replaces; not a gain. ``x.mul_(w)``: the
    norm reading x afterwards reads w * x (ones at init: converted, it trained without w)."""
    model = _SkipGainLM(gain).double()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(rr.ConversionError, match="no pre-norm residual site"):
        rr.convert_(model, example_inputs=(torch.randint(0, 50, (2, 7)),))
    assert model.state_dict().keys() == before.keys() and not rr.attn_res_parameters(model)


class _ViewedStreamGainBlock(torch.nn.Module):
    """A (B, H, W, C) stream whose second sublayer reads it as (B, H*W, C) (Swin) and scales that view by ``w``: per
    channel, or per sample ((B, 1, 1) in the view's layout, which in the stream's would scale H)."""

    def __init__(self, w: torch.Tensor, c=8):
        super().__init__()
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(c) for _ in range(2))
        self.ffs = torch.nn.ModuleList(torch.nn.Linear(c, c) for _ in range(2))
        self.register_buffer("w", w)

    def forward(self, x):  # [B, H, W, C]
        b, h, w, c = x.shape
        x = x + self.ffs[0](self.norms[0](x))
        x = x.reshape(b, -1, c)
        x = x * self.w + self.ffs[1](self.norms[1](x))
        return x.reshape(b, h, w, c)


def test_a_gain_on_a_token_view_of_the_stream_scales_channels_only():
    def lm(w):
        return torch.nn.Sequential(_ViewedStreamGainBlock(w), _ViewedStreamGainBlock(w), torch.nn.LayerNorm(8)).double()

    x = torch.randn(2, 2, 3, 8, dtype=torch.float64)  # H == B: (B, 1, 1) broadcasts in the stream's layout too
    model = lm(torch.rand(8) + 0.5)
    original = copy.deepcopy(model)
    rr.convert_(model, example_inputs=(x,))
    assert [s.skip_gain != "" for s in model.attn_res_report.sites] == [False, True] * 2
    with torch.no_grad():
        assert rel_err(model(x), original(x)) <= 1e-12
    model = lm(torch.tensor([0.5, 2.0]).view(2, 1, 1))
    with pytest.raises(rr.ConversionError) as info:  # refused, not "does not compute what the original computed"
        rr.convert_(model, example_inputs=(x,))
    assert "Please report it" not in str(info.value)


class _PostNormBranchNormed(torch.nn.Module):
    """BERT-like ``n1(x + an(a(x)))``: each branch ends in a norm too, yet the stream is normalised between adds."""

    def __init__(self, d=8):
        super().__init__()
        self.a, self.an, self.n1 = torch.nn.Linear(d, d), torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.m, self.mn, self.n2 = torch.nn.Linear(d, d), torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)

    def forward(self, x):
        x = self.n1(x + self.an(self.a(x)))
        return self.n2(x + self.mn(self.m(x)))


class _LayerNorm2d(torch.nn.LayerNorm):
    """Over C of an [N, C, H, W] stream (timm's)."""

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


class _ChannelsFirstNormAfter(torch.nn.Module):
    def __init__(self, c=8):
        super().__init__()
        self.conv, self.norm = torch.nn.Conv2d(c, c, 3, padding=1), _LayerNorm2d(c)

    def forward(self, x):
        return x + self.norm(self.conv(x))


class _Stack(torch.nn.Module):
    def __init__(self, block, stem, head):
        super().__init__()
        self.stem, self.blocks, self.head = stem, torch.nn.ModuleList(block() for _ in range(3)), head

    def forward(self, x):
        x = self.stem(x)
        for blk in self.blocks:
            x = blk(x)
        return self.head(x)


@pytest.mark.parametrize("kind", ["post-norm", "channels-first"])
def test_a_branch_ending_in_a_norm_starts_no_stream_where_the_stream_is_not_one(kind):
    """``x + norm(f(x))`` with no norm before starts a stream (OLMo-2, Swin V2) only where the next add continues it
    and the norm is over the last dimension: a post-norm layer whose branches end in norms too, and a channels-first
    [N, C, H, W] stack (a query of W entries would mix rows), stay refused."""
    torch.manual_seed(0)
    if kind == "post-norm":
        model, x = _Stack(_PostNormBranchNormed, torch.nn.Embedding(11, 8), torch.nn.Linear(8, 3)), (torch.randint(0, 11, (2, 5)),)
    else:
        model = _Stack(_ChannelsFirstNormAfter, torch.nn.Conv2d(3, 8, 1), torch.nn.Sequential(_LayerNorm2d(8), torch.nn.Flatten(1)))
        x = (torch.randn(2, 3, 4, 4),)
    model = model.double()
    x = tuple(t.double() if t.is_floating_point() else t for t in x)
    with pytest.raises(rr.ConversionError, match="does not read x through a norm over its last dimension"):
        rr.convert_(model, example_inputs=x)
    assert not rr.attn_res_parameters(model)


class _ZeroSideReaderLM(torch.nn.Module):
    """A side reader of a mid-stream value starting at zero (ControlNet's zero convolutions, LoRA's B)."""

    def __init__(self, d=8):
        super().__init__()
        self.emb, self.norm, self.head = torch.nn.Embedding(11, d), torch.nn.LayerNorm(d), torch.nn.Linear(d, 2)
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(d) for _ in range(3))
        self.ffs = torch.nn.ModuleList(torch.nn.Linear(d, d) for _ in range(3))
        self.side = torch.nn.Linear(d, 2)
        torch.nn.init.zeros_(self.side.weight)
        torch.nn.init.zeros_(self.side.bias)

    def forward(self, ids):
        x, side = self.emb(ids), None
        for i, (norm, ff) in enumerate(zip(self.norms, self.ffs)):
            x = x + ff(norm(x))
            side = self.side(x) if i == 0 else side
        return self.head(self.norm(x)) + side


def test_a_side_reader_starting_at_zero_reads_the_stream():
    """Its output does not change with x at init, yet it reads x's values: taken for a shape read, it was pointed at
    b_0, and once trained the converted model computed something else (0.8 off). Refused, naming it."""
    model = _ZeroSideReaderLM().double()
    with pytest.raises(rr.ConversionError, match="also read by side"):
        rr.convert_(model, example_inputs=(torch.randint(0, 11, (2, 5)),))


@dataclasses.dataclass
class _NormConfig:
    eps: float = 1e-6


class _ConfiguredRMSNorm(torch.nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.weight = torch.nn.Parameter(1 + 0.1 * torch.randn(d))

    def forward(self, x, config):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config.eps) * self.weight


class _ConfiguredNormLM(torch.nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.config, self.emb, self.out = _NormConfig(), torch.nn.Embedding(11, d), torch.nn.LayerNorm(d)
        self.norms = torch.nn.ModuleList(_ConfiguredRMSNorm(d) for _ in range(2))
        self.ffs = torch.nn.ModuleList(torch.nn.Linear(d, d) for _ in range(2))

    def forward(self, ids):
        x = self.emb(ids)
        for norm, ff in zip(self.norms, self.ffs):
            x = x + ff(norm(x, self.config))
        return self.out(x)


def test_a_norm_taking_a_config_object_is_a_norm():
    """A config (a dataclass) among a norm's inputs holds no state a probe could change: the norm is probed as any."""
    model = _ConfiguredNormLM().double()
    rr.convert_(model, example_inputs=(torch.randint(0, 11, (2, 5)),))
    assert len(model.attn_res_report.sites) == 2
