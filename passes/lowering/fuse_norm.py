"""Pass 3, fuse_norm: an aggregation followed by the sublayer's own RMSNorm becomes ONE op.

After ``convert`` every pre-norm reads its site's aggregation: ``f(RMSNorm(attn_res(...)))``. The
fused ops return ``(mix, RMSNorm(mix) * w)`` from one pass, so the mixture is not written and read
back just to be normalised (one [..., D] round trip per site):
  * ``attn_res`` + RMSNorm         -> ``attn_res_normed``        (counted as ``fused``);
  * ``attn_res_phase2`` + RMSNorm  -> ``attn_res_phase2_normed`` (counted as ``fused_phase2``): the
    batch pass runs first, so in Block AttnRes most sites reach this pass as phase-2 merges.

Matches, on the output ``h`` of an ``attn_res`` or ``attn_res_phase2`` node, an RMSNorm over the last
dim however Dynamo spelled it:
  * ``F.rms_norm(h, (D,), w, eps)`` / ``torch.rms_norm``;
  * the inlined form of Hugging Face's ``LlamaRMSNorm`` and of most hand-written RMSNorms:
    ``x = h[.to(float32)]; y = x * rsqrt(mean(x^2, -1, keepdim) + eps) [.to(dt)] [* w]``
    (``x^2`` as ``pow(x, 2)`` or ``x * x``, either operand order of ``*``/``+``, method or function form).
  ``w`` is absorbed when it is a [D] tensor computed before the aggregation; the chain's
  intermediates must have no readers outside the chain; the norm's output dtype must equal ``h``'s.
When nothing but the norm reads the mixture (every converted model), the fused op gets
``return_mix=False``: the mix is not written and no zero gradient is made for it (counted as
``mix_not_written``).
Leaves: LayerNorm (mean-centred: not what the fused ops compute), any norm whose intermediates are
read elsewhere, and aggregations that feed no norm (counted as ``not_followed_by_rms_norm``).
"""
from __future__ import annotations

import logging
import operator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from .common import (
    META, NORMED, PHASE2, PHASE2_NORMED, CountingPass, copy_location, erase_unused, infer_meta, library_op, op, value,
)
from .find import find_aggregations

log = logging.getLogger("residual_rewriter.backend")

_FUNCTIONS = {
    operator.mul: "mul", torch.mul: "mul", operator.add: "add", torch.add: "add",
    torch.rsqrt: "rsqrt", torch.pow: "pow", operator.pow: "pow", torch.mean: "mean",
}
_RMS_NORM_FUNCTIONS = {F.rms_norm, getattr(torch, "rms_norm", F.rms_norm)}


def _kind(node: fx.Node) -> Optional[str]:
    """Spelling-independent name of a node's operation (method and function forms alike)."""
    if node.op == "call_method":
        return {"float": "to", "type_as": None}.get(node.target, node.target)
    if node.op == "call_function":
        return _FUNCTIONS.get(node.target)
    return None


def _only_user(node: fx.Node) -> Optional[fx.Node]:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _other(node: fx.Node, known: fx.Node):
    """The operand of a binary node that is not ``known`` (None if ``known`` is not an operand)."""
    a, b = node.args[:2]
    return b if a is known else a if b is known else None


def _is_cast(node: fx.Node) -> bool:
    """A dtype conversion: ``x.to(dtype)``, ``x.float()`` (no device move, no copy flags)."""
    if _kind(node) != "to" or node.kwargs.get("device") is not None:
        return False
    rest = node.args[1:] + tuple(v for k, v in node.kwargs.items() if k == "dtype")
    return node.target == "float" or (len(rest) == 1 and isinstance(rest[0], torch.dtype))


def _is_last_dim(dim, ndim: int) -> bool:
    dims = dim if isinstance(dim, (list, tuple)) else [dim]
    return len(dims) == 1 and isinstance(dims[0], int) and dims[0] in (-1, ndim - 1)


@dataclass
class RMSNormMatch:
    output: fx.Node  # the node whose value is the normalised (and scaled) h
    weight: Optional[fx.Node]  # [D] gain, or None
    eps: float
    chain: list[fx.Node]  # nodes to erase once output is replaced (the norm's intermediates)


def _eps_value(eps) -> Optional[float]:
    """The norm's epsilon: a constant, or (``dynamic=True``: Dynamo makes float attributes inputs) a
    symbolic float, specialised here — ``float()`` installs a guard, so another value recompiles."""
    if isinstance(eps, (int, float)):
        return eps
    v = value(eps) if isinstance(eps, fx.Node) else None
    return float(v) if isinstance(v, torch.SymFloat) else None


