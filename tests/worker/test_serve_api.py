"""``python handler.py --rp_serve_api`` in a subprocess: /runsync, /run + /status with test_input.json."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from worker_support import REPO_ROOT, probe_mp4, serve_worker_api

NO_PROXY = {"http": "", "https": ""}


@pytest.fixture(scope="module")
def test_job() -> dict[str, Any]:
    return json.loads((REPO_ROOT / "test_input.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, Path]]:
    with serve_worker_api(tmp_path_factory.mktemp("serve")) as served:
        yield served


def check_output(output: dict[str, Any], job_input: dict[str, Any]) -> None:
    assert output["video_type"] == "base64" and output["seed"] == job_input["seed"]
    info = probe_mp4(base64.b64decode(output["video"]))
    assert info["video_codec"] == "h264" and info["audio_codec"] == "aac"
    assert len(info["frames"]) == output["frames"] and output["fps"] == 25
    assert abs(info["duration_s"] - output["audio_duration_s"]) <= 1 / 25
    assert any("tiny random-weight model" in w for w in output["warnings"])


def test_runsync(server, test_job: dict[str, Any]) -> None:
    base, work_dir, log = server
    response = requests.post(f"{base}/runsync", json={"input": test_job["input"]}, timeout=120, proxies=NO_PROXY)
    response.raise_for_status()
    body = response.json()
    assert body["status"] == "COMPLETED", body
    check_output(body["output"], test_job["input"])
    assert list(work_dir.iterdir()) == []
    text = log.read_text(errors="replace")
    assert "tiny random-weight model" in text  # the start-up log says what runs
    payload = test_job["input"]["image"].split(",", 1)[1]
    assert payload[:60] not in text and body["output"]["video"][:60] not in text  # no base64 in the log
    # the job log reads as the worker's own stages: no third-party chatter (docs/deploy.md)
    for chatter in ("it/s]", "Using soundfile", "RuntimeWarning", "UserWarning", "stft"):
        assert chatter not in text, chatter
    assert "denoise segment 1/" in text


def test_run_then_status(server, test_job: dict[str, Any]) -> None:
    base, work_dir, _ = server
    queued = requests.post(f"{base}/run", json={"input": test_job["input"]}, timeout=30, proxies=NO_PROXY).json()
    assert queued["status"] == "IN_PROGRESS" and queued["id"]
    body = requests.post(f"{base}/status/{queued['id']}", timeout=120, proxies=NO_PROXY).json()
    assert body["status"] == "COMPLETED", body
    check_output(body["output"], test_job["input"])
    assert list(work_dir.iterdir()) == []


def test_runsync_error_is_a_failed_job(server) -> None:
    base, _, _ = server
    started = time.monotonic()
    body = requests.post(f"{base}/runsync", json={"input": {"image": "x", "audio": "y", "stepz": 3}}, timeout=30,
                         proxies=NO_PROXY).json()
    assert body["status"] == "FAILED" and "stepz" in body["error"] and "Did you mean 'steps'" in body["error"]
    assert "Traceback" not in body["error"]
    assert time.monotonic() - started < 10


def test_finished_segments_reach_the_bucket_before_the_job_ends(tmp_path: Path, moto_endpoint: str, bucket: str,
                                                                 s3_client, face_jpg: bytes) -> None:
    """With the endpoint's bucket, each segment is uploaded as soon as it is encoded (its URL goes out in a
    progress update on Runpod; the local API shows no progress, so the bucket is checked)."""
    from worker_support import b64, voice_like, wav_bytes

    env = {"BUCKET_ENDPOINT_URL": moto_endpoint, "BUCKET_ACCESS_KEY_ID": "moto-access",
           "BUCKET_SECRET_ACCESS_KEY": "moto-secret", "BUCKET_NAME": bucket}
    with serve_worker_api(tmp_path, **env) as (base, _, log):
        job = {"image": b64(face_jpg), "audio": b64(wav_bytes(voice_like(2.5))), "seed": 5, "steps": 2}  # 2 segments
        queued = requests.post(f"{base}/run", json={"input": job}, timeout=30, proxies=NO_PROXY).json()
        body = requests.post(f"{base}/status/{queued['id']}", timeout=300, proxies=NO_PROXY).json()
    assert body["status"] == "COMPLETED", body
    keys = sorted(o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket)["Contents"])
    job_id = queued["id"]
    assert keys == [f"{job_id}/segments/segment_00000.mp4", f"{job_id}/segments/segment_00001.mp4",
                    f"{job_id}/{job_id}.mp4"], keys
    segments = [s3_client.get_object(Bucket=bucket, Key=key)["Body"].read() for key in keys[:2]]
    assert [len(probe_mp4(data)["frames"]) for data in segments] == [47, 16]  # each plays on its own
    text = log.read_text(errors="replace")
    assert text.index("segment_ready segment 1/2") < text.index("denoise segment 2/2")  # before the next one ran
