"""``torch.export`` of converted models: the aggregation exports as ONE library op per site (its fake
kernel gives the shapes), the exported program computes what the converted module computes, with a
dynamic sequence length, and survives ``torch.export.save`` / ``load`` (the op is registered on
``import residual_rewriter``)."""
from __future__ import annotations

import io

import torch
from torch.export import Dim

import residual_rewriter as rr

from model_zoo import aggregations, logits_of, make_gpt, make_hf, perturb_attn_res


def _attn_res_nodes(ep) -> int:
    return sum(1 for n in ep.graph.nodes if n.op == "call_function" and "residual_rewriter" in str(n.target))


def test_export_builtin_gpt_matches_the_converted_module():
    model = make_gpt()
    x = model.example_inputs()[0]
    conv = rr.convert(model, block_size=2).eval()
    perturb_attn_res(conv, seed=1)
    ep = torch.export.export(conv, (x,))
    assert _attn_res_nodes(ep) == len(aggregations(conv)) >= 4  # each aggregation stays one op: nothing inlined
    torch.testing.assert_close(logits_of(ep.module()(x)), logits_of(conv(x)))


def test_export_hf_llama_with_a_dynamic_sequence_length_and_a_save_load_round_trip():
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    conv = rr.convert(make_hf("llama"), num_blocks=2).eval()
    perturb_attn_res(conv, seed=2)
    # without the KV cache: the original's output would hold a DynamicCache, which export cannot return
    ep = torch.export.export(conv, (), {"input_ids": ids, "use_cache": False},
                             dynamic_shapes={"input_ids": {1: Dim("seq", min=2, max=64)}, "use_cache": None})
    assert _attn_res_nodes(ep) == len(aggregations(conv))
    longer = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(logits_of(ep.module()(input_ids=longer, use_cache=False)), logits_of(conv(longer)))
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    buf.seek(0)
    loaded = torch.export.load(buf)
    torch.testing.assert_close(logits_of(loaded.module()(input_ids=ids, use_cache=False)), logits_of(conv(ids)))
