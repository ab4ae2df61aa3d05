"""Kernel tests. Two sub-suites need a process of their own, because triton reads TRITON_INTERPRET
once, at import: ``numerics/`` (the kernels run against the float64 reference: on CPU tensors under
TRITON_INTERPRET=1, or on a CUDA GPU with RR_KERNELS_DEVICE=cuda) and ``compile_sm90/``
(TRITON_INTERPRET unset: the kernels are compiled to sm_90 cubin). The normal run ignores both
folders and ``test_kernels_subprocess.py`` runs each in a subprocess with the right env.
"""
import os

import pytest

_suite = os.environ.get("RR_KERNELS_SUITE", "")
collect_ignore = [d for d in ("numerics", "compile_sm90") if d != _suite]


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The sub-suites' own counts (test_kernels_subprocess.py), which this run's counts do not show:
    each sub-suite is one test here."""
    suites = config.__dict__.get("_rr_kernel_subsuites")
    if suites:
        terminalreporter.section("kernel sub-suites (each run in its own process)")
        for name, line in suites.items():
            terminalreporter.write_line(f"{name}: {line}")


@pytest.fixture
def triton_interpreter():
    """Skips where triton's interpreter (TRITON_INTERPRET=1, the kernels on CPU tensors) cannot run: triton < 3.7
    (torch 2.11's) takes int() of one-element numpy arrays, which numpy >= 2.4 refuses. A GPU compiles the
    kernels instead and runs the same numerics (test_cuda_suite)."""
    triton = pytest.importorskip("triton")
    import numpy
    from torch.torch_version import TorchVersion

    if TorchVersion(triton.__version__) < (3, 7):
        try:
            int(numpy.zeros(1))
        except TypeError:
            pytest.skip(f"triton {triton.__version__}'s interpreter cannot run with numpy {numpy.__version__}")
