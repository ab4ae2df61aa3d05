"""AttnRes aggregation: reference (the spec), library ops, and Triton kernels.

Layout: ``reference.py`` (forward specs) and ``reference_grads.py`` (closed-form backward specs of
the two-phase and normed variants) are plain PyTorch; ``op.py`` declares the library ops
(``torch.ops.residual_rewriter.attn_res``, ``attn_res_phase1``, ... and their backward ops) in one
table and registers them; ``fused.py`` / ``two_phase.py`` hold the Triton kernels, wired into the ops
on CUDA by ``dispatch.py`` (more sources than one launch takes: ``chunked.py``). Imports go one way:
reference <- reference_grads <- op; _launch <- fused <- two_phase <- chunked <- dispatch (<- op, on
the first CUDA call). Importing this package does not import triton.
"""
from .reference import (
    DEFAULT_EPS,
    attn_res_backward_reference,
    attn_res_normed_reference,
    attn_res_phase1_reference,
    attn_res_phase2_normed_reference,
    attn_res_phase2_reference,
    attn_res_reference,
    attn_res_weights_reference,
)
from ._launch import MAX_SOURCES
from . import op  # noqa: F401  (registers torch.ops.residual_rewriter.*)


def attn_res_triton(sources, query, norm_weight=None, eps=DEFAULT_EPS, scale=1.0):
    """The Triton kernel with ``attn_res_reference``'s signature and autograd (see ``dispatch.py``).

    Runs on CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 was set before triton was imported;
    raises otherwise. Any number of sources (over ``MAX_SOURCES``, in chunks: ``chunked.py``).
    Triton is imported on the first call.
    """
    from .dispatch import attn_res_triton as _impl

    return _impl(sources, query, norm_weight, eps, scale)
