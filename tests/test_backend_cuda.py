"""The ``attnres`` backend on a GPU: converted models compiled with the Triton lowering, forward and
every parameter gradient against the same model run in float64 on the CPU (an independent reference:
no Triton, no inductor). Spies prove the Triton kernels ran. Skipped where there is no CUDA device
(CI); run on a GPU machine by ``benchmarks/run_on_gpu.sh tests``.
"""
from __future__ import annotations

import copy

import pytest
import torch

import residual_rewriter as rr
from residual_rewriter.backend import make_attnres_backend

from model_zoo import logits_of, make_gpt, make_hf, perturb_attn_res, rel_err
from spies import spy_on

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# fp32 on the GPU against float64: the kernels' fp32 math, inductor's reordered reductions, and TF32
# left off (torch's default for matmuls).
FWD_TOL, GRAD_TOL = 1e-4, 2e-3


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _train_step(fn, model, x):
    model.zero_grad(set_to_none=True)
    out = logits_of(fn(x))
    (out.double().pow(2).mean() + out.double().mean()).backward()
    return out.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _check_against_float64(converted, x, backend):
    ref_model = copy.deepcopy(converted).double()
    ref_out, ref_grads = _train_step(ref_model, ref_model, x)
    gpu = converted.cuda()
    out, grads = _train_step(torch.compile(gpu, backend=backend), gpu, x.cuda())
    assert rel_err(out.cpu().double(), ref_out) < FWD_TOL
    assert grads.keys() == ref_grads.keys() and any(".query" in n for n in grads)
    for name in ref_grads:
        assert rel_err(grads[name].cpu().double(), ref_grads[name]) < GRAD_TOL, name


def _model(kind: str):
    """(model, input): the built-in GPT (LayerNorm: its merges are not norm-fused) or a small HF Llama
    (RMSNorm: every fusion applies)."""
    if kind == "gpt":
        model = make_gpt()  # 4 layers: 8 sublayers
        return model, model.example_inputs()[0]
    return make_hf("llama"), torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind,block_size", [("gpt", 2), ("gpt", 4), ("llama", 3)])
def test_block_attnres_training_runs_the_triton_kernels(monkeypatch, kind, block_size):
    from residual_rewriter.kernels.attn_res import two_phase

    model, x = _model(kind)
    conv = rr.convert(model, block_size=block_size).train()
    perturb_attn_res(conv, seed=2, scale=0.3)
    backend = make_attnres_backend(lower="triton")
    # phase 1 + the phase-2 merges, forward and backward: each must launch (checked on leaving)
    with spy_on(monkeypatch, two_phase, "_phase1_fwd_kernel", "_phase2_fwd_kernel", "_phase1_bwd_kernel",
                "_phase2_bwd_kernel") as spies:
        _check_against_float64(conv, x, backend)
    log, lowered = backend.last_log, backend.last_log["lower"]
    phase1 = log["batch_two_phase"].get("phase1", 0)
    assert lowered.get("triton.attn_res_phase1", 0) + lowered.get("triton.attn_res_phase1_normed", 0) == phase1 >= 1
    heads = log["fuse_head"].get("fused_head", 0)
    assert lowered.get("triton.attn_res_phase1_normed", 0) == heads
    assert sum(c["HEAD_NORMED"] for c in spies["_phase1_bwd_kernel"].constexprs) == heads
    fused_adds = log["fuse_add"].get("fused_partial_add", 0)
    assert sum(c["ADD_DELTA"] for c in spies["_phase2_fwd_kernel"].constexprs) == fused_adds
    ends = log.passes.get("fuse_block_end", {}).get("fused_block_end", 0)
    assert sum(c["BLOCK_END"] for c in spies["_phase1_fwd_kernel"].constexprs) == ends
    if kind == "llama":  # RMSNorm: the block's first merge and the previous block's last add go into
        # phase 1, later adds into the merges; stream gradient sums into the backward kernels (inductor's
        # post-grad pass; the CPU twin of this graph under aot_eager: 1 block end, 5 sums folded)
        assert heads >= 1 and fused_adds >= 1 and ends >= 1
        assert log["fold_grad_sums"]["folded"] >= 1


def test_full_attnres_past_one_launch_goes_in_chunks():
    """10 layers, Full AttnRes: the last aggregations read 20+ sources, more than one launch takes."""
    from residual_rewriter.kernels.attn_res import MAX_SOURCES

    model = make_gpt(n_layer=10)
    conv = rr.convert(model, block_size=1).train()
    assert max(s.num_sources for s in conv.attn_res_report.plan.sites) > MAX_SOURCES
    perturb_attn_res(conv, seed=3, scale=0.3)
    _check_against_float64(conv, model.example_inputs()[0], make_attnres_backend(lower="triton"))


def test_bf16_autocast_training_runs_the_add_fused_merge(monkeypatch):
    """The usual way to train: bf16 autocast. Branches are bf16, the stream and its block sums fp32;
    the partial adds (fp32 + bf16) are folded into the merges (ADD_DELTA launches), and the step
    matches the same graph through plain aot_eager (whose ops run the fused Triton kernel)."""
    from residual_rewriter.kernels.attn_res import two_phase

    model, x = _model("llama")  # RMSNorm: the merges are norm-fused, so the adds can go into them
    conv = rr.convert(model, block_size=3).train().cuda()
    perturb_attn_res(conv, seed=4, scale=0.3)
    x = x.cuda()

    def step(fn):
        conv.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = logits_of(fn(x)).float()
        out.pow(2).mean().backward()
        return out.detach(), {n: p.grad.detach().clone() for n, p in conv.named_parameters() if p.grad is not None}

    ref_out, ref_grads = step(torch.compile(conv, backend="aot_eager"))
    torch._dynamo.reset()
    backend = make_attnres_backend(lower="triton")
    with spy_on(monkeypatch, two_phase, "_phase2_fwd_kernel") as spies:
        out, grads = step(torch.compile(conv, backend=backend))
    assert any(c["ADD_DELTA"] for c in spies["_phase2_fwd_kernel"].constexprs)
    assert rel_err(out, ref_out) < 1e-2
    for name in ref_grads:
        assert rel_err(grads[name].float(), ref_grads[name].float()) < 5e-2, name


def test_no_grad_forward_accumulates_partial_adds_in_the_gemm():
    """Under no_grad on CUDA the partial blocks' adds run in place in cuBLAS (``add_linear_``,
    beta = 1) and the first merge of each block inside phase 1; the output against float64 on CPU."""
    model, x = _model("llama")
    conv = rr.convert(model, block_size=3).eval()
    perturb_attn_res(conv, seed=5, scale=0.3)
    ref = logits_of(copy.deepcopy(conv).double()(x))
    backend = make_attnres_backend(lower="triton")
    with torch.no_grad():
        out = logits_of(torch.compile(conv.cuda(), backend=backend)(x.cuda()))
    log = backend.last_log
    assert log["accumulate_in_gemm"].get("accumulated_in_gemm", 0) >= 2  # "auto": applied on CUDA
    assert log["fuse_head"].get("fused_head", 0) >= 1
    assert rel_err(out.cpu().double(), ref) < FWD_TOL
