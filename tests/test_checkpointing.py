"""Activation checkpointing survives ``convert``: a Hugging Face layer that had it on checkpoints its
rewritten forward (``LayerForward._checkpointed``, the AttnRes state's tensors passed flat). Checked by
behaviour: the attention runs again in the backward (recompute), fewer activations are saved, numbers
and gradients equal the unchecked conversion, and nothing is recomputed in eval or under no_grad."""
from __future__ import annotations

import copy

import pytest
import torch

import residual_rewriter as rr

from model_zoo import logits_of, make_hf, perturb_attn_res, rel_err


def _pair():
    """(converted with checkpointing on, converted without), same weights and queries."""
    torch.manual_seed(0)
    model = make_hf("llama").train()
    plain = copy.deepcopy(model)
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()  # transformers v5 name first; the v4 one still works there, with a FutureWarning
    ckpt, ref = rr.convert(model, num_blocks=2), rr.convert(plain, num_blocks=2)
    perturb_attn_res(ckpt, seed=1)
    ref.load_state_dict(ckpt.state_dict())
    return ckpt, ref


def _attention_calls(model, fn):
    calls = []
    # pre-hooks: a recompute may stop early (torch.utils.checkpoint early stop), before forward hooks
    hooks = [m.register_forward_pre_hook(lambda *a: calls.append(1)) for n, m in model.named_modules()
             if n.endswith("self_attn")]
    try:
        fn()
    finally:
        for h in hooks:
            h.remove()
    return len(calls)


def _saved_bytes(fn):
    total = []

    def pack(t):
        total.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(total)


def test_checkpointed_layers_recompute_in_the_backward_and_match():
    ckpt, ref = _pair()
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    assert ckpt.state_dict().keys() == ref.state_dict().keys()  # nothing registered twice

    def step(model):
        model.zero_grad(set_to_none=True)
        logits_of(model(ids)).float().pow(2).mean().backward()

    assert _attention_calls(ckpt, lambda: step(ckpt)) == 2 * 3  # 3 layers: forward + recompute
    assert _attention_calls(ref, lambda: step(ref)) == 3
    for name, p in ref.named_parameters():
        q = dict(ckpt.named_parameters())[name]
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0)
    assert _saved_bytes(lambda: ckpt(ids)) < _saved_bytes(lambda: ref(ids))
    twin = copy.deepcopy(ckpt)  # keeps its checkpointing (a GraphModule copy would drop plain attributes)
    assert _attention_calls(twin, lambda: step(twin)) == 2 * 3


@pytest.mark.parametrize("mode", ["eval", "no_grad"])
def test_no_recompute_where_the_layer_would_not_checkpoint(mode):
    ckpt, _ = _pair()
    ids = torch.randint(0, 128, (2, 12))
    if mode == "eval":
        ckpt.eval()
        assert _attention_calls(ckpt, lambda: logits_of(ckpt(ids)).sum().backward()) == 3
    else:
        with torch.no_grad():
            assert _attention_calls(ckpt, lambda: ckpt(ids)) == 3


def test_a_checkpointed_model_compiles_as_the_original_does():
    """Under torch.compile a checkpointed converted model compiles into as many graphs as the
    original (transformers 5.25 on CPU: Dynamo runs the checkpointed layers eagerly, for the original
    too; the graphs hold only the code around them), and computes the same loss and gradients."""
    ckpt, ref = _pair()
    original = make_hf("llama").train()
    (getattr(original, "activation_checkpointing_enable", None) or original.gradient_checkpointing_enable)()
    ids = torch.randint(0, 128, (2, 12))

    def compiled_graphs(model):
        torch._dynamo.reset()
        graphs = []

        def record(gm, example_inputs):
            graphs.append(len(gm.graph.nodes))
            return gm.forward

        out = logits_of(torch.compile(model, backend=record)(ids))
        out.float().pow(2).mean().backward()
        return out, graphs

    ckpt.zero_grad(set_to_none=True)
    out, graphs = compiled_graphs(ckpt)
    assert len(graphs) == len(compiled_graphs(original)[1])
    assert rel_err(out, logits_of(ref(ids))) < 1e-5
    assert all(p.grad is not None for n, p in ckpt.named_parameters() if ".query" in n)


