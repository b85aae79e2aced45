"""The job runner behind ``handler.py``.

:class:`Worker` owns the settings and the one pipeline of the process. Its async :meth:`Worker.handle`
is the Runpod handler: the job runs in a worker thread (``asyncio.to_thread``) so the event loop
stays free for the SDK's stop signals, and a cancelled task sets the job's cancel event, which the
pipeline checks between segments.

One job goes through: schema check -> fetch media -> decode and check them once -> the output plan
(inline bitrate cap or ``OUTPUT_TOO_LARGE``, free disk space; :mod:`.budget`) -> ``pipeline.prepare`` ->
``pipeline.generate``, each segment's frames encoded as they arrive -> the segments joined with the
original audio (no second encode) -> delivery. Every failure becomes
``{"error": <sentence>, "error_code": <code>}`` (plus ``"refresh_worker": true`` after GPU
faults and on a full disk); tracebacks only go to the log. The job's temporary folder is removed in
every case; at start-up only the folders of processes that have ended are removed (:mod:`.job_dirs`),
so several workers can share a work dir.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from hallo3_worker.conditioning.decode import decode_inputs
from hallo3_worker.errors import ErrorCode, UserFacingError
from hallo3_worker.interface import (
    Cancelled,
    GenerationRequest,
    GenerationResult,
    Preset,
    Progress,
    ResumeStateError,
    SegmentOutput,
    TalkingHeadPipeline,
    raise_if_cancelled,
)
from hallo3_worker.settings import Settings, load_settings
from hallo3_worker.timing import timed
from hallo3_worker.worker import budget, job_dirs, job_state, media
from hallo3_worker.worker.delivery import SegmentUploads, deliver, goes_inline, safe_key_part
from hallo3_worker.worker.inputs import describe, fetch_media
from hallo3_worker.worker.runtime import TINY_MODEL_WARNING, configure_logging, input_limits, load_pipeline
from hallo3_worker.worker.schema import JobSpec, parse_job

logger = logging.getLogger(__name__)

ProgressSender = Callable[[Mapping[str, Any], dict[str, Any]], None]

# Share of the whole job given to each worker stage in progress reports; generation gets the rest.
_STAGE_FRACTIONS = {"fetch": 0.0, "prepare": 0.03, "encode": 0.95, "deliver": 0.98}
_GENERATE_SPAN = (0.05, 0.95)
_CUDA_ERROR_MARKERS = ("CUDA error", "CUDA driver", "cuDNN error", "CUDNN_STATUS", "CUBLAS_STATUS",
                       "device-side assert", "NCCL error")


def _runpod_progress_update(job: Mapping[str, Any], payload: dict[str, Any]) -> None:
    from runpod.serverless import progress_update  # the SDK import is slow; keep it lazy

    progress_update(dict(job), payload)


class Worker:
    """Runs jobs against one pipeline that was loaded once."""

    def __init__(
        self,
        settings: Settings,
        pipeline: TalkingHeadPipeline,
        progress_sender: ProgressSender | None = None,
    ) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self._send_progress = progress_sender or _runpod_progress_update
        self._pipeline_lock = threading.Lock()  # one generation at a time, even after a cancel
        settings.work_dir.mkdir(parents=True, exist_ok=True)
        job_dirs.remove_orphaned_job_dirs(settings.work_dir)  # never the folders of jobs running in other processes

    # ------------------------------------------------------------------------------ async entry

    async def handle(self, job: dict[str, Any]) -> dict[str, Any]:
        """The Runpod handler. Re-raises ``CancelledError`` after asking the job to stop."""
        cancel = threading.Event()
        task = asyncio.ensure_future(asyncio.to_thread(self.run, job, cancel))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            cancel.set()
            logger.info("Job %s: cancel requested; stopping at the next segment", _job_ref(job))
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({task}, timeout=self.settings.cancel_grace_s)  # let it clean up
            raise

    # ------------------------------------------------------------------------------- sync path

    def run(self, job: Mapping[str, Any], cancel: threading.Event | None = None) -> dict[str, Any]:
        """Run one job to a result dict; never raises (except for process-level exits)."""
        cancel = cancel or threading.Event()
        ref = _job_ref(job)
        started = time.perf_counter()
        try:
            with job_dirs.job_dir(self.settings.work_dir, ref) as job_dir:
                output = self._run(job, cancel, job_dir, started)
            logger.info("Job %s: done in %.1f s", ref, time.perf_counter() - started)
            return output
        except UserFacingError as err:  # InputError and DeliveryError
            logger.info("Job %s: rejected with %s: %s", ref, err.code.value, err.message)
            return err.to_response()
        except Cancelled:
            logger.info("Job %s: cancelled", ref)
            return {"error": "The job was cancelled.", "error_code": ErrorCode.CANCELLED.value}
        except Exception as err:  # the last line of defence: log everything, return little
            disk_full = budget.disk_full_error(err, self.settings)
            if disk_full is not None:
                logger.error("Job %s: %s", ref, disk_full.message, exc_info=err)
                return disk_full.to_response()
            return _failure_response(err, ref)

    def _run(self, job: Mapping[str, Any], cancel: threading.Event, job_dir: Path, started: float) -> dict[str, Any]:
        timings: dict[str, float] = {}
        spec = parse_job(job, self.settings)
        warnings: list[str] = [TINY_MODEL_WARNING] if self.pipeline.is_tiny else []
        report = _ProgressReporter(job, self.settings.on_platform, self._send_progress)
        logger.info(
            "Job %s: image %s, audio %s, seed %d, steps %d, guidance %g, framing %s, preset %s, output %s",
            _job_ref(job), describe(spec.image), describe(spec.audio), spec.seed, spec.steps, spec.guidance,
            spec.framing.value, spec.preset.value, spec.output.mode.value,
        )

        report.stage("fetch")
        with timed(timings, "fetch"):
            image = fetch_media(spec.image, "image", job_dir / "image.bin", self.settings.max_image_bytes,
                                volume_root=self.settings.volume_root, timeout_s=self.settings.download_timeout_s,
                                deadline_s=self.settings.download_deadline_s)
            audio = fetch_media(spec.audio, "audio", job_dir / "audio.bin", self.settings.max_audio_bytes,
                                volume_root=self.settings.volume_root, timeout_s=self.settings.download_timeout_s,
                                deadline_s=self.settings.download_deadline_s)
        raise_if_cancelled(cancel)

        with timed(timings, "validate"):  # the one decode of both files; prepare and the mux use it
            inputs = decode_inputs(image.path, audio.path, input_limits(self.settings), spec.max_duration_s)
            # Known from the clip's length alone: the inline bitrate cap (or OUTPUT_TOO_LARGE) and the disk.
            plan = budget.plan_output(inputs.audio.duration_s, inputs.audio.channels,
                                      goes_inline(spec, self.settings), self.settings)
            budget.check_free_space(plan, self.settings)
        if plan.warning is not None:
            warnings.append(plan.warning)
        raise_if_cancelled(cancel)

        state, saved = self._claim_state(job, spec, [image.path, audio.path], plan)
        if saved is not None:
            spec = dataclasses.replace(spec, seed=saved.seed)  # a drawn seed is part of what was saved
            report.extra["resumed_from_segment"] = saved.next_segment + 1
        request = GenerationRequest(
            image_path=image.path,
            audio_path=audio.path,
            prompt=spec.prompt,
            seed=spec.seed,
            steps=spec.steps,
            guidance=spec.guidance,
            framing=spec.framing,
            separate_vocals=spec.separate_vocals,
            max_duration_s=spec.max_duration_s,
            preset=spec.preset,
            cache_threshold=spec.cache_threshold,
            cfg_fraction=spec.cfg_fraction,
            work_dir=job_dir,
            inputs=inputs,
        )
        uploads = SegmentUploads(spec, self.settings)
        with self._pipeline_lock, contextlib.closing(uploads):
            report.stage("prepare")
            with timed(timings, "prepare"):
                prepared = self.pipeline.prepare(request)
            raise_if_cancelled(cancel)
            encoder = _SegmentEncoder(job_dir / "segments", prepared.fps, self.settings, timings, spec.seed, state,
                                      saved, ready=functools.partial(self._segment_ready, uploads, report), plan=plan)
            with timed(timings, "generate"):
                try:
                    result = self.pipeline.generate(prepared, progress=report.pipeline, cancel=cancel,
                                                    on_frames=encoder.encode, resume=saved and saved.resume)
                except ResumeStateError as err:  # state never fails a job: start over
                    logger.warning("Job %s: %s; starting over", _job_ref(job), err)
                    encoder.start_over()
                    report.extra.clear()
                    result = self.pipeline.generate(prepared, progress=report.pipeline, cancel=cancel,
                                                    on_frames=encoder.encode)
        raise_if_cancelled(cancel)

        report.stage("encode")
        with timed(timings, "mux"):
            video = media.mux_segments(encoder.finished(), prepared.fps, inputs.audio, job_dir / "output.mp4")
        raise_if_cancelled(cancel)

        report.stage("deliver")
        with timed(timings, "deliver"):
            delivered = deliver(video.path, spec, self.settings)
        if state is not None:
            state.remove()
        for name, seconds in result.timings.items():
            timings[f"generate_{name}"] = round(float(seconds), 3)
        timings["total"] = round(time.perf_counter() - started, 3)
        return report.extra | {
            "video": delivered.video,
            "video_type": delivered.video_type,
            "seed": spec.seed,
            "width": video.width,
            "height": video.height,
            "fps": video.fps,
            "frames": video.frames,
            "duration_s": round(video.duration_s, 3),
            "audio_duration_s": round(prepared.audio_duration_s, 3),
            "has_audio": video.has_audio,
            "size_bytes": video.size_bytes,
            "gpu_peak_memory_gib": None if result.peak_memory_bytes is None else round(result.peak_memory_bytes / 2**30, 2),
            **_speed_report(spec, result),
            "timings": timings,
            "warnings": _unique(warnings + prepared.warnings + result.warnings + delivered.warnings),
        }

    def _segment_ready(self, uploads: SegmentUploads, report: _ProgressReporter, path: Path, done: SegmentOutput,
                       start_s: float, duration_s: float) -> None:
        """Hand a finished segment on early when the video goes to a bucket: uploaded, its URL in a progress update."""
        url = uploads.upload(path)
        if url is not None:
            report.segment_ready(done.segment, done.num_segments, url, start_s, duration_s)

    def _claim_state(self, job: Mapping[str, Any], spec: JobSpec, files: list[Path], plan: budget.OutputPlan
                     ) -> tuple[job_state.JobState | None, job_state.SavedProgress | None]:
        """This job's state folder and what it saved before, when saving is on (``HALLO3_JOB_STATE_DIR``)."""
        s = self.settings
        if s.job_state_dir is None:
            return None, None
        job_state.expire(s.job_state_dir, s.job_state_max_age_h * 3600)
        given_seed = (job.get("input") or {}).get("seed")  # a drawn seed is restored, not compared
        fields = {"prompt": spec.prompt, "seed": given_seed, "steps": spec.steps, "guidance": spec.guidance,
                  "framing": spec.framing.value, "separate_vocals": spec.separate_vocals,
                  "max_duration_s": spec.max_duration_s, "crf": s.video_crf, "preset": s.video_preset,
                  "vbv": [plan.maxrate_bps, plan.bufsize_bits],
                  "speed": [spec.preset.value, spec.cache_threshold, spec.cfg_fraction],
                  "model": str(s.weights_dir) if s.weights_dir else "tiny", "format": job_state.FORMAT}
        digest = job_state.input_digest(files, fields)
        state = job_state.JobState.claim(s.job_state_dir, _job_ref(job), digest, s.job_state_stale_after_s)
        saved = state.load() if state is not None else None
        if saved is not None:
            logger.info("Job %s: resuming after segment %d from saved state", _job_ref(job), saved.next_segment)
        return state, saved


