"""Hugging Face checkpoints of converted models: ``save_pretrained`` then
``residual_rewriter.from_pretrained(path)`` with nothing but the path restores the saved class (from
``config.architectures``) and every AttnRes parameter, for every architecture the README lists, whole
and sharded. The AttnRes parameters are perturbed before saving, so a dropped one shows.

Before: Mixtral, ViT and DeiT failed to reload (transformers renames module paths on save, the AttnRes
keys under them included, and the loader looked for the in-memory names); T5, ViT, DeiT and DINOv2
were loaded as ``AutoModelForCausalLM``, which refuses their configs."""
from __future__ import annotations

import copy

import pytest
import torch

import residual_rewriter as rr
from model_zoo import DECODERS, VISION, make_architecture, make_hf, perturb_attn_res
from residual_rewriter import hf

ARCHITECTURES = sorted(DECODERS) + VISION + ["t5"]


def _attn_res_state(model) -> dict:
    return {k: v for k, v in model.state_dict().items() if ".attn_res." in f".{k}"}


def _outputs(model, kwargs):
    with torch.no_grad():
        out = model(**kwargs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_round_trip_restores_the_class_and_every_attnres_parameter(name, tmp_path):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()  # the base load lists the AttnRes keys as unexpected
    model = make_architecture(name).float()
    rr.convert_(model, num_blocks=2)
    perturb_attn_res(model, seed=3)
    sharded = name in ("llama", "mixtral", "vit")  # sharded safetensors too: tiny shards, several files
    model.save_pretrained(tmp_path, **({"max_shard_size": "20KB"} if sharded else {}))
    if sharded:
        assert len(list(tmp_path.glob("*.safetensors"))) > 1
    loaded = rr.from_pretrained(str(tmp_path)).eval()
    assert type(loaded) is type(model)
    want = _attn_res_state(model)
    got = _attn_res_state(loaded)
    assert want.keys() == got.keys() and all(torch.equal(got[k], want[k]) for k in want)
    inputs = hf.example_inputs(model, batch_size=2, seq_len=6)
    kwargs = dict(zip(hf.input_names(model, len(inputs)), inputs))
    fresh = rr.convert(make_architecture(name).float(), num_blocks=2)
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if ".attn_res." not in f".{k}"}, strict=False)
    model.eval()
    assert torch.equal(_outputs(loaded, kwargs), _outputs(model, kwargs))
    assert not torch.allclose(_outputs(fresh.eval(), kwargs), _outputs(model, kwargs))  # the AttnRes weights matter


def test_converting_one_of_two_models_sharing_a_config_leaves_the_other_alone(tmp_path):
    """Two models built from ONE config object (a baseline and the model to convert): converting one
    records its options in a copy of the config, so the other is not taken for converted and saves
    a plain checkpoint its own class loads."""
    transformers = pytest.importorskip("transformers")
    baseline = make_hf("llama")
    other = type(baseline)(baseline.config)
    assert other.config is baseline.config
    rr.convert_(other, num_blocks=2)
    assert other.config is not baseline.config and not hasattr(baseline.config, "residual_rewriter")
    twin = copy.deepcopy(baseline)
    rr.convert_(twin)  # not refused as "already converted"
    baseline.save_pretrained(tmp_path)
    reloaded = type(baseline).from_pretrained(tmp_path)
    assert not hasattr(reloaded.config, "residual_rewriter")
    ids = torch.randint(0, 128, (2, 5))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, baseline(ids).logits)
