"""The ``attnres`` compile backend's FX passes, in pipeline order (one module per pass).

find.py       pass 1: the ``attn_res`` aggregation ops (changes nothing)
batch.py      pass 2: the two-phase schedule: one phase-1 multi-query call per block + phase-2 merges
fuse_norm.py  pass 3: ``attn_res`` / ``attn_res_phase2`` followed by an RMSNorm -> ``attn_res_normed`` /
              ``attn_res_phase2_normed`` (the mix not written when only the norm reads it)
fuse_head.py  pass 3b: each block's first merge (no partial: only its RMSNorm) folded into its phase-1
              call -> ``attn_res_phase1_normed``
gemm_accumulate.py  pass 4a (graphs without autograd): ``p + linear(x, W)`` -> ``add_linear_(p, x, W)``,
              the partial block's add done in place by the sublayer's output GEMM (cuBLAS beta = 1)
fuse_add.py   pass 4b: the partial block's ``prev + f`` folded into the merge that reads it ->
              ``attn_res_phase2_add_normed``
fuse_block_end.py  pass 4c: each block's last add ``p + f`` done by the next block's phase-1 call
              (``attn_res_phase1_normed(..., end_partial=p, end_delta=f)``)
lower.py      pass 5: keep the ops for Triton (CUDA) or decompose them into torch math (CPU)
fold_grad_sums.py  pass 6, on the BACKWARD graph AOT autograd derives (run by the backend's compiler
              step, not by ``run_passes``): gradient sums folded into our backward ops' ``accumulate``
decompose.py  the ops' math as traceable torch code (used by pass 4)
common.py     op targets, fake-value metadata, ``CountingPass`` (the passes' base: counts, lint + recompile)

Each pass is a ``torch.fx.passes.infra.pass_base.PassBase``: ``pass(gm) -> PassResult(gm, modified)``,
with a ``summary()`` of counts. ``run_passes`` runs the enabled ones, lints and recompiles after each,
and logs the counts to ``logging.getLogger("residual_rewriter.backend")`` (INFO; quiet by default).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .batch import BatchTwoPhase, plan_groups
from .common import LoweringError, library_op
from .find import Aggregation, FindAggregations, find_aggregations
from .fuse_add import FusePartialAdd
from .fuse_block_end import FuseBlockEnd
from .fuse_head import FuseHeadMerge
from .gemm_accumulate import AccumulateInGemm
from .fuse_norm import FuseRMSNorm, match_rms_norm
from .lower import Lower, decompose_node

log = logging.getLogger("residual_rewriter.backend")

__all__ = [
    "AccumulateInGemm", "Aggregation", "FuseBlockEnd", "FuseHeadMerge", "BatchTwoPhase", "FindAggregations", "FusePartialAdd", "FuseRMSNorm", "Lower", "LoweringError", "PassLog",
    "decompose_node", "find_aggregations", "match_rms_norm", "plan_groups", "run_passes",
]


@dataclass
class PassLog:
    """What each pass did to one graph: ``{pass name: {"modified": bool, **counts}}``, in run order."""

    passes: dict = field(default_factory=dict)

    def record(self, name: str, modified: bool, counts: dict) -> None:
        self.passes[name] = {"modified": modified, **counts}
        log.info("attnres %s: %s%s", name, "changed " if modified else "unchanged ", counts)

    def __getitem__(self, name: str) -> dict:
        return self.passes[name]


def run_passes(
    gm: fx.GraphModule, *, batch_two_phase: bool = True, fuse_norm: bool = True, fuse_head: bool = True,
    fuse_add: bool = True, fuse_block_end: bool = True, accumulate_in_gemm: bool | str = "auto",
    lower: str | None = "auto",
) -> PassLog:
    """Run the pipeline on ``gm`` in place. ``lower=None`` keeps the library ops as they are (for
    inspecting the batched/fused graph, or running the ops' own implementations).
    ``accumulate_in_gemm`` applies only when grad is disabled now, i.e. the graph is compiled for
    ``torch.no_grad`` / inference (Dynamo guards on grad mode); "auto" only to CUDA tensors."""
    plog = PassLog()
    find = FindAggregations()
    find(gm)
    plog.record(find.name, False, find.summary())
    if not find.found and not find.counts:
        return plog  # nothing of ours: the graph is left exactly as it came
    passes = []
    lowering = Lower(lower) if lower is not None else None
    if batch_two_phase:
        passes.append(BatchTwoPhase())
    if fuse_norm:
        passes.append(FuseRMSNorm())
    if fuse_head and fuse_norm and batch_two_phase:  # it folds fuse_norm's head merges into batch's phase 1
        passes.append(FuseHeadMerge())
    if accumulate_in_gemm and not torch.is_grad_enabled():
        passes.append(AccumulateInGemm(cuda_only=accumulate_in_gemm == "auto"))
    elif accumulate_in_gemm:
        plog.record(AccumulateInGemm.name, False, {"skipped_grad_enabled": 1})
    if fuse_add and fuse_norm:  # it folds adds into fuse_norm's merges: nothing to do without them
        passes.append(FusePartialAdd())
    if fuse_block_end and fuse_head and fuse_norm and batch_two_phase:  # into fuse_head's phase-1 calls
        ops = [n for n in gm.graph.nodes if library_op(n)]
        if lowering is not None and all(lowering.choice(n) == "decompose" for n in ops):  # the add would come
            # back as torch math, only moved: nothing gained
            plog.record(FuseBlockEnd.name, False, {"skipped_decomposed": 1})
        else:
            passes.append(FuseBlockEnd())
    if lowering is not None:
        passes.append(lowering)
    for p in passes:
        result = p(gm)  # PassBase.__call__: requires -> call -> ensures
        gm.graph.lint()
        plog.record(p.name, result.modified, p.summary())
    return plog
