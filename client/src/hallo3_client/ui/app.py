"""The page's backend: a small Starlette app, the only thing the page talks to.

Routes (all under the page's own origin; the API key never leaves this process):

* ``GET /``: the page; ``GET /static/...``: its script and style sheet.
* ``GET /api/config``: where jobs go (without the key), the API's defaults and ranges.
* ``POST /api/jobs``: multipart ``image``, ``audio`` and ``fields`` (JSON of the job's options);
  answers ``{"id": ...}`` or ``{"error": ...}`` (nothing is sent to the API on a usage error).
* ``GET /api/jobs/{id}``: the job as the page shows it (status, progress, segments, result, error).
* ``POST /api/jobs/{id}/cancel``: asks the API to cancel the job.
* ``GET /api/jobs/{id}/segments/{n}``: finished segment n (from 0), downloaded from its URL.
* ``POST /api/jobs/{id}/fetch``: JSON ``{"url": ...}``: download an earlier result's video again
  (its presigned URL, kept in the page's history) so that the page can play it.
* ``GET /api/jobs/{id}/video``: the finished video (``?download=1`` as an attachment); 404 when this
  process does not hold it (an earlier ``hallo3 ui`` run kept it).

Requests that change something must carry the header ``X-Hallo3-UI``, which another site's page
cannot add without a CORS preflight that this app never grants; on loopback only the ``Host`` names
127.0.0.1 and localhost are answered.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from hallo3_client.errors import ApiError, Hallo3Error, RequestTooLarge, UsageError
from hallo3_client.ui.jobs import JobBoard

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
JOB_FIELDS = ("prompt", "seed", "steps", "guidance", "framing", "preset", "separate_vocals", "max_duration_s")
# The API's defaults and ranges (docs/api.md), for the page's form and its checks.
API_FIELDS: dict[str, Any] = {
    "prompt": {"default": "A person is talking.", "max_chars": 2000},
    "seed": {"min": 0, "max": 4294967295},
    "steps": {"default": 50, "min": 2, "max": 100},
    "guidance": {"default": 3.5, "min": 1.0, "max": 20.0},
    "framing": {"default": "upstream", "choices": ["upstream", "auto"]},
    "preset": {"default": "exact", "choices": ["exact", "balanced", "fast"]},
    "separate_vocals": {"default": True},
}
_SUFFIX = re.compile(r"^\.[A-Za-z0-9]{1,8}$")
_GUARD_HEADER = "x-hallo3-ui"


def _error(message: str, code: int) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=code)


def _too_large(err: RequestTooLarge) -> str:
    first = str(err).split(" Send the media", 1)[0]
    return (f"{first} Start `hallo3 ui` with `--upload s3://bucket/prefix` to send larger files through your "
            "bucket as presigned URLs.")


async def _save(upload: Any, folder: Path, stem: str) -> Path:
    if not isinstance(upload, UploadFile):
        raise UsageError(f"Choose the {stem} file first.")
    suffix = Path(upload.filename or "").suffix.lower()
    path = folder / (stem + (suffix if _SUFFIX.match(suffix) else ""))
    with path.open("wb") as handle:
        while chunk := await upload.read(1 << 20):
            handle.write(chunk)
    if path.stat().st_size == 0:
        raise UsageError(f"The {stem} file is empty.")
    return path


def _fields(text: Any) -> dict[str, Any]:
    try:
        data = json.loads(text) if isinstance(text, str) and text else {}
    except ValueError:
        raise UsageError("The job's options are not valid JSON.") from None
    if not isinstance(data, dict):
        raise UsageError("The job's options must be a JSON object.")
    unknown = sorted(set(data) - set(JOB_FIELDS))
    if unknown:
        raise UsageError(f"Unknown option {unknown[0]!r}.")
    return {k: v for k, v in data.items() if v is not None}


def create_app(board: JobBoard, *, target: str, allowed_hosts: Optional[Sequence[str]] = None) -> Starlette:
    """The app serving one :class:`JobBoard`; ``target`` names where jobs go (shown on the page).

    ``allowed_hosts``: the only ``Host`` names answered (on loopback this keeps a DNS-rebinding page
    of another site from using the key); ``None`` answers any.
    """

    def guarded(request: Request) -> Optional[Response]:
        if _GUARD_HEADER not in request.headers:
            return _error("Requests that change something must come from the page.", 403)
        return None

    async def index(request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-store"})

    async def config(request: Request) -> Response:
        return JSONResponse({"target": target, "upload": board.upload, "max_body_bytes": board.client.max_body_bytes,
                             "fields": API_FIELDS})

    async def submit(request: Request) -> Response:
        if (refused := guarded(request)) is not None:
            return refused
        folder = board.new_upload_dir()
        try:
            async with request.form(max_files=2, max_fields=4) as form:
                image = await _save(form.get("image"), folder, "image")
                audio = await _save(form.get("audio"), folder, "audio")
                fields = _fields(form.get("fields"))
            job = await run_in_threadpool(board.submit, fields, image, audio)
        except RequestTooLarge as err:
            return _error(_too_large(err), 413)
        except UsageError as err:
            return _error(str(err), 400)
        except ApiError as err:
            return _error(str(err), 502)
        except Hallo3Error as err:
            return _error(str(err), 500)
        finally:
            shutil.rmtree(folder, ignore_errors=True)  # sent inline or uploaded by now (or refused)
        return JSONResponse({"id": job.id})

    async def job_view(request: Request) -> Response:
        job = board.get(request.path_params["job_id"])
        if job is None:
            return _error("This hallo3 ui process has no such job.", 404)
        return JSONResponse(job.view())

    async def cancel(request: Request) -> Response:
        if (refused := guarded(request)) is not None:
            return refused
        message = await run_in_threadpool(board.cancel, request.path_params["job_id"])
        return JSONResponse({"message": message})

    async def video(request: Request) -> Response:
        job_id = request.path_params["job_id"]
        path = board.saved_video(job_id)
        if path is None:
            return _error("This video is not kept by this hallo3 ui process.", 404)
        download = request.query_params.get("download") == "1"
        return FileResponse(path, media_type="video/mp4", filename=f"{job_id}.mp4" if download else None,
                            content_disposition_type="attachment" if download else "inline")

    async def segment(request: Request) -> Response:
        path = board.segment_path(request.path_params["job_id"], request.path_params["index"])
        if not path.is_file():
            return _error("No such segment.", 404)
        return FileResponse(path, media_type="video/mp4")

    async def fetch_earlier(request: Request) -> Response:
        if (refused := guarded(request)) is not None:
            return refused
        try:
            body = await request.json()
            url = body.get("url") if isinstance(body, dict) else None
            if not isinstance(url, str):
                raise UsageError("Give the earlier result's video URL.")
            await run_in_threadpool(board.fetch_result, request.path_params["job_id"], url)
        except ValueError:
            return _error("The request is not JSON.", 400)
        except UsageError as err:
            return _error(str(err), 400)
        except Hallo3Error as err:
            return _error(f"{err} The result's URL has probably expired.", 502)
        return JSONResponse({"ok": True})

    routes = [
        Route("/", index),
        Route("/api/config", config),
        Route("/api/jobs", submit, methods=["POST"]),
        Route("/api/jobs/{job_id}", job_view),
        Route("/api/jobs/{job_id}/cancel", cancel, methods=["POST"]),
        Route("/api/jobs/{job_id}/video", video, methods=["GET", "HEAD"]),
        Route("/api/jobs/{job_id}/segments/{index:int}", segment, methods=["GET", "HEAD"]),
        Route("/api/jobs/{job_id}/fetch", fetch_earlier, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    middleware = [Middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))] if allowed_hosts else []
    return Starlette(routes=routes, middleware=middleware)
