"""A lower-memory CogVideoX VAE decoder with the same math, attached from outside.

:func:`slice_vae_decoder` replaces the ``forward`` of an ``AutoencoderKLCogVideoX``'s decoder with
one that walks the same modules with the same weights, but holds far fewer full-size tensors at once.
At 480x720 in bf16 the plain decoder's peak is in the last (full-resolution) up block, where a
residual block holds its input, ``norm_f``, ``conv_y``, ``conv_b``, ``norm_f * conv_y``, their sum,
SiLU and convolution outputs (each (1, 128, 8, 480, 720), 0.66 GiB), the 256-channel upsampler
output kept alive by the caller, and two sets of causal-convolution caches (the previous chunk's
and the new one), among them full copies of the interpolated ``zq`` that kernel-1 convolutions
cache and never read. What the sliced decoder does instead:

* **Spatial slices.** Every causal 3-D convolution (and the upsamplers' 2-D one) computes its output
  ``rows`` rows at a time from the rows it needs (one row of halo each side) and writes them into
  one preallocated output. The causal time padding is identical: the previous chunk's cached frames
  (or the first frame repeated, for the first chunk) go in front of each slice.
* **GroupNorm statistics first.** Each ``CogVideoXSpatialNorm3D`` gathers its group mean and
  variance over the whole (frames, H, W) of the call in float32 (two passes, in steps), then
  normalises slice by slice as ``x * scale + shift`` with ``scale = rstd * gamma`` and ``shift =
  beta - scale * mean``, which is how torch's GroupNorm applies them; ``* conv_y + conv_b`` and SiLU
  follow in place, written straight into the convolution's input slice.
* **Fewer live tensors.** A block's second convolution writes over its first convolution's output
  (a slice is written only after the next slice has read its halo rows); the previous chunk's cache
  entries are dropped as soon as they are used (the cache dict passed in is consumed); kernel-1
  convolutions cache nothing (they never read a cache); the interpolated ``zq`` is made once per
  resolution instead of once per normalisation.

The result equals the plain decoder up to float rounding (slices and statistics are summed in a
different order), and its cache can be handed to the plain decoder and back. The replaced forward
falls back to the plain one when autograd would record it, in training mode or with a ``temb``.
Slicing costs a halo row per slice and side of extra convolution work (under 1 % at ``rows=240``).
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLCogVideoX
from diffusers.models.autoencoders.autoencoder_kl_cogvideox import (
    CogVideoXCausalConv3d,
    CogVideoXDecoder3D,
    CogVideoXResnetBlock3D,
    CogVideoXSpatialNorm3D,
)
from diffusers.models.upsampling import CogVideoXUpsample3D
from torch import nn

#: ``fill(dst, a, b)`` writes the activated input rows [a, b) of all frames into dst (B, C, T, b - a, W).
Fill = Callable[[torch.Tensor, int, int], None]
#: ``finish(y, r0, r1)`` stores a convolution's output rows [r0, r1), y (B, C_out, T, r1 - r0, W).
Finish = Callable[[torch.Tensor, int, int], None]


@dataclasses.dataclass(frozen=True)
class DecoderSlicing:
    """How the sliced decoder divides its work.

    ``rows``: output rows per convolution slice at every resolution (480x720 frames take two slices
    at 240; the 240-row level one). ``step_elements``: elements per step of the elementwise
    normalisation work and of the float32 statistics (bounds their temporaries: 64 MiB in float32
    at 2**24).
    """

    rows: int = 240
    step_elements: int = 1 << 24

    def __post_init__(self) -> None:
        if self.rows < 1 or self.step_elements < 1:
            raise ValueError(f"rows and step_elements must be positive, got {self}")


DEFAULT_DECODER_SLICING = DecoderSlicing()


# --------------------------------------------------------------------------------------------------
# GroupNorm with whole-call statistics, applied slice by slice
# --------------------------------------------------------------------------------------------------


def _group_scale_shift(norm: nn.GroupNorm, x: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, C, T, H, W) -> float32 (scale, shift), each (B, C, 1, 1, 1): ``GroupNorm(x) = x * scale + shift``.

    Mean and biased variance per (batch, group) over (C / G, T, H, W), in float32, two passes in
    pieces of at most ``step`` elements (no float32 copy of x).
    """
    b, c = x.shape[:2]
    g = norm.num_groups
    flat = x.reshape(b, g, -1)  # a view: every tensor the sliced decoder makes is contiguous
    count = flat.shape[-1]
    pieces = flat.split(max(1, step // (b * g)), dim=-1)
    total = torch.zeros(b, g, dtype=torch.float32, device=x.device)
    for piece in pieces:
        total += piece.sum(dim=-1, dtype=torch.float32)
    mean = total / count  # (B, G)
    m2 = torch.zeros_like(mean)
    for piece in pieces:
        m2 += (piece - mean[..., None]).square_().sum(dim=-1)  # float32 piece
    rstd = torch.rsqrt(m2 / count + norm.eps)
    gamma = norm.weight.float().view(1, g, c // g) if norm.affine else torch.ones(1, g, c // g, device=x.device)
    beta = norm.bias.float().view(1, g, c // g) if norm.affine else torch.zeros(1, g, c // g, device=x.device)
    scale = rstd[..., None] * gamma  # (B, G, C / G)
    shift = beta - scale * mean[..., None]
    return scale.reshape(b, c, 1, 1, 1), shift.reshape(b, c, 1, 1, 1)


def _zq_like(zq: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
    """``CogVideoXSpatialNorm3D``'s interpolation of zq (B, Cz, t, h, w) to (T, H, W), first frame apart."""
    if size[0] > 1 and size[0] % 2 == 1:
        first = F.interpolate(zq[:, :, :1], size=(1, *size[1:]))
        rest = F.interpolate(zq[:, :, 1:], size=(size[0] - 1, *size[1:]))
        return torch.cat([first, rest], dim=2)
    return F.interpolate(zq, size=size)


class _Zq:
    """The decoder input interpolated to the current resolution, made once per resolution."""

    def __init__(self, sample: torch.Tensor) -> None:
        self.sample = sample
        self.size: tuple[int, ...] = ()
        self.value: torch.Tensor | None = None

    def like(self, f: torch.Tensor) -> torch.Tensor:
        size = tuple(f.shape[-3:])
        if size != self.size:
            self.value = None  # free the previous resolution's copy first
            self.value, self.size = _zq_like(self.sample, size), size  # type: ignore[arg-type]
        assert self.value is not None
        return self.value


def _norm_act(norm: CogVideoXSpatialNorm3D, f: torch.Tensor, zq: torch.Tensor, step: int) -> Fill:
    """The fill for ``silu(norm(f, zq))``: f (B, C, T, H, W), zq already at (T, H, W)."""
    scale, shift = _group_scale_shift(norm.norm_layer, f, step)
    b, c, t, _, w = f.shape

    def fill(dst: torch.Tensor, a: int, end: int) -> None:
        frames = max(1, step // (b * c * (end - a) * w))
        for t0 in range(0, t, frames):
            out = dst[:, :, t0 : t0 + frames]  # (B, C, frames, rows, W), a view of the slice buffer
            torch.addcmul(shift, f[:, :, t0 : t0 + frames, a:end], scale, out=out)  # float32 math, f.dtype out
            zs = zq[:, :, t0 : t0 + frames, a:end]
            out.mul_(norm.conv_y.conv(zs))  # kernel-1 convolutions: no time padding, no cache
            out.add_(norm.conv_b.conv(zs))
            F.silu(out, inplace=True)

    return fill


# --------------------------------------------------------------------------------------------------
# Sliced convolutions
# --------------------------------------------------------------------------------------------------


def _causal_conv(
    conv: CogVideoXCausalConv3d,
    fill: Fill,
    shape: torch.Size,
    cache: torch.Tensor | None,
    finish: Finish,
    rows: int,
    like: torch.Tensor,
) -> torch.Tensor:
    """A causal conv over the activated input of ``shape`` (B, C, T, H, W), ``rows`` output rows at a time.

    ``cache`` (B, C, k - 1, H, W) is the previous chunk's last input frames, or None for the first
    chunk (the first frame is repeated). Returns the new cache, the last k - 1 frames of the padded
    input, as ``CogVideoXCausalConv3d`` does. A slice's output is handed to ``finish`` only after the
    next slice has read its input, so ``finish`` may write over the rows the fill reads.
    """
    b, c, t, h, w = shape
    k = conv.time_kernel_size
    ph = conv.conv.padding[1]  # the inner conv pads H by ph: a slice needs ph halo rows each side
    new_cache = like.new_empty(b, c, k - 1, h, w)
    pending: tuple[torch.Tensor, int, int] | None = None
    for r0 in range(0, h, rows):
        r1 = min(r0 + rows, h)
        a, end = max(r0 - ph, 0), min(r1 + ph, h)
        buf = like.new_empty(b, c, k - 1 + t, end - a, w)  # causal padding frames + input rows [a, end)
        fill(buf[:, :, k - 1 :], a, end)
        if cache is None:
            buf[:, :, : k - 1] = buf[:, :, k - 1 : k]  # broadcast: the first frame repeated
        else:
            buf[:, :, : k - 1] = cache[:, :, :, a:end]
        new_cache[:, :, :, r0:r1] = buf[:, :, -(k - 1) :, r0 - a : r1 - a]
        if pending is not None:
            finish(*pending)
        y = conv.conv(buf)  # (B, C_out, T, end - a, W): the module's own H padding lands outside [r0, r1)
        del buf
        pending = (y[:, :, :, r0 - a : r1 - a], r0, r1)
    assert pending is not None
    finish(*pending)
    return new_cache


def _copy_into(out: torch.Tensor) -> Finish:
    def finish(y: torch.Tensor, r0: int, r1: int) -> None:
        out[:, :, :, r0:r1] = y

    return finish


def _resnet(
    block: CogVideoXResnetBlock3D, x: torch.Tensor, zq: _Zq, cache: dict | None, cfg: DecoderSlicing
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """x (B, C_in, T, H, W) -> (B, C_out, T, H, W) and the block's new cache; ``cache`` is consumed."""
    cache = cache if cache is not None else {}
    b, _, t, h, w = x.shape
    new: dict[str, torch.Tensor] = {}
    hidden = x.new_empty(b, block.out_channels, t, h, w)
    fill1 = _norm_act(block.norm1, x, zq.like(x), cfg.step_elements)
    new["conv1"] = _causal_conv(block.conv1, fill1, x.shape, cache.pop("conv1", None), _copy_into(hidden), cfg.rows, x)
    del fill1

    def finish(y: torch.Tensor, r0: int, r1: int) -> None:
        rows = x[:, :, :, r0:r1]
        shortcut = block.conv_shortcut(rows) if block.in_channels != block.out_channels else rows
        torch.add(y, shortcut, out=hidden[:, :, :, r0:r1])  # conv2 output + shortcut, over conv1's output

    fill2 = _norm_act(block.norm2, hidden, zq.like(hidden), cfg.step_elements)
    new["conv2"] = _causal_conv(block.conv2, fill2, hidden.shape, cache.pop("conv2", None), finish, cfg.rows, x)
    return hidden, new


def _time_index(frames: int, compress_time: bool, device: torch.device) -> torch.Tensor:
    """Source frame of each output frame of ``CogVideoXUpsample3D``'s nearest interpolation (made on ``device``)."""
    if not compress_time or frames == 1:
        return torch.arange(frames, device=device)
    if frames % 2 == 1:  # the first frame alone, the others doubled
        return torch.arange(2 * frames - 1, device=device).add_(1).div_(2, rounding_mode="floor")
    return torch.arange(2 * frames, device=device).div_(2, rounding_mode="floor")


def _upsample(up: CogVideoXUpsample3D, x: torch.Tensor, rows: int) -> torch.Tensor:
    """x (B, C, T, h, w) -> (B, C', T', 2h, 2w): nearest x2 (in time too with compress_time), a 3x3 Conv2d per frame."""
    b, c, t, h, w = x.shape
    index = _time_index(t, up.compress_time, x.device)
    t2, height, width = len(index), 2 * h, 2 * w
    out = x.new_empty(b, up.conv.out_channels, t2, height, width)
    ph = up.conv.padding[0]
    for r0 in range(0, height, rows):
        r1 = min(r0 + rows, height)
        lo, hi = max(r0 - ph, 0) // 2, (min(r1 + ph, height) + 1) // 2  # source rows covering the halo
        frames = x[:, :, :, lo:hi].permute(0, 2, 1, 3, 4).index_select(1, index)  # (B, T', C, hi - lo, w)
        up_rows = F.interpolate(frames.reshape(b * t2, c, hi - lo, w), scale_factor=2.0)  # rows [2 lo, 2 hi)
        del frames
        y = up.conv(up_rows)  # (B T', C', 2 (hi - lo), 2w)
        del up_rows
        y = y.view(b, t2, -1, 2 * (hi - lo), width)[:, :, :, r0 - 2 * lo : r1 - 2 * lo]
        out[:, :, :, r0:r1] = y.permute(0, 2, 1, 3, 4)
        del y
    return out


# --------------------------------------------------------------------------------------------------
# The decoder
# --------------------------------------------------------------------------------------------------


def _records_autograd(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether autograd would record the decode (the sliced path writes in place and cannot be differentiated)."""
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters()))


def _sliced_forward(
    self: CogVideoXDecoder3D,
    sample: torch.Tensor,
    temb: torch.Tensor | None = None,
    conv_cache: dict | None = None,
) -> tuple[torch.Tensor, dict]:
    """sample (B, Cz, t, h, w) -> (B, 3, T, H, W) and the new cache, as ``CogVideoXDecoder3D.forward``."""
    if temb is not None or self.training or _records_autograd(self, sample):
        return CogVideoXDecoder3D.forward(self, sample, temb, conv_cache)
    cfg: DecoderSlicing = self.vae_slicing
    old = conv_cache if conv_cache is not None else {}
    old.pop("norm_out", None)  # a plain decoder's kernel-1 caches: never read
    new: dict = {}
    zq = _Zq(sample)
    hidden, new["conv_in"] = self.conv_in(sample, conv_cache=old.pop("conv_in", None))
    blocks = [("mid_block", self.mid_block)] + [(f"up_block_{i}", blk) for i, blk in enumerate(self.up_blocks)]
    for key, block in blocks:
        old_block, new_block = old.pop(key, None) or {}, {}
        for j, resnet in enumerate(block.resnets):
            hidden, new_block[f"resnet_{j}"] = _resnet(resnet, hidden, zq, old_block.pop(f"resnet_{j}", None), cfg)
        for upsampler in getattr(block, "upsamplers", None) or ():
            hidden = _upsample(upsampler, hidden, cfg.rows)
        new[key] = new_block
    b, _, t, h, w = hidden.shape
    out = hidden.new_empty(b, self.conv_out.conv.out_channels, t, h, w)
    fill = _norm_act(self.norm_out, hidden, zq.like(hidden), cfg.step_elements)
    new["conv_out"] = _causal_conv(
        self.conv_out, fill, hidden.shape, old.pop("conv_out", None), _copy_into(out), cfg.rows, hidden
    )
    return out, new


def _check_causal(conv: nn.Module, name: str) -> None:
    inner = getattr(conv, "conv", None)
    ok = (
        isinstance(conv, CogVideoXCausalConv3d)
        and conv.pad_mode != "replicate"
        and conv.time_kernel_size > 1
        and isinstance(inner, nn.Conv3d)
        and inner.stride == (1, 1, 1)
        and inner.dilation == (1, 1, 1)
        and inner.padding[0] == 0
        and inner.kernel_size[1] == 2 * inner.padding[1] + 1
    )
    if not ok:
        raise ValueError(f"{name}: not a causal, stride-1, 'same' 3-D convolution the sliced decoder supports")


def _check_decoder(decoder: CogVideoXDecoder3D) -> None:
    blocks = [decoder.mid_block, *decoder.up_blocks]
    for block in blocks:
        for resnet in block.resnets:
            if not (
                isinstance(resnet.norm1, CogVideoXSpatialNorm3D)
                and isinstance(resnet.norm2, CogVideoXSpatialNorm3D)
                and isinstance(resnet.nonlinearity, nn.SiLU)
                and resnet.dropout.p == 0.0
                and not (resnet.use_conv_shortcut and resnet.in_channels != resnet.out_channels)
            ):
                raise ValueError("decoder residual blocks must use spatial norms, SiLU, no dropout and a 1x1 shortcut")
            _check_causal(resnet.conv1, "conv1")
            _check_causal(resnet.conv2, "conv2")
        for up in getattr(block, "upsamplers", None) or ():
            conv = up.conv
            same = conv.stride == (1, 1) and conv.kernel_size[0] == 2 * conv.padding[0] + 1
            if not (isinstance(up, CogVideoXUpsample3D) and same):
                raise ValueError("decoder upsamplers must be CogVideoXUpsample3D with a stride-1 'same' Conv2d")
    if not (isinstance(decoder.norm_out, CogVideoXSpatialNorm3D) and isinstance(decoder.conv_act, nn.SiLU)):
        raise ValueError("the decoder's output norm must be a spatial norm followed by SiLU")
    _check_causal(decoder.conv_out, "conv_out")


def slice_vae_decoder(vae: AutoencoderKLCogVideoX, slicing: DecoderSlicing = DEFAULT_DECODER_SLICING) -> None:
    """Make ``vae.decoder`` run sliced (same outputs, lower peak memory); call again to change ``slicing``."""
    _check_decoder(vae.decoder)
    vae.decoder.vae_slicing = slicing
    vae.decoder.forward = types.MethodType(_sliced_forward, vae.decoder)  # type: ignore[method-assign]


def unslice_vae_decoder(vae: AutoencoderKLCogVideoX) -> None:
    """Put back diffusers' own decoder forward."""
    vae.decoder.__dict__.pop("forward", None)
    vae.decoder.__dict__.pop("vae_slicing", None)


def decoder_slicing(vae: AutoencoderKLCogVideoX) -> DecoderSlicing | None:
    """The slicing ``vae.decoder`` runs with, or None on the plain path."""
    return vae.decoder.__dict__.get("vae_slicing") if "forward" in vae.decoder.__dict__ else None


__all__ = ["DEFAULT_DECODER_SLICING", "DecoderSlicing", "decoder_slicing", "slice_vae_decoder", "unslice_vae_decoder"]
