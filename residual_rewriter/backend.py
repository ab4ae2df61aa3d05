"""The ``torch.compile`` backend ``"attnres"``: the fast path for converted models.

    model = residual_rewriter.convert(model)
    fast = torch.compile(model, backend="attnres")                                  # all passes
    fast = torch.compile(model, backend="attnres", options={"fuse_norm": False})    # switch one off
    fast = torch.compile(model, backend=make_attnres_backend(batch_two_phase=False))  # same, as a factory

What it does with each graph Dynamo captures (passes in ``passes/lowering/``, in this order):
  1. find the ``attn_res`` aggregation ops;
  2. ``batch_two_phase``: one ``attn_res_phase1`` multi-query call per block + per-sublayer
     ``attn_res_phase2`` merges (the paper's two-phase schedule);
  3. ``fuse_norm``: ``attn_res`` followed by an RMSNorm -> ``attn_res_normed``, and a phase-2 merge
     followed by an RMSNorm -> ``attn_res_phase2_normed`` (so batched Block AttnRes sites are fused too;
     counted as ``fused`` / ``fused_phase2`` in the pass log); the mixture itself is not written when
     only the norm reads it (``mix_not_written``);
     then ``fuse_head``: each block's first merge (no partial block) folded into its phase-1 call
     (``attn_res_phase1_normed``: o_0 never written);
  4. ``accumulate_in_gemm`` (graphs compiled with grad disabled): ``p + linear(x, W)`` becomes
     ``add_linear_(p, x, W)``, the partial block's add done in place by the output GEMM (cuBLAS
     beta = 1; f never written); then
     ``fuse_add``: the partial block's update ``prev + f`` and the phase-2 merge that reads it ->
     ``attn_res_phase2_add_normed`` (``fused_partial_add``): one [..., D] read fewer forward, the
     partial's gradient summed in the merge's backward kernel; then
     ``fuse_block_end``: each block's last add ``p + f`` done by the next block's phase-1 call, which
     writes the block sum and reads it back from L2;
  5. ``lower``: on CUDA keep the ops (they run the Triton kernels); on CPU decompose them into torch
     math that inductor fuses ("auto"); or force "triton" / "decompose"; None keeps the ops as they are.
then ``compiler``: "inductor" (default: ``torch._inductor.compile_fx.compile_fx``, i.e. AOT autograd +
inductor for forward and backward), "aot_eager" or "eager" (for debugging the passes cheaply).
  6. ``fold_grad_sums``, on the backward graph AOT autograd derives (inductor's
     ``post_grad_custom_pre_pass``, or the ``aot_eager`` backward): a stream tensor's gradient sums
     folded into the ``accumulate`` inputs of our backward ops (no separate sum kernel).

Why passes 1-5 run BEFORE AOT autograd, on Dynamo's torch-level graph: there the aggregation is one
node per site and the training graph does not exist yet, so rewriting it is a forward-only graph
edit; AOT autograd then derives the backward from the new ops' autograd registrations (their Triton
backward kernels) or from the decomposed math. Rewriting the joint graph instead would mean
rewriting the backward ops by hand. Only the gradient sums, which autograd itself adds, need the
backward graph (pass 6: one local rewrite of ``add`` nodes). Inductor's FX-graph cache keys on the
graph it receives, i.e. the rewritten one, and on pass 6's source (its ``uuid``), so cached
artefacts cannot be stale with respect to the passes.

A graph with no aggregation is handed to the compiler untouched (plain inductor). What each pass did
is logged (INFO) to ``logging.getLogger("residual_rewriter.backend")`` and kept in ``backend.logs``.

Registration: importing this module registers ``"attnres"`` with Dynamo, and the package declares the
``torch_dynamo_backends`` entry point, so the name works even where nothing imported the package.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
import torch.fx as fx

from residual_rewriter.passes.lowering import LoweringError, PassLog, run_passes
from residual_rewriter.passes.lowering.common import library_op
from residual_rewriter.passes.lowering.fold_grad_sums import fold_grad_sums_in, inductor_pass

log = logging.getLogger("residual_rewriter.backend")

NAME = "attnres"
LOWER_TARGETS = ("auto", "triton", "decompose", None)
COMPILERS = ("inductor", "aot_eager", "eager")

__all__ = ["AttnResBackend", "AttnResBackendConfig", "LoweringError", "attnres_backend", "make_attnres_backend"]


@dataclass(frozen=True)
class AttnResBackendConfig:
    """Options of the ``attnres`` backend (each pass can be switched off).

    batch_two_phase: group each block's aggregations into one phase-1 call + phase-2 merges.
    fuse_norm: fuse an RMSNorm that reads an aggregation into it (``attn_res_normed``, or
        ``attn_res_phase2_normed`` for a phase-2 merge).
    fuse_head: fold each block's first merge (no partial block: only its RMSNorm) into the block's
        phase-1 call (``attn_res_phase1_normed``; needs batch_two_phase and fuse_norm).
    fuse_add: fold the partial block's add into the fused merge that reads it
        (``attn_res_phase2_add_normed``; needs fuse_norm).
    fuse_block_end: do each block's last add in the next block's phase-1 call (needs fuse_head; only
        where the ops run as kernels, not where they are decomposed into torch math).
    accumulate_in_gemm: in graphs compiled with grad disabled, do the partial block's add in place in
        the sublayer's output GEMM (``add_linear_``, cuBLAS beta = 1); rounds the sum once, not twice.
        "auto": on CUDA tensors only (on CPU inductor fuses the add itself, and measured faster).
    fold_grad_sums: in the backward graph, sum a stream tensor's gradients inside our backward kernels
        (their ``accumulate`` inputs) instead of a separate kernel (compilers "inductor", "aot_eager").
    lower: "auto" (Triton ops on CUDA, decomposed torch math elsewhere), "triton" (raises unless
        every op can run the Triton kernels), "decompose", or None (keep the library ops as they are).
    compiler: "inductor", "aot_eager" or "eager" — what compiles the rewritten graph.
    inductor_config: inductor config patches passed to ``compile_fx`` (e.g. {"max_autotune": True}).
    keep_graphs: keep a copy of every rewritten graph in ``backend.graphs`` (for tests and inspection).
    """

    batch_two_phase: bool = True
    fuse_norm: bool = True
    fuse_head: bool = True
    fuse_add: bool = True
    fuse_block_end: bool = True
    accumulate_in_gemm: Union[bool, str] = "auto"
    fold_grad_sums: bool = True
    lower: Optional[str] = "auto"
    compiler: str = "inductor"
    inductor_config: dict = field(default_factory=dict)
    keep_graphs: bool = False

    def __post_init__(self):
        if self.lower not in LOWER_TARGETS:
            raise ValueError(f"lower must be one of {LOWER_TARGETS}, got {self.lower!r}")
        if self.compiler not in COMPILERS:
            raise ValueError(f"compiler must be one of {COMPILERS}, got {self.compiler!r}")

    def replace(self, **options) -> "AttnResBackendConfig":
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown attnres backend option(s) {unknown}; known: {sorted(known)}")
        return dataclasses.replace(self, **options)


class AttnResBackend:
    """A Dynamo backend ``(gm, example_inputs) -> callable`` running the AttnRes passes, then a compiler.

    ``logs`` holds the PassLog of the most recent graphs (newest last); ``graphs`` their rewritten
    graphs when ``keep_graphs`` is set.
    """

    __name__ = NAME  # torch.compile names the backend after this

    def __init__(self, config: Optional[AttnResBackendConfig] = None, *, history: int = 32, **options):
        self.config = (config or AttnResBackendConfig()).replace(**options)
        self.logs: deque[PassLog] = deque(maxlen=history)
        self.graphs: deque[fx.Graph] = deque(maxlen=history)

    def __call__(self, gm: fx.GraphModule, example_inputs, *, options: Optional[dict] = None, mode: Optional[str] = None):
        # torch.compile(m, backend="attnres", options={...}) arrives here as `options`
        config = self.config.replace(**options) if options else self.config
        plog = run_passes(gm, batch_two_phase=config.batch_two_phase, fuse_norm=config.fuse_norm,
                          fuse_head=config.fuse_head, fuse_add=config.fuse_add, fuse_block_end=config.fuse_block_end,
                          accumulate_in_gemm=config.accumulate_in_gemm, lower=config.lower)
        self.logs.append(plog)
        if config.keep_graphs:
            self.graphs.append(copy.deepcopy(gm.graph))
        return _compile(gm, example_inputs, config, mode, plog)

    def reset(self) -> None:
        """Called by ``torch._dynamo.reset()`` through torch.compile's wrapper: forget the history."""
        self.logs.clear()
        self.graphs.clear()

    @property
    def last_log(self) -> Optional[PassLog]:
        return self.logs[-1] if self.logs else None

    def __repr__(self) -> str:
        return f"AttnResBackend({self.config})"


