"""Launch-side helpers shared by the Triton kernels of ``fused.py`` and ``two_phase.py``.

Nothing here imports triton: the kernel modules do, and only they are imported lazily.
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional, Sequence

import torch
from torch import Tensor

# The kernels take the sources as a tuple of pointers (a Triton tuple argument, unrolled with
# tl.static_range), so there is no stacking copy. Every source count is its own specialization, and
# registers and compile time grow with it (the fused backward on 2 CPU cores: 5-9 s at 16 sources,
# 240 s at 64, with register spills). So one launch takes at most MAX_SOURCES, CHECKED; the library
# ops and attn_res_triton take any number, in chunks merged by log-sum-exp (chunked.py).
MAX_SOURCES = 16

# Element budget of one program's [BLOCK_T, BLOCK_D] tile on a GPU: with BLOCK_D = next_pow2(D),
# BLOCK_T = budget // BLOCK_D (D=4096 -> 1 token per program). The interpreter pays per program and
# per op, not per element: it gets much larger tiles.
GPU_TILE_ELEMENTS = 4096
# Warps are chosen so that each thread holds ELEMENTS_PER_THREAD elements of each source tile.
# Registers read off the sm_90 cubins (bf16, 9 sources at D=4096 / 16 at D=7168):
#   forward:  16 per thread -> 128 / 128 registers + 144 B spills;  8 per thread -> 60 / 60, no spills
#   backward: 16 per thread -> 150 / 128 + 80 B spills;   8 per thread -> 105 / (32 warps) 64 + 368 B
# A block of 32 warps may use at most 64 registers a thread, so the backward stops at 16 warps.
# Not yet timed on a GPU against 16 per thread: benchmarks/attn_res sweeps both.
ELEMENTS_PER_THREAD = 8


@contextlib.contextmanager
def elements_per_thread(n: int | None):
    """Launch with ``ELEMENTS_PER_THREAD = n`` inside the block (None: leave it), e.g. to time two
    launch configurations side by side in one benchmark run."""
    global ELEMENTS_PER_THREAD
    old = ELEMENTS_PER_THREAD
    ELEMENTS_PER_THREAD = n or old
    try:
        yield
    finally:
        ELEMENTS_PER_THREAD = old
INTERPRET_TILE_ELEMENTS = 1 << 15

# Tests set this to True: every output buffer is then allocated filled with NaN, so an element the
# kernel forgets to write fails the comparison instead of passing by luck (torch.empty is often 0).
POISON_OUTPUTS = False

TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_device(tensors: Sequence[Tensor], what: str) -> None:
    """The Triton path runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1. Anything else
    is an error, never a silent fallback to the reference."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"{what}: all tensors must be on one device, got {sorted(map(str, devices))}")
    dev = devices.pop()
    if dev.type == "cuda":
        return
    if dev.type == "cpu" and interpreting():
        return
    raise RuntimeError(
        f"{what}: the Triton kernels run on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set before "
        f"triton is imported); got {dev}. Use attn_res_reference or torch.ops.residual_rewriter.* on CPU."
    )


def check_dtype(dtype: torch.dtype, what: str) -> None:
    if dtype not in TRITON_DTYPES:
        raise ValueError(
            f"{what}: the Triton kernels take float32/float16/bfloat16 inputs (fp32 math), got {dtype}; "
            f"float64 is served by the reference"
        )


def check_num_sources(n: int, what: str) -> None:
    if n < 1:
        raise ValueError(f"{what} needs at least one source, got an empty list")
    if n > MAX_SOURCES:
        raise ValueError(
            f"{what}: {n} sources exceed one kernel launch's limit of {MAX_SOURCES} (MAX_SOURCES). "
            f"Call attn_res_triton or the torch.ops.residual_rewriter ops instead: they split the "
            f"sources into chunks of at most {MAX_SOURCES} and merge them (kernels/attn_res/chunked.py)."
        )


def as_rows(x: Tensor) -> Tensor:
    """``[..., D]`` -> a ``[T, D]`` view with unit stride along D and one row stride, copying only when
    no such view exists (e.g. a transposed hidden dim). Non-contiguous token strides stay views."""
    D = x.shape[-1]
    if x.stride(-1) != 1:
        x = x.contiguous()
    try:
        return x.view(-1, D)
    except RuntimeError:  # leading dims not collapsible into one stride
        return x.reshape(-1, D)


def accumulate_rows(accumulate: Optional[Sequence[Optional[Tensor]]], grads: Sequence[Tensor], what: str):
    """A backward kernel's ``accumulate`` inputs, one per gradient buffer in ``grads``: (row views, their
    row strides, a bit mask of the entries given). An absent entry's pointer is its gradient buffer, a
    placeholder the kernel never reads (its bit is 0)."""
    accumulate = [None] * len(grads) if accumulate is None else list(accumulate)
    if len(accumulate) != len(grads):
        raise ValueError(f"{what}: {len(accumulate)} gradients to accumulate for {len(grads)} sources")
    rows, mask = [], 0
    for i, (acc, g) in enumerate(zip(accumulate, grads)):
        if acc is None:
            rows.append(g.view(-1, g.shape[-1]))
            continue
        if acc.shape != g.shape:
            raise ValueError(f"{what}: accumulate[{i}] has shape {tuple(acc.shape)}, source {i} {tuple(g.shape)}")
        rows.append(as_rows(acc))
        mask |= 1 << i
    check_device([*grads, *rows], what)
    return tuple(rows), tuple(int(r.stride(0)) for r in rows), mask


def empty(shape, dtype, device) -> Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def tile(T: int, D: int, budget: int | None = None, max_warps: int = 16) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_D, num_warps) for T tokens of hidden size D. BLOCK_D covers the whole row:
    the RMSNorm and the score need the full row, and a whole row per program keeps one pass."""
    if budget is None:
        budget = INTERPRET_TILE_ELEMENTS if interpreting() else GPU_TILE_ELEMENTS
    block_d = next_pow2(D)
    block_t = max(1, min(next_pow2(max(T, 1)), budget // block_d))
    num_warps = max(1, min(max_warps, block_t * block_d // (32 * ELEMENTS_PER_THREAD)))
    return block_t, block_d, num_warps


def num_programs(num_tiles: int, device: torch.device) -> int:
    """Programs of the persistent backward kernels (each loops over tiles and writes one row of a
    [programs, D] fp32 partial of the query gradient, summed afterwards in a fixed order, so the
    reduction over tokens is deterministic — no atomics)."""
    if device.type == "cuda":
        cap = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        cap = 2
    return max(1, min(num_tiles, cap))
