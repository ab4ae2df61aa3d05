"""Drives the sub-suites that need their own process (see conftest.py). Every sub-run goes to the end
(no ``-x``: every failure is listed), its final summary line ("75 passed, 2 skipped in 40s") is parsed,
printed, attached to the test (``record_property``) and shown in this run's terminal summary
(conftest.py), and the test fails if the sub-run collected no test or had any failure or error."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]

_OUTCOMES = ("failed", "passed", "skipped", "deselected", "xfailed", "xpassed", "error", "errors", "warning", "warnings")
_SUMMARY = re.compile(r"^=*\s*((?:\d+ \w+(?:, )?)+|no tests ran) in [\d.]+s\b")


def parse_summary(stdout: str) -> tuple[str, dict[str, int]] | None:
    """The sub-run's final summary line and its counts ({"passed": 75, "skipped": 2}), or None."""
    for line in reversed(stdout.splitlines()):
        m = _SUMMARY.match(line.strip())
        if m:
            counts = {}
            for n, what in re.findall(r"(\d+) (\w+)", m.group(1)):
                if what not in _OUTCOMES:
                    return None
                what = {"error": "errors", "warning": "warnings"}.get(what, what)
                counts[what] = counts.get(what, 0) + int(n)
            return line.strip(" ="), counts
    return None


def _run_suite(record_property, request, suite: str, interpret: bool = False, device: str = "cpu") -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "RR_KERNELS_DEVICE")}
    env["RR_KERNELS_SUITE"] = suite
    env["RR_KERNELS_DEVICE"] = device
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences a triton 3.9 notice; same as the default
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    cmd = [sys.executable, "-m", "pytest", str(HERE / suite), "-q", "-p", "no:cacheprovider", "-ra"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    name = suite + (" (TRITON_INTERPRET=1)" if interpret else " (on the GPU)" if device == "cuda" else "")
    parsed = parse_summary(proc.stdout)
    line, counts = parsed if parsed else ("no summary line found", {})
    print(f"kernel sub-suite {name}: {line}")  # the whole output is in the failure message
    record_property(f"kernel_subsuite[{name}]", line)
    request.config.__dict__.setdefault("_rr_kernel_subsuites", {})[name] = line
    ran = sum(counts.get(k, 0) for k in ("passed", "failed", "errors", "skipped", "xfailed", "xpassed"))
    failures = [l for l in proc.stdout.splitlines() if l.startswith(("FAILED ", "ERROR "))]
    if parsed is None or ran == 0 or counts.get("failed") or counts.get("errors") or proc.returncode != 0:
        pytest.fail(
            f"{name} sub-suite: {line} (rc={proc.returncode}); "
            + ("it collected no test" if parsed and ran == 0 else f"{len(failures)} failed/errored:")
            + "".join(f"\n  {l}" for l in failures)
            + f"\n--- stdout (tail) ---\n{proc.stdout[-12000:]}\n--- stderr (tail) ---\n{proc.stderr[-4000:]}",
            pytrace=False,
        )


def test_interpreter_suite(record_property, request, triton_interpreter):
    """Triton kernels on CPU tensors (TRITON_INTERPRET=1) against the float64 reference."""
    _run_suite(record_property, request, "numerics", interpret=True)


def test_cuda_suite(record_property, request):
    """The same numerics suite compiled and run on a GPU, plus GPU-sized shapes (int64 offsets)."""
    pytest.importorskip("triton")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here (the interpreter suite covers the kernels' logic on CPU)")
    _run_suite(record_property, request, "numerics", device="cuda")


def test_sm90_compile_suite(record_property, request):
    """Every kernel compiled to Hopper cubin (no GPU needed; catches what only the interpreter accepts)."""
    pytest.importorskip("triton")
    _run_suite(record_property, request, "compile_sm90")


@pytest.mark.parametrize(
    "stdout,line,counts",
    [
        ("...\n75 passed, 2 skipped in 40.12s\n", "75 passed, 2 skipped in 40.12s", {"passed": 75, "skipped": 2}),
        ("FAILED a::b\n1 failed, 3 passed, 1 warning in 1.00s\n", "1 failed, 3 passed, 1 warning in 1.00s",
         {"failed": 1, "passed": 3, "warnings": 1}),
        ("==== 2 errors in 0.50s ====\n", "2 errors in 0.50s", {"errors": 2}),
        ("\nno tests ran in 0.01s\n", "no tests ran in 0.01s", {}),
    ],
)
def test_parse_summary(stdout, line, counts):
    assert parse_summary(stdout) == (line, counts)
    assert parse_summary("Traceback (most recent call last):\n  ImportError: x\n") is None
