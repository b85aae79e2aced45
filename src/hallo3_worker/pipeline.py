"""The Hallo3 pipeline: image + speech + prompt -> talking-head frames.

One :class:`Hallo3Pipeline` owns the loaded networks and runs jobs in two phases (see
:mod:`hallo3_worker.interface`): :meth:`Hallo3Pipeline.prepare` checks and preprocesses the inputs
on the CPU, :meth:`Hallo3Pipeline.generate` runs the networks.

Generation, as upstream's ``sample_video.py`` computes it (spec section 1), except where noted:

1. Audio: optional vocal separation, 16 kHz, wav2vec2 features of the clip padded to a multiple of
   49 frames, the +-2 frame window.
2. Text: T5 once per job; the unconditional text is zeros.
3. Reference: the face-masked image is VAE-encoded and the reference network runs **once per job**
   (upstream re-runs it every segment with identical inputs).
4. Segments of 49 frames, each re-using the last 2 frames of the previous one as motion frames:
   ``[image, masked motion, masked motion]`` is VAE-encoded (sampled posterior, x0.7) and padded
   with 12 zero latent frames; the sampler produces 13 latent frames; they are decoded in
   upstream's latent chunks; the first 2 frames of every segment are dropped. Exactly
   ``ceil(frames / 47)`` segments run (upstream runs one more when padding pushes the audio past a
   multiple of 47; that segment only produces frames that are cropped away).
5. Each segment's frames are converted to uint8 by truncation, cropped to the output region
   (480x480 for square inputs), cut at the audio's length and handed on as soon as they exist.

Steps 1-3 are :meth:`Hallo3Pipeline.condition_job`; step 4 is ``condition_segment`` ->
``denoise_segment`` -> ``decode_segment`` per segment. All randomness comes from a
:class:`NoiseSource`; :class:`SeededNoise` draws every stream from one CPU ``torch.Generator``
seeded by the job's seed, so a seed gives the same video on any device, and its state after a
segment (with that segment's motion frames) lets a job resume there with the same frames.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import logging
import math
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from hallo3_worker.conditioning.audio import (
    FPS,
    MOTION_FRAMES,
    NEW_FRAMES_PER_SEGMENT,
    AudioFeatures,
    VocalSeparatorLike,
    Wav2VecEncoder,
    num_segments,
    segment_audio_chunk,
    speech_to_16k,
)
from hallo3_worker.conditioning.decode import InputLimits, decode_inputs
from hallo3_worker.conditioning.face import FaceAnalysisResult
from hallo3_worker.conditioning.image import CANVAS_SIZE, ProcessedImage, crop_output_frames, preprocess_image
from hallo3_worker.conditioning.text import T5TextEncoder
from hallo3_worker.denoiser import SegmentConditions, guidance_model_fn
from hallo3_worker.interface import (
    FrameSink,
    Framing,
    GenerationRequest,
    GenerationResult,
    PreparedJob,
    Progress,
    ProgressCallback,
    ResumeStateError,
    SegmentOutput,
    raise_if_cancelled,
)
from hallo3_worker.memory import device_peak_memory
from hallo3_worker.models.block_streaming import BlockStreamer, stream_blocks
from hallo3_worker.models.loading import pin_resting_copies, replace_tensors, to_device
from hallo3_worker.models.memory_savers import chunk_feed_forward
from hallo3_worker.models.reference_net import ReferenceNet
from hallo3_worker.models.speedups import ExactSpeedups, apply_speedups
from hallo3_worker.models.transformer import Hallo3Transformer
from hallo3_worker.models.vae import Hallo3VAE
from hallo3_worker.presets import SpeedPresets
from hallo3_worker.sampling import SamplerConfig, Schedule, sample
from hallo3_worker.timing import timed

logger = logging.getLogger(__name__)

MOTION_MASK_RATE = 0.1  # share of motion-frame pixels zeroed, redrawn every segment


class FaceAnalyzerLike(Protocol):
    """Anything with ``analyze(rgb, framing=...) -> FaceAnalysisResult`` raising ``InputError(NO_FACE)``."""

    def analyze(self, image: np.ndarray, *, framing: Framing = Framing.UPSTREAM) -> FaceAnalysisResult: ...


class NoiseSource(Protocol):
    """Every random draw of a job, by purpose. Tensors may be on any device; float32."""

    def motion_mask(self, segment: int, height: int, width: int) -> torch.Tensor:
        """Uniform [0, 1) of shape (height, width); pixels at or below the mask rate are zeroed."""
        ...

    def posterior(self, label: str, shape: tuple[int, ...]) -> torch.Tensor:
        """Standard normal posterior noise of a VAE encode; label "reference" or "motion<t>"."""
        ...

    def initial(self, segment: int, shape: tuple[int, ...]) -> torch.Tensor:
        """The segment's initial latent noise."""
        ...

    def step(self, segment: int, step: int, like: torch.Tensor) -> torch.Tensor:
        """Noise the sampler adds after ``step`` of ``segment``."""
        ...

    # Optional: a source with ``state() -> torch.Tensor`` and ``restore(state)`` makes segments resumable.


