"""Non-zero queries against an independent Block AttnRes oracle (``attnres_oracle.py``).

Exact-at-init tests run with zero queries, where every aggregation is the plain sum of its sources:
they cannot see a wrong source set, a wrong block partition or a query bound to the wrong site.
Here every query and key-norm gain is random. The converted model runs once, its rewritten modules'
graphs under an ``fx.Interpreter``, with hooks on its norms and sublayers; the oracle takes the recorded embedding
output b_0 and branch outputs v, computes from the paper's definition what every sublayer's norm and
every final norm must read, and compares that with what the converted model fed them (float64,
relative error <= 1e-10). Which parameter key belongs to which site is decided by the key's name
(the module path it names), not by the report; a second test perturbs one query at a time and checks
that the site it names is the first whose input moves.

Families: a Llama decoder, the built-in GPT, GPT-2, GPT-NeoX (parallel block: one site per layer,
two norms, branch = attention + MLP), T5 (two streams; the decoder's sites include EncDecAttention),
inlined functional RMSNorms (final norm included), Gemma 4 (a sublayer without a norm, the stream scaled
at each layer's end, and sliced between layers), OLMo-2 (norms after the sublayers, none before), OPT (its MLP runs on the stream flattened to
[tokens, D]), Swin from Hugging Face and from timm (a stream per stage; timm's blocks view the stream
as (B, H*W, C) between their sublayers: values are compared token by token). Block settings are picked so that ceil(L / N) differs from floor(L / N) in most cases
and so that a block_size leaves a short last block.

Checked to fail (mutations applied in-process, no file edited): block sizes (plan.place_in_blocks) with floor instead of
ceil, or its first boundary shifted; the rewrite leaving out the partial sum, or b_0, or b_0 from
the final aggregation; two sites' param_prefix swapped in the plan (report and graph agree, the
names do not), or only in the graph (the report is right); the configured key_norm_eps ignored.
"""
from __future__ import annotations

import functools
import inspect
import sys
import warnings

import pytest
import torch

import residual_rewriter as rr
from attnres_oracle import attn_res_prefixes, expected_stream, owner_by_name, params_at, randomize, record, rel_err

EPS = 1e-4  # not the default key_norm_eps: the one the user passes must be the one used
TOL = 1e-10


