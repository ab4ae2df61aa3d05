"""Every failure while converting a user's model is a ConversionError (or a TypeError/ValueError for a
bad argument) that says what was found, where (module path, file:line) and what to do."""
from __future__ import annotations

import copy
import inspect
import random

import pytest
import torch
import torch.nn as nn

import residual_rewriter as rr
from model_zoo import rel_err
from model_zoo import make_hf
from toy_models import ReadsMidStreamLM

D = 16


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(D), nn.Linear(D, D)

    def forward(self, x):
        return x + self.fc(self.norm(x))


class BranchingBlock(Block):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent: FX cannot trace it
            x = 2 * x
        return x + self.fc(self.norm(x))


class Net(nn.Module):
    def __init__(self, block=Block):
        super().__init__()
        self.blocks = nn.ModuleList(block() for _ in range(3))
        self.norm = nn.LayerNorm(D)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.norm(x)


class BranchingNet(Net):
    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        if x.mean() > 0:  # in the model's own forward, not a submodule's
            x = -x
        return self.norm(x)


class BranchingFlatNet(Net):
    """The adds in the model's own forward, which also branches on data: the model itself would be
    the holder, and it cannot be traced."""

    def forward(self, x):
        for b in self.blocks:
            x = x + b.fc(b.norm(x))
        if x.mean() > 0:
            x = -x
        return self.norm(x)


def line_of(fn, text: str) -> str:
    """``test_errors.py:N`` of the line of ``fn``'s source holding ``text``."""
    lines, first = inspect.getsourcelines(fn)
    return f"test_errors.py:{first + next(i for i, l in enumerate(lines) if text in l)}"


def x():
    return torch.randn(2, 5, D)


@pytest.mark.parametrize("entry", [rr.convert, rr.detect])
@pytest.mark.parametrize("model", [None, "model.pt", torch.randn(3)])
def test_not_a_module_is_a_type_error(entry, model):
    with pytest.raises(TypeError, match=r"needs a torch\.nn\.Module"):
        entry(model, x())


def test_meta_device_model():
    model = Net().to("meta")
    with pytest.raises(rr.ConversionError, match="meta device") as info:
        rr.convert(model, x())
    assert "to_empty" in str(info.value) and "blocks.0.norm.weight" in str(info.value)


@pytest.mark.parametrize("model", [Net(), make_hf("llama")], ids=["toy", "hf"])
def test_converting_under_a_meta_default_device_is_refused(model):
    """``with torch.device("meta"):`` makes every new tensor (example inputs, AttnRes parameters) data-less:
    refused before anything runs (a Hugging Face model's derived inputs failed raw in torch before)."""
    inputs = (x(),) if isinstance(model, Net) else None
    with torch.device("meta"), pytest.raises(rr.ConversionError, match=r"under torch.device\('meta'\)"):
        rr.convert_(model, example_inputs=inputs)
    assert not any(hasattr(m, "attn_res") for m in model.modules())


def test_converting_a_converted_module_again():
    converted = rr.convert(Net(), x())
    for entry in (rr.convert, rr.detect):
        with pytest.raises(rr.ConversionError, match="already converted"):
            entry(converted, x())


def test_converting_a_part_of_a_converted_model_or_the_model_around_a_converted_part():
    """``model.model`` converted, then ``model`` (or the reverse): refused as already converted, naming
    the rewritten module, not as a model with no residual site."""
    outer = make_hf("llama")
    rr.convert_(outer.model)
    with pytest.raises(rr.ConversionError, match=r"already converted \(its module 'model' was rewritten"):
        rr.convert(outer)
    whole = rr.convert(make_hf("llama"))
    with pytest.raises(rr.ConversionError, match=r"already converted \(its module 'layers.0' was rewritten"):
        rr.convert_(whole.model)


