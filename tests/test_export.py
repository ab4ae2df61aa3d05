"""``torch.export`` of converted models: the aggregation exports as ONE library op per site (its fake
kernel gives the shapes), the exported program computes what the converted module computes, with a
dynamic sequence length, and survives ``torch.export.save`` / ``load`` (the op is registered on
``import residual_rewriter``)."""
from __future__ import annotations

import io

import pytest

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


# (measured on 2026-12-07 with transformers 5.25: the ORIGINAL Llama fails the same export there, on a guard
# min(12*seq, 24*seq) == 12*seq that torch < 2.13 cannot prove)
@pytest.mark.skipif(torch.__version__ < (2, 13),
                    reason="torch < 2.13 cannot export a Hugging Face Llama with a dynamic length, converted or not")
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


_LOAD_WITHOUT_THE_LIBRARY = """
import sys, torch
import transformers.modeling_outputs  # its output classes' pytree: the original model's program needs it as well
program = torch.export.load(sys.argv[1])
assert "residual_rewriter" not in sys.modules
torch.save(program.module()(input_ids=torch.load(sys.argv[2]), use_cache=False).logits, sys.argv[3])
"""


def test_run_decompositions_leaves_torch_ops_only_and_runs_without_the_library(tmp_path):
    """Deployment (ONNX, AOTInductor without Python) needs a program of torch ops: the aggregation's
    CompositeImplicitAutograd kernel is what ``run_decompositions()`` puts in its place. Float64: the
    decomposed math is the reference's, step for step."""
    import subprocess
    import sys

    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    conv = rr.convert(make_hf("llama").double(), num_blocks=2).eval()
    perturb_attn_res(conv, seed=3)
    ep = torch.export.export(conv, (), {"input_ids": ids, "use_cache": False})
    decomposed = ep.run_decompositions()
    assert _attn_res_nodes(ep) == len(aggregations(conv)) and _attn_res_nodes(decomposed) == 0
    want = logits_of(conv(ids))
    torch.testing.assert_close(logits_of(decomposed.module()(input_ids=ids, use_cache=False)), want, rtol=1e-12, atol=0)
    torch.export.save(decomposed, tmp_path / "model.pt2")
    torch.save(ids, tmp_path / "ids.pt")
    subprocess.run([sys.executable, "-c", _LOAD_WITHOUT_THE_LIBRARY, str(tmp_path / "model.pt2"), str(tmp_path / "ids.pt"),
                    str(tmp_path / "logits.pt")], check=True, timeout=300)
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), want, rtol=1e-12, atol=0)


def test_onnx_export_runs_in_onnxruntime():
    """Needs onnx, onnxscript and onnxruntime (not among the test dependencies: skipped in CI)."""
    for name in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(name)
    import onnxruntime

    model = make_gpt()
    x = model.example_inputs()[0]
    conv = rr.convert(model, block_size=2).eval()
    perturb_attn_res(conv, seed=1)
    program = torch.onnx.export(conv, (x,), dynamo=True, verbose=False)
    session = onnxruntime.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), logits_of(conv(x)), rtol=1e-5, atol=1e-5)
