"""``convert`` returns a converted copy of the user's own class that behaves like the model: shapes,
modes, state, copies, dtype, training; and the user's original model is left exactly as it was."""
from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch

import residual_rewriter as rr
from model_zoo import logits_of, make_gpt, make_hf, perturb_attn_res, rel_err
from toy_models import ToyLM


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_original_model_untouched():
    model = make_hf("llama")
    before = snapshot(model)
    x = torch.randint(0, 128, (2, 7))
    ref = logits_of(model(x)).detach()
    converted = rr.convert(model)
    assert type(converted) is type(model) and converted is not model
    assert converted.config is not model.config and not hasattr(model.config, "residual_rewriter")
    assert callable(converted.generate) and callable(converted.save_pretrained)
    opt = torch.optim.SGD(converted.parameters(), lr=0.1)
    logits_of(converted(x)).square().mean().backward()
    opt.step()
    after = snapshot(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(logits_of(model(x)), ref)
    assert not model.training and not any(hasattr(m, "attn_res") or "forward" in m.__dict__ for m in model.modules())
    # converted params are a copy by default ...
    model_ptrs = {p.data_ptr() for p in model.parameters()}
    assert not model_ptrs & {p.data_ptr() for p in converted.parameters()}


def test_other_batch_and_sequence_lengths():
    model = make_gpt().double()
    converted = rr.convert(model)  # traced with (2, 16)
    for shape in [(1, 1), (5, 7), (3, 33)]:
        x = torch.randint(0, 256, shape)
        assert converted(x).shape == (*shape, 256)
        assert rel_err(converted(x), model(x)) <= 1e-10


def test_train_eval_and_dropout_follow_the_original():
    torch.manual_seed(0)
    model = ToyLM("layernorm").double()  # has dropout 0.1 in every branch
    converted = rr.convert(model)
    x = model.example_inputs()[0]
    converted.train()
    assert all(m.training for m in converted.modules())
    assert not torch.equal(converted(x), converted(x))  # dropout is live
    converted.eval()
    assert not any(m.training for m in converted.modules())
    model.eval()
    assert rel_err(converted(x), model(x)) <= 1e-10


def test_training_mode_is_kept_at_conversion():
    model = make_gpt().train()
    assert rr.convert(model).training
    assert not rr.convert(model.eval()).training


def test_state_dict_roundtrip_and_names():
    converted = rr.convert(make_gpt(), num_blocks=2)
    perturb_attn_res(converted)
    names = [n for n, _ in converted.named_parameters() if ".attn_res." in n]
    assert "transformer.h.0.attn_res.mlp.query" in names
    assert not any("h.0.attn_res.attn" in n for n in names)  # the first sublayer has one source: no query
    assert "transformer.h.3.attn_res.final.key_norm_weight" in names
    assert len(names) == 2 * len(converted.attn_res_report.sites)  # sites - first + final
    buf = io.BytesIO()
    torch.save(converted.state_dict(), buf)
    fresh = rr.convert(make_gpt(), num_blocks=2)
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    x = torch.randint(0, 256, (2, 5))
    assert torch.equal(fresh(x), converted(x))


@pytest.mark.parametrize("other", [dict(num_blocks=4), dict(block_size=3), dict(num_blocks=2, mixing="mean")])
def test_a_state_dict_from_another_block_layout_is_refused(other):
    """Queries have the same names and shapes under any block layout: only the recorded layout tells
    that a query was trained on other sources. Loading one silently would compute something else."""
    trained = rr.convert(make_gpt(), num_blocks=2)
    perturb_attn_res(trained)
    elsewhere = rr.convert(make_gpt(), **other)
    with pytest.raises(RuntimeError, match=r"attn_res\.\w+\._extra_state.*converted with other options"):
        elsewhere.load_state_dict(trained.state_dict())
    with pytest.raises(RuntimeError, match="num_blocks, block_size, mixing"):
        elsewhere.load_state_dict(trained.state_dict(), strict=False)


def test_a_state_dict_saved_without_a_layout_loads_with_a_warning():
    trained = rr.convert(make_gpt(), num_blocks=2)
    perturb_attn_res(trained)
    old = {k: v for k, v in trained.state_dict().items() if not k.endswith("._extra_state")}
    fresh = rr.convert(make_gpt(), num_blocks=2)
    with pytest.warns(UserWarning, match="records no AttnRes block layout"):
        fresh.load_state_dict(old)
    x = torch.randint(0, 256, (2, 5))
    assert torch.equal(fresh(x), trained(x))
    assert "transformer.h.1.attn_res.mlp._extra_state" not in old  # the caller's dict is left as it was


def test_deepcopy_and_dtype():
    converted = rr.convert(make_gpt(), num_blocks=2)
    perturb_attn_res(converted)
    twin = copy.deepcopy(converted)
    assert type(twin) is type(converted) and twin.attn_res_report.sites == converted.attn_res_report.sites
    x = torch.randint(0, 256, (2, 5))
    assert torch.equal(twin(x), converted(x))
    query = "transformer.h.1.attn_res.mlp.query"
    assert twin.get_parameter(query).data_ptr() != converted.get_parameter(query).data_ptr()
    with torch.no_grad():
        twin.get_parameter(query).add_(1.0)  # the copy runs its own parameters
    assert not torch.equal(twin(x), converted(x))
    wide = twin.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in wide.parameters())
    assert wide(x).dtype == torch.float64


