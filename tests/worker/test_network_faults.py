"""Every network wait of a job is bounded: a silent bucket, a stalled or trickling media URL.

The servers here are real sockets on 127.0.0.1 that accept connections and then answer nothing, or
send headers and then stall; the bounds the tests state come from the settings under test.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from worker_support import b64

from hallo3_worker.errors import ErrorCode
from hallo3_worker.settings import Settings
from hallo3_worker.worker.bucket import request_bound_s

CPU_SLACK_S = 15.0  # the job's own work (decode, encode, mux) on a busy 2-core machine


class StallingServer:
    """Accepts every connection on 127.0.0.1 and hands it to ``serve`` (which may never answer)."""

    def __init__(self, serve: Callable[[socket.socket, threading.Event], None]) -> None:
        self.serve = serve
        self.stop = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.connections: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections.append(conn)
            threading.Thread(target=self.serve, args=(conn, self.stop), daemon=True).start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        for conn in [*self.connections, self.listener]:
            conn.close()


@pytest.fixture
def serve_stalling() -> Iterator[Callable[..., StallingServer]]:
    servers: list[StallingServer] = []

    def start(serve: Callable[[socket.socket, threading.Event], None]) -> StallingServer:
        servers.append(StallingServer(serve))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def silent(conn: socket.socket, stop: threading.Event) -> None:
    """Accept and never answer (nor read: the request stays in the socket's buffers)."""
    stop.wait()


def headers_then_stall(conn: socket.socket, stop: threading.Event) -> None:
    conn.recv(65536)
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: 1000000\r\n\r\n" + b"\xff" * 1000)
    stop.wait()


def trickle(conn: socket.socket, stop: threading.Event) -> None:
    """Headers, then one byte every 0.2 s: never silent for long, never done."""
    conn.recv(65536)
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: 1000000\r\n\r\n")
    while not stop.wait(0.2):
        try:
            conn.sendall(b"\xff")
        except OSError:
            return


def s3_config(endpoint: str) -> dict[str, str]:
    return {"accessId": "access", "accessSecret": "silent-secret", "bucketName": "results", "endpointUrl": endpoint}


# ---------------------------------------------------------------------------------------- bucket


def test_default_bucket_timeouts_bound_a_silent_bucket_to_about_a_minute() -> None:
    """A job waits on a silent bucket twice at most: its first segment's upload, then the video's."""
    defaults = Settings()
    assert (defaults.bucket_connect_timeout_s, defaults.bucket_read_timeout_s, defaults.bucket_max_attempts) == (5, 10, 2)
    assert 2 * request_bound_s(defaults) <= 70


def test_silent_bucket_fails_within_its_bound_and_the_next_job_runs(make_runner, make_settings, progress,
                                                                     serve_stalling, face_jpg: bytes,
                                                                     short_wav: bytes) -> None:
    settings = make_settings(bucket_connect_timeout_s=1.0, bucket_read_timeout_s=1.0, bucket_max_attempts=2,
                             on_platform=True)
    bound_s = 2 * request_bound_s(settings) + CPU_SLACK_S  # a segment upload, then the video's upload
    assert bound_s <= 90
    bucket = serve_stalling(silent)
    run_job = make_runner(settings)
    inputs = {"image": b64(face_jpg), "audio": b64(short_wav), "seed": 3}

    started = time.monotonic()
    failed = run_job({**inputs, "output": {"mode": "s3"}}, s3Config=s3_config(bucket.url))
    strict_s = time.monotonic() - started
    assert failed["error_code"] == ErrorCode.UPLOAD_FAILED.value, failed
    assert "did not answer" in failed["error"] and "silent-secret" not in failed["error"]
    assert strict_s <= bound_s, f"{strict_s:.1f} s"
    assert progress.calls[-1][1]["stage"] == "deliver"  # what /status showed while the upload waited

    started = time.monotonic()
    fallback = run_job(inputs, s3Config=s3_config(bucket.url))
    auto_s = time.monotonic() - started
    assert fallback["video_type"] == "base64", fallback.get("error")
    assert any("returned inline instead" in w and "did not answer" in w for w in fallback["warnings"])
    assert auto_s <= bound_s, f"{auto_s:.1f} s"
    assert len(bucket.connections) >= 2  # the bucket was really tried

    after = run_job(inputs)  # the worker takes the next job normally
    assert after["video_type"] == "base64" and after["seed"] == 3
    assert after["video"] == fallback["video"]


# ----------------------------------------------------------------------------------------- media


@pytest.mark.parametrize(("serve", "reason"), [(headers_then_stall, "sent nothing for 1 s"),
                                               (trickle, "took longer than 3 s")], ids=["stall", "trickle"])
def test_a_stalled_media_url_fails_within_its_bound(make_runner, make_settings, serve_stalling,
                                                    monkeypatch: pytest.MonkeyPatch, short_wav: bytes,
                                                    serve: Any, reason: str) -> None:
    monkeypatch.setenv("RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS", "true")  # the server is on loopback
    settings = make_settings(download_timeout_s=1.0, download_deadline_s=3.0)
    bound_s = settings.download_deadline_s + settings.download_timeout_s + 5.0
    server = serve_stalling(serve)
    started = time.monotonic()
    result = make_runner(settings)({"image": f"{server.url}/face.jpg?sig=SECRET", "audio": b64(short_wav)})
    elapsed = time.monotonic() - started
    assert result["error_code"] == ErrorCode.MEDIA_FETCH_FAILED.value, result
    assert reason in result["error"] and "SECRET" not in result["error"]
    assert elapsed <= bound_s, f"{elapsed:.1f} s"
    assert len(server.connections) == 1  # a server that stopped answering is not asked again
