"""Benchmark the CogVideoX VAE as Hallo3 uses it, per 49-frame segment.

One segment encodes the 3-frame motion clip (reference + two masked motion frames -> 1 latent
frame) and decodes 13 latent frames to 49 pixel frames in Hallo3's chunks ([0:3], [3:5], ...). The
reference image is encoded once per job (1 frame). On a CUDA device this is the full-size VAE
(215.6 M parameters, random weights; speed does not depend on weight values) at 480x720; without
one it is the tiny VAE at 64x96 on the CPU, which only shows that the script works.

    python scripts/benchmark_vae.py [--device cuda] [--dtype bfloat16] [--iters 3] [--output out/vae.json]
"""

from __future__ import annotations

import logging
import platform

import torch

from benchutil import benchmark_parser, device_and_dtype, emit_report, median_seconds

from hallo3_worker.models.vae import COGVIDEOX_5B_VAE, SEGMENT_LATENT_FRAMES, TINY_VAE, Hallo3VAE, build_vae

logger = logging.getLogger("benchmark_vae")


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


@torch.inference_mode()
def run(device: torch.device, dtype: torch.dtype, warmup: int, iters: int) -> dict:
    full = device.type == "cuda"
    config = COGVIDEOX_5B_VAE if full else TINY_VAE
    height, width = (480, 720) if full else (64, 96)
    vae = Hallo3VAE(build_vae(config, dtype=dtype, device=device), config.scaling_factor)
    g = torch.Generator(device=device).manual_seed(0)
    factor = config.spatial_compression
    clip = torch.rand(1, 3, 3, height, width, generator=g, device=device, dtype=dtype) * 2 - 1
    latents = torch.randn(
        1, SEGMENT_LATENT_FRAMES, config.z_channels, height // factor, width // factor, generator=g, device=device
    ).to(dtype)

    result: dict = {
        "device": torch.cuda.get_device_name(device) if full else f"cpu ({platform.processor() or 'unknown'})",
        "model": "full-size VAE (random weights)" if full else "tiny VAE (no CUDA device; not representative)",
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "size": [height, width],
        "parameters": sum(p.numel() for p in vae.vae.parameters()),
    }
    if full:
        torch.cuda.reset_peak_memory_stats(device)
    result["encode_motion_clip_s"] = median_seconds(lambda: vae.encode_condition(clip, generator=g), device, warmup, iters)
    result["encode_peak_gib"] = _peak_gib(device)
    if full:
        torch.cuda.reset_peak_memory_stats(device)
    result["decode_segment_s"] = median_seconds(lambda: vae.decode(latents), device, warmup, iters)
    result["decode_peak_gib"] = _peak_gib(device)
    result["decoded_frames"] = 4 * (SEGMENT_LATENT_FRAMES - 1) + 1
    return result


def main() -> None:
    parser = benchmark_parser(__doc__)
    args = parser.parse_args()
    device, dtype = device_and_dtype(args, logger, "VAE")
    result = run(device, dtype, args.warmup, args.iters)
    emit_report(result, args.output)


if __name__ == "__main__":
    main()