def test_optimizer_trains_and_every_query_gets_a_gradient():
    torch.manual_seed(0)
    model = make_gpt()
    converted = rr.convert(model, num_blocks=3)
    opt = torch.optim.AdamW(converted.parameters(), lr=3e-3)
    x = torch.randint(0, 256, (4, 16))
    losses = []
    for _ in range(8):
        logits = converted(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        if not losses:
            for name, p in converted.named_parameters():
                if name.endswith(".query"):
                    assert p.grad is not None and p.grad.abs().sum() > 0, name
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert any(p.abs().sum() > 0 for n, p in converted.named_parameters() if n.endswith(".query"))


def test_report_is_reachable_from_the_module():
    converted = rr.convert(make_hf("qwen2"))
    assert converted.attn_res_report.converted
    assert len(converted.attn_res_report.sites) == 6
    assert "model.layers.2.mlp" in str(converted.attn_res_report)


def test_forward_reading_self_training_follows_the_mode():
    """A traced-through forward with F.dropout(training=self.training) and p chosen by mode: one
    graph that follows train()/eval() (no module had to be kept opaque)."""
    from toy_models import ModeLM

    torch.manual_seed(0)
    model = ModeLM().double()
    converted = rr.convert(model)
    report = converted.attn_res_report
    assert report.plan.opaque_modules == {} and len(report.sites) == 3
    x = model.example_inputs()[0]
    converted.train()
    assert not torch.equal(converted(x), converted(x))
    converted.eval()
    model.eval()
    assert rel_err(converted(x), model(x)) <= 1e-10


# A fresh process that loads a pickled converted model and imports nothing of ours itself: the pickle
# brings what it needs (the custom ops included), a call signature never seen traces a new graph, and
# save_pretrained still marks the checkpoint (a bound method would come back as the class's own).
_LOAD_IN_A_FRESH_PROCESS = """
import json, os, sys, torch
assert "residual_rewriter" not in sys.modules
saved = torch.load(sys.argv[1], weights_only=False)
model, ids = saved["model"], saved["ids"]
with torch.no_grad():
    assert torch.equal(model(ids).logits, saved["logits"])
    before = len(model.model.layers[0].forward.graphs)
    masked = model(ids, attention_mask=torch.ones_like(ids), output_hidden_states=True, use_cache=False)
    assert len(model.model.layers[0].forward.graphs) > before
    assert torch.equal(masked.logits, saved["logits"])
model.save_pretrained(sys.argv[2])
print(json.load(open(os.path.join(sys.argv[2], "config.json")))["model_type"])
"""


def test_torch_save_of_the_whole_model_loads_in_a_fresh_process(tmp_path):
    """``torch.save(model)`` (what ``mp.spawn`` and multiprocessing do too): each rewritten layer's
    graphs travel as graphs; the loaded model computes what the saved one did (non-zero queries),
    traces a call signature it never saw, and saves a marked Hugging Face checkpoint."""
    import subprocess
    import sys

    converted = rr.convert(make_hf("llama").double(), num_blocks=2)
    perturb_attn_res(converted)
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        logits = converted(ids).logits
    torch.save({"model": converted, "ids": ids, "logits": logits}, tmp_path / "model.pt")
    proc = subprocess.run([sys.executable, "-c", _LOAD_IN_A_FRESH_PROCESS, str(tmp_path / "model.pt"), str(tmp_path / "hf")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-1] == "residual_rewriter-llama"


@pytest.mark.parametrize("name", ["gpt", "t5", "mpt"])
def test_a_pickled_copy_runs_the_same_graphs_on_its_own_parameters(name):
    """Through pickle, every graph of every rewritten module comes back with the same code, and the
    copy computes what the model does (non-zero queries) on its own parameters. T5: two streams; MPT:
    the model itself as the one holder."""
    from model_zoo import make_architecture
    from residual_rewriter import hf
    from residual_rewriter.passes.layerwise import installed_forwards

    model = make_gpt() if name == "gpt" else make_architecture(name)
    inputs = {"idx": model.example_inputs()[0]} if name == "gpt" else hf.example_inputs(model, batch_size=2, seq_len=5)
    converted = rr.convert(model, num_blocks=2)
    perturb_attn_res(converted)
    buffer = io.BytesIO()
    torch.save(converted, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    pairs = list(zip(installed_forwards(converted), installed_forwards(loaded), strict=True))
    assert pairs and all(a[0] == b[0] and a[1].graphs.keys() == b[1].graphs.keys() for a, b in pairs)
    for (_, saved), (_, restored) in pairs:
        for key, graph in saved.graphs.items():
            assert restored.graphs[key].graph_module.code == graph.graph_module.code
            assert restored.graphs[key].names == graph.names
        assert str(restored.original_graph) == str(saved.original_graph)
    with torch.no_grad():
        want = logits_of(converted(**inputs))
        assert torch.equal(logits_of(loaded(**inputs)), want)
        for p in loaded.parameters():
            p.add_(0.01)
        assert not torch.equal(logits_of(loaded(**inputs)), want)
        assert torch.equal(logits_of(converted(**inputs)), want)


@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_autocast_training_keeps_the_stream_in_fp32_and_matches_the_original_at_init(kind):
    """Under autocast the branches return bf16 while the residual stream stays fp32 (fp32 + bf16
    promotes). The block sums follow the same promotion, so every aggregation reads fp32 sources
    (mixed dtypes used to raise) and the converted model equals the original at initialisation, both
    in train mode: exactly in float64 (relative 1e-10). Under bf16 autocast only to bf16 rounding: the
    aggregation sums its fp32 sources in another order than the chain of adds, and a one-ulp change of
    the fp32 stream flips bf16 roundings in later branches (measured: up to 3e-3 in the logits), so
    autocast alone cannot tell an exact conversion from one that is 1e-3 off; float64 can."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class SourceDtypes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "residual_rewriter" in str(func):
                self.seen |= {s.dtype for s in args[0]}
            return func(*args, **(kwargs or {}))

    model = (make_gpt() if kind == "gpt" else make_hf("llama")).train()  # the original trains too
    x = model.example_inputs()[0] if kind == "gpt" else torch.randint(0, 128, (2, 12))
    exact = copy.deepcopy(model).double()
    conv = rr.convert(model, block_size=2).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = logits_of(model(x)).float()
        with SourceDtypes() as mode:
            out = logits_of(conv(x)).float()
    assert mode.seen == {torch.float32}
    assert rel_err(out, ref) <= 1e-2  # bf16 rounding (see above); exactness is checked in float64:
    conv64 = rr.convert(exact, block_size=2).train()
    assert exact.training and conv64.training
    assert rel_err(logits_of(conv64(x)), logits_of(exact(x))) <= 1e-10
    perturb_attn_res(conv, seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = logits_of(conv(x)).float().pow(2).mean()
    loss.backward()
    grads = [p.grad for n, p in conv.named_parameters() if ".query" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_a_compiled_module_is_refused_with_what_to_do():
    model = make_gpt()
    with pytest.raises(rr.ConversionError, match=r"wrapped by torch.compile.*_orig_mod"):
        rr.convert(torch.compile(model), model.example_inputs())


def test_hooks_on_layers_keep_running():
    """The layers stay modules called by the model's own forward: hooks on them and on their
    children run as before, and nothing is reported lost."""
    import warnings

    model = make_hf("llama").eval()
    calls = []
    model.model.layers[1].register_forward_hook(lambda *a: calls.append("layer"))
    model.model.layers[1].self_attn.register_forward_hook(lambda *a: calls.append("attn"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        conv = rr.convert(model, num_blocks=2)
    assert conv.attn_res_report.hooks_not_called == []
    calls.clear()
    conv(torch.randint(0, 128, (2, 8)))
    assert calls == ["attn", "layer"]


class AddsInItsOwnForward(torch.nn.Module):
    """The residual adds sit in the model's own loop; each sublayer is a small MLP module."""

    def __init__(self, d=12, n=3):
        super().__init__()
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(d) for _ in range(n))
        self.mlps = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(d, d), torch.nn.GELU()) for _ in range(n))
        self.out = torch.nn.LayerNorm(d)

    def forward(self, x):
        for norm, mlp in zip(self.norms, self.mlps):
            x = x + mlp(norm(x))
        return self.out(x)


