"""A fast pipeline double for the worker's contract tests.

:class:`NoiseTalkingHeadPipeline` implements :class:`~hallo3_worker.interface.TalkingHeadPipeline`
without networks, so the worker's own behaviour (schema, media, encoding, delivery, faults,
cancel) can be tested in milliseconds: ``prepare`` takes the image and audio the worker decoded
and checked (or decodes them through the same path) and frames the portrait the way upstream Hallo3 does (a square image gives
480x480, anything else a 720x480 centre crop); ``generate`` overlays the framed image with seeded
block noise in 47-frame segments, with a progress report and a cancel check per segment, and says
so in the result's warnings. The real pipeline, with the embedded tiny model, is exercised by
tests/test_pipeline_tiny.py and the local-server test.
"""

from __future__ import annotations

import logging
import math
import threading
import time

import numpy as np
from PIL import Image

from hallo3_worker.conditioning.decode import decode_inputs
from hallo3_worker.interface import (
    Cancelled,
    FrameSink,
    Framing,
    GenerationRequest,
    GenerationResult,
    PreparedJob,
    Progress,
    ProgressCallback,
    ResumeStateError,
    SegmentOutput,
)
from hallo3_worker.settings import Settings
from hallo3_worker.worker.runtime import input_limits

logger = logging.getLogger(__name__)

FPS = 25
SEGMENT_FRAMES = 47  # new frames per Hallo3 window: 49 generated minus 2 motion frames
CANVAS = (480, 720)  # (height, width) of Hallo3's model input
NOISE_BLOCK = 16  # pixels per side of one noise block
NOISE_HOLD = 5  # frames each noise pattern is shown for (keeps the placeholder's MP4 small)
WARNING = (
    "Placeholder pipeline: the frames are the reference image under seeded noise, not the output "
    "of the Hallo3 model."
)


def frame_size(width: int, height: int, framing: Framing) -> tuple[int, int]:
    """Output (width, height) for an input of ``width`` x ``height`` (upstream Hallo3 rules)."""
    if width == height:
        return 480, 480
    return CANVAS[1], CANVAS[0]


def frame_reference(rgb: np.ndarray, framing: Framing) -> np.ndarray:
    """Fit an RGB image (H, W, 3) into the output frame: (480, 480, 3) or (480, 720, 3) uint8.

    ``upstream`` and landscape ``auto``: resize and centre-crop to 3:2. Portrait ``auto``: fit the
    whole image and pad the sides, so the head is never cut.
    """
    height, width = rgb.shape[:2]
    out_w, out_h = frame_size(width, height, framing)
    image = Image.fromarray(rgb)
    if width == height:
        return np.asarray(image.resize((out_w, out_h), Image.Resampling.LANCZOS))
    if framing is Framing.AUTO and height > width:
        scale = out_h / height
        fitted = image.resize((max(1, round(width * scale)), out_h), Image.Resampling.LANCZOS)
        canvas = Image.new("RGB", (out_w, out_h), (0, 0, 0))
        canvas.paste(fitted, ((out_w - fitted.width) // 2, 0))
        return np.asarray(canvas)
    scale = max(out_w / width, out_h / height)
    resized = image.resize((max(out_w, round(width * scale)), max(out_h, round(height * scale))),
                           Image.Resampling.LANCZOS)
    left, top = (resized.width - out_w) // 2, (resized.height - out_h) // 2
    return np.asarray(resized.crop((left, top, left + out_w, top + out_h)))


class NoiseTalkingHeadPipeline:
    """Placeholder pipeline: real input checks, seeded-noise frames, no model."""

    is_tiny = True

    def __init__(self, settings: Settings, peak_memory_bytes: int | None = None) -> None:
        self.settings = settings
        self.peak_memory_bytes = peak_memory_bytes  # what generate() reports, as a GPU pipeline would

    # ------------------------------------------------------------------------------- prepare

    def prepare(self, request: GenerationRequest) -> PreparedJob:
        """Use (or make) the decoded and checked image and audio; raise ``InputError`` for unusable media."""
        inputs = request.inputs or decode_inputs(request.image_path, request.audio_path,
                                                 input_limits(self.settings), request.max_duration_s)
        reference = frame_reference(inputs.image.rgb, request.framing)
        warnings = [WARNING, *inputs.warnings]
        duration = inputs.audio.duration_s
        height, width = reference.shape[:2]
        return PreparedJob(
            request=request,
            audio_duration_s=duration,
            num_frames=max(1, math.ceil(duration * FPS - 1e-9)),
            fps=FPS,
            width=width,
            height=height,
            warnings=warnings,
            data={"reference": reference},
        )

    # ------------------------------------------------------------------------------ generate

    def generate(
        self,
        job: PreparedJob,
        progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
        on_frames: FrameSink | None = None,
        resume: bytes | None = None,
    ) -> GenerationResult:
        """Produce ``job.num_frames`` frames, one 47-frame segment at a time, each handed to ``on_frames``."""
        if resume is not None:
            raise ResumeStateError("this double cannot continue a job")
        started = time.perf_counter()
        reference = job.data["reference"].astype(np.uint16) * 3  # (H, W, 3), weighted 3/4 below
        rng = np.random.default_rng(job.request.seed)
        frames = np.empty((job.num_frames, job.height, job.width, 3), np.uint8)
        segments = math.ceil(job.num_frames / SEGMENT_FRAMES)
        for segment in range(segments):
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"cancelled before segment {segment + 1} of {segments}")
            if progress is not None:
                progress(Progress("denoise", segment / segments, segment, segments))
            first = segment * SEGMENT_FRAMES
            last = min(first + SEGMENT_FRAMES, job.num_frames)
            for index in range(first, last):
                frames[index] = self._noisy_frame(reference, rng) if index % NOISE_HOLD == 0 else frames[index - 1]
            if on_frames is not None:  # no resume state: this double cannot continue a job
                on_frames(SegmentOutput(segment, segments, frames[first:last].copy()))
        if progress is not None:
            progress(Progress("decode", 1.0, segments - 1, segments))
        return GenerationResult(
            frames=frames,
            fps=job.fps,
            timings={"denoise": time.perf_counter() - started},
            peak_memory_bytes=self.peak_memory_bytes,
        )

    @staticmethod
    def _noisy_frame(reference: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``reference`` (H, W, 3) uint16 already weighted by 3; returns (ref*3 + noise) / 4 as uint8."""
        height, width = reference.shape[:2]
        blocks = rng.integers(0, 256, (math.ceil(height / NOISE_BLOCK), math.ceil(width / NOISE_BLOCK), 3),
                              dtype=np.uint16)
        noise = np.repeat(np.repeat(blocks, NOISE_BLOCK, axis=0), NOISE_BLOCK, axis=1)[:height, :width]
        return ((reference + noise) >> 2).astype(np.uint8)  # 3/4 image + 1/4 noise
