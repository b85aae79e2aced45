"""What a job's output will need, decided before any GPU work: the inline bitrate cap and disk space.

**Inline bitrate cap.** A video returned inline (no bucket, or ``output.mode: "base64"``) must fit
``HALLO3_INLINE_OUTPUT_MAX_BYTES`` as base64. The clip's length is known once its audio is decoded,
so :func:`plan_output` caps the video's bitrate with x264's VBV (``maxrate``/``bufsize`` on top of
the CRF) such that the whole MP4 (video, AAC audio, container) fills at most
:data:`INLINE_MARGIN` of the limit. Every segment is encoded with its own VBV buffer, which may
start nearly full, so the bound on the video is ``maxrate x duration + segments x bufsize``; the cap
is chosen from that bound, identical for every segment (the joined file stays deterministic). A cap
at or above :data:`FULL_QUALITY_BPS` would not limit the CRF, so no cap is set and nothing is said;
a cap below ``HALLO3_INLINE_MIN_KBPS`` would not give a usable picture, so the job fails at once
with ``OUTPUT_TOO_LARGE``. With a bucket nothing is capped.

**Disk.** :func:`check_free_space` compares the free space of the work folder (and of the job
state folder, where the segments go when it is set) with an upper estimate of the job's files and
``HALLO3_DISK_RESERVE_MB``; :func:`disk_full_error` turns a write that failed with ``ENOSPC`` into
the same ``WORKER_DISK_FULL`` answer. Both ask for a fresh worker (``refresh_worker``).
"""

from __future__ import annotations

import dataclasses
import errno
import math
import os
import shutil
from pathlib import Path

from hallo3_worker.errors import ErrorCode, UserFacingError
from hallo3_worker.settings import Settings
from hallo3_worker.worker.media import audio_bit_rate

#: The pipeline's frame rate and new frames per segment (``conditioning.audio``, which imports torch).
FPS = 25
NEW_FRAMES_PER_SEGMENT = 47
#: Share of the inline limit an inline MP4 is planned to fill (the rest absorbs estimate errors).
INLINE_MARGIN = 0.92
#: x264 VBV buffer, in seconds of the capped rate.
VBV_BUFFER_S = 0.5
#: A cap at or above this leaves CRF 18 unconstrained in practice: no cap, no warning. Also the rate
#: assumed for an uncapped video when estimating disk space (the tiny model's noise needs ~4.8 Mbit/s).
FULL_QUALITY_BPS = 8_000_000
_AUDIO_SLACK = 1.1  # the AAC encoder's average rate may pass its target a little
_CONTAINER_BYTES = 64 * 1024  # MP4 header, moov and the rest of the index ...
_CONTAINER_BYTES_PER_FRAME = 48  # ... which grows with the number of video and audio frames
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_BUCKET_ADVICE = "send 's3Config' with the request (or configure BUCKET_* on the endpoint)"


@dataclasses.dataclass(frozen=True)
class OutputPlan:
    """How a job's video will be encoded, and how large its files can get."""

    inline: bool
    maxrate_bps: int | None  # x264 VBV maxrate; None: the CRF alone decides
    bufsize_bits: int | None  # x264 VBV buffer size; None with maxrate_bps
    video_bytes: int  # upper estimate of all segments together
    mp4_bytes: int  # upper estimate of the joined MP4
    warning: str | None  # for the result when the bitrate is capped


def plan_output(duration_s: float, channels: int, inline: bool, settings: Settings) -> OutputPlan:
    """The encoding plan of a clip of ``duration_s`` seconds; raise ``OUTPUT_TOO_LARGE`` below the floor."""
    frames = max(1, math.ceil(duration_s * FPS - 1e-9))
    video_s = frames / FPS
    segments = math.ceil(frames / NEW_FRAMES_PER_SEGMENT)
    other_bytes = _audio_bytes(duration_s, channels) + _CONTAINER_BYTES + _CONTAINER_BYTES_PER_FRAME * frames
    cap = inline_cap_bps(duration_s, channels, settings) if inline else None
    if cap is None or cap >= FULL_QUALITY_BPS:
        video = math.ceil(FULL_QUALITY_BPS * video_s / 8)
        return OutputPlan(inline, None, None, video, video + other_bytes, None)
    if cap < settings.inline_min_kbps * 1000:
        raise UserFacingError(ErrorCode.OUTPUT_TOO_LARGE, _too_long_message(duration_s, channels, cap, settings))
    bufsize = int(cap * VBV_BUFFER_S)
    video = math.ceil((cap * video_s + segments * bufsize) / 8)
    limit_mb = settings.inline_output_max_bytes / 1e6
    warning = (f"The video's bitrate was capped at {cap // 1000} kbit/s so that it fits the {limit_mb:.1f} MB "
               f"that can be returned inline; for full quality (CRF {settings.video_crf}), {_BUCKET_ADVICE}.")
    return OutputPlan(inline, cap, bufsize, video, video + other_bytes, warning)


