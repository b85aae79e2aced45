"""Random inputs of one guided (batch-2) main-transformer forward, shared by the model tests."""

from __future__ import annotations

import torch


def guided_inputs(c, seed: int, reference_tokens: int | None = None):
    """(x, timesteps, text, audio features, face embedding, reference tokens) for config ``c``.

    The reference is one batch-1 tensor per block with ``reference_tokens`` tokens (default: one
    latent frame's worth, as the reference network makes).
    """
    g = torch.Generator().manual_seed(seed)
    frames = 4 * (c.latent_frames - 1) + 1
    count = c.tokens_per_frame if reference_tokens is None else reference_tokens
    return (
        torch.randn(2, c.latent_frames, c.in_channels, c.latent_height, c.latent_width, generator=g),
        torch.tensor([999.0, 250.0]),
        torch.randn(2, c.text_length, c.text_dim, generator=g),
        torch.randn(2, frames, c.audio.window, c.audio.feature_layers, c.audio.feature_dim, generator=g),
        torch.randn(2, c.face.embed_dim, generator=g),
        [torch.randn(1, count, c.hidden_size, generator=g) for _ in range(c.num_layers)],
    )