class DropWhenTraining(torch.nn.Module):
    """Python control flow on ``self.training``: the training graph has nodes the eval graph lacks, adds
    among them (timm's drop_path builds its mask's shape with tuple sums), so node names shift."""

    def forward(self, h):
        if not self.training:
            return h
        shape = (h.shape[0],) + (1,) * (h.ndim - 1)
        return h * h.new_empty(shape).bernoulli_(0.5) * 2.0


class TrainOnlyBlock(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm, self.fc = torch.nn.LayerNorm(d), torch.nn.Linear(d, d)

    def forward(self, x):
        h = self.fc(self.norm(x))
        if self.training:  # in the layer's own forward: its graph differs between the modes
            h = torch.nn.functional.dropout(h, 0.5)
        return x + h


class TrainOnlyLayersLM(AddsInItsOwnForward):
    """Layers whose own forward branches on self.training (converted layer by layer)."""

    def __init__(self, d=12, n=3):
        super().__init__(d, n)
        self.layers = torch.nn.ModuleList(TrainOnlyBlock(d) for _ in range(n))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.out(x)


class TrainOnlyFlatLM(AddsInItsOwnForward):
    """The adds in the model's own forward (the model is the one holder), a child traced into that
    branches on self.training, and the model's own forward branching too; two streams (a second stage,
    wider, after the first one's norm)."""

    def __init__(self, d=12, n=3):
        super().__init__(d, n)
        self.drop = DropWhenTraining()
        self.widen, self.stage2 = torch.nn.Linear(d, 16), AddsInItsOwnForward(16, 2)

    def forward(self, x):
        for norm, mlp in zip(self.norms, self.mlps):
            h = self.drop(mlp(norm(x)))
            if self.training:
                h = h * 0.5
            x = x + h
        x = self.widen(self.out(x))
        for norm, mlp in zip(self.stage2.norms, self.stage2.mlps):
            x = x + self.drop(mlp(norm(x)))
        return self.stage2.out(x)


@pytest.mark.parametrize("convert_in", ["eval", "train"])
@pytest.mark.parametrize("cls", [TrainOnlyLayersLM, TrainOnlyFlatLM])
def test_a_forward_that_branches_on_self_training_is_exact_in_both_modes(cls, convert_in):
    """Each mode runs the graph traced in that mode: the converted model computes what the original
    computes in training (same random draws: dropout masks alike) and in eval, whichever mode it was
    converted in. Both graphs share the sites and parameters found once."""
    torch.manual_seed(0)
    model = cls().double()
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    converted = rr.convert(model.train(convert_in == "train"), x)
    assert converted.attn_res_report.mode.endswith("layer by layer" if cls is TrainOnlyLayersLM else "one holder")
    for training in (True, False):
        model.train(training), converted.train(training)
        outputs = []
        for net in (model, converted, converted):
            torch.manual_seed(1)
            outputs.append(net(x))
        assert rel_err(outputs[1], outputs[0]) <= 1e-10, f"training={training}"
        torch.manual_seed(2)
        assert torch.equal(converted(x), outputs[1]) != training  # dropout is drawn in training only
    perturb_attn_res(converted)
    converted.train()
    converted(x).pow(2).mean().backward()
    assert all(p.grad is not None for p in rr.attn_res_parameters(converted))


class InlineFinalNorm(AddsInItsOwnForward):
    """The adds in the model's own forward, its final norm written out inline (``x * rsqrt(...) * w``)."""

    def __init__(self, d=12, n=3):
        super().__init__(d, n)
        self.w = torch.nn.Parameter(torch.ones(d))

    def forward(self, x):
        for norm, mlp in zip(self.norms, self.mlps):
            x = x + mlp(norm(x))
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.w


try:  # a Hugging Face output class among this module's globals: captured as one call (capture._autowrap_candidates)
    from transformers.modeling_outputs import BaseModelOutput
except ImportError:
    BaseModelOutput = None


class EndInAnOutputObject(AddsInItsOwnForward):
    """The adds in the model's own forward; the end reaches the final norm through a Hugging Face
    output object (a base model's output, inlined into the model as one holder)."""

    def forward(self, x):
        for norm, mlp in zip(self.norms, self.mlps):
            x = x + mlp(norm(x))
        return self.out(BaseModelOutput(last_hidden_state=x).last_hidden_state)


@pytest.mark.parametrize("cls, consumer", [(InlineFinalNorm, "inline norm mul"), (EndInAnOutputObject, "base_model_output")])
def test_a_stream_of_the_model_as_one_holder_ends_in_a_norm_written_inline_or_reached_through_an_object(cls, consumer):
    """The stream's end must feed a norm: written out inline (the region from the end to the first
    node that is scale-invariant in it), or taken back out of an object holding the very tensor.
    Converted exactly; the report names what reads the end."""
    if cls is EndInAnOutputObject and BaseModelOutput is None:
        pytest.skip("needs transformers")
    model = cls().double()
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    converted = rr.convert(model, x, block_size=1)
    report = converted.attn_res_report
    assert report.holders == [""] and report.streams[0].consumers == [consumer]
    assert rel_err(converted(x), model(x)) <= 1e-10
    perturb_attn_res(converted)
    assert rel_err(converted(x), model(x)) > 1e-3


def test_hooks_inside_a_model_converted_as_one_holder_are_reported():
    """When the adds sit in the model's own forward, the model is the holder and runs its non-leaf
    children inline: a hook on one cannot run, and convert says so."""
    model = AddsInItsOwnForward().double()
    model.mlps[1].register_forward_hook(lambda *a: None)
    with pytest.warns(UserWarning, match=r"hooks on mlps.1 are NOT called") as record:
        conv = rr.convert(model, torch.randn(2, 5, 12, dtype=torch.float64))
    assert {w.filename for w in record if "NOT called" in str(w.message)} == {__file__}  # the user's line
    assert conv.attn_res_report.mode == "in place, the model as one holder"
    assert conv.attn_res_report.hooks_not_called == ["mlps.1"] and "NOT called" in str(conv.attn_res_report)


def test_backward_hooks_on_layers_handing_on_the_state_are_reported():
    """torch calls a full backward hook around a module's tensors only; a converted layer in a chain takes or
    returns an ``AttnResState``: its backward hooks cannot run, and ``convert_`` says so (forward hooks run)."""
    model = make_gpt()
    model.transformer.h[1].register_full_backward_hook(lambda *a: None)
    model.transformer.h[2].register_forward_hook(lambda *a: None)
    with pytest.warns(UserWarning, match=r"hooks on transformer.h.1 are NOT called .* take or return an AttnResState"):
        rr.convert_(model)
    assert model.attn_res_report.hooks_not_called == ["transformer.h.1"]


def test_converted_under_inference_mode_and_in_eval_the_model_trains_and_keeps_its_modes():
    """Converting under ``torch.inference_mode()`` would make the AttnRes parameters inference tensors (no
    backward, ever); a model built there (inference buffers) converts too. An eval model's new ``attn_res``
    modules are in eval too."""
    model = make_gpt().eval()
    with torch.inference_mode():
        built_inside = make_hf("llama")  # (its rotary frequencies: inference buffers)
        want = logits_of(built_inside(torch.arange(6)[None]))
        (x,) = model.example_inputs()
        rr.convert_(model), rr.convert_(built_inside)
        assert torch.equal(model(x), make_gpt().eval()(x))
        assert rel_err(logits_of(built_inside(torch.arange(6)[None])), want) <= 1e-5
    assert not any(m.training for m in model.modules())
    assert not any(p.is_inference() for p in rr.attn_res_parameters(model))
    perturb_attn_res(model)
    model.train()(x.clone()).square().mean().backward()
    assert all(p.grad is not None for p in rr.attn_res_parameters(model))


def _hooks_and_forwards(model):
    return [(path, vars(m).get("forward"), dict(m._forward_hooks), dict(m._forward_pre_hooks), hasattr(m, "attn_res"))
            for path, m in model.named_modules()]


@pytest.mark.parametrize("failure", ["warnings are errors", "the report fails"])
def test_a_conversion_failing_in_its_last_step_is_rolled_back(failure, monkeypatch):
    """``finish`` (the hooks on the stream's end and the hidden states, the report, its warnings) runs after
    the forwards are installed: when it fails, they and its hooks are rolled back too. Under ``-W error``
    the warning itself is raised, not wrapped."""
    if failure == "warnings are errors":  # the model as one holder, a hook inside it: finish warns
        model = AddsInItsOwnForward().double()
        model.mlps[1].register_forward_hook(lambda *a: None)
        x = torch.randn(2, 5, 12, dtype=torch.float64)
        expected = pytest.raises(UserWarning, match="NOT called")
    else:  # layer by layer: finish hooks the final norm and the model before the report
        model, (x,) = make_gpt(), make_gpt().example_inputs()
        monkeypatch.setattr("residual_rewriter.driver.make_report", lambda *a, **k: 1 / 0)
        expected = pytest.raises(rr.ConversionError, match="ZeroDivisionError")
    before, want = _hooks_and_forwards(model), model(x)
    with warnings.catch_warnings(), expected:
        warnings.simplefilter("error")
        rr.convert_(model, example_inputs=(x,))
    assert _hooks_and_forwards(model) == before and not hasattr(model, "attn_res_report")
    assert torch.equal(model(x), want)


def _gradient_penalty(model, x, names):
    """|d loss / d params|^2, differentiable (create_graph): the backward runs twice through each aggregation."""
    loss = model(x).square().mean()
    grads = torch.autograd.grad(loss, [model.get_parameter(n) for n in names], create_graph=True)
    return sum(g.square().sum() for g in grads)


def test_double_backward_through_the_aggregation():
    """Gradient penalties and second-order meta-learning differentiate gradients. With zero queries the
    converted model is the original as a function of the original's parameters, so second derivatives
    agree; with random queries, the penalty's derivative along a query agrees with central differences."""
    original = ToyLM("rmsnorm").double().eval()
    model = rr.convert(original, num_blocks=2)
    x = original.example_inputs()[0]
    names = [n for n, _ in original.named_parameters()]
    for m in (model, original):
        _gradient_penalty(m, x, names).backward()
    for n in names:
        assert rel_err(model.get_parameter(n).grad, original.get_parameter(n).grad) <= 1e-10, n
    perturb_attn_res(model, seed=4)
    query = model.get_parameter("blocks.3.attn_res.final.query")
    model.zero_grad()
    _gradient_penalty(model, x, names).backward()
    step, direction = 1e-5, torch.randn(query.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    values = []
    for sign in (1, -1):
        with torch.no_grad():
            query.add_(sign * step * direction)
        values.append(_gradient_penalty(model, x, names).item())
        with torch.no_grad():
            query.sub_(sign * step * direction)
    finite_difference = (values[0] - values[1]) / (2 * step)
    assert abs((query.grad * direction).sum().item() - finite_difference) <= 1e-6 * abs(finite_difference)
