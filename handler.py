"""Runpod serverless entry point of the Hallo3 talking-head worker.

``handler`` is the async Runpod handler; importing this module loads nothing heavy. Run as a
script, it loads the settings and the pipeline once, then hands control to
``runpod.serverless.start``:

* ``python handler.py``: runs the job in ``test_input.json`` (current folder) and exits;
* ``python handler.py --rp_serve_api [--rp_api_port 8000]``: serves ``/runsync``, ``/run`` and
  ``/status`` locally;
* on Runpod (``CMD python -u handler.py``): takes jobs from the queue.

The job schema is documented in ``docs/api.md``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

try:
    import hallo3_worker  # noqa: F401  (installed package)
except ImportError:  # a plain checkout: use the sources next to this file
    sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

from hallo3_worker.worker.runtime import configure_sdk_logging
from hallo3_worker.worker.service import Worker, create_worker

_worker: Worker | None = None


def get_worker() -> Worker:
    """The process's worker, created (settings read, pipeline loaded) on first use."""
    global _worker
    if _worker is None:
        _worker = create_worker()
    return _worker


async def handler(job: dict[str, Any]) -> dict[str, Any]:
    """Runpod handler: one job in, ``{"video", ...}`` or ``{"error", "error_code"}`` out."""
    return await get_worker().handle(job)


def main() -> None:
    """Check fitness (on the platform), load the model before the first job, start the Runpod loop."""
    import runpod

    from hallo3_worker.settings import load_settings
    from hallo3_worker.worker.runtime import check_fitness_before_loading, configure_logging

    global _worker
    settings = load_settings()
    configure_logging(settings)
    check_fitness_before_loading(settings)  # exits with the reason when the worker cannot serve
    _worker = create_worker(settings)
    configure_sdk_logging(settings)
    runpod.serverless.start({"handler": handler})


if __name__ == "__main__":
    main()
