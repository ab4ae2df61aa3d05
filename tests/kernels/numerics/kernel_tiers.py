"""Tolerance tiers of the Triton kernels against the float64 reference — the one place they live.

Metric: max |kernel - reference| / max |reference| per tensor (an elementwise rtol is meaningless
for gradients with entries near zero). The reference runs in float64 on the same (already rounded)
low-precision inputs, so the tiers measure the kernel's own error: fp32 math plus one rounding of
each output to its dtype (bf16: 2^-8 relative, fp16: 2^-11). NOTE: the interpreter TRUNCATES
fp32 -> bf16/fp16 casts (measured: 100% match with bit-chopping, ~50% mismatch with torch's
round-to-nearest; fp_downcast_rounding="rtne" is ignored), while the GPU rounds to nearest, so under
the interpreter a low-precision output carries up to 1 ulp instead of 1/2. The same tiers hold on CUDA.
Measured worst cases on the test shapes (interpreter): about 5e-7 / 7e-5 (fp32 out / grads, the
latter in the sharp-softmax case), 1e-3 (fp16), 6e-3 (bf16).
"""
import os

import torch

# "cpu" (Triton interpreter) or "cuda" (the compiled kernels on a GPU); see conftest.py.
DEVICE = os.environ.get("RR_KERNELS_DEVICE", "cpu")


def cpu_randn(*shape, generator):
    """Seeded normal draws made on the CPU (the seeds stay device-independent), then moved to DEVICE."""
    return torch.randn(*shape, generator=generator, device="cpu").to(DEVICE)


TIERS = {
    # dtype: (outputs, gradients)
    torch.float32: (1e-5, 1e-4),
    torch.float16: (3e-3, 5e-3),
    torch.bfloat16: (2e-2, 3e-2),
}


def assert_close_tier(actual, expected, dtype, kind="out", name="", floor=0.0):
    """``floor``: a larger tolerance a test derives from its problem's conditioning (see its docstring)."""
    tol = max(TIERS[dtype][0 if kind == "out" else 1], floor)
    assert actual is not None and expected is not None, name
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    a, e = actual.detach().double(), expected.detach().double()
    assert torch.isfinite(a).all(), f"{name}: non-finite values (an unwritten output stays NaN)"
    denom = e.abs().max().item()
    err = (a - e).abs().max().item()
    if denom == 0.0:
        assert err <= tol, f"{name}: expected zeros, max |err| {err:.3g}"
    else:
        assert err / denom <= tol, f"{name} ({dtype}, {kind}): rel err {err / denom:.3g} > {tol:.1g}"