def _compile(gm: fx.GraphModule, example_inputs, config: AttnResBackendConfig, mode: Optional[str],
             plog: PassLog) -> Callable:
    def record_folds(counts: dict) -> None:  # called when AOT autograd compiles the backward graph
        if any(counts.values()):
            plog.record("fold_grad_sums", bool(counts["folded"]), counts)

    # only graphs that still call our ops can have our backward ops to fold into (not the decomposed ones)
    fold = config.fold_grad_sums and any(library_op(n) for n in gm.graph.nodes)
    if config.compiler == "eager":
        return gm.forward
    if config.compiler == "aot_eager":
        from torch._dynamo.backends.debugging import aot_eager, boxed_nop

        def backward(bw_gm, bw_inputs):
            if fold:
                record_folds(fold_grad_sums_in(bw_gm))
            return boxed_nop(bw_gm, bw_inputs)

        return aot_eager(gm, example_inputs, bw_compiler=backward)
    from torch._inductor.compile_fx import compile_fx  # imported late: heavy, and only inductor needs it

    patches = dict(config.inductor_config)
    if mode not in (None, "default"):
        patches = {**torch._inductor.list_mode_options(mode), **patches}
    if fold:  # ours first, then any custom pre-pass of the user's, as one pass
        patches["post_grad_custom_pre_pass"] = inductor_pass(record_folds, then=patches.get("post_grad_custom_pre_pass"))
    return compile_fx(gm, example_inputs, config_patches=patches or None)


def make_attnres_backend(config: Optional[AttnResBackendConfig] = None, **options: Any) -> AttnResBackend:
    """A backend object with its own options and history: ``torch.compile(m, backend=make_attnres_backend(...))``."""
    return AttnResBackend(config, **options)


attnres_backend = AttnResBackend()  # the instance behind the name "attnres" (and the entry point)


def _register() -> None:
    """Register ``attnres_backend`` as "attnres" unless Dynamo already has it, or is about to: when the
    entry point has been discovered, ``lookup_backend`` registers the loaded object itself and would
    fail on a duplicate name if this import (triggered by that very load) had registered it first."""
    from torch._dynamo.backends import registry

    if NAME in registry._COMPILER_FNS or registry._BACKENDS.get(NAME) is not None:
        return
    registry.register_backend(compiler_fn=attnres_backend, name=NAME)


_register()
