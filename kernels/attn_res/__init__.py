"""AttnRes aggregation: reference (the spec), library op, and Triton kernels."""
from .reference import (
    DEFAULT_EPS,
    attn_res_backward_reference,
    attn_res_normed_reference,
    attn_res_phase1_reference,
    attn_res_phase2_reference,
    attn_res_reference,
    attn_res_weights_reference,
)
from . import op  # noqa: F401  (registers torch.ops.residual_rewriter.*)
