"""Kernels of residual_rewriter, each beside its plain PyTorch reference.

``attn_res_reference`` is the spec; ``torch.ops.residual_rewriter.attn_res`` is the op that
converted models call.
"""
from .attn_res import (  # noqa: F401
    DEFAULT_EPS,
    attn_res_backward_reference,
    attn_res_normed_reference,
    attn_res_phase1_reference,
    attn_res_phase2_reference,
    attn_res_reference,
    attn_res_weights_reference,
)
