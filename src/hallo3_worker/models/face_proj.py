"""Face projector: a 512-d ArcFace identity embedding -> a few face tokens."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn


@dataclasses.dataclass(frozen=True)
class FaceProjConfig:
    """Defaults are the released checkpoint's."""

    embed_dim: int = 512
    tokens: int = 4
    token_dim: int = 1024
    layernorm_eps: float = 1e-5


class FaceProjection(nn.Module):
    def __init__(self, config: FaceProjConfig) -> None:
        super().__init__()
        self.config = config
        self.proj = nn.Linear(config.embed_dim, config.tokens * config.token_dim)
        self.norm = nn.LayerNorm(config.token_dim, eps=config.layernorm_eps)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """(B, embed_dim) -> (B, tokens, token_dim)."""
        c = self.config
        x = self.proj(embedding.to(self.proj.weight.dtype)).unflatten(-1, (c.tokens, c.token_dim))
        return self.norm(x)
