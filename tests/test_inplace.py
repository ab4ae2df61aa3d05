"""convert_(model): Block AttnRes in place, layer by layer. The model stays the user's model: its
class, module tree, parameter names and Python forward; only the forwards holding residual adds
(decoder layers) are rewritten to pass the Block AttnRes state."""
from __future__ import annotations

import copy
import io
import re

import pytest
import torch

import residual_rewriter as rr
from attnres_oracle import expected_stream, rel_err as oracle_err
from model_zoo import make_architecture, make_gpt, rel_err
from residual_rewriter import hf
from residual_rewriter.backend import make_attnres_backend


def _inputs(model):
    return hf.example_inputs(model, batch_size=3, seq_len=7)


def _key_output(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _randomize(model, seed=0):
    """Non-zero queries and gains in every holder's attn_res (so the mixture is really AttnRes)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if ".attn_res." in f".{name}":
                scale = 2 / p.numel() ** 0.5 if name.endswith("query") else 0.5
                noise = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) * scale
                p.copy_(noise if name.endswith("query") else 1 + noise.abs())


@pytest.mark.parametrize("name", ["llama", "gpt2", "gemma2", "gpt_neox", "opt", "dinov2", "t5"])
def test_exact_at_init_and_the_module_tree_is_kept(name):
    model = make_architecture(name)
    original = copy.deepcopy(model)
    before = {n: type(m) for n, m in model.named_modules()}
    params_before = {n for n, _ in model.named_parameters()}
    children = {n: m for n, m in model.named_modules()}
    assert rr.convert_(model, num_blocks=2) is model
    report = model.attn_res_report
    assert report.mode == "in place, layer by layer" and len(report.sites) >= 2
    after = {n: type(m) for n, m in model.named_modules()}
    new = {n for n in after if n not in before}
    assert all(before[n] is after[n] for n in before)  # same classes at the same paths
    assert new and all(n.split(".")[-1] == "attn_res" or ".attn_res." in n for n in new)
    assert all(dict(model.named_modules())[n] is m for n, m in children.items())  # the same objects
    params_after = {n for n, _ in model.named_parameters()}
    assert params_before <= params_after and all(".attn_res." in n for n in params_after - params_before)
    # one query per aggregation, each inside the layer whose forward uses it
    queries = [n for n in params_after if n.endswith(".query")]
    assert len(queries) == len(report.sites)  # every site but the first, + one final per stream
    inputs = _inputs(model)
    with torch.no_grad():
        assert rel_err(_key_output(model(**inputs)), _key_output(original(**inputs))) <= 1e-10


def test_layers_stay_a_module_list_and_python_forward_runs():
    model = make_architecture("llama")
    layers = list(model.model.layers)
    rr.convert_(model, block_size=1)
    assert isinstance(model.model.layers, torch.nn.ModuleList)
    assert [layer for layer in model.model.layers] == layers
    assert type(model).forward is type(make_architecture("llama")).forward  # the model's own forward
    assert "attn_res" in dict(model.model.layers[1].named_children())
    x = torch.randint(0, 128, (2, 6))
    out = model(x, labels=x, attention_mask=torch.ones_like(x))  # labels, masks: HF's own code
    assert out.loss is not None and out.logits.shape == (2, 6, 128)


def _record(model, x):
    """(b_0, branch outputs v_l, what each sublayer's norm read, what the final norm read) of a
    Llama, recorded with hooks on its own leaf modules."""
    rec = {"v": [], "h": []}
    hooks = [model.model.embed_tokens.register_forward_hook(lambda m, a, o: rec.__setitem__("b0", o))]
    for layer in model.model.layers:
        hooks.append(layer.self_attn.register_forward_hook(lambda m, a, o: rec["v"].append(o[0])))
        hooks.append(layer.mlp.register_forward_hook(lambda m, a, o: rec["v"].append(o)))
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            hooks.append(norm.register_forward_pre_hook(lambda m, a: rec["h"].append(a[0])))
    hooks.append(model.model.norm.register_forward_pre_hook(lambda m, a: rec.__setitem__("final", a[0])))
    with torch.no_grad():
        model(x)  # the call signature convert_ traced (a new one is traced on first use)
    for h in hooks:
        h.remove()
    return rec


@pytest.mark.parametrize("options", [dict(num_blocks=2), dict(block_size=4), dict(block_size=1)])
def test_non_zero_queries_follow_the_oracle(options):
    """The independent oracle (tests/attnres_oracle.py) over the sublayer outputs the in-place model
    produced: every norm reads exactly the Block AttnRes mixture of the right sources, with the query
    stored in the layer whose forward it feeds (a wrong partition, source set or binding fails)."""
    model = make_architecture("llama")  # 2 layers -> 4 sublayers; block_size=4 puts them in one block
    model.model.layers.append(copy.deepcopy(model.model.layers[0]))  # 3 layers -> 6 sublayers
    model.config.num_hidden_layers = 3
    model.model.layers[2].self_attn.layer_idx = 2
    rr.convert_(model, **options)
    _randomize(model)
    x = torch.randint(0, 128, (2, 7))
    rec = _record(model, x)
    layers = model.model.layers
    site_params = [None]  # sublayer 0 reads b_0 directly
    for i, layer in enumerate(layers):
        for name in ("self_attn", "mlp"):
            if i == 0 and name == "self_attn":
                continue
            q = layer.attn_res[name]
            site_params.append((q.query.detach(), q.key_norm_weight.detach()))
    final = layers[-1].attn_res["final"]
    want = expected_stream(rec["b0"], rec["v"], site_params, (final.query.detach(), final.key_norm_weight.detach()),
                           num_blocks=options.get("num_blocks"), block_size=options.get("block_size"),
                           eps=model.attn_res_report.config.key_norm_eps, mixing="sum")
    assert [s.block for s in model.attn_res_report.sites] == want.blocks
    for got, expected in zip(rec["h"], want.site_inputs):
        assert oracle_err(got, expected) <= 1e-10
    assert oracle_err(rec["final"], want.final_input) <= 1e-10
    assert oracle_err(rec["final"], want.uniform[-1]) > 1e-3  # the queries do matter


def test_generate_with_the_kv_cache():
    """Greedy decoding with the cache equals the original at init, and with random queries equals
    decoding without the cache (the depth mixture is per token)."""
    model = make_architecture("llama")
    original = copy.deepcopy(model)
    rr.convert_(model, num_blocks=2)
    x = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(x), pad_token_id=0)
    assert torch.equal(model.generate(x, **kw), original.generate(x, **kw))
    _randomize(model, seed=1)
    assert torch.equal(model.generate(x, use_cache=True, **kw), model.generate(x, use_cache=False, **kw))


def test_trains_deepcopies_and_round_trips_its_state_dict():
    model = make_architecture("qwen2").float().train()
    rr.convert_(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x = torch.randint(0, 128, (4, 12))
    losses = []
    for _ in range(4):
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    queries = [p for n, p in model.named_parameters() if n.endswith(".attn_res.final.query")]
    assert queries and queries[0].abs().sum() > 0
    twin = copy.deepcopy(model).eval()
    model.eval()
    with torch.no_grad():
        assert torch.equal(twin(x).logits, model(x).logits)
        next(p for n, p in twin.named_parameters() if n.endswith("final.query")).add_(1.0)
        assert not torch.equal(twin(x).logits, model(x).logits)  # the copy runs on its own parameters
    fresh = rr.convert_(make_architecture("qwen2").float())
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x).logits, model(x).logits)


@pytest.mark.parametrize("name, block_size", [("gpt", 1), ("gpt", 2), ("llama", 2)])
def test_compile_backend_batches_the_in_place_model_in_one_graph(name, block_size):
    """Dynamo traces the model's Python and each rewritten layer into one graph (fullgraph): the
    backend finds every aggregation there and batches each block as the whole-graph conversion did
    (the counts ``test_backend.expected_counts`` derives from the block layout)."""
    from test_backend import expected_counts

    torch._dynamo.reset()
    model = make_gpt() if name == "gpt" else make_architecture("llama").float()
    x = model.example_inputs()[0] if name == "gpt" else torch.randint(0, 128, (2, 8))
    rr.convert_(model, block_size=block_size)
    backend = make_attnres_backend(compiler="eager", keep_graphs=True, lower=None, fuse_norm=False,
                                   accumulate_in_gemm=False)
    with torch.no_grad():
        torch.compile(model, backend=backend, fullgraph=True)(x)
    sites = len(model.attn_res_report.sites)
    logs = list(backend.logs)
    torch._dynamo.reset()
    assert [log["find"]["aggregations"] for log in logs] == [sites]  # one graph, all of them
    expected = expected_counts(sites, block_size)
    assert logs[0]["batch_two_phase"].get("phase1", 0) == expected["attn_res_phase1"]


class _OwnLoop(torch.nn.Module):
    """The built-in GPT's layers, called by a loop of the model's own: ``x = call(block, x, training)``."""

    def __init__(self, call):
        super().__init__()
        self.inner, self.call = make_gpt(), call

    def forward(self, idx):
        x = self.inner.transformer.wte(idx)
        for block in self.inner.transformer.h:
            x = self.call(block, x, self.training)
        return self.inner.transformer.ln_f(x)


@pytest.mark.parametrize("block_size", [1, 3])
@pytest.mark.parametrize("skipped", [{0}, {1}, {3}, {0, 1}, {1, 2}, {2, 3}, {0, 1, 3}], ids=str)
def test_layers_the_model_skips_layerdrop_add_nothing(skipped, block_size):
    """A layer the model's own code skips (LayerDrop) hands nothing on: the next layer (or the final
    norm) receives the state of an earlier layer, or b_0 itself. It reads that state as if the skipped
    sublayers had returned zeros; checked with random queries against the same model without skipping,
    whose skipped layers' output projections are zeroed. 4 layers, 8 sublayers: block_size 3 puts
    block ends inside layers, so a skipped layer can owe a completed block or leave a partial sum.
    (Skipping every layer hands the final norm b_0 itself, a tensor as any last layer hands on: it
    reads b_0, as the original does, not an aggregation of b_0 and zeros.)"""
    torch.manual_seed(0)
    skips: set = set()
    model = _OwnLoop(lambda block, x, training: x if block.layer_index in skips else block(x)).double()
    for i, block in enumerate(model.inner.transformer.h):
        block.layer_index = i
    (x,) = model.inner.example_inputs()
    rr.convert_(model, example_inputs=(x,), block_size=block_size)
    _randomize(model)
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for i in skipped:
            for proj in (zeroed.inner.transformer.h[i].attn.c_proj, zeroed.inner.transformer.h[i].mlp.c_proj):
                proj.weight.zero_(), proj.bias.zero_()
        want = zeroed(x)
        skips.update(skipped)
        got = model(x)
    assert rel_err(got, want) <= 1e-12
    skips.clear()
    with torch.no_grad():
        assert rel_err(model(x), want) > 1e-3  # the skipped layers do act when they run


class _Skipping:
    """``_OwnLoop``'s call skipping the layers listed (picklable, unlike a lambda)."""

    def __init__(self):
        self.skips = set()

    def __call__(self, block, x, training):
        return x if block.layer_index in self.skips else block(x)


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_a_copy_skipping_its_last_layers_reads_its_own_final_query(how):
    """Where the last layers are skipped, the final norm's pre-hook computes the final aggregation
    from the last layer's query: in a copy of the model, the copy's (a closure kept the original's)."""
    model = _OwnLoop(_Skipping()).double()
    for i, block in enumerate(model.inner.transformer.h):
        block.layer_index = i
    (x,) = model.inner.example_inputs()
    rr.convert_(model, example_inputs=(x,), block_size=3)
    _randomize(model)
    if how == "deepcopy":
        twin = copy.deepcopy(model)
    else:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        twin = torch.load(buffer, weights_only=False)
    _randomize(twin, seed=1)  # the copy's parameters differ from the model's
    zeroed = copy.deepcopy(twin)
    with torch.no_grad():
        for i in (2, 3):
            for proj in (zeroed.inner.transformer.h[i].attn.c_proj, zeroed.inner.transformer.h[i].mlp.c_proj):
                proj.weight.zero_(), proj.bias.zero_()
        want = zeroed(x)
        twin.call.skips.update({2, 3})
        assert rel_err(twin(x), want) <= 1e-12
        model.call.skips.update({2, 3})
        assert rel_err(model(x), want) > 1e-3


def test_model_code_that_uses_the_stream_between_layers_is_refused_and_left_untouched():
    """Neither layer by layer (the stream is transformed between layers) nor as one graph (the stream
    is read by a multiplication): refused with both reasons, and the model left as it was."""
    model = _OwnLoop(lambda block, x, training: block(x) * 1.0)  # transforms the stream between layers
    (x,) = model.inner.example_inputs()
    with torch.no_grad():
        before = model(x)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(rr.ConversionError, match="(?s)not a normalization.*Not layer by layer either.*transforms it between them"):
        rr.convert_(model, example_inputs=(x,))
    assert model.state_dict().keys() == state.keys() and not hasattr(model, "attn_res_report")
    assert all("forward" not in vars(m) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(x), before)


class _TwoStacks(torch.nn.Module):
    """Two GPTs: the first called whole, the second's layers by a loop that transforms the stream between them."""

    def __init__(self):
        super().__init__()
        self.first, self.second = make_gpt(), make_gpt()

    def forward(self, idx):
        x = self.second.transformer.wte(idx)
        for block in self.second.transformer.h:
            x = block(x) * 1.0
        return self.first(idx) + self.second.lm_head(self.second.transformer.ln_f(x))


def test_a_refused_stack_is_named_with_the_filter_fn_that_converts_the_rest():
    """One stack the model's code transforms between layers (Blt's local decoder, cross-attention added between
    its layers) refuses the whole model: the message gives the filter_fn that leaves that stack out, and that
    filter_fn converts the other stack, exactly."""
    model = _TwoStacks().double()
    x = torch.randint(0, 64, (2, 7))
    with pytest.raises(rr.ConversionError, match="transforms it between them") as refused:
        rr.convert_(model, example_inputs=(x,))
    hint = re.search(r"filter_fn=(lambda module, path: not path\.startswith\('[\w.]+'\))", str(refused.value))
    assert hint, str(refused.value)
    with torch.no_grad():
        want = model(x)
    rr.convert_(model, example_inputs=(x,), filter_fn=eval(hint.group(1)))
    assert model.attn_res_report.holders == [f"first.transformer.h.{i}" for i in range(4)]
    with torch.no_grad():
        assert rel_err(model(x), want) <= 1e-10


def test_model_code_that_reads_the_state_between_layers_converts_the_model_as_one_holder():
    """The layers chain (the very tensor is handed on), but the model's own code asks the stream for
    ``size``, which the state between rewritten layers does not have: found when the converted model is
    verified, and converted again with the model as the one holder, where that read is a shape read."""
    def call(block, x, training):
        torch._assert(x.size(-1) > 0, "a check of the model's own")
        return block(x)

    model = _OwnLoop(call).double()
    (x,) = model.inner.example_inputs()
    with torch.no_grad():
        before = model(x)
    rr.convert_(model, example_inputs=(x,))
    report = model.attn_res_report
    assert report.holders == [""] and "uses the stream between layers" in report.mode_reason and len(report.sites) == 8
    with torch.no_grad():
        assert rel_err(model(x), before) <= 1e-12
        _randomize(model)
        assert rel_err(model(x), before) > 1e-3  # the queries act


def test_residual_adds_in_the_models_own_forward_make_the_model_the_holder():
    """The adds sit in the root's forward (no layer to rewrite): convert_ rewrites the model's own
    forward, by the same mechanism as a layer's; the report says so and why. Same object, same
    children, new parameters in ``model.attn_res``."""
    from test_detect import FlattenedMLPBlockLM

    torch.manual_seed(0)
    model = FlattenedMLPBlockLM().double()
    original = copy.deepcopy(model)
    children = dict(model.named_children())
    x = torch.randint(0, 50, (2, 5))
    assert rr.convert_(model, example_inputs=(x,), block_size=1) is model
    report = model.attn_res_report
    assert report.mode == "in place, the model as one holder" and "no module" in report.mode_reason and len(report.sites) == 4
    assert report.holders == [""] and type(model.forward).__name__ == "LayerForward"
    assert all(dict(model.named_children())[n] is m for n, m in children.items())
    _randomize(model)
    y = torch.randint(0, 50, (3, 7))
    with torch.no_grad():
        assert rel_err(model(y), original(y)) > 1e-3  # the queries act
    model.train()
    model(y).pow(2).mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n.startswith("attn_res.") and n.endswith(".query"))


