"""A converted model is traced at conversion, never at run time by running it: PyTorch's tracers
(torch.export, torch.compile with fullgraph, pipelining's pipeline()) work on a freshly converted
Hugging Face model with no warm-up call, and compile it into as many graphs as the original.

Before: every layer but the first was keyed as receiving a tensor (what the original passed), so the
verify call rebuilt it by running it; a padded attention mask (always a tensor under export) was a
new signature, rebuilt under the tracer on fake tensors: export failed ("Cannot access data pointer"),
compile made 11 graphs of a 2-layer Llama where the original makes 1."""
from __future__ import annotations

import copy
import inspect
import logging

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import residual_rewriter as rr
from model_zoo import CACHE_ARGUMENT_NAMES, make_architecture, rel_err
from residual_rewriter.passes import layerwise
from test_inplace import _randomize

IDS = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
PADDED = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])  # left padding in the first row


@pytest.fixture
def no_tracing_after_conversion(monkeypatch):
    """Converts; from then on, any trace of a layer (a rebuild by running) fails the test."""

    def convert(model):
        rr.convert_(model, num_blocks=2)
        _randomize(model)

        def refuse(*args, **kwargs):
            raise AssertionError("a layer was traced after conversion")

        monkeypatch.setattr(layerwise, "trace_alone", refuse)
        return model

    return convert


@pytest.mark.parametrize("mask", [None, PADDED], ids=["ids", "padded"])
def test_export_of_a_freshly_converted_llama_equals_eager(mask, no_tracing_after_conversion):
    model = no_tracing_after_conversion(make_architecture("llama"))
    kwargs = {"use_cache": False, **({"attention_mask": mask} if mask is not None else {})}
    program = torch.export.export(model, (IDS,), kwargs)
    with torch.no_grad():
        assert rel_err(program.module()(IDS, **kwargs).logits, model(IDS, **kwargs).logits) <= 1e-12


def _exportable(name: str):
    """(model, inputs): an encoder-decoder, a decoder-only model from one (its layers take a cross-attention
    mask), a BEiT-style vision model (its layers take a torch.Size)."""
    if name == "mbart-causal-lm":
        import transformers
        from model_zoo import _TINY_SEQ2SEQ

        return transformers.MBartForCausalLM(transformers.MBartConfig(**_TINY_SEQ2SEQ)).double().eval(), {"input_ids": IDS}
    if name == "data2vec-vision":
        pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        return make_architecture(name), {"pixel_values": pixels}
    return make_architecture(name), {"input_ids": IDS, "decoder_input_ids": IDS[:, :4]}


