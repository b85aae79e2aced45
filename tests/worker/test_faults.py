"""GPU faults, internal errors, cancellation and clean-up, through the handler."""

from __future__ import annotations

import dataclasses

import asyncio
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from worker_support import REPO_ROOT, b64

from hallo3_worker.errors import ErrorCode
from hallo3_worker.interface import Cancelled, GenerationResult, PreparedJob, Progress, ProgressCallback
from hallo3_worker.settings import Settings
from fake_pipeline import NoiseTalkingHeadPipeline
from hallo3_worker.worker import job_dirs
from hallo3_worker.worker.service import Worker


class RaisingPipeline(NoiseTalkingHeadPipeline):
    """prepare() is real; generate() raises the given exception."""

    def __init__(self, settings: Settings, error: BaseException) -> None:
        super().__init__(settings)
        self.error = error

    def generate(self, job: PreparedJob, progress: ProgressCallback | None = None,
                 cancel: threading.Event | None = None, on_frames=None, resume=None) -> GenerationResult:
        raise self.error


class BlockingPipeline(NoiseTalkingHeadPipeline):
    """generate() starts segment 1, then waits for the cancel event like a long denoise would."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.started = threading.Event()
        self.saw_cancel = False

    def generate(self, job: PreparedJob, progress: ProgressCallback | None = None,
                 cancel: threading.Event | None = None, on_frames=None, resume=None) -> GenerationResult:
        assert cancel is not None
        if progress is not None:
            progress(Progress("denoise", 0.0, 0, 3))
        self.started.set()
        if cancel.wait(timeout=20):  # the segment boundary where a real pipeline checks
            self.saw_cancel = True
            raise Cancelled("cancelled between segments")
        raise AssertionError("the cancel event was never set")


@pytest.fixture
def inputs(face_jpg: bytes, short_wav: bytes) -> dict[str, Any]:
    return {"image": b64(face_jpg), "audio": b64(short_wav)}


@pytest.mark.parametrize(
    "error",
    [
        torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
        RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.10 GiB total capacity)"),
    ],
    ids=["OutOfMemoryError", "RuntimeError"],
)
def test_gpu_out_of_memory_refreshes_the_worker(make_runner, settings: Settings, inputs, error) -> None:
    result = make_runner(settings, RaisingPipeline(settings, error))(inputs)
    assert result["error_code"] == ErrorCode.GPU_OUT_OF_MEMORY.value
    assert result["refresh_worker"] is True
    assert "Tried to allocate" not in result["error"]


def test_cuda_error_refreshes_the_worker(make_runner, settings: Settings, inputs) -> None:
    error = RuntimeError("CUDA error: an illegal memory access was encountered")
    result = make_runner(settings, RaisingPipeline(settings, error))(inputs)
    assert result == {
        "error": "The GPU failed while generating. The worker restarts; please retry.",
        "error_code": ErrorCode.GPU_ERROR.value,
        "refresh_worker": True,
    }


def test_internal_errors_are_generic_and_logged(make_runner, settings: Settings, inputs,
                                                caplog: pytest.LogCaptureFixture) -> None:
    error = KeyError("internal-detail-/opt/secret/path")
    with caplog.at_level(logging.ERROR, logger="hallo3_worker"):
        result = make_runner(settings, RaisingPipeline(settings, error))(inputs)
    assert set(result) == {"error", "error_code"}
    assert result["error_code"] == ErrorCode.INTERNAL_ERROR.value
    assert "test-job-1" in result["error"]
    assert "internal-detail" not in result["error"] and "Traceback" not in result["error"]
    assert "Traceback" in caplog.text and "internal-detail-/opt/secret/path" in caplog.text  # the log has it all
    assert "refresh_worker" not in result


def test_bad_pipeline_output_is_an_internal_error(make_runner, settings: Settings, inputs) -> None:
    class WrongFrames(NoiseTalkingHeadPipeline):
        def generate(self, job, progress=None, cancel=None, on_frames=None, resume=None):  # type: ignore[override]
            return super().generate(job, progress, cancel, lambda done: on_frames(
                dataclasses.replace(done, frames=done.frames.astype("float32"))))

    class NoFrames(NoiseTalkingHeadPipeline):
        def generate(self, job, progress=None, cancel=None, on_frames=None, resume=None):  # type: ignore[override]
            return super().generate(job, progress, cancel)  # keeps the frames instead of handing them on

    assert make_runner(settings, WrongFrames(settings))(inputs)["error_code"] == ErrorCode.INTERNAL_ERROR.value
    assert make_runner(settings, NoFrames(settings))(inputs)["error_code"] == ErrorCode.INTERNAL_ERROR.value


def test_sdk_turns_refresh_worker_into_stop_pod(settings: Settings, inputs) -> None:
    """The real SDK job runner pops error/refresh_worker from our dict as documented."""
    from runpod.serverless.modules.rp_job import run_job as sdk_run_job

    worker = Worker(settings, RaisingPipeline(settings, torch.cuda.OutOfMemoryError("CUDA out of memory")))
    outcome = asyncio.run(sdk_run_job(worker.handle, {"id": "sdk-1", "input": inputs}))
    assert outcome["stopPod"] is True
    assert isinstance(outcome["error"], str) and outcome["output"] == {"error_code": "GPU_OUT_OF_MEMORY"}


def test_cancel_stops_between_segments_and_cleans_up(settings: Settings, inputs, progress) -> None:
    pipeline = BlockingPipeline(settings)
    worker = Worker(settings, pipeline, progress_sender=progress)

    async def scenario() -> None:
        task = asyncio.create_task(worker.handle({"id": "cancel-me", "input": inputs}))
        started = await asyncio.to_thread(pipeline.started.wait, 20)
        assert started, "generation never started"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=20)

    asyncio.run(scenario())
    assert pipeline.saw_cancel
    assert list(settings.work_dir.iterdir()) == []


def test_a_cancelled_event_before_generation_returns_cancelled(settings: Settings, inputs) -> None:
    worker = Worker(settings, NoiseTalkingHeadPipeline(settings))
    cancel = threading.Event()
    cancel.set()
    assert worker.run({"id": "c", "input": inputs}, cancel) == {"error": "The job was cancelled.",
                                                                "error_code": "CANCELLED"}
    assert list(settings.work_dir.iterdir()) == []


def test_stale_job_folders_are_removed_at_start_up(settings: Settings) -> None:
    """A folder without an owner record (an older version's) once it is old; owners: test_job_dirs.py."""
    stale = settings.work_dir / "job-crashed-abc"
    stale.mkdir(parents=True)
    (stale / "image.jpg").write_bytes(b"x")
    old = time.time() - job_dirs.UNRECORDED_GRACE_S - 1
    os.utime(stale, (old, old))
    keep = settings.work_dir / "unrelated"
    keep.mkdir()
    Worker(settings, NoiseTalkingHeadPipeline(settings))
    assert not stale.exists() and keep.exists()
    keep.rmdir()


def test_handler_module_exposes_the_async_handler(monkeypatch: pytest.MonkeyPatch, settings: Settings,
                                                  inputs) -> None:
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    sys.modules.pop("handler", None)
    import handler

    assert asyncio.iscoroutinefunction(handler.handler)
    assert handler._worker is None  # importing loads no model
    monkeypatch.setattr(handler, "_worker", Worker(settings, NoiseTalkingHeadPipeline(settings)))
    result = asyncio.run(handler.handler({"id": "h", "input": {**inputs, "seed": 77}}))
    assert result["seed"] == 77 and result["video_type"] == "base64"


def test_unusable_weights_refuse_to_start(tmp_path: Path) -> None:
    """Configured weights that are missing or empty stop the start-up with the folder named; unset is tiny."""
    from hallo3_worker.weights import WeightsError
    from hallo3_worker.worker.runtime import load_pipeline

    empty = tmp_path / "weights"
    empty.mkdir()
    with pytest.raises(WeightsError, match="holds no Hallo3 weights") as caught:
        load_pipeline(Settings(work_dir=tmp_path, weights_dir=empty, device="cpu"))
    assert caught.value.path == empty and str(empty) in str(caught.value)
    with pytest.raises(WeightsError, match="the configured weights folder does not exist"):
        load_pipeline(Settings(work_dir=tmp_path, weights_dir=tmp_path / "absent", device="cpu"))
    assert load_pipeline(Settings(work_dir=tmp_path)).is_tiny


def test_device_and_dtype_come_from_settings(tmp_path: Path) -> None:
    from hallo3_worker.worker.runtime import resolve_device, resolve_dtype

    auto = Settings(work_dir=tmp_path)
    device = resolve_device(auto)
    available = torch.accelerator.is_available()
    assert device.type == (torch.accelerator.current_accelerator().type if available else "cpu")
    assert resolve_dtype(auto, torch.device("cpu")) is torch.float32
    explicit = Settings(work_dir=tmp_path, device="cpu", dtype="float16")
    assert resolve_device(explicit) == torch.device("cpu") and resolve_dtype(explicit, device) is torch.float16
    with pytest.raises(ValueError):
        resolve_dtype(Settings(work_dir=tmp_path, dtype="float_sixteen"), device)
