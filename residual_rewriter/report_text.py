"""The conversion report as text for people (``str(report)``) and its totals; ``report.ConversionReport`` holds
the data."""
from __future__ import annotations

from typing import Any

from residual_rewriter.passes.errors import module_label
from residual_rewriter.passes.plan import Stream


def totals(report) -> dict[str, Any]:
    """``ConversionReport.totals``."""
    # a sublayer reading only b_0 needs no aggregation (softmax over one source is the identity);
    # every other sublayer has one, and so does the stream's final norm
    per_stream = {st.index: sum(s.num_sources > 1 for s in st.sites) + 1 for st in report.streams}
    aggregations = sum(per_stream.values())
    if report.new_parameters:
        new_values = sum(report.new_parameters.values())
    else:
        new_values = sum(per_stream[st.index] * 2 * st.hidden_size for st in report.streams)
    return {
        "streams": len(report.streams),
        "sites": len(report.sites),
        "blocks": sum(st.num_blocks for st in report.streams),
        "aggregations": aggregations,
        "new_parameters": new_values,
        "max_sources": max([st.num_blocks + 1 for st in report.streams] or [0]),
        "sources_per_block": [
            {"stream": st.index, "block": n, "sublayers": len(counts), "min_sources": min(counts), "max_sources": max(counts)}
            for st in report.streams
            for n, counts in _sources_by_block(st).items()
        ],
        "left_out": len(report.left_out),
    }


def render(report) -> str:
    """``str(report)``: what was rewritten, as a table per stream, and what was not and why."""
    lines = []
    verb = "converted" if report.converted else "detected (not converted)"
    n_sites = len(report.sites)
    lines.append(
        f"AttnRes {verb}: {report.model} — {_count(n_sites, 'residual sublayer')} in {_count(len(report.streams), 'stream')}, "
        f"mixing={report.config.mixing}" + (" (exact at init)" if report.config.mixing == "sum" else " (paper's average)")
    )
    if report.holders:
        reason, *tried = report.mode_reason.splitlines() or [""]  # the first line, then the modules tried and why
        lines += [f"mode: {report.mode}" + (f" (not layer by layer: {reason})" if reason else "")] + [f"  {t.strip()}" for t in tried]
        lines.append(f"holders ({len(report.holders)}, forward {'rewritten' if report.converted else 'to rewrite'}): "
                     f"{_holder_summary(report.holders)}")
    for st in report.streams:
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
    if report.new_parameters:
        total = sum(report.new_parameters.values())
        lines.append(f"\nnew parameters: {len(report.new_parameters)} tensors, {total:,} values (queries + key-norm gains)")
    t = totals(report)
    lines.append(
        f"totals: {t['sites']} sites in {t['blocks']} blocks ({_count(t['streams'], 'stream')}), {t['aggregations']} "
        f"aggregations reading up to {t['max_sources']} sources, "
        f"{t['new_parameters']:,} new parameter values" + ("" if report.converted else " (once converted)")
    )
    for st in report.streams:  # block n: its sublayer count and the sources they read (fewest-most)
        per_block = [
            f"block {n}: {_count(len(c), 'sublayer')}, "
            + (f"{min(c)}-{max(c)} sources" if max(c) != min(c) else _count(min(c), "source"))
            for n, c in _sources_by_block(st).items()
        ]
        lines.append(f"  stream {st.index}: " + "; ".join(per_block))
    if report.checkpoint_dropped:
        lines.append("activation checkpointing NOT kept (torch.utils.checkpoint called in the forward of): "
                     + ", ".join(map(module_label, report.checkpoint_dropped)))
    if report.hooks_not_called:
        lines.append("module hooks NOT called by the converted model (forward inlined, or backward hooks around a state): "
                     + ", ".join(map(module_label, report.hooks_not_called)))
    lines.append("left out: " + ("none" if not report.left_out else ""))
    for lo in report.left_out:
        lines.append(f"  {lo.module or lo.node}: {lo.reason}")
    if report.plan.opaque_modules:
        lines.append("kept opaque (not traced into): ")
        for path, why in report.plan.opaque_modules.items():
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
