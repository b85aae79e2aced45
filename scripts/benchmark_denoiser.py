"""Benchmark the Hallo3 denoiser: one CFG forward (batch 2) of the main transformer.

On a CUDA device it builds the full-size networks with random weights (speed does not depend on
weight values) at 480x720x49 frames: 226 text + 17550 video + 1350 reference tokens, batch 2. It
reports seconds per forward, achieved TFLOP/s against upstream's 4.18e14 FLOP per sample-forward
(so 8.37e14 per CFG forward), the reference network's time, and peak GPU memory, as JSON.

Without a CUDA device it runs the tiny golden-test model on the CPU and says so; those numbers
only show that the script works.

With ``--ranks N`` it also starts N processes (one GPU each, NCCL; gloo processes on the CPU) and
times the guided forward as the worker computes it on N ranks, for every layout of N (CFG degree
x Ulysses degree), next to the serial forward. The report always lists, for 2, 4, 6 and 8 ranks,
the bytes each layout moves between the ranks per step, computed from the shapes.

    python scripts/benchmark_denoiser.py [--device cuda] [--iters 5] [--ranks 4] [--output out/bench.json]
"""

from __future__ import annotations

import functools
import json
import logging
import platform
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

from benchutil import benchmark_parser, device_and_dtype, emit_report, median_seconds, sync

from hallo3_worker.models import presets
from hallo3_worker.models.loading import build_on_meta, materialize_random
from hallo3_worker.models.reference_net import ReferenceNet
from hallo3_worker.models.transformer import Hallo3Transformer, TransformerConfig
from hallo3_worker.parallel.denoise import ParallelDenoiser, serve
from hallo3_worker.parallel.exchange import step_volume
from hallo3_worker.parallel.group import free_port, init_rank, leave, make_context
from hallo3_worker.parallel.layout import ParallelLayout

logger = logging.getLogger("benchmark_denoiser")

# FLOPs of one batch-1 forward of upstream's main DiT at 480x720x49 (torch.utils.flop_counter on
# the meta-device model; includes the reference-token queries this implementation skips).
UPSTREAM_FLOP_PER_SAMPLE_FORWARD = 4.18e14


@torch.inference_mode()
def run(device: torch.device, dtype: torch.dtype, warmup: int, iters: int, profile: Path | None = None) -> dict:
    full = device.type == "cuda"
    main_cfg = presets.full_transformer() if full else presets.golden_tiny_transformer()
    ref_cfg = presets.full_reference_net() if full else presets.golden_tiny_reference_net()
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=device, dtype=dtype)

    result: dict = {
        "device": torch.cuda.get_device_name(device) if full else f"cpu ({platform.processor() or 'unknown'})",
        "model": "full-size (random weights)" if full else "tiny golden config (no CUDA device; not representative)",
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
    }

    # Reference network: once per job, batch 1.
    ref_net = materialize_random(build_on_meta(lambda: ReferenceNet(ref_cfg), dtype), device)
    ref_latent = randn(1, 1, 16, ref_cfg.latent_height, ref_cfg.latent_width)
    result["reference_net_s"] = median_seconds(functools.partial(ref_net, ref_latent), device, warmup, iters)
    reference = ref_net(ref_latent)  # batch 1, shared by both halves of the guided batch
    del ref_net
    if full:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    model = materialize_random(build_on_meta(lambda: Hallo3Transformer(main_cfg), dtype), device)
    c = main_cfg
    frames = 4 * (c.latent_frames - 1) + 1
    x = randn(2, c.latent_frames, c.in_channels, c.latent_height, c.latent_width)
    t = torch.full((2,), 500.0, device=device)
    text = randn(2, c.text_length, c.text_dim)
    audio = randn(2, frames, c.audio.window, c.audio.feature_layers, c.audio.feature_dim)
    face = randn(2, c.face.embed_dim)

    result["encode_conditions_s"] = median_seconds(lambda: model.encode_conditions(audio, face), device, warmup, iters)
    audio_tokens, face_tokens = model.encode_conditions(audio, face)
    seconds = median_seconds(lambda: model(x, t, text, audio_tokens, face_tokens, reference), device, warmup, iters)
    tokens = c.text_length + c.latent_frames * c.tokens_per_frame
    result.update(
        {
            "sequence": {"text": c.text_length, "video": tokens - c.text_length, "reference": reference[0].shape[1]},
            "batch": 2,
            "forward_s": seconds,
            "segment_50_steps_s": 50 * seconds,
            "parameters_main": sum(p.numel() for p in model.parameters()),
        }
    )
    if profile is not None:
        _profile(lambda: model(x, t, text, audio_tokens, face_tokens, reference), device, profile)
    if full:
        flop = 2 * UPSTREAM_FLOP_PER_SAMPLE_FORWARD
        result["flop_per_forward_upstream_count"] = flop
        result["achieved_tflops"] = flop / seconds / 1e12
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return result