class _AddsInItsForwardLM(torch.nn.Module):
    """The adds in the model's own forward, beside a child that holds none (tried as a holder, and why not kept)."""

    def __init__(self, d: int = 12):
        super().__init__()
        self.emb, self.norms = torch.nn.Embedding(50, d), torch.nn.ModuleList(torch.nn.LayerNorm(d) for _ in range(3))
        self.mix, self.mlp = _Gelu(d, d), torch.nn.Linear(d, d)

    def forward(self, ids):
        x = self.emb(ids)
        x = x + self.mix(self.norms[0](x))
        x = x + self.mlp(self.norms[1](x))
        return self.norms[2](x)


class _Gelu(torch.nn.Linear):
    def forward(self, x):
        return torch.nn.functional.gelu(super().forward(x))


def test_the_report_says_which_modules_were_tried_as_layers_and_why_not():
    model = _AddsInItsForwardLM().double()
    rr.convert_(model, example_inputs=(torch.randint(0, 50, (2, 5)),))
    report = str(model.attn_res_report).splitlines()
    mode = next(i for i, line in enumerate(report) if line.startswith("mode:"))
    assert "one holder (not layer by layer: no module of _AddsInItsForwardLM" in report[mode], report[mode]
    assert report[mode + 1].strip() == "Modules tried:" and report[mode + 2].strip().startswith("mix: ConversionError: no pre-norm")


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_hugging_face_gradient_checkpointing_is_kept(use_reentrant):
    """The layer's rewritten forward checkpoints as the layer's own forward would: the sublayers run
    again in the backward, and EVERY gradient equals the one without checkpointing. A reentrant
    checkpoint tracks only the tensors it is handed and returns: the AttnResState's go in and come out
    flat (without that, 11 of 29 parameters got no gradient). Where transformers (< 5.24) checkpoints
    around the layer's ``__call__``, the state is out of reach: refused at the first forward."""
    grads = {}
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = make_architecture("llama").train()
        rr.convert_(model, num_blocks=2)
        _randomize(model)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
            layer = model.model.layers[0]
            if use_reentrant and type(layer).__call__ is not torch.nn.Module.__call__:
                x = torch.randint(0, 128, (2, 7))
                with pytest.raises(rr.ConversionError, match="use_reentrant=False"):
                    model(x, labels=x)
                return
        x = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
        model(x, labels=x)  # a first call with a new signature traces its layers (running the sublayers)
        calls = []
        model.model.layers[1].mlp.register_forward_pre_hook(lambda m, a: calls.append(1))
        model(x, labels=x).loss.backward()
        assert len(calls) == (2 if checkpointing else 1)  # run again in the backward
        grads[checkpointing] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys() == {n for n, _ in model.named_parameters()}
    for name, g in grads[False].items():
        assert rel_err(grads[True][name], g) <= 1e-10, name


