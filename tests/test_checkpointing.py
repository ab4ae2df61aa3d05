"""Activation checkpointing survives ``convert``: FX tracing drops ``torch.utils.checkpoint`` (it just
calls the function), so ``passes/checkpointing.py`` checkpoints the sublayers of every Hugging Face
layer that had it on. Checked by behaviour: the attention runs again in the backward (recompute),
fewer activations are saved, numbers and gradients equal the unchecked conversion, and nothing is
recomputed in eval or under no_grad."""
from __future__ import annotations

import copy

import pytest
import torch

import residual_rewriter as rr
from residual_rewriter.backend import make_attnres_backend

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
    assert len(ckpt.report.checkpointed) == 6 and "activation checkpointing kept" in str(ckpt.report)
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


def test_compile_backend_still_sees_every_aggregation_of_a_checkpointed_model():
    ckpt, ref = _pair()
    ids = torch.randint(0, 128, (2, 12))
    backend = make_attnres_backend(compiler="aot_eager", lower=None)
    ckpt.zero_grad(set_to_none=True)
    out = logits_of(torch.compile(ckpt, backend=backend)(ids))
    out.float().pow(2).mean().backward()
    assert backend.last_log["find"]["aggregations"] == 6  # 5 sublayers + the final one, none hidden in a region
    assert backend.last_log["batch_two_phase"]["phase1"] >= 1
    assert rel_err(out, logits_of(ref(ids))) < 1e-5
    assert all(p.grad is not None for n, p in ckpt.named_parameters() if ".query" in n)


def test_keep_class_model_keeps_checkpointing_and_trains_with_labels():
    torch.manual_seed(0)
    model = make_hf("llama").train()
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    conv = rr.convert(model, num_blocks=2, keep_class=True)
    ids = torch.randint(0, 128, (2, 12))
    conv(input_ids=ids, labels=ids)  # the first call of a signature captures and converts its graph
    calls = _attention_calls(conv, lambda: conv(input_ids=ids, labels=ids).loss.backward())
    assert calls == 2 * 3


def test_a_hand_written_checkpoint_that_tracing_drops_is_reported_loudly():
    """A forward that calls torch.utils.checkpoint itself: tracing inlines it and convert cannot put
    it back, so it says so (warning + report) instead of dropping it silently."""
    from torch.utils.checkpoint import checkpoint

    from toy_models import ToyLM

    class CheckpointedToy(ToyLM):
        def forward(self, idx):
            x = self.emb(idx)
            for blk in self.blocks:
                x = checkpoint(blk, x, use_reentrant=False)
            return self.head(self.norm_f(x))

    with pytest.warns(UserWarning, match="does NOT checkpoint"):
        conv = rr.convert(CheckpointedToy())
    assert conv.attn_res_report.checkpoint_dropped == [""]  # called from the model's own forward (the root)
    assert "NOT kept" in str(conv.attn_res_report)
    plain = ToyLM()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and nothing is said where nothing was dropped
        assert rr.convert(plain).report.checkpoint_dropped == []


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
    assert conv.attn_res_report.checkpointed and conv.attn_res_report.checkpoint_dropped == []
    (x,) = hf.example_inputs(model, batch_size=2, seq_len=7)
    calls = []
    attn = [m for m in conv.modules() if type(m).__name__.endswith("Attention")]
    hooks = [m.register_forward_pre_hook(lambda *a: calls.append(1)) for m in attn]
    out = conv(x)
    forward_calls = len(calls)
    (out.logits if hasattr(out, "logits") else out.last_hidden_state).float().pow(2).mean().backward()
    for h in hooks:
        h.remove()
    assert forward_calls == 2 and len(calls) == 2 * forward_calls  # 2 layers, each recomputed once


def test_detect_reports_checkpointing_and_hooks_before_converting():
    """``detect`` tells in advance what ``convert`` will keep under checkpointing and which hooks will
    not run, without changing the model."""
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
    assert len(report.checkpointed) == 6 and report.checkpoint_dropped == []
    assert report.hooks_not_called == ["model.layers.0"]
    assert "checkpointing kept" in str(report) and "NOT called" in str(report)
