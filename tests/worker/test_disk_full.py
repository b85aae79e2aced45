"""A full work disk: a stable WORKER_DISK_FULL answer that asks for a fresh worker, before or during a job."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import pytest
from worker_support import b64

from hallo3_worker.errors import ErrorCode
from hallo3_worker.settings import Settings
from fake_pipeline import NoiseTalkingHeadPipeline
from hallo3_worker.worker import budget, media
from hallo3_worker.worker.service import Worker

FULL_DEVICE = Path("/dev/full")  # every write fails with ENOSPC, as on a full disk


class CountingPipeline(NoiseTalkingHeadPipeline):
    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self.prepared = self.generated = 0

    def prepare(self, request):  # type: ignore[no-untyped-def]
        self.prepared += 1
        return super().prepare(request)

    def generate(self, job, progress=None, cancel=None, on_frames=None, resume=None):  # type: ignore[no-untyped-def]
        self.generated += 1
        return super().generate(job, progress, cancel, on_frames, resume)


@pytest.fixture
def inputs(face_jpg: bytes, short_wav: bytes) -> dict[str, Any]:
    return {"image": b64(face_jpg), "audio": b64(short_wav), "seed": 8}


@pytest.mark.skipif(not FULL_DEVICE.exists(), reason="needs /dev/full")
def test_a_write_that_finds_the_disk_full(make_runner, settings: Settings, inputs, monkeypatch: pytest.MonkeyPatch,
                                          progress) -> None:
    """The real encoder writes the segment to /dev/full and PyAV raises ENOSPC, as on a full work dir."""
    real_encode = media.encode_segment
    written: list[Path] = []

    def encode_on_a_full_disk(frames, fps, out_path, **options):  # type: ignore[no-untyped-def]
        written.append(out_path)
        return real_encode(frames, fps, FULL_DEVICE, **options)

    monkeypatch.setattr(media, "encode_segment", encode_on_a_full_disk)
    result = make_runner(settings)(inputs)  # the runner also checks that no job folder is left
    assert set(result) == {"error", "error_code", "refresh_worker"}, result
    assert result["error_code"] == ErrorCode.WORKER_DISK_FULL.value and result["refresh_worker"] is True
    assert str(settings.work_dir) in result["error"] and " MB free" in result["error"]
    assert written and not written[0].parent.exists()


def test_disk_full_reaches_the_sdk_as_a_worker_refresh(make_settings, inputs) -> None:
    """The real SDK job runner turns refresh_worker into stopPod: the platform replaces the worker."""
    from runpod.serverless.modules.rp_job import run_job as sdk_run_job

    settings = make_settings(disk_reserve_mb=1e12)
    worker = Worker(settings, NoiseTalkingHeadPipeline(settings))
    outcome = asyncio.run(sdk_run_job(worker.handle, {"id": "sdk-disk", "input": inputs}))
    assert outcome["stopPod"] is True and outcome["output"] == {"error_code": "WORKER_DISK_FULL"}
    assert list(settings.work_dir.iterdir()) == []


def test_free_space_is_checked_before_any_model_work(make_runner, make_settings, inputs, progress) -> None:
    """The estimate for the clip plus HALLO3_DISK_RESERVE_MB is more than the work disk has: fail at once."""
    free_mb = shutil.disk_usage(make_settings().work_dir.parent).free / 1e6
    settings = make_settings(disk_reserve_mb=free_mb + 1e6, on_platform=True)
    pipeline = CountingPipeline(settings)
    result = make_runner(settings, pipeline)(inputs)
    assert result["error_code"] == ErrorCode.WORKER_DISK_FULL.value and result["refresh_worker"] is True, result
    assert str(settings.work_dir) in result["error"] and "HALLO3_DISK_RESERVE_MB" in result["error"]
    assert (pipeline.prepared, pipeline.generated) == (0, 0)
    assert [p["stage"] for _, p in progress.calls] == ["fetch"]


def test_the_estimate_follows_the_clip_and_the_output(settings: Settings) -> None:
    short = budget.plan_output(10.0, 2, inline=False, settings=settings)
    long = budget.plan_output(60.0, 2, inline=False, settings=settings)
    assert 5.5 * short.mp4_bytes < long.mp4_bytes < 6.5 * short.mp4_bytes
    assert long.mp4_bytes >= budget.FULL_QUALITY_BPS * 60 / 8  # uncapped: room for a full-quality video
    capped = budget.plan_output(60.0, 2, inline=True, settings=settings)
    assert capped.mp4_bytes <= settings.inline_output_max_bytes * 3 / 4  # an inline video is small by design
