"""The client against the worker's real local API (``handler.py --rp_serve_api``, tiny model).

What that server does, and so what these tests expect: it answers ``/status`` only to POST and
runs the job inside that request (no progress while it runs), forgets the job once its status was
read, has no ``/cancel`` route (404), and shows a failed job's ``error`` without ``error_code``.
"""

from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
from client_support import client_env
from PIL import Image

from hallo3_client import Hallo3Client, inline_media, resolve_media
from hallo3_client.cli import main

FAST = ["--steps", "2", "--no-separate-vocals"]  # one 25-frame segment in about a second


def _streams(path: Path) -> tuple[str, str | None, int]:
    """(video codec, audio codec or None, video frames) of an MP4 file, read with PyAV."""
    with av.open(str(path)) as container:
        audio = container.streams.audio[0].codec_context.name if container.streams.audio else None
        frames = sum(1 for _ in container.decode(video=0))
        return container.streams.video[0].codec_context.name, audio, frames


def _run(api: str, image: Path, audio: Path, out: Path, *extra: str) -> list[str]:
    return ["run", "--url", api, "--image", str(image), "--audio", str(audio), "-o", str(out), *extra]


def test_run_writes_an_mp4_with_audio(worker_api, face_path, speech_path, tmp_path, capsys) -> None:
    out = tmp_path / "talk.mp4"
    code = main(_run(worker_api.base, face_path, speech_path, out, "--seed", "3", "--prompt", "A person is talking.",
                     *FAST))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert _streams(out) == ("h264", "aac", 25)
    assert "seed: 3" in captured.out and "timings: fetch" in captured.out and f"saved {out}" in captured.out
    assert "submitted to " + worker_api.base in captured.err
    assert "this API reports no progress while the job runs" in captured.err  # not a bar stuck at "waiting"
    assert "tiny random-weight model" in captured.err  # the result's warning


def test_status_command_runs_the_job_and_saves_it(worker_api, face_path, speech_path, tmp_path, capsys) -> None:
    media = [resolve_media("image", str(face_path)), resolve_media("audio", str(speech_path))]
    with Hallo3Client(worker_api.base) as client:
        job_id = client.submit(inline_media({"seed": 4, "steps": 2, "separate_vocals": False}, media, None))
    out = tmp_path / "status.mp4"
    assert main(["status", job_id, "--url", worker_api.base, "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    body = json.loads(printed[: printed.rindex("}") + 1])
    assert body["status"] == "COMPLETED" and body["output"]["seed"] == 4
    assert body["output"]["video"].startswith("<base64")  # never the video itself on the terminal
    assert _streams(out)[1] == "aac"
    # the local server forgets a job once its status has been read
    assert main(["status", job_id, "--url", worker_api.base]) == 1
    assert "error: Job ID not found" in capsys.readouterr().err


def test_bad_input_fails_with_the_worker_error(worker_api, speech_path, tmp_path, capsys) -> None:
    blank = tmp_path / "blank.png"
    Image.new("RGB", (512, 512), (128, 128, 128)).save(blank)
    code = main(_run(worker_api.base, blank, speech_path, tmp_path / "x.mp4", *FAST))
    err = capsys.readouterr().err
    assert code == 1
    assert "FAILED" in err and "error: No face was found in the image." in err
    # the worker returned error_code NO_FACE; the local API passes on only the message
    assert "error_code: (not reported by this API)" in err
    assert "rejected with NO_FACE" in worker_api.log.read_text(errors="replace")
    assert not (tmp_path / "x.mp4").exists()


def test_cancel_is_not_supported_by_the_local_api(worker_api, capsys) -> None:
    assert main(["cancel", "test-some-job", "--url", worker_api.base]) == 1
    err = capsys.readouterr().err
    assert "Cancelling is not supported by this API" in err and "404" in err


def test_ctrl_c_in_a_subprocess(worker_api, face_path, speech_path, tmp_path) -> None:
    """The real command: Ctrl-C while it waits asks for a cancel, reports that this API has none, exits 130."""
    command = [sys.executable, "-m", "hallo3_client", *_run(worker_api.base, face_path, speech_path,
                                                            tmp_path / "x.mp4", "--steps", "8",
                                                            "--no-separate-vocals")]
    proc = subprocess.Popen(command, env=client_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stderr.readline()  # "hallo3: job <id> submitted to ..."
        assert "submitted" in first, first
        time.sleep(0.5)  # now waiting on /status
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == 130, first + err
    assert "Cancelling is not supported by this API" in err and "may still run there" in err
    assert not (tmp_path / "x.mp4").exists()
    job_id = first.split()[2]
    assert f"Job {job_id}: fetch" in worker_api.log.read_text(errors="replace")  # it had started, and runs on


def _large_portrait(path: Path, face_path: Path) -> Path:
    """The test face at 2000 px with noise: a PNG of about 9 MB, too large to send inline."""
    face = np.asarray(Image.open(face_path).convert("RGB").resize((2000, 2000), Image.Resampling.BICUBIC))
    noise = np.random.default_rng(0).normal(0, 10, face.shape)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(face + noise, 0, 255).astype(np.uint8)).save(buffer, format="PNG", compress_level=1)
    path.write_bytes(buffer.getvalue())
    assert path.stat().st_size > 7_600_000  # over 10 MB as base64
    return path


def test_large_files_go_through_an_s3_upload(worker_api, moto_s3, face_path, speech_path, tmp_path,
                                             monkeypatch, capsys) -> None:
    """Too large inline (refused before sending); with --upload the worker fetches presigned URLs from moto."""
    import boto3

    portrait = _large_portrait(tmp_path / "portrait.png", face_path)
    out = tmp_path / "large.mp4"
    assert main(_run(worker_api.base, portrait, speech_path, out, *FAST)) == 2
    assert "--upload s3://bucket/prefix" in capsys.readouterr().err

    aws = {"AWS_ENDPOINT_URL": moto_s3, "AWS_ACCESS_KEY_ID": "moto", "AWS_SECRET_ACCESS_KEY": "moto",
           "AWS_DEFAULT_REGION": "us-east-1"}
    for name, value in aws.items():
        monkeypatch.setenv(name, value)
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="client-inputs")
    result = subprocess.run(
        [sys.executable, "-m", "hallo3_client", *_run(worker_api.base, portrait, speech_path, out, "--upload",
                                                      "s3://client-inputs/jobs/in", *FAST)],
        env=client_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    assert _streams(out)[1] == "aac"
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="client-inputs")["Contents"])
    assert [k.rsplit("/", 1)[1] for k in keys] == ["portrait.png", "speech.wav"]
    assert all(k.startswith("jobs/in/") for k in keys)
