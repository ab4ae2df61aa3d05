"""Runs only in a process started by ../test_kernels_subprocess.py: either with TRITON_INTERPRET=1
(kernels on CPU tensors, through the interpreter) or with RR_KERNELS_DEVICE=cuda (kernels compiled and
run on the GPU; every test tensor is created on CUDA through the default device)."""
import os

import pytest
import torch

from kernel_tiers import DEVICE

if DEVICE == "cuda":
    if not torch.cuda.is_available():  # pragma: no cover
        raise RuntimeError("RR_KERNELS_DEVICE=cuda but torch sees no CUDA device")
    if os.environ.get("TRITON_INTERPRET") == "1":  # pragma: no cover
        raise RuntimeError("RR_KERNELS_DEVICE=cuda must run the compiled kernels: unset TRITON_INTERPRET")
    torch.set_default_device("cuda")
elif os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover
    raise RuntimeError("tests/kernels/numerics on CPU needs TRITON_INTERPRET=1 set before triton is imported")


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """Every kernel output buffer starts as NaN: an element the kernel does not write fails the test."""
    from residual_rewriter.kernels.attn_res import _launch

    monkeypatch.setattr(_launch, "POISON_OUTPUTS", True)
