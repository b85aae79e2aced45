"""Start-up of the worker process: logging and the one pipeline it serves.

:func:`load_pipeline` is the only place that decides which
:class:`~hallo3_worker.interface.TalkingHeadPipeline` the worker runs; the rest of the worker only
sees the interface.
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING

from hallo3_worker.interface import TalkingHeadPipeline
from hallo3_worker.settings import Settings

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

TINY_MODEL_WARNING = (
    "No Hallo3 weights are configured (HALLO3_WEIGHTS_DIR is unset): this worker runs the embedded "
    "tiny random-weight model, so the video is not a real talking head."
)
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_SDK_LEVELS = {"DEBUG": "DEBUG", "INFO": "INFO", "WARNING": "WARN", "ERROR": "ERROR", "CRITICAL": "ERROR"}


def configure_logging(settings: Settings) -> None:
    """Send the package's log records to stderr at ``settings.log_level`` (idempotent)."""
    package = logging.getLogger("hallo3_worker")
    package.setLevel(settings.log_level)
    if not any(getattr(h, "_hallo3", False) for h in package.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_LOG_FORMAT))
        handler._hallo3 = True  # type: ignore[attr-defined]
        package.addHandler(handler)
        package.propagate = False


def configure_sdk_logging(settings: Settings) -> None:
    """Apply ``settings.log_level`` to the Runpod SDK's own logger.

    The SDK defaults to DEBUG, where it prints every job's input and output (base64 media,
    presigned URLs); at INFO and above it does not. ``--rp_log_level`` still overrides this.
    """
    from runpod.serverless.modules.rp_logger import RunPodLogger

    RunPodLogger().set_level(_SDK_LEVELS[settings.log_level])


def resolve_device(settings: Settings) -> torch.device:
    """``settings.device`` as a torch device; ``auto`` is the current accelerator, else the CPU."""
    import torch

    if settings.device != "auto":
        return torch.device(settings.device)
    if torch.accelerator.is_available():
        accelerator = torch.accelerator.current_accelerator()
        if accelerator is not None:
            return accelerator
    return torch.device("cpu")


def resolve_dtype(settings: Settings, device: torch.device) -> torch.dtype:
    """``settings.dtype`` as a torch dtype; ``auto`` is bfloat16 on an accelerator, float32 on the CPU."""
    import torch

    if settings.dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    dtype = getattr(torch, settings.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"HALLO3_DTYPE {settings.dtype!r} is not a torch dtype name")
    return dtype


def load_pipeline(settings: Settings) -> TalkingHeadPipeline:
    """Build the pipeline once, at start-up.

    Without ``settings.weights_dir`` the worker serves the embedded tiny random-weight model (the
    real pipeline code with tiny networks). With weights configured, the real Hallo3 pipeline is
    required: a worker that was told to serve real weights refuses to start rather than quietly
    serve something else.
    """
    from hallo3_worker.pipeline import InputLimits, Placement

    device = resolve_device(settings)
    placement = Placement(device=device, dtype=resolve_dtype(settings, device))
    limits = InputLimits(
        min_image_side=settings.min_image_side,
        max_image_pixels=settings.max_image_pixels,
        max_duration_s=settings.max_duration_s,
        min_duration_s=settings.min_duration_s,
        silence_dbfs=settings.silence_dbfs,
    )
    if settings.weights_dir is None:
        from hallo3_worker.tiny import build_tiny_pipeline

        logger.warning(TINY_MODEL_WARNING)
        return build_tiny_pipeline(None, placement, limits=limits)
    raise RuntimeError(
        f"HALLO3_WEIGHTS_DIR is set to {settings.weights_dir}, but loading the real Hallo3 weights is not "
        "wired into this build yet; unset HALLO3_WEIGHTS_DIR to run the tiny model."
    )