@pytest.mark.hf
@pytest.mark.parametrize("name", ["t5", "mbart", "mbart-causal-lm", "data2vec-vision"])
def test_export_of_other_freshly_converted_models_equals_eager(name, no_tracing_after_conversion):
    """torch.export builds the masks that eager code skips (no padding; no encoder states for a cross-attention
    mask): the conversion prepares the calls as export makes them (``hf.masks_as_under_export``)."""
    model, inputs = _exportable(name)
    model = no_tracing_after_conversion(model)
    inputs |= {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
    program = torch.export.export(model, (), inputs)
    with torch.no_grad():
        want = model(**inputs)
        got = program.module()(**inputs)
    key = "logits" if hasattr(want, "logits") else "last_hidden_state"
    assert rel_err(got[key], want[key]) <= 1e-12


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_compile_makes_as_many_graphs_as_the_original(training, no_tracing_after_conversion):
    original = make_architecture("llama").train(training)
    model = no_tracing_after_conversion(make_architecture("llama").train(training))
    counts = []
    for m in (original, model):
        torch._dynamo.reset()
        counter = CompileCounter()
        compiled = torch.compile(m, backend=counter)
        for kwargs in ({}, {"attention_mask": PADDED}, {"use_cache": False}):
            compiled(IDS, **kwargs)
        counts.append(counter.frame_count)
    assert counts[1] == counts[0], counts


def test_a_training_step_as_trainer_makes_it_compiles_on_a_freshly_converted_llama(no_tracing_after_conversion):
    """Trainer's training calls pass num_items_in_batch, which the model hands on to its layers: those
    signatures are prepared (in training) at conversion, so a compiled training step makes as many
    graphs as the original's and the same gradients as eager."""
    kwargs = dict(attention_mask=PADDED, labels=IDS, num_items_in_batch=torch.tensor(12))
    original = make_architecture("llama").train()
    model = no_tracing_after_conversion(make_architecture("llama")).train()
    twin = copy.deepcopy(model)
    counts = []
    for m in (original, model):
        torch._dynamo.reset()
        counter = CompileCounter()
        torch.compile(m, backend=counter)(IDS, **kwargs).loss.backward()
        counts.append(counter.frame_count)
    assert counts[1] == counts[0], counts
    twin(IDS, **kwargs).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(rel_err(grads[n], p.grad) <= 1e-12 for n, p in twin.named_parameters() if p.grad is not None)


def test_fullgraph_attnres_backend_on_a_freshly_converted_llama(no_tracing_after_conversion):
    model = no_tracing_after_conversion(make_architecture("llama"))
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="attnres", fullgraph=True)
    with torch.no_grad():
        got, want = compiled(IDS, attention_mask=PADDED).logits, model(IDS, attention_mask=PADDED).logits
    assert rel_err(got, want) <= 1e-6  # inductor moves the ORIGINAL by ~1.4e-7 here too (float64, CPU)


def test_generate_with_a_static_cache_compiles_on_a_freshly_converted_llama(no_tracing_after_conversion):
    """Hugging Face's fast generation (a static cache, the forward compiled with fullgraph): the layers
    were traced with a DynamicCache, held as a proxy whatever its type, so the same graphs serve."""
    model = no_tracing_after_conversion(make_architecture("llama"))
    twin = copy.deepcopy(model)
    options = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, cache_implementation="static")
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend="eager", fullgraph=True)
    with torch.no_grad():
        assert torch.equal(model.generate(IDS, **options), twin.generate(IDS, **options))


def test_an_all_ones_mask_in_the_example_inputs_still_prepares_a_mask_tensor():
    """An all-ones mask reaches the layers as None in eager code, but as a tensor under a tracer (which
    cannot look at its values): the masked signature is prepared whatever mask the example holds."""
    model = make_architecture("llama")
    rr.convert_(model, example_inputs={"input_ids": IDS, "attention_mask": torch.ones_like(IDS)}, num_blocks=2)
    _randomize(model)
    kwargs = {"attention_mask": PADDED, "use_cache": False}
    program = torch.export.export(model, (IDS,), kwargs)
    with torch.no_grad():
        assert rel_err(program.module()(IDS, **kwargs).logits, model(IDS, **kwargs).logits) <= 1e-12


def test_a_kv_cache_in_the_example_inputs_is_left_as_it_was():
    """Example inputs holding a KV cache: every run of the model during conversion runs on a copy, so
    the cache the user passed stays empty and the verification compares like with like (the filled
    cache used to fail it, "please report")."""
    from transformers import DynamicCache

    model = make_architecture("llama")
    cache = DynamicCache(config=model.config)
    name = next(n for n in CACHE_ARGUMENT_NAMES if n in inspect.signature(model.forward).parameters)
    rr.convert_(model, example_inputs={"input_ids": IDS, name: cache, "use_cache": True}, num_blocks=2)
    assert cache.get_seq_length() == 0
    with torch.no_grad():
        assert model(IDS, **{name: cache}, use_cache=True).logits.shape == (2, 7, 128)
    assert cache.get_seq_length() == 7


