"""Conversion options."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from residual_rewriter.kernels import DEFAULT_EPS


@dataclass(frozen=True)
class AttnResConfig:
    """How ``convert`` builds Block AttnRes.

    num_blocks: the paper's N — detected sublayers are split into (at most) N blocks.
    block_size: the paper's S — sublayers per block (overrides num_blocks); 1 is Full AttnRes.
    mixing: "sum" multiplies each softmax mixture by its number of sources, so zero-initialised
        queries reproduce the original residual sum exactly (the default: convert, then fine-tune
        without a jump); "mean" is the paper's plain average at init.
    key_norm_eps: eps of the RMSNorm applied to the keys (the sources) before scoring.
    """

    num_blocks: Optional[int] = 8
    block_size: Optional[int] = None
    mixing: str = "sum"
    key_norm_eps: float = DEFAULT_EPS

    def __post_init__(self):
        if self.block_size is not None and self.block_size < 1:
            raise ValueError(f"block_size must be >= 1 (1 is Full AttnRes), got {self.block_size}")
        if self.block_size is None and (self.num_blocks is None or self.num_blocks < 1):
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if self.mixing not in ("sum", "mean"):
            raise ValueError(f"mixing must be 'sum' (exact at init) or 'mean' (the paper's average), got {self.mixing!r}")
        if not self.key_norm_eps > 0:
            raise ValueError(f"key_norm_eps must be > 0, got {self.key_norm_eps}")
