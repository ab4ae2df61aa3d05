"""The residual stream between two rewritten layers: the Block AttnRes state.

A model converted in place keeps its own Python forward. Where it hands ``hidden_states`` from one
layer to the next, the rewritten layers hand this state instead: the completed block sums and the
running partial sum of the current block. The first rewritten layer takes the plain tensor (the
embedding output, b_0); the last returns the final aggregation as a plain tensor, so the final norm
and everything after it run unchanged.

It is a dataclass registered with ``torch.utils._pytree``, so DDP, FSDP2's input casting,
activation checkpointing and ``torch.compile`` see its tensors. It is deliberately not a tuple:
Hugging Face's output recorders take ``output[0]`` of a layer returning a tuple. Code that transforms
the stream between layers (``hidden_states * 2``, ``.to(dtype)``) fails on it loudly rather than
computing something else; ``.to(device)`` moves it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.utils._pytree import register_dataclass, tree_flatten, tree_map_only

from .errors import ConversionError


@dataclass
class AttnResState:
    blocks: tuple[torch.Tensor, ...]  # (b_0, b_1, ..., b_n): embedding output and completed block sums, each [..., D]
    partial: Optional[torch.Tensor]  # running sum of the current block [..., D]; None at a block boundary

    # what a model's own checks between layers read (T5: `if hidden_states.dtype == torch.float16`)
    @property
    def shape(self) -> torch.Size:
        return self.blocks[0].shape

    @property
    def dtype(self) -> torch.dtype:
        return self.blocks[0].dtype

    @property
    def device(self) -> torch.device:
        return self.blocks[0].device

    def to(self, *args, **kwargs) -> AttnResState:
        """The state on another device (accelerate's hooks move a layer's inputs there: ``device_map``). A cast
        to another dtype is refused: cast block by block, the stream would not round as the original's does."""
        moved = [None if t is None else t.to(*args, **kwargs) for t in (*self.blocks, self.partial)]
        if moved[0].dtype != self.dtype:
            raise TypeError(f"AttnResState.to casts the residual stream to {moved[0].dtype}: {_NOT_A_TENSOR}")
        return AttnResState(tuple(moved[:-1]), moved[-1])

    def __getattr__(self, name: str):  # a name it lacks: a hook or the model's code took it for the hidden states
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(f"'AttnResState' object has no attribute {name!r}: {_NOT_A_TENSOR}")

    def _arithmetic(self, other):  # a hook steering the stream (`out + v`): say what it holds instead
        raise TypeError(f"arithmetic on an AttnResState: {_NOT_A_TENSOR} To add v as the last sublayer's output would "
                        "carry it: add v to state.partial, or where it is None (a block just ended) to state.blocks[-1].")

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = _arithmetic
    def __getitem__(self, index) -> AttnResState:
        """The state of some tokens (Gemma 4 slices the stream before its KV-shared layers: ``h[:, -n:]``): every
        sum indexed alike, which indexes their total. An index reaching the hidden dimension is refused."""
        index = index if isinstance(index, tuple) else (index,)
        hidden = index[len(self.shape) - 1] if len(index) >= len(self.shape) else slice(None)  # what it takes of D
        if any(i is Ellipsis or i is None for i in index) or not (isinstance(hidden, slice) and hidden == slice(None)):
            raise TypeError(f"indexing an AttnResState other than by tokens: {_NOT_A_TENSOR}")
        return AttnResState(tuple(b[index] for b in self.blocks), None if self.partial is None else self.partial[index])

    def residual_sum(self) -> torch.Tensor:
        """The value a standard residual stream would hold here: every source summed. With zero
        queries it equals the original model's hidden state."""
        total = sum(self.blocks[1:], self.blocks[0])
        return total if self.partial is None else total + self.partial


def aligned(state: AttnResState, blocks_in: int, partial_in: bool) -> AttnResState:
    """The state a layer (or the final aggregation) expects, from the one it was handed: where the model
    skipped the layers in between (LayerDrop), their sublayers added nothing. A block they would have
    completed is the partial sum so far, or zeros; a partial sum they would have started is zeros.
    The very state when nothing was skipped."""
    blocks, partial = list(state.blocks), state.partial
    while len(blocks) < blocks_in:
        blocks.append(torch.zeros_like(blocks[0]) if partial is None else partial)
        partial = None
    if partial_in and partial is None:
        partial = torch.zeros_like(blocks[0])
    if len(blocks) != blocks_in or (partial is not None) != partial_in:
        raise ConversionError(
            f"a converted layer expects {blocks_in} blocks{' and a partial sum' if partial_in else ''}, and was handed "
            f"{len(state.blocks)}{' and a partial sum' if state.partial is not None else ''}: the model's own code "
            "reordered its layers, which AttnRes's state cannot follow")
    return state if len(blocks) == len(state.blocks) and partial is state.partial else AttnResState(tuple(blocks), partial)


_NOT_A_TENSOR = ("a layer converted to Block AttnRes hands the next one this state (block sums and a partial sum), "
                 "not the hidden-state tensor. state.residual_sum() is the tensor a standard residual stream holds "
                 "there (what output_hidden_states gives); the last layer returns a tensor.")
register_dataclass(AttnResState, field_names=["blocks", "partial"])


def states_in_output_to_tensors(module, args, output: Any) -> Any:
    """Forward hook on the modules around the rewritten layers: where a model returns the hidden states it
    collected (Hugging Face's ``output_hidden_states=True``; torchtune's ``[*hidden_states, logits]``), each
    state becomes the tensor a standard residual stream would hold there (``residual_sum``: the original's
    hidden state at init). Hugging Face's output classes are pytree nodes: their fields are looked into."""
    def is_state(v: Any) -> bool:
        return isinstance(v, AttnResState)

    if not any(is_state(v) for v in tree_flatten(output, is_leaf=is_state)[0]):
        return None  # the output as it is: no tensor op, so torch.compile makes no graph of this hook
    return tree_map_only(AttnResState, AttnResState.residual_sum, output, is_leaf=is_state)
