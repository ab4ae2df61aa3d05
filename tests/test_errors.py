"""Every failure while converting a user's model is a ConversionError (or a TypeError/ValueError for a
bad argument) that says what was found, where (module path, file:line) and what to do."""
from __future__ import annotations

import pytest
import residual_rewriter as rr
from model_zoo import make_gpt


@pytest.mark.parametrize("option", ["num_blocks", "block_size"])
@pytest.mark.parametrize("value", [2.5, "4", True, 0, -1])
def test_block_options_must_be_positive_integers(option, value):
    with pytest.raises((TypeError, ValueError), match=rf"^{option} must be"):
        rr.convert(make_gpt(), **{option: value})
