"""Recognising the library's ops in a graph, by name.

Compare ops by name, never by identity: building some models (e.g. Hugging Face ones) refreshes
``torch.ops`` caches, after which ``torch.ops.residual_rewriter.attn_res.default`` is a new object.
"""
from __future__ import annotations

import torch
import torch.fx as fx

ATTN_RES = "residual_rewriter::attn_res"


def op_name(node: fx.Node) -> str | None:
    return target_name(node.target)


def target_name(target) -> str | None:
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name
    return None


def is_attn_res(node: fx.Node) -> bool:
    return node.op == "call_function" and op_name(node) == ATTN_RES


def is_attn_res_op(target) -> bool:
    """``target`` (an op being called) is the aggregation op."""
    return target_name(target) == ATTN_RES
