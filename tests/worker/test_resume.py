"""Long jobs that lose nothing: a job killed after a segment resumes from its saved state.

The end-to-end tests run the real entry points (``scripts/run_job.py`` and ``handler.py`` in
Runpod's local mode) on the embedded tiny model in subprocesses and SIGKILL them right after the
log line of the first finished segment. Runpod's local mode logs its result cut short, so there
the video goes to a local S3 stand-in (moto) and is compared from the bucket.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile as sf

REPO = Path(__file__).resolve().parents[2]
ASSETS = REPO / "tests" / "assets"


@pytest.fixture(scope="module")
def job_input(tmp_path_factory) -> dict:
    """4 s of speech (100 frames: 3 tiny segments), the face asset, a fixed seed."""
    speech, rate = sf.read(ASSETS / "speech.wav", dtype="float32")
    audio = tmp_path_factory.mktemp("resume") / "speech_4s.wav"
    sf.write(audio, np.tile(speech, 2)[: 4 * rate], rate)
    return {"image": base64.b64encode((ASSETS / "face.jpg").read_bytes()).decode(),
            "audio": base64.b64encode(audio.read_bytes()).decode(), "seed": 7, "steps": 2}


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HALLO3_", "RUNPOD_"))}
    env.update(HALLO3_JOB_STATE_DIR=str(tmp_path / "state"), HALLO3_WORK_DIR=str(tmp_path / "work"),
               PYTHONUNBUFFERED="1")
    return env


def _command(entry: str, tmp_path: Path, job: dict, out: Path) -> list[str]:
    if entry == "run_job":
        (tmp_path / "job.json").write_text(json.dumps(job))
        return [sys.executable, str(REPO / "scripts" / "run_job.py"), str(tmp_path / "job.json"), str(out)]
    (tmp_path / "test_input.json").write_text(json.dumps(job))  # Runpod's local mode reads it from the cwd
    return [sys.executable, str(REPO / "handler.py")]


def _run(command: list[str], cwd: Path, env: dict[str, str], kill_after: str | None = None) -> tuple[int, str]:
    """Run to the end, or SIGKILL the process as soon as a log line contains ``kill_after``."""
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if kill_after is not None and kill_after in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.stdout.close()
    return proc.wait(timeout=300), "".join(lines)


def _frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


@pytest.fixture(scope="module")
def uninterrupted(job_input, tmp_path_factory) -> Path:
    """The same job under another id, never interrupted."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    out = tmp / "out.mp4"
    code, log = _run(_command("run_job", tmp, {"id": "never-killed", "input": job_input}, out), tmp, _env(tmp))
    assert code == 0, log
    return out


@pytest.mark.parametrize("entry", ["run_job", "handler"])
def test_a_killed_job_resumes_and_equals_an_uninterrupted_run(entry, job_input, uninterrupted, tmp_path,
                                                              request) -> None:
    job = {"id": f"resume-{entry}", "input": job_input}
    out = tmp_path / "out.mp4"
    command, env = _command(entry, tmp_path, job, out), _env(tmp_path)
    if entry == "handler":  # the result goes to the bucket; the local mode's log cuts it short
        bucket, s3 = request.getfixturevalue("bucket"), request.getfixturevalue("s3_client")
        env.update(BUCKET_ENDPOINT_URL=request.getfixturevalue("moto_endpoint"), BUCKET_ACCESS_KEY_ID="moto",
                   BUCKET_SECRET_ACCESS_KEY="moto", BUCKET_NAME=bucket)
    code, log = _run(command, tmp_path, env, kill_after="segment 1/3 done")
    assert code == -signal.SIGKILL, log
    saved = json.loads((tmp_path / "state" / job["id"] / "job.json").read_text())
    assert [segment["file"] for segment in saved["segments"]] == ["segment_00000.mp4"]

    code, log = _run(command, tmp_path, env)
    assert code == 0, log
    assert "resuming after segment 1 from saved state" in log and "resuming at segment 2/3" in log
    assert "segment 1/3 done" not in log  # the first segment was not generated again
    assert not (tmp_path / "state" / job["id"]).exists()  # finished: the state is gone
    if entry == "handler":
        assert f"Job {job['id']} completed successfully" in log
        assert "Job result: {'output': {'resumed_from_segment': 2, " in log
        key = f"{job['id']}/{job['id']}.mp4"
        out.write_bytes(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    else:
        result = json.loads(log[log.rindex("\n{\n") :])  # the script prints the result last
        assert result["resumed_from_segment"] == 2 and result["frames"] == 100
    assert np.array_equal(_frames(out), _frames(uninterrupted))
    assert out.read_bytes() == uninterrupted.read_bytes()  # even the file: every segment encodes the same


def _peak_rss_mib(tmp_path: Path, job: dict) -> float:
    """Peak resident memory of a whole ``run_job.py`` process running ``job``."""
    (tmp_path / "job.json").write_text(json.dumps(job))
    probe = ("import resource, runpy, sys\n"
             f"sys.argv = ['run_job.py', {str(tmp_path / 'job.json')!r}, {str(tmp_path / 'out.mp4')!r}]\n"
             f"try:\n    runpy.run_path({str(REPO / 'scripts' / 'run_job.py')!r}, run_name='__main__')\n"
             "except SystemExit as exit:\n    assert not exit.code\n"
             "print('PEAK_RSS_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
    env = _env(tmp_path)
    env.update(HALLO3_JOB_STATE_DIR="off", MALLOC_ARENA_MAX="1")  # one heap: less noise in the peak
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return int(done.stdout.split("PEAK_RSS_KIB")[1].split()[0]) / 1024


def test_memory_stays_flat_in_the_clip_length(tmp_path) -> None:
    """Frames are encoded segment by segment: a clip 4x as long needs no more memory."""
    speech, rate = sf.read(ASSETS / "speech.wav", dtype="float32")
    peaks: dict[int, float] = {}
    for seconds in (2, 8):
        folder = tmp_path / f"{seconds}s"
        folder.mkdir()
        sf.write(folder / "speech.wav", np.tile(speech, 4)[: seconds * rate], rate)
        job = {"id": f"memory-{seconds}", "input": {
            "image": base64.b64encode((ASSETS / "face.jpg").read_bytes()).decode(),
            "audio": base64.b64encode((folder / "speech.wav").read_bytes()).decode(),
            "steps": 2, "separate_vocals": False}}
        peaks[seconds] = _peak_rss_mib(folder, job)
    assert peaks[8] <= 1.10 * peaks[2], peaks
