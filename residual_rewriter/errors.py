"""Errors raised by residual_rewriter."""


class ConversionError(ValueError):
    """A model (or part of one) cannot be converted exactly. The message names module paths and why."""
