"""The module ``convert`` returns: an FX GraphModule that owns the model's submodules and the new
AttnRes parameters (``attn_res.<site>.query`` / ``.key_norm_weight``), and carries its report."""
from __future__ import annotations

import torch
import torch.fx as fx

from residual_rewriter.passes.modes import mode_value

REPORT = "residual_rewriter_report"
ORIGINAL_GRAPH = "residual_rewriter_original_graph"


class ConvertedModule(fx.GraphModule):
    """A model with Block AttnRes. Train it like the original; ``.report`` says what was rewritten."""

    @property
    def report(self):
        return self.meta[REPORT]

    @property
    def original_graph(self) -> fx.Graph | None:
        """The captured graph before the rewrite (same node names), for before/after views.
        None after unpickling (graphs do not pickle)."""
        return self.meta.get(ORIGINAL_GRAPH)

    def input_names(self) -> list[str]:
        """What the converted graph takes, in order: the inputs it was captured with."""
        return [n.target for n in self.graph.nodes if n.op == "placeholder"]

    def __call__(self, *args, **kwargs):
        # A captured graph takes exactly the inputs it was captured with. Calling it like the original
        # model (attention_mask=..., labels=...) otherwise fails with a bare "unexpected keyword".
        if torch.compiler.is_compiling():  # Dynamo traces this call; the graph is not for it to read
            return super().__call__(*args, **kwargs)
        names = self.input_names()
        unknown = [k for k in kwargs if k not in names]
        if not any(n.startswith("*") for n in names) and (unknown or len(args) > len(names)):
            got = unknown or [f"{len(args)} positional arguments"]
            raise TypeError(
                f"this converted model takes ({', '.join(names)}): the inputs it was captured with; got "
                f"{', '.join(got)}. For a Hugging Face model, residual_rewriter.convert(model, keep_class=True) "
                "keeps the model's own forward (attention_mask, labels, generate); otherwise pass "
                "example_inputs with every input you will call it with."
            )
        return super().__call__(*args, **kwargs)

    def attn_res_parameters(self):
        """The new parameters only (queries and key-norm gains), e.g. for their own optimizer group."""
        return list(self.attn_res.parameters())

    def __reduce__(self):
        # torch.save(module): GraphModule pickles its code and re-traces it on load; that re-trace
        # would freeze a graph that follows train()/eval() in the mode it was saved in.
        if any(n.op == "call_function" and n.target is mode_value for n in self.graph.nodes):
            raise TypeError(
                "this converted model's graph follows train()/eval() at run time, which pickling a "
                "GraphModule cannot keep: save `converted.state_dict()` and rebuild with "
                "residual_rewriter.convert(model) + load_state_dict instead"
            )
        rebuild, args = super().__reduce__()
        return _unpickle, (rebuild, args, self.meta.get(REPORT))


def _unpickle(rebuild, args, report) -> ConvertedModule:
    gm = rebuild(*args)
    converted = ConvertedModule(gm, gm.graph, class_name=type(gm).__name__)
    converted.meta[REPORT] = report
    return converted
