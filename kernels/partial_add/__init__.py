"""The partial block's add done by the sublayer's output GEMM, in place:
``torch.ops.residual_rewriter.add_linear_(partial, x, weight)`` is ``partial += x @ weight.T``.

In Block AttnRes every sublayer's output ``f = x @ W.T`` (``o_proj`` / ``down_proj``) is added to the
running partial block, ``p' = p + f``: unfused, the GEMM writes f, and an add reads p and f and
writes p'. With ``addmm_`` (cuBLAS ``beta = 1``) the GEMM reads p in its epilogue and writes p' over
it: f is never written, and no add runs (one [tokens, hidden] pass instead of three, counted against
the original's f write). Only in graphs without autograd (``torch.no_grad`` / inference): training
must keep p for the merge's backward, and ``torch.addmm(p, ...)`` with a 2-D addend COPIES p first.

Rounding: unfused, f is rounded to the input dtype first and the sum again; here the GEMM's fp32
accumulator is added to p and the sum is rounded ONCE. In bf16/fp16 the result is within one unit in
the last place of the exact sum; the unfused graph can be many units off where p and f nearly cancel
(f's rounding error is relative to f, not to the small sum), and is further off on average (tested).
In float32 only the accumulation order differs; float64 is exact to rounding.
The compile backend's ``accumulate_in_gemm`` pass (``passes/lowering/gemm_accumulate.py``) emits it.
"""
from __future__ import annotations

import torch
from torch import Tensor

LIB = "residual_rewriter"


@torch.library.custom_op(f"{LIB}::add_linear_", mutates_args={"partial"})
def add_linear_(partial: Tensor, x: Tensor, weight: Tensor) -> None:
    """partial [..., N] += x [..., K] @ weight [N, K].T, in place (partial contiguous)."""
    n, k = weight.shape
    if partial.shape[-1] != n or x.shape[-1] != k or partial.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"add_linear_: partial {tuple(partial.shape)}, x {tuple(x.shape)} and weight "
                         f"{tuple(weight.shape)} do not fit partial += x @ weight.T")
    if not partial.is_contiguous():
        raise ValueError("add_linear_: the partial must be contiguous (it is accumulated into in place)")
    partial.view(-1, n).addmm_(x.reshape(-1, k), weight.t())


@add_linear_.register_fake
def _add_linear_fake(partial, x, weight):
    return None
