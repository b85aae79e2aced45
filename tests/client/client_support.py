"""Helpers of the client tests: a scripted Runpod-shaped API, and a handle on the worker's local API.

Kept apart from ``conftest.py`` under a name no other test folder uses.
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import os
import threading
from pathlib import Path
from typing import Any, Optional

from worker_support import PROXY_VARS  # the worker tests' helpers (on sys.path through conftest.py)

CLIENT_SRC = Path(__file__).resolve().parents[2] / "client" / "src"


def client_env() -> dict[str, str]:
    """Environment of a client subprocess: this process's, with the client's sources importable."""
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(CLIENT_SRC), env.get("PYTHONPATH", "")) if p)
    return env


@dataclasses.dataclass(frozen=True)
class WorkerApi:
    """The worker's local API (``handler.py --rp_serve_api``): its base URL and its log file."""

    base: str
    log: Path


@dataclasses.dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class FakeRunpodApi:
    """A stand-in for Runpod's queue API, as its documentation describes it.

    ``POST /run`` queues ``job_id``; ``GET /status/{id}`` answers ``statuses`` one after the other
    (the last one repeats); ``POST /cancel/{id}`` answers ``CANCELLED`` (or 404 with
    ``cancel_missing``); ``GET /files/{name}`` serves ``files``. Every request is recorded.
    """

    def __init__(self, job_id: str = "job-123") -> None:
        self.job_id = job_id
        self.statuses: list[dict[str, Any]] = []
        self.files: dict[str, bytes] = {}
        self.cancel_missing = False
        self.requests: list[Recorded] = []
        self._status_calls = 0
        self._server: Optional[http.server.ThreadingHTTPServer] = None
        self._thread: Optional[threading.Thread] = None

    @property
    def base(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def file_url(self, name: str, data: bytes) -> str:
        self.files[name] = data
        return f"{self.base}/files/{name}?X-Amz-Signature=secret"

    def paths(self) -> list[str]:
        return [f"{r.method} {r.path.split('?')[0]}" for r in self.requests]

    def __enter__(self) -> FakeRunpodApi:
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _record(self) -> Recorded:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                record = Recorded(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                api.requests.append(record)
                return record

            def _send(self, code: int, body: Any, content_type: str = "application/json") -> None:
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:  # noqa: N802
                self._record()
                if self.path == "/run":
                    self._send(200, {"id": api.job_id, "status": "IN_QUEUE"})
                elif self.path.startswith("/cancel/") and not api.cancel_missing:
                    self._send(200, {"id": self.path.rsplit("/", 1)[1], "status": "CANCELLED"})
                elif self.path.startswith("/status/"):
                    self._send(405, {"detail": "Method Not Allowed"})
                else:
                    self._send(404, {"detail": "Not Found"})

            def do_GET(self) -> None:  # noqa: N802
                self._record()
                if self.path.startswith("/status/") and api.statuses:
                    index = min(api._status_calls, len(api.statuses) - 1)
                    api._status_calls += 1
                    self._send(200, {"id": self.path.rsplit("/", 1)[1], **api.statuses[index]})
                elif self.path.startswith("/files/"):
                    name = self.path.split("?")[0].rsplit("/", 1)[1]
                    if name in api.files:
                        self._send(200, api.files[name], "video/mp4")
                    else:
                        self._send(404, b"", "text/plain")
                else:
                    self._send(404, {"detail": "Not Found"})

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
