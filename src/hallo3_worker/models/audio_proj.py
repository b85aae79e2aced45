"""Audio projector: windowed wav2vec2 features per video frame -> audio tokens per latent frame.

Input: (B, F, window, layers, dim) wav2vec2 hidden states, F = 4*(T-1)+1 pixel frames, each frame
carrying a +-2 frame window of all encoder layers. Each frame becomes `tokens` tokens of width
`token_dim` through a 3-layer MLP. Two rounds of a shared stride-2 temporal convolution then
compress F frames to T latent frames the way the video VAE does: frame 0 passes through untouched
and the remaining (even) number of frames is halved, so 49 -> 25 -> 13.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass(frozen=True)
class AudioProjConfig:
    """Defaults are the released checkpoint's (wav2vec2-base: 12 layers of 768)."""

    window: int = 5
    feature_layers: int = 12
    feature_dim: int = 768
    hidden_dim: int = 512
    tokens: int = 32
    token_dim: int = 768
    layernorm_eps: float = 1e-5

    @property
    def input_dim(self) -> int:
        return self.window * self.feature_layers * self.feature_dim


class AudioProjection(nn.Module):
    def __init__(self, config: AudioProjConfig) -> None:
        super().__init__()
        self.config = config
        width = config.tokens * config.token_dim
        self.proj1 = nn.Linear(config.input_dim, config.hidden_dim)
        self.proj2 = nn.Linear(config.hidden_dim, config.hidden_dim)
        self.proj3 = nn.Linear(config.hidden_dim, width)
        # One kernel-2 stride-2 convolution over time with `width` channels, used for both rounds.
        self.conv = nn.Conv1d(width, width, kernel_size=2, stride=2)
        self.norm = nn.LayerNorm(config.token_dim, eps=config.layernorm_eps)

    def compress_time(self, x: torch.Tensor) -> torch.Tensor:
        """(B, width, F) -> (B, width, 1 + (F-1)/2) for odd F (frame 0 kept); (B, width, F/2) for even F."""
        if x.shape[-1] % 2 == 0:
            return self.conv(x)
        first, rest = x[..., :1], x[..., 1:]
        if rest.shape[-1] == 0:
            return first
        return torch.cat([first, self.conv(rest)], dim=-1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, F, window, layers, dim) -> (B, T, tokens, token_dim) with T = ((F-1)/2-ish twice)."""
        c = self.config
        b, f = features.shape[:2]
        x = features.reshape(b * f, c.input_dim).to(self.proj1.weight.dtype)
        x = F.relu(self.proj1(x))
        x = F.relu(self.proj2(x))
        x = self.proj3(x).reshape(b, f, c.tokens * c.token_dim)  # (B, F, tokens*token_dim)
        x = x.transpose(1, 2)  # (B, width, F)
        for _ in range(2):
            x = self.compress_time(x)
        x = x.transpose(1, 2).unflatten(-1, (c.tokens, c.token_dim))  # (B, T, tokens, token_dim)
        return self.norm(x)
