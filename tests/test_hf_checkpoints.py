"""Hugging Face checkpoints of converted models: ``save_pretrained`` then
``residual_rewriter.from_pretrained(path)`` with nothing but the path restores the saved class (from
``config.architectures``) and every AttnRes parameter, for every architecture the README lists, whole
and sharded. The AttnRes parameters are perturbed before saving, so a dropped one shows.

Before: Mixtral, ViT and DeiT failed to reload (transformers renames module paths on save, the AttnRes
keys under them included, and the loader looked for the in-memory names); T5, ViT, DeiT and DINOv2
were loaded as ``AutoModelForCausalLM``, which refuses their configs.

transformers' own loaders never load a converted checkpoint without its AttnRes weights: the saved class
refuses it before building anything (it used to build a DEFAULT-size model: a 7B Llama), and the Auto
classes load it through ``residual_rewriter.from_pretrained`` with ``trust_remote_code=True``.
Trainer resumes and PEFT adapters round-trip; loading in bf16 and with ``device_map`` works."""
from __future__ import annotations

import copy

import pytest
import torch

import residual_rewriter as rr
from model_zoo import DECODERS, VISION, make_architecture, make_hf, perturb_attn_res, rel_err
from residual_rewriter import hf

ARCHITECTURES = sorted(DECODERS) + VISION + ["t5", "mpt"]  # mpt: converted with the model as the one holder


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
    assert type(loaded) is type(model) and loaded.attn_res_report.mode == model.attn_res_report.mode
    want = _attn_res_state(model)
    got = _attn_res_state(loaded)
    assert want.keys() == got.keys() and all(torch.equal(got[k], want[k]) for k in want)
    kwargs = hf.example_inputs(model, batch_size=2, seq_len=6)
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
    # ... and every module of the converted model reads its copy: a setting changed on it reaches them all
    assert all(m.config is other.config for m in other.modules() if hasattr(m, "config"))
    ids = torch.randint(0, 128, (2, 5))
    other.config.use_cache = False
    assert other(ids).past_key_values is None and baseline(ids).past_key_values is not None
    twin = copy.deepcopy(baseline)
    rr.convert_(twin)  # not refused as "already converted"
    baseline.save_pretrained(tmp_path)
    reloaded = type(baseline).from_pretrained(tmp_path)
    assert not hasattr(reloaded.config, "residual_rewriter")
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, baseline(ids).logits)


def _saved(name: str, path, **convert_options):
    torch.manual_seed(0)  # the same model whichever tests ran before
    model = make_architecture(name).float()
    rr.convert_(model, num_blocks=2, **convert_options)
    perturb_attn_res(model, seed=3)
    model.save_pretrained(path)
    return model.eval(), hf.example_inputs(model, batch_size=2, seq_len=6)


@pytest.mark.parametrize("name", ["llama", "vit", "t5"])
def test_the_saved_class_refuses_a_converted_checkpoint_before_building_it(name, tmp_path):
    transformers = pytest.importorskip("transformers")
    model, _ = _saved(name, tmp_path)
    # the config first: a config that loads here is what built a default-size (7B) model before
    with pytest.raises(Exception, match=r"residual_rewriter\.from_pretrained"):
        type(model).config_class.from_pretrained(tmp_path)
    with pytest.raises(Exception, match=r"residual_rewriter\.from_pretrained"):
        type(model).from_pretrained(tmp_path)


@pytest.mark.parametrize("name", ["llama", "vit"])
def test_auto_classes_load_the_attnres_model_with_trust_remote_code_and_refuse_without(name, tmp_path):
    transformers = pytest.importorskip("transformers")
    model, kwargs = _saved(name, tmp_path)
    auto, other = ((transformers.AutoModelForCausalLM, transformers.AutoModel) if name == "llama"
                   else (transformers.AutoModel, transformers.AutoModelForImageClassification))
    with pytest.raises(ValueError, match="trust_remote_code"):
        auto.from_pretrained(tmp_path)
    loaded = auto.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert type(loaded) is type(model) and loaded.attn_res_report.sites == model.attn_res_report.sites
    assert torch.equal(_outputs(loaded, kwargs), _outputs(model, kwargs))
    with pytest.raises(rr.ConversionError, match=rf"{other.__name__} builds another class.*residual_rewriter\.from_pretrained"):
        other.from_pretrained(tmp_path, trust_remote_code=True)


