"""Several GPUs per worker, worker side: a failed rank fails the job and ends the process; presets."""

from __future__ import annotations

import asyncio
import sys
import threading
from typing import Any

import pytest
from fake_pipeline import NoiseTalkingHeadPipeline
from worker_support import REPO_ROOT, b64

from hallo3_worker.errors import ErrorCode
from hallo3_worker.interface import GenerationResult, PreparedJob, ProgressCallback
from hallo3_worker.parallel.denoise import ParallelFailure
from hallo3_worker.settings import Settings
from hallo3_worker.worker.ranks import serving_settings
from hallo3_worker.worker.service import Worker

FAILURE = "its 2 ranks fell out of step (rank 1 (pid 4242) exited with code -9; collective timeout 300 s)"


@pytest.fixture
def inputs(face_jpg: bytes, short_wav: bytes) -> dict[str, Any]:
    return {"image": b64(face_jpg), "audio": b64(short_wav)}


class FailingRanksPipeline(NoiseTalkingHeadPipeline):
    def generate(self, job: PreparedJob, progress: ProgressCallback | None = None,
                 cancel: threading.Event | None = None, on_frames=None, resume=None) -> GenerationResult:
        raise ParallelFailure(FAILURE)


class FakeRanks:
    def __init__(self, failure: str | None) -> None:
        self.failure = failure
        self.closed = 0
        self.layout = type("Layout", (), {"world_size": 2})()

    def close(self) -> None:
        self.closed += 1


def test_a_failed_rank_fails_the_job_and_refreshes_the_worker(make_runner, settings: Settings, inputs) -> None:
    result = make_runner(settings, FailingRanksPipeline(settings))(inputs)
    assert result["error_code"] == ErrorCode.GPU_ERROR.value
    assert result["refresh_worker"] is True
    assert "rank 1 (pid 4242) exited with code -9" in result["error"] and "retry" in result["error"]


@pytest.mark.parametrize("failure", [None, FAILURE])
def test_handler_exits_with_status_1_after_the_ranks_failed(monkeypatch: pytest.MonkeyPatch, settings: Settings,
                                                            inputs, failure: str | None) -> None:
    monkeypatch.syspath_prepend(str(REPO_ROOT))
    sys.modules.pop("handler", None)
    import handler

    exits: list[int] = []
    ranks = FakeRanks(failure)
    monkeypatch.setattr(handler, "_worker", Worker(settings, NoiseTalkingHeadPipeline(settings)))
    monkeypatch.setattr(handler, "_ranks", ranks)
    monkeypatch.setattr(handler, "FAULT_EXIT_DELAY_S", 0.01)
    monkeypatch.setattr(handler.os, "_exit", exits.append)

    async def job_then_wait() -> dict[str, Any]:
        result = await handler.handler({"id": "h", "input": inputs})
        await asyncio.sleep(0.2)  # the SDK would post the result meanwhile
        return result

    result = asyncio.run(job_then_wait())
    assert "video" in result  # the job itself is answered first
    assert exits == ([1] if failure else [])
    assert ranks.closed == (1 if failure else 0)


def test_several_ranks_serve_the_exact_preset_only(settings: Settings) -> None:
    assert serving_settings(settings, None) is settings
    narrowed = serving_settings(settings, FakeRanks(None))
    assert narrowed.presets == ("exact",)
    assert serving_settings(narrowed, FakeRanks(None)) is narrowed