def test_save_pretrained_and_from_pretrained(tmp_path):
    model = make_architecture("llama").float()
    rr.convert_(model, block_size=1, mixing="mean")
    _randomize(model)
    model.save_pretrained(tmp_path)
    loaded = rr.from_pretrained(tmp_path)
    assert type(loaded) is type(model) and loaded.attn_res_report.mode == "in place, layer by layer"
    assert loaded.attn_res_report.config.mixing == "mean" and loaded.config.residual_rewriter["mode"] == "in_place"
    x = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


def test_verify_catches_a_wrong_conversion_and_restores_the_model(monkeypatch):
    """The safety net: an aggregation off by 0.1% at init is caught before convert_ returns, and the
    model is left as it was (no rewritten forward, no new parameters)."""
    from residual_rewriter.passes import rewrite

    model = make_gpt().double()
    (x,) = model.example_inputs()
    with torch.no_grad():
        before = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    original_apply = rewrite.apply_plan

    def off_by_a_little(gm, *args, **kwargs):
        gm = original_apply(gm, *args, **kwargs)
        for node in gm.graph.nodes:
            if node.op == "call_function" and "attn_res" in str(node.target):
                node.args = node.args[:4] + (node.args[4] * 1.001,)
        gm.recompile()
        return gm

    monkeypatch.setattr("residual_rewriter.passes.layerwise.apply_plan", off_by_a_little)
    with pytest.raises(rr.ConversionError, match="does not compute what the original computed"):
        rr.convert_(model)
    assert model.state_dict().keys() == state.keys() and not hasattr(model, "attn_res_report")
    assert all("forward" not in vars(m) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(x), before)
    rr.convert_(model, verify=False)  # what verify=False would have let through is the same bug
    with torch.no_grad():
        assert rel_err(model(x), before) > 1e-6


