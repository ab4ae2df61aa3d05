"""Kernels of residual_rewriter, each beside its plain PyTorch reference.

``attn_res_reference`` is the spec; ``attn_res_triton`` the Triton kernel (imported lazily: importing
this package never imports triton); ``torch.ops.residual_rewriter.attn_res`` (and ``attn_res_phase1``,
``attn_res_phase2``, ``attn_res_normed``) are the ops that converted models call.
"""
from .attn_res import (  # noqa: F401
    DEFAULT_EPS,
    MAX_SOURCES,
    attn_res_backward_reference,
    attn_res_normed_reference,
    attn_res_phase1_reference,
    attn_res_phase2_reference,
    attn_res_reference,
    attn_res_triton,
    attn_res_weights_reference,
)
from . import partial_add  # noqa: F401,E402  (registers torch.ops.residual_rewriter.add_linear_)
