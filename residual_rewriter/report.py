"""The conversion report: the Plan, with what the conversion did; printed for people (``report_text``) and as a
dict for tools."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from residual_rewriter import report_text
from residual_rewriter.config import AttnResConfig
from residual_rewriter.passes.plan import LeftOut, Plan, Site, Stream

IN_PLACE, WHOLE_MODEL = "in place, layer by layer", "in place, the model as one holder"


@dataclass
class ConversionReport:
    model: str  # class name of the converted model
    config: AttnResConfig
    plan: Plan
    converted: bool = False  # False for detect(), True once convert() rewrote the graph
    new_parameters: dict[str, int] = field(default_factory=dict)  # name -> numel
    checkpoint_dropped: list[str] = field(default_factory=list)  # modules whose own checkpoint calls tracing lost
    hooks_not_called: list[str] = field(default_factory=list)  # inlined modules, or layers' backward hooks, no longer run
    mode: str = IN_PLACE  # or WHOLE_MODEL, with why not layer by layer in mode_reason
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
        return report_text.totals(self)

    def to_dict(self) -> dict[str, Any]:
        """The report as plain data (JSON): its fields, the plan's (streams with their sites, left-out
        adds, opaque modules) in place of ``plan``, and ``totals``."""
        fields = asdict(self)
        plan = fields.pop("plan")
        return {**fields, **plan, "totals": self.totals()}

    def __str__(self) -> str:
        return report_text.render(self)