def test_filter_fn_limits_the_rewritten_layers():
    """Only the layers filter_fn accepts are rewritten: here the last two of four, one stream."""
    model = make_gpt().double()
    original = copy.deepcopy(model)
    rr.convert_(model, block_size=1, filter_fn=lambda module, path: path in ("transformer.h.2", "transformer.h.3"))
    sites = model.attn_res_report.sites
    assert [s.sublayer.rsplit(".", 1)[0] for s in sites] == ["transformer.h.2"] * 2 + ["transformer.h.3"] * 2
    assert "forward" not in vars(model.transformer.h[0]) and "forward" in vars(model.transformer.h[2])
    (x,) = model.example_inputs()
    with torch.no_grad():
        assert rel_err(model(x), original(x)) <= 1e-10


def test_a_hook_reading_a_layer_output_as_a_tensor_is_told_what_it_got():
    """A forward hook on a layer that hands the state on (not the last) gets an AttnResState: a tensor
    method on it says so, and what to read instead; residual_sum() is the original's hidden state."""
    model = make_architecture("llama")
    original = copy.deepcopy(model)
    rr.convert_(model, num_blocks=2)
    seen = {}
    handle = model.model.layers[0].register_forward_hook(lambda m, a, out: seen.update(state=out) or out.detach())
    ids = torch.randint(0, 128, (2, 5))
    with pytest.raises(AttributeError, match=r"(?s)no attribute 'detach'.*not the hidden-state tensor.*residual_sum\(\)"):
        model(ids)
    handle.remove()
    with torch.no_grad():
        want = original(ids, output_hidden_states=True).hidden_states[1]
    assert rel_err(seen["state"].residual_sum(), want) <= 1e-10
    assert not hasattr(seen["state"], "detach") and hasattr(seen["state"], "residual_sum")
    v = torch.randn(want.shape[-1])  # a steering hook: adds a vector to the stream
    handle = model.model.layers[0].register_forward_hook(lambda m, a, out: out + v)
    with pytest.raises(TypeError, match=r"(?s)arithmetic on an AttnResState.*residual_sum\(\).*state.partial.*blocks\[-1\]"):
        model(ids)
    handle.remove()
    # indexing tokens gives their state (Gemma 4 slices the stream before its KV-shared layers); an index that
    # reaches the hidden dimension is refused, saying what the state is
    assert rel_err(seen["state"][:, 1:3].residual_sum(), want[:, 1:3]) <= 1e-10
    assert seen["state"][:, -1:].blocks[0].shape == (2, 1, want.shape[-1])
    inside_a_block = rr.AttnResState(tuple(torch.randn(2, 5, 8) for _ in range(2)), torch.randn(2, 5, 8))
    assert torch.equal(inside_a_block[:, 2:].residual_sum(), inside_a_block.residual_sum()[:, 2:])
    assert torch.equal(inside_a_block[torch.tensor([1, 0])].residual_sum(), inside_a_block.residual_sum()[[1, 0]])
    for index in [(Ellipsis, 0), (slice(None), slice(None), slice(0, 4)), (0, 0, 0), (None,), (0, 0, torch.tensor([1]))]:
        with pytest.raises(TypeError, match=r"(?s)indexing an AttnResState other than by tokens.*residual_sum\(\)"):
            seen["state"][index]
    # the recipe the message gives, on a layer that ends a block (partial None) and one that does not:
    # with zero queries it steers exactly as `out + v` steers the original
    import dataclasses

    def steer(m, a, out):
        if out.partial is not None:
            return dataclasses.replace(out, partial=out.partial + v)
        return dataclasses.replace(out, blocks=(*out.blocks[:-1], out.blocks[-1] + v))

    for blocks in (2, 1):
        model, steered = copy.deepcopy(original), copy.deepcopy(original)
        rr.convert_(model, num_blocks=blocks)  # 4 sublayers: layer 0 ends a block with 2 blocks, not with 1
        model.model.layers[0].register_forward_hook(steer)
        steered.model.layers[0].register_forward_hook(lambda m, a, out: out + v)
        with torch.no_grad():
            assert rel_err(model(ids).logits, steered(ids).logits) <= 1e-10
            assert rel_err(steered(ids).logits, original(ids).logits) > 1e-3  # v changes the output


