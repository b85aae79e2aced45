"""Saved job state: what is kept after each segment, and why bad state never fails a job."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import pytest
from worker_support import b64, voice_like, wav_bytes

from fake_pipeline import NoiseTalkingHeadPipeline
from hallo3_worker.interface import SegmentOutput
from hallo3_worker.settings import Settings, load_settings
from hallo3_worker.worker import job_state

JOB_ID = "long-job"


class DiesAfterFirstSegment(NoiseTalkingHeadPipeline):
    """Hands on segment 0 with a resume state, then fails as a lost GPU would."""

    def generate(self, job, progress=None, cancel=None, on_frames=None, resume=None):  # type: ignore[override]
        def first_only(done: SegmentOutput) -> None:
            on_frames(SegmentOutput(done.segment, done.num_segments, done.frames, b"state after 0"))
            raise RuntimeError("worker lost")

        return super().generate(job, progress, cancel, first_only)


@pytest.fixture
def state_settings(make_settings, tmp_path: Path) -> Settings:
    return make_settings(job_state_dir=tmp_path / "state")


@pytest.fixture
def inputs(face_jpg: bytes) -> dict:
    return {"image": b64(face_jpg), "audio": b64(wav_bytes(voice_like(2.5))), "seed": 3}  # 63 frames: 2 segments


def _interrupted(make_runner, settings: Settings, inputs: dict) -> Path:
    result = make_runner(settings, DiesAfterFirstSegment(settings))(inputs, id=JOB_ID)
    assert result["error_code"] == "INTERNAL_ERROR"
    folder = settings.job_state_dir / JOB_ID
    saved = json.loads((folder / "job.json").read_text())
    assert [s["file"] for s in saved["segments"]] == ["segment_00000.mp4"] and saved["seed"] == 3
    assert (folder / "resume.bin").read_bytes() == b"state after 0"
    return folder


def test_a_failed_job_keeps_its_segments_and_a_finished_one_removes_them(make_runner, state_settings, inputs,
                                                                          caplog) -> None:
    folder = _interrupted(make_runner, state_settings, inputs)
    with caplog.at_level(logging.INFO):
        # This pipeline cannot use the saved resume state: the job starts over instead of failing.
        result = make_runner(state_settings)(inputs, id=JOB_ID)
    assert "error" not in result and result["frames"] == 63 and "resumed_from_segment" not in result
    assert "resuming after segment 1" in caplog.text and "starting over" in caplog.text
    assert not folder.exists()


@pytest.mark.parametrize("damage", ["other input", "truncated segment", "garbage manifest", "missing resume"])
def test_bad_state_is_logged_and_the_job_starts_over(make_runner, state_settings, inputs, damage, caplog) -> None:
    folder = _interrupted(make_runner, state_settings, inputs)
    if damage == "other input":
        inputs = {**inputs, "audio": b64(wav_bytes(voice_like(2.5, seed=9)))}
    elif damage == "truncated segment":
        segment = folder / "segment_00000.mp4"
        segment.write_bytes(segment.read_bytes()[:100])
    elif damage == "garbage manifest":
        (folder / "job.json").write_text("{not json")
    else:
        (folder / "resume.bin").unlink()
    with caplog.at_level(logging.WARNING):
        result = make_runner(state_settings)(inputs, id=JOB_ID)
    assert "error" not in result and result["frames"] == 63
    assert "is not usable" in caplog.text and "starting over" in caplog.text
    assert not folder.exists()


def test_an_unusable_state_folder_does_not_fail_the_job(make_runner, state_settings, inputs, caplog) -> None:
    state_settings.job_state_dir.mkdir(parents=True)
    (state_settings.job_state_dir / JOB_ID).write_text("a file where the job's folder should be")
    with caplog.at_level(logging.WARNING):
        result = make_runner(state_settings)(inputs, id=JOB_ID)
    assert "error" not in result and "running without saving" in caplog.text


def test_a_job_held_by_a_live_worker_runs_without_saving(make_runner, state_settings, inputs, caplog) -> None:
    folder = state_settings.job_state_dir / JOB_ID
    folder.mkdir(parents=True)
    import socket

    (folder / "lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid()}))  # alive
    with caplog.at_level(logging.WARNING):
        result = make_runner(state_settings, DiesAfterFirstSegment(state_settings))(inputs, id=JOB_ID)
    assert result["error_code"] == "INTERNAL_ERROR" and "another worker holds" in caplog.text
    assert sorted(p.name for p in folder.iterdir()) == ["lock"]  # nothing written beside the other worker


def test_old_state_expires(tmp_path: Path) -> None:
    root = tmp_path / "state"
    (root / "old").mkdir(parents=True)
    (root / "old" / "job.json").write_text("{}")
    (root / "recent").mkdir()
    (root / "recent" / "job.json").write_text("{}")
    long_ago = time.time() - 4 * 3600
    os.utime(root / "old" / "job.json", (long_ago, long_ago))
    job_state.expire(root, max_age_s=3600)
    assert sorted(p.name for p in root.iterdir()) == ["recent"]


def test_the_state_folder_setting(tmp_path: Path) -> None:
    volume = tmp_path / "volume"
    assert load_settings({"HALLO3_VOLUME_ROOT": str(volume)}).job_state_dir is None  # no volume mounted: off
    volume.mkdir()
    assert load_settings({"HALLO3_VOLUME_ROOT": str(volume)}).job_state_dir == volume / "hallo3-job-state"
    assert load_settings({"HALLO3_VOLUME_ROOT": str(volume), "HALLO3_JOB_STATE_DIR": "off"}).job_state_dir is None
    chosen = load_settings({"HALLO3_JOB_STATE_DIR": str(tmp_path / "elsewhere"), "HALLO3_JOB_STATE_MAX_AGE_H": "2"})
    assert chosen.job_state_dir == tmp_path / "elsewhere" and chosen.job_state_max_age_h == 2
