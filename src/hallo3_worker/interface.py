"""The contract between the Runpod worker and the Hallo3 generation pipeline.

The worker (``hallo3_worker.worker``) only talks to a pipeline through :class:`TalkingHeadPipeline`.
Generation is split in two phases so that every problem with the user's media is found before any
GPU work:

1. :meth:`TalkingHeadPipeline.prepare` runs on the CPU: takes the decoded image and audio (or
   decodes them), finds the face. It raises :class:`hallo3_worker.errors.InputError` for bad media.
2. :meth:`TalkingHeadPipeline.generate` runs the networks. It reports progress through a callback
   and checks a cancel event between segments (raising :class:`Cancelled`).
"""

from __future__ import annotations

import dataclasses
import enum
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np


class Framing(str, enum.Enum):
    """How the portrait is fitted into the model's 480x720 canvas."""

    UPSTREAM = "upstream"  # exactly as upstream Hallo3: square -> pad, anything else -> 3:2 centre crop
    AUTO = "auto"  # keeps the whole detected head for portrait images (a documented extension)


class Preset(str, enum.Enum):
    """Speed preset of a job (:mod:`hallo3_worker.presets`)."""

    EXACT = "exact"  # upstream's recipe, bit for bit
    BALANCED = "balanced"  # fp8 linear layers and 8-bit attention where the GPU has the kernels
    FAST = "fast"  # balanced, plus step caching and classifier-free guidance on the first steps only


@dataclasses.dataclass(frozen=True)
class DecodedImage:
    """``rgb``: uint8 (H, W, 3), upright. ``format``/``mode``: Pillow's names for the source."""

    rgb: np.ndarray
    format: str
    mode: str


@dataclasses.dataclass(frozen=True)
class DecodedAudio:
    """Decoded audio at its own sample rate.

    ``samples`` is float32 in [-1, 1] with shape (channels, num_samples), channels 1 or 2 (more are
    mixed down). ``source_channels``/``layout`` describe the file; ``complete`` is False when
    decoding stopped at a length limit.
    """

    samples: np.ndarray
    sample_rate: int
    codec: str = ""
    source_channels: int = 0
    layout: str = ""
    layout_assumed: bool = False
    complete: bool = True

    @property
    def channels(self) -> int:
        return int(self.samples.shape[0])

    @property
    def num_samples(self) -> int:
        return int(self.samples.shape[1])

    @property
    def duration_s(self) -> float:
        return self.num_samples / self.sample_rate

    def mono(self) -> np.ndarray:
        """Channel average as librosa computes it (float32 mean over channels), shape (num_samples,)."""
        return np.mean(self.samples, axis=0, dtype=np.float32)


@dataclasses.dataclass(frozen=True)
class DecodedInputs:
    """A job's checked media (:func:`hallo3_worker.conditioning.decode.decode_inputs`): the portrait, the
    speech (cut to the job's length) and warnings."""

    image: DecodedImage
    audio: DecodedAudio
    warnings: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """Everything a job asks for, already validated for type and range by the schema."""

    image_path: Path
    audio_path: Path
    prompt: str
    seed: int
    steps: int = 50
    guidance: float = 3.5
    framing: Framing = Framing.UPSTREAM
    separate_vocals: bool = True
    max_duration_s: float | None = None
    preset: Preset = Preset.EXACT
    # "fast" only: relative change of the first block's residual below which a step reuses the
    # cached residual of the other blocks (0: never), and the share of the steps that run the
    # unconditional half of classifier-free guidance (1: all).
    cache_threshold: float = 0.0
    cfg_fraction: float = 1.0
    # The job's private folder: the only place the pipeline may write files (e.g. separated vocals).
    work_dir: Path | None = None
    # The files as decoded and checked by the worker; a pipeline decodes the paths itself only without it.
    inputs: DecodedInputs | None = None


@dataclasses.dataclass
class PreparedJob:
    """The CPU-side result of :meth:`TalkingHeadPipeline.prepare`.

    ``data`` holds pipeline-private tensors (face embedding, processed image, audio features...);
    the worker never looks inside it.
    """

    request: GenerationRequest
    audio_duration_s: float
    num_frames: int  # frames of the output video = ceil(audio_duration_s * fps)
    fps: int
    width: int
    height: int
    warnings: list[str] = dataclasses.field(default_factory=list)
    data: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Progress:
    """One progress report. ``fraction`` is in [0, 1] over the whole job."""

    stage: str  # e.g. "audio", "face", "reference", "denoise", "decode"
    fraction: float
    segment: int | None = None  # 0-based segment index, when denoising
    num_segments: int | None = None
    step: int | None = None
    num_steps: int | None = None


@dataclasses.dataclass
class GenerationResult:
    """Frames in RGB uint8, shape (num_frames, height, width, 3), plus per-stage timings in seconds.

    ``peak_memory_bytes``: the most the accelerator held during generation (None on the CPU).
    ``denoiser_forwards``: full passes of the main transformer (a guided batch counts once);
    ``cached_steps``: steps that ran its first block only and reused the cached residual;
    ``cond_only_steps``: steps that ran without the unconditional half. None: not reported.
    """

    frames: np.ndarray
    fps: int
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    warnings: list[str] = dataclasses.field(default_factory=list)
    peak_memory_bytes: int | None = None
    preset: Preset = Preset.EXACT
    denoiser_forwards: int | None = None
    cached_steps: int | None = None
    cond_only_steps: int | None = None


class Cancelled(Exception):
    """Raised by :meth:`TalkingHeadPipeline.generate` when the cancel event was set."""


def raise_if_cancelled(cancel: threading.Event | None) -> None:
    """The cooperative cancel point used between stages, segments and steps."""
    if cancel is not None and cancel.is_set():
        raise Cancelled("cancel requested")


ProgressCallback = Callable[[Progress], None]


@dataclasses.dataclass(frozen=True)
class SegmentOutput:
    """One finished segment, handed on as soon as it is decoded.

    ``frames``: RGB uint8 (n, H, W, 3), following the previous segment's. ``resume_state``: opaque
    bytes; ``generate(..., resume=resume_state)`` continues the same job after this segment and
    gives the frames an uninterrupted run would (empty when the pipeline cannot resume).
    """

    segment: int  # 0-based
    num_segments: int
    frames: np.ndarray
    resume_state: bytes = b""


#: Receives each :class:`SegmentOutput` as soon as it exists.
FrameSink = Callable[[SegmentOutput], None]


class ResumeStateError(ValueError):
    """``generate(resume=...)`` got a state it cannot use (corrupt, or not from this job); nothing has run."""


class TalkingHeadPipeline(Protocol):
    """What the worker needs from a pipeline."""

    #: True when the pipeline runs the embedded tiny random-weight model (no real weights configured).
    is_tiny: bool

    def prepare(self, request: GenerationRequest) -> PreparedJob:
        """Decode and check the inputs on the CPU; raise ``InputError`` for anything unusable."""
        ...

    def generate(
        self,
        job: PreparedJob,
        progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
        on_frames: FrameSink | None = None,
        resume: bytes | None = None,
    ) -> GenerationResult:
        """Run the networks; raise ``Cancelled`` if ``cancel`` gets set.

        With ``on_frames`` each segment is handed on as soon as it exists (and the result's
        ``frames`` may be empty); without it the result holds them all. ``resume``: a
        :attr:`SegmentOutput.resume_state` of this job; only the segments after it run (raises
        :class:`ResumeStateError` before any work when it cannot be used).
        """
        ...
