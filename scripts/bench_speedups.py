"""The exact speed-ups side by side: one guided (batch-2) forward of the main transformer, plain vs each vs all.

On a CUDA device it uses the full-size transformer with random weights (speed does not depend on
weight values) at 480x720x49 frames; without one, the embedded tiny transformer on the CPU
(the numbers then only show that the script works). Rows, in order (fusion cannot be undone, so
the compile row runs on the fused network):

  plain              the networks as written, SDPA's own kernel choice, reference tokens each forward
  reference_kv_once  the reference tokens' keys and values made once, not in every forward
  attention          the attention backend ``auto`` picks for this device
  fused_projections  one product for q/k/v (and each cross-attention's k/v)
  compile_blocks     regional torch.compile of the blocks (with fused projections); compile time reported
  all                every item on: what the worker runs

Each row reports seconds per forward, TFLOP/s (FLOPs counted by torch.utils.flop_counter on the
plain forward) and, on known GPUs, MFU against the card's dense bf16 peak.

    python scripts/bench_speedups.py [--device cuda] [--iters 3] [--output out/speedups.json]
"""

from __future__ import annotations

import logging
import platform
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchutil import benchmark_parser, device_and_dtype, emit_report, median_seconds, sync

from hallo3_worker.models import attention, presets
from hallo3_worker.models.layers import fuse_projections
from hallo3_worker.models.loading import build_on_meta, materialize_random
from hallo3_worker.models.speedups import compile_blocks
from hallo3_worker.models.transformer import Hallo3Transformer
from hallo3_worker.tiny import tiny_transformer_config

logger = logging.getLogger("bench_speedups")

#: Dense bf16 tensor-core peak (TFLOP/s, without sparsity) by GPU name, most specific first.
PEAK_BF16_TFLOPS = (("H200", 989.4), ("H100 PCIe", 756.0), ("H100", 989.4), ("H800", 989.4), ("A100", 312.0),
                    ("L40S", 362.0), ("L4", 121.0), ("A10G", 70.0), ("RTX 4090", 165.2))


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or 'unknown'})"


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def guided_inputs(model: Hallo3Transformer, device: torch.device, dtype: torch.dtype):
    """A CFG batch (2) of random inputs, projected conditions, and batch-1 reference tokens (one per block)."""
    c = model.config
    g = None if device.type == "meta" else torch.Generator(device=device).manual_seed(0)  # meta: shapes only

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, device=device, dtype=dtype)

    frames = 4 * (c.latent_frames - 1) + 1
    x = randn(2, c.latent_frames, c.in_channels, c.latent_height, c.latent_width)
    t = torch.full((2,), 500.0, device=device)
    text = randn(2, c.text_length, c.text_dim)
    audio, face = randn(2, frames, c.audio.window, c.audio.feature_layers, c.audio.feature_dim), randn(2, c.face.embed_dim)
    tokens = [randn(1, c.tokens_per_frame, c.hidden_size) for _ in range(c.num_layers)]
    return (x, t, text, *model.encode_conditions(audio, face)), tokens


@torch.inference_mode()
def run(device: torch.device, dtype: torch.dtype, warmup: int, iters: int, compile_: bool = True) -> dict:
    full = device.type == "cuda"
    config = presets.full_transformer() if full else tiny_transformer_config()
    model = materialize_random(build_on_meta(lambda: Hallo3Transformer(config), dtype), device)
    inputs, tokens = guided_inputs(model, device, dtype)
    kv = model.reference_kv(tokens)
    auto_backend = attention.choose_backend("auto", device)
    with FlopCounterMode(display=False) as counter:
        model(*inputs, tokens)
    flop = counter.get_total_flops()
    peak = peak_tflops(device)
    rows: list[dict] = []

    def row(item: str, reference, backend: str = "sdpa", note: str = "") -> None:
        attention.set_attention_backend(backend)
        try:
            seconds = median_seconds(lambda: model(*inputs, reference), device, warmup, iters)
        finally:
            attention.set_attention_backend("sdpa")
        tflops = flop / seconds / 1e12
        rows.append({"item": item, "forward_s": round(seconds, 4), "tflops": float(f"{tflops:.4g}"),
                     "mfu": round(tflops / peak, 3) if peak else None, "attention": backend, "note": note})
        logger.info("%-18s %.4f s/forward", item, seconds)

    row("plain", tokens)
    row("reference_kv_once", kv)
    row("attention", tokens, auto_backend)
    fuse_projections(model)
    row("fused_projections", tokens)
    compile_s = None
    if compile_:
        compile_blocks(model.blocks)
        sync(device)
        started = time.perf_counter()
        model(*inputs, tokens)  # the first call compiles
        sync(device)
        compile_s = round(time.perf_counter() - started, 2)
        row("compile_blocks", tokens, note=f"with fused projections; compile {compile_s} s")
    row("all", kv, auto_backend, note="fused + compiled + reference K/V once + attention" if compile_ else "no compile")
    plain_s = rows[0]["forward_s"]
    for entry in rows:
        entry["speedup"] = round(plain_s / entry["forward_s"], 3)
    return {
        "device": device_name(device),
        "model": "full-size transformer (random weights)" if full else "the embedded tiny transformer on the CPU (not representative)",
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "batch": 2,
        "flop_per_forward": flop,
        "peak_bf16_tflops": peak,
        "attention_auto": auto_backend,
        "compile_s": compile_s,
        "rows": rows,
    }


def markdown(report: dict) -> str:
    lines = ["| item | s / forward | speed-up | TFLOP/s | MFU | note |", "| --- | ---: | ---: | ---: | ---: | --- |"]
    for r in report["rows"]:
        mfu = f"{100 * r['mfu']:.0f} %" if r["mfu"] is not None else "n/a"
        lines.append(f"| {r['item']} | {r['forward_s']:.4f} | {r['speedup']:.2f}x | {r['tflops']:.4g} | {mfu} | {r['note']} |")
    return "\n".join(lines)


def main() -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--no-compile", action="store_true", help="leave out the compiled rows")
    args = parser.parse_args()
    device, dtype = device_and_dtype(args, logger, "transformer")
    report = run(device, dtype, args.warmup, args.iters, compile_=not args.no_compile)
    emit_report(report, args.output)
    print(markdown(report))  # the side-by-side table


if __name__ == "__main__":
    main()
