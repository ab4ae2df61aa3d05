"""residual_rewriter: give any PyTorch model Block Attention Residuals without touching its source.

    residual_rewriter.convert_(model)                      # in place, layer by layer; exact at init
    print(model.attn_res_report)                           # what was rewritten, and how
    converted = residual_rewriter.convert(model)          # or: a converted copy (the same class)
    report = residual_rewriter.detect(model)               # look before converting
    fast = torch.compile(model, backend="attnres")         # Triton / inductor fast path
    stages = residual_rewriter.build_stages(model, [4], rank=r, num_ranks=2, ...)  # pipeline stages
"""
from ._layout import mount_checkout_subpackages

mount_checkout_subpackages()
from .kernels import attn_res, partial_add  # noqa: E402,F401  registers torch.ops.residual_rewriter.*
from . import backend  # noqa: F401  registers the torch.compile backend "attnres"
from .api import attn_res_parameters, convert, convert_, detect
from .config import AttnResConfig
from .passes.errors import ConversionError
from .passes.state import AttnResState
from .pretrained import from_pretrained
from .pipelining import StateLayout, build_stages, pack_state, split_spec, state_layout, unpack_state
from .report import ConversionReport

__version__ = "0.1.0"

__all__ = ["convert", "convert_", "attn_res_parameters", "AttnResState", "detect", "from_pretrained", "AttnResConfig", "ConversionError", "ConversionReport",
           "build_stages", "pack_state", "unpack_state", "state_layout", "split_spec", "StateLayout"]