def match_rms_norm(h: fx.Node) -> Optional[RMSNormMatch]:
    hv = value(h)
    if not isinstance(hv, torch.Tensor):
        return None
    D = hv.shape[-1]
    user = _only_user(h)
    if user is None:
        return None
    if user.op == "call_function" and user.target in _RMS_NORM_FUNCTIONS:
        args = dict(zip(("input", "normalized_shape", "weight", "eps"), user.args)) | dict(user.kwargs)
        if args["input"] is not h or tuple(args["normalized_shape"]) != (D,):
            return None
        eps = args.get("eps")
        match = RMSNormMatch(user, args.get("weight"), torch.finfo(hv.dtype).eps if eps is None else eps, [])
        return _absorb_weight(match, h, D) if match.weight is None else match

    x = user if _is_cast(user) else h  # optional upcast to fp32
    chain = [x] if x is not h else []
    if len(x.users) != 2:
        return None
    square = ymul = None
    for u in x.users:
        if (_kind(u) == "pow" and u.args[0] is x and u.args[1] == 2) or (_kind(u) == "mul" and u.args[:2] == (x, x)):
            square = u
        elif _kind(u) == "mul":
            ymul = u
    if square is None or ymul is None:
        return None
    mean = _only_user(square)
    if mean is None or _kind(mean) != "mean" or mean.args[0] is not square:
        return None
    dim = mean.args[1] if len(mean.args) > 1 else mean.kwargs.get("dim")
    keepdim = mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)
    if not (keepdim and _is_last_dim(dim, hv.dim())):
        return None
    add = _only_user(mean)
    if add is None or _kind(add) != "add" or len(add.args) != 2 or add.kwargs:
        return None
    eps = _eps_value(_other(add, mean))
    if eps is None:
        return None
    rsqrt = _only_user(add)
    if rsqrt is None or _kind(rsqrt) != "rsqrt" or _only_user(rsqrt) is not ymul or _other(ymul, rsqrt) is not x:
        return None
    chain += [square, mean, add, rsqrt, ymul]
    out = ymul
    down = _only_user(out)
    if down is not None and _is_cast(down):  # optional cast back to the input dtype
        chain.append(down)
        out = down
    return _absorb_weight(RMSNormMatch(out, None, float(eps), chain), h, D)


def _absorb_weight(match: RMSNormMatch, h: fx.Node, D: int) -> RMSNormMatch:
    """Take a following ``* w`` into the match when w is a [D] tensor available before the aggregation."""
    mul = _only_user(match.output)
    if mul is None or _kind(mul) != "mul" or len(mul.args) != 2 or mul.kwargs:
        return match
    w = _other(mul, match.output)
    wv = value(w)
    if not isinstance(w, fx.Node) or not isinstance(wv, torch.Tensor) or tuple(wv.shape) != (D,):
        return match
    if w.op not in ("placeholder", "get_attr"):  # a computed gain: would have to move; leave it
        return match
    return RMSNormMatch(mul, w, match.eps, match.chain + [match.output])


_PHASE2_ARGS = ("phase1_out", "phase1_lse", "partial", "query", "norm_weight", "eps", "scale")


@dataclass
class _Site:
    """One fusable node: ``kind`` "fused" (attn_res) or "fused_phase2" (attn_res_phase2), and the
    fused op's target and arguments without the norm's (weight, eps)."""

    node: fx.Node
    kind: str
    target: str
    args: tuple


def _sites(graph: fx.Graph) -> list[_Site]:
    aggs = {a.node: a for a in find_aggregations(graph)}
    sites = []
    for node in graph.nodes:
        if node in aggs:
            a = aggs[node]
            sites.append(_Site(node, "fused", NORMED, (a.sources, a.query, a.norm_weight, a.eps, a.scale)))
        elif library_op(node) == PHASE2:
            named = dict(zip(_PHASE2_ARGS, node.args)) | dict(node.kwargs)
            named.setdefault("partial", None)
            named.setdefault("norm_weight", None)
            sites.append(_Site(node, "fused_phase2", PHASE2_NORMED, tuple(named[k] for k in _PHASE2_ARGS)))
    return sites


class FuseRMSNorm(CountingPass):
    """Replaces ``attn_res`` / ``attn_res_phase2`` + RMSNorm by ``attn_res_normed`` /
    ``attn_res_phase2_normed``; counts fused and left-alone sites."""

    name = "fuse_norm"

    def rewrite(self, gm: fx.GraphModule) -> bool:
        graph = gm.graph
        modified = False
        for site in _sites(graph):
            m = match_rms_norm(site.node)
            if m is None:
                self.stats["not_followed_by_rms_norm"] += 1
                continue
            hv, ov = value(site.node), value(m.output)
            if isinstance(ov, torch.Tensor) and ov.dtype != hv.dtype:
                log.info("fuse_norm: %s left as is: the norm returns %s, the fused op %s", site.node.name, ov.dtype, hv.dtype)
                self.stats["dtype_mismatch"] += 1
                continue
            self._fuse(graph, site, m)
            modified = True
            self.stats[site.kind] += 1
        return modified

    def _fuse(self, graph: fx.Graph, site: _Site, m: RMSNormMatch) -> None:
        h = site.node
        with graph.inserting_before(h):
            fused = graph.call_function(op(site.target), (*site.args, m.weight, float(m.eps)))
            mix = graph.call_function(operator.getitem, (fused, 0))  # [..., D]
        with graph.inserting_after(m.output):
            normed = graph.call_function(operator.getitem, (fused, 1))  # [..., D]
        for n in (fused, mix, normed):
            copy_location(n, h)
        infer_meta([fused, mix, normed])
        m.output.replace_all_uses_with(normed)
        to_erase = [m.output] + m.chain[::-1]
        erase_unused(dict.fromkeys(to_erase))  # the norm's nodes, readers first
        h.replace_all_uses_with(mix)  # readers of h outside the norm (none in converted models)
        erase_unused([h])
        if not mix.users:  # the usual case: tell the op not to write the mix at all
            graph.erase_node(mix)
            fused.kwargs = {"return_mix": False}
            for key in (META, "val"):  # its first output is now empty: record the new value
                fused.meta.pop(key, None)
            infer_meta([fused])
            self.stats["mix_not_written"] += 1
