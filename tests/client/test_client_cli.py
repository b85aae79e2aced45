"""The client against a scripted Runpod-shaped API: progress, Ctrl-C, failures, URL results, the size guard.

The worker's local server shows no progress, has no /cancel and drops ``error_code``; these tests
cover what Runpod itself does. ``test_client_local_api.py`` drives the real worker.
"""

from __future__ import annotations

import base64
import io
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from client_support import client_env

import hallo3_client.client as client_module
from hallo3_client import ApiError, Hallo3Client, JobFailed, JobStatus, RequestTooLarge, UsageError
from hallo3_client.cli import main
from hallo3_client.progress import ProgressDisplay

RESULT = {"video_type": "url", "seed": 7, "width": 480, "height": 480, "fps": 25, "frames": 25, "duration_s": 1.0,
          "has_audio": True, "size_bytes": 11, "timings": {"fetch": 0.1, "generate": 90.0, "total": 95.5,
                                                           "generate_segment_0": 40.0},
          "warnings": ["the tiny model ran"]}


@pytest.fixture
def no_wait(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Polls without waiting; returns the waits asked for."""
    waits: list[float] = []
    monkeypatch.setattr(client_module, "_sleep", waits.append)
    return waits


def _run_args(api_base: str, face: Path, speech: Path, out: Path, *extra: str) -> list[str]:
    return ["run", "--url", api_base, "--image", str(face), "--audio", str(speech), "-o", str(out), *extra]


def test_run_shows_progress_and_saves_a_url_result(fake_api, face_path, speech_path, tmp_path, no_wait, capsys,
                                                    monkeypatch) -> None:
    monkeypatch.setenv("RUNPOD_API_KEY", "rp-secret")
    video_url = fake_api.file_url("out.mp4", b"mp4 payload")
    fake_api.statuses = [
        {"status": "IN_QUEUE"},
        {"status": "IN_PROGRESS", "output": {"stage": "fetch", "progress": 0.0}},
        {"status": "IN_PROGRESS", "output": {"stage": "denoise", "progress": 0.275, "segment": 1, "num_segments": 2}},
        {"status": "IN_PROGRESS", "output": {"stage": "denoise", "progress": 0.5, "segment": 2, "num_segments": 2}},
        {"status": "COMPLETED", "output": {**RESULT, "video": video_url}, "delayTime": 1200, "executionTime": 95300},
    ]
    out = tmp_path / "hello.mp4"
    code = main(_run_args(fake_api.base, face_path, speech_path, out, "--seed", "7", "--steps", "20",
                          "--framing", "auto", "--preset", "fast", "--no-separate-vocals"))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert out.read_bytes() == b"mp4 payload"

    sent = fake_api.requests[0].json()["input"]
    assert sent["seed"] == 7 and sent["steps"] == 20 and sent["framing"] == "auto" and sent["preset"] == "fast"
    assert sent["separate_vocals"] is False and "prompt" not in sent and "output" not in sent  # worker defaults
    assert base64.b64decode(sent["image"].split(",", 1)[1]) == face_path.read_bytes()
    assert sent["image"].startswith("data:image/jpeg;base64,") and sent["audio"].startswith("data:audio/")

    assert fake_api.paths()[:2] == ["POST /run", "GET /status/job-123"]
    by_path = {r.path.split("?")[0]: r for r in fake_api.requests}
    assert by_path["/run"].headers["authorization"] == "Bearer rp-secret"
    assert "authorization" not in by_path["/files/out.mp4"].headers  # the key never goes to the bucket

    err = captured.err
    assert "job job-123 submitted" in err and "queued" in err
    assert "denoise  segment 1/2" in err and "denoise  segment 2/2" in err
    assert "left" in err.split("segment 2/2", 1)[1].splitlines()[0]  # an estimate once progress moved
    assert "warning: the tiny model ran" in err and "secret" not in err + captured.out
    assert "seed: 7" in captured.out
    assert "timings: fetch 0.10 s, generate 90.00 s, total 95.50 s" in captured.out
    assert "endpoint: 1.2 s in the queue, 95.3 s on the worker" in captured.out
    assert f"saved {out}" in captured.out


def test_run_saves_a_base64_result_and_prints_json(fake_api, face_path, speech_path, tmp_path, no_wait,
                                                   capsys) -> None:
    fake_api.statuses = [{"status": "COMPLETED", "output": {**RESULT, "video_type": "base64",
                                                            "video": base64.b64encode(b"inline mp4").decode()}}]
    out = tmp_path / "sub" / "inline.mp4"
    assert main(_run_args(fake_api.base, face_path, speech_path, out, "--json")) == 0
    assert out.read_bytes() == b"inline mp4"
    printed = json.loads(capsys.readouterr().out)
    assert printed["seed"] == 7 and printed["saved_to"] == str(out) and printed["video"].startswith("<base64")


def test_ctrl_c_cancels_the_job_on_the_endpoint(fake_api, face_path, speech_path, tmp_path, monkeypatch,
                                                capsys) -> None:
    fake_api.statuses = [{"status": "IN_PROGRESS", "output": {"stage": "prepare", "progress": 0.03}}]

    def interrupt(seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(client_module, "_sleep", interrupt)
    code = main(_run_args(fake_api.base, face_path, speech_path, tmp_path / "x.mp4"))
    assert code == 130
    assert fake_api.paths() == ["POST /run", "GET /status/job-123", "POST /cancel/job-123"]
    assert "cancelled job job-123 on the endpoint (status CANCELLED)" in capsys.readouterr().err
    assert not (tmp_path / "x.mp4").exists()


def test_ctrl_c_where_the_api_cannot_cancel(fake_api, face_path, speech_path, tmp_path, monkeypatch,
                                            capsys) -> None:
    fake_api.statuses = [{"status": "IN_QUEUE"}]
    fake_api.cancel_missing = True

    def interrupt(seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(client_module, "_sleep", interrupt)
    assert main(_run_args(fake_api.base, face_path, speech_path, tmp_path / "x.mp4")) == 130
    err = capsys.readouterr().err
    assert "Cancelling is not supported by this API" in err and "may still run" in err


@pytest.mark.parametrize(("answer", "message", "code"), [
    # Runpod: the worker's sentence in error, its code in output
    ({"status": "FAILED", "error": "No face was found in the image.", "output": {"error_code": "NO_FACE"}},
     "No face was found in the image.", "NO_FACE"),
    # the worker's error JSON as a string
    ({"status": "FAILED", "error": json.dumps({"error": "Audio is silent.", "error_code": "AUDIO_SILENT"})},
     "Audio is silent.", "AUDIO_SILENT"),
    # the SDK's report of an exception the handler raised
    ({"status": "FAILED", "error": json.dumps({"error_type": "<class 'RuntimeError'>", "error_message": "boom",
                                               "error_traceback": "Traceback ..."})}, "boom", None),
    # an error returned as output of a COMPLETED job
    ({"status": "COMPLETED", "output": {"error": "Bad input.", "error_code": "INVALID_INPUT"}},
     "Bad input.", "INVALID_INPUT"),
    # COMPLETED without output (Runpod drops results it could not store)
    ({"status": "COMPLETED"}, "completed without a video", None),
    ({"status": "TIMED_OUT"}, "ended with status TIMED_OUT", None),
])
def test_a_failed_job_prints_error_and_error_code(fake_api, face_path, speech_path, tmp_path, no_wait, capsys,
                                                  answer: dict[str, Any], message: str, code: str | None) -> None:
    fake_api.statuses = [answer]
    assert main(_run_args(fake_api.base, face_path, speech_path, tmp_path / "x.mp4")) == 1
    err = capsys.readouterr().err
    assert f"job job-123 {answer['status']}" in err
    assert f"error: {message}" in err or message in err.split("error: ", 1)[1]
    assert f"error_code: {code or '(not reported by this API)'}" in err
    assert "Traceback" not in err
    assert not (tmp_path / "x.mp4").exists()


def test_size_guard_refuses_before_any_request(fake_api, face_path, tmp_path, capsys) -> None:
    big = tmp_path / "long.wav"
    big.write_bytes(b"\0" * 7_600_000)  # base64 grows it past 10 MB
    code = main(["run", "--url", fake_api.base, "--image", str(face_path), "--audio", str(big), "-o",
                 str(tmp_path / "x.mp4")])
    err = capsys.readouterr().err
    assert code == 2
    assert "over the 10 MB limit of /run" in err and "--upload s3://bucket/prefix" in err
    assert fake_api.requests == []  # the server received nothing


def test_size_guard_in_the_python_api() -> None:
    requests: list[httpx.Request] = []
    transport = httpx.MockTransport(lambda request: requests.append(request) or httpx.Response(200, json={}))
    with Hallo3Client("http://api.invalid", transport=transport) as client:
        with pytest.raises(RequestTooLarge):
            client.submit({"image": "x" * 10_000_000, "audio": "y"})
    with Hallo3Client("http://api.invalid", transport=transport, max_body_bytes=None) as client:
        with pytest.raises(ApiError, match="without a job id"):  # no limit: sent
            client.submit({"image": "x" * 10_000_000, "audio": "y"})
    assert len(requests) == 1


def test_endpoint_base_url_and_key(monkeypatch) -> None:
    with pytest.raises(UsageError, match="RUNPOD_API_KEY"):
        Hallo3Client.for_endpoint("abc123")
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"id": "j1", "status": "IN_QUEUE"})

    monkeypatch.setenv("RUNPOD_API_KEY", "rp-key")
    with Hallo3Client.for_endpoint("abc123", transport=httpx.MockTransport(answer)) as client:
        assert client.submit({"image": "https://x/y.jpg", "audio": "https://x/y.wav"}) == "j1"
    assert str(seen[0].url) == "https://api.runpod.ai/v2/abc123/run"
    assert seen[0].headers["authorization"] == "Bearer rp-key"
    assert json.loads(seen[0].content) == {"input": {"image": "https://x/y.jpg", "audio": "https://x/y.wav"}}


def test_cli_usage_errors_exit_2(tmp_path, capsys) -> None:
    assert main(["run", "--endpoint", "abc123", "--image", "https://x/a.jpg", "--audio", "https://x/a.wav"]) == 2
    assert "Set RUNPOD_API_KEY" in capsys.readouterr().err
    assert main(["run", "--url", "http://127.0.0.1:9", "--image", str(tmp_path / "missing.jpg"),
                 "--audio", "https://x/a.wav"]) == 2
    assert "is not a file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["run", "--image", "a.jpg", "--audio", "b.wav"])  # neither --endpoint nor --url
    assert exited.value.code == 2


def test_status_and_cancel_commands(fake_api, tmp_path, capsys) -> None:
    video = base64.b64encode(b"inline mp4").decode()
    fake_api.statuses = [{"status": "COMPLETED", "output": {**RESULT, "video_type": "base64", "video": video}}]
    out = tmp_path / "status.mp4"
    assert main(["status", "job-123", "--url", fake_api.base, "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    body = json.loads(printed[: printed.rindex("}") + 1])
    assert body["status"] == "COMPLETED" and body["output"]["video"].startswith("<base64")
    assert out.read_bytes() == b"inline mp4"

    assert main(["cancel", "job-123", "--url", fake_api.base]) == 0
    assert "cancel requested for job job-123: status CANCELLED" in capsys.readouterr().out
    fake_api.cancel_missing = True
    assert main(["cancel", "job-123", "--url", fake_api.base]) == 1
    assert "Cancelling is not supported by this API" in capsys.readouterr().err


def test_status_retries_a_busy_api_and_uses_post_where_get_is_refused(no_wait) -> None:
    answers = iter([httpx.Response(503), httpx.Response(405), httpx.Response(200, json={"status": "IN_PROGRESS"})])
    seen: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.method)
        return next(answers)

    with Hallo3Client("http://api.invalid", transport=httpx.MockTransport(answer)) as client:
        status = client.status("a/b")
    assert seen == ["GET", "GET", "POST"] and status.status == "IN_PROGRESS" and status.id == "a/b"
    assert no_wait == [0.5]


def test_progress_bar_on_a_terminal() -> None:
    now = [100.0]
    stream = io.StringIO()
    display = ProgressDisplay(stream, tty=True, clock=lambda: now[0], tick_s=3600, width=10)
    now[0] = 110.0
    display.update(JobStatus("j", "IN_PROGRESS", {"stage": "prepare", "progress": 0.1}))
    now[0] = 130.0
    display.update(JobStatus("j", "IN_PROGRESS", {"stage": "denoise", "progress": 0.5, "segment": 2,
                                                  "num_segments": 4}))
    display.close()
    last = stream.getvalue().split("\r\x1b[K")[-1]
    # 0.4 of the work in 20 s: 0.5 left takes about 25 s more
    assert last == "[#####.....]  50%  denoise  segment 2/4  elapsed 0:30  about 0:25 left\n"


def test_job_failed_carries_the_code() -> None:
    with Hallo3Client("http://api.invalid") as client, pytest.raises(JobFailed) as failed:
        client.result(JobStatus.from_response({"status": "FAILED", "error": "x", "output": {"error_code": "NO_FACE"}},
                                              "j"))
    assert (failed.value.job_id, failed.value.error_code, failed.value.error) == ("j", "NO_FACE", "x")


# --------------------------------------------------------------------------- options and saved files


def test_fast_preset_knobs_are_sent(fake_api, face_path, speech_path, tmp_path, no_wait) -> None:
    video = base64.b64encode(b"inline mp4").decode()
    fake_api.statuses = [{"status": "COMPLETED", "output": {**RESULT, "video_type": "base64", "video": video}}]
    assert main(_run_args(fake_api.base, face_path, speech_path, tmp_path / "o.mp4", "--preset", "fast",
                          "--cache-threshold", "0.05", "--cfg-fraction", "0.8", "--output-mode", "base64")) == 0
    sent = fake_api.requests[0].json()["input"]
    assert (sent["preset"], sent["cache_threshold"], sent["cfg_fraction"]) == ("fast", 0.05, 0.8)
    assert sent["output"] == {"mode": "base64"}


@pytest.mark.parametrize("bad", [["--preset", "fastt"], ["--framing", "wide"], ["--output-mode", "url"],
                                 ["--preset", "fast", "--cache-threshold", "0.5"],
                                 ["--preset", "fast", "--cfg-fraction", "0.2"], ["--cache-threshold", "0.1"],
                                 ["--preset", "exact", "--cfg-fraction", "0.8"]])
def test_bad_job_options_are_usage_errors_before_any_request(fake_api, face_path, speech_path, tmp_path, capsys,
                                                              bad: list[str]) -> None:
    try:
        code = main(_run_args(fake_api.base, face_path, speech_path, tmp_path / "o.mp4", *bad))
    except SystemExit as exited:  # argparse's own usage errors
        code = exited.code
    assert code == 2
    assert fake_api.requests == []
    err = capsys.readouterr().err
    assert bad[-1] in err or "--preset fast" in err, err


def test_verbose_after_the_command_and_version(fake_api, face_path, speech_path, tmp_path) -> None:
    """The real command: -v is accepted after the command too; --version answers at once."""
    video = base64.b64encode(b"inline mp4").decode()
    fake_api.statuses = [{"status": "COMPLETED", "output": {**RESULT, "video_type": "base64", "video": video}}]
    command = [sys.executable, "-m", "hallo3_client"]
    done = subprocess.run([*command, "run", "-v", *_run_args(fake_api.base, face_path, speech_path,
                                                            tmp_path / "o.mp4")[1:]],
                          env=client_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert f"DEBUG hallo3_client.client: POST {fake_api.base}/run" in done.stderr
    quiet = subprocess.run([*command, "status", "job-123", "--url", fake_api.base], env=client_env(),
                           capture_output=True, text=True, timeout=60)
    assert quiet.returncode == 0 and "DEBUG" not in quiet.stderr
    version = subprocess.run([*command, "--version"], env=client_env(), capture_output=True, text=True, timeout=60)
    from hallo3_client import __version__

    assert version.returncode == 0 and version.stdout.strip() == f"hallo3 {__version__}"


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_the_saved_mp4_follows_the_umask_and_json_says_where(fake_api, face_path, speech_path, tmp_path, no_wait,
                                                              capsys, monkeypatch, umask: int) -> None:
    video = base64.b64encode(b"inline mp4").decode()
    fake_api.statuses = [{"status": "COMPLETED", "output": {**RESULT, "video_type": "base64", "video": video}}]
    monkeypatch.chdir(tmp_path)
    old = os.umask(umask)
    try:
        assert main(_run_args(fake_api.base, face_path, speech_path, Path("relative.mp4"), "--json")) == 0
    finally:
        os.umask(old)
    saved = tmp_path / "relative.mp4"
    assert stat.S_IMODE(saved.stat().st_mode) == 0o666 & ~umask
    captured = capsys.readouterr()
    assert json.loads(captured.out)["saved_to"] == str(saved)  # absolute, wherever the command ran
    assert f"saved {saved}" in captured.err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary file left


def test_upload_without_boto3_names_the_install_command(face_path, speech_path, tmp_path, monkeypatch,
                                                        capsys) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)  # as if the s3 extra were not installed
    code = main(_run_args("http://127.0.0.1:9", face_path, speech_path, tmp_path / "o.mp4", "--upload", "s3://b/p"))
    assert code == 2
    assert "pip install './client[s3]'" in capsys.readouterr().err
