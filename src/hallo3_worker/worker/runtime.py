"""Start-up of the worker process: logging and the one pipeline it serves.

:func:`load_pipeline` is the only place that decides which
:class:`~hallo3_worker.interface.TalkingHeadPipeline` the worker runs; the rest of the worker only
sees the interface.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from hallo3_worker.conditioning.decode import InputLimits
from hallo3_worker.interface import TalkingHeadPipeline
from hallo3_worker.settings import Settings

if TYPE_CHECKING:
    import torch

    from hallo3_worker.models.speedups import ExactSpeedups
    from hallo3_worker.pipeline import Placement

logger = logging.getLogger(__name__)

TINY_MODEL_WARNING = (
    "No Hallo3 weights are configured (HALLO3_WEIGHTS_DIR is unset): this worker runs the embedded "
    "tiny random-weight model, so the video is not a real talking head."
)
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_SDK_LEVELS = {"DEBUG": "DEBUG", "INFO": "INFO", "WARNING": "WARN", "ERROR": "ERROR", "CRITICAL": "ERROR"}


def configure_logging(settings: Settings) -> None:
    """Send the package's log records to stderr at ``settings.log_level`` (idempotent).

    transformers (and huggingface_hub) draw progress bars while they load or save a model ("Loading
    weights", "Writing model shards"); like audio-separator's, they are drawn at DEBUG only.
    """
    from transformers.utils import logging as transformers_logging

    package = logging.getLogger("hallo3_worker")
    package.setLevel(settings.log_level)
    if not any(getattr(h, "_hallo3", False) for h in package.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_LOG_FORMAT))
        handler._hallo3 = True  # type: ignore[attr-defined]
        package.addHandler(handler)
        package.propagate = False
    if settings.log_level == "DEBUG":
        transformers_logging.enable_progress_bar()
    else:
        transformers_logging.disable_progress_bar()


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


def resolve_offload(
    settings: Settings,
    device: torch.device,
    *,
    memory_info: Callable[[int], tuple[int, int, str] | None] | None = None,
) -> str:
    """The offload policy to run with (``HALLO3_OFFLOAD``): ``off``, ``partial`` or ``full``.

    An explicit policy is taken as given. ``auto`` picks, on a CUDA GPU, the first of ``off``,
    ``partial``, ``full`` whose estimated peak (:func:`hallo3_worker.fitness.estimate_gpu_bytes`)
    fits the free memory, and ``full`` when none does; on the CPU there is nothing to offload
    (``off``); other accelerators, whose free memory is not read, get ``partial``.
    ``memory_info(index)`` returns (free, total, name) and defaults to the CUDA driver's numbers.
    """
    if settings.offload != "auto":
        return settings.offload
    if device.type == "cpu":
        return "off"
    if device.type != "cuda":
        return "partial"
    from hallo3_worker import fitness

    info = (memory_info or fitness.cuda_memory)(device.index if device.index is not None else 0)
    free = info[0] if info is not None else 0
    needs = {policy: fitness.estimate_gpu_bytes(policy) for policy in fitness.OFFLOAD_POLICIES}
    policy = next((p for p in fitness.OFFLOAD_POLICIES if needs[p] <= free), fitness.OFFLOAD_POLICIES[-1])
    logger.info(
        "HALLO3_OFFLOAD=auto chose %s: %.1f GiB free; estimated peaks %s",
        policy,
        free / fitness.GIB,
        ", ".join(f"{p} {needs[p] / fitness.GIB:.1f} GiB" for p in fitness.OFFLOAD_POLICIES),
    )
    return policy


def placement_for(device: torch.device, dtype: torch.dtype, policy: str) -> Placement:
    """The :class:`~hallo3_worker.pipeline.Placement` that carries out an offload policy."""
    from hallo3_worker.fitness import FULL_OFFLOAD_FEED_FORWARD_CHUNK
    from hallo3_worker.pipeline import Placement

    return Placement(
        device=device,
        dtype=dtype,
        offload=policy != "off",
        offload_transformer=policy == "full",
        feed_forward_chunk=FULL_OFFLOAD_FEED_FORWARD_CHUNK if policy == "full" else None,
    )


def input_limits(settings: Settings) -> InputLimits:
    """The media checks of :func:`~hallo3_worker.conditioning.decode.decode_inputs`, from the settings."""
    return InputLimits(
        min_image_side=settings.min_image_side,
        soft_image_side=settings.soft_image_side,
        max_image_pixels=settings.max_image_pixels,
        max_duration_s=settings.max_duration_s,
        min_duration_s=settings.min_duration_s,
        silence_dbfs=settings.silence_dbfs,
    )


def load_pipeline(settings: Settings) -> TalkingHeadPipeline:
    """Build the pipeline once, at start-up.

    Without ``settings.weights_dir`` the worker serves the embedded tiny random-weight model (the
    real pipeline code with tiny networks). With weights configured (a folder, or ``auto`` to
    search the cached-models folder, the network volume and the image, see
    :func:`hallo3_worker.weights.locate_weights`), the real Hallo3 pipeline is loaded from them;
    missing, incomplete or corrupt weights raise :class:`~hallo3_worker.weights.WeightsError`
    naming the file, so the worker stops at start-up instead of serving something else.
    """
    device = resolve_device(settings)
    placement = placement_for(device, resolve_dtype(settings, device), resolve_offload(settings, device))
    limits = input_limits(settings)
    if settings.weights_dir is None:
        from hallo3_worker.tiny import build_tiny_pipeline

        logger.warning(TINY_MODEL_WARNING)
        return build_tiny_pipeline(None, placement, limits=limits, speedups=speedups_for(settings, device))
    from hallo3_worker.pipeline_factory import build_pipeline_from_weights
    from hallo3_worker.weights import locate_weights

    location = locate_weights(settings.weights_dir)
    return build_pipeline_from_weights(location, placement, limits=limits, speedups=speedups_for(settings, device))


def speedups_for(settings: Settings, device: torch.device) -> ExactSpeedups:
    """The exact speed-ups the settings ask for (HALLO3_COMPILE, HALLO3_ATTENTION); the rest are always on.

    Raises SettingsError when the attention backend asked for cannot run on ``device``.
    """
    from hallo3_worker.models.attention import choose_backend
    from hallo3_worker.models.speedups import ExactSpeedups
    from hallo3_worker.settings import SettingsError

    try:
        choose_backend(settings.attention, device)
    except ValueError as err:
        raise SettingsError(f"HALLO3_ATTENTION={settings.attention}: {err}") from None
    compile_blocks = {"auto": None, "on": True, "off": False}[settings.compile]
    return ExactSpeedups(compile_blocks=compile_blocks, attention=settings.attention)


# ------------------------------------------------------------------------------------------ fitness

#: Name of the GPU-memory check of :func:`hallo3_worker.fitness.fitness_checks`.
_GPU_MEMORY_CHECK = "hallo3_gpu_memory"


def startup_fitness_checks(settings: Settings, device: torch.device | None = None) -> list[Callable[[], str]]:
    """The fitness checks to run before the model loads: none unless on the platform with real weights.

    On Runpod (``settings.on_platform``) with ``settings.weights_dir`` set: the weights are complete
    (sizes), the video encoders work, and the CUDA GPU has the memory the model needs. The GPU
    check runs when the pipeline's device is a CUDA GPU, and also when ``HALLO3_DEVICE`` is
    ``auto`` but no accelerator was found (then it fails: real weights on the platform are not
    served from the CPU unless ``HALLO3_DEVICE=cpu`` asks for it). ``device`` defaults to the one
    :func:`resolve_device` picks.
    """
    if not settings.on_platform or settings.weights_dir is None:
        return []
    from hallo3_worker.fitness import FitnessConfig, fitness_checks

    device = device if device is not None else resolve_device(settings)
    wants_gpu = device.type == "cuda" or (settings.device == "auto" and device.type == "cpu")
    config = FitnessConfig(
        weights_dir=settings.weights_dir,
        require_cuda=wants_gpu,
        offload="full" if settings.offload == "auto" else settings.offload,  # auto needs at least what full needs
        device_index=device.index if device.index is not None else 0,
    )
    checks = fitness_checks(config)
    if not wants_gpu:
        checks = [check for check in checks if check.__name__ != _GPU_MEMORY_CHECK]
    return checks


def check_fitness_before_loading(settings: Settings) -> list[str]:
    """Run :func:`startup_fitness_checks`; a failure logs why and exits the process.

    Returns the checks' messages (empty when none apply). Raises ``SystemExit`` with the reason
    when a check fails, before the model is loaded. The checks are run here rather than registered
    with ``runpod.serverless.register_fitness_check``: the SDK runs registered checks inside
    ``start()``, after the model load, where a free-GPU-memory check would count the memory the
    model already holds.
    """
    from hallo3_worker.fitness import FitnessError, run_fitness_checks

    checks = startup_fitness_checks(settings)
    if not checks:
        return []
    try:
        return run_fitness_checks(checks)
    except FitnessError as exc:
        logger.error("fitness check failed, the worker will not start: %s", exc)
        raise SystemExit(f"Hallo3 worker is not fit to serve jobs: {exc}") from exc
