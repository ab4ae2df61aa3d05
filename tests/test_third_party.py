"""litgpt, torchtune and timm models: small configs, nothing downloaded, float64.

Optional test dependencies (``tests/third_party/requirements.txt``, installed by the README's test
command): a library that is not installed skips its tests. Each model either converts exactly in place
(the same module objects; the output equals the original's deep copy on the example inputs and on
another batch; every sublayer a site), is live (perturbed queries move the output, every new parameter
gets a gradient), and trains; or it is refused with a ``ConversionError`` that names the module and the
reason, and is left untouched. ``conftest.py`` makes PyPI's torchvision importable beside the CPU torch.
"""
from __future__ import annotations

import copy
import importlib
import importlib.util

import pytest
import torch

import residual_rewriter as rr
from model_zoo import assert_live, assert_same_training_step, rel_err

VOCAB = 128
# torchtune's RMSNorm computes in float32 and multiplies by the float64 weight: torch warns, both models alike
pytestmark = pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight:UserWarning")


def _library(name: str):
    """Skip only when the library is not installed: a broken install (a missing dependency, torchvision
    without its workaround) fails (``pytest.importorskip`` would skip on any missing module)."""
    if importlib.util.find_spec(name) is None:
        pytest.skip(f"{name} is not installed (optional: tests/third_party/requirements.txt)")
    return importlib.import_module(name)


def _litgpt(name: str, **overrides):
    """``litgpt.model.GPT`` from a built-in config (no download), made tiny."""
    _library("litgpt")
    from litgpt import Config
    from litgpt.model import GPT

    config = Config.from_name(name, n_layer=2, n_embd=64, n_head=4, n_query_groups=2, head_size=16,
                              vocab_size=VOCAB, padded_vocab_size=VOCAB, block_size=32, **overrides)
    return GPT(config)


def _torchtune(family: str, **overrides):
    """A torchtune component builder (``torchtune.models.<family>.<family>``), made tiny."""
    _library("torchtune")
    builder = getattr(importlib.import_module(f"torchtune.models.{family}"), family)
    return builder(vocab_size=VOCAB, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=64, max_seq_len=64,
                   **overrides)


def _norms_drawn(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.copy_(1 + 0.1 * torch.randn(m.weight.shape))
    return model


VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0)  # pooled features out


def _timm(path: str, **kwargs):
    """A timm model class (``timm.models.<module>.<Class>``) built directly: no pretrained config."""
    _library("timm")
    module, cls = path.rsplit(".", 1)
    return getattr(importlib.import_module(f"timm.models.{module}"), cls)(**kwargs)


# id -> (build, sites): every sublayer of the 2-layer models is a site (a parallel-residual layer is one)
CONVERTS = {
    "litgpt-llama": (lambda: _litgpt("Llama-3.2-1B", intermediate_size=128), 4),
    # post-attention/-MLP norms, logit softcapping, a sliding window shorter than the input, scaled embeddings
    "litgpt-gemma2": (lambda: _litgpt("gemma-2-2b", intermediate_size=128, sliding_window_size=8), 4),
    "litgpt-mixtral-moe": (lambda: _litgpt("Mixtral-8x7B-v0.1", intermediate_size=64, n_expert=4,
                                           n_expert_per_token=2), 4),
    # no norm before the sublayers, one after each (x + norm(f(x))): each sublayer reads the mixture where it read x
    "litgpt-olmo2-norms-after": (lambda: _litgpt("OLMo-2-1124-7B", intermediate_size=128), 4),
    "litgpt-pythia-parallel": (lambda: _litgpt("pythia-14m", intermediate_size=128), 2),
    "litgpt-phi-parallel-shared-norm": (lambda: _litgpt("phi-2", intermediate_size=128), 2),
    "torchtune-llama3": (lambda: _torchtune("llama3", intermediate_dim=128), 4),
    "torchtune-qwen2": (lambda: _torchtune("qwen2", intermediate_dim=128), 4),
    "torchtune-gemma": (lambda: _torchtune("gemma", head_dim=16, intermediate_dim=128), 4),
    "torchtune-gemma2": (lambda: _torchtune("gemma2", head_dim=16, intermediate_dim=128, sliding_window_size=8), 4),
    "torchtune-phi3": (lambda: _torchtune("phi3", intermediate_dim=128), 4),
    "timm-vit-layerscale-registers": (lambda: _timm("vision_transformer.VisionTransformer", init_values=0.1,
                                                    reg_tokens=4, **VIT), 4),
    "timm-eva-rope-swiglu": (lambda: _timm("eva.Eva", use_rot_pos_emb=True, ref_feat_shape=(4, 4), swiglu_mlp=True,
                                           init_values=0.1, **VIT), 4),
    "timm-beit-relpos": (lambda: _timm("beit.Beit", use_rel_pos_bias=True, init_values=0.1, **VIT), 4),
    "timm-mlp-mixer": (lambda: _timm("mlp_mixer.MlpMixer", img_size=32, patch_size=8, embed_dim=32, num_blocks=2,
                                     num_classes=0), 4),
    "timm-deit-distilled": (lambda: _timm("deit.VisionTransformerDistilled", **VIT), 4),
    # 2 self-attention layers + 1 class-attention layer (its own stream: the class token)
    "timm-cait": (lambda: _timm("cait.Cait", depth_token_only=1, init_values=0.1, **VIT), 6),
    # a block reshapes the stream between its sublayers ((B, H, W, C) -> (B, H*W, C) and back), shifted
    # windows with masks in the second block; patch merging widens the stream: a stream per stage
    # Swin V2: a norm after each sublayer and none before (x + norm(attn(x)), res-post-norm); timm starts those
    # norms at zero (every branch adds zeros: no query would get a gradient), a checkpoint has them trained
    "timm-swin-v2-norms-after": (lambda: _norms_drawn(_timm("swin_transformer_v2.SwinTransformerV2", img_size=32,
                                                            patch_size=4, window_size=4, embed_dim=16, depths=(2, 2),
                                                            num_heads=(2, 2), num_classes=0)), 8),
    "timm-swin": (lambda: _timm("swin_transformer.SwinTransformer", img_size=32, patch_size=4, window_size=4,
                                embed_dim=16, depths=(2, 2), num_heads=(2, 2), num_classes=0), 8),
}


