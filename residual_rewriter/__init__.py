"""residual_rewriter: give any PyTorch model Block Attention Residuals without touching its source.

    residual_rewriter.convert_(model)                      # in place, layer by layer; exact at init
    print(model.attn_res_report)                           # what was rewritten, and how
    converted = residual_rewriter.convert(model)          # or: a converted copy (the same class)
    report = residual_rewriter.detect(model)               # look before converting
    fast = torch.compile(model, backend="attnres")         # Triton / inductor fast path
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
from .report import ConversionReport

__version__ = "0.1.0"

__all__ = ["convert", "convert_", "attn_res_parameters", "AttnResState", "detect", "from_pretrained", "AttnResConfig", "ConversionError", "ConversionReport"]
