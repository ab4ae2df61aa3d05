"""The conversion report: the Plan, printed for people and as a dict for tools."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from residual_rewriter.config import AttnResConfig
from residual_rewriter.passes.plan import LeftOut, Plan, Site, Stream


def module_label(path: str) -> str:
    """A module path for messages; "" is the converted model itself."""
    return path or "(the model itself)"


@dataclass
class ConversionReport:
    model: str  # class name of the converted model
    config: AttnResConfig
    plan: Plan
    converted: bool = False  # False for detect(), True once convert() rewrote the graph
    new_parameters: dict[str, int] = field(default_factory=dict)  # name -> numel
    checkpoint_dropped: list[str] = field(default_factory=list)  # modules whose own checkpoint calls tracing lost
    hooks_not_called: list[str] = field(default_factory=list)  # inlined modules, or layers' backward hooks, no longer run
    # "in place, layer by layer", or "in place, the model as one holder" with why not layer by layer
    mode: str = "in place, layer by layer"
    mode_reason: str = ""
    holders: list[str] = field(default_factory=list)  # modules whose forward is rewritten ("" = the model)

    @property
    def sites(self) -> list[Site]:
        return self.plan.sites

    @property
    def streams(self) -> list[Stream]:
        return self.plan.streams

    @property
    def left_out(self) -> list[LeftOut]:
        return self.plan.left_out

    def totals(self) -> dict[str, Any]:
        """Counts over all streams: sites, blocks, aggregations, new parameter values, sources.

        ``new_parameters`` is the number of values convert adds (after convert: counted on the module;
        for a detect report: what convert would add, one query and one gain of the hidden size per
        aggregation). ``sources_per_block`` has one entry per block: its sublayer count and the fewest /
        most sources its sublayers read (the first reads b_0 .. b_{n-1}, later ones also the partial
        block sum).
        """
        # a sublayer reading only b_0 needs no aggregation (softmax over one source is the identity);
        # every other sublayer has one, and so does the stream's final norm
        per_stream = {st.index: sum(s.num_sources > 1 for s in st.sites) + 1 for st in self.streams}
        aggregations = sum(per_stream.values())
        if self.new_parameters:
            new_values = sum(self.new_parameters.values())
        else:
            new_values = sum(per_stream[st.index] * 2 * st.hidden_size for st in self.streams)
        return {
            "streams": len(self.streams),
            "sites": len(self.sites),
            "blocks": sum(st.num_blocks for st in self.streams),
            "aggregations": aggregations,
            "new_parameters": new_values,
            "max_sources": max([st.num_blocks + 1 for st in self.streams] or [0]),
            "sources_per_block": [
                {"stream": st.index, "block": n, "sublayers": len(counts), "min_sources": min(counts), "max_sources": max(counts)}
                for st in self.streams
                for n, counts in _sources_by_block(st).items()
            ],
            "left_out": len(self.left_out),
        }

    def to_dict(self) -> dict[str, Any]:
        """The report as plain data (JSON): its fields, the plan's (streams with their sites, left-out
        adds, opaque modules) in place of ``plan``, and ``totals``."""
        fields = asdict(self)
        plan = fields.pop("plan")
        return {**fields, **plan, "totals": self.totals()}

    def __str__(self) -> str:
        lines = []
        verb = "converted" if self.converted else "detected (not converted)"
        n_sites = len(self.sites)
        lines.append(
            f"AttnRes {verb}: {self.model} — {_count(n_sites, 'residual sublayer')} in {_count(len(self.streams), 'stream')}, "
            f"mixing={self.config.mixing}" + (" (exact at init)" if self.config.mixing == "sum" else " (paper's average)")
        )
        if self.holders:
            reason, *tried = self.mode_reason.splitlines() or [""]  # the first line, then the modules tried and why
            lines += [f"mode: {self.mode}" + (f" (not layer by layer: {reason})" if reason else "")] + [f"  {t.strip()}" for t in tried]
            lines.append(f"holders ({len(self.holders)}, forward {'rewritten' if self.converted else 'to rewrite'}): "
                         f"{_holder_summary(self.holders)}")
        for st in self.streams:
            kind = "Full AttnRes" if st.block_size == 1 else "Block AttnRes"
            lines.append(
                f"\nstream {st.index}: source {st.source} (b_0) -> {', '.join(st.consumers) or 'output'}; "
                f"{st.num_blocks} blocks of {st.block_size} ({kind}), hidden {st.hidden_size}"
            )
            norms = [f"(no norm) {s.norm}" if s.unnormalized else s.norm for s in st.sites]  # what reads the mixture
            w_norm = max([4] + [len(n) for n in norms])
            w_sub = max([8] + [len(s.sublayer) for s in st.sites])
            lines.append(f"  {'site':>5} {'block':>5} {'sources':>7}  {'norm':<{w_norm}}  {'sublayer':<{w_sub}}")
            for s, norm in zip(st.sites, norms):
                lines.append(f"  {s.index:>5} {s.block:>5} {s.num_sources:>7}  {norm:<{w_norm}}  {s.sublayer:<{w_sub}}")
            lines.append(f"  {'final':>5} {'-':>5} {st.num_blocks + 1:>7}  -> {', '.join(st.consumers)}")
        if self.new_parameters:
            total = sum(self.new_parameters.values())
            lines.append(f"\nnew parameters: {len(self.new_parameters)} tensors, {total:,} values (queries + key-norm gains)")
        t = self.totals()
        lines.append(
            f"totals: {t['sites']} sites in {t['blocks']} blocks ({_count(t['streams'], 'stream')}), {t['aggregations']} "
            f"aggregations reading up to {t['max_sources']} sources, "
            f"{t['new_parameters']:,} new parameter values" + ("" if self.converted else " (once converted)")
        )
        for st in self.streams:  # block n: its sublayer count and the sources they read (fewest-most)
            per_block = [
                f"block {n}: {_count(len(c), 'sublayer')}, "
                + (f"{min(c)}-{max(c)} sources" if max(c) != min(c) else _count(min(c), "source"))
                for n, c in _sources_by_block(st).items()
            ]
            lines.append(f"  stream {st.index}: " + "; ".join(per_block))
        if self.checkpoint_dropped:
            lines.append("activation checkpointing NOT kept (torch.utils.checkpoint called in the forward of): "
                         + ", ".join(map(module_label, self.checkpoint_dropped)))
        if self.hooks_not_called:
            lines.append("module hooks NOT called by the converted model (forward inlined, or backward hooks around a state): "
                         + ", ".join(map(module_label, self.hooks_not_called)))
        lines.append("left out: " + ("none" if not self.left_out else ""))
        for lo in self.left_out:
            lines.append(f"  {lo.module or lo.node}: {lo.reason}")
        if self.plan.opaque_modules:
            lines.append("kept opaque (not traced into): ")
            for path, why in self.plan.opaque_modules.items():
                lines.append(f"  {path}: {why}")
        return "\n".join(lines)


def _sources_by_block(stream: Stream) -> dict[int, list[int]]:
    """Block number -> the source counts of its sublayers, in block order."""
    by_block: dict[int, list[int]] = {}
    for site in stream.sites:
        by_block.setdefault(site.block, []).append(site.num_sources)
    return by_block


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + "s" * (n != 1)


def _holder_summary(paths: list[str]) -> str:
    shown = [module_label(p) for p in paths]
    return ", ".join(shown if len(shown) <= 4 else shown[:2] + ["...", shown[-1]])