@pytest.mark.parametrize("name", ["llama", "gpt2", "t5"])
def test_output_hidden_states_are_tensors_of_the_original_shapes(name):
    """Hidden states after each rewritten layer are what a standard residual stream holds there:
    the sum of every source, equal to the original's at init (T5: its encoder's and its decoder's)."""
    model = make_architecture(name)
    original = copy.deepcopy(model)
    rr.convert_(model, num_blocks=2)
    inputs = _inputs(model)
    with torch.no_grad():
        got = model(**inputs, output_hidden_states=True)
        want = original(**inputs, output_hidden_states=True)
    fields = [k for k in want.keys() if k.endswith("hidden_states") and k != "last_hidden_state"]
    assert fields == (["decoder_hidden_states", "encoder_hidden_states"] if name == "t5" else ["hidden_states"])
    for field in fields:
        assert len(got[field]) == len(want[field])
        for g, w in zip(got[field], want[field]):
            assert isinstance(g, torch.Tensor) and g.shape == w.shape and rel_err(g, w) <= 1e-10, field


def test_peft_lora_trains_and_saves_the_attnres_parameters(tmp_path):
    """Convert, then LoRA with modules_to_save=["attn_res"]: the AttnRes parameters train beside the
    adapters, are saved in the adapter, and load back onto a freshly converted base model."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = make_architecture("llama").float()
    fresh_base = copy.deepcopy(base)
    rr.convert_(base, num_blocks=2)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["attn_res"]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(".attn_res." in n and n.endswith(".query") for n in trainable) and any("lora_A" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randint(0, 128, (2, 8))
    for _ in range(3):
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=x).logits
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter_model.safetensors")
    # query + gain + the sources it mixes (checked on load), each
    assert sum(".attn_res." in k for k in saved) == 3 * len(base.attn_res_report.sites)
    assert sum(k.endswith(".attn_res.final._extra_state") for k in saved) == 1
    rr.convert_(fresh_base, num_blocks=2)
    reloaded = peft.PeftModel.from_pretrained(fresh_base, tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=x).logits, trained)
    # LoRA first, then convert: the adapter would silently lack AttnRes; refused with the order to use
    lora_first = peft.get_peft_model(make_architecture("llama").float(), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(rr.ConversionError, match="Convert the base model first"):
        rr.convert_(lora_first)
    # ... and so is the PEFT model's base, whose layers hold the LoRA layers
    with pytest.raises(rr.ConversionError, match=r"model.layers.0.self_attn.q_proj is a PEFT layer.*base model first"):
        rr.convert_(lora_first.base_model.model)
    assert not any("attn_res" in n for n, _ in lora_first.named_parameters())


def _dispatched(model):
    """``model`` under accelerate's device hooks, as ``from_pretrained(device_map=...)`` leaves a model spread
    over devices: each module's ``forward`` is accelerate's wrapper around ``_old_forward``. On the CPU here
    (``force_hooks``): the hooks run and move every input to their one device."""
    from accelerate import dispatch_model

    return dispatch_model(model, {name: "cpu" for name, _ in model.named_children()}, force_hooks=True)


@pytest.mark.parametrize("order", ["dispatch, then convert", "convert, then dispatch"])
def test_accelerate_device_hooks_keep_running_around_the_converted_layers(order, monkeypatch):
    """A model loaded with a ``device_map`` carries accelerate's hooks; the converted forward goes where the
    hook calls it (``_old_forward``), so the hooks still move each layer's inputs, the AttnRes state
    included (``AttnResState.to``), and outputs and gradients equal an undispatched conversion's."""
    pytest.importorskip("accelerate")
    from accelerate.hooks import AlignDevicesHook
    from residual_rewriter.passes.layerwise import installed_forwards
    from residual_rewriter.passes.state import AttnResState

    base = make_architecture("llama")
    plain, hooked = copy.deepcopy(base), copy.deepcopy(base)
    rr.convert_(plain, num_blocks=2)
    if order == "dispatch, then convert":
        rr.convert_(_dispatched(hooked), num_blocks=2)
    else:
        _dispatched(rr.convert_(hooked, num_blocks=2))
    layers = list(hooked.model.layers)
    assert [p for p, _ in installed_forwards(hooked)] == ["model.layers.0", "model.layers.1"]
    assert all(type(layer.forward).__name__ == "partial" for layer in layers)  # accelerate's wrapper, kept
    _randomize(plain), _randomize(hooked)
    hooked_layers, states_moved = [], []
    pre_forward, to = AlignDevicesHook.pre_forward, AttnResState.to
    monkeypatch.setattr(AlignDevicesHook, "pre_forward",
                        lambda self, module, *a, **k: (hooked_layers.append(module), pre_forward(self, module, *a, **k))[1])
    monkeypatch.setattr(AttnResState, "to", lambda self, *a, **k: (states_moved.append(a), to(self, *a, **k))[1])
    inputs = _inputs(plain)
    outputs = [m.train()(**inputs, labels=inputs["input_ids"]) for m in (plain, hooked)]
    assert [m for m in hooked_layers if m in layers] == layers and states_moved  # the hooks ran; they moved the state
    assert oracle_err(outputs[1].logits, outputs[0].logits) <= 1e-12
    for out in outputs:
        out.loss.backward()
    grads = [{n: p.grad for n, p in m.named_parameters()} for m in (plain, hooked)]
    assert grads[0].keys() == grads[1].keys()
    assert all(oracle_err(grads[1][n], g) <= 1e-10 for n, g in grads[0].items())


