"""Fixtures of the client tests: the worker's real local API, a scripted Runpod-shaped API, moto S3.

The client is imported from its sources (``client/src``); ``test_client_install.py`` checks the
installed package. Everything network-facing binds to 127.0.0.1 and is stopped by its fixture.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
CLIENT_SRC = REPO_ROOT / "client" / "src"
for _path in (CLIENT_SRC, REPO_ROOT / "tests" / "worker"):  # the client; the worker tests' helpers
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from client_support import FakeRunpodApi, WorkerApi  # noqa: E402
from worker_support import PROXY_VARS, free_port, serve_worker_api, voice_like, wait_for_port, wav_bytes  # noqa: E402

_CLIENT_ENV = ("RUNPOD_API_KEY", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID",
               "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_REGION", "AWS_REGION")


@pytest.fixture(autouse=True)
def _client_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No proxies, no API key and no AWS settings from the machine running the tests."""
    for name in (*PROXY_VARS, *_CLIENT_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)


# ------------------------------------------------------------------------------------------ media


@pytest.fixture(scope="session")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("media")


@pytest.fixture(scope="session")
def face_path() -> Path:
    return REPO_ROOT / "tests" / "assets" / "face.jpg"


@pytest.fixture(scope="session")
def speech_path(media_dir: Path) -> Path:
    """1.0 s of speech-like audio (25 frames: one short segment)."""
    path = media_dir / "speech.wav"
    path.write_bytes(wav_bytes(voice_like(1.0)))
    return path


# ---------------------------------------------------------------------------------------- servers


@pytest.fixture(scope="session")
def worker_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerApi]:
    """``handler.py --rp_serve_api`` (tiny model) on 127.0.0.1:<free port>, one for the session.

    It may fetch from loopback URLs (``RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS``): the S3 test's
    presigned URLs point at moto on 127.0.0.1.
    """
    with serve_worker_api(tmp_path_factory.mktemp("worker-api"), RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS="true") as served:
        base, _, log = served
        yield WorkerApi(base, log)


@pytest.fixture
def fake_api() -> Iterator[FakeRunpodApi]:
    with FakeRunpodApi() as api:
        yield api


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1:<free port>, in this process."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        wait_for_port(port, 30)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
