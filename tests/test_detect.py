"""Detection: every way of writing a pre-norm residual is found; what is not pre-norm is refused."""
from __future__ import annotations

import pytest
import torch

import residual_rewriter as rr
from model_zoo import make_gpt, make_hf, rel_err
from toy_models import NORM_KINDS, ParallelLM, PlainMLP, PostNormLM, ReadsMidStreamLM, ToyLM


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


def test_parallel_branches_are_refused_naming_the_module():
    with pytest.raises(rr.ConversionError, match="parallel branches") as info:
        rr.convert(ParallelLM())
    assert "blocks.0" in str(info.value)


def test_stream_read_mid_way_is_refused():
    with pytest.raises(rr.ConversionError, match="read by"):
        rr.convert(ReadsMidStreamLM())


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