class SeededNoise:
    """All streams drawn in call order from one CPU generator seeded with the job's seed."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator(device="cpu").manual_seed(seed)

    def _normal(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator, dtype=torch.float32)

    def motion_mask(self, segment: int, height: int, width: int) -> torch.Tensor:
        return torch.rand((height, width), generator=self.generator, dtype=torch.float32)

    def posterior(self, label: str, shape: tuple[int, ...]) -> torch.Tensor:
        return self._normal(shape)

    def initial(self, segment: int, shape: tuple[int, ...]) -> torch.Tensor:
        return self._normal(shape)

    def step(self, segment: int, step: int, like: torch.Tensor) -> torch.Tensor:
        return self._normal(tuple(like.shape))

    def state(self) -> torch.Tensor:
        return self.generator.get_state()

    def restore(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where the networks live.

    ``device``/``dtype``: the compute device and the networks' dtype. The text encoder and the
    reference network are used once per job; with ``offload`` they wait on ``offload_device``
    between jobs and visit ``device`` only while they run. With ``offload_transformer`` the main
    transformer waits there too and visits ``device`` for each segment's denoising only, so the
    VAE decode and the once-per-job networks never share the device with it.
    ``feed_forward_chunk``: the pipeline makes the transformer's MLPs run that many tokens at a
    time (:func:`hallo3_worker.models.memory_savers.chunk_feed_forward`); None runs them whole.
    """

    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32
    offload_device: torch.device = torch.device("cpu")
    offload: bool = True
    offload_transformer: bool = False
    feed_forward_chunk: int | None = None

    @property
    def job_network_device(self) -> torch.device:
        """Where the once-per-job networks (T5, reference network) are loaded and wait."""
        return self.offload_device if self.offload else self.device

    @property
    def transformer_device(self) -> torch.device:
        """Where the main transformer is loaded and waits."""
        return self.offload_device if self.offload_transformer else self.device


@dataclasses.dataclass
class Hallo3Components:
    """The loaded networks and tools of one pipeline."""

    transformer: Hallo3Transformer
    reference_net: ReferenceNet
    vae: Hallo3VAE
    text_encoder: T5TextEncoder
    audio_encoder: Wav2VecEncoder
    face_analyzer: FaceAnalyzerLike
    separator: VocalSeparatorLike | None = None


@dataclasses.dataclass(frozen=True)
class _ResumePoint:
    """Where a job continues: the next segment, its motion frames (1, 3, 2, H, W) and the noise stream's state."""

    next_segment: int
    motion: torch.Tensor
    noise: torch.Tensor

    def dump(self) -> bytes:
        buffer = io.BytesIO()
        torch.save({"next_segment": self.next_segment, "motion": self.motion.cpu(), "noise": self.noise}, buffer)
        return buffer.getvalue()

    @classmethod
    def parse(cls, data: bytes | None) -> _ResumePoint | None:
        if data is None:
            return None
        try:
            state = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
            return cls(int(state["next_segment"]), state["motion"], state["noise"])
        except Exception as err:  # any unreadable state means "start over"; the caller decides
            raise ResumeStateError(f"the resume state cannot be read: {type(err).__name__}") from None