@pytest.mark.parametrize("name", ["llama", "mixtral", "t5"])
def test_loads_in_bf16_with_a_device_map_and_a_bf16_checkpoint_round_trips(name, tmp_path):
    pytest.importorskip("accelerate")
    model, kwargs = _saved(name, tmp_path / "fp32")
    loaded = rr.from_pretrained(str(tmp_path / "fp32"), dtype=torch.bfloat16, device_map="cpu").eval()
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    cast = {k: v.to(torch.bfloat16) for k, v in _attn_res_state(model).items()}
    assert cast.keys() == _attn_res_state(loaded).keys()
    assert all(torch.equal(v, cast[k]) for k, v in _attn_res_state(loaded).items())
    # the bf16 tier of test_convert_exact.TOLERANCE, against the float32 model
    assert rel_err(_outputs(loaded, kwargs).float(), _outputs(model, kwargs)) < 3e-2
    loaded.save_pretrained(tmp_path / "bf16")  # a bf16 checkpoint
    again = rr.from_pretrained(str(tmp_path / "bf16")).eval()
    assert {p.dtype for p in again.parameters()} == {torch.bfloat16}
    assert torch.equal(_outputs(again, kwargs), _outputs(loaded, kwargs))


def _train(model, ids, output_dir, steps: int, resume=None):
    import transformers

    data = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=2,
                                          learning_rate=1e-2, save_steps=2, report_to=[], use_cpu=True,
                                          disable_tqdm=True, data_seed=0, seed=0)
    transformers.Trainer(model=model, args=args, train_dataset=data).train(resume_from_checkpoint=resume)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", ["llama", "t5"])
def test_a_trainer_resumed_from_a_checkpoint_ends_where_an_uninterrupted_run_ends(name, tmp_path):
    """``save_steps`` then ``resume_from_checkpoint``: the resumed run (a freshly converted model) ends with
    the parameters, AttnRes included, of a run that never stopped. (Not Mixtral: transformers 5.25's
    Trainer cannot resume the original Mixtral, it reads the keys its save renamed as they are.)"""
    pytest.importorskip("accelerate")
    ids = torch.randint(0, 128, (8, 12), generator=torch.Generator().manual_seed(0))

    def fresh():
        torch.manual_seed(0)
        model = make_architecture(name).float()
        rr.convert_(model, num_blocks=2)
        return model

    straight = _train(fresh(), ids, tmp_path / "straight", steps=4)
    resumed = _train(fresh(), ids, tmp_path / "resumed", steps=4, resume=str(tmp_path / "straight" / "checkpoint-2"))
    queries = [k for k in straight if k.endswith(".query")]
    assert queries and all(straight[k].abs().max() > 0 for k in queries)  # trained away from zero
    assert straight.keys() == resumed.keys()
    assert all(torch.allclose(resumed[k], straight[k], rtol=1e-6, atol=1e-7) for k in straight)


@pytest.mark.parametrize("name, targets", [("t5", ["q", "v"]), ("vit", ["q_proj", "v_proj"]), ("mixtral", ["q_proj"])])
def test_a_peft_adapter_with_the_attnres_parameters_round_trips(name, targets, tmp_path):
    """LoRA with ``modules_to_save=["attn_res"]`` on other families than test_inplace's Llama: the trained
    AttnRes parameters are saved in the adapter and load back onto a freshly converted base model."""
    peft = pytest.importorskip("peft")
    model, kwargs = _saved(name, tmp_path / "base")
    base = rr.from_pretrained(str(tmp_path / "base"))  # the same base weights, for the reload below
    tuned = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=targets, modules_to_save=["attn_res"]))
    opt = torch.optim.SGD([p for p in tuned.parameters() if p.requires_grad], lr=0.5)
    _outputs(tuned.train(), kwargs)  # a first call in train mode, as training starts
    with torch.enable_grad():
        loss = tuned(**kwargs)
        loss = (loss.logits if hasattr(loss, "logits") else loss.last_hidden_state).square().mean()
    loss.backward()
    opt.step()
    tuned.eval()
    tuned.save_pretrained(tmp_path / "adapter")
    reloaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    saved_queries = {k: v for k, v in tuned.state_dict().items() if k.endswith(".query") and "modules_to_save" in k}
    assert saved_queries and all(v.abs().max() > 0 for v in saved_queries.values())
    assert torch.equal(_outputs(reloaded, kwargs), _outputs(tuned, kwargs))
