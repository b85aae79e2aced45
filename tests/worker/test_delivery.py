"""Delivery through a local S3 stand-in (moto_server on 127.0.0.1) and the inline fallbacks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import requests
from worker_support import b64, probe_mp4

from hallo3_worker.errors import ErrorCode
from hallo3_worker.settings import load_settings

SECRET = "moto-secret-key"


def s3_config(endpoint: str, bucket: str) -> dict[str, str]:
    return {"accessId": "moto-access", "accessSecret": SECRET, "bucketName": bucket, "endpointUrl": endpoint}


def fetch_url(url: str) -> bytes:
    assert url.startswith("http://127.0.0.1:"), url  # loopback only
    response = requests.get(url, timeout=10, proxies={"http": "", "https": ""})
    response.raise_for_status()
    return response.content


@pytest.fixture
def inputs(face_jpg: bytes, short_wav: bytes) -> dict[str, Any]:
    return {"image": b64(face_jpg), "audio": b64(short_wav), "seed": 11}


def test_upload_with_request_s3_config(run_job, inputs, moto_endpoint: str, bucket: str, s3_client) -> None:
    result = run_job(inputs, s3Config=s3_config(moto_endpoint, bucket))
    assert "error" not in result, result
    assert result["video_type"] == "url" and result["seed"] == 11
    assert result["video"].startswith(f"{moto_endpoint}/{bucket}/test-job-1/test-job-1.mp4?")
    data = fetch_url(result["video"])
    info = probe_mp4(data)
    assert info["video_codec"] == "h264" and info["audio_codec"] == "aac" and len(info["frames"]) == result["frames"]
    head = s3_client.head_object(Bucket=bucket, Key="test-job-1/test-job-1.mp4")
    assert head["ContentType"] == "video/mp4" and head["ContentLength"] == len(data)


def test_upload_with_endpoint_bucket_settings(make_runner, tmp_path: Path, inputs, moto_endpoint: str, bucket: str,
                                              s3_client) -> None:
    settings = load_settings({
        "HALLO3_WORK_DIR": str(tmp_path / "work"),
        "HALLO3_VIDEO_PRESET": "ultrafast",
        "BUCKET_ENDPOINT_URL": moto_endpoint,
        "BUCKET_ACCESS_KEY_ID": "moto-access",
        "BUCKET_SECRET_ACCESS_KEY": SECRET,
        "BUCKET_NAME": bucket,
        "BUCKET_PREFIX": "renders",
    })
    run_job = make_runner(settings)
    result = run_job({**inputs, "output": {"mode": "s3", "filename": "talk.mp4"}})
    assert result["video_type"] == "url", result
    assert result["video"].startswith(f"{moto_endpoint}/{bucket}/renders/test-job-1/talk.mp4?")
    assert fetch_url(result["video"])[4:8] == b"ftyp"
    assert s3_client.head_object(Bucket=bucket, Key="renders/test-job-1/talk.mp4")["ContentType"] == "video/mp4"


def test_request_s3_config_wins_over_endpoint_settings(make_runner, make_settings, inputs, moto_endpoint: str,
                                                       bucket: str, s3_client) -> None:
    from hallo3_worker.settings import BucketSettings

    endpoint_bucket = BucketSettings(moto_endpoint, "moto-access", SECRET, "no-such-endpoint-bucket")
    run_job = make_runner(make_settings(bucket=endpoint_bucket))
    result = run_job(inputs, s3Config=s3_config(moto_endpoint, bucket))
    assert result["video_type"] == "url", result
    assert f"/{bucket}/" in result["video"]


def test_base64_mode_ignores_buckets(run_job, inputs, moto_endpoint: str, bucket: str) -> None:
    result = run_job({**inputs, "output": {"mode": "base64"}}, s3Config=s3_config(moto_endpoint, bucket))
    assert result["video_type"] == "base64" and len(result["video"]) > 1000


def test_upload_failure(run_job, inputs, moto_endpoint: str, s3_client) -> None:
    config = s3_config(moto_endpoint, "bucket-that-does-not-exist")
    failed = run_job({**inputs, "output": {"mode": "s3"}}, s3Config=config)
    assert failed["error_code"] == ErrorCode.UPLOAD_FAILED.value
    assert "NoSuchBucket" in failed["error"] and SECRET not in failed["error"]
    # In "auto" mode a small video still comes back, inline, with a warning.
    fallback = run_job(inputs, s3Config=config)
    assert fallback["video_type"] == "base64"
    assert any("returned inline" in w for w in fallback["warnings"])


def test_upload_failure_and_too_large_for_inline(make_runner, make_settings, inputs, moto_endpoint: str,
                                                 s3_client) -> None:
    run_job = make_runner(make_settings(inline_output_max_bytes=1000))
    result = run_job(inputs, s3Config=s3_config(moto_endpoint, "bucket-that-does-not-exist"))
    assert result["error_code"] == ErrorCode.UPLOAD_FAILED.value


def test_s3_mode_without_any_bucket(run_job, inputs) -> None:
    result = run_job({**inputs, "output": {"mode": "s3"}})
    assert result["error_code"] == ErrorCode.BUCKET_NOT_CONFIGURED.value


def test_each_finished_segment_is_announced_with_its_url(make_runner, tmp_path: Path, moto_endpoint: str, bucket: str,
                                                         progress, face_jpg: bytes) -> None:
    from worker_support import voice_like, wav_bytes

    settings = load_settings({
        "HALLO3_WORK_DIR": str(tmp_path / "work"), "HALLO3_VIDEO_PRESET": "ultrafast",
        "BUCKET_ENDPOINT_URL": moto_endpoint, "BUCKET_ACCESS_KEY_ID": "moto-access",
        "BUCKET_SECRET_ACCESS_KEY": SECRET, "BUCKET_NAME": bucket, "RUNPOD_WEBHOOK_POST_OUTPUT": "https://x.invalid",
    })
    result = make_runner(settings)({"image": b64(face_jpg), "audio": b64(wav_bytes(voice_like(2.5)))})  # 2 segments
    assert result["video_type"] == "url", result
    stages = [(p["stage"], p.get("segment")) for _, p in progress.calls]
    assert stages.index(("segment_ready", 1)) < stages.index(("denoise", 2)) < stages.index(("segment_ready", 2))
    ready = [p for _, p in progress.calls if p["stage"] == "segment_ready"]
    assert [(p["segment_start_s"], p["segment_duration_s"], p["num_segments"]) for p in ready] == [(0, 1.88, 2),
                                                                                                  (1.88, 0.64, 2)]
    frames = [probe_mp4(fetch_url(p["segment_url"]))["frames"] for p in ready]
    assert [len(f) for f in frames] == [47, 16]
    later = [p for _, p in progress.calls if p["stage"] != "segment_ready" and "segment_urls" in p]
    assert later and later[-1]["segment_urls"] == [p["segment_url"] for p in ready]  # a poller that missed one
    assert ready[1]["segment_urls"] == [ready[0]["segment_url"], ready[1]["segment_url"]]
    assert SECRET not in str(progress.calls)


def test_no_segment_uploads_for_an_inline_result(make_runner, tmp_path: Path, moto_endpoint: str, bucket: str,
                                                 progress, s3_client, inputs) -> None:
    settings = load_settings({
        "HALLO3_WORK_DIR": str(tmp_path / "work"), "BUCKET_ENDPOINT_URL": moto_endpoint,
        "BUCKET_ACCESS_KEY_ID": "moto-access", "BUCKET_SECRET_ACCESS_KEY": SECRET, "BUCKET_NAME": bucket,
        "RUNPOD_WEBHOOK_POST_OUTPUT": "https://x.invalid",
    })
    result = make_runner(settings)({**inputs, "output": {"mode": "base64"}})
    assert result["video_type"] == "base64"
    assert "Contents" not in s3_client.list_objects_v2(Bucket=bucket)
    assert all(p["stage"] != "segment_ready" for _, p in progress.calls)
