"""Conversion options."""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Optional

from residual_rewriter.kernels.attn_res import DEFAULT_EPS


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
        if self.block_size is None and self.num_blocks is None:
            raise ValueError("num_blocks (the paper's N) or block_size (the paper's S) must be given")
        self._check_count("num_blocks", "the paper's N, the number of blocks")
        self._check_count("block_size", "the paper's S, sublayers per block; 1 is Full AttnRes")
        if self.mixing not in ("sum", "mean"):
            raise ValueError(f"mixing must be 'sum' (exact at init) or 'mean' (the paper's average), got {self.mixing!r}")
        if isinstance(self.key_norm_eps, bool) or not isinstance(self.key_norm_eps, numbers.Real):
            raise TypeError(f"key_norm_eps must be a number, got {self.key_norm_eps!r} ({type(self.key_norm_eps).__name__})")
        if not self.key_norm_eps > 0:
            raise ValueError(f"key_norm_eps must be > 0, got {self.key_norm_eps}")

    def _check_count(self, name: str, meaning: str) -> None:
        value = getattr(self, name)
        if value is None:
            return
        # bool is an int subclass: num_blocks=True is a mistake, not 1 block
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be a whole number ({meaning}), got {value!r} ({type(value).__name__})")
        if value < 1:
            raise ValueError(f"{name} must be >= 1 ({meaning}), got {value}")
        object.__setattr__(self, name, int(value))  # a numpy integer becomes a plain int (JSON in HF configs)
