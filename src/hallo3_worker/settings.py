"""Every environment-driven setting of the worker, read once at start-up.

:func:`load_settings` reads ``os.environ`` (or any mapping handed to it) a single time and returns a
frozen :class:`Settings`. Nothing else in the package reads the environment for configuration;
tests build :class:`Settings` directly (``Settings(work_dir=..., ...)``) or through
``load_settings({...})``.

Variables (all optional):

=================================  ==========================================================
``HALLO3_WEIGHTS_DIR``             Folder with the real Hallo3 weights. Unset: tiny model.
``HALLO3_WORK_DIR``                Base folder for per-job temporary folders.
``HALLO3_VOLUME_ROOT``             Network volume root that job paths may point into.
``HALLO3_MAX_IMAGE_BYTES``         Largest accepted image file.
``HALLO3_MAX_AUDIO_BYTES``         Largest accepted audio file.
``HALLO3_MAX_IMAGE_PIXELS``        Largest accepted image area (width x height).
``HALLO3_MIN_IMAGE_SIDE``          Smallest accepted image side, in pixels.
``HALLO3_SOFT_IMAGE_SIDE``         Images with a shorter side are accepted with a warning that the
                                   video will be soft.
``HALLO3_MAX_DURATION_S``          Longest audio the server renders, in seconds.
``HALLO3_MIN_DURATION_S``          Shortest audio accepted, in seconds.
``HALLO3_SILENCE_DBFS``            RMS level (dBFS) at or below which audio counts as silent.
``HALLO3_INLINE_OUTPUT_MAX_BYTES`` Largest base64 text returned inline in the job result.
``HALLO3_DOWNLOAD_TIMEOUT_S``      Connect/read timeout for media downloads: the longest silence.
``HALLO3_DOWNLOAD_DEADLINE_S``     The longest one media download may take in all, retries included.
``HALLO3_BUCKET_CONNECT_TIMEOUT_S`` Connect timeout of every bucket request (uploads).
``HALLO3_BUCKET_READ_TIMEOUT_S``   Read timeout of every bucket request: the longest silence.
``HALLO3_BUCKET_MAX_ATTEMPTS``     Attempts per bucket request, the first included.
``HALLO3_INLINE_MIN_KBPS``         Lowest video bitrate an inline result may be capped to.
``HALLO3_DISK_RESERVE_MB``         Free space kept on the work disk beyond a job's estimated need.
``HALLO3_VIDEO_CRF``               libx264 constant rate factor of the output.
``HALLO3_VIDEO_PRESET``            libx264 preset of the output.
``HALLO3_CANCEL_GRACE_S``          How long a cancelled job may take to stop and clean up.
``HALLO3_DEVICE``                  Torch device name for the pipeline (``auto`` picks one).
``HALLO3_DTYPE``                   Torch dtype name for the pipeline (``auto`` picks one).
``HALLO3_OFFLOAD``                 What waits in CPU memory between uses: ``off`` (nothing),
                                   ``partial`` (reference network and T5), ``full`` (also the main
                                   transformer), or ``auto``: the first that fits the GPU.
``HALLO3_JOB_STATE_DIR``           Where long jobs save their progress after every segment, so that a
                                   job that comes back resumes (``off`` disables it). Default: a
                                   ``hallo3-job-state`` folder on the network volume when one is
                                   mounted, otherwise off.
``HALLO3_JOB_STATE_MAX_AGE_H``     Saved progress untouched this long is removed (hours).
``HALLO3_COMPILE``                 Regional ``torch.compile`` of the transformer blocks: ``auto`` (on
                                   for CUDA GPUs, compiled once at start-up), ``on`` or ``off``.
``HALLO3_ATTENTION``               Attention kernel: ``auto`` (FlashAttention-3 on Hopper when
                                   installed, else cuDNN, else PyTorch's choice) or one of ``sdpa``,
                                   ``cudnn``, ``flash``, ``efficient``, ``math``, ``fa3``.
``HALLO3_GPUS``                    GPUs one worker uses, one process each: ``auto`` (every visible
                                   GPU) or a number. Several share each segment's denoising.
``HALLO3_PARALLEL``                How several GPUs split the work: ``auto`` or ``<cfg>x<ulysses>``
                                   (``2x4``: the guided batch's two halves, each split 4 ways).
``HALLO3_COLLECTIVE_TIMEOUT_S``    With several GPUs: how long one exchange between them may take
                                   before the job fails and the worker restarts (seconds).
``HALLO3_PRESETS``                 Speed presets jobs may ask for, comma-separated, from ``exact``,
                                   ``balanced``, ``fast`` (default: all three; ``exact`` is always
                                   allowed: it is the default).
``HALLO3_FAST_CACHE_THRESHOLD``    ``fast``: default step-cache threshold (0 to 0.3; 0 turns the
                                   cache off).
``HALLO3_FAST_CFG_FRACTION``       ``fast``: default share of the steps that run classifier-free
                                   guidance in full (0.4 to 1; 1 turns the truncation off).
``HALLO3_LOG_LEVEL``               Log level, also applied to the Runpod SDK's logger (falls back to
                                   ``RUNPOD_LOG_LEVEL``, ``RUNPOD_DEBUG_LEVEL``, then INFO).
``BUCKET_ENDPOINT_URL``            S3-compatible endpoint for result upload (Runpod convention).
``BUCKET_ACCESS_KEY_ID``           Access key for that endpoint.
``BUCKET_SECRET_ACCESS_KEY``       Secret key for that endpoint.
``BUCKET_NAME``                    Bucket the results go to (required for env-based upload).
``BUCKET_PREFIX``                  Optional key prefix inside the bucket.
``RUNPOD_WEBHOOK_POST_OUTPUT``     Set by the platform; its presence enables progress updates.
=================================  ==========================================================
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path

logger = logging.getLogger(__name__)

MIB = 1024 * 1024
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
#: HALLO3_OFFLOAD values: "auto" or one of hallo3_worker.fitness.OFFLOAD_POLICIES.
OFFLOAD_CHOICES = ("auto", "off", "partial", "full")
COMPILE_CHOICES = ("auto", "on", "off")
#: HALLO3_ATTENTION values: "auto" or one of hallo3_worker.models.attention.BACKENDS.
ATTENTION_CHOICES = ("auto", "sdpa", "cudnn", "flash", "efficient", "math", "fa3")
#: Speed presets (hallo3_worker.interface.Preset values), and the safe ranges of the "fast" knobs
#: that both the endpoint settings and a job's input must stay within.
PRESET_CHOICES = ("exact", "balanced", "fast")
CACHE_THRESHOLD_RANGE = (0.0, 0.3)
CFG_FRACTION_RANGE = (0.4, 1.0)


class SettingsError(ValueError):
    """An environment variable holds a value the worker cannot use."""


@dataclasses.dataclass(frozen=True)
class BucketSettings:
    """Credentials and location of an S3-compatible bucket (from ``BUCKET_*``)."""

    endpoint_url: str
    access_key_id: str
    secret_access_key: str
    bucket_name: str
    prefix: str = ""

    def __repr__(self) -> str:  # keep secrets out of logs and tracebacks
        return f"BucketSettings(endpoint_url={self.endpoint_url!r}, bucket_name={self.bucket_name!r})"


@dataclasses.dataclass(frozen=True)
class Settings:
    """All settings of the worker. Defaults are the production defaults."""

    weights_dir: Path | None = None
    work_dir: Path = dataclasses.field(default_factory=lambda: Path(tempfile.gettempdir()) / "hallo3-worker")
    volume_root: Path = Path("/runpod-volume")
    max_image_bytes: int = 20 * MIB
    max_audio_bytes: int = 64 * MIB
    max_image_pixels: int = 40_000_000
    min_image_side: int = 64
    soft_image_side: int = 256
    max_duration_s: float = 60.0
    min_duration_s: float = 0.5
    silence_dbfs: float = -60.0
    inline_output_max_bytes: int = 9_000_000  # base64 characters; /run accepts 10 MB in all
    download_timeout_s: float = 30.0
    download_deadline_s: float = 120.0
    bucket_connect_timeout_s: float = 5.0
    bucket_read_timeout_s: float = 10.0
    bucket_max_attempts: int = 2
    inline_min_kbps: float = 300.0
    disk_reserve_mb: float = 100.0
    video_crf: int = 18
    video_preset: str = "medium"
    cancel_grace_s: float = 30.0
    device: str = "auto"
    dtype: str = "auto"
    offload: str = "auto"
    log_level: str = "INFO"
    bucket: BucketSettings | None = None
    on_platform: bool = False
    takes_queued_jobs: bool = False  # the SDK takes jobs from Runpod's queue (else: one local test job)
    job_state_dir: Path | None = None
    job_state_max_age_h: float = 72.0
    job_state_stale_after_s: float = 900.0  # a lock on another host not refreshed for this long is abandoned
    compile: str = "auto"
    attention: str = "auto"
    gpus: str = "auto"
    parallel: str = "auto"
    collective_timeout_s: float = 300.0
    presets: tuple[str, ...] = PRESET_CHOICES
    fast_cache_threshold: float = 0.1
    fast_cfg_fraction: float = 0.6

    def __post_init__(self) -> None:
        _require(self.max_image_bytes > 0, "HALLO3_MAX_IMAGE_BYTES must be positive")
        _require(self.max_audio_bytes > 0, "HALLO3_MAX_AUDIO_BYTES must be positive")
        _require(self.max_image_pixels > 0, "HALLO3_MAX_IMAGE_PIXELS must be positive")
        _require(self.min_image_side > 0, "HALLO3_MIN_IMAGE_SIDE must be positive")
        _require(self.soft_image_side >= 0, "HALLO3_SOFT_IMAGE_SIDE must be >= 0")
        _require(
            0 < self.min_duration_s <= self.max_duration_s,
            "HALLO3_MIN_DURATION_S must be positive and not above HALLO3_MAX_DURATION_S",
        )
        _require(self.inline_output_max_bytes >= 0, "HALLO3_INLINE_OUTPUT_MAX_BYTES must be >= 0")
        _require(self.download_timeout_s > 0, "HALLO3_DOWNLOAD_TIMEOUT_S must be positive")
        _require(self.download_deadline_s > 0, "HALLO3_DOWNLOAD_DEADLINE_S must be positive")
        _require(self.bucket_connect_timeout_s > 0, "HALLO3_BUCKET_CONNECT_TIMEOUT_S must be positive")
        _require(self.bucket_read_timeout_s > 0, "HALLO3_BUCKET_READ_TIMEOUT_S must be positive")
        _require(1 <= self.bucket_max_attempts <= 10, "HALLO3_BUCKET_MAX_ATTEMPTS must be between 1 and 10")
        _require(self.inline_min_kbps > 0, "HALLO3_INLINE_MIN_KBPS must be positive")
        _require(self.disk_reserve_mb >= 0, "HALLO3_DISK_RESERVE_MB must be >= 0")
        _require(0 <= self.video_crf <= 51, "HALLO3_VIDEO_CRF must be between 0 and 51")
        _require(self.cancel_grace_s >= 0, "HALLO3_CANCEL_GRACE_S must be >= 0")
        _require(self.offload in OFFLOAD_CHOICES, f"HALLO3_OFFLOAD must be one of {', '.join(OFFLOAD_CHOICES)}")
        _require(self.log_level in _LOG_LEVELS, f"log level must be one of {', '.join(_LOG_LEVELS)}")
        _require(self.work_dir.is_absolute(), "HALLO3_WORK_DIR must be an absolute path")
        _require(self.volume_root.is_absolute(), "HALLO3_VOLUME_ROOT must be an absolute path")
        _require(self.job_state_dir is None or self.job_state_dir.is_absolute(),
                 "HALLO3_JOB_STATE_DIR must be an absolute path or 'off'")
        _require(self.job_state_max_age_h > 0, "HALLO3_JOB_STATE_MAX_AGE_H must be positive")
        _require(self.compile in COMPILE_CHOICES, f"HALLO3_COMPILE must be one of {', '.join(COMPILE_CHOICES)}")
        _require(self.attention in ATTENTION_CHOICES, f"HALLO3_ATTENTION must be one of {', '.join(ATTENTION_CHOICES)}")
        _require(self.gpus == "auto" or (self.gpus.isdigit() and int(self.gpus) >= 1),
                 f"HALLO3_GPUS must be 'auto' or a number of GPUs (1 or more), got {self.gpus!r}")
        _require(self.parallel == "auto" or re.fullmatch(r"[12]x[1-9][0-9]*", self.parallel) is not None,
                 f"HALLO3_PARALLEL must be 'auto' or '<cfg>x<ulysses>', cfg 1 or 2 (2x4), got {self.parallel!r}")
        _require(self.collective_timeout_s > 0, "HALLO3_COLLECTIVE_TIMEOUT_S must be positive")
        _require(bool(self.presets) and set(self.presets) <= set(PRESET_CHOICES) and "exact" in self.presets,
                 f"HALLO3_PRESETS must name presets from {', '.join(PRESET_CHOICES)}, including exact")
        _require(CACHE_THRESHOLD_RANGE[0] <= self.fast_cache_threshold <= CACHE_THRESHOLD_RANGE[1],
                 "HALLO3_FAST_CACHE_THRESHOLD must be between {:g} and {:g}".format(*CACHE_THRESHOLD_RANGE))
        _require(CFG_FRACTION_RANGE[0] <= self.fast_cfg_fraction <= CFG_FRACTION_RANGE[1],
                 "HALLO3_FAST_CFG_FRACTION must be between {:g} and {:g}".format(*CFG_FRACTION_RANGE))


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise SettingsError(message)


def _str(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    if value is None or not value.strip():
        return None
    return value.strip()


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = _str(env, name)
    if raw is None:
        return default
    try:
        return int(raw)
    except ValueError as err:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from err


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = _str(env, name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError as err:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from err
    if not math.isfinite(value):
        raise SettingsError(f"{name} must be finite, got {raw!r}")
    return value


def _bucket(env: Mapping[str, str]) -> BucketSettings | None:
    endpoint = _str(env, "BUCKET_ENDPOINT_URL")
    key_id = _str(env, "BUCKET_ACCESS_KEY_ID")
    secret = _str(env, "BUCKET_SECRET_ACCESS_KEY")
    name = _str(env, "BUCKET_NAME")
    given = [v for v in (endpoint, key_id, secret, name) if v]
    if not given:
        return None
    if not (endpoint and key_id and secret and name):
        logger.warning(
            "Bucket upload disabled: BUCKET_ENDPOINT_URL, BUCKET_ACCESS_KEY_ID, "
            "BUCKET_SECRET_ACCESS_KEY and BUCKET_NAME must all be set"
        )
        return None
    prefix = (_str(env, "BUCKET_PREFIX") or "").strip("/")
    return BucketSettings(endpoint, key_id, secret, name, prefix)


def _presets(env: Mapping[str, str]) -> tuple[str, ...]:
    raw = _str(env, "HALLO3_PRESETS")
    if raw is None:
        return PRESET_CHOICES
    names = [name.strip().lower() for name in raw.split(",") if name.strip()]
    unknown = [name for name in names if name not in PRESET_CHOICES]
    if unknown:
        raise SettingsError(f"HALLO3_PRESETS: unknown preset {unknown[0]!r}; choose from {', '.join(PRESET_CHOICES)}")
    return tuple(name for name in PRESET_CHOICES if name in names or name == "exact")


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Build :class:`Settings` from ``env`` (``os.environ`` when omitted). Raises SettingsError."""
    env = os.environ if env is None else env
    defaults = Settings()
    weights = _str(env, "HALLO3_WEIGHTS_DIR")
    work_dir = _str(env, "HALLO3_WORK_DIR")
    log_level = (
        _str(env, "HALLO3_LOG_LEVEL") or _str(env, "RUNPOD_LOG_LEVEL") or _str(env, "RUNPOD_DEBUG_LEVEL") or "INFO"
    ).upper()
    if log_level == "WARN":
        log_level = "WARNING"
    volume_root = Path(_str(env, "HALLO3_VOLUME_ROOT") or defaults.volume_root)
    state_dir = _str(env, "HALLO3_JOB_STATE_DIR")
    if state_dir is None:
        job_state_dir = volume_root / "hallo3-job-state" if volume_root.is_dir() else None
    else:
        job_state_dir = None if state_dir.strip().lower() == "off" else Path(state_dir).expanduser()
    return Settings(
        weights_dir=Path(weights).expanduser() if weights else None,
        work_dir=Path(work_dir).expanduser() if work_dir else defaults.work_dir,
        volume_root=volume_root,
        max_image_bytes=_int(env, "HALLO3_MAX_IMAGE_BYTES", defaults.max_image_bytes),
        max_audio_bytes=_int(env, "HALLO3_MAX_AUDIO_BYTES", defaults.max_audio_bytes),
        max_image_pixels=_int(env, "HALLO3_MAX_IMAGE_PIXELS", defaults.max_image_pixels),
        min_image_side=_int(env, "HALLO3_MIN_IMAGE_SIDE", defaults.min_image_side),
        soft_image_side=_int(env, "HALLO3_SOFT_IMAGE_SIDE", defaults.soft_image_side),
        max_duration_s=_float(env, "HALLO3_MAX_DURATION_S", defaults.max_duration_s),
        min_duration_s=_float(env, "HALLO3_MIN_DURATION_S", defaults.min_duration_s),
        silence_dbfs=_float(env, "HALLO3_SILENCE_DBFS", defaults.silence_dbfs),
        inline_output_max_bytes=_int(env, "HALLO3_INLINE_OUTPUT_MAX_BYTES", defaults.inline_output_max_bytes),
        download_timeout_s=_float(env, "HALLO3_DOWNLOAD_TIMEOUT_S", defaults.download_timeout_s),
        download_deadline_s=_float(env, "HALLO3_DOWNLOAD_DEADLINE_S", defaults.download_deadline_s),
        bucket_connect_timeout_s=_float(env, "HALLO3_BUCKET_CONNECT_TIMEOUT_S", defaults.bucket_connect_timeout_s),
        bucket_read_timeout_s=_float(env, "HALLO3_BUCKET_READ_TIMEOUT_S", defaults.bucket_read_timeout_s),
        bucket_max_attempts=_int(env, "HALLO3_BUCKET_MAX_ATTEMPTS", defaults.bucket_max_attempts),
        inline_min_kbps=_float(env, "HALLO3_INLINE_MIN_KBPS", defaults.inline_min_kbps),
        disk_reserve_mb=_float(env, "HALLO3_DISK_RESERVE_MB", defaults.disk_reserve_mb),
        video_crf=_int(env, "HALLO3_VIDEO_CRF", defaults.video_crf),
        video_preset=_str(env, "HALLO3_VIDEO_PRESET") or defaults.video_preset,
        cancel_grace_s=_float(env, "HALLO3_CANCEL_GRACE_S", defaults.cancel_grace_s),
        device=_str(env, "HALLO3_DEVICE") or defaults.device,
        dtype=_str(env, "HALLO3_DTYPE") or defaults.dtype,
        offload=(_str(env, "HALLO3_OFFLOAD") or defaults.offload).lower(),
        log_level=log_level,
        bucket=_bucket(env),
        on_platform=_str(env, "RUNPOD_WEBHOOK_POST_OUTPUT") is not None,
        takes_queued_jobs=_str(env, "RUNPOD_WEBHOOK_GET_JOB") is not None
        or (_str(env, "RUNPOD_REALTIME_PORT") or "0") != "0",
        job_state_dir=job_state_dir,
        job_state_max_age_h=_float(env, "HALLO3_JOB_STATE_MAX_AGE_H", defaults.job_state_max_age_h),
        compile=(_str(env, "HALLO3_COMPILE") or defaults.compile).lower(),
        attention=(_str(env, "HALLO3_ATTENTION") or defaults.attention).lower(),
        gpus=(_str(env, "HALLO3_GPUS") or defaults.gpus).lower(),
        parallel=(_str(env, "HALLO3_PARALLEL") or defaults.parallel).lower(),
        collective_timeout_s=_float(env, "HALLO3_COLLECTIVE_TIMEOUT_S", defaults.collective_timeout_s),
        presets=_presets(env),
        fast_cache_threshold=_float(env, "HALLO3_FAST_CACHE_THRESHOLD", defaults.fast_cache_threshold),
        fast_cfg_fraction=_float(env, "HALLO3_FAST_CFG_FRACTION", defaults.fast_cfg_fraction),
    )