def _build(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = CONVERTS[name][0]().double()
    if name.startswith("timm"):
        return model, torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.randn(3, 3, 32, 32, dtype=torch.float64)
    return model, torch.randint(0, VOCAB, (2, 12)), torch.randint(0, VOCAB, (3, 9))  # another batch and length


@pytest.mark.parametrize("name", list(CONVERTS))
def test_converts_exactly_in_place_and_is_live(name):
    model, x, other = _build(name)
    model.eval()
    original = copy.deepcopy(model)
    modules = dict(model.named_modules())
    with torch.no_grad():
        want = original(x)
    assert want.abs().max() > 0.1  # a real output to compare (no zero-initialised head)
    assert rr.convert_(model, example_inputs=(x,), num_blocks=2) is model
    report = model.attn_res_report
    assert report.mode == "in place, layer by layer"
    assert len(report.sites) == CONVERTS[name][1], report.sites
    assert all(dict(model.named_modules())[path] is m for path, m in modules.items())  # the same objects
    with torch.no_grad():
        assert rel_err(model(x), want) <= 1e-12, f"not exact at init: {rel_err(model(x), want):.1e}"
        assert rel_err(model(other), original(other)) <= 1e-12, "not exact on another input"
    assert_same_training_step(original, model, lambda net: net(x), name, tolerance=1e-12)
    assert_live(model, (x,), want, name)


@pytest.mark.parametrize("name", list(CONVERTS))
def test_trains(name):
    """Converted in train mode, from init (zero queries): AdamW steps reach every new parameter and
    lower the loss (a regression onto a fixed random target)."""
    model, x, _ = _build(name)
    model.train()
    rr.convert_(model, example_inputs=(x,), num_blocks=2)
    new = {n: p for n, p in model.named_parameters() if ".attn_res." in f".{n}"}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    target = torch.randn(model(x).shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    learned, losses = set(), []
    for _ in range(3):
        out = model(x)
        loss = (out - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        learned |= {n for n, p in new.items() if p.grad is not None and p.grad.any()}
    assert losses[-1] < losses[0], losses
    assert learned == set(new), f"never a gradient: {sorted(set(new) - learned)}"
    assert all(p.any() for n, p in new.items() if n.endswith(".query")), "a query still zero after training"


def test_swin_v2_cr_is_refused_naming_the_block_and_left_untouched():
    """Swin V2 CR views its stream as (B, H, W, C) between blocks in a way the rewrite does not follow."""
    torch.manual_seed(0)
    model = _timm("swin_transformer_v2_cr.SwinTransformerV2Cr", img_size=(32, 32), window_size=4, embed_dim=16,
                  depths=(2, 2), num_heads=(2, 2), num_classes=0).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    original = copy.deepcopy(model)
    with pytest.raises(rr.ConversionError) as info:
        rr.convert_(model, example_inputs=(x,), num_blocks=2)
    message = str(info.value)
    assert "stages.0.blocks.1" in message and "reshaped between sublayers" in message, message
    assert not rr.attn_res_parameters(model) and not hasattr(model, "attn_res_report")
    assert model.state_dict().keys() == original.state_dict().keys()
    assert all(torch.equal(v, original.state_dict()[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(x), original(x))


@pytest.mark.parametrize("path, options", [
    # [N, C, H, W] streams normalised over C: W was taken for the features (a query of W entries)
    ("convnext.ConvNeXt", dict(depths=(1, 2, 2, 2), dims=(8, 16, 24, 32), num_classes=0)),
    # StarNet: a branch whose BatchNorm gain is zero at init barely reads x, so it looked invariant to
    # scaling (0.7% apart against 0.7% for other values): taken for a norm of a [N, C, H, W] stream
    ("starnet.StarNet", dict(base_dim=16, depths=(1, 1, 1, 3), num_classes=0)),
])
def test_a_channels_first_stream_is_refused(path, options):
    torch.manual_seed(0)
    model = _timm(path, **options).double().eval()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with pytest.raises(rr.ConversionError, match="a norm over its last dimension"):
        rr.convert_(model, example_inputs=(x,), num_blocks=2)
    assert not rr.attn_res_parameters(model)


@pytest.mark.parametrize("path, options", [
    ("vision_transformer.VisionTransformer", VIT),
    # the model as one holder (its stream is pooled between stages); drop_path is traced into it, and in
    # training it makes nodes the eval graph lacks: those children are kept whole instead
    ("mvitv2.MultiScaleVit", dict(img_size=32, num_classes=0)),
    # a stage of one block: its `blocks` Sequential is the holder, the block traced into it (it holds the adds);
    # the DropPath inside that block stays whole, or training would trace nodes the eval graph lacks
    ("swin_transformer.SwinTransformer", dict(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(1, 1),
                                              num_heads=(2, 2), num_classes=0)),
    # x + drop_path(attn_out_proj(..) + mlp_out_proj(..)): a DropPath taking a sum was split as a residual adder
    ("vision_transformer.VisionTransformer", dict(VIT, block_fn="ParallelScalingBlock")),
], ids=["vit", "mvitv2", "swin-one-block-stages", "vit-parallel-scaling"])
def test_training_with_drop_path_computes_what_the_original_computes(path, options):
    """Stochastic depth in training (DropPath, random per sample): with the same random draws, the
    converted model equals the original at init, in training as in eval."""
    if path.startswith("mvitv2"):
        from timm.models.mvitv2 import MultiScaleVitCfg

        options = dict(options, cfg=MultiScaleVitCfg(depths=(1, 2), embed_dim=(16, 32), num_heads=(1, 2)))
    if "block_fn" in options:
        options = dict(options, block_fn=getattr(_library("timm").models.vision_transformer, options["block_fn"]))
    torch.manual_seed(0)
    model = _timm(path, drop_path_rate=0.3, **options).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    converted = rr.convert(model, (x,), num_blocks=2)
    for training in (False, True):
        model.train(training), converted.train(training)
        outputs = []
        for net in (model, converted):
            torch.manual_seed(1)
            outputs.append(net(x))
        assert rel_err(outputs[1], outputs[0]) <= 1e-12, f"training={training}"
    torch.manual_seed(2)
    assert not torch.equal(model(x), outputs[0])  # drop_path is live in training


def test_torchtune_vision_fusion_decoder_with_an_image_converts_its_gated_cross_attention():
    """Llama 3.2 Vision's fusion layers add ``tanh(gate) * cross_attention(norm(x), image)`` with the gates at zero:
    every cross-attention sublayer is a site (the zero gate had hidden it), and with the gates opened after the
    conversion the converted decoder still computes the original's."""
    _library("torchtune")
    from torchtune.models.llama3_2_vision._component_builders import llama3_2_vision_decoder

    torch.manual_seed(0)
    model = llama3_2_vision_decoder(vocab_size=VOCAB, num_layers=4, fusion_interval=2, num_special_tokens=2, num_heads=4,
                                    num_kv_heads=2, embed_dim=64, max_seq_len=64, encoder_max_seq_len=5,
                                    intermediate_dim=128).double().eval()
    inputs = {"tokens": torch.randint(0, VOCAB, (2, 12)), "encoder_input": torch.randn(2, 5, 64, dtype=torch.float64),
              "encoder_mask": torch.ones(2, 12, 5, dtype=torch.bool)}
    original = copy.deepcopy(model)
    rr.convert_(model, example_inputs=inputs)
    assert len(model.attn_res_report.sites) == 12  # 4 self-attention layers and 2 cross-attention layers, 2 each
    gates = [n for n, _ in model.named_parameters() if n.endswith("_scale.scale")]
    assert gates, "no tanh gates found"
    with torch.no_grad():
        for net in (model, original):
            for i, name in enumerate(gates):
                net.get_parameter(name).fill_(0.3 + 0.1 * i)
        assert rel_err(model(**inputs), original(**inputs)) <= 1e-12
