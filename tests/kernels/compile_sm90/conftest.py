"""Runs only in a process WITHOUT TRITON_INTERPRET (see ../test_kernels_subprocess.py)."""
import os

if os.environ.get("TRITON_INTERPRET", "0") == "1":  # pragma: no cover
    raise RuntimeError("tests/kernels/compile_sm90 must run with TRITON_INTERPRET unset")
