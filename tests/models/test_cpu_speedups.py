"""The oneDNN Conv3d route gives the same VAE output as the plain path."""

from __future__ import annotations

import torch

from hallo3_worker.models.cpu_speedups import use_onednn_conv3d
from hallo3_worker.models.vae import TINY_VAE, Hallo3VAE, build_vae


def _tiny_vae() -> Hallo3VAE:
    torch.manual_seed(0)
    return Hallo3VAE(build_vae(TINY_VAE), TINY_VAE.scaling_factor)


def test_onednn_conv3d_matches_the_plain_vae_decode_and_encode() -> None:
    plain, fast = _tiny_vae(), _tiny_vae()
    assert use_onednn_conv3d(fast.vae) > 10
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 5, 16, 4, 6, generator=g)
    pixels = torch.rand(1, 3, 3, 32, 48, generator=g) * 2 - 1
    noise = torch.randn(1, 16, 1, 4, 6, generator=g)
    with torch.inference_mode():
        torch.testing.assert_close(fast.decode(latents), plain.decode(latents), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fast.encode(pixels, noise=noise), plain.encode(pixels, noise=noise), rtol=1e-5, atol=1e-5)


def test_autograd_keeps_the_plain_path() -> None:
    conv = torch.nn.Conv3d(4, 4, 3)
    use_onednn_conv3d(conv)
    x = torch.randn(1, 4, 3, 8, 8, requires_grad=True)
    conv(x).sum().backward()  # the oneDNN route has no backward; this must not take it
    assert x.grad is not None