def test_converting_a_converted_hf_model_again():
    model = rr.convert(make_hf("llama"))
    with pytest.raises(rr.ConversionError, match="already converted"):
        rr.convert(model)
    # a model reloaded by its own class from a converted checkpoint carries the options in its config
    fresh = make_hf("llama")
    fresh.config.residual_rewriter = dict(model.config.residual_rewriter)
    with pytest.raises(rr.ConversionError, match="already converted.*from_pretrained"):
        rr.convert(fresh)


@pytest.mark.parametrize("option", ["num_blocks", "block_size"])
@pytest.mark.parametrize("value", [2.5, "4", True, 0, -1])
def test_block_options_must_be_positive_integers(option, value):
    with pytest.raises((TypeError, ValueError), match=rf"^{option} must be"):
        rr.convert(Net(), x(), **{option: value})


def test_data_dependent_control_flow_names_module_and_line():
    with pytest.raises(rr.ConversionError) as info:
        rr.convert(Net(BranchingBlock), x())
    message = str(info.value)
    assert "blocks.0: TraceError" in message
    assert line_of(BranchingBlock.forward, "if x.sum() > 0") in message
    assert "torch.where" in message  # what to do


def test_data_dependent_control_flow_in_the_models_own_forward_is_no_obstacle_to_its_layers():
    """The layers hold the adds: the model's own forward is never traced, so it may branch on data."""
    model = BranchingNet().double()
    inputs = x().double()
    converted = rr.convert(model, inputs)
    assert converted.attn_res_report.mode == "in place, layer by layer"
    assert rel_err(converted(inputs), model(inputs)) <= 1e-12


def test_data_dependent_control_flow_in_the_model_that_holds_the_adds():
    with pytest.raises(rr.ConversionError, match=r"the model itself") as info:
        rr.convert(BranchingFlatNet(), x())
    assert line_of(BranchingFlatNet.forward, "if x.mean() > 0") in str(info.value)
    assert isinstance(info.value.__cause__, torch.fx.proxy.TraceError)


def test_model_failing_on_its_example_inputs():
    bad = torch.randn(2, 5, D + 1)  # the wrong hidden size
    with pytest.raises(rr.ConversionError, match="fails on these example inputs") as info:
        rr.convert(Net(), bad)
    message = str(info.value)
    assert "blocks.0" in message and line_of(Block.forward, "return x + self.fc") in message
    assert "normalized_shape" in message  # the original message
    assert isinstance(info.value.__cause__, RuntimeError)


class GraphOnlyBug(Block):
    def forward(self, x):
        if isinstance(x, torch.fx.Proxy):  # only the captured graph gets the wrong shape
            x = x[..., :-1]
        return x + self.fc(self.norm(x))


def test_graph_failing_where_the_model_runs_names_the_line():
    with pytest.raises(rr.ConversionError, match="cannot convert Net: RuntimeError") as info:
        rr.convert(Net(GraphOnlyBug), x())
    message = str(info.value)
    assert "in blocks.0 (GraphOnlyBug)" in message and line_of(GraphOnlyBug.forward, "return x + self.fc") in message
    assert "While executing" not in message and "please report" in message
    assert "normalized_shape" in str(info.value.__cause__)