# --------------------------------------------------------------------------------------------
# Tiny random-weight models: name -> (model, inputs to run, options for record)
# --------------------------------------------------------------------------------------------
def _ids(*shape, vocab=128, seed=1):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _build(name: str):
    torch.manual_seed(0)
    if name == "gpt":  # the built-in GPT: 3 layers, 6 sublayers
        from residual_rewriter.models import GPT, GPTConfig

        return GPT(GPTConfig(n_layer=3)), (_ids(2, 9, vocab=64),), None
    if name == "inline":  # functional RMSNorms written inline, the final norm too: 5 sublayers
        from toy_models import InlineFinalNormLM

        x = torch.randn(2, 7, 24, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        return InlineFinalNormLM(d=24, n=5), (x,), None
    if name == "namedtuple":  # layers take and return a namedtuple holding the stream: 6 sublayers
        from toy_models import NamedTupleLM

        x = torch.randn(2, 7, 24, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        return NamedTupleLM(d=24, n=3), (x,), None
    if name == "shortcut":  # LongCat-Flash-like: 2 layers, 8 sublayers; a shortcut joins the stream a sublayer later
        from toy_models import ShortcutLM

        x = torch.randn(2, 7, 24, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        return ShortcutLM(d=24, n=2), (x,), lambda site: []
    transformers = pytest.importorskip("transformers")
    warnings.filterwarnings("ignore", message=".*token_id.*")
    decoder = dict(vocab_size=128, hidden_size=48, intermediate_size=80, num_attention_heads=4)
    _pad0 = dict(pad_token_id=0, bos_token_id=0, eos_token_id=0)
    if name == "llama":  # 3 layers, 6 sublayers
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**decoder, num_hidden_layers=3, num_key_value_heads=2))
        return model, (_ids(2, 9),), None
    if name == "gpt2":  # 3 layers, 6 sublayers
        cfg = transformers.GPT2Config(vocab_size=128, n_embd=48, n_layer=3, n_head=4, bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(cfg), (_ids(2, 9),), None
    if name == "gpt_neox":  # parallel block: 5 layers = 5 sites, each read through two norms
        cfg = transformers.GPTNeoXConfig(**decoder, num_hidden_layers=5)
        # the branch is attention + MLP (modules the rewritten layer calls); their outputs must sum to
        # the recorded v
        parts = lambda site: [f"{site.sublayer}.attention", f"{site.sublayer}.mlp"]  # noqa: E731
        return transformers.GPTNeoXForCausalLM(cfg), (_ids(2, 9),), parts
    if name == "t5":  # two streams: encoder 4 sublayers, decoder 6 (SelfAttention, EncDecAttention, DenseReluDense)
        cfg = transformers.T5Config(vocab_size=128, d_model=48, d_ff=80, num_layers=2, num_heads=4, d_kv=12,
                                    decoder_start_token_id=0)
        return transformers.T5ForConditionalGeneration(cfg), (_ids(2, 9), _ids(2, 5, seed=2)), None
    if name == "umt5":  # T5 whose sublayers return `(hidden_states,) + attention_output[1:]`: two streams, 4 + 6
        from model_zoo import make_architecture

        return make_architecture("umt5"), (_ids(2, 9), _ids(2, 5, seed=2)), None
    if name == "mbart":  # encoder and decoder under one module (model.encoder, model.decoder): two streams, 4 + 6
        from model_zoo import make_architecture

        return make_architecture("mbart"), (_ids(2, 9, vocab=125, seed=3) + 3, _ids(2, 5, vocab=125, seed=2) + 3), None
    if name == "opt":  # 3 layers, 6 sublayers; the MLP's norm reads the stream flattened to [tokens, D]
        cfg = transformers.OPTConfig(vocab_size=128, hidden_size=48, num_hidden_layers=3, ffn_dim=80, num_attention_heads=4,
                                     max_position_embeddings=64, word_embed_proj_dim=48)
        return transformers.OPTForCausalLM(cfg), (_ids(2, 9),), None
    if name == "rwkv":  # the stream starts inside the first layer, at its pre_ln: 3 layers, 6 sublayers
        cfg = transformers.RwkvConfig(vocab_size=128, hidden_size=48, num_hidden_layers=3, attention_hidden_size=48,
                                      intermediate_size=80, context_length=16)
        return transformers.RwkvForCausalLM(cfg), (_ids(2, 9),), None
    if name == "modernbert_decoder":  # the first layer's attention has no norm: the stream starts after it, 5 sites
        cfg = transformers.AutoConfig.for_model("modernbert-decoder", vocab_size=128, hidden_size=48, intermediate_size=80,
                                                num_hidden_layers=3, num_attention_heads=4, pad_token_id=0,
                                                bos_token_id=0, eos_token_id=0, cls_token_id=0, sep_token_id=0)
        return transformers.AutoModelForCausalLM.from_config(cfg), (_ids(2, 9),), None
    if name == "mamba":  # `residual.to(float32) + mixer(norm(x))`, run in float64 without the cast: 3 sublayers
        cfg = transformers.MambaConfig(vocab_size=128, hidden_size=48, num_hidden_layers=3, state_size=8, residual_in_fp32=False)
        return transformers.MambaForCausalLM(cfg), (_ids(2, 9),), None
    if name == "gemma4":  # E2B/E4B-like: a sublayer without a norm, the stream scaled, and sliced (model_zoo)
        from model_zoo import make_hf

        return make_hf("gemma4"), (_ids(2, 9),), None
    if name == "olmo2":  # norms after the sublayers, x + norm(f(x)): each sublayer reads the mixture where it read x
        cfg = transformers.AutoConfig.for_model("olmo2", **decoder, num_hidden_layers=3, num_key_value_heads=2, **_pad0)
        return transformers.AutoModelForCausalLM.from_config(cfg), (_ids(2, 9),), None
    if name == "doge":  # the stream scaled by a learned gain before each branch joins it, `w * residual + f(norm(x))`
        cfg = transformers.AutoConfig.for_model("doge", **decoder, num_hidden_layers=3, num_key_value_heads=2, **_pad0)
        model = transformers.AutoModelForCausalLM.from_config(cfg)
        with torch.no_grad():  # ones at init: a gain left out, or applied to the branch, would not show
            for layer in model.model.layers:
                layer.input_residual.uniform_(0.5, 1.5), layer.post_attention_residual.uniform_(0.5, 1.5)
        return model, (_ids(2, 9),), None
    if name == "megatron_bert":  # the attention child adds its residual (traced into), the layer the MLP's: 6 sites
        cfg = transformers.MegatronBertConfig(**decoder, num_hidden_layers=3, is_decoder=True)
        return transformers.MegatronBertForCausalLM(cfg), (_ids(2, 9),), None
    if name == "swin":  # hierarchical: a stream per stage (patch merging resizes it), 2 blocks each: 2 x 4 sites
        cfg = transformers.SwinConfig(image_size=32, patch_size=2, embed_dim=16, depths=[2, 2], num_heads=[2, 2],
                                      window_size=4, mlp_ratio=2.0)
        pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        # no hook witness of v: the attention module returns windows, the layer un-windows them before the add
        return transformers.SwinForImageClassification(cfg), {"pixel_values": pixels}, lambda site: []
    if name == "timm_swin":  # as "swin", and each block views the stream as (B, H*W, C) for its MLP
        from test_third_party import CONVERTS

        pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        return CONVERTS["timm-swin"][0](), {"x": pixels}, lambda site: []
    raise KeyError(name)


@functools.lru_cache(maxsize=None)
def _converted(name: str, options: tuple):
    model, inputs, branch_modules = _build(name)
    model = model.double().eval()
    if isinstance(inputs, dict):
        inputs = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    example = None if name not in ("inline", "namedtuple", "shortcut", "timm_swin") else inputs
    converted = rr.convert(model, example, key_norm_eps=EPS, **dict(options))
    if name in ("gpt", "inline", "namedtuple", "shortcut"):
        inputs = inspect.signature(model.forward).bind(*inputs).arguments
    elif not isinstance(inputs, dict):
        inputs = dict(zip(["input_ids", "decoder_input_ids"], inputs))
    randomize(converted, seed=len(options) + sum(map(ord, name)))
    return converted, inputs, branch_modules


# (family, convert options); L = sublayers per stream. ceil != floor: L/N not an integer.
CASES = [
    ("llama", dict(num_blocks=2)),  # L=6: 3+3
    ("llama", dict(num_blocks=4)),  # L=6: S=ceil(1.5)=2: 2+2+2 (floor would give 6 blocks)
    ("llama", dict(block_size=4)),  # 4+2
    ("llama", dict(block_size=1)),  # Full AttnRes
    ("llama", dict(num_blocks=4, mixing="mean")),  # the paper's plain average
    ("gpt", dict(num_blocks=4)),  # L=6: 2+2+2
    ("gpt2", dict(num_blocks=4)),  # L=6: 2+2+2
    ("gpt2", dict(block_size=4)),  # 4+2
    ("gpt_neox", dict(num_blocks=2)),  # L=5: 3+2 (floor: 2+2+1)
    ("gpt_neox", dict(block_size=1)),
    ("t5", dict(num_blocks=2)),  # encoder L=4: 2+2; decoder L=6: 3+3
    ("t5", dict(num_blocks=4)),  # encoder 1+1+1+1; decoder 2+2+2 (floor: 6 blocks)
    ("t5", dict(block_size=4)),  # encoder 4; decoder 4+2
    ("mbart", dict(num_blocks=2)),  # encoder L=4: 2+2; decoder L=6: 3+3
    ("umt5", dict(num_blocks=4)),  # encoder 1+1+1+1; decoder 2+2+2
    ("inline", dict(num_blocks=2)),  # L=5: 3+2
    ("inline", dict(block_size=1)),
    ("namedtuple", dict(num_blocks=4)),  # L=6: 2+2+2
    ("shortcut", dict(num_blocks=3)),  # L=8: 3+3+2; the shortcut computed in block 1, added in block 2
    ("opt", dict(num_blocks=4)),  # L=6: 2+2+2
    ("opt", dict(block_size=4)),  # 4+2
    ("rwkv", dict(num_blocks=2)),  # L=6: 3+3, b_0 = the first layer's pre_ln output
    ("modernbert_decoder", dict(num_blocks=2)),  # L=5: 3+2, b_0 = the first layer's first add
    ("mamba", dict(block_size=1)),  # L=3, Full AttnRes
    ("megatron_bert", dict(num_blocks=4)),  # L=6: 2+2+2
    ("olmo2", dict(num_blocks=4)),  # L=6: 2+2+2
    ("doge", dict(num_blocks=4)),  # L=6: 2+2+2; a gain at a block's start and inside it
    ("doge", dict(block_size=1)),  # Full AttnRes: every gain scales every block sum
    ("gemma4", dict(num_blocks=4)),  # L=12: 3+3+3+3; the stream scaled at each layer's end
    ("gemma4", dict(block_size=5)),  # 5+5+2: the scale of layer 0 falls inside a block (the partial sum scaled)
    ("swin", dict(num_blocks=2)),  # two streams of L=4: 2+2 each
    ("timm_swin", dict(num_blocks=2)),  # the same, with a view of the stream between sublayers
    ("timm_swin", dict(block_size=1)),  # Full AttnRes: every MLP site reads a view of its aggregation
]


def _case_id(case):
    name, options = case
    return name + "-" + "-".join(f"{k}{v}" for k, v in options.items())


def _setup(name, options):
    return _converted(name, tuple(sorted(options.items())))


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_every_norm_reads_what_block_attnres_says(case):
    name, options = case
    converted, inputs, branch_modules = _setup(name, options)
    report = converted.attn_res_report
    rec = record(converted, inputs, branch_modules)
    mixing = options.get("mixing", "sum")
    failures = []
    for st in report.streams:
        # sublayers in depth order: their branch outputs are computed in that order
        order = [rec.order[(st.index, s.index)] for s in st.sites]
        assert order == sorted(order), f"stream {st.index}: sites not in execution order"
        # the branch outputs the oracle uses are the modules' own outputs where a module gives them
        for site in st.sites:
            key = (st.index, site.index)
            if key in rec.branch_hooked:
                assert rel_err(rec.branch_hooked[key], rec.branch[key]) <= 1e-12, f"v of {site.sublayer}"
        site_params = [params_at(converted, s.param_prefix) if s.param_prefix else None for s in st.sites]
        want = expected_stream(
            rec.b0[st.index],
            [rec.branch[(st.index, s.index)] for s in st.sites],
            site_params,
            params_at(converted, st.final_param_prefix),
            num_blocks=options.get("num_blocks"),
            block_size=options.get("block_size"),
            eps=EPS,
            mixing=mixing,
            scales=[rec.scale.get((st.index, s.index)) for s in st.sites],
            gains=[rec.gain.get((st.index, s.index)) for s in st.sites],
        )
        # the queries matter: no aggregation is close to what a zero query gives (else the comparison
        # below could not tell the source sets apart)
        aggregated = [h for h, n in zip(want.site_inputs, want.num_sources) if n > 1] + [want.final_input]
        assert all(rel_err(h, u) > 1e-3 for h, u in zip(aggregated, want.uniform))
        for site, h in zip(st.sites, want.site_inputs):
            fed = rec.fed[(st.index, site.index)]
            assert fed, f"nothing recorded for the norm of {site.sublayer}"
            for witness, got in fed.items():
                err = rel_err(got, h)
                if not err <= TOL:
                    failures.append(f"stream {st.index} site {site.index} ({site.sublayer}) {witness}: rel err {err:.2e}")
        assert rec.final_fed[st.index], f"nothing recorded for the final norm of stream {st.index}"
        for witness, got in rec.final_fed[st.index].items():
            err = rel_err(got, want.final_input)
            if not err <= TOL:
                failures.append(f"stream {st.index} final ({', '.join(st.consumers)}) {witness}: rel err {err:.2e}")
        assert not failures, "the converted model is not this Block AttnRes:\n  " + "\n  ".join(failures)
        # the report says the same partition (checked after the numbers, which are the point)
        assert [s.block for s in st.sites] == want.blocks, f"stream {st.index}: report's blocks"
        assert [s.num_sources for s in st.sites] == want.num_sources, f"stream {st.index}: report's source counts"
        # every key the report binds names its own site (the oracle's rule: by module path)
        for site in st.sites:
            if site.param_prefix:
                owner = owner_by_name(report, site.param_prefix)
                assert owner == (st.index, site.index), (
                    f"{site.param_prefix} is used by site {site.index} ({site.sublayer}) but names {owner}")
            else:
                assert want.num_sources[site.index] == 1, f"site {site.index} ({site.sublayer}) mixes without a query"
        owner = owner_by_name(report, st.final_param_prefix)
        assert owner == (st.index, "final"), f"{st.final_param_prefix} is the final query of stream {st.index} but names {owner}"
    # one query per aggregation: every key is used by exactly one site or stream end
    used = [s.param_prefix for s in report.sites if s.param_prefix] + [st.final_param_prefix for st in report.streams]
    assert sorted(used) == attn_res_prefixes(converted)


PERTURB = [("llama", dict(num_blocks=4)), ("gpt_neox", dict(num_blocks=2)), ("t5", dict(num_blocks=4)),
           ("inline", dict(num_blocks=2)), ("opt", dict(block_size=4)), ("rwkv", dict(num_blocks=2)),
           ("modernbert_decoder", dict(num_blocks=2)), ("megatron_bert", dict(num_blocks=4)),
           ("swin", dict(num_blocks=2)), ("timm_swin", dict(num_blocks=2))]


@pytest.mark.parametrize("case", PERTURB, ids=[_case_id(c) for c in PERTURB])
def test_a_query_moves_the_site_it_names_first(case):
    """Behavioural binding check, independent of the report's param_prefix: perturb the query stored
    under one key; the aggregation the key names by module path must be the first in its stream
    whose input changes (earlier sites bit-identical), and a final query moves no site at all."""
    name, options = case
    converted, inputs, branch_modules = _setup(name, options)
    report = converted.attn_res_report
    base = record(converted, inputs, branch_modules)
    for key in attn_res_prefixes(converted):
        owner = owner_by_name(report, key)
        assert owner is not None, f"{key} names no single site by module path"
        stream, which = owner
        query = converted.get_parameter(key + ".query")
        saved = query.detach().clone()
        try:
            with torch.no_grad():
                query.add_(torch.randn(query.shape, generator=torch.Generator().manual_seed(7), dtype=query.dtype))
            rec = record(converted, inputs, branch_modules)
        finally:
            with torch.no_grad():
                query.copy_(saved)

        def moved(new: dict, old: dict) -> bool:
            return any(not torch.equal(new[w], old[w]) for w in old)

        sites = report.streams[stream].sites
        first = next((s.index for s in sites if moved(rec.fed[(stream, s.index)], base.fed[(stream, s.index)])), "final")
        if first == "final":
            assert moved(rec.final_fed[stream], base.final_fed[stream]), f"{key} moves nothing in stream {stream}"
        assert first == which, f"{key} names {owner}, but the first input it moves is stream {stream} site {first}"


def test_a_sublayer_with_its_norm_after_it_reads_the_stream_with_no_norm():
    """OLMo-2's ``x + norm(attn(x, cache))``: no norm reads x. Probing the attention for one re-ran it into the
    recorded KV cache, which then held the run's keys: it attended to those and passed for a norm of x."""
    converted, _, _ = _setup("olmo2", {"num_blocks": 4})
    assert all(site.unnormalized for site in converted.attn_res_report.sites), str(converted.attn_res_report)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
