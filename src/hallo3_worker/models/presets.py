"""Named model configurations: the released checkpoint's and tiny ones for CPU tests and demos."""

from __future__ import annotations

from hallo3_worker.models.audio_proj import AudioProjConfig
from hallo3_worker.models.face_proj import FaceProjConfig
from hallo3_worker.models.reference_net import ReferenceNetConfig
from hallo3_worker.models.transformer import TransformerConfig


def full_transformer() -> TransformerConfig:
    """The released checkpoint: 42 layers, 3072 wide, 48 heads, 13 x 60 x 90 latents."""
    return TransformerConfig()


def full_reference_net() -> ReferenceNetConfig:
    return ReferenceNetConfig()


_GOLDEN_BACKBONE = dict(
    num_layers=2,
    hidden_size=64,
    num_heads=4,
    time_embed_dim=32,
    text_dim=32,
    latent_frames=3,  # 9 pixel frames
)


def golden_tiny_transformer() -> TransformerConfig:
    """Tiny random-weight config of the golden fixtures: 2 layers, 64 wide, real 60 x 90 latent grid.

    The 30 x 45 token grid per latent frame is kept because upstream hard-codes 1350 reference
    tokens; the audio projector is shrunk (2 wav2vec layers of 16, 4 tokens of 16).
    """
    return TransformerConfig(
        **_GOLDEN_BACKBONE,
        audio=AudioProjConfig(window=5, feature_layers=2, feature_dim=16, hidden_dim=32, tokens=4, token_dim=16),
        face=FaceProjConfig(embed_dim=512, tokens=4, token_dim=1024),
    )


def golden_tiny_reference_net() -> ReferenceNetConfig:
    return ReferenceNetConfig(**_GOLDEN_BACKBONE)
