"""convert(hf_model): a converted copy of the model's own class — generate with the KV cache,
save_pretrained / from_pretrained, output types, training with labels."""
from __future__ import annotations

import copy
import inspect

import pytest
import torch

import residual_rewriter as rr
from model_zoo import CACHE_ARGUMENT_NAMES, make_hf, perturb_attn_res, rel_err

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def pair():
    model = make_hf("llama").double()
    converted = rr.convert(model, num_blocks=2)
    return model, converted


def test_class_and_report(pair):
    model, converted = pair
    assert type(converted) is type(model) and converted is not model
    assert len(converted.attn_res_report.sites) == 6
    new = {n for n, _ in converted.named_parameters()} - {n for n, _ in model.named_parameters()}
    assert new and all(".attn_res." in n for n in new)
    assert not any(hasattr(m, "attn_res") for m in model.modules())  # the original is untouched


def test_exact_at_init_and_output_type(pair):
    model, converted = pair
    x = torch.randint(0, 128, (2, 9))
    out, ref = converted(x), model(x)
    assert type(out) is type(ref)
    assert rel_err(out.logits, ref.logits) <= 1e-10


def test_generate_with_kv_cache_matches_the_original_at_init(pair):
    model, converted = pair
    x = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(x)
    kw = dict(max_new_tokens=6, do_sample=False, attention_mask=mask, pad_token_id=0)
    assert torch.equal(converted.generate(x, **kw), model.generate(x, **kw))


@pytest.mark.parametrize("name", ["gpt2", "mistral"])
def test_generate_other_decoders(name):
    model = make_hf(name).double()
    converted = rr.convert(model, num_blocks=2)
    x = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=5, do_sample=False, attention_mask=torch.ones_like(x), pad_token_id=0)
    assert torch.equal(converted.generate(x, **kw), model.generate(x, **kw))


def test_kv_cache_is_exact_for_attnres():
    """With random queries (really AttnRes), decoding with the cache equals recomputing everything:
    the depth mixture is per token, so cached keys/values stay valid."""
    converted = rr.convert(make_hf("llama").double(), block_size=1)
    perturb_attn_res(converted, scale=3.0)
    x = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=8, do_sample=False, attention_mask=torch.ones_like(x), pad_token_id=0)
    cached = converted.generate(x, use_cache=True, **kw)
    recomputed = converted.generate(x, use_cache=False, **kw)
    assert torch.equal(cached, recomputed)
    # and the cached forward logits equal the full forward's at every step
    full = converted(cached, use_cache=False).logits
    with torch.no_grad():
        out = converted(cached[:, :6], use_cache=True)
        name = next(n for n in CACHE_ARGUMENT_NAMES if n in inspect.signature(converted.forward).parameters)
        past = out.get("cache", out.get("past_key_values"))  # the output field follows the argument's name
        step = converted(cached[:, 6:7], **{name: past}, use_cache=True)
    assert rel_err(step.logits[:, -1], full[:, 6]) <= 1e-10


def test_gemma4_slices_the_state_before_its_kv_shared_layers():
    """Gemma 4 hands its KV-shared layers the stream's last tokens only (``logits_to_keep``, as generate's prefill
    asks): the state is sliced token by token. At init generate is the original's; with random queries the sliced
    forward gives the full forward's last logits."""
    model = make_hf("gemma4").double()
    converted = rr.convert(model, num_blocks=4)
    x = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(converted.generate(x, **kw), model.generate(x, **kw))
    perturb_attn_res(converted, scale=3.0)
    handed = {id(model): [], id(converted): []}  # what the first KV-shared layer receives (transformers >= 5.24: one
    for net in (model, converted):  # token's state when the original receives one token)
        net.model.layers[2].register_forward_pre_hook(lambda module, args, net=net: handed[id(net)].append(args[0].shape))
    with torch.no_grad():
        model(x, logits_to_keep=1)
        full, last = converted(x).logits, converted(x, logits_to_keep=1).logits
    assert handed[id(converted)][1:] == handed[id(model)]
    assert last.shape[1] == 1 and rel_err(last[:, 0], full[:, -1]) <= 1e-10 and rel_err(full, model(x).logits) > 1e-3


def test_save_pretrained_and_from_pretrained(tmp_path):
    converted = rr.convert(make_hf("llama"), num_blocks=2, mixing="mean")
    perturb_attn_res(converted)
    converted.save_pretrained(tmp_path)
    loaded = rr.from_pretrained(tmp_path)
    assert type(loaded) is type(converted) and loaded.attn_res_report.config.mixing == "mean"
    x = torch.randint(0, 128, (2, 7))
    assert torch.equal(loaded(x).logits, converted(x).logits)
    saved = {k: v for k, v in converted.state_dict().items() if ".attn_res." in k}
    assert saved and all(torch.equal(loaded.state_dict()[k], v) for k, v in saved.items())


def test_training_keeps_class_and_trains():
    converted = rr.convert(make_hf("qwen2"))
    opt = torch.optim.AdamW(converted.parameters(), lr=1e-2)
    x = torch.randint(0, 128, (4, 12))
    converted.train()
    losses = []
    for _ in range(5):
        loss = converted(x, labels=x).loss  # HF computes the loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(p.abs().sum() > 0 for n, p in converted.named_parameters() if n.endswith(".query"))


def test_deepcopy_runs_the_copys_own_parameters(pair):
    _, converted = pair
    twin = copy.deepcopy(converted)
    x = torch.randint(0, 128, (2, 5))
    with torch.no_grad():
        twin.get_parameter("model.layers.1.attn_res.mlp.query").add_(1.0)
    assert twin.model.layers[1].forward.module is twin.model.layers[1]
    assert not torch.equal(twin(x).logits, converted(x).logits)
