"""Run one job through the worker in-process and save the video.

    python scripts/run_job.py test_input.json out/demo.mp4 [--ranks N] [--frames out/frames.npy]

Reads settings from the environment like the deployed worker (with no weights configured it runs
the embedded tiny model), runs the job in the JSON file (``{"input": {...}}``), writes the MP4 when
it comes back inline and prints the result without the video payload. Exits 1 on a job error.

``--ranks N`` shares the denoising among N processes (one GPU each on CUDA, gloo processes on the
CPU) as ``HALLO3_GPUS`` does for the deployed worker; without it ``HALLO3_GPUS`` applies.
``--frames`` also saves the frames the pipeline handed on, before encoding, as one uint8 array.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import sys
from pathlib import Path

import numpy as np

from hallo3_worker.settings import load_settings
from hallo3_worker.worker.ranks import serving_settings, start_ranks
from hallo3_worker.worker.service import Worker, create_worker

logger = logging.getLogger("run_job")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job", type=Path, help="JSON file holding {'input': {...}}")
    parser.add_argument("output", type=Path, help="where to write the MP4")
    parser.add_argument("--ranks", type=int, help="processes that share the denoising (default: HALLO3_GPUS)")
    parser.add_argument("--frames", type=Path, help="also save the frames before encoding (.npy, uint8 N x H x W x 3)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    job = json.loads(args.job.read_text())
    job.setdefault("id", "local-" + args.job.stem)
    settings = load_settings()
    ranks = start_ranks(settings, args.ranks)
    try:
        worker = create_worker(serving_settings(settings, ranks))
        if ranks is not None:
            ranks.attach(worker.pipeline)
        frames = _capture_frames(worker) if args.frames else None
        result = worker.run(job)
    finally:
        if ranks is not None:
            ranks.close()
    if "error" in result:
        logger.error("job failed: %s (%s)", result["error"], result.get("error_code"))
        return 1
    if frames is not None:
        args.frames.parent.mkdir(parents=True, exist_ok=True)
        np.save(args.frames, np.concatenate(frames))
    summary = {k: v for k, v in result.items() if k != "video"}
    if result["video_type"] == "base64":
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_bytes(base64.b64decode(result["video"]))
        summary["video"] = str(args.output)
    else:
        summary["video"] = result["video"]
        logger.info("the video was uploaded; nothing written to %s", args.output)
    print(json.dumps(summary, indent=2))  # the script's result
    return 0


def _capture_frames(worker: Worker) -> list[np.ndarray]:
    """Keep a copy of every segment's frames the pipeline hands on to the worker's encoder."""
    kept: list[np.ndarray] = []
    generate = worker.pipeline.generate

    def generate_keeping(job, *args, on_frames=None, **kwargs):
        def sink(done) -> None:
            kept.append(done.frames.copy())
            if on_frames is not None:
                on_frames(done)

        return generate(job, *args, on_frames=sink, **kwargs)

    worker.pipeline.generate = generate_keeping
    return kept


if __name__ == "__main__":
    sys.exit(main())