def test_detect_and_refused_conversions_leave_hooks_patches_and_attributes_alone():
    """``detect`` converts and rolls back: accelerate's wrappers stay as they were. A layer whose forward the
    user replaced on the instance is refused (the rewrite of its class's forward would drop the patch), and
    so is one with an ``attn_res`` of its own: each left exactly as it was."""
    pytest.importorskip("accelerate")
    model = _dispatched(make_architecture("llama"))
    wrappers = [(vars(m).get("forward"), vars(m).get("_old_forward")) for m in model.modules()]
    inputs = _inputs(model)
    with torch.no_grad():
        before = _key_output(model(**inputs))
    rr.detect(model)
    assert [(vars(m).get("forward"), vars(m).get("_old_forward")) for m in model.modules()] == wrappers
    with torch.no_grad():
        assert torch.equal(_key_output(model(**inputs)), before)

    patched = make_architecture("llama")
    layer = patched.model.layers[1]
    layer.forward = patch = lambda *args, **kwargs: type(layer).forward(layer, *args, **kwargs)  # noqa: E731
    with pytest.raises(rr.ConversionError, match=r"model.layers.1 \(LlamaDecoderLayer\).*forward is replaced on the instance"):
        rr.convert_(patched)
    assert vars(layer)["forward"] is patch and not any("forward" in vars(m) for m in patched.model.layers[:1])
    assert not any(hasattr(m, "attn_res") for m in patched.modules())

    own = make_architecture("llama")
    own.model.layers[1].attn_res = mine = torch.nn.Linear(2, 2)
    with pytest.raises(rr.ConversionError, match="already has an attribute named attn_res"):
        rr.convert_(own)
    assert own.model.layers[1].attn_res is mine and not hasattr(own.model.layers[0], "attn_res")


def test_offloading_a_converted_model_fails_loudly():
    """accelerate's offload puts weights on meta and loads them in each module's pre-forward; the AttnRes
    parameters are read by their layer's graph, never called, so they stay on meta: the op refuses the mix
    (it returned uninitialised memory before)."""
    pytest.importorskip("accelerate")
    from accelerate import cpu_offload

    model = rr.convert_(make_architecture("llama"), num_blocks=2)
    inputs = _inputs(model)
    cpu_offload(model, execution_device=torch.device("cpu"))
    with pytest.raises(RuntimeError, match=r"attn_res got tensors on different devices \(cpu, meta\)"), torch.no_grad():
        model(**inputs)


