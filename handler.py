"""Runpod serverless entry point of the Hallo3 talking-head worker.

``handler`` is the async Runpod handler; importing this module loads nothing heavy. Run as a
script, it loads the settings and the pipeline once, then hands control to
``runpod.serverless.start``:

* ``python handler.py``: runs the job in ``test_input.json`` (current folder) and exits;
* ``python handler.py --rp_serve_api [--rp_api_port 8000]``: serves ``/runsync``, ``/run`` and
  ``/status`` locally;
* on Runpod (``CMD python -u handler.py``): takes jobs from the queue.

With several GPUs (``HALLO3_GPUS``) this process is rank 0 and starts one process per further
GPU; they share each segment's denoising. If one of them stops or hangs, the job fails with
``GPU_ERROR`` and ``refresh_worker``, and this process ends the others and exits with status 1
so that the platform replaces the worker.

The job schema is documented in ``docs/api.md``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

try:
    import hallo3_worker  # noqa: F401  (installed package)
except ImportError:  # a plain checkout: use the sources next to this file
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from hallo3_worker.worker.runtime import configure_sdk_logging
from hallo3_worker.worker.service import Worker, create_worker

if TYPE_CHECKING:
    from hallo3_worker.worker.ranks import Ranks

logger = logging.getLogger("hallo3_worker.handler")
_worker: Worker | None = None
_ranks: Ranks | None = None  # the other GPUs' processes, when there are several
#: After the GPU processes failed: time for the SDK to post the failed job before the process exits.
FAULT_EXIT_DELAY_S = 10.0


def get_worker() -> Worker:
    """The process's worker, created (settings read, pipeline loaded) on first use."""
    global _worker
    if _worker is None:
        _worker = create_worker()
    return _worker


async def handler(job: dict[str, Any]) -> dict[str, Any]:
    """Runpod handler: one job in, ``{"video", ...}`` or ``{"error", "error_code"}`` out."""
    result = await get_worker().handle(job)
    if _ranks is not None and _ranks.failure is not None:
        logger.error("the GPU processes failed (%s); exiting in %g s", _ranks.failure, FAULT_EXIT_DELAY_S)
        asyncio.get_running_loop().call_later(FAULT_EXIT_DELAY_S, _exit_after_fault)
    return result


def _exit_after_fault() -> None:
    """End the other ranks and this process with status 1: the platform starts a fresh worker."""
    if _ranks is not None:
        _ranks.close()
    logging.shutdown()
    os._exit(1)


def main() -> None:
    """Check fitness (on the platform), load the model before the first job, start the Runpod loop."""
    import runpod

    from hallo3_worker.settings import load_settings
    from hallo3_worker.worker.ranks import serving_settings, start_ranks
    from hallo3_worker.worker.runtime import check_fitness_before_loading, configure_logging

    global _worker, _ranks
    settings = load_settings()
    configure_logging(settings)
    check_fitness_before_loading(settings)  # exits with the reason when the worker cannot serve
    _ranks = start_ranks(settings)  # HALLO3_GPUS: the other GPUs' processes, or None for one GPU
    try:
        _worker = create_worker(serving_settings(settings, _ranks))
        if _ranks is not None:
            _ranks.attach(_worker.pipeline)
        configure_sdk_logging(settings)
        runpod.serverless.start({"handler": handler})
    finally:
        if _ranks is not None:
            _ranks.close()


if __name__ == "__main__":
    main()