@dataclasses.dataclass
class JobConditions:
    """What every segment of one job shares; made once per job by :meth:`Hallo3Pipeline.condition_job`.

    ``text`` (1, L, text_dim), ``face`` (1, 512) and ``image`` (1, 3, 1, H, W, frame 0 of every
    motion clip, model dtype) are on the compute device; ``reference`` holds one (1, R, D) per block,
    or, once the first segment has made them, one (k, v) pair per block, each (1, nh, R, dh).
    """

    features: AudioFeatures
    text: torch.Tensor
    face: torch.Tensor
    image: torch.Tensor
    reference: list[torch.Tensor] | list[tuple[torch.Tensor, torch.Tensor]]
    plan_crop: tuple[int, int, int, int]  # (top, left, height, width) of the canvas the video keeps
    output_size: tuple[int, int]  # (height, width) of the output video
    sampler: SamplerConfig

    @property
    def num_segments(self) -> int:
        return num_segments(self.features.audio_length)

    @functools.cached_property
    def schedule(self) -> Schedule:
        """The sampler's tables, made and put on the compute device once per job."""
        return Schedule.create(self.sampler).on(self.text.device)


class Hallo3Pipeline:
    """Implements :class:`hallo3_worker.interface.TalkingHeadPipeline` with the Hallo3 networks.

    ``canvas`` is the model's (height, width) input size: the real model's 480x720, or a smaller
    one for the tiny model, whose frames are then resized to the real output size (``output_canvas``).
    """

    def __init__(
        self,
        components: Hallo3Components,
        placement: Placement,
        *,
        is_tiny: bool = False,
        canvas: tuple[int, int] = CANVAS_SIZE,
        output_canvas: tuple[int, int] = CANVAS_SIZE,
        limits: InputLimits = InputLimits(),
        noise_factory: Callable[[int], NoiseSource] = SeededNoise,
        speedups: ExactSpeedups = ExactSpeedups(),
    ) -> None:
        self.components = components
        self.placement = placement
        self.speedups = speedups
        self.block_streamer: BlockStreamer | None = None
        self.speedup_report: dict[str, object] = {}
        if components is not None:
            if placement.feed_forward_chunk is not None:
                chunk_feed_forward(components.transformer, placement.feed_forward_chunk)
            self.speedup_report = apply_speedups(
                speedups, placement.device, components.transformer, components.reference_net,
                compiled=components.transformer.blocks,
            )
            if placement.device.type == "cuda" and placement.offload_device.type == "cpu":
                resting = [components.reference_net, components.text_encoder.model] if placement.offload else []
                resting += [components.transformer] if placement.offload_transformer else []
                pinned = sum(pin_resting_copies(module) for module in resting)
                self.speedup_report["pinned_gib"] = round(pinned / 2**30, 2)
            if placement.offload_transformer and placement.device != placement.offload_device:
                # The blocks visit one at a time during each forward; the rest visits per segment.
                self.block_streamer = stream_blocks(components.transformer.blocks, placement.device)
            self.presets = SpeedPresets(components.transformer, placement.device, placement.dtype,
                                        offloaded=placement.offload_transformer)
        self.is_tiny = is_tiny
        self.canvas = canvas
        self.output_canvas = output_canvas
        self.limits = limits
        self.noise_factory = noise_factory
        self.assets_tmp: tempfile.TemporaryDirectory | None = None  # files the components read, if temporary
        # Several ranks (hallo3_worker.parallel): its model_fn(transformer, conditions, reference)
        # computes each segment's guided model function on every rank. None: this process alone.
        self.parallel = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------- prepare

    def prepare(self, request: GenerationRequest) -> PreparedJob:
        """Find the face and preprocess the image. CPU only (plus the ONNX face models).

        Uses the media the worker decoded (``request.inputs``), or decodes and checks the files.
        """
        inputs = request.inputs or decode_inputs(request.image_path, request.audio_path, self.limits,
                                                 request.max_duration_s)
        image = inputs.image.rgb
        face = self.components.face_analyzer.analyze(image, framing=request.framing)
        processed = preprocess_image(image, face.mask, framing=request.framing, canvas=self.canvas)
        top, left, height, width = processed.plan.output_crop
        out_h, out_w = self._output_size(height, width)
        return PreparedJob(
            request=request,
            audio_duration_s=inputs.audio.duration_s,
            num_frames=math.ceil(inputs.audio.duration_s * FPS),
            fps=FPS,
            width=out_w,
            height=out_h,
            warnings=list(inputs.warnings),
            data={"audio": inputs.audio, "face": face, "image": processed},
        )

    def _output_size(self, crop_h: int, crop_w: int) -> tuple[int, int]:
        """Output (height, width): the crop of the canvas, scaled to the output canvas."""
        scale_h = self.output_canvas[0] / self.canvas[0]
        scale_w = self.output_canvas[1] / self.canvas[1]
        return round(crop_h * scale_h), round(crop_w * scale_w)

    # ------------------------------------------------------------------------------ generate

    def generate(
        self,
        job: PreparedJob,
        progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
        noise: NoiseSource | None = None,
        on_frames: FrameSink | None = None,
        resume: bytes | None = None,
    ) -> GenerationResult:
        """Run the networks; frames are RGB uint8 (N, H, W, 3) with N = the audio's frame count.

        ``on_frames`` receives each :class:`SegmentOutput` as soon as it is decoded; without it the
        frames are collected and returned in the result. ``resume`` continues after a segment
        (see :meth:`TalkingHeadPipeline.generate`).
        """
        start = _ResumePoint.parse(resume)
        if start is not None and not (0 < start.next_segment <= num_segments(job.num_frames)
                                      and tuple(start.motion.shape) == (1, 3, MOTION_FRAMES, *self.canvas)):
            raise ResumeStateError(f"the resume state (segment {start.next_segment}) does not fit this job")
        noise = noise or self.noise_factory(job.request.seed)
        cancel = cancel or threading.Event()
        timings: dict[str, float] = {}
        kept: list[np.ndarray] = []
        with (
            self._lock,
            torch.inference_mode(),
            _work_dir(job.request.work_dir) as work_dir,
            device_peak_memory(self.placement.device) as peak,
            self.presets.job(job.request) as speed,
        ):
            shared = self.condition_job(job, noise, work_dir, cancel, timings)
            self._segments(shared, noise, on_frames or (lambda done: kept.append(done.frames)), start, progress,
                           cancel, timings)
        if peak.bytes is not None:
            logger.info("peak device memory of this job: %.2f GiB", peak.bytes / 2**30)
        frames = np.concatenate(kept) if kept else np.zeros((0, job.height, job.width, 3), np.uint8)
        return GenerationResult(frames=frames, fps=FPS, timings=timings, peak_memory_bytes=peak.bytes, **speed.report())

    # --------------------------------------------------------------------- once per job

    def condition_job(
        self, job: PreparedJob, noise: NoiseSource, work_dir: Path, cancel: threading.Event, timings: dict[str, float]
    ) -> JobConditions:
        """Audio features, text embedding, face embedding and reference tokens: what every segment shares."""
        request, device = job.request, self.placement.device
        with timed(timings, "audio"):
            separator = self.components.separator if request.separate_vocals else None
            speech = speech_to_16k(job.data["audio"], job_dir=work_dir, separator=separator)
            features = self.components.audio_encoder.encode(speech)
        raise_if_cancelled(cancel)
        with timed(timings, "text"):
            text = self._encode_text(request.prompt)
        with timed(timings, "reference"):
            processed: ProcessedImage = job.data["image"]
            reference = self._reference_tokens(processed, noise)
        raise_if_cancelled(cancel)
        return JobConditions(
            features=features,
            text=text.to(device),
            face=torch.from_numpy(job.data["face"].embedding).reshape(1, -1).float().to(device),
            image=processed.image.to(device=device, dtype=self.placement.dtype).unsqueeze(2),  # (1, 3, 1, H, W)
            reference=reference,
            plan_crop=processed.plan.output_crop,
            output_size=(job.height, job.width),
            sampler=SamplerConfig(num_steps=request.steps, guidance=request.guidance),
        )

    def _encode_text(self, prompt: str) -> torch.Tensor:
        encoder = self.components.text_encoder
        with self._visiting(encoder.model):
            return encoder.encode(prompt)  # (1, L, text_dim)

    def _reference_tokens(self, processed: ProcessedImage, noise: NoiseSource) -> list[torch.Tensor]:
        """VAE-encode the face-masked image and run the reference network: one (1, R, D) per block."""
        vae = self.components.vae
        pixels = processed.ref_image.to(self.placement.dtype).unsqueeze(2)  # (1, 3, 1, H, W)
        latent = vae.encode(pixels, noise=noise.posterior("reference", self._posterior_shape()))  # (1, 1, C, h, w)
        with self._visiting(self.components.reference_net):
            return [t.to(self.placement.device) for t in self.components.reference_net(latent.to(self.placement.device))]

    def _latent_hw(self) -> tuple[int, int]:
        factor = 2 ** (len(self.components.vae.vae.config.block_out_channels) - 1)  # 8 for the real VAE
        return self.canvas[0] // factor, self.canvas[1] // factor

    def _posterior_shape(self) -> tuple[int, ...]:
        """(1, C, 1, h, w): the posterior noise of one VAE-encoded frame."""
        return (1, self.components.vae.vae.config.latent_channels, 1, *self._latent_hw())

    # ---------------------------------------------------------------------- the segment loop

    def _segments(
        self,
        shared: JobConditions,
        noise: NoiseSource,
        on_frames: FrameSink,
        start: _ResumePoint | None,
        progress: ProgressCallback | None,
        cancel: threading.Event,
        timings: dict[str, float],
    ) -> None:
        """Condition, denoise, decode and hand on each segment; the last one is cut to the audio's length."""
        count = shared.num_segments
        motion = torch.cat([shared.image] * MOTION_FRAMES, dim=2)  # (1, 3, 2, H, W): segment 0 re-uses the image
        first = 0
        if start is not None:  # continue after a finished segment: its motion frames and the noise stream
            first, motion = start.next_segment, start.motion.to(device=motion.device, dtype=motion.dtype)
            noise.restore(start.noise)
            logger.info("resuming at segment %d/%d", first + 1, count)
        emitted = min(first * NEW_FRAMES_PER_SEGMENT, shared.features.audio_length)
        for segment in range(first, count):
            raise_if_cancelled(cancel)
            started = time.perf_counter()

            def on_step(step: int, steps: int, segment: int = segment) -> None:
                raise_if_cancelled(cancel)
                if progress is not None:
                    progress(Progress("denoise", (segment + (step + 1) / steps) / count, segment, count, step, steps))

            conditions = self.condition_segment(shared, segment, motion, noise)
            latents = self.denoise_segment(shared, segment, conditions, noise, on_step)
            motion, frames = self.decode_segment(latents)
            frames = self._output_frames(frames[: shared.features.audio_length - emitted], shared)
            emitted += len(frames)
            state = _ResumePoint(segment + 1, motion, noise.state()).dump() if hasattr(noise, "state") else b""
            on_frames(SegmentOutput(segment, count, frames, state))
            timings[f"segment_{segment}"] = round(time.perf_counter() - started, 3)
            logger.info("segment %d/%d done in %.1f s", segment + 1, count, timings[f"segment_{segment}"])

    def condition_segment(
        self, shared: JobConditions, segment: int, motion: torch.Tensor, noise: NoiseSource
    ) -> SegmentConditions:
        """The segment's conditioning: ``[image, masked motion frames]`` VAE-encoded, and its audio rows.

        ``motion``: (1, 3, 2, H, W) in [-1, 1], model dtype, on the device.
        """
        dtype, device = self.placement.dtype, self.placement.device
        mask = noise.motion_mask(segment, *self.canvas).to(device) > MOTION_MASK_RATE  # (H, W)
        clip = torch.cat([shared.image, motion * mask.to(dtype)], dim=2)  # (1, 3, 3, H, W)
        latent_frames = self.components.transformer.config.latent_frames
        posterior = noise.posterior(f"motion{segment}", self._posterior_shape())
        concat = self.components.vae.encode_condition(clip, latent_frames, noise=posterior)  # (1, T, C, h, w)
        audio = segment_audio_chunk(shared.features.windowed, segment)[None]  # (1, 49, 5, layers, hidden)
        return SegmentConditions(concat.to(device), shared.text, audio.to(device), shared.face)

    def denoise_segment(
        self,
        shared: JobConditions,
        segment: int,
        conditions: SegmentConditions,
        noise: NoiseSource,
        on_step: Callable[[int, int], None],
    ) -> torch.Tensor:
        """Sample the segment's latents from its initial noise: (1, T, C, h, w) float32."""
        transformer, device = self.components.transformer, self.placement.device
        config = transformer.config
        shape = (1, config.latent_frames, config.out_channels, *self._latent_hw())
        streamed = (transformer.blocks,) if self.block_streamer is not None else ()
        with self._visiting(transformer, self.placement.offload_transformer, skip=streamed):
            if self.speedups.reference_kv_once and isinstance(shared.reference[0], torch.Tensor):
                # Once per job: the tokens' keys and values replace the tokens (the same values every step).
                shared.reference = transformer.reference_kv(shared.reference)
            guided = self.parallel.model_fn if self.parallel is not None else guidance_model_fn
            model_fn = self.presets.model_fn(transformer, conditions, shared.reference, shared.sampler.num_steps, guided)
            return sample(
                model_fn,
                to_device(noise.initial(segment, shape), device),
                shared.sampler,
                lambda step, like: to_device(noise.step(segment, step, like), like.device),
                on_step=on_step,
                schedule=shared.schedule,
            )

    def decode_segment(self, latents: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        """Decode latents to (next motion frames, the segment's new canvas frames).

        Returns the last 2 decoded frames, (1, 3, 2, H, W) in [-1, 1] in the model dtype, and the
        frames after the motion frames as uint8 (47, H, W, 3), by truncation as upstream writes them.
        """
        decoded = self.components.vae.decode(latents.to(self.placement.dtype))  # (1, 49, 3, H, W) float32 in [0, 1]
        motion = decoded[:, -MOTION_FRAMES:].permute(0, 2, 1, 3, 4).to(self.placement.dtype) * 2 - 1
        frames = (decoded[0, MOTION_FRAMES:] * 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return motion, frames

    def _output_frames(self, frames: np.ndarray, shared: JobConditions) -> np.ndarray:
        """Canvas frames -> the output region at the output size (the tiny model's canvas is smaller)."""
        video = crop_output_frames(frames, shared.plan_crop)
        height, width = shared.output_size
        if video.shape[1:3] == (height, width):
            return video
        tensor = torch.from_numpy(np.ascontiguousarray(video)).permute(0, 3, 1, 2)  # (n, 3, h, w) uint8
        resized = torch.nn.functional.interpolate(tensor, size=(height, width), mode="nearest")  # no float copy
        return np.ascontiguousarray(resized.permute(0, 2, 3, 1).numpy())

    @contextlib.contextmanager
    def _visiting(self, module: nn.Module, offloaded: bool | None = None, skip: tuple[nn.Module, ...] = ()) -> Iterator[None]:
        """Run ``module`` on the compute device; its resting copy stays where it waits.

        ``offloaded``: whether ``module`` rests on the offload device (default: ``placement.offload``,
        the rule for the once-per-job networks). ``skip``: submodules that stay where they are
        (streamed blocks, which visit on their own). The weights are copied to the device for the
        duration of the block (tied tensors once) and the copies are dropped afterwards, so nothing
        is copied back and the resting tensors are never reallocated.
        """
        p = self.placement
        offloaded = p.offload if offloaded is None else offloaded
        if not offloaded or p.device == p.offload_device:
            yield
            return
        restore = replace_tensors(module, lambda t: to_device(t, p.device), skip)  # queued, not waited for
        try:
            yield
        finally:
            restore()
            if p.device.type == "cuda":
                torch.cuda.empty_cache()


@contextlib.contextmanager
def _work_dir(path: Path | None) -> Iterator[Path]:
    """The job's folder, or a temporary one removed afterwards."""
    if path is not None:
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="hallo3-") as tmp:
        yield Path(tmp)


__all__ = [
    "Hallo3Components",
    "Hallo3Pipeline",
    "NoiseSource",
    "Placement",
    "SeededNoise",
    "JobConditions",
]
