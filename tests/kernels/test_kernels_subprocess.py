"""Drives the sub-suites that need their own process (see conftest.py)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def _run_suite(suite: str, interpret: bool = False, device: str = "cpu") -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "RR_KERNELS_DEVICE")}
    env["RR_KERNELS_SUITE"] = suite
    env["RR_KERNELS_DEVICE"] = device
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences a triton 3.9 notice; same as the default
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    cmd = [sys.executable, "-m", "pytest", str(HERE / suite), "-q", "-p", "no:cacheprovider", "-x"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    print(proc.stdout[-6000:])
    if proc.returncode != 0:
        pytest.fail(f"{suite} suite failed (rc={proc.returncode}):\n{proc.stdout[-12000:]}\n{proc.stderr[-4000:]}")


def test_interpreter_suite():
    """Triton kernels on CPU tensors (TRITON_INTERPRET=1) against the float64 reference."""
    pytest.importorskip("triton")
    _run_suite("numerics", interpret=True)


def test_cuda_suite():
    """The same numerics suite compiled and run on a GPU, plus GPU-sized shapes (int64 offsets)."""
    pytest.importorskip("triton")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here (the interpreter suite covers the kernels' logic on CPU)")
    _run_suite("numerics", device="cuda")


def test_sm90_compile_suite():
    """Every kernel compiled to Hopper cubin (no GPU needed; catches what only the interpreter accepts)."""
    pytest.importorskip("triton")
    _run_suite("compile_sm90")