# ---------------------------------------------------------------------------------- helpers


def create_worker(settings: Settings | None = None) -> Worker:
    """Read the settings, set up logging and load the pipeline: once per process."""
    settings = settings or load_settings()
    configure_logging(settings)
    return Worker(settings, load_pipeline(settings))


def _job_ref(job: Mapping[str, Any]) -> str:
    return safe_key_part(str(job.get("id") or "local"))


class _SegmentEncoder:
    """Encodes each segment the pipeline hands on into its own MP4 as soon as it arrives (no frames kept).

    With a job state the segments go into its folder and each is recorded there with the pipeline's
    resume state; saved segments of a resumed job come first.
    """

    def __init__(self, folder: Path, fps: int, settings: Settings, timings: dict[str, float], seed: int,
                 state: job_state.JobState | None, saved: job_state.SavedProgress | None,
                 ready: Callable[[Path, SegmentOutput, float, float], None] | None = None,
                 plan: budget.OutputPlan | None = None) -> None:
        self.folder = state.folder if state is not None else folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.fps, self.settings, self.timings, self.seed, self.state = fps, settings, timings, seed, state
        self.segments: list[Path] = list(saved.segments) if saved else []
        self.frames = saved.frames if saved else 0
        self.ready = ready  # called with (segment file, segment, start s, duration s) once it is encoded and saved
        self.vbv = (plan.maxrate_bps, plan.bufsize_bits) if plan is not None else (None, None)  # the inline cap

    def encode(self, done: SegmentOutput) -> None:
        frames = _checked_frames(done.frames)
        started = time.perf_counter()
        path = self.folder / f"segment_{done.segment:05d}.mp4"
        partial = path.with_name(f".{path.name}.partial")
        try:
            media.encode_segment(frames, self.fps, partial, first_frame=self.frames, crf=self.settings.video_crf,
                                 preset=self.settings.video_preset, maxrate_bps=self.vbv[0], bufsize_bits=self.vbv[1])
            partial.replace(path)
        except BaseException:
            partial.unlink(missing_ok=True)  # a full disk leaves no half-written segment behind
            raise
        self.segments.append(path)
        self.frames += len(frames)
        if self.state is not None:
            self.state.save(self.seed, path, len(frames), done.resume_state)
        self.timings["encode"] = round(self.timings.get("encode", 0.0) + time.perf_counter() - started, 3)
        if self.ready is not None:
            self.ready(path, done, (self.frames - len(frames)) / self.fps, len(frames) / self.fps)

    def start_over(self) -> None:
        self.segments, self.frames = [], 0
        if self.state is not None:
            self.state.clear()

    def finished(self) -> list[Path]:
        if not self.segments:
            raise RuntimeError("the pipeline handed on no frames")
        return self.segments


