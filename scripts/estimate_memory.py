"""Print the device memory each stage of a full-size Hallo3 job needs (no GPU needed).

Tensor sizes are computed under FakeTensorMode (see ``hallo3_worker.memory``); the totals for each
offload policy add the weights kept on the device and the allowance for the CUDA context and
allocator that ``hallo3_worker.fitness`` uses. These are estimates from the code, not measurements.

    python scripts/estimate_memory.py [--dtype bfloat16] [--max-duration-s 60] [--output out/memory.json]
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from benchutil import emit_report

from hallo3_worker import fitness
from hallo3_worker.memory import GIB, estimate_stage_memory

logger = logging.getLogger("estimate_memory")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--max-duration-s", type=float, default=60.0)
    parser.add_argument("--output", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    start = time.perf_counter()
    dtype = getattr(torch, args.dtype)
    stages = estimate_stage_memory(dtype=dtype, max_duration_s=args.max_duration_s)
    sliced = estimate_stage_memory(
        dtype=dtype, stages=["denoise"], feed_forward_chunk=fitness.FULL_OFFLOAD_FEED_FORWARD_CHUNK
    )
    stages["denoise_chunked"] = sliced["denoise"]
    logger.info("estimated in %.1f s", time.perf_counter() - start)
    report = {
        "dtype": args.dtype,
        "stages_gib": {
            name: {"weights": round(s.weights / GIB, 3), "activations": round(s.activations / GIB, 3)}
            for name, s in stages.items()
        },
        "fitness_estimate_gib": {
            policy: round(fitness.estimate_gpu_bytes(policy) / GIB, 2) for policy in fitness.OFFLOAD_POLICIES
        },
    }
    emit_report(report, args.output)


if __name__ == "__main__":
    main()
