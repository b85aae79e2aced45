"""The CogVideoX 3-D causal VAE as Hallo3 uses it, on top of diffusers' ``AutoencoderKLCogVideoX``.

Hallo3 ships the VAE in the SAT format (``cogvideox-5b-i2v-sat/vae/3d-vae.pt``, a ``torch.save``-d dict
whose ``"state_dict"`` holds ``encoder.*``, ``decoder.*`` and unused ``loss.*`` keys). diffusers'
``AutoencoderKLCogVideoX`` is the same network; :func:`convert_sat_vae_state_dict` renames the keys
and :func:`build_vae` loads them strictly.

What :class:`Hallo3VAE` reproduces from upstream Hallo3:

* **Encode** (``SATVideoDiffusionEngine.encode_first_stage``): one encoder pass over all frames, the
  posterior is *sampled* (``z = mean + exp(logvar / 2) * noise`` with ``logvar`` clamped to
  ``[-30, 20]``), then ``z *= 0.7``. The conditioning latent appends zero latent frames up to the
  segment length (13 in Hallo3).
* **Decode** (``sample_video.py`` decode loop): ``z / 0.7``, decoded in latent-frame chunks
  ``[0:3], [3:5], ..., [T-2:T]`` with the causal-convolution cache carried from chunk to chunk. The
  chunking changes the pixels (GroupNorm statistics are per call), so it is not optional. Output is
  ``clamp((x + 1) / 2, 0, 1)`` in float32.

No tiling and no other chunking is applied, because both change the output. The decoder runs
sliced by default (:mod:`hallo3_worker.models.vae_slicing`): the same math in row slices, with each
GroupNorm's statistics gathered over the whole call first, for a much lower peak memory.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pickle
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKLCogVideoX

from hallo3_worker.models.vae_slicing import DEFAULT_DECODER_SLICING, DecoderSlicing, slice_vae_decoder

logger = logging.getLogger(__name__)

#: ``scale_factor`` of the CogVideoX-5B(-I2V) VAE latents in Hallo3 (``configs/cogvideox_5b_i2v_s2.yaml``).
VAE_SCALING_FACTOR = 0.7
#: Latent frames per Hallo3 segment (``sampling_num_frames``); 13 latent frames decode to 49 pixel frames.
SEGMENT_LATENT_FRAMES = 13
#: ``DiagonalGaussianDistribution`` clamps the log-variance to this range before sampling.
LOGVAR_CLAMP = (-30.0, 20.0)


class VaeCheckpointError(ValueError):
    """The VAE weights do not match the configured architecture (names the offending keys)."""


@dataclasses.dataclass(frozen=True)
class VaeConfig:
    """Architecture of the SAT ``ContextParallelEncoder3D`` / ``ContextParallelDecoder3D`` pair.

    The field names follow the SAT YAML (``encoder_config.params``); :meth:`diffusers_config` gives
    the equivalent ``AutoencoderKLCogVideoX`` arguments. GroupNorm uses 32 groups, so every
    ``ch * ch_mult[i]`` must be a multiple of 32.
    """

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 4)
    num_res_blocks: int = 3
    z_channels: int = 16
    temporal_compress_times: int = 4
    in_channels: int = 3
    out_ch: int = 3
    scaling_factor: float = VAE_SCALING_FACTOR

    def __post_init__(self) -> None:
        for mult in self.ch_mult:
            if (self.ch * mult) % 32:
                raise ValueError(f"VAE channel count {self.ch * mult} is not a multiple of 32 (GroupNorm groups)")
        level = int(math.log2(self.temporal_compress_times))
        if 2**level != self.temporal_compress_times or level >= len(self.ch_mult):
            raise ValueError(
                f"temporal_compress_times={self.temporal_compress_times} needs a power of two below "
                f"2**len(ch_mult) = {2 ** len(self.ch_mult)}"
            )

    @property
    def num_levels(self) -> int:
        return len(self.ch_mult)

    @property
    def spatial_compression(self) -> int:
        return 2 ** (self.num_levels - 1)

    def diffusers_config(self) -> dict[str, Any]:
        """Keyword arguments for ``AutoencoderKLCogVideoX(**...)`` describing the same network."""
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_ch,
            "down_block_types": ("CogVideoXDownBlock3D",) * self.num_levels,
            "up_block_types": ("CogVideoXUpBlock3D",) * self.num_levels,
            "block_out_channels": tuple(self.ch * m for m in self.ch_mult),
            "latent_channels": self.z_channels,
            "layers_per_block": self.num_res_blocks,
            "act_fn": "silu",
            "norm_eps": 1e-6,
            "norm_num_groups": 32,
            "temporal_compression_ratio": float(self.temporal_compress_times),
            "scaling_factor": self.scaling_factor,
            "use_quant_conv": False,
            "use_post_quant_conv": False,
        }


#: The real CogVideoX-5B-I2V VAE (215.6 M parameters).
COGVIDEOX_5B_VAE = VaeConfig()

#: A tiny VAE with the real topology (4 levels, 8x spatial and 4x temporal compression, 16 latent
#: channels) that runs in well under a second on a CPU. 32 channels is the minimum GroupNorm(32) allows.
TINY_VAE = VaeConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, z_channels=16)


# --------------------------------------------------------------------------------------------------
# SAT -> diffusers state-dict conversion
# --------------------------------------------------------------------------------------------------

# Applied in order, as substring replacements (diffusers' convert_cogvideox_to_diffusers.py).
_RENAMES: tuple[tuple[str, str], ...] = (
    ("block.", "resnets."),
    ("down.", "down_blocks."),
    ("downsample", "downsamplers.0"),
    ("upsample", "upsamplers.0"),
    ("nin_shortcut", "conv_shortcut"),
    ("encoder.mid.block_1", "encoder.mid_block.resnets.0"),
    ("encoder.mid.block_2", "encoder.mid_block.resnets.1"),
    ("decoder.mid.block_1", "decoder.mid_block.resnets.0"),
    ("decoder.mid.block_2", "decoder.mid_block.resnets.1"),
)
_SAT_UP_LEVEL = re.compile(r"^decoder\.up\.(\d+)\.")


def convert_sat_vae_state_dict(
    sat_state_dict: Mapping[str, torch.Tensor], num_levels: int = COGVIDEOX_5B_VAE.num_levels
) -> dict[str, torch.Tensor]:
    """Rename a SAT VAE state dict to ``AutoencoderKLCogVideoX`` keys.

    Keys starting with ``loss.`` (the training loss/discriminator) are dropped. SAT stores the
    decoder's up levels in resolution order (``decoder.up.0`` = full resolution) while diffusers
    stores them in execution order, so ``decoder.up.{i}`` becomes ``decoder.up_blocks.{num_levels-1-i}``.
    Tensors are passed through unchanged (no copy, no dtype change).
    """
    return {new: value for new, (_, value) in _convert_with_origin(sat_state_dict, num_levels).items()}


def _convert_key(key: str, num_levels: int) -> str:
    new_key = key
    match = _SAT_UP_LEVEL.match(new_key)
    if match:
        level = int(match.group(1))
        if not 0 <= level < num_levels:
            raise VaeCheckpointError(f"SAT VAE key {key!r} names up level {level}, the config has {num_levels}")
        new_key = f"decoder.up_blocks.{num_levels - 1 - level}." + new_key[match.end() :]
    for old, new in _RENAMES:
        new_key = new_key.replace(old, new)
    return new_key


def _convert_with_origin(
    sat_state_dict: Mapping[str, torch.Tensor], num_levels: int
) -> dict[str, tuple[str, torch.Tensor]]:
    out: dict[str, tuple[str, torch.Tensor]] = {}
    for key, value in sat_state_dict.items():
        if key.startswith("loss."):
            continue
        new_key = _convert_key(key, num_levels)
        if new_key in out:
            raise VaeCheckpointError(f"SAT VAE keys {out[new_key][0]!r} and {key!r} both map to {new_key!r}")
        out[new_key] = (key, value)
    return out


def _describe(keys: Sequence[str], limit: int = 12) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def check_vae_state_dict(
    model: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    origin: Mapping[str, str] | None = None,
) -> None:
    """Raise :class:`VaeCheckpointError` naming every missing, unexpected or wrong-shape key.

    ``origin`` maps converted keys back to the checkpoint's own names, used for unexpected keys.
    """
    origin = origin or {}
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k if origin.get(k, k) == k else f"{origin[k]} (as {k})" for k in state_dict if k not in expected]
    wrong_shape = [
        f"{k} (checkpoint {tuple(state_dict[k].shape)}, model {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_describe(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_describe(unexpected)}")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} key(s) with the wrong shape: {_describe(wrong_shape)}")
    if problems:
        raise VaeCheckpointError("VAE weights do not match the VAE config: " + "; ".join(problems))


def load_sat_vae_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a SAT VAE checkpoint: ``3d-vae.pt`` (``torch.save`` dict with ``"state_dict"``) or a
    ``.safetensors`` file holding the same flat keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VAE checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) serialisation cannot be memory-mapped
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise VaeCheckpointError(
            f"{path} holds objects other than tensors ({exc}); re-save its 'state_dict' as .safetensors"
        ) from exc
    if isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise VaeCheckpointError(f"{path} does not contain a state dict")
    return dict(obj)


def build_vae(
    config: VaeConfig = COGVIDEOX_5B_VAE,
    sat_state_dict: Mapping[str, torch.Tensor] | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> AutoencoderKLCogVideoX:
    """Build ``AutoencoderKLCogVideoX`` for ``config`` and (optionally) load SAT-format weights strictly.

    With weights, the model is built on the ``meta`` device and the checkpoint tensors, cast to
    ``dtype`` on ``device``, are assigned directly (no random initialisation, no fp32 detour).
    Without ``sat_state_dict`` the weights are diffusers' random initialisation (for tests).
    """
    if sat_state_dict is None:
        vae = AutoencoderKLCogVideoX(**config.diffusers_config())
        # nn.Module.to: diffusers' ModelMixin.to warns about fp32 modules on every dtype cast
        torch.nn.Module.to(vae, device=device, dtype=dtype)
    else:
        with torch.device("meta"):
            vae = AutoencoderKLCogVideoX(**config.diffusers_config())
        with_origin = _convert_with_origin(sat_state_dict, config.num_levels)
        converted = {key: value for key, (_, value) in with_origin.items()}
        check_vae_state_dict(vae, converted, {key: sat_key for key, (sat_key, _) in with_origin.items()})
        vae.load_state_dict(
            {key: value.to(device=device, dtype=dtype) for key, value in converted.items()}, strict=True, assign=True
        )
        leftover = [name for name, t in [*vae.named_parameters(), *vae.named_buffers()] if t.is_meta]
        if leftover:
            raise VaeCheckpointError(f"VAE tensors without weights after loading: {_describe(leftover)}")
    vae.requires_grad_(False)
    return vae.eval()


# --------------------------------------------------------------------------------------------------
# Encode / decode as Hallo3 does it
# --------------------------------------------------------------------------------------------------


def decode_chunks(num_latent_frames: int) -> list[tuple[int, int]]:
    """Latent-frame windows Hallo3 decodes one call at a time: ``[0:3]`` then pairs.

    ``sample_video.py`` hard-codes ``[0:3], [3:5], ..., [11:13]`` for 13 frames; for any odd count this
    is the same rule as diffusers' ``_decode`` with ``num_latent_frames_batch_size=2``. A single latent
    frame is decoded on its own.
    """
    if num_latent_frames < 1 or num_latent_frames % 2 == 0:
        raise ValueError(f"Hallo3 decodes an odd number of latent frames, got {num_latent_frames}")
    if num_latent_frames == 1:
        return [(0, 1)]
    return [(0, 3)] + [(start, start + 2) for start in range(3, num_latent_frames, 2)]


class Hallo3VAE:
    """Encode/decode wrapper reproducing Hallo3's use of the CogVideoX VAE.

    Layouts: pixels are (B, 3, F, H, W) in [-1, 1]; latents handed to / returned from the denoiser are
    (B, T, C, h, w) **in scaled space** (already multiplied by ``scaling_factor``), as in upstream
    where the DiT consumes (B, T, C, h, w). F = 4 (T - 1) + 1, h = H / 8, w = W / 8 for the real VAE.
    ``decoder_slicing`` (default on) attaches the sliced decoder to ``vae``; None leaves it plain.
    """

    def __init__(
        self,
        vae: AutoencoderKLCogVideoX,
        scaling_factor: float = VAE_SCALING_FACTOR,
        *,
        decoder_slicing: DecoderSlicing | None = DEFAULT_DECODER_SLICING,
    ) -> None:
        if vae.config.get("use_quant_conv") or vae.config.get("use_post_quant_conv"):
            raise ValueError("the CogVideoX VAE used by Hallo3 has no quant/post-quant convolutions")
        if decoder_slicing is not None:
            slice_vae_decoder(vae, decoder_slicing)
        self.vae = vae
        self.scaling_factor = float(scaling_factor)

    @classmethod
    def from_sat_checkpoint(
        cls,
        path: str | Path,
        config: VaeConfig = COGVIDEOX_5B_VAE,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> Hallo3VAE:
        """Load ``3d-vae.pt`` (SAT format) into diffusers' ``AutoencoderKLCogVideoX``."""
        state = load_sat_vae_state_dict(path)
        vae = build_vae(config, state, dtype=dtype, device=device)
        del state
        logger.info("loaded VAE from %s (%s, %s)", path, dtype, device)
        return cls(vae, config.scaling_factor)

    @classmethod
    def from_diffusers(
        cls,
        path: str | Path,
        *,
        subfolder: str | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        scaling_factor: float = VAE_SCALING_FACTOR,
    ) -> Hallo3VAE:
        """Load a diffusers-format ``AutoencoderKLCogVideoX`` directory (e.g. a CogVideoX ``vae/`` folder)."""
        vae = AutoencoderKLCogVideoX.from_pretrained(str(path), subfolder=subfolder, torch_dtype=dtype)
        vae.requires_grad_(False)
        return cls(vae.to(device).eval(), scaling_factor)

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    @property
    def device(self) -> torch.device:
        return self.vae.device

    @torch.no_grad()
    def encode(
        self,
        pixels: torch.Tensor,
        *,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Encode (B, 3, F, H, W) pixels in [-1, 1] to a sampled, scaled latent (B, T, C, h, w).

        F must be 1 or 4k + 1 frames (T = (F - 1) / 4 + 1). The whole clip goes through the encoder in
        one pass, as upstream does. The posterior noise is ``noise`` (shape (B, C, T, h, w), the
        encoder's layout) if given, else drawn with ``torch.randn`` from ``generator`` (or the global
        RNG) in the VAE's dtype on its device.
        """
        if pixels.ndim != 5 or pixels.shape[1] != self.vae.config.in_channels:
            raise ValueError(f"expected pixels of shape (B, 3, F, H, W), got {tuple(pixels.shape)}")
        x = pixels.to(device=self.device, dtype=self.dtype)
        moments, _ = self.vae.encoder(x)  # (B, 2C, T, h, w) = mean || logvar
        mean, logvar = torch.chunk(moments, 2, dim=1)
        logvar = torch.clamp(logvar, *LOGVAR_CLAMP)
        std = torch.exp(0.5 * logvar)
        if noise is None:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        elif tuple(noise.shape) != tuple(mean.shape):
            raise ValueError(f"posterior noise must have shape {tuple(mean.shape)}, got {tuple(noise.shape)}")
        z = mean + std * noise.to(device=mean.device, dtype=mean.dtype)
        z = z * self.scaling_factor
        return z.permute(0, 2, 1, 3, 4).contiguous()  # (B, C, T, h, w) -> (B, T, C, h, w)

    @torch.no_grad()
    def encode_condition(
        self,
        pixels: torch.Tensor,
        num_latent_frames: int = SEGMENT_LATENT_FRAMES,
        *,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Encode a motion clip (B, 3, F, H, W) and append zero latent frames up to ``num_latent_frames``.

        Hallo3 encodes ``[reference, masked motion 1, masked motion 2]`` (F = 3, one latent frame) and
        pads with 12 zero frames: the result is (B, num_latent_frames, C, h, w), the ``concat``
        conditioning of the denoiser.
        """
        z = self.encode(pixels, noise=noise, generator=generator)
        pad = num_latent_frames - z.shape[1]
        if pad < 0:
            raise ValueError(f"clip encodes to {z.shape[1]} latent frames, more than {num_latent_frames}")
        zeros = z.new_zeros((z.shape[0], pad, *z.shape[2:]))
        return torch.cat([z, zeros], dim=1)

    @torch.no_grad()
    def decode_raw(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode scaled latents (B, T, C, h, w) to raw decoder output (B, 3, F, H, W), F = 4 (T - 1) + 1.

        Divides by ``scaling_factor`` and decodes in Hallo3's latent-frame chunks, carrying diffusers'
        causal-conv cache from one chunk to the next (upstream keeps it in ``cache_padding``).
        """
        if latents.ndim != 5 or latents.shape[2] != self.vae.config.latent_channels:
            raise ValueError(f"expected latents of shape (B, T, C, h, w), got {tuple(latents.shape)}")
        z = latents.to(device=self.device, dtype=self.dtype).permute(0, 2, 1, 3, 4)  # (B, C, T, h, w)
        z = z / self.scaling_factor
        conv_cache = None
        pieces = []
        for start, end in decode_chunks(z.shape[2]):
            out, conv_cache = self.vae.decoder(z[:, :, start:end].contiguous(), conv_cache=conv_cache)
            pieces.append(out)
        return torch.cat(pieces, dim=2)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode scaled latents (B, T, C, h, w) to float32 frames (B, F, 3, H, W) in [0, 1].

        Same as upstream: chunked decode, cast to float32, ``clamp((x + 1) / 2, 0, 1)``.
        """
        raw = self.decode_raw(latents).to(torch.float32)
        frames = raw.permute(0, 2, 1, 3, 4)  # (B, 3, F, H, W) -> (B, F, 3, H, W)
        return torch.clamp((frames + 1.0) / 2.0, min=0.0, max=1.0).contiguous()
