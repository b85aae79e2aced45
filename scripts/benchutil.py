"""Helpers shared by the benchmark and estimate scripts (imported as a sibling module)."""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch


def sync(device: torch.device) -> None:
    """Wait for queued device work, so host clocks measure it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> float:
    """Median seconds of fn() over ``iters`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def emit_report(report: dict, output: Path | None) -> None:
    """Print the JSON report (the script's output) and also write it to ``output`` if given."""
    text = json.dumps(report, indent=2)
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text + "\n")
    print(text)  # the JSON report is the script's output


def benchmark_parser(description: str | None) -> argparse.ArgumentParser:
    """The options every benchmark takes: --device, --dtype, --warmup, --iters, --output."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--output", type=Path, help="also write the JSON here")
    return parser


def device_and_dtype(args: argparse.Namespace, logger: logging.Logger, what: str) -> tuple[torch.device, torch.dtype]:
    """Set up logging; the device and dtype asked for, float32 (with a warning) on the CPU."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = torch.device(args.device)
    if device.type == "cpu":
        logger.warning("no CUDA device: benchmarking the tiny %s on the CPU (not representative)", what)
        return device, torch.float32
    return device, getattr(torch, args.dtype)
