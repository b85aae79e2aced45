"""Several worker processes on one work dir: start-up removes only the job folders whose owner is gone."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from worker_support import ASSETS, PROXY_VARS, REPO_ROOT, probe_mp4, serve_worker_api, stop_process

from hallo3_worker.settings import Settings
from fake_pipeline import NoiseTalkingHeadPipeline
from hallo3_worker.worker import job_dirs
from hallo3_worker.worker.service import Worker

# A process that opens a job folder the way the worker does and dies in the middle of the job.
_DIES_MID_JOB = """
import os, sys
from pathlib import Path
from hallo3_worker.worker.job_dirs import job_dir
with job_dir(Path(sys.argv[1]), "killed-job") as folder:
    (folder / "image.bin").write_bytes(b"half a job")
    os._exit(0)  # no clean-up: as if the process had been killed
"""


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in PROXY_VARS and not k.startswith(("BUCKET_", "RUNPOD_", "HALLO3_", "AWS_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT / "src"), env.get("PYTHONPATH", "")])
    return env


def _orphan_of_a_dead_process(work_dir: Path) -> Path:
    subprocess.run([sys.executable, "-c", _DIES_MID_JOB, str(work_dir)], check=True, env=_child_env(), timeout=60)
    (folder,) = work_dir.glob("job-killed-job-*")
    return folder


def _record(folder: Path, owner: job_dirs.Owner) -> None:
    (folder / job_dirs.OWNER_FILE).write_text(json.dumps({"host": owner.host, "pid": owner.pid,
                                                          "started": owner.started}))


def test_a_job_folder_records_its_owner(tmp_path: Path) -> None:
    with job_dirs.job_dir(tmp_path, "abc") as folder:
        owner = job_dirs.read_owner(folder)
        assert owner == job_dirs.this_process() and owner.pid == os.getpid()
        assert job_dirs.is_running(owner) is True
    assert not folder.exists()


def test_start_up_removes_only_the_folders_of_ended_processes(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    dead = _orphan_of_a_dead_process(work)
    assert job_dirs.read_owner(dead) is not None and job_dirs.is_running(job_dirs.read_owner(dead)) is False

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        me = job_dirs.this_process()
        alive = Path(work / "job-alive-1")
        alive.mkdir()
        _record(alive, job_dirs.Owner(me.host, sleeper.pid, job_dirs.process_start_time(sleeper.pid)))
        reused = Path(work / "job-reused-pid-1")  # the pid runs, but it is another process than the owner
        reused.mkdir()
        _record(reused, job_dirs.Owner(me.host, sleeper.pid, job_dirs.process_start_time(sleeper.pid) - 3600))
        elsewhere = Path(work / "job-other-host-1")
        elsewhere.mkdir()
        _record(elsewhere, job_dirs.Owner(me.host + "-elsewhere", 1, 0.0))
        fresh, stale = work / "job-starting-1", work / "job-old-version-1"  # no owner record
        fresh.mkdir()
        stale.mkdir()
        old = time.time() - job_dirs.UNRECORDED_GRACE_S - 60
        os.utime(stale, (old, old))
        other = work / "not-a-job"
        other.mkdir()

        settings = Settings(work_dir=work, volume_root=tmp_path)
        Worker(settings, NoiseTalkingHeadPipeline(settings), progress_sender=lambda *a: None)

        left = sorted(p.name for p in work.iterdir())
        assert left == sorted([alive.name, elsewhere.name, fresh.name, other.name])
    finally:
        stop_process(sleeper)


@pytest.mark.slow
def test_a_second_worker_process_starting_up_leaves_a_running_job_alone(tmp_path: Path) -> None:
    """A job of one process is frozen mid-job while a second worker on the same work dir starts up;
    the job then completes, and a folder whose owner died is cleaned up by that start-up."""
    work = tmp_path / "shared-work"
    work.mkdir()
    dead = _orphan_of_a_dead_process(work)
    audio = base64.b64encode((ASSETS / "speech.wav").read_bytes()).decode()  # 2.3 s: two segments
    image = base64.b64encode((ASSETS / "face.jpg").read_bytes()).decode()
    job_file, video = tmp_path / "job.json", tmp_path / "first.mp4"
    job_file.write_text(json.dumps({"id": "first", "input": {"image": image, "audio": audio, "steps": 2, "seed": 3,
                                                                "separate_vocals": False}}))
    env = _child_env() | {"HALLO3_WORK_DIR": str(work), "HALLO3_VIDEO_PRESET": "ultrafast"}
    log = tmp_path / "first.log"
    with open(log, "wb") as log_file:
        first = subprocess.Popen([sys.executable, "scripts/run_job.py", str(job_file), str(video)], cwd=REPO_ROOT,
                                 env=env, stdout=subprocess.PIPE, stderr=log_file)
    try:
        deadline = time.monotonic() + 120
        segment: Path | None = None
        while segment is None:  # the first segment is encoded: the job is half done
            segment = next(work.glob("job-first-*/segments/segment_00000.mp4"), None)
            assert first.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the first job never reached its first segment"
            time.sleep(0.02)
        os.kill(first.pid, signal.SIGSTOP)  # hold the job there while the second worker starts
        try:
            running_job = segment.parents[1]
            (tmp_path / "second").mkdir()
            with serve_worker_api(tmp_path / "second", HALLO3_WORK_DIR=str(work)) as (_, _, second_log):
                assert running_job.is_dir() and segment.is_file(), second_log.read_text()[-3000:]
                assert not dead.exists()  # its owner process has ended
        finally:
            os.kill(first.pid, signal.SIGCONT)
        stdout, _ = first.communicate(timeout=180)
    finally:
        stop_process(first)
    assert first.returncode == 0, log.read_text()[-3000:]
    result = json.loads(stdout)
    assert result["frames"] > 49 and len(probe_mp4(video.read_bytes())["frames"]) == result["frames"]  # 2 segments
    assert sorted(p.name for p in work.iterdir()) == []  # the first job removed its own folder
