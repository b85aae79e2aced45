"""CogVideoX VAE (diffusers) loaded from SAT weights: key conversion, Hallo3 encode/decode vs upstream goldens.

The goldens (tests/goldens/vae) come from upstream Hallo3's own ``vae_modules`` classes with the tiny
config and seeded random weights; see the README there.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLCogVideoX
from safetensors.torch import load_file

from hallo3_worker.models.vae import (
    COGVIDEOX_5B_VAE,
    TINY_VAE,
    Hallo3VAE,
    VaeCheckpointError,
    VaeConfig,
    build_vae,
    check_vae_state_dict,
    convert_sat_vae_state_dict,
    decode_chunks,
    load_sat_vae_state_dict,
)

GOLDENS = Path(__file__).resolve().parents[1] / "goldens" / "vae"
RTOL = 1e-4


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


@pytest.fixture(scope="module")
def io_golden() -> dict[str, torch.Tensor]:
    return load_file(str(GOLDENS / "tiny_vae_io.safetensors"))


@pytest.fixture(scope="module")
def sat_state() -> dict[str, torch.Tensor]:
    return load_sat_vae_state_dict(GOLDENS / "tiny_sat_vae.safetensors")


@pytest.fixture(scope="module")
def vae(sat_state) -> Hallo3VAE:
    return Hallo3VAE(build_vae(TINY_VAE, sat_state), TINY_VAE.scaling_factor)


# ------------------------------------------------------------------------------------ golden numerics


def test_encode_matches_upstream(vae, io_golden) -> None:
    for name in ("clip", "ref"):
        pixels = io_golden[f"{name}_pixels"]
        moments, _ = vae.vae.encoder(pixels)
        assert _rel_err(moments, io_golden[f"{name}_encoder_out"]) <= RTOL
        z = vae.encode(pixels, noise=io_golden[f"{name}_noise"])
        want = io_golden[f"{name}_latent_scaled"].permute(0, 2, 1, 3, 4)  # upstream (B,C,T,h,w) -> (B,T,C,h,w)
        assert z.shape == (1, 1, 16, 2, 3)
        assert _rel_err(z, want) <= RTOL, name


def test_encode_condition_appends_zero_latent_frames(vae, io_golden) -> None:
    concat = vae.encode_condition(io_golden["clip_pixels"], 13, noise=io_golden["clip_noise"])
    assert concat.shape == (1, 13, 16, 2, 3)
    assert torch.equal(concat[:, 1:], torch.zeros_like(concat[:, 1:]))
    assert _rel_err(concat[:, :1], io_golden["clip_latent_scaled"].permute(0, 2, 1, 3, 4)) <= RTOL
    assert vae.encode_condition(io_golden["ref_pixels"], 4, noise=io_golden["ref_noise"]).shape[1] == 4
    with pytest.raises(ValueError):
        vae.encode_condition(io_golden["clip_pixels"], 0)


def test_chunked_decode_matches_upstream(vae, io_golden) -> None:
    latents = io_golden["decode_latents_scaled"]  # (1, 13, 16, 2, 3), scaled space
    raw = vae.decode_raw(latents)
    assert raw.shape == (1, 3, 49, 16, 24)
    assert _rel_err(raw, io_golden["decode_raw"]) <= RTOL
    frames = vae.decode(latents)
    assert frames.shape == (1, 49, 3, 16, 24) and frames.dtype == torch.float32
    assert float((frames - io_golden["decode_frames"]).abs().max()) <= RTOL
    assert float(frames.min()) == 0.0 and float(frames.max()) == 1.0  # the clamp is exercised
    # diffusers' own decode() uses the same chunks and cache: identical result
    diffusers_raw = vae.vae.decode(latents.permute(0, 2, 1, 3, 4) / TINY_VAE.scaling_factor).sample
    assert torch.equal(diffusers_raw, raw)
    # ... and the chunking matters: a one-shot decode is far off
    one_shot, _ = vae.vae.decoder(latents.permute(0, 2, 1, 3, 4) / TINY_VAE.scaling_factor)
    assert float((one_shot - raw).abs().max()) > 0.1


def test_decode_chunks() -> None:
    assert decode_chunks(13) == [(0, 3), (3, 5), (5, 7), (7, 9), (9, 11), (11, 13)]
    assert decode_chunks(1) == [(0, 1)]
    assert decode_chunks(3) == [(0, 3)]
    # the rule of sample_video.py: loop_num = (T-1)//2, [0:3] then [2i+1:2i+3]
    for t in (3, 5, 13, 21):
        assert decode_chunks(t) == [(0, 3)] + [(i * 2 + 1, i * 2 + 3) for i in range(1, (t - 1) // 2)]
    for bad in (0, 2, 12):
        with pytest.raises(ValueError):
            decode_chunks(bad)


def test_posterior_sampling(vae, io_golden) -> None:
    pixels = io_golden["ref_pixels"]
    z1 = vae.encode(pixels, generator=torch.Generator().manual_seed(5))
    noise = torch.randn((1, 16, 1, 2, 3), generator=torch.Generator().manual_seed(5))
    assert torch.equal(z1, vae.encode(pixels, noise=noise))
    z2 = vae.encode(pixels, generator=torch.Generator().manual_seed(6))
    assert not torch.equal(z1, z2)  # sampled, not the mode
    with pytest.raises(ValueError):
        vae.encode(pixels, noise=torch.zeros(1, 16, 2, 2, 3))


def test_logvar_is_clamped_like_upstream(vae, monkeypatch) -> None:
    mean = torch.zeros(1, 16, 1, 2, 3)
    logvar = torch.full_like(mean, 50.0)
    logvar[..., 0] = -100.0
    monkeypatch.setattr(vae.vae.encoder, "forward", lambda x: (torch.cat([mean, logvar], dim=1), None))
    z = vae.encode(torch.zeros(1, 3, 1, 16, 24), noise=torch.ones_like(mean))
    want = torch.full_like(mean, torch.exp(torch.tensor(10.0)).item())  # logvar 50 -> 20
    want[..., 0] = torch.exp(torch.tensor(-15.0)).item()  # logvar -100 -> -30
    torch.testing.assert_close(z.permute(0, 2, 1, 3, 4), want * 0.7, rtol=1e-6, atol=0)


def test_dtype_and_shapes(sat_state) -> None:
    bf16 = Hallo3VAE(build_vae(TINY_VAE, sat_state, dtype=torch.bfloat16), TINY_VAE.scaling_factor)
    assert bf16.dtype == torch.bfloat16
    z = bf16.encode(torch.zeros(1, 3, 1, 16, 24), generator=torch.Generator().manual_seed(0))
    assert z.dtype == torch.bfloat16 and z.shape == (1, 1, 16, 2, 3)
    frames = bf16.decode(torch.zeros(1, 1, 16, 2, 3))
    assert frames.dtype == torch.float32 and frames.shape == (1, 1, 3, 16, 24)
    with pytest.raises(ValueError):
        bf16.decode(torch.zeros(1, 2, 16, 2, 3))  # even number of latent frames
    with pytest.raises(ValueError):
        bf16.encode(torch.zeros(1, 4, 1, 16, 24))


# ----------------------------------------------------------------------------------- key conversion


def test_real_sat_keys_convert_to_the_diffusers_5b_vae() -> None:
    manifest = json.loads((GOLDENS / "real_sat_vae_keys.json").read_text())
    sat = {k: torch.empty(shape, device="meta") for k, shape in manifest["keys"].items()}
    sat["loss.discriminator.main.0.weight"] = torch.empty(4, device="meta")  # the real file has loss.* keys
    converted = convert_sat_vae_state_dict(sat, COGVIDEOX_5B_VAE.num_levels)
    with torch.device("meta"):
        model = AutoencoderKLCogVideoX(**COGVIDEOX_5B_VAE.diffusers_config())
    check_vae_state_dict(model, converted)  # every key present with the right shape, nothing extra
    assert sum(t.numel() for t in converted.values()) == 215_583_907
    assert manifest["config"] == {"ch": 128, "ch_mult": [1, 2, 2, 4], "num_res_blocks": 3, "z_channels": 16}


def test_rename_rules() -> None:
    t = torch.zeros(1)
    sat = {
        "encoder.down.2.block.1.nin_shortcut.weight": t,
        "encoder.down.0.downsample.conv.weight": t,
        "encoder.mid.block_1.norm1.weight": t,
        "decoder.mid.block_2.norm2.conv_y.conv.weight": t,
        "decoder.up.0.block.3.conv1.conv.weight": t,
        "decoder.up.3.upsample.conv.bias": t,
        "decoder.norm_out.norm_layer.weight": t,
        "loss.logvar": t,
    }
    assert set(convert_sat_vae_state_dict(sat, 4)) == {
        "encoder.down_blocks.2.resnets.1.conv_shortcut.weight",
        "encoder.down_blocks.0.downsamplers.0.conv.weight",
        "encoder.mid_block.resnets.0.norm1.weight",
        "decoder.mid_block.resnets.1.norm2.conv_y.conv.weight",
        "decoder.up_blocks.3.resnets.3.conv1.conv.weight",
        "decoder.up_blocks.0.upsamplers.0.conv.bias",
        "decoder.norm_out.norm_layer.weight",
    }
    with pytest.raises(VaeCheckpointError, match="up level 4"):
        convert_sat_vae_state_dict({"decoder.up.4.block.0.conv1.conv.weight": t}, 4)


def test_strict_loading_names_the_bad_keys(sat_state) -> None:
    missing = dict(sat_state)
    del missing["decoder.up.2.block.1.norm2.conv_b.conv.bias"]
    with pytest.raises(
        VaeCheckpointError, match=r"1 missing key\(s\): decoder\.up_blocks\.1\.resnets\.1\.norm2\.conv_b\.conv\.bias"
    ):
        build_vae(TINY_VAE, missing)
    extra = dict(sat_state)
    extra["encoder.down.1.block.0.extra.weight"] = torch.zeros(3)
    with pytest.raises(
        VaeCheckpointError,
        match=r"unexpected key\(s\): encoder\.down\.1\.block\.0\.extra\.weight \(as encoder\.down_blocks\.1\.resnets\.0\.extra\.weight\)",
    ):
        build_vae(TINY_VAE, extra)
    wrong = dict(sat_state)
    wrong["encoder.conv_in.conv.weight"] = torch.zeros(32, 3, 3, 3, 1)
    with pytest.raises(
        VaeCheckpointError, match=r"wrong shape: encoder\.conv_in\.conv\.weight \(checkpoint \(32, 3, 3, 3, 1\)"
    ):
        build_vae(TINY_VAE, wrong)
    # the tiny weights do not fit the real architecture, and the error says so rather than loading partially
    with pytest.raises(VaeCheckpointError, match="missing key"):
        build_vae(VaeConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=2), sat_state)


def test_loads_a_torch_saved_3d_vae_pt(tmp_path, sat_state, vae) -> None:
    path = tmp_path / "3d-vae.pt"
    torch.save({"state_dict": {k: v.clone() for k, v in sat_state.items()}}, path)
    loaded = Hallo3VAE.from_sat_checkpoint(path, TINY_VAE)
    assert loaded.scaling_factor == 0.7
    ours = loaded.vae.state_dict()
    for key, value in vae.vae.state_dict().items():
        assert torch.equal(ours[key], value), key
    assert ours["encoder.conv_in.conv.weight"].dtype == torch.float32  # fp16 file, fp32 model
    with pytest.raises(FileNotFoundError):
        Hallo3VAE.from_sat_checkpoint(tmp_path / "absent.pt", TINY_VAE)


def test_from_diffusers_directory(tmp_path, vae) -> None:
    vae.vae.save_pretrained(tmp_path / "vae")
    again = Hallo3VAE.from_diffusers(tmp_path / "vae")
    for key, value in vae.vae.state_dict().items():
        assert torch.equal(again.vae.state_dict()[key], value), key


def test_config_validation() -> None:
    assert TINY_VAE.spatial_compression == 8 and COGVIDEOX_5B_VAE.spatial_compression == 8
    with pytest.raises(ValueError, match="multiple of 32"):
        VaeConfig(ch=16, ch_mult=(1, 1, 1, 1))
    with pytest.raises(ValueError):
        VaeConfig(ch=32, ch_mult=(1, 1), temporal_compress_times=4)
