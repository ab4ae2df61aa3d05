"""Every Hugging Face architecture the README lists as converting: exact at init in float64 (fp32
for the MoE models), and one query per aggregation (a site whose sublayer path is the whole layer,
DINOv2's LayerScale or Gemma2's post-norms, used to share its layer's query)."""
from __future__ import annotations

import inspect

import pytest
import torch

import residual_rewriter as rr
from model_zoo import (DECODERS, ENCODER_DECODERS, FP32_ONLY, VISION, aggregations, assert_same_training_step, live_dropout,
                        make_architecture, make_gpt, query_of, rel_err)
from residual_rewriter import hf

ARCHITECTURES = sorted(DECODERS) + VISION + ["t5", "umt5", "longt5"] + ENCODER_DECODERS


def queries_per_aggregation(converted) -> tuple[int, int]:
    """(aggregations in the rewritten graphs, distinct query parameters they read)."""
    found = aggregations(converted)
    return len(found), len({query_of(path, n) for path, n in found})


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_exact_at_init_with_one_query_per_aggregation(name):
    """In eval, and in training with dropout and LayerDrop on (same random draws): each mode runs the
    graph traced in it, and a layer the model skips hands its state on."""
    model = make_architecture(name)
    live_dropout(model)
    converted = rr.convert(model, block_size=1)
    report = converted.attn_res_report
    # the MoE models' experts stay opaque (data-dependent routing); nothing else may
    assert all(name in FP32_ONLY and path.endswith(".experts") for path in report.plan.opaque_modules)
    aggregations, queries = queries_per_aggregation(converted)
    # every site but each stream's first (one source: no query) + one final aggregation per stream
    assert aggregations == len(report.sites) == queries
    assert len([n for n, _ in converted.named_parameters() if ".attn_res." in n and n.endswith(".query")]) == queries
    inputs = hf.example_inputs(model, batch_size=3, seq_len=7)  # T5: input_ids, decoder_input_ids
    # Both without the KV cache. Not the same computation with it: GPT-J/CodeGen on transformers 5.18
    # (eager attention only) compute Q K^T in fp32, where the cache's torch.cat (a contiguous key, not a
    # permuted view) changes MKL's rounding: the original's own cached and uncached logits differ by ~1e-9.
    no_cache = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    kwargs = {**inputs, **no_cache}
    with torch.no_grad():
        ref, out = model(**kwargs), converted(**kwargs)
    key = "logits" if hasattr(ref, "logits") else "last_hidden_state"
    tolerance = 1e-6 if name in FP32_ONLY else 1e-10
    assert rel_err(getattr(out, key), getattr(ref, key)) <= tolerance
    for seed in (1, 2):  # in training: outputs and gradients
        assert_same_training_step(model, converted, lambda net: getattr(net(**kwargs), key), f"{name}, seed {seed}",
                                  seed=seed, tolerance=tolerance)


@pytest.mark.parametrize("name", ["dinov2", "gemma2"])
def test_sites_sharing_a_layer_path_get_their_own_parameters(name):
    """Both sublayers of a DINOv2 / Gemma2 layer are named after the layer (their branch ends in a
    LayerScale / post-norm); their parameters are named after their own norms."""
    converted = rr.convert(make_architecture(name), num_blocks=2)
    sites = converted.attn_res_report.sites
    assert sites[1].sublayer == sites[0].sublayer  # the case this test is about
    prefixes = [s.param_prefix for s in sites if s.param_prefix]
    assert len(set(prefixes)) == len(prefixes) == len(sites) - 1
    assert all(p.endswith(s.norm.rsplit(".", 1)[1]) for p, s in zip(prefixes, sites[1:]))


def test_a_shared_parameter_key_is_refused(monkeypatch):
    """Two aggregations reading one query would be exact at init and train, and not be AttnRes:
    the rewrite refuses a plan that binds one key twice."""
    from residual_rewriter.passes import plan as plan_module

    def same_name_for_all(plan):
        for site in plan.sites:
            site.param_prefix = "attn_res.shared" if site.num_sources > 1 else ""
        for stream in plan.streams:
            stream.final_param_prefix = "attn_res.final"

    monkeypatch.setattr("residual_rewriter.passes.layerwise.assign_parameter_names", same_name_for_all)
    with pytest.raises(rr.ConversionError, match="share the parameters.*attn_res.shared"):
        rr.convert(make_gpt(), num_blocks=2)
    assert plan_module.assign_parameter_names is not same_name_for_all


@pytest.mark.parametrize("name", ["mamba", "falcon_mamba", "mamba2"])
def test_a_cast_of_the_residual_is_looked_through_only_where_it_keeps_its_values(name):
    """Mamba adds ``residual.to(float32)``: a no-op in a float32 model (converted, exact); in float64 it
    rounds the stream at every layer, which block sums cannot repeat (refused, naming the cast); with
    bfloat16 weights it widens the stream at the first add (b_0 is widened, the block sums are float32)."""
    transformers = pytest.importorskip("transformers")
    heads = dict(num_heads=2, head_dim=32, n_groups=1) if name == "mamba2" else {}  # heads x head_dim = 2 x hidden
    config = transformers.AutoConfig.for_model(name, vocab_size=128, hidden_size=32, num_hidden_layers=2, state_size=8,
                                               residual_in_fp32=True, **heads)
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    converted = rr.convert(model, example_inputs={"input_ids": ids}, block_size=1)
    assert len(converted.attn_res_report.sites) == 2
    with torch.no_grad():
        assert rel_err(converted(input_ids=ids).logits, model(input_ids=ids).logits) <= 1e-6
    with pytest.raises(rr.ConversionError, match=r"hidden_states is cast to torch.float32 before the add, which rounds"):
        rr.convert(model.double(), example_inputs={"input_ids": ids})
    # bfloat16 weights: the cast widens the stream to float32 at the first add; the block sums are float32 too
    model = model.to(torch.bfloat16)
    converted = rr.convert(model, example_inputs={"input_ids": ids}, block_size=1)
    state = converted.backbone.layers[0](converted.backbone.embeddings(ids))
    assert len(state.blocks) == 2 and all(b.dtype == torch.float32 for b in state.blocks)
    with torch.no_grad():
        assert rel_err(converted(input_ids=ids).logits.float(), model(input_ids=ids).logits.float()) <= 1e-2


def test_swin_converts_a_stream_per_stage_and_each_input_size_gets_its_own_graph():
    """Swin: patch merging between stages resizes the stream (a new stream per stage); its blocks branch on
    the input size (padding to a multiple of the window), which the traced graphs specialise: another
    size gets a graph of its own, traced symbolically, and stays exact, the padded branch included."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.SwinConfig(image_size=32, patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[2, 2],
                                  window_size=4, mlp_ratio=2.0)
    model = transformers.SwinForImageClassification(cfg).double().eval()
    converted = rr.convert(model)
    report = converted.attn_res_report
    assert [len(s.sites) for s in report.streams] == [4, 4] and report.mode == "in place, layer by layer"
    block = converted.swin.encoder.layers[0].blocks[0]
    for side in (32, 20, 40):  # 20: 10 x 10 tokens, padded to 12 x 12 windows
        pixels = torch.randn(2, 3, side, side, dtype=torch.float64, generator=torch.Generator().manual_seed(side))
        with torch.no_grad():
            assert rel_err(converted(pixel_values=pixels).logits, model(pixel_values=pixels).logits) <= 1e-10
    # 3 sizes in eval; in training the conversion's call, and the same with Trainer's num_items_in_batch
    assert sorted(training for training, _ in block.forward.graphs) == [False, False, False, True, True]