def test_the_state_moves_to_a_device_and_refuses_a_dtype_cast():
    """``.to(device)`` (accelerate's hooks, a model's own ``hidden_states.to(device)``) moves every tensor;
    a cast to another dtype would round the blocks one by one, not the sum as the original does."""
    from residual_rewriter.passes.state import AttnResState

    state = AttnResState((torch.ones(2, 3), torch.full((2, 3), 2.0)), torch.full((2, 3), 3.0))
    moved = state.to("meta", non_blocking=True)
    assert [t.device.type for t in (*moved.blocks, moved.partial)] == ["meta"] * 3
    assert state.to(torch.float32) is not state and torch.equal(state.to("cpu").residual_sum(), state.residual_sum())
    assert AttnResState((torch.ones(2),), None).to("meta").partial is None
    with pytest.raises(TypeError, match="AttnResState.to casts the residual stream to torch.float64"):
        state.to(torch.float64)


def test_hugging_face_trainer_trains_and_checkpoints(tmp_path):
    """The Trainer loop (its own loss, optimizer, checkpoint saving) on a model converted in place."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    torch.manual_seed(0)
    model = make_architecture("llama").float()
    rr.convert_(model, num_blocks=2)
    ids = torch.randint(0, 128, (8, 12), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                                          learning_rate=1e-2, save_steps=3, report_to=[], use_cpu=True,
                                          logging_steps=1, disable_tqdm=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(".query")}
    result = transformers.Trainer(model=model, args=args, train_dataset=data).train()
    assert result.global_step == 3
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n.endswith(".query"))
    loaded = rr.from_pretrained(str(tmp_path / "checkpoint-3"))
    with torch.no_grad():
        assert torch.equal(loaded(ids[:2]).logits, model.eval()(ids[:2]).logits)


class _CachedLM(torch.nn.Module):
    """torchtune's layout in miniature: the KV cache lives in the attention's buffers (a position
    counter that advances on every call); decoding passes ``input_pos`` (a new call signature); the
    model can return the hidden states it collected with its output."""

    class Attention(torch.nn.Module):
        def __init__(self, d, max_len=32):
            super().__init__()
            self.proj = torch.nn.Linear(d, d)
            self.register_buffer("k_cache", torch.zeros(1, max_len, d, dtype=torch.float64))
            self.register_buffer("pos", torch.zeros((), dtype=torch.long))

        def forward(self, x, input_pos=None):  # [1, T, D]; reads everything cached so far
            t, start = x.shape[1], int(self.pos)
            self.k_cache[:, start : start + t] = self.proj(x).detach()
            self.pos += t
            return self.k_cache[:, : start + t].sum(1, keepdim=True).expand_as(x) * 0.01 + self.proj(x)

    class Block(torch.nn.Module):
        def __init__(self, d):
            super().__init__()
            self.sa_norm, self.attn = torch.nn.RMSNorm(d), _CachedLM.Attention(d)
            self.mlp_norm, self.mlp = torch.nn.RMSNorm(d), torch.nn.Linear(d, d)

        def forward(self, x, input_pos=None):
            h = x + self.attn(self.sa_norm(x), input_pos)
            return h + self.mlp(self.mlp_norm(h))

    def __init__(self, d=16, layers=3):
        super().__init__()
        self.emb = torch.nn.Embedding(50, d)
        self.layers = torch.nn.ModuleList(_CachedLM.Block(d) for _ in range(layers))
        self.norm = torch.nn.RMSNorm(d)
        self.output_hidden_states = False

    def forward(self, ids, input_pos=None):
        h, hidden = self.emb(ids), []
        for layer in self.layers:
            h = layer(h, input_pos=input_pos)
            hidden.append(h)
        out = self.norm(h)
        return [*hidden[:-1], out] if self.output_hidden_states else out

    def positions(self):
        return [int(layer.attn.pos) for layer in self.layers]


def test_our_runs_leave_a_cache_held_in_buffers_alone_and_hidden_states_are_tensors():
    """convert_ runs the model (observe, verify) and, for a new call signature, each layer once more
    (tracing): a cache kept in buffers must not move on (torchtune's cache_pos did, and decoding came
    out 10-17% off). A model returning the hidden states it collected gets tensors, not states."""
    torch.manual_seed(0)
    model = _CachedLM().double()
    original = copy.deepcopy(model)
    ids = torch.randint(0, 50, (1, 5))
    rr.convert_(model, example_inputs=(ids,), num_blocks=2)
    assert model.positions() == [0, 0, 0]  # convert_ ran the model and left its cache as it was
    model.output_hidden_states = original.output_hidden_states = True
    with torch.no_grad():
        got, want = model(ids), original(ids)  # exact at init, hidden states included
        assert all(isinstance(g, torch.Tensor) and rel_err(g, w) <= 1e-10 for g, w in zip(got, want))
        for step in range(2):  # decoding passes input_pos: a new signature, traced in the live call
            pos = torch.tensor([5 + step])
            got, want = model(ids[:, :1], input_pos=pos), original(ids[:, :1], input_pos=pos)
            assert rel_err(got[-1], want[-1]) <= 1e-10
    assert model.positions() == original.positions() == [7, 7, 7]


def test_a_reentrant_checkpoint_around_a_layer_is_refused_before_any_gradient_is_lost():
    """torch.utils.checkpoint(layer, state, use_reentrant=True) sees only tensors passed directly, not
    those inside an AttnResState: the layer runs without grad on inputs that need it, and every
    gradient before it would be lost. Refused at the first forward, not warned."""
    from torch.utils.checkpoint import checkpoint

    model = _OwnLoop(lambda block, x, training: checkpoint(block, x, use_reentrant=True) if training else block(x))
    (x,) = model.inner.example_inputs()
    rr.convert_(model, example_inputs=(x,), num_blocks=2)
    model.train()
    with pytest.raises(rr.ConversionError, match="use_reentrant=False"):
        model(x)


class _AuxBlock(torch.nn.Module):
    """Returns a constant tensor beside the stream (an aux loss that is zero for a dense layer)."""

    def __init__(self, d=12):
        super().__init__()
        self.norm, self.fc = torch.nn.LayerNorm(d), torch.nn.Linear(d, d)

    def forward(self, x):
        return x + self.fc(self.norm(x)), torch.zeros(())


class _AuxLM(torch.nn.Module):
    def __init__(self, d=12, layers=3):
        super().__init__()
        self.layers = torch.nn.ModuleList(_AuxBlock(d) for _ in range(layers))
        self.out = torch.nn.LayerNorm(d)

    def forward(self, x):
        aux = 0
        for layer in self.layers:
            x, a = layer(x)
            aux = aux + a
        return self.out(x), aux


def test_a_constant_tensor_in_a_layers_output_is_carried_into_the_rewritten_forward():
    """The trace stores ``torch.zeros(())`` as a constant of its own root; the rewritten forward runs on
    the layer, which gets it as a non-persistent buffer (it moves with ``.to()``, is not saved). Before:
    refused after the rewrite (``_tensor_constant0`` missing on the layer)."""
    model = _AuxLM().double()
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    converted = rr.convert(model, x)
    assert converted.attn_res_report.mode == "in place, layer by layer"
    out, aux = converted(x)
    assert rel_err(out, model(x)[0]) <= 1e-12 and aux.item() == 0.0
    assert not any("_rr_constant" in k for k in converted.state_dict())  # not saved
    assert converted.to(torch.float32)(x.float())[1].dtype == torch.float32


class _ShapeCheckingModel(torch.nn.Module):
    """The model's own forward branches on shapes (pads to an even length) and rearranges the stream
    (einops-style) before its layers; the layers hold the adds. Its forward is never traced."""

    def __init__(self, d=16, layers=3):
        super().__init__()
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(d) for _ in range(layers))
        self.layers = torch.nn.ModuleList(_PreNormLayer(d) for _ in range(layers))
        self.norm = torch.nn.LayerNorm(d)

    def forward(self, x):
        b, t, d = x.shape
        if t % 2:
            x = torch.nn.functional.pad(x, (0, 0, 0, 1))
        x = x.reshape(b, -1, 2, d // 2).transpose(2, 3).reshape(b, -1, d)  # rearrange "b t (c h) -> b t (h c)"
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)[:, :t]


class _PreNormLayer(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm, self.fc = torch.nn.LayerNorm(d), torch.nn.Linear(d, d)

    def forward(self, x):
        return x + self.fc(self.norm(x))


def test_a_models_own_forward_with_shape_checks_is_no_obstacle_when_the_layers_hold_the_adds():
    torch.manual_seed(0)
    model = _ShapeCheckingModel().double()
    original = copy.deepcopy(model)
    rr.convert_(model, example_inputs=(torch.randn(2, 7, 16, dtype=torch.float64),), num_blocks=2)
    assert model.attn_res_report.holders == ["layers.0", "layers.1", "layers.2"]
    for t in (7, 8, 3):  # both branches of the model's own check
        x = torch.randn(2, t, 16, dtype=torch.float64)
        assert rel_err(model(x), original(x)) <= 1e-12


class _Cross(torch.nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.q, self.kv = torch.nn.Linear(d, d), torch.nn.Linear(d, d)

    def forward(self, h, enc):
        return (self.q(h) @ self.kv(enc).transpose(1, 2)).softmax(-1) @ self.kv(enc)


class _CrossLayer(torch.nn.Module):
    """A pre-norm decoder layer taking the encoder's states, ``(h, enc)``."""

    def __init__(self, d=8):
        super().__init__()
        self.n1, self.sa, self.n2, self.ca = torch.nn.LayerNorm(d), torch.nn.Linear(d, d), torch.nn.LayerNorm(d), _Cross(d)

    def forward(self, h, enc):
        h = h + self.sa(self.n1(h))
        return h + self.ca(self.n2(h), enc)


