"""Whole jobs on several ranks: the same frames as one rank, and a rank that stops fails the job cleanly.

The pipeline tests make this pytest process rank 0 (as the worker's own process is) and start the
other ranks with :func:`~hallo3_worker.worker.ranks.start_ranks`, so the serial and the parallel
run share one tiny pipeline. The script tests run ``scripts/run_job.py --ranks 2`` end to end.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import av
import numpy as np
import psutil
import pytest

from media_files import write_speech

from hallo3_worker.interface import GenerationRequest
from hallo3_worker.settings import Settings
from hallo3_worker.tiny import build_tiny_pipeline
from hallo3_worker.worker.ranks import start_ranks

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "tests" / "assets"
MAX_LEVEL_DIFF = 1  # uint8 levels
MAX_DIFF_SHARE = 1e-4  # 0.01 % of the pixels may differ (by at most one level)


def _frames_close(serial: np.ndarray, parallel: np.ndarray) -> tuple[int, float]:
    assert serial.shape == parallel.shape and len(serial) > 0
    diff = np.abs(serial.astype(np.int16) - parallel.astype(np.int16))
    return int(diff.max()), float((diff > 0).mean())


@pytest.fixture(scope="module")
def speech_1s(tmp_path_factory) -> Path:
    return write_speech(tmp_path_factory.mktemp("audio") / "speech_1s.wav", 1.0)


@pytest.fixture(scope="module")
def pipeline_job(speech_1s, tmp_path_factory):
    pipeline = build_tiny_pipeline()
    request = GenerationRequest(image_path=ASSETS / "face.jpg", audio_path=speech_1s, prompt="A person is talking.",
                                seed=3, steps=2, work_dir=tmp_path_factory.mktemp("job"))
    job = pipeline.prepare(request)
    return pipeline, job, pipeline.generate(job).frames


@pytest.mark.parametrize("ranks", [2, 4])  # 2: CFG-parallel; 4: CFG 2 x Ulysses 2 (the tiny model has 2 heads)
def test_pipeline_on_ranks_gives_the_serial_frames(pipeline_job, ranks: int, monkeypatch) -> None:
    pipeline, job, serial = pipeline_job
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the spawned ranks share two CPU cores
    started = start_ranks(Settings(), ranks)
    try:
        started.attach(pipeline)
        result = pipeline.generate(job)
        parallel = result.frames
    finally:
        started.close()
        pipeline.parallel = None
    level, share = _frames_close(serial, parallel)
    assert level <= MAX_LEVEL_DIFF and share <= MAX_DIFF_SHARE, (level, share)
    assert result.denoiser_forwards == job.request.steps  # one segment; counted on several ranks too
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                   for pid in started.followers.pids)


# ------------------------------------------------------------------------------ run_job.py


def _job_file(tmp_path: Path, speech: Path, steps: int) -> Path:
    job = {"input": {
        "image": "data:image/jpeg;base64," + base64.b64encode((ASSETS / "face.jpg").read_bytes()).decode(),
        "audio": "data:audio/wav;base64," + base64.b64encode(speech.read_bytes()).decode(),
        "prompt": "A person is talking.", "seed": 5, "steps": steps,
    }}  # fmt: skip
    path = tmp_path / f"job_{steps}.json"
    path.write_text(json.dumps(job))
    return path


def _run_job(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "run_job.py"), *args], capture_output=True,
                          text=True, timeout=timeout, check=False, env=env)


def _decoded(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def test_run_job_ranks_2_gives_the_frames_of_ranks_1(speech_1s, tmp_path: Path) -> None:
    job = _job_file(tmp_path, speech_1s, steps=2)
    runs = {}
    for ranks in (1, 2):
        done = _run_job(str(job), str(tmp_path / f"r{ranks}.mp4"), "--ranks", str(ranks),
                        "--frames", str(tmp_path / f"r{ranks}.npy"))
        assert done.returncode == 0, done.stderr[-3000:]
        runs[ranks] = np.load(tmp_path / f"r{ranks}.npy")
    level, share = _frames_close(runs[1], runs[2])
    assert level <= MAX_LEVEL_DIFF and share <= MAX_DIFF_SHARE, (level, share)
    assert _psnr(_decoded(tmp_path / "r1.mp4"), _decoded(tmp_path / "r2.mp4")) >= 40.0


@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_a_rank_that_stops_fails_the_job_and_leaves_no_process(fault: str, speech_1s, tmp_path: Path) -> None:
    """Kill (SIGKILL) or freeze (SIGSTOP) rank 1 while the denoising runs: the job fails with an error
    naming the cause within the collective timeout, run_job exits 1 and no rank is left."""
    timeout_s = 30 if fault == "killed" else 10  # a dead rank is noticed at once; a frozen one at the timeout
    job = _job_file(tmp_path, speech_1s, steps=50)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HALLO3_COLLECTIVE_TIMEOUT_S": str(timeout_s)}
    process = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "run_job.py"), str(job),
                                str(tmp_path / "out.mp4"), "--ranks", "2"], stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    denoising = threading.Event()

    def read() -> None:
        for line in process.stderr:
            lines.append(line)
            if "denoise segment 1/" in line:
                denoising.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert denoising.wait(240), "".join(lines[-40:])
        pid = int(re.search(r"started ranks 1-1 \(pids (\d+)\)", "".join(lines)).group(1))
        os.kill(pid, signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
        stopped_at = time.monotonic()
        code = process.wait(timeout=timeout_s + 60)
        failed_after = time.monotonic() - stopped_at
    finally:
        if process.poll() is None:
            process.kill()
    reader.join(timeout=10)
    log = "".join(lines)
    assert code == 1, log[-3000:]
    assert "job failed" in log and "fell out of step" in log
    if fault == "killed":
        assert f"rank 1 (pid {pid}) exited with code -9" in log
        assert failed_after < timeout_s  # a dead peer is noticed at once, not at the timeout
    else:
        assert "Timed out" in log or "timed out" in log
        assert failed_after < timeout_s + 30
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
