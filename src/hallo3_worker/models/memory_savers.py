"""Lower peak memory for the networks, attached from outside.

:func:`chunk_feed_forward` makes every :class:`~hallo3_worker.models.layers.FeedForward` of a
network process its tokens in slices. The MLP acts on each token independently, so the result is
the same; what changes is the largest intermediate: at full size the (2, 17776, 12288) hidden
activation and its GELU (0.81 GiB each in bf16) shrink to one slice's worth. It costs a few more,
smaller matrix products per block.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from hallo3_worker.models.layers import FeedForward


def _chunked_forward(self: FeedForward, x: torch.Tensor) -> torch.Tensor:
    """x: (B, S, D) -> (B, S, D), ``self.chunk_tokens`` tokens at a time."""
    step = self.chunk_tokens
    if x.shape[1] <= step:
        return FeedForward.forward(self, x)
    out = torch.empty(*x.shape[:-1], self.proj_out.out_features, dtype=x.dtype, device=x.device)
    for start in range(0, x.shape[1], step):
        piece = x[:, start : start + step]
        out[:, start : start + step] = self.proj_out(F.gelu(self.proj_in(piece), approximate="tanh"))
    return out


def chunk_feed_forward(module: nn.Module, chunk_tokens: int = 4096) -> int:
    """Run every ``FeedForward`` in ``module`` over at most ``chunk_tokens`` tokens at a time; returns how many."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    count = 0
    for sub in module.modules():
        if isinstance(sub, FeedForward):
            sub.chunk_tokens = chunk_tokens
            sub.forward = types.MethodType(_chunked_forward, sub)  # type: ignore[method-assign]
            count += 1
    return count


__all__ = ["chunk_feed_forward"]
