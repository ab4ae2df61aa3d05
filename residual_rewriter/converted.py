"""The module ``convert`` returns: an FX GraphModule that owns the model's submodules and the new
AttnRes parameters (``attn_res.<site>.query`` / ``.key_norm_weight``), and carries its report."""
from __future__ import annotations

import torch.fx as fx


class ConvertedModule(fx.GraphModule):
    """A model with Block AttnRes. Train it like the original; ``.report`` says what was rewritten."""

    @property
    def report(self):
        return self.meta["residual_rewriter_report"]

    @property
    def original_graph(self) -> fx.Graph:
        """The captured graph before the rewrite (same node names), for before/after views."""
        return self.meta["residual_rewriter_original_graph"]

    def attn_res_parameters(self):
        """The new parameters only (queries and key-norm gains), e.g. for their own optimizer group."""
        return list(self.attn_res.parameters())