def _checked_frames(frames: np.ndarray) -> np.ndarray:
    """A segment's frames as (N, H, W, 3) uint8; anything else is a pipeline bug."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0 or min(frames.shape[1:3]) < 2:
        raise RuntimeError(f"pipeline handed on frames of shape {frames.shape}; expected (N, H, W, 3)")
    if frames.dtype != np.uint8:
        raise RuntimeError(f"pipeline handed on frames of dtype {frames.dtype}; expected uint8")
    return frames


def _speed_report(spec: JobSpec, result: GenerationResult) -> dict[str, Any]:
    """The result's preset fields: the preset, its "fast" knobs, and the denoiser's work as counted."""
    report: dict[str, Any] = {"preset": spec.preset.value}
    if spec.preset is Preset.FAST:
        report.update(cache_threshold=spec.cache_threshold, cfg_fraction=spec.cfg_fraction)
    report.update(denoiser_forwards=result.denoiser_forwards, cached_steps=result.cached_steps,
                  cond_only_steps=result.cond_only_steps)
    return report


def _unique(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _torch_error_types(*names: str) -> tuple[type, ...]:
    """Torch exception classes by attribute path, without importing torch if nothing did."""
    torch = sys.modules.get("torch")
    found: list[type] = []
    for name in names:
        obj: Any = torch
        for part in name.split("."):
            obj = getattr(obj, part, None) if obj is not None else None
        if isinstance(obj, type) and issubclass(obj, BaseException):
            found.append(obj)
    return tuple(found)


def _failure_response(err: Exception, ref: str) -> dict[str, Any]:
    """Classify an unexpected exception; the traceback goes to the log only."""
    message = str(err)
    parallel = sys.modules.get("hallo3_worker.parallel.denoise")  # loaded when several GPUs share the work
    if parallel is not None and isinstance(err, parallel.ParallelFailure):
        logger.error("Job %s: %s; asking for a fresh worker", ref, err)
        return {
            "error": f"The worker's GPU processes failed: {err}. The worker restarts; please retry.",
            "error_code": ErrorCode.GPU_ERROR.value,
            "refresh_worker": True,
        }
    oom_types = _torch_error_types("cuda.OutOfMemoryError", "OutOfMemoryError")
    is_oom = isinstance(err, RuntimeError) and "CUDA out of memory" in message
    if is_oom or (oom_types and isinstance(err, oom_types)):
        logger.exception("Job %s: GPU out of memory; asking for a fresh worker", ref)
        return {
            "error": "The GPU ran out of memory. The worker restarts; retry, or use shorter audio.",
            "error_code": ErrorCode.GPU_OUT_OF_MEMORY.value,
            "refresh_worker": True,
        }
    gpu_types = _torch_error_types("AcceleratorError")
    if (gpu_types and isinstance(err, gpu_types)) or (
        isinstance(err, RuntimeError) and any(marker in message for marker in _CUDA_ERROR_MARKERS)
    ):
        logger.exception("Job %s: GPU error; asking for a fresh worker", ref)
        return {
            "error": "The GPU failed while generating. The worker restarts; please retry.",
            "error_code": ErrorCode.GPU_ERROR.value,
            "refresh_worker": True,
        }
    logger.exception("Job %s: internal error", ref)
    return {
        "error": f"Internal error while processing job {ref}; the details are in the worker log.",
        "error_code": ErrorCode.INTERNAL_ERROR.value,
    }


class _ProgressReporter:
    """Turns stage changes and pipeline progress into coarse ``progress_update`` posts.

    One post per stage or segment change; only on the platform (locally the SDK would post to a
    placeholder URL), always logged.
    """

    def __init__(self, job: Mapping[str, Any], on_platform: bool, sender: ProgressSender) -> None:
        self.job = job
        self.on_platform = on_platform
        self.sender = sender
        self.extra: dict[str, Any] = {}  # sent with every update and returned with the result
        self.segment_urls: list[str] = []  # every update repeats them: a poller sees only the latest update
        self._last: tuple[Any, ...] | None = None

    def stage(self, name: str) -> None:
        self._emit({"stage": name, "progress": _STAGE_FRACTIONS.get(name, 0.0)})

    def pipeline(self, progress: Progress) -> None:
        low, high = _GENERATE_SPAN
        fraction = min(1.0, max(0.0, float(progress.fraction)))
        payload: dict[str, Any] = {"stage": progress.stage, "progress": round(low + (high - low) * fraction, 3)}
        if progress.segment is not None and progress.num_segments:
            payload["segment"] = progress.segment + 1  # 1-based for people
            payload["num_segments"] = progress.num_segments
        self._emit(payload)

    def segment_ready(self, segment: int, num_segments: int, url: str, start_s: float, duration_s: float) -> None:
        self.segment_urls.append(url)
        low, high = _GENERATE_SPAN
        self._emit({"stage": "segment_ready", "progress": round(low + (high - low) * (segment + 1) / num_segments, 3),
                    "segment": segment + 1, "num_segments": num_segments, "segment_url": url,
                    "segment_start_s": round(start_s, 3), "segment_duration_s": round(duration_s, 3)})

    def _emit(self, payload: dict[str, Any]) -> None:
        payload.update(self.extra)
        if self.segment_urls:
            payload["segment_urls"] = list(self.segment_urls)
        key = (payload["stage"], payload.get("segment"))
        if key == self._last:
            return
        self._last = key
        segment = f" segment {payload['segment']}/{payload['num_segments']}" if "segment" in payload else ""
        logger.info("Job %s: %s%s (%.0f%%)", _job_ref(self.job), payload["stage"], segment,
                    100 * payload["progress"])
        if not self.on_platform:
            return
        try:
            self.sender(self.job, payload)
        except Exception:  # progress is best effort; it must never fail the job
            logger.warning("Job %s: progress update failed", _job_ref(self.job), exc_info=True)


__all__ = ["Worker", "create_worker"]