class _CrossStack(torch.nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.layers = torch.nn.ModuleList(_CrossLayer(d) for _ in range(3))

    def forward(self, h, enc):
        for layer in self.layers:
            h = layer(h, enc)
        return h


class _CrossDecoder(torch.nn.Module):
    """The stack, its final norm in the model around it."""

    def __init__(self, d=8):
        super().__init__()
        self.stack, self.norm, self.head = _CrossStack(d), torch.nn.LayerNorm(d), torch.nn.Linear(d, 2)

    def forward(self, h, enc):
        return self.head(self.norm(self.stack(h, enc)))


@pytest.mark.parametrize("source_length", [5, 7])
def test_layers_taking_encoder_states_of_the_streams_shape_stay_the_holders(source_length):
    """With as many source as target tokens, ``layer(h, enc)`` takes two tensors of the stream's shape, as a child
    adding a branch does (``residual + inner(h)``): it was traced into its parent, whose parameter names then
    depended on the example's lengths (a checkpoint of one would not load into the other)."""
    torch.manual_seed(0)
    model = _CrossDecoder().double()
    h, enc = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(2, source_length, 8, dtype=torch.float64)
    rr.convert_(model, example_inputs=(h, enc))
    assert model.attn_res_report.holders == ["stack.layers.0", "stack.layers.1", "stack.layers.2"]
