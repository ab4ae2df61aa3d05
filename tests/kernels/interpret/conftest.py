"""Runs only in a process started with TRITON_INTERPRET=1 (see ../test_kernels_subprocess.py)."""
import os

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover
    raise RuntimeError("tests/kernels/interpret needs TRITON_INTERPRET=1 set before triton is imported")


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """Every kernel output buffer starts as NaN: an element the kernel does not write fails the test."""
    from residual_rewriter.kernels.attn_res import _launch

    monkeypatch.setattr(_launch, "POISON_OUTPUTS", True)
