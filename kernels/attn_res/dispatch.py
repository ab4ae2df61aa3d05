"""CUDA dispatch for the library ops: the Triton kernels. Owned by the kernels issue (#3)."""
from __future__ import annotations


def _todo(name):
    raise NotImplementedError(f"residual_rewriter: the Triton kernel for {name} is not wired in yet (issue #3)")


def forward_cuda(sources, query, norm_weight, eps, scale):
    _todo("attn_res")


def backward_cuda(grad_out, sources, query, norm_weight, eps, scale):
    _todo("attn_res_backward")


def phase1_cuda(sources, queries, norm_weights, eps):
    _todo("attn_res_phase1")


def phase1_backward_cuda(grad_out, grad_lse, sources, queries, norm_weights, eps, out, lse):
    _todo("attn_res_phase1_backward")


def phase2_cuda(phase1_out, phase1_lse, partial, query, norm_weight, eps, scale):
    _todo("attn_res_phase2")


def phase2_backward_cuda(grad_out, phase1_out, phase1_lse, partial, query, norm_weight, eps, scale):
    _todo("attn_res_phase2_backward")


def normed_cuda(sources, query, norm_weight, eps, scale, out_norm_weight, out_eps):
    _todo("attn_res_normed")


def normed_backward_cuda(grad_mix, grad_normed, sources, query, norm_weight, eps, scale, out_norm_weight, out_eps):
    _todo("attn_res_normed_backward")
