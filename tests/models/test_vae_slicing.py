"""The sliced VAE decoder gives the plain decoder's output with fewer tensors alive at once."""

from __future__ import annotations

import pytest
import torch

from hallo3_worker.memory import measure
from hallo3_worker.models.cpu_speedups import use_onednn_conv3d
from hallo3_worker.models.vae import COGVIDEOX_5B_VAE, TINY_VAE, Hallo3VAE, VaeConfig, build_vae
from hallo3_worker.models.vae_slicing import (
    DEFAULT_DECODER_SLICING,
    DecoderSlicing,
    decoder_slicing,
    slice_vae_decoder,
    unslice_vae_decoder,
)

RTOL = 1e-5


def _vae(config: VaeConfig = TINY_VAE, slicing: DecoderSlicing | None = None, *, onednn: bool = False) -> Hallo3VAE:
    torch.manual_seed(0)  # diffusers initialises from the global generator: the same weights each time
    vae = Hallo3VAE(build_vae(config), config.scaling_factor, decoder_slicing=slicing)
    if onednn:
        use_onednn_conv3d(vae.vae)
    return vae


def _latents(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


@pytest.fixture(scope="module")
def plain_tiny() -> tuple[torch.Tensor, torch.Tensor]:
    latents = _latents(1, 5, 16, 2, 3)  # chunks [0:3] (9 frames, no cache) and [3:5] (8 frames, cached)
    with torch.inference_mode():
        return latents, _vae().decode_raw(latents)


@pytest.mark.parametrize(
    ("rows", "step", "onednn"),
    [(3, 1000, False), (7, 1 << 24, True), (240, 1 << 24, False), (2, 777, True)],
)
def test_sliced_decode_matches_the_plain_decode(plain_tiny, rows: int, step: int, onednn: bool) -> None:
    """Row slices, small statistic steps, and the oneDNN convolutions together."""
    latents, want = plain_tiny
    vae = _vae(slicing=DecoderSlicing(rows=rows, step_elements=step), onednn=onednn)
    with torch.inference_mode():
        got = vae.decode_raw(latents)
    assert got.shape == want.shape == (1, 3, 17, 16, 24)
    assert _rel(got, want) <= RTOL


def test_one_row_slices_onednn_on_both_sides_and_a_single_latent_frame() -> None:
    latents = _latents(1, 1, 16, 4, 6)
    with torch.inference_mode():
        want = _vae(onednn=True).decode(latents)
        got = _vae(slicing=DecoderSlicing(rows=1), onednn=True).decode(latents)
    assert got.shape == (1, 1, 3, 32, 48)
    assert float((got - want).abs().max()) <= RTOL


@pytest.mark.slow
def test_sliced_decode_matches_with_the_real_channel_counts() -> None:
    """The 5B VAE's own topology (128-512 channels, 4 blocks a level) at a small frame size (~15 s)."""
    torch.manual_seed(0)
    vae = build_vae(COGVIDEOX_5B_VAE)
    use_onednn_conv3d(vae)
    latents = _latents(1, 5, 16, 1, 2, seed=2)
    with torch.inference_mode():
        want = Hallo3VAE(vae, decoder_slicing=None).decode_raw(latents)
        got = Hallo3VAE(vae, decoder_slicing=DecoderSlicing(rows=3, step_elements=4096)).decode_raw(latents)
    assert got.shape == (1, 3, 17, 8, 16)
    assert _rel(got, want) <= RTOL


def test_the_cache_passes_between_the_sliced_and_the_plain_decoder() -> None:
    """The sliced decoder's cache drops only entries nothing reads; the plain decoder continues from it."""
    latents = _latents(1, 16, 5, 2, 3)  # (B, C, T, h, w), unscaled, as the decoder takes it
    plain, sliced = _vae(onednn=True), _vae(slicing=DecoderSlicing(rows=3), onednn=True)
    with torch.inference_mode():
        out_plain, cache_plain = plain.vae.decoder(latents[:, :, :3])
        out_sliced, cache_sliced = sliced.vae.decoder(latents[:, :, :3])
        assert _rel(out_sliced, out_plain) <= RTOL
        assert "norm1" in cache_plain["mid_block"]["resnet_0"] and "norm1" not in cache_sliced["mid_block"]["resnet_0"]
        for chunk_cache in (cache_plain, cache_sliced):
            assert chunk_cache["up_block_0"]["resnet_0"]["conv1"].shape[2] == 2  # two frames for the causal kernel
        last = ("up_block_3", "resnet_1", "conv2")
        got, want = cache_sliced[last[0]][last[1]][last[2]], cache_plain[last[0]][last[1]][last[2]]
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * float(want.abs().max()))
        mixed, _ = plain.vae.decoder(latents[:, :, 3:], conv_cache=cache_sliced)  # plain after sliced
        want, _ = plain.vae.decoder(latents[:, :, 3:], conv_cache=cache_plain)
        again, _ = sliced.vae.decoder(latents[:, :, 3:], conv_cache=cache_plain)  # sliced after plain
    assert _rel(mixed, want) <= RTOL and _rel(again, want) <= RTOL
    assert cache_plain == {}  # consumed by the sliced decoder: each entry is dropped once it is used


def test_attach_detach_and_the_plain_fallbacks() -> None:
    vae = _vae()
    assert decoder_slicing(vae.vae) is None
    assert decoder_slicing(Hallo3VAE(build_vae(TINY_VAE)).vae) == DEFAULT_DECODER_SLICING  # on by default
    slice_vae_decoder(vae.vae, DecoderSlicing(rows=4))
    assert decoder_slicing(vae.vae) == DecoderSlicing(rows=4)
    latents = _latents(1, 16, 3, 2, 3)
    with torch.no_grad():
        plain_out, _ = type(vae.vae.decoder).forward(vae.vae.decoder, latents)
    with torch.enable_grad():  # autograd would record: the plain forward runs, bit for bit
        grad_out, _ = vae.vae.decoder(latents.clone().requires_grad_())
    assert torch.equal(grad_out.detach(), plain_out)
    unslice_vae_decoder(vae.vae)
    assert decoder_slicing(vae.vae) is None and "forward" not in vae.vae.decoder.__dict__
    with pytest.raises(ValueError):
        DecoderSlicing(rows=0)
    broken = build_vae(TINY_VAE)
    broken.decoder.up_blocks[1].resnets[0].nonlinearity = torch.nn.GELU()
    with pytest.raises(ValueError, match="SiLU"):
        slice_vae_decoder(broken)


def test_sliced_decode_holds_less() -> None:
    """Real tensors at a small size: the peak of live activations drops by more than half."""
    latents = _latents(1, 3, 16, 4, 6)  # 32x48 frames
    plain, sliced = _vae(onednn=True), _vae(slicing=DecoderSlicing(rows=12), onednn=True)
    peaks = {}
    for name, vae in (("plain", plain), ("sliced", sliced)):
        peaks[name] = measure(lambda vae=vae: vae.decode_raw(latents), [vae.vae], [latents]).activations
    assert peaks["sliced"] < 0.5 * peaks["plain"]  # 9.4 MB against 26.8 MB when written
