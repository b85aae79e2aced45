"""Fixtures for the worker tests: settings, media, a worker, local HTTP and S3 stand-ins.

Everything network-facing binds to 127.0.0.1 only, and every server started here is stopped by
the fixture that started it.
"""

from __future__ import annotations

import asyncio
import functools
import http.server
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from worker_support import ASSETS, PROXY_VARS, free_port, stop_process, voice_like, wait_for_port, wav_bytes

from hallo3_worker.interface import TalkingHeadPipeline
from hallo3_worker.settings import Settings
from fake_pipeline import NoiseTalkingHeadPipeline
from hallo3_worker.worker.service import Worker

# ------------------------------------------------------------------------------------ environment


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """No proxies, no private-URL escape hatch, no platform variables; CWD must stay empty."""
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    for name in ("RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS", "RUNPOD_MAX_DOWNLOAD_BYTES", "RUNPOD_WEBHOOK_POST_OUTPUT",
                 "BUCKET_ENDPOINT_URL", "BUCKET_ACCESS_KEY_ID", "BUCKET_SECRET_ACCESS_KEY", "BUCKET_NAME"):
        monkeypatch.delenv(name, raising=False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield cwd
    leftovers = sorted(p.name for p in cwd.iterdir())
    assert leftovers == [], f"the worker wrote into the current directory: {leftovers}"


# ------------------------------------------------------------------------------------------ media


@pytest.fixture(scope="session")
def face_jpg() -> bytes:
    return (ASSETS / "face.jpg").read_bytes()


@pytest.fixture(scope="session")
def speech_wav() -> bytes:
    return (ASSETS / "speech.wav").read_bytes()


@pytest.fixture(scope="session")
def short_wav() -> bytes:
    """1.0 s of speech-like audio: 25 frames at 25 fps, so jobs stay fast."""
    return wav_bytes(voice_like(1.0))


# --------------------------------------------------------------------------------------- settings


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    def build(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "work_dir": tmp_path / "work",
            "volume_root": tmp_path / "volume",
            "max_duration_s": 10.0,
            "video_preset": "ultrafast",
            "cancel_grace_s": 10.0,
        }
        values.update(overrides)
        return Settings(**values)

    (tmp_path / "volume").mkdir(exist_ok=True)
    return build


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


class ProgressRecorder:
    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, Any], dict[str, Any]]] = []

    def __call__(self, job: Any, payload: dict[str, Any]) -> None:
        self.calls.append((dict(job), dict(payload)))


@pytest.fixture
def progress() -> ProgressRecorder:
    return ProgressRecorder()


class JobRunner:
    """Runs jobs through ``Worker.handle`` and checks that no job folder is left behind."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.count = 0

    def __call__(self, inputs: dict[str, Any], **top_level: Any) -> dict[str, Any]:
        self.count += 1
        job = {"id": f"test-job-{self.count}", "input": inputs, **top_level}
        result = asyncio.run(self.worker.handle(job))
        leftovers = list(self.worker.settings.work_dir.iterdir())
        assert leftovers == [], f"job folder not removed: {leftovers}"
        return result


@pytest.fixture
def make_runner(progress: ProgressRecorder) -> Callable[..., JobRunner]:
    def build(settings: Settings, pipeline: TalkingHeadPipeline | None = None) -> JobRunner:
        pipeline = pipeline or NoiseTalkingHeadPipeline(settings)
        return JobRunner(Worker(settings, pipeline, progress_sender=progress))

    return build


@pytest.fixture
def run_job(make_runner: Callable[..., JobRunner], settings: Settings) -> JobRunner:
    return make_runner(settings)


# ------------------------------------------------------------------------------------- servers


class _RecordingHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files quietly and records every requested path."""

    requested: list[str]

    def do_GET(self) -> None:  # noqa: N802
        self.requested.append(self.path)
        super().do_GET()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


class Served:
    """A folder served over HTTP on 127.0.0.1."""

    def __init__(self, root: Path, base: str, requested: list[str]) -> None:
        self.root, self.base, self.requested = root, base, requested

    def put(self, name: str, data: bytes) -> str:
        (self.root / name).write_bytes(data)
        return f"{self.base}/{name}"


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[Served]:
    root = tmp_path / "served"
    root.mkdir()
    requested: list[str] = []
    handler = type("Handler", (_RecordingHandler,), {"requested": requested})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield Served(root, f"http://127.0.0.1:{server.server_address[1]}", requested)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto S3 stand-in on 127.0.0.1:<free port>, killed by PID at the end of the session."""
    executable = Path(sys.executable).parent / "moto_server"
    if not executable.exists():
        pytest.skip("moto_server is not installed next to this interpreter")
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS}
    with open(log, "wb") as log_file:
        proc = subprocess.Popen([str(executable), "-H", "127.0.0.1", "-p", str(port)],
                                stdout=log_file, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for_port(port, 30, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(proc)


@pytest.fixture
def s3_client(moto_endpoint: str) -> Any:
    import boto3

    return boto3.client(
        "s3", endpoint_url=moto_endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
        region_name="us-east-1",
    )


@pytest.fixture
def bucket(s3_client: Any, request: pytest.FixtureRequest) -> str:
    name = "hallo3-" + request.node.name.lower().replace("_", "-")[:40].strip("-")
    s3_client.create_bucket(Bucket=name)
    return name