def test_checkpointed_model_trains_with_labels():
    torch.manual_seed(0)
    model = make_hf("llama").train()
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    conv = rr.convert(model, num_blocks=2)
    ids = torch.randint(0, 128, (2, 12))
    calls = _attention_calls(conv, lambda: conv(input_ids=ids, labels=ids).loss.backward())
    assert calls == 2 * 3
    assert all(p.grad is not None for n, p in conv.named_parameters() if ".query" in n)


def test_a_hand_written_checkpoint_is_kept_around_a_converted_layer():
    """A model's own forward that checkpoints each layer (non-reentrant): the layers stay modules
    called by that forward, so the checkpoint stays, recomputes, and keeps every gradient."""
    from torch.utils.checkpoint import checkpoint

    from toy_models import ToyLM

    class CheckpointedToy(ToyLM):
        def forward(self, idx):
            x = self.emb(idx)
            for blk in self.blocks:
                x = checkpoint(blk, x, use_reentrant=False)
            return self.head(self.norm_f(x))

    torch.manual_seed(0)
    model = CheckpointedToy().double()
    plain = ToyLM().double()
    plain.load_state_dict(model.state_dict())
    conv, ref = rr.convert(model), rr.convert(plain)
    assert conv.attn_res_report.checkpoint_dropped == [] and conv.attn_res_report.mode == "in place, layer by layer"
    perturb_attn_res(conv, seed=1)
    ref.load_state_dict(conv.state_dict())
    (idx,) = model.example_inputs()
    conv.eval(), ref.eval()  # no dropout: the two runs must agree exactly
    calls = []
    hooks = [b.fc1.register_forward_pre_hook(lambda *a: calls.append(1)) for b in conv.blocks]
    conv(idx).pow(2).mean().backward()
    for h in hooks:
        h.remove()
    ref(idx).pow(2).mean().backward()
    assert len(calls) == 2 * len(conv.blocks)  # every layer ran again in the backward
    for name, p in ref.named_parameters():
        torch.testing.assert_close(conv.get_parameter(name).grad, p.grad, rtol=0, atol=0)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_a_checkpoint_inside_a_model_converted_as_one_holder_is_reported_loudly(use_reentrant):
    """The adds in the model's own forward, which also checkpoints its sublayers: the model is the
    holder and runs them inline, so the checkpoint is gone; convert says so (warning + report)."""
    from torch.utils.checkpoint import checkpoint

    from test_convert import AddsInItsOwnForward

    class Flat(AddsInItsOwnForward):
        def forward(self, x):
            for norm, mlp in zip(self.norms, self.mlps):
                x = x + checkpoint(mlp, norm(x), use_reentrant=use_reentrant)
            return self.out(x)

    with pytest.warns(UserWarning, match="does NOT checkpoint"):
        conv = rr.convert(Flat(), torch.randn(2, 5, 12))
    assert conv.attn_res_report.checkpoint_dropped == [""]  # called from the model's own forward (the root)
    assert "NOT kept" in str(conv.attn_res_report)
    import warnings

    from toy_models import ToyLM

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and nothing is said where nothing was dropped
        assert rr.convert(ToyLM()).attn_res_report.checkpoint_dropped == []