def test_pipeline_splits_a_freshly_converted_llama(no_tracing_after_conversion):
    from torch.distributed.pipelining import SplitPoint, pipeline

    split = {"model.layers.1": SplitPoint.BEGINNING}
    try:  # transformers 5.18: the ORIGINAL's stage 0 fails (its rotary_emb is called with no arguments)
        pipeline(make_architecture("llama"), mb_args=(IDS,), mb_kwargs={"use_cache": False}, split_spec=split).get_stage_module(0)(IDS)
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"pipeline() cannot split the original model on this transformers: {type(exc).__name__}")
    model = no_tracing_after_conversion(make_architecture("llama"))
    pipe = pipeline(model, mb_args=(IDS,), mb_kwargs={"use_cache": False}, split_spec=split)
    assert pipe.num_stages == 2
    handed_over = pipe.get_stage_module(0)(IDS)
    assert all(isinstance(t, torch.Tensor) for t in handed_over)  # the state crosses as tensors
    with torch.no_grad():
        (logits,) = [pipe.get_stage_module(1)(*handed_over)]
        assert rel_err(logits, model(IDS, use_cache=False).logits) <= 1e-12


class _MaskedLayer(torch.nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.norm1, self.norm2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.attn, self.mlp = torch.nn.Linear(d, d), torch.nn.Linear(d, d)

    def forward(self, x, mask=None):
        h = self.attn(self.norm1(x))
        x = x + (h if mask is None else h * mask)
        return x + self.mlp(self.norm2(x))


class _Masked(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(_MaskedLayer() for _ in range(2))
        self.norm = torch.nn.LayerNorm(16)

    def forward(self, x, mask=None):
        for layer in self.layers:
            x = layer(x, mask)
        return self.norm(x)


def test_a_signature_not_prepared_is_refused_under_a_tracer_not_run():
    """The layer was converted with mask=None; under torch.export a mask tensor is a signature with no
    graph: refused with what differs and what to do, nothing run on the tracer's fake tensors."""
    torch.manual_seed(0)
    model, x = _Masked(), torch.randn(2, 5, 16)
    rr.convert_(model, example_inputs=(x,), num_blocks=2)
    differs = r"the closest prepared one differs in \['mask'\]: now \[\('mask', 'tensor'\)\], prepared \[\('mask', 'None'\)\]"
    with pytest.raises(rr.ConversionError, match=rf"(?s)did not prepare \({differs}\).*example inputs"):
        torch.export.export(model, (x, torch.ones(2, 5, 1)))


class _ScaledBlock(torch.nn.Module):
    """A layer with an optional argument: called without it at conversion, with it later."""

    def __init__(self, d=16):
        super().__init__()
        self.norm, self.ff = torch.nn.LayerNorm(d), torch.nn.Linear(d, d)

    def forward(self, x, scale=None):
        h = self.norm(x)
        if scale is not None:
            h = h * scale
        return x + self.ff(h)


class _ScaledLM(torch.nn.Module):
    def __init__(self, d=16, layers=3):
        super().__init__()
        self.emb = torch.nn.Embedding(50, d)
        self.layers = torch.nn.ModuleList(_ScaledBlock(d) for _ in range(layers))
        self.norm = torch.nn.LayerNorm(d)

    def forward(self, ids, scale=None):
        x = self.emb(ids)
        for layer in self.layers:
            x = layer(x, scale=scale)
        return self.norm(x)


def test_a_new_signature_in_eager_code_is_traced_without_running_the_model(monkeypatch, caplog):
    """A call signature first seen after conversion (a tensor where the conversion saw None) gets its
    graph by a symbolic trace mapped onto the known sites: no layer runs for it (each sublayer runs
    once, in the call itself; detection's value recording is never reached), and the new graph
    computes the same function (scale = ones equals no scale, with random queries)."""
    torch.manual_seed(0)
    model = _ScaledLM().double()
    ids = torch.randint(0, 50, (2, 5))
    rr.convert_(model, example_inputs=(ids,), block_size=1)
    _randomize(model)

    def refuse(*args, **kwargs):
        raise AssertionError("a graph was run to detect sites after conversion")

    monkeypatch.setattr(layerwise, "record_values", refuse)
    calls = []
    hooks = [layer.ff.register_forward_pre_hook(lambda *a: calls.append(1)) for layer in model.layers]
    ones = torch.ones(16, dtype=torch.float64)
    fx_warning = getattr(torch.fx._symbolic_trace, "is_fx_tracing_warning", None)  # logs once per process
    if fx_warning is not None:
        fx_warning.cache_clear()
    with torch.no_grad(), caplog.at_level(logging.WARNING, logger="torch.fx"):
        scaled = model(ids, scale=ones)
    assert not [r for r in caplog.records if "is_fx_tracing" in r.getMessage()]  # the check under a tracer is quiet
    for h in hooks:
        h.remove()
    assert len(calls) == len(model.layers)  # each layer ran once: in the call, not to rebuild
    # the conversion's call in both modes; the new signature in the mode it was called in (training)
    assert all(sorted(t for t, _ in layer.forward.graphs) == [False, True, True] for layer in model.layers)
    with torch.no_grad():
        assert rel_err(scaled, model(ids)) <= 1e-12
        assert rel_err(model(ids, scale=2 * ones), model(ids)) > 1e-3  # the new argument is live


class _AdapterBlock(_ScaledBlock):
    """A signature that turns on one more residual branch, reading the stream after the first add."""

    def __init__(self, d=16):
        super().__init__(d)
        self.adapter_norm, self.adapter = torch.nn.LayerNorm(d), torch.nn.Linear(d, d)

    def forward(self, x, scale=None):
        x = x + self.ff(self.norm(x))
        if scale is not None:
            x = x + self.adapter(self.adapter_norm(x)) * scale
        return x


def test_a_new_signature_that_changes_the_residual_structure_is_refused_clearly():
    model = _ScaledLM()
    model.layers = torch.nn.ModuleList(_AdapterBlock() for _ in range(3))
    ids = torch.randint(0, 50, (2, 5))
    rr.convert_(model, example_inputs=(ids,), block_size=1)
    with pytest.raises(rr.ConversionError, match=r"_AdapterBlock called with .*scale.*Convert with example inputs"):
        model(ids, scale=torch.ones(16))


def _packed_batch(lengths: list[int], seed: int) -> dict:
    """What Hugging Face's padding-free training feeds the model: sequences packed into one row, with
    flash-attention kwargs (cu_seq_lens_* tensors, max_length_* ints: a new int almost every batch)."""
    from transformers import DataCollatorWithFlattening

    gen = torch.Generator().manual_seed(seed)
    features = [{"input_ids": torch.randint(0, 128, (n,), generator=gen).tolist()} for n in lengths]
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(features)
    return {k: torch.as_tensor(v) if isinstance(v, list) else v for k, v in batch.items()}


@pytest.mark.hf
def test_packed_sequences_compile_and_reuse_their_graphs_whatever_the_max_length(monkeypatch):
    """The layers pass ``max_length_q/k`` on to attention only: they are graph inputs, not constants, so
    each batch's new max length neither builds a graph in eager nor is refused under torch.compile; the
    compiled model makes as many graphs as the original's and computes what eager does."""
    batches = [_packed_batch(lengths, seed) for seed, lengths in enumerate(([5, 7], [3, 9, 4], [6, 6], [2, 11]))]
    assert len({b["max_length_q"] for b in batches}) == 4
    original = make_architecture("llama").train()
    model = copy.deepcopy(original)
    rr.convert_(model, example_inputs=batches[0], num_blocks=2)
    _randomize(model)
    forwards = [layer.forward for layer in model.model.layers]
    assert [f.int_inputs for f in forwards] == [("max_length_q", "max_length_k")] * 2
    graphs = [len(f.graphs) for f in forwards]
    monkeypatch.setattr(layerwise, "retrace", lambda *a, **k: pytest.fail("a layer was traced after conversion"))
    counts = []
    for m in (original, model):
        torch._dynamo.reset()
        counter = CompileCounter()
        compiled = torch.compile(m, backend=counter)
        losses = [compiled(**b).loss for b in batches]
        counts.append(counter.frame_count)
    assert counts[1] == counts[0], counts
    for batch, loss in zip(batches, losses):
        assert rel_err(loss, model(**batch).loss) <= 1e-12
    assert [len(f.graphs) for f in forwards] == graphs


class _WindowedMix(torch.nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.ff = torch.nn.Linear(d, d)

    def forward(self, h, window: int):
        return self.ff(torch.nn.functional.pad(h[..., :window], (0, h.shape[-1] - window)))


class _IntBlock(torch.nn.Module):
    """``window`` reaches only a child (graph input), or the layer computes with it too (a constant).
    A tensor argument comes after it: the graph's inputs keep their order."""

    def __init__(self, d=16, layer_computes=False):
        super().__init__()
        self.norm, self.mix, self.layer_computes = torch.nn.LayerNorm(d), _WindowedMix(d), layer_computes

    def forward(self, x, window: int = 4, gain=None):
        return x + self.mix(self.norm(x) * gain, window - 1 if self.layer_computes else window)


class _IntLM(_ScaledLM):
    def __init__(self, layer_computes, d=16, layers=3):
        super().__init__(d, layers)
        self.layers = torch.nn.ModuleList(_IntBlock(d, layer_computes) for _ in range(layers))
        self.gain = torch.nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, ids, window=4):
        x = self.emb(ids)
        for layer in self.layers:
            x = layer(x, window, self.gain)
        return self.norm(x)


@pytest.mark.parametrize("layer_computes", [False, True], ids=["child-reads-it", "layer-computes-with-it"])
def test_an_int_argument_is_a_graph_input_only_where_no_graph_depends_on_its_value(layer_computes):
    """An int the layer hands to a child unchanged runs one graph for every value; one the layer's own
    code computes with stays specialised (a graph per value). Either way each value computes what the
    original does (float64, exact at init: a value baked into the graph would compute another window)."""
    torch.manual_seed(0)
    model = _IntLM(layer_computes).double()
    original = copy.deepcopy(model)
    ids = torch.randint(0, 50, (2, 5))
    rr.convert_(model, example_inputs=(ids,), block_size=1)
    forwards = [layer.forward for layer in model.layers]
    assert [f.int_inputs for f in forwards] == [() if layer_computes else ("window",)] * 3
    graphs = [len(f.graphs) for f in forwards]
    with torch.no_grad():
        outputs = [model(ids, window=window) for window in (2, 7, 16)]
        for window, out in zip((2, 7, 16), outputs):
            assert rel_err(out, original(ids, window=window)) <= 1e-12
        assert rel_err(outputs[0], outputs[1]) > 1e-3  # the argument is live
    assert [len(f.graphs) for f in forwards] == [n + 3 * layer_computes for n in graphs]


class _KwargsBlock(_ScaledBlock):
    def __init__(self, d=16):
        super().__init__(d)
        self.ff = torch.nn.Linear(2 * d, d)

    def forward(self, x, **kwargs):  # the order of **kwargs is the layout of the concatenation
        return x + self.ff(torch.cat([self.norm(x) * v for v in kwargs.values()], -1))


def test_keyword_arguments_in_another_order_compute_what_the_original_does():
    """``**kwargs`` in another order may compute another function (here, another concatenation): the
    graph traced for one order must not run the other (seen failing with a key sorted by name)."""
    torch.manual_seed(0)
    x, a, b = torch.randn(2, 5, 16, dtype=torch.float64), torch.ones(16), torch.full((16,), 2.0)

    class Caller(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(_KwargsBlock() for _ in range(2))
            self.norm = torch.nn.LayerNorm(16)

        def forward(self, x, swap=False):
            for layer in self.layers:
                x = layer(x, b=b, a=a) if swap else layer(x, a=a, b=b)
            return self.norm(x)

    model = Caller().double()
    original = copy.deepcopy(model)
    rr.convert_(model, example_inputs=(x,), block_size=1)
    with torch.no_grad():
        assert rel_err(model(x, swap=True), original(x, swap=True)) <= 1e-12
        assert rel_err(original(x, swap=True), original(x)) > 1e-3  # the order is live


class _ClampedInTraining(_IntBlock):
    def forward(self, x, window: int = 4, gain=None):
        if self.training and window > 8:  # eval hands the int on; training branches on it
            window = 8
        return x + self.mix(self.norm(x) * gain, window)


class _BranchingBlock(_IntBlock):
    def forward(self, x, window: int = 4, gain=None, gate=None):
        h = self.norm(x) * gain
        if gate is not None:  # this signature branches on the int the conversion's call only handed on
            for _ in range(window):
                h = h * gate
        return x + self.mix(h, window)


def test_a_new_signature_that_branches_on_an_int_input_is_refused_clearly():
    model = _IntLM(layer_computes=False)
    model.layers = torch.nn.ModuleList(_BranchingBlock() for _ in range(3))
    ids = torch.randint(0, 50, (2, 5))
    rr.convert_(model, example_inputs=(ids,), block_size=1)
    assert model.layers[0].forward.int_inputs == ("window",)

    def forward(ids, gate):
        x = model.emb(ids)
        for layer in model.layers:
            x = layer(x, 3, model.gain, gate=gate)
        return model.norm(x)

    with pytest.raises(rr.ConversionError, match=r"_BranchingBlock called with .*gate.*cannot be rewritten.*TypeError: .Proxy."):
        forward(ids, torch.ones(16))


class _AssertingBlock(_IntBlock):
    def forward(self, x, window: int = 4, gain=None, gate=None):
        if gate is not None:  # a bare `assert gate is None` (pytest would give it a message in this file)
            raise AssertionError
        return x + self.mix(self.norm(x) * gain, window)


def test_a_new_signature_failing_a_bare_assert_is_refused_clearly():
    model = _IntLM(layer_computes=False)
    model.layers = torch.nn.ModuleList(_AssertingBlock() for _ in range(3))
    ids = torch.randint(0, 50, (2, 5))
    rr.convert_(model, example_inputs=(ids,), block_size=1)
    with pytest.raises(rr.ConversionError, match=r"_AssertingBlock called with .*gate.*cannot be rewritten.*\(AssertionError\)"):
        x = model.emb(ids)
        model.layers[0](x, 3, model.gain, gate=torch.ones(16))


class _DefaultedInt(_IntBlock):
    def forward(self, x, window=None, gain=None):
        if not isinstance(window, int):  # FX records no isinstance: a traced int would take this branch
            window = 4
        return x + self.mix(self.norm(x) * gain, window)


@pytest.mark.parametrize("block, training", [(_ClampedInTraining, True), (_DefaultedInt, False)],
                         ids=["training-branches-on-it", "unread"])
def test_an_int_a_graph_branches_on_or_does_not_read_stays_a_constant(block, training):
    """Whether an int is a graph input is decided in both modes: install traces the training graph from
    the same call (seen refused at conversion, where the int was decided on the eval graph alone). An int
    input with no reader in the graph may have been read by Python that FX does not record (seen silently
    wrong: the graph ignored every window but the default)."""
    torch.manual_seed(0)
    model = _IntLM(layer_computes=False).double()
    model.layers = torch.nn.ModuleList(block().double() for _ in range(3))
    original = copy.deepcopy(model)
    ids = torch.randint(0, 50, (2, 5))
    rr.convert_(model, example_inputs=(ids,), block_size=1)
    assert model.layers[0].forward.int_inputs == ()
    with torch.no_grad():
        for window in (4, 12):
            got = model.train(training)(ids, window=window)
            assert rel_err(got, original.train(training)(ids, window=window)) <= 1e-12



class _FloatBlock(torch.nn.Module):
    """A layer whose forward reads a Python float, ``self.scale``: its traced graph holds the value."""

    def __init__(self, d=16):
        super().__init__()
        self.norm, self.ff, self.scale = torch.nn.LayerNorm(d), torch.nn.Linear(d, d), 1.0

    def forward(self, x):
        return x + self.ff(self.norm(x)) * self.scale


def test_a_float_a_layer_reads_set_after_conversion_makes_a_new_graph():
    """Set after conversion, the float is not ignored: eager code traces a graph with the new value (the
    original's output with zero queries); under a tracer, with no graph for it yet, it is refused naming it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 16), *(_FloatBlock() for _ in range(3)), torch.nn.LayerNorm(16))
    model = model.double()
    ids, original = torch.randint(0, 50, (2, 5)), copy.deepcopy(model)
    rr.convert_(model, example_inputs=(ids,), num_blocks=2)
    for net in (model, original):
        net[2].scale = 3.0
    with pytest.raises(rr.ConversionError, match=r"(?s)differs in \['self.scale'\]: now \[\('self.scale', 3.0\)\].*one call outside the tracer"):
        torch.export.export(model, (ids,))
    with torch.no_grad():
        assert rel_err(model(ids), original(ids)) <= 1e-12
    exported = torch.export.export(model, (ids,))  # the eager call made its graph
    with torch.no_grad():
        assert rel_err(exported.module()(ids), original(ids)) <= 1e-12


def test_a_dropout_probability_set_after_conversion_applies_in_training():
    """mBART's layers pass ``self.dropout`` to F.dropout in their own forward: set after conversion, the
    converted model drops what the original drops (the same random draws), not what it did at conversion."""
    model = make_architecture("mbart")
    converted = rr.convert(model)
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    for net in (model, converted):
        for layer in [*net.model.encoder.layers, *net.model.decoder.layers]:
            layer.dropout = layer.activation_dropout = 0.3
        net.train()
    outputs = []
    for net in (model, converted):
        torch.manual_seed(1)
        outputs.append(net(input_ids=ids, decoder_input_ids=ids, use_cache=False).logits)
    assert rel_err(outputs[1], outputs[0]) <= 1e-10


def test_a_float_changed_on_every_step_keeps_one_graph_per_call():
    """A schedule setting the float before every step (dropout annealing) replaces the call's graph: the
    graphs do not pile up, and each step computes with the value it set."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 16), *(_FloatBlock() for _ in range(2)), torch.nn.LayerNorm(16))
    model, ids = model.double(), torch.randint(0, 50, (2, 5))
    original = copy.deepcopy(model)
    rr.convert_(model, example_inputs=(ids,), num_blocks=2)
    prepared = len(model[1].forward.graphs)
    for step in range(4):
        for net in (model, original):
            net[1].scale = 1.0 + step
        with torch.no_grad():
            assert rel_err(model(ids), original(ids)) <= 1e-12
    assert len(model[1].forward.graphs) == prepared


class _SizeBlock(torch.nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.norm, self.ff = torch.nn.LayerNorm(d), torch.nn.Linear(d, d)

    def forward(self, x, size: torch.Size):
        return x + self.ff(self.norm(x)) * (size[-1] / 16)


class _SizeLM(_ScaledLM):
    """Its layers receive ``x.shape[1:]``, a torch.Size (BEiT's ``resolution``)."""

    def __init__(self, d=16, layers=3):
        super().__init__(d, layers)
        self.layers = torch.nn.ModuleList(_SizeBlock(d) for _ in range(layers))

    def forward(self, ids):
        x = self.emb(ids)
        for layer in self.layers:
            x = layer(x, x.shape[1:])
        return self.norm(x)


def test_a_torch_size_argument_runs_the_graph_traced_at_conversion(monkeypatch):
    """The conversion keyed the graph by the call it observed; a torch.Size there was snapshotted as a tuple
    (pytree), so the model's own call (a torch.Size) was another signature: traced again at its first eager
    call, and refused under torch.export on a freshly converted model."""
    model = _SizeLM().double()
    ids = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(0))
    original = copy.deepcopy(model)
    rr.convert_(model, example_inputs=(ids,), verify=False)
    monkeypatch.setattr(layerwise, "retrace", lambda *a, **k: pytest.fail("a layer was traced after conversion"))
    program = torch.export.export(model, (ids,))
    with torch.no_grad():
        assert rel_err(program.module()(ids), original(ids)) <= 1e-12
        assert rel_err(model(ids), original(ids)) <= 1e-12
