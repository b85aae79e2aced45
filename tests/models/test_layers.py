"""Shared layers checked against diffusers' independent CogVideoX implementations."""

from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb, get_3d_rotary_pos_embed, get_timestep_embedding

from hallo3_worker.models.audio_proj import AudioProjConfig, AudioProjection
from hallo3_worker.models.layers import apply_rotary, rotary_tables, timestep_embedding


def test_rotary_tables_match_diffusers_cogvideox_5b_layout() -> None:
    # CogVideoX-5B at 480x720: 13 latent frames of 30x45 tokens, head dim 64.
    cos, sin = rotary_tables(13, 30, 45, 64, 10000.0)
    ref_cos, ref_sin = get_3d_rotary_pos_embed(64, ((0, 0), (30, 45)), (30, 45), 13, use_real=True)
    assert cos.shape == (13 * 30 * 45, 64)
    torch.testing.assert_close(cos, ref_cos.float(), rtol=0, atol=1e-5)
    torch.testing.assert_close(sin, ref_sin.float(), rtol=0, atol=1e-5)


def test_apply_rotary_matches_diffusers_interleaved_convention() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 2 * 4 * 6, 16, generator=g)
    cos, sin = rotary_tables(2, 4, 6, 16, 10000.0)
    expected = apply_rotary_emb(x, (cos, sin), use_real=True, use_real_unbind_dim=-1)
    torch.testing.assert_close(apply_rotary(x, cos, sin), expected)


def test_rotary_is_identity_on_temporal_dims_of_frame_zero() -> None:
    cos, sin = rotary_tables(3, 4, 6, 16, 10000.0)
    # head dim 16 -> 4 temporal dims first; frame 0 rows have angle 0 there.
    assert torch.equal(cos[:24, :4], torch.ones(24, 4))
    assert torch.equal(sin[:24, :4], torch.zeros(24, 4))
    assert not torch.equal(cos[24:48, :4], torch.ones(24, 4))


def test_timestep_embedding_is_cos_first_like_diffusers_flip_sin_to_cos() -> None:
    t = torch.tensor([0.0, 19.0, 500.0, 999.0])
    expected = get_timestep_embedding(t, 64, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(timestep_embedding(t, 64), expected)


def test_audio_projection_compresses_frames_like_the_vae() -> None:
    config = AudioProjConfig(window=5, feature_layers=2, feature_dim=8, hidden_dim=16, tokens=3, token_dim=8)
    proj = AudioProjection(config).eval()
    for frames, latent_frames in ((49, 13), (9, 3), (1, 1)):
        out = proj(torch.randn(2, frames, 5, 2, 8))
        assert out.shape == (2, latent_frames, 3, 8)


def test_audio_projection_keeps_frame_zero_out_of_the_convolution() -> None:
    config = AudioProjConfig(window=1, feature_layers=1, feature_dim=4, hidden_dim=8, tokens=2, token_dim=4)
    proj = AudioProjection(config).eval()
    x = torch.randn(1, 9, 1, 1, 4)
    changed = x.clone()
    changed[:, 1:] += 1.0  # only frames the convolution sees
    with torch.no_grad():
        a, b = proj(x), proj(changed)
    torch.testing.assert_close(a[:, 0], b[:, 0], rtol=0, atol=0)  # latent frame 0 = pixel frame 0 only
    assert not torch.allclose(a[:, 1:], b[:, 1:])


def test_a_shared_reference_equals_a_copy_per_sample() -> None:
    """Batch-1 reference tokens serve both guided samples exactly like a doubled copy."""
    from hallo3_worker.models import presets
    from hallo3_worker.models.layers import SelfAttention

    config = presets.golden_tiny_transformer()
    torch.manual_seed(0)
    attn = SelfAttention(config).eval()
    n = 6
    x = torch.randn(2, config.text_length + n, config.hidden_size)
    cos, sin = torch.randn(n, config.head_dim), torch.randn(n, config.head_dim)
    reference = torch.randn(1, 5, config.hidden_size)
    with torch.no_grad():
        shared = attn(x, config.text_length, (cos, sin), reference)
        doubled = attn(x, config.text_length, (cos, sin), torch.cat([reference, reference]))
    torch.testing.assert_close(shared, doubled, rtol=0, atol=1e-6)
    assert shared.shape == x.shape
