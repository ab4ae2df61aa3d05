"""It is really Block AttnRes: with random queries and gains, the converted built-in GPT matches an
independent, hand-written Block AttnRes implementation of the same GPT (float64)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import residual_rewriter as rr
from model_zoo import make_gpt, perturb_attn_res, rel_err

EPS = 1e-6


def _aggregate(sources, query, gain, scale):
    """Stack-and-einsum form, deliberately different from the library's reference."""
    V = torch.stack(sources)  # (n, B, T, D)
    K = V / V.pow(2).mean(-1, keepdim=True).add(EPS).sqrt() * gain  # RMSNorm keys with gain
    logits = torch.einsum("d,nbtd->nbt", query, K)
    alpha = logits.softmax(dim=0)  # softmax over depth
    return scale * torch.einsum("nbt,nbtd->btd", alpha, V)


def hand_written_block_attnres(gpt, idx, params, block_size, mixing):
    """params: list of (query, gain) per sublayer in depth order, then one for the final norm."""
    tr = gpt.transformer
    T = idx.size(1)
    x = tr.drop(tr.wte(idx) + tr.wpe(torch.arange(T)))  # b_0, (B, T, D)
    sublayers = [s for blk in tr.h for s in ((blk.ln_1, blk.attn), (blk.ln_2, blk.mlp))]
    blocks, partial = [x], None
    for layer, (norm, f) in enumerate(sublayers):
        if layer > 0 and layer % block_size == 0:  # block boundary: the partial sum is complete
            blocks.append(partial)
            partial = None
        sources = blocks + ([partial] if partial is not None else [])
        q, g = params[layer]
        h = _aggregate(sources, q, g, len(sources) if mixing == "sum" else 1.0)
        v = f(norm(h))
        partial = v if partial is None else partial + v
    blocks.append(partial)
    q, g = params[-1]
    h = _aggregate(blocks, q, g, len(blocks) if mixing == "sum" else 1.0)
    return gpt.lm_head(tr.ln_f(h))


@pytest.mark.parametrize(
    "block_size, mixing",
    [(1, "sum"), (2, "sum"), (3, "sum"), (5, "sum"), (8, "sum"), (3, "mean")],
    ids=["full", "S2", "S3-remainder", "S5-remainder", "one-block", "S3-mean"],
)
def test_matches_hand_written_block_attnres(block_size, mixing):
    gpt = make_gpt().double()
    converted = rr.convert(gpt, block_size=block_size, mixing=mixing)
    perturb_attn_res(converted, seed=block_size)
    report = converted.attn_res_report
    # the first sublayer reads b_0 alone: no query (softmax over one source is 1)
    assert report.sites[0].num_sources == 1 and report.sites[0].param_prefix == ""
    params = [(torch.zeros(96, dtype=torch.float64), torch.ones(96, dtype=torch.float64))] + [
        (converted.get_parameter(f"{s.param_prefix}.query"), converted.get_parameter(f"{s.param_prefix}.key_norm_weight"))
        for s in report.sites[1:]
    ]
    final = report.streams[0].final_param_prefix
    params.append((converted.get_parameter(f"{final}.query"), converted.get_parameter(f"{final}.key_norm_weight")))
    idx = torch.randint(0, 256, (2, 13), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = hand_written_block_attnres(gpt, idx, params, block_size, mixing)
        got = converted(idx)
        original = gpt(idx)
    assert rel_err(got, expected) <= 1e-10
    assert rel_err(got, original) > 1e-3  # the perturbation really changed the function


def test_block_bookkeeping_in_report():
    report = rr.convert(make_gpt(), num_blocks=3).attn_res_report
    # 8 sublayers, N=3 -> S=3: blocks of 3, 3, 2 (the last takes the remainder)
    assert [s.block for s in report.sites] == [1, 1, 1, 2, 2, 2, 3, 3]
    assert [s.num_sources for s in report.sites] == [1, 2, 2, 2, 3, 3, 3, 4]
    assert report.streams[0].num_blocks == 3
