"""Drives the two sub-suites that need their own process (see conftest.py)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def _run_suite(suite: str, interpret: bool) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["RR_KERNELS_SUITE"] = suite
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
    _run_suite("interpret", interpret=True)


def test_sm90_compile_suite():
    """Every kernel compiled to Hopper cubin (no GPU needed; catches what only the interpreter accepts)."""
    pytest.importorskip("triton")
    _run_suite("compile_sm90", interpret=False)