class PairAttention(nn.Module):
    """Kept whole by its class name; returns a second output that is None on these inputs."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, D)

    def forward(self, x):
        return self.fc(x), None


class IsNotNoneBlock(Block):
    def __init__(self):
        super().__init__()
        self.attn = PairAttention()

    def forward(self, x):
        h, extra = self.attn(self.norm(x))
        if extra is not None:  # while tracing, `extra` is a traced value: never None
            h = h + self.fc(extra)
        return x + h


def test_a_test_for_none_that_tracing_cannot_see_is_explained():
    """``x is not None`` on a traced value is always true: the graph calls fc(None), where the model
    does not. The message says so instead of asking for a report (XLNet, GPT-NeoX-Japanese)."""
    with pytest.raises(rr.ConversionError, match="NoneType") as info:
        rr.convert(Net(IsNotNoneBlock), x())
    assert "`x is None` is always False" in str(info.value) and "please report" not in str(info.value)


def test_unexpected_failure_inside_the_pipeline_is_wrapped(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr("residual_rewriter.passes.layerwise.apply_plan", broken)
    with pytest.raises(rr.ConversionError, match="boom") as info:
        rr.convert(Net(), x())
    assert "please report" in str(info.value)
    assert str(info.value.__cause__) == "boom"


def test_model_that_cannot_be_deep_copied():
    import threading

    model = Net()
    model.lock = threading.Lock()  # a module holding something copy.deepcopy refuses
    with pytest.raises(rr.ConversionError, match=r"(?s)deep copy of Net.*cannot pickle.*convert_\(model\)"):
        rr.convert(model, x())
    assert rr.convert_(model, example_inputs=x()) is model


def test_failed_inplace_convert_leaves_the_model_working():
    torch.manual_seed(0)
    model = ReadsMidStreamLM().train()
    reference = copy.deepcopy(model).eval()
    (idx,) = model.example_inputs()
    with pytest.raises(rr.ConversionError, match="read by"):
        rr.convert_(model)
    assert not any("forward" in m.__dict__ or hasattr(m, "attn_res") for m in model.modules())
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    for got, want in zip(model(idx), reference(idx)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert [type(m) for m in model.modules()] == [type(m) for m in reference.modules()]
    torch.testing.assert_close(model.state_dict(), reference.state_dict(), rtol=0, atol=0)


class _WindowedBlock(nn.Module):
    """A layer that pads to a multiple of its window when it has one: a Python branch on a shape,
    which FX cannot trace (only the windowed layers)."""

    def __init__(self, window=None):
        super().__init__()
        self.window = window
        self.norm, self.fc = nn.LayerNorm(D), nn.Linear(D, D)

    def forward(self, x):
        if self.window:
            pad = (self.window - x.shape[1] % self.window) % self.window
            if pad > 0:
                x = nn.functional.pad(x, (0, 0, 0, pad))[:, : x.shape[1]]
        return x + self.fc(self.norm(x))


def test_a_stack_with_a_layer_that_cannot_be_rewritten_is_refused_not_converted_in_part():
    """Before, the other two layers were converted and convert_ returned: 2 of 3 sites, exact at init
    and quiet. Now it names the layer and why; filter_fn excluding it converts the rest."""
    model = Net()
    model.blocks = nn.ModuleList(_WindowedBlock(w) for w in (None, None, 4))
    with pytest.raises(rr.ConversionError, match=r"(?s)blocks\.2 \(_WindowedBlock\) is a layer of the same stack as blocks\.0 and cannot be rewritten: TraceError"):
        rr.convert(model, x())
    partial = rr.convert(model, x(), filter_fn=lambda module, path: path != "blocks.2")  # the user's choice
    assert partial.attn_res_report.holders == ["blocks.0", "blocks.1"]


class _UntraceableSublayer(Block):
    """A sublayer module that cannot be traced alone (a branch on the stream's values)."""

    def forward(self, x):
        if x.sum() > 0:
            return x + self.fc(self.norm(x))
        return x - self.fc(self.norm(x))


def test_holders_that_do_not_link_are_not_split_at_a_sublayers_norm():
    """T5-style sublayer modules, of which one kind cannot be rewritten: the other kind's holders do not
    link (the untraceable sublayer sits between them) and their outputs go into that sublayer's norm.
    That norm is no stream end: splitting there made one stream per sublayer, exact at init and wrong
    (no mixing across them). Refused instead."""
    model = Net()
    model.blocks = nn.ModuleList(m for _ in range(2) for m in (_UntraceableSublayer(), Block()))
    with pytest.raises(rr.ConversionError):
        rr.convert_(model, example_inputs=(x().abs(),))
    assert not rr.attn_res_parameters(model)


class _AttentionHolder(Block):
    """A sublayer module holding its own residual add: ``x + fc(norm(x))``."""


class _LayerWithAnUntraceableMLP(nn.Module):
    """Megatron-BERT's shape: the attention child holds its add, the layer's own forward adds the MLP and
    cannot be traced (a branch on values)."""

    def __init__(self):
        super().__init__()
        self.attention, self.ln, self.mlp = _AttentionHolder(), nn.LayerNorm(D), nn.Linear(D, D)

    def forward(self, x):
        h = self.attention(x)
        if h.sum() > 0:
            return h + self.mlp(self.ln(h))
        return h - self.mlp(self.ln(h))


class _LayerAddingItsMLP(nn.Module):
    """Megatron-BERT's shape, traceable: the attention child holds its add, the layer adds the MLP's."""

    def __init__(self):
        super().__init__()
        self.attention, self.ln, self.mlp = _AttentionHolder(), nn.LayerNorm(D), nn.Linear(D, D)

    def forward(self, x):
        h = self.attention(x)
        return h + self.mlp(self.ln(h))


class _AddsThenNormalises(nn.Module):
    """DBRX's shape: adds the attention's residual and normalises the sum for the MLP, returning both."""

    def __init__(self):
        super().__init__()
        self.norm, self.fc, self.ln = nn.LayerNorm(D), nn.Linear(D, D), nn.LayerNorm(D)

    def forward(self, x):
        r = x + self.fc(self.norm(x))
        return r, self.ln(r)


class _LayerAddingTheMLPOfItsChild(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention, self.mlp = _AddsThenNormalises(), nn.Linear(D, D)

    def forward(self, x):
        r, h = self.attention(x)
        return r + self.mlp(h)


@pytest.mark.parametrize("layer", [_LayerAddingItsMLP, _LayerAddingTheMLPOfItsChild])
def test_a_child_holding_an_add_is_traced_into_its_layer(layer):
    """Neither the layer nor its attention child holds both adds (Megatron-BERT; DBRX, whose child also
    normalises for the MLP): the layer is traced with the child traced into (one holder per layer, both
    sites, one stream); the module tree stays as it was."""
    model = Net()
    model.blocks = nn.ModuleList(layer() for _ in range(3))
    model, inputs = model.double(), x().double()
    names = [n for n, _ in model.named_modules()]
    original = copy.deepcopy(model)
    rr.convert_(model, example_inputs=(inputs,), num_blocks=2)
    report = model.attn_res_report
    assert report.holders == ["blocks.0", "blocks.1", "blocks.2"] and len(report.streams) == 1
    mlp_norm = "ln" if layer is _LayerAddingItsMLP else "attention.ln"
    assert [s.norm for s in report.sites] == [f"blocks.{i}.{n}" for i in range(3) for n in ("attention.norm", mlp_norm)]
    assert [n for n, _ in model.named_modules() if ".attn_res" not in n and not n.endswith("attn_res")] == names
    with torch.no_grad():
        assert rel_err(model(inputs), original(inputs)) <= 1e-12


def test_a_norm_inside_the_last_holders_layer_is_no_stream_end():
    """The attention holders do not link (the layer's MLP sits between them); the attention's output goes
    into the layer's MLP norm, which is no final norm. Splitting there made one stream per attention
    sublayer, exact at init and wrong. Refused instead."""
    model = Net()
    model.blocks = nn.ModuleList(_LayerWithAnUntraceableMLP() for _ in range(2))
    with pytest.raises(rr.ConversionError):
        rr.convert_(model, example_inputs=(x().abs(),))
    assert not rr.attn_res_parameters(model)


class _PostNormBlock(Block):
    def forward(self, x):
        return self.norm(x + self.fc(x))


def test_a_model_whose_forward_cannot_be_traced_is_refused_with_its_layers_reasons_too():
    """Neither route works: the layers hold no pre-norm add and the model's own forward branches on data.
    The message gives both reasons (before: only FX's, about a forward the user never asked to trace)."""
    model = BranchingNet(block=_PostNormBlock)
    with pytest.raises(rr.ConversionError, match=r"(?s)control flow.*Not layer by layer either.*blocks\.0[:,].*: ConversionError"):
        rr.convert_(model, example_inputs=(x(),))
    assert not rr.attn_res_parameters(model)


class _ScalesByWidth(nn.Module):
    """Cannot be traced (a branch on values): kept opaque, after its trace made ``shape``'s node."""

    def forward(self, x, shape):
        y = x / shape[-1]
        if y.sum() > 0:
            return y
        return -y


class _FlatNetPassingAnAttribute(nn.Module):
    """The adds in the model's own forward; ``x.shape`` (an FX attribute proxy, its node made where it is
    first used: inside the child that then fails to trace) is used again afterwards."""

    def __init__(self):
        super().__init__()
        self.scale, self.blocks, self.norm = _ScalesByWidth(), nn.ModuleList(Block() for _ in range(2)), nn.LayerNorm(D)

    def forward(self, x):
        shape = x.shape
        x = self.scale(x, shape)
        for b in self.blocks:
            x = x + b.fc(b.norm(x))
        return self.norm(x).reshape(shape)


def test_an_attribute_first_used_inside_a_module_kept_opaque_survives_its_rollback():
    model = _FlatNetPassingAnAttribute().double()
    inputs = x().double()
    want = model(inputs)
    converted = rr.convert(model, inputs)
    assert converted.attn_res_report.plan.opaque_modules.keys() == {"scale"}
    assert rel_err(converted(inputs), want) <= 1e-12


class _CachingBlock(Block):
    """Caches a tensor in a dict attribute on its first call (LeViT's attention_bias_cache)."""

    def __init__(self):
        super().__init__()
        self.cache = {}

    def forward(self, x):
        key = str(x.device)  # while traced, a proxy's name: a key of its own
        if key not in self.cache:
            self.cache[key] = self.fc.weight.new_ones(())
        return x + self.fc(self.norm(x)) * self.cache[key]


def test_what_a_forward_stores_on_its_modules_while_traced_is_not_kept():
    """Tracing runs the model's Python with proxies: a proxy cached in a module's dict would be read by the
    next trace ("does not belong to this Graph") and by the user's next forward."""
    model = Net(_CachingBlock).double()
    inputs = x().double()
    want = copy.deepcopy(model)(inputs)
    rr.convert_(model, example_inputs=(inputs,))
    assert not any(isinstance(v, torch.fx.Proxy) for b in model.blocks for v in b.cache.values())
    assert rel_err(model(inputs), want) <= 1e-12


class _CountingMLP(nn.Module):
    """A child that keeps statistics of its own as it runs: a Python counter and a buffer it reassigns."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, D)
        self.calls = 0
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    def forward(self, h):
        self.calls += 1
        self.seen = self.seen + h.shape[0]
        return self.fc(h)


class _StatefulBlock(Block):
    """Counts its steps in a buffer, in place (a running statistic); its MLP counts its own calls."""

    def __init__(self):
        super().__init__()
        self.fc = _CountingMLP()
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        self.steps.add_(1)
        return x + self.fc(self.norm(x))


def test_state_a_model_keeps_as_it_runs_is_left_alone_by_conversion_and_kept_up_by_the_converted_model():
    """Observing, tracing and verifying run the model: none of it may change its state (a counter, a buffer
    updated in place or reassigned). The converted model keeps updating it: the holder's in-place buffer
    update is in its graph (FX proxies buffers), the children run as they are."""
    model = Net(_StatefulBlock).double()
    inputs = x().double()

    def state():
        return [(b.steps.item(), b.fc.calls, b.fc.seen.item()) for b in model.blocks]

    rr.detect(model, example_inputs=(inputs,))
    assert state() == [(0, 0, 0)] * 3
    rr.convert_(model, example_inputs=(inputs,))
    assert state() == [(0, 0, 0)] * 3
    with torch.no_grad():
        model(inputs), model(inputs)
    assert state() == [(2, 2, 4)] * 3


class _CallCountingBlock(Block):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1  # Python state: a graph cannot repeat it
        return x + self.fc(self.norm(x))


class _StochasticDepthBlock(Block):
    def forward(self, x):  # a draw no traced value feeds: FX runs it once and the graph keeps that draw
        keep = (torch.rand(()) >= 0.5).double() if self.training else torch.ones((), dtype=torch.float64)
        return x + self.fc(self.norm(x)) * keep


class _PythonRandomDepthBlock(Block):
    def forward(self, x):  # Python's own generator: the same frozen draw
        return x if self.training and random.random() < 0.5 else x + self.fc(self.norm(x))


class _SwitchedStepCountingBlock(Block):
    def __init__(self):
        super().__init__()
        self.register_buffer("use_mlp", torch.tensor(True))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, x):  # a buffer read as a Python value: traced with buffers as constants, the update lost
        self.steps.add_(1)
        return x + self.fc(self.norm(x)) if self.use_mlp else x


@pytest.mark.parametrize("block, match", [(_CallCountingBlock, r"changes self.calls \(0 -> 1\)"),
                                          (_SwitchedStepCountingBlock, "changes buffer steps"),
                                          (_StochasticDepthBlock, "draws random numbers that no traced value feeds"),
                                          (_PythonRandomDepthBlock, "draws random numbers that no traced value feeds")])
def test_a_forward_doing_what_a_graph_cannot_repeat_is_refused(block, match):
    """Silently wrong otherwise: the converted model would stop counting, or drop the same sublayer on
    every training step. Refused, naming what; the model and the global random state are left alone."""
    model = Net(block).double()
    inputs = x().double()
    random.seed(5)  # its first three draws keep the sublayers: the training graphs look like eval's (no other refusal)
    rng = torch.get_rng_state(), random.getstate()
    with pytest.raises(rr.ConversionError, match=match):
        rr.convert_(model, example_inputs=(inputs,))
    assert torch.equal(torch.get_rng_state(), rng[0]) and random.getstate() == rng[1]
    assert not any(hasattr(m, "attn_res") or "forward" in vars(m) for m in model.modules())
    assert all(getattr(b, "calls", 0) == 0 for b in model.blocks)


class _BufferSwitchBlock(Block):
    """Python reads of its own buffers and a NaN attribute: constants of the graph, as in eager code."""

    def __init__(self):
        super().__init__()
        self.register_buffer("use_mlp", torch.tensor(True))
        self.register_buffer("repeats", torch.tensor(2))
        self.clamp = float("nan")  # (nan != nan: not a change)

    def forward(self, x):
        for _ in range(int(self.repeats)):
            x = x + self.fc(self.norm(x)) if self.use_mlp else x
        return x


def test_a_layer_reading_its_buffers_as_python_values_converts():
    """Buffers are traced as graph values (an in-place update is in the graph); a layer whose Python reads
    one as a value (a switch, a count) is traced again with buffers as constants, as before."""
    model = Net(_BufferSwitchBlock).double()
    inputs = x().double()
    want = model(inputs)
    rr.convert_(model, example_inputs=(inputs,))
    assert len(model.attn_res_report.sites) == 6 and rel_err(model(inputs), want) <= 1e-12


def test_an_original_returning_nan_is_refused_as_such():
    """A weight never initialised (torchtune's CLIP text encoder leaves its position embedding torch.empty) can make
    the original's own output NaN: nothing to verify against, said so (it read "does not compute what the original
    computed ... Please report it")."""
    from model_zoo import make_gpt

    model = make_gpt()
    with torch.no_grad():
        model.transformer.ln_f.bias.fill_(float("nan"))
    with pytest.raises(rr.ConversionError, match="original GPT returns NaN on the example inputs.*initialised"):
        rr.convert_(model)
    assert not rr.attn_res_parameters(model)
