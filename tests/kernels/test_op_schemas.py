"""The library ops' schemas, as graphs, the lowering passes (``passes/lowering``) and saved programs see
them: a change here is a change of the ops' interface, not a refactoring of ``op.py``."""
import torch

import residual_rewriter  # noqa: F401  (registers torch.ops.residual_rewriter.*)

SCHEMAS = """
residual_rewriter::attn_res(Tensor[] sources, Tensor query, Tensor? norm_weight, float eps, float scale) -> Tensor
residual_rewriter::attn_res_backward(Tensor grad_out, Tensor[] sources, Tensor query, Tensor? norm_weight, float eps, float scale) -> Tensor[]
residual_rewriter::attn_res_normed(Tensor[] sources, Tensor query, Tensor? norm_weight, float eps, float scale, Tensor? out_norm_weight, float out_eps, *, bool return_mix=True) -> (Tensor, Tensor)
residual_rewriter::attn_res_normed_backward(Tensor? grad_mix, Tensor grad_normed, Tensor[] sources, Tensor query, Tensor? norm_weight, float eps, float scale, Tensor? out_norm_weight, float out_eps, Tensor?[] accumulate) -> Tensor[]
residual_rewriter::attn_res_phase1(Tensor[] sources, Tensor queries, Tensor? norm_weights, float eps) -> (Tensor[], Tensor)
residual_rewriter::attn_res_phase1_backward(Tensor[] grad_outs, Tensor grad_lse, Tensor[] sources, Tensor queries, Tensor? norm_weights, float eps, Tensor lse, Tensor?[] accumulate) -> Tensor[]
residual_rewriter::attn_res_phase1_normed(Tensor[] sources, Tensor queries, Tensor? norm_weights, float eps, float scale, Tensor? out_norm_weight, float out_eps, Tensor? end_partial=None, Tensor? end_delta=None) -> (Tensor, Tensor[], Tensor, Tensor)
residual_rewriter::attn_res_phase1_normed_backward(Tensor grad_normed0, Tensor[] grad_outs, Tensor grad_lse, Tensor[] sources, Tensor queries, Tensor? norm_weights, float eps, float scale, Tensor? out_norm_weight, float out_eps, Tensor lse, Tensor?[] accumulate) -> Tensor[]
residual_rewriter::attn_res_phase2(Tensor phase1_out, Tensor phase1_lse, Tensor? partial, Tensor query, Tensor? norm_weight, float eps, float scale) -> Tensor
residual_rewriter::attn_res_phase2_add_normed(Tensor phase1_out, Tensor phase1_lse, Tensor partial, Tensor delta, Tensor query, Tensor? norm_weight, float eps, float scale, Tensor? out_norm_weight, float out_eps) -> (Tensor, Tensor)
residual_rewriter::attn_res_phase2_add_normed_backward(Tensor? grad_partial, Tensor grad_normed, Tensor phase1_out, Tensor phase1_lse, Tensor partial, Tensor query, Tensor? norm_weight, float eps, float scale, Tensor? out_norm_weight, float out_eps) -> Tensor[]
residual_rewriter::attn_res_phase2_backward(Tensor grad_out, Tensor phase1_out, Tensor phase1_lse, Tensor? partial, Tensor query, Tensor? norm_weight, float eps, float scale) -> Tensor[]
residual_rewriter::attn_res_phase2_normed(Tensor phase1_out, Tensor phase1_lse, Tensor? partial, Tensor query, Tensor? norm_weight, float eps, float scale, Tensor? out_norm_weight, float out_eps, *, bool return_mix=True) -> (Tensor, Tensor)
residual_rewriter::attn_res_phase2_normed_backward(Tensor? grad_mix, Tensor grad_normed, Tensor phase1_out, Tensor phase1_lse, Tensor? partial, Tensor query, Tensor? norm_weight, float eps, float scale, Tensor? out_norm_weight, float out_eps, Tensor?[] accumulate) -> Tensor[]
"""


def test_schemas_are_unchanged():
    ns = torch.ops.residual_rewriter
    got = {str(getattr(ns, n).default._schema) for n in dir(ns) if n.startswith("attn_res")}
    assert got == set(SCHEMAS.split("\n")) - {""}
