"""What a kernel launch costs each SM — registers and stack (spills) per thread — read off the
compiled sm_90 cubin, with no GPU: the JIT's own binder derives the signature and the 16-byte
divisibility attributes from the real arguments (CPU tensors do: only dtype and alignment matter),
``triton.compile`` builds the cubin, and the ``cuobjdump`` that ships with triton reads it.

Registers decide how many programs share an SM (65536 per SM; a 32-warp block may use at most 64 a
thread), which for these memory-bound kernels decides how much latency is hidden. Used by
``tests/kernels/compile_sm90`` (guards) and ``benchmarks/attn_res/kernel_resources.py`` (table).
"""
from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

HOPPER = GPUTarget("cuda", 90, 32)
REGISTERS_PER_SM = 65536


def compile_launch(kernel, args, num_warps: int, target=HOPPER, **constexprs):
    """Compile what ``kernel[grid](*args, num_warps=..., **constexprs)`` would, for ``target``."""
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, spec, options = binder(*args, num_warps=num_warps, **constexprs)
    options, signature, cexprs, attrs = kernel._pack_args(
        backend, dict(num_warps=num_warps, **constexprs), bound, spec, options)
    return triton.compile(ASTSource(kernel, signature, cexprs, attrs), target=target, options=options.__dict__)


def cuobjdump() -> Path:
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def usage(compiled) -> dict:
    """{'registers', 'stack_bytes', 'shared_bytes', 'barriers', 'num_warps'} of a compiled kernel."""
    with tempfile.TemporaryDirectory() as d:
        cubin = Path(d) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        res = subprocess.run([str(cuobjdump()), "-res-usage", str(cubin)], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([str(cuobjdump()), "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    found = {k: int(v) for k, v in re.findall(r"(REG|STACK):(\d+)", res)}
    return {
        "registers": found["REG"],
        "stack_bytes": found["STACK"],
        "shared_bytes": compiled.metadata.shared,
        "barriers": sass.count("BAR.SYNC"),
        "num_warps": compiled.metadata.num_warps,
    }


def programs_per_sm(u: dict) -> int:
    """Resident programs per SM as registers allow (ignoring shared memory, which these kernels barely use)."""
    return max(0, min(64 // u["num_warps"], REGISTERS_PER_SM // max(1, u["registers"] * 32 * u["num_warps"])))