def inline_cap_bps(duration_s: float, channels: int, settings: Settings) -> int:
    """The highest video bitrate whose worst case keeps an inline MP4 of ``duration_s`` within the margin."""
    frames = max(1, math.ceil(duration_s * FPS - 1e-9))
    segments = math.ceil(frames / NEW_FRAMES_PER_SEGMENT)
    budget = (settings.inline_output_max_bytes * 3 / 4 * INLINE_MARGIN - _audio_bytes(duration_s, channels)
              - _CONTAINER_BYTES - _CONTAINER_BYTES_PER_FRAME * frames)
    return max(0, int(budget * 8 / (frames / FPS + segments * VBV_BUFFER_S)))


def max_inline_duration_s(channels: int, settings: Settings) -> float:
    """The longest clip (to 0.1 s) whose inline cap is still at the floor (``HALLO3_INLINE_MIN_KBPS``)."""
    low, high = 0.0, 3600.0
    floor = settings.inline_min_kbps * 1000
    while high - low > 0.05:
        middle = (low + high) / 2
        low, high = (middle, high) if inline_cap_bps(middle, channels, settings) >= floor else (low, middle)
    return math.floor(low * 10) / 10


def _audio_bytes(duration_s: float, channels: int) -> int:
    return math.ceil(audio_bit_rate(channels) * _AUDIO_SLACK * duration_s / 8)


def _too_long_message(duration_s: float, channels: int, cap: int, settings: Settings) -> str:
    return (f"A {duration_s:.1f} s video returned inline would need its bitrate capped at {cap // 1000} kbit/s "
            f"to fit the {settings.inline_output_max_bytes / 1e6:.1f} MB that can be returned inline, below the "
            f"{settings.inline_min_kbps:g} kbit/s needed for a usable picture. For full quality, {_BUCKET_ADVICE}, "
            f"or use audio of at most {max_inline_duration_s(channels, settings):g} s.")


# ------------------------------------------------------------------------------------------- disk


def check_free_space(plan: OutputPlan, settings: Settings) -> None:
    """Raise ``WORKER_DISK_FULL`` when a folder the job writes to lacks room for its files plus the reserve."""
    segments_at = settings.job_state_dir or settings.work_dir
    needs: dict[int, tuple[Path, int]] = {}  # file system -> (folder named in messages, bytes)
    for folder, size in ((settings.work_dir, plan.mp4_bytes), (segments_at, plan.video_bytes)):
        device = os.stat(_existing(folder)).st_dev
        named, total = needs.get(device, (folder, 0))
        needs[device] = (named, total + size)
    reserve = int(settings.disk_reserve_mb * 1e6)
    for folder, need in needs.values():
        free = shutil.disk_usage(_existing(folder)).free
        if free < need + reserve:
            raise UserFacingError(
                ErrorCode.WORKER_DISK_FULL,
                f"The worker's disk is too full for this job: {folder} has {free / 1e6:.1f} MB free, and the job "
                f"needs about {need / 1e6:.1f} MB there plus {settings.disk_reserve_mb:g} MB kept free "
                "(HALLO3_DISK_RESERVE_MB). The worker restarts; please retry.",
                refresh_worker=True,
            )


def disk_full_error(err: BaseException, settings: Settings) -> UserFacingError | None:
    """``WORKER_DISK_FULL`` for a write that failed because its disk is full; None for anything else."""
    if not isinstance(err, OSError) or err.errno not in DISK_FULL_ERRNOS:
        return None
    folder = settings.work_dir
    written = Path(str(err.filename)) if err.filename else None
    if written is not None and settings.job_state_dir is not None and written.is_relative_to(settings.job_state_dir):
        folder = settings.job_state_dir
    free = shutil.disk_usage(_existing(folder)).free
    return UserFacingError(
        ErrorCode.WORKER_DISK_FULL,
        f"The worker's disk is full: a write in {folder} failed with no space left on the device "
        f"({free / 1e6:.1f} MB free once the job's files were removed). The worker restarts; please retry.",
        refresh_worker=True,
    )


def _existing(folder: Path) -> Path:
    """``folder``, or its nearest parent that exists (a folder made later lives on that parent's disk)."""
    path = folder
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
