"""Runpod serverless entry point of the Hallo3 talking-head worker.

``handler`` is the async Runpod handler; importing this module loads nothing heavy. Run as a
script, it loads the settings and the pipeline once, then hands control to
``runpod.serverless.start``:

* ``python handler.py``: runs the job in ``test_input.json`` (current folder) and exits;
* ``python handler.py --rp_serve_api [--rp_api_port 8000]``: serves ``/runsync``, ``/run`` and
  ``/status`` locally;
* on Runpod (``CMD python -u handler.py``): takes jobs from the queue.

The command line (the Runpod SDK's own options, ``--help``) and a local run's job file are checked
before the model loads, so a typo or a missing ``test_input.json`` is reported at once.

With several GPUs (``HALLO3_GPUS``) this process is rank 0 and starts one process per further
GPU; they share each segment's denoising. If one of them stops or hangs, the job fails with
``GPU_ERROR`` and ``refresh_worker``, and this process ends the others and exits with status 1
so that the platform replaces the worker.

The job schema is documented in ``docs/api.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence
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


def build_parser() -> argparse.ArgumentParser:
    """The command line: the Runpod SDK's options (``runpod.serverless`` reads them again in ``start``)."""
    parser = argparse.ArgumentParser(
        prog="handler.py",
        description="Hallo3 talking-head worker. Without options it runs the job in ./test_input.json and "
                    "exits (0 on success); on Runpod it takes jobs from the endpoint's queue.",
        epilog="Settings come from HALLO3_* environment variables (docs/api.md).",
    )
    parser.add_argument("--rp_serve_api", action="store_true", help="serve /runsync, /run and /status locally")
    parser.add_argument("--rp_api_host", metavar="HOST", default="localhost",
                        help="address of the local API (default localhost; 0.0.0.0 inside Docker)")
    parser.add_argument("--rp_api_port", type=int, metavar="PORT", default=8000, help="its port (default 8000)")
    parser.add_argument("--rp_api_concurrency", type=int, metavar="N", default=1, help="its worker count")
    parser.add_argument("--rp_log_level", choices=["ERROR", "WARN", "INFO", "DEBUG"], help="the SDK's log level")
    parser.add_argument("--rp_debugger", action="store_true", help="the SDK's debugger output")
    parser.add_argument("--test_input", metavar="JSON",
                        help='run this job instead of test_input.json: \'{"input": {...}}\'')
    return parser


def _local_job_problem(args: argparse.Namespace, takes_queued_jobs: bool) -> str | None:
    """Why the local test job cannot run (checked before the model loads), or None."""
    if args.rp_serve_api or takes_queued_jobs:
        return None
    if args.test_input is not None:
        text, where = args.test_input, "--test_input"
    else:
        path = Path("test_input.json")
        if not path.is_file():
            return (f"test_input.json not found in {Path.cwd()}: run from a folder that has one, pass the job "
                    "with --test_input '{\"input\": {...}}', or serve the local API with --rp_serve_api")
        try:
            text, where = path.read_text(encoding="utf-8"), str(path.resolve())
        except (OSError, UnicodeDecodeError) as err:
            return f"test_input.json cannot be read: {err}"
    try:
        job = json.loads(text)
    except ValueError as err:
        return f"{where} is not JSON: {err}"
    if not isinstance(job, dict) or not isinstance(job.get("input"), dict):
        return f'{where} must hold a job: {{"input": {{"image": ..., "audio": ...}}}}'
    return None


def main(argv: Sequence[str] | None = None) -> None:
    """Check the command line and the local job, check fitness (on the platform), load the model, start Runpod."""
    args = build_parser().parse_args(argv)  # --help and bad options end here, before anything loads
    from hallo3_worker.settings import load_settings
    from hallo3_worker.worker.runtime import configure_logging

    settings = load_settings()
    configure_logging(settings)
    problem = _local_job_problem(args, settings.takes_queued_jobs)
    if problem is not None:
        logger.error("%s", problem)
        raise SystemExit(1)

    import runpod

    from hallo3_worker.worker.ranks import serving_settings, start_ranks
    from hallo3_worker.worker.runtime import check_fitness_before_loading

    global _worker, _ranks
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
