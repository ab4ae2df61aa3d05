"""An independent Block AttnRes oracle for converted models, with non-zero queries.

Why: with zero queries every aggregation is the plain sum of its sources, so exact-at-init tests
cannot see a wrong source set, a wrong block partition or a query bound to the wrong site. This
module recomputes, from the paper's definition and nothing else, what each sublayer's norm and each
stream's final norm must read, given the branch outputs the converted model actually produced.

Nothing here imports ``residual_rewriter.kernels`` or ``residual_rewriter.passes``. From the
converted model it reads only: its parameters (``<module>.attn_res.<key>.query``), its report (which
sites exist, in which order, which module paths and graph nodes they are, which parameter prefix the
report says each uses) and the graphs its rewritten modules run (``module.forward.graph_module``,
run under an ``fx.Interpreter`` to record values; ``module.forward.original_graph``). The block
partition, the source sets, the aggregation and the rule saying which prefix belongs to which site
are all the oracle's own.

The definition (``/work/shared/notes/attnres-math.md``), for one stream with L sublayers in depth
order and b_0 = the stream's source (the embedding output):
  * blocks: S = ceil(L / N) consecutive sublayers per block for ``num_blocks=N`` (the last block
    takes the remainder), or S = ``block_size``;
  * b_n = sum of the branch outputs v of block n;
  * sublayer i of block n reads ``AttnRes([b_0 .. b_{n-1}] + [partial])``, the partial being the sum
    of the v's of the earlier sublayers of its own block (only when there are any);
  * a single source is read as it is (the very first sublayer reads b_0);
  * the stream's end (its final norm) reads ``AttnRes([b_0 .. b_N])`` with its own query;
  * ``AttnRes(s; q, g) = scale * sum_j softmax_j(q . (rmsnorm(s_j) * g)) s_j``, softmax over the
    sources per token, rmsnorm over the last dim with the config's ``key_norm_eps``, no temperature;
    ``scale`` = number of sources for ``mixing="sum"``, 1 for ``"mean"``.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.fx as fx


# --------------------------------------------------------------------------------------------
# The definition
# --------------------------------------------------------------------------------------------
def block_of_each_sublayer(num_sublayers: int, num_blocks: int | None, block_size: int | None) -> list[int]:
    """1-based block number of each sublayer: S = ceil(L / N), or S = block_size; last block short."""
    if block_size is None:
        block_size = -(-num_sublayers // num_blocks)  # ceil without floats
    blocks, n = [], 1
    for i in range(num_sublayers):
        if i > 0 and i % block_size == 0:
            n += 1
        blocks.append(n)
    return blocks


def attn_res(sources: list[torch.Tensor], query: torch.Tensor, gain: torch.Tensor, eps: float, mixing: str) -> torch.Tensor:
    """One aggregation, written as a loop over the sources with an explicit softmax (max-shifted)."""
    logits = []
    for s in sources:  # [..., D]
        key = s / torch.sqrt((s * s).mean(dim=-1, keepdim=True) + eps) * gain
        logits.append((key * query).sum(dim=-1))  # [...]
    top = logits[0]
    for z in logits[1:]:
        top = torch.maximum(top, z)
    weights = [torch.exp(z - top) for z in logits]
    total = sum(weights)
    mix = sum((w / total).unsqueeze(-1) * s for w, s in zip(weights, sources))
    scale = float(len(sources)) if mixing == "sum" else 1.0
    return scale * mix


@dataclass
class StreamExpectation:
    blocks: list[int]  # block of each sublayer (the oracle's partition)
    num_sources: list[int]  # sources each sublayer reads
    site_inputs: list[torch.Tensor]  # what each sublayer's norm must read, [..., D]
    final_input: torch.Tensor  # what the final norm must read
    uniform: list[torch.Tensor]  # what a zero query would give, per aggregation (sites, then final)


def expected_stream(b0, branch_outputs, site_params, final_params, *, num_blocks, block_size, eps, mixing,
                    scales=None, gains=None) -> StreamExpectation:
    """The oracle for one stream, evaluated over recorded branch outputs (teacher forcing: each
    sublayer's expected input depends only on b_0 and the v's recorded before it).

    ``site_params[l]``: (query, gain) of sublayer l's aggregation, or None where the caller has none.
    ``scales[l]``: None, or s where the model multiplies its stream by s after sublayer l (Gemma 4's
    ``layer_scalar``): the stream is the sum of its sources, so every source so far is multiplied by s.
    ``gains[l]``: None, or w where sublayer l's residual add reads ``w * x + v`` (Doge): every source so far is
    multiplied by w before v joins them (after sublayer l's own aggregation read x).
    """
    blocks = block_of_each_sublayer(len(branch_outputs), num_blocks, block_size)
    completed = [b0]  # b_0, b_1, ...
    partial = None
    inputs, counts, uniform = [], [], []
    for l, (v, block) in enumerate(zip(branch_outputs, blocks)):
        if l > 0 and block != blocks[l - 1]:  # the previous block is complete
            completed.append(partial)
            partial = None
        sources = completed + ([partial] if partial is not None else [])
        counts.append(len(sources))
        if len(sources) == 1:
            inputs.append(sources[0])
        else:
            assert site_params[l] is not None, f"sublayer {l} reads {len(sources)} sources but has no query"
            inputs.append(attn_res(sources, *site_params[l], eps, mixing))
            uniform.append(_uniform(sources, mixing))
        if gains is not None and gains[l] is not None:
            completed, partial = [c * gains[l] for c in completed], None if partial is None else partial * gains[l]
        partial = v if partial is None else partial + v
        if scales is not None and scales[l] is not None:
            completed, partial = [c * scales[l] for c in completed], partial * scales[l]
    completed.append(partial)
    final = attn_res(completed, *final_params, eps, mixing)
    uniform.append(_uniform(completed, mixing))
    return StreamExpectation(blocks, counts, inputs, final, uniform)


def _uniform(sources, mixing):
    total = sum(sources)
    return total if mixing == "sum" else total / len(sources)


# --------------------------------------------------------------------------------------------
# The oracle's own rule binding a parameter key to a site: by the module paths it names
# --------------------------------------------------------------------------------------------
def _words(name: str) -> str:
    """A module path or a ModuleDict key as one comparable spelling (``a.b:c`` ~ ``a__b__c``)."""
    return re.sub(r"[^0-9A-Za-z]+", "_", name).strip("_")


def _names(name: str, path: str) -> bool:
    return name == path or name.startswith(path + "_")


def site_paths(site) -> list[str]:
    """The module paths a site is known by: its sublayer and its norm(s) (``a + b`` for a parallel
    block read through two norms)."""
    return [site.sublayer] + [p.strip() for p in site.norm.split(" + ")]


def owner_by_name(report, prefix: str):
    """Which aggregation the parameter prefix ``prefix`` (``<module>.attn_res.<key>``) names, by
    module path alone: (stream index, site index) for a site, (stream index, "final") for a stream's
    end, or None when no single aggregation is named. The module path named is ``<module>.<key>``
    (``__`` read as ``.``);
    the most specific path wins: ``layers.1.self_attn`` names the attention site even though it also
    starts with the whole layer ``layers.1``. A key ``final`` names the end of the stream whose last
    sublayer sits in ``<module>``; ``final__<path>`` the end read by the module at ``<path>``."""
    holder, _, key = prefix.rpartition("attn_res.")
    holder = holder.rstrip(".")
    candidates: dict = {}
    if key == "final" or key.startswith("final__"):
        for st in report.streams:
            ends_here = key == "final" and st.sites and site_paths(st.sites[-1])[1].startswith(holder + ".")
            read_by = key != "final" and any(_words(key) == "final_" + _words(c) for c in st.consumers or ["output"])
            if ends_here or read_by:
                candidates.setdefault(0, set()).add((st.index, "final"))
    else:
        k = _words(".".join(p for p in (holder, key) if p))
        for st in report.streams:
            for site in st.sites:
                for path in site_paths(site):
                    p = _words(path)
                    if p and _names(k, p):
                        candidates.setdefault(len(p), set()).add((st.index, site.index))
    if not candidates:
        return None
    best = candidates[max(candidates)]
    return next(iter(best)) if len(best) == 1 else None


# --------------------------------------------------------------------------------------------
# Recording what the converted model computed
# --------------------------------------------------------------------------------------------
@dataclass
class Recording:
    """Values recorded from one forward of the converted model, by stream / site index.

    ``fed[(stream, site)]`` and ``final_fed[stream]`` hold every witness of what the norm read:
    {"hook <path>": norm module's input (forward pre-hook), "graph <node>": the argument of the
    norm's entry node at the place where the original graph had the stream value}.
    """

    b0: dict = field(default_factory=dict)  # stream -> [..., D]
    branch: dict = field(default_factory=dict)  # (stream, site) -> v, [..., D]
    branch_hooked: dict = field(default_factory=dict)  # (stream, site) -> sum of hooked module outputs
    scale: dict = field(default_factory=dict)  # (stream, site) -> s where the stream is multiplied by s after it
    gain: dict = field(default_factory=dict)  # (stream, site) -> w where its add reads w * x
    fed: dict = field(default_factory=dict)
    final_fed: dict = field(default_factory=dict)
    order: dict = field(default_factory=dict)  # node name -> execution index


def _tokens(t: torch.Tensor) -> torch.Tensor:
    """[tokens, D]: a stream value as its tokens in order, whichever grouping of the leading dimensions
    the model gives it where it is read (Swin views (B, H, W, C) as (B, H*W, C) between its sublayers)."""
    return t.reshape(-1, t.shape[-1])


def _first_tensor(out):
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out


def _arg_slots(node: fx.Node, value: fx.Node) -> list:
    """Where ``node`` reads ``value`` directly: positional indices and keyword names."""
    return [i for i, a in enumerate(node.args) if a is value] + [k for k, a in node.kwargs.items() if a is value]


def _read_slot(node: fx.Node, slot):
    return node.args[slot] if isinstance(slot, int) else node.kwargs[slot]


def _rewritten_modules(converted) -> dict:
    """path -> the forward installed on each rewritten module (an object with ``graph_module``)."""
    return {path: m.__dict__["forward"] for path, m in converted.named_modules()
            if hasattr(m.__dict__.get("forward"), "graph_module")}


def _holder_of(site, holders) -> str:
    """The rewritten module a site's norm sits in (the longest matching path)."""
    norm = site_paths(site)[1]
    inside = [h for h in holders if h == "" or norm.startswith(h + ".")]
    return max(inside, key=len)


def record(converted, inputs: dict, branch_modules=None) -> Recording:
    """Run ``converted(**inputs)`` with every rewritten module's graph under an ``fx.Interpreter``
    and hooks on the norms and sublayers it calls.

    ``branch_modules(site)``: module paths whose (first) outputs sum to the site's branch output, for
    a hook witness of v; by default the site's sublayer when it is a module called once.
    """
    report = converted.attn_res_report
    forwards = _rewritten_modules(converted)
    assert forwards and sorted(forwards) == sorted(report.holders), (sorted(forwards), report.holders)
    calls = Counter(".".join(p for p in (path, n.target) if p)
                    for path, f in forwards.items() for n in f.graph_module.graph.nodes if n.op == "call_module")
    rec = Recording()
    hooked_in, hooked_out, handles = {}, {}, []

    def hookable(path: str) -> bool:
        return calls[path] == 1  # a module its holder's graph calls once

    def pre_hook(path):
        def hook(module, args, kwargs=None):
            hooked_in[path] = (args[0] if args else next(iter(kwargs.values()))).detach().clone()
        return hook

    def post_hook(path):
        def hook(module, args, out):
            hooked_out[path] = _first_tensor(out).detach().clone()
        return hook

    wanted_in, wanted_out = set(), set()
    for st in report.streams:
        for site in st.sites:
            wanted_in.update(p for p in site_paths(site)[1:] if hookable(p))
            mods = branch_modules(site) if branch_modules else ([site.sublayer] if hookable(site.sublayer) else [])
            for p in mods:
                assert hookable(p), f"{p} is not a module called once by a rewritten graph"
            wanted_out.update(mods)
        wanted_in.update(c for c in st.consumers if c in dict(converted.named_modules()))
    for p in wanted_in:
        handles.append(converted.get_submodule(p).register_forward_pre_hook(pre_hook(p), with_kwargs=True))
    for p in wanted_out:
        handles.append(converted.get_submodule(p).register_forward_hook(post_hook(p)))

    envs, order, outputs, saved = {}, {}, {}, {}

    def interpreting(path, gm):
        def run(module, *args):
            class Run(fx.Interpreter):
                def run_node(self, n):
                    order[(path, n.name)] = len(order)
                    return super().run_node(n)

            interp = Run(gm, garbage_collect_values=False)
            out = interp.run(*args)
            assert path not in envs, f"{path} ran twice in one forward"
            envs[path] = {n.name: v for n, v in interp.env.items()}
            outputs[path] = out
            return out
        return run

    for path, f in forwards.items():  # the graph of the call being made: the first one traced
        key = next(k for k, g in f.graphs.items() if g.graph_module is f.graph_module)
        saved[path] = (key, f.graphs[key])
        f.graphs[key] = f.graphs[key]._replace(code=interpreting(path, f.graph_module))
    try:
        with torch.no_grad():
            converted(**inputs)
    finally:
        for h in handles:
            h.remove()
        for path, (key, entry) in saved.items():
            forwards[path].graphs[key] = entry

    def graph_witnesses(path: str, entry_nodes: list[str], stream_value: str) -> dict:
        """What each entry node reads, now, where it read ``stream_value`` before the rewrite."""
        original = {n.name: n for n in forwards[path].original_graph.nodes}
        now = {n.name: n for n in forwards[path].graph_module.graph.nodes}
        out = {}
        for name in entry_nodes:
            slots = _arg_slots(original[name], original[stream_value])
            assert slots, f"{name} did not read {stream_value} in the original graph"
            for slot in slots:
                out[f"graph {path}:{name}[{slot}]"] = envs[path][_read_slot(now[name], slot).name]
        return out

    def factor(path: str, mul_name: str, stream_value: str, shape) -> torch.Tensor:
        """s of the original graph's ``x * s`` (or ``x.to(dtype) * s``), as this run computed it, as [tokens, D]."""
        mul = next(n for n in forwards[path].original_graph.nodes if n.name == mul_name)
        reads_x = [a for a in mul.args if isinstance(a, fx.Node) and stream_value in (a.name, *(i.name for i in a.all_input_nodes))]
        (s,) = [a for a in mul.args if a not in reads_x]
        return _tokens(torch.broadcast_to(torch.as_tensor(envs[path][s.name] if isinstance(s, fx.Node) else s), shape))

    for st in report.streams:
        first = _holder_of(st.sites[0], forwards)
        last = _holder_of(st.sites[-1], forwards)
        rec.b0[st.index] = _tokens(envs[first][st.source_node or st.sites[0].skip_node])
        for site in st.sites:
            key = (st.index, site.index)
            holder = _holder_of(site, forwards)
            rec.branch[key] = _tokens(envs[holder][site.branch_node])
            rec.order[key] = order[(holder, site.branch_node)]
            shape = envs[holder][site.branch_node].shape
            if getattr(site, "end_scale", ""):  # the original graph's `end * s`
                rec.scale[key] = factor(holder, site.end_scale, site.add_node, shape)
            if getattr(site, "skip_gain", ""):  # the original graph's `x * w`
                rec.gain[key] = factor(holder, site.skip_gain, site.skip_node, shape)
            mods = branch_modules(site) if branch_modules else ([site.sublayer] if hookable(site.sublayer) else [])
            if mods:
                rec.branch_hooked[key] = _tokens(sum(hooked_out[p] for p in mods))
            fed = graph_witnesses(holder, site.norm_entry_nodes, site.skip_node)
            fed.update({f"hook {p}": hooked_in[p] for p in site_paths(site)[1:] if p in hooked_in})
            rec.fed[key] = {witness: _tokens(t) for witness, t in fed.items()}
        if st.consumer_nodes:  # the final norm is in the holder's graph (the model itself as holder)
            final = graph_witnesses(last, st.consumer_nodes, st.sites[-1].add_node)
        else:  # the last rewritten layer returns the final aggregation: what the model hands its norm
            final = {f"output of {last}": _first_tensor(outputs[last])}
        final.update({f"hook {c}": hooked_in[c] for c in st.consumers if c in hooked_in})
        rec.final_fed[st.index] = {witness: _tokens(t) for witness, t in final.items()}
    return rec


# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------
def attn_res_prefixes(converted) -> list[str]:
    """Every ``<module>.attn_res.<key>`` holding a query, sorted."""
    return sorted(n[: -len(".query")] for n, _ in converted.named_parameters()
                  if n.endswith(".query") and (n.startswith("attn_res.") or ".attn_res." in n))


def randomize(converted, seed: int) -> None:
    """Non-zero queries and non-unit gains, drawn so that the logits spread over a few units
    (q ~ N(0, 1) * 2 / sqrt(D): softmax far from uniform but every source weighs in)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for prefix in attn_res_prefixes(converted):
            query, gain = converted.get_parameter(prefix + ".query"), converted.get_parameter(prefix + ".key_norm_weight")
            d = query.numel()
            query.copy_(torch.randn(d, generator=gen, dtype=torch.float64) * 2 / math.sqrt(d))
            gain.copy_(1 + 0.5 * torch.rand(d, generator=gen, dtype=torch.float64))


def params_at(converted, prefix: str):
    """(query, gain) stored under a report prefix ``<module>.attn_res.<key>``."""
    assert prefix.startswith("attn_res.") or ".attn_res." in prefix, prefix
    return converted.get_parameter(prefix + ".query").detach(), converted.get_parameter(prefix + ".key_norm_weight").detach()


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Max abs difference over max abs of the expected value, both flattened to [-1, D] (a norm of
    OPT's MLP reads the stream flattened to [tokens, D])."""
    d = want.shape[-1]
    got, want = got.reshape(-1, d), want.reshape(-1, d)
    assert got.shape == want.shape, (tuple(got.shape), tuple(want.shape))
    return ((got - want).abs().max() / want.abs().max()).item()