@pytest.mark.parametrize("name", ["gpt_neox", "gpt2", "dinov2"])
def test_other_architectures_keep_checkpointing(name):
    """Parallel blocks (GPT-NeoX: the sublayer is the layer itself), GPT-2, and a vision backbone whose
    branch ends in the layer's own code (DINOv2's layer scale): every attention runs again in the
    backward, and nothing is reported dropped."""
    transformers = pytest.importorskip("transformers")
    from residual_rewriter import hf

    kw = dict(vocab_size=128, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4)
    if name == "gpt2":
        kw = dict(vocab_size=128, n_embd=48, n_layer=2, n_head=4)
    if name == "dinov2":
        kw = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
        model = transformers.AutoModel.from_config(transformers.AutoConfig.for_model(name, **kw))
    else:
        model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(name, **kw))
    model.train()
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    conv = rr.convert(model, num_blocks=2)
    assert conv.attn_res_report.checkpoint_dropped == []
    (x,) = hf.example_inputs(model, batch_size=2, seq_len=7).values()
    calls = []
    attn = [m for m in conv.modules() if type(m).__name__.endswith("Attention")]
    hooks = [m.register_forward_pre_hook(lambda *a: calls.append(1)) for m in attn]
    out = conv(x)
    forward_calls = len(calls)
    (out.logits if hasattr(out, "logits") else out.last_hidden_state).float().pow(2).mean().backward()
    for h in hooks:
        h.remove()
    assert forward_calls == 2 and len(calls) == 2 * forward_calls  # 2 layers, each recomputed once


def test_detect_leaves_a_checkpointed_hooked_model_as_it_was():
    """``detect`` converts, verifies and rolls back: values, modes, hooks, checkpointing, attributes
    and classes are as they were, and the report is the one ``convert`` gives."""
    torch.manual_seed(0)
    model = make_hf("llama").train()
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    model.model.layers[0].register_forward_hook(lambda *a: None)

    def state(m):
        """What detect must leave as it was: values, modes, hooks, checkpointing, attributes, class."""
        mods = dict(m.named_modules())
        hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
        return dict(
            tensors={k: v.detach().clone() for k, v in m.state_dict().items()},
            training={n: x.training for n, x in mods.items()},
            hooks={n: [list(getattr(x, h).values()) for h in hooks] for n, x in mods.items()},
            checkpointing={n: getattr(x, "gradient_checkpointing", None) for n, x in mods.items()},
            attributes={n: sorted(vars(x)) for n, x in mods.items()},
            classes={n: type(x) for n, x in mods.items()},
            config=m.config.to_dict(),
        )

    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    before, out_before = state(model), model(ids).logits.detach()
    report = rr.detect(model)
    after = state(model)
    for what in before:
        if what == "tensors":
            assert before[what].keys() == after[what].keys()
            assert all(torch.equal(before[what][k], after[what][k]) for k in before[what]), what
        else:
            assert before[what] == after[what], what
    assert torch.equal(model(ids).logits, out_before)
    assert report.checkpoint_dropped == [] and report.hooks_not_called == [] and not report.converted
    converted = rr.convert(model).attn_res_report
    assert (report.mode, report.holders, report.sites) == (converted.mode, converted.holders, converted.sites)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_a_cache_handed_to_a_checkpointed_layer_is_dropped_as_the_original_drops_it(use_reentrant):
    """NemotronH's model hands its layers a cache in training too; Hugging Face's checkpointing forward
    (which the converted forward replaces) passes ``cache=None`` then, so that the recompute does not find
    it written (its Mamba conv state: other shapes). Kept, it failed (non-reentrant) or gave wrong
    gradients (reentrant). Now: the original's outputs and gradients, checkpointed alike."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "NemotronHForCausalLM"):
        pytest.skip("no NemotronH in this transformers")
    from model_zoo import assert_same_training_step

    cfg = transformers.AutoConfig.for_model(
        "nemotron_h", vocab_size=128, hidden_size=32, num_hidden_layers=2, layers_block_type=["mamba", "attention"],
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, mamba_num_heads=4, mamba_head_dim=16,
        ssm_state_size=16, n_groups=1, intermediate_size=64, expand=2)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    converted = rr.convert(model, num_blocks=2)
    if use_reentrant and type(model.model.layers[0]).__call__ is not torch.nn.Module.__call__:
        pytest.skip("transformers < 5.24 checkpoints around the layer (__call__): reentrant is refused there")
    for net in (model, converted):
        net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    assert_same_training_step(model, converted, lambda net: net(ids).logits, "nemotron_h", tolerance=1e-5)