def layouts_of(world: int, heads: int) -> list[ParallelLayout]:
    """Every CFG x Ulysses split of ``world`` ranks whose Ulysses degree divides the heads."""
    return [ParallelLayout(cfg, world // cfg) for cfg in (2, 1)
            if world % cfg == 0 and heads % (world // cfg) == 0]


def exchange_table(config: TransformerConfig, element_bytes: int) -> dict:
    """MiB moved between ranks per step (and per segment) for each layout of 2, 4, 6 and 8 ranks."""
    return {
        str(layout): {key: round(value / 2**20, 1) for key, value in
                      step_volume(config, layout.cfg, layout.ulysses, element_bytes).items()}
        for world in (2, 4, 6, 8) for layout in layouts_of(world, config.num_heads)
    }


def _rank_main(rank: int, world: int, port: int, device_type: str, dtype_name: str, warmup: int, iters: int,
               out: str) -> None:
    """One rank of the --ranks benchmark: every layout of ``world``; rank 0 times the guided forward."""
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    dtype = getattr(torch, dtype_name)
    full = device_type == "cuda"
    config = presets.full_transformer() if full else presets.golden_tiny_transformer()
    layouts = layouts_of(world, config.num_heads)
    contexts = [init_rank(rank, layouts[0], device, port=port, timeout_s=600)]
    contexts += [make_context(rank, layout, device, 600) for layout in layouts[1:]]
    model = materialize_random(build_on_meta(lambda: Hallo3Transformer(config), dtype), device, seed=0)
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=device, dtype=dtype)

    from hallo3_worker.denoiser import SegmentConditions

    c = config
    conditions = SegmentConditions(randn(1, c.latent_frames, 16, c.latent_height, c.latent_width),
                                   randn(1, c.text_length, c.text_dim),
                                   randn(1, 4 * (c.latent_frames - 1) + 1, c.audio.window, c.audio.feature_layers,
                                         c.audio.feature_dim),
                                   randn(1, c.face.embed_dim))
    with torch.no_grad():
        reference = model.reference_kv([randn(1, c.tokens_per_frame, c.hidden_size) for _ in range(c.num_layers)])
    x = torch.randn(2, c.latent_frames, 16, c.latent_height, c.latent_width, generator=g, device=device)
    t = torch.full((2,), 500.0, device=device)
    report = {}
    with torch.inference_mode():
        for layout, context in zip(layouts, contexts):
            if rank != 0:
                serve(context, model)
                continue
            denoiser = ParallelDenoiser(context, model)
            model_fn = denoiser.model_fn(model, conditions, reference)
            report[str(layout)] = {"layout": layout.describe(),
                                   "forward_s": median_seconds(lambda: model_fn(x, t), device, warmup, iters)}
            denoiser.stop()
    if rank == 0:
        Path(out).write_text(json.dumps(report))
    leave()


def run_ranks(world: int, device: torch.device, dtype: torch.dtype, warmup: int, iters: int) -> dict:
    """Spawn ``world`` ranks and time the guided forward under each layout."""
    if device.type == "cuda" and world > torch.cuda.device_count():
        raise SystemExit(f"--ranks {world}: only {torch.cuda.device_count()} CUDA GPU(s) are visible")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ranks.json"
        mp.spawn(_rank_main, args=(world, free_port(), device.type, str(dtype).removeprefix("torch."), warmup, iters,
                                   str(out)), nprocs=world, join=True)
        return json.loads(out.read_text())


def _profile(fn, device: torch.device, path: Path) -> None:
    """Write torch.profiler's table of the most expensive operators of one call of fn to path."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        sync(device)
    sort_by = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(prof.key_averages().table(sort_by=sort_by, row_limit=30) + "\n")
    logger.info("profile of one forward written to %s", path)


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--profile", type=Path, help="write a profiler table of one forward here")
    parser.add_argument("--ranks", type=int, default=1, help="also time the guided forward on this many ranks")
    args = parser.parse_args()
    device, dtype = device_and_dtype(args, logger, "model")
    result = run(device, dtype, args.warmup, args.iters, args.profile)
    config = presets.full_transformer()
    result["exchange_mib_full_size_bf16"] = exchange_table(config, 2)
    if args.ranks > 1:
        per_layout = run_ranks(args.ranks, device, dtype, args.warmup, args.iters)
        for entry in per_layout.values():
            entry["speedup_vs_serial"] = round(result["forward_s"] / entry["forward_s"], 3)
        result["ranks"] = {"count": args.ranks, "backend": "nccl" if device.type == "cuda" else "gloo",
                           "layouts": per_layout}
    emit_report(result, args.output)


if __name__ == "__main__":
    main()
