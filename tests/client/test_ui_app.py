"""``hallo3 ui``'s backend in process (Starlette's test client) against the scripted Runpod-shaped API.

What the browser tests do not reach: the 10 MB inline limit, ``--upload`` to a bucket (moto),
and the refusal of requests that do not come from the page.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from hallo3_client import Hallo3Client
from hallo3_client.ui.app import create_app
from hallo3_client.ui.jobs import JobBoard, url_expiry

PAGE = {"X-Hallo3-UI": "1"}
BIG = 10_500_000  # bytes of "audio": over the 10 MB /run limit once base64-encoded (and even before)


@pytest.fixture
def big_audio(tmp_path: Path) -> Path:
    path = tmp_path / "long.wav"
    path.write_bytes(b"RIFF" + bytes(BIG))
    return path


@contextlib.contextmanager
def _page(board: JobBoard) -> Iterator[TestClient]:
    app = create_app(board, target=board.client.base_url, allowed_hosts=["127.0.0.1", "localhost"])
    with TestClient(app, base_url="http://127.0.0.1") as page:
        yield page


def _post(page: TestClient, image: Path, audio: Path, fields: dict, headers: dict = PAGE):
    with image.open("rb") as i, audio.open("rb") as a:
        files = {"image": (image.name, i, "image/jpeg"), "audio": (audio.name, a, "audio/wav")}
        return page.post("/api/jobs", files=files, data={"fields": json.dumps(fields)}, headers=headers)


def test_files_over_the_inline_limit_are_refused_before_sending(fake_api, face_path, big_audio, tmp_path) -> None:
    with Hallo3Client(fake_api.base) as client:
        board = JobBoard(client, tmp_path / "results")
        with _page(board) as page:
            answer = _post(page, face_path, big_audio, {"steps": 2})
    assert answer.status_code == 413
    error = answer.json()["error"]
    assert "over the 10 MB limit of /run, so nothing was sent" in error
    assert "`hallo3 ui` with `--upload s3://bucket/prefix`" in error
    assert fake_api.paths() == []  # nothing reached the API
    assert list((tmp_path / "results" / "uploads").iterdir()) == []  # the page's files are not kept


def test_with_upload_the_files_go_to_the_bucket(fake_api, moto_s3, face_path, big_audio, tmp_path,
                                                 monkeypatch) -> None:
    import boto3

    for name, value in {"AWS_ENDPOINT_URL": moto_s3, "AWS_ACCESS_KEY_ID": "moto", "AWS_SECRET_ACCESS_KEY": "moto",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="ui-inputs")
    fake_api.statuses = [{"status": "IN_QUEUE"}]
    with Hallo3Client(fake_api.base) as client:
        board = JobBoard(client, tmp_path / "results", upload="s3://ui-inputs/page")
        with _page(board) as page:
            answer = _post(page, face_path, big_audio, {"seed": 5, "prompt": "Hello."})
            assert answer.status_code == 200, answer.text
            assert answer.json() == {"id": fake_api.job_id}
            view = page.get(f"/api/jobs/{fake_api.job_id}").json()
            assert view["id"] == fake_api.job_id and view["done"] is False
    sent = next(r for r in fake_api.requests if r.path == "/run").json()["input"]
    assert sent["seed"] == 5 and sent["prompt"] == "Hello."
    assert sent["image"].startswith(f"{moto_s3}/ui-inputs/page/") and "Signature=" in sent["image"]  # presigned
    assert sent["audio"].startswith(f"{moto_s3}/ui-inputs/page/")
    keys = sorted(o["Key"].rsplit("/", 1)[1] for o in s3.list_objects_v2(Bucket="ui-inputs")["Contents"])
    assert keys == ["audio.wav", "image.jpg"]
    assert url_expiry(sent["audio"]) == pytest.approx(time.time() + 24 * 3600, abs=120)


def test_requests_not_from_the_page_are_refused(fake_api, face_path, speech_path, tmp_path) -> None:
    with Hallo3Client(fake_api.base) as client:
        board = JobBoard(client, tmp_path / "results")
        with _page(board) as page:
            assert _post(page, face_path, speech_path, {}, headers={}).status_code == 403  # another site's form
            rebound = page.get("/api/config", headers={"Host": "attacker.example:7860"})
            assert rebound.status_code == 400  # a DNS-rebinding page of another site
            unknown = _post(page, face_path, speech_path, {"sed": 1})
            assert unknown.status_code == 400 and unknown.json() == {"error": "Unknown option 'sed'."}
            config = page.get("/api/config").json()
            assert config["target"] == fake_api.base and config["max_body_bytes"] == 10_000_000
            assert page.get("/api/jobs/nope/video").status_code == 404
    assert fake_api.paths() == []


def test_url_expiry_reads_presigned_urls() -> None:
    """What the page's history uses to say that a result's URL has expired."""
    v4 = "https://b.example.com/k.mp4?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Date=20200101T000000Z&X-Amz-Expires=60"
    assert url_expiry(v4) == 1577836860  # 2020-01-01 00:01:00 UTC
    assert url_expiry("https://b.example.com/k.mp4?Signature=x&Expires=1700000000") == 1700000000
    assert url_expiry("https://b.example.com/k.mp4") is None


def test_progress_snapshot_gives_the_page_its_values() -> None:
    """The terminal's progress bar, read as values: stage, segment, elapsed and the time left."""
    from hallo3_client import JobStatus
    from hallo3_client.progress import ProgressDisplay

    now = [100.0]
    display = ProgressDisplay(io.StringIO(), tty=False, clock=lambda: now[0])
    assert display.snapshot() == {"label": "submitting", "fraction": None, "segment": None, "num_segments": None,
                                  "elapsed_s": 0.0, "left_s": None}
    running = {"id": "j", "status": "IN_PROGRESS"}
    now[0] = 110.0
    display.update(JobStatus.from_response({**running, "output": {"stage": "denoise", "progress": 0.2, "segment": 1,
                                                                  "num_segments": 4}}, "j"))
    now[0] = 130.0
    display.update(JobStatus.from_response({**running, "output": {"stage": "denoise", "progress": 0.6, "segment": 3,
                                                                  "num_segments": 4}}, "j"))
    now[0] = 135.0
    # 0.4 of the job took 20 s, so 0.4 is left: 20 s at 130 s, 15 s at 135 s
    assert display.snapshot() == {"label": "denoise", "fraction": 0.6, "segment": 3, "num_segments": 4,
                                  "elapsed_s": 35.0, "left_s": 15.0}
