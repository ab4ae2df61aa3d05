"""residual_rewriter: give any PyTorch model Block Attention Residuals without touching its source."""
from . import kernels  # noqa: F401  registers torch.ops.residual_rewriter.*

__version__ = "0.1.0"
