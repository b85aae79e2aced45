"""``Hallo3Client``: submit a job to a Runpod-compatible queue API, follow it, save the video.

Built on httpx, not on the runpod SDK: the SDK pulls about a hundred packages (FastAPI, uvicorn,
aiohttp, paramiko, boto3, OpenTelemetry, ...) onto a laptop that only sends HTTP requests, and its
``Endpoint`` API polls ``/status`` with GET and has no answer for an API without ``/cancel``, so
it cannot drive the worker's local server.

What differs between Runpod and the local ``handler.py --rp_serve_api`` server, and what the client
does about it:

* ``/status/{id}``: Runpod answers GET at once, with the job's latest progress update as ``output``
  while it is ``IN_PROGRESS``. The local server answers only POST and runs the job inside that
  request, so the first status call returns when the job has ended and there is no progress to
  show. The client asks with GET and switches to POST when the API answers 405, and tells its
  caller (``on_no_progress``) before that POST, which waits for the whole job.
* ``/cancel/{id}``: only Runpod has it; the local server answers 404, which the client reports as
  :class:`CancelNotSupported`.
* A failed job: Runpod shows ``error`` and, in ``output``, the worker's ``error_code``; the local
  server shows only ``error`` (so ``error_code`` is ``None`` there). A worker that raised instead
  of returning an error shows the SDK's JSON text in ``error``; the client takes its message.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import json
import logging
import os
import secrets
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Optional, Union
from urllib.parse import quote, urlsplit

import httpx

from hallo3_client.errors import ApiError, CancelNotSupported, Interrupted, JobFailed, RequestTooLarge, UsageError

logger = logging.getLogger(__name__)

RUNPOD_API_BASE = "https://api.runpod.ai/v2"
MAX_RUN_BODY_BYTES = 10_000_000  # Runpod's /run request limit (10 MB)
ACTIVE_STATUSES = frozenset({"IN_QUEUE", "IN_PROGRESS", "RUNNING"})
_RETRY_STATUS_CODES = frozenset({429, 502, 503, 504})
_RETRIES = 5
_VERSION = "0.1.0"

_sleep = time.sleep  # module attribute so that tests can stand in for waiting


def _snippet(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _without_query(url: str) -> str:
    """A URL fit for logs and messages: presigned query strings are credentials."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def check_body_size(size: int, limit: Optional[int]) -> None:
    """Raise :class:`RequestTooLarge` when a ``/run`` body of ``size`` bytes would pass ``limit``."""
    if limit is None or size <= limit:
        return
    raise RequestTooLarge(
        f"The request would be {size / 1e6:.1f} MB, over the {limit / 1e6:g} MB limit of /run, so nothing "
        "was sent. Send the media as URLs instead: `hallo3 run --upload s3://bucket/prefix ...` uploads "
        "the local files to your bucket and sends presigned URLs."
    )


def _parse_error(error: Any, output: Any) -> tuple[Optional[str], Optional[str]]:
    """(message, error_code) of a failed job, from whichever shape the API returned."""
    code = output.get("error_code") if isinstance(output, Mapping) else None
    if not error and isinstance(output, Mapping):
        error = output.get("error")
    if isinstance(error, str) and error.lstrip().startswith("{"):
        with contextlib.suppress(ValueError):
            error = json.loads(error)
    if isinstance(error, Mapping):  # the worker's dict, or the SDK's report of a raised exception
        code = code or error.get("error_code")
        if error.get("error_traceback"):
            logger.debug("Worker traceback:\n%s", error["error_traceback"])
        error = error.get("error") or error.get("error_message") or json.dumps(dict(error))
    message = str(error) if error else None
    return message, (str(code) if code else None)


@dataclasses.dataclass(frozen=True)
class JobStatus:
    """One answer of ``/status`` (or ``/cancel``)."""

    id: str
    status: str
    output: Any = None
    error: Optional[str] = None
    error_code: Optional[str] = None
    delay_time_ms: Optional[float] = None  # Runpod: time in the queue
    execution_time_ms: Optional[float] = None  # Runpod: time on the worker
    raw: Mapping[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    @classmethod
    def from_response(cls, body: Mapping[str, Any], job_id: str) -> JobStatus:
        status = str(body.get("status") or "UNKNOWN").upper()
        output = body.get("output")
        error, code = (None, None)
        if status not in ACTIVE_STATUSES:
            error, code = _parse_error(body.get("error"), output)
        return cls(
            id=str(body.get("id") or job_id),
            status=status,
            output=output,
            error=error,
            error_code=code,
            delay_time_ms=body.get("delayTime") if isinstance(body.get("delayTime"), (int, float)) else None,
            execution_time_ms=body.get("executionTime")
            if isinstance(body.get("executionTime"), (int, float)) else None,
            raw=body,
        )

    @property
    def active(self) -> bool:
        """Still queued or running (any status the client does not know counts as ended)."""
        return self.status in ACTIVE_STATUSES

    @property
    def progress(self) -> Optional[Mapping[str, Any]]:
        """The worker's latest progress update while the job runs (``stage``, ``progress``, ...)."""
        if self.active and isinstance(self.output, Mapping) and "stage" in self.output:
            return self.output
        return None


@dataclasses.dataclass(frozen=True)
class JobResult:
    """A finished job: the worker's result without the video itself, and where the video went."""

    job_id: str
    output: Mapping[str, Any]
    path: Optional[Path] = None
    delay_time_ms: Optional[float] = None
    execution_time_ms: Optional[float] = None

    @property
    def seed(self) -> Optional[int]:
        return self.output.get("seed")

    @property
    def timings(self) -> Mapping[str, float]:
        timings = self.output.get("timings")
        return timings if isinstance(timings, Mapping) else {}

    @property
    def warnings(self) -> list[str]:
        warnings = self.output.get("warnings")
        return [str(w) for w in warnings] if isinstance(warnings, list) else []

    def metadata(self) -> dict[str, Any]:
        """The result with the video replaced by a short description (for printing as JSON)."""
        data = dict(self.output)
        video = data.get("video")
        if isinstance(video, str) and data.get("video_type") != "url":
            data["video"] = f"<base64, {len(video)} characters>"
        elif isinstance(video, str):
            data["video"] = _without_query(video)
        if self.path is not None:
            data["saved_to"] = str(self.path)
        return data


UpdateCallback = Callable[[JobStatus], None]


class Hallo3Client:
    """Talks to one Runpod endpoint, or to any API base with Runpod's ``/run`` and ``/status`` routes.

    ``Hallo3Client.for_endpoint("abc123")`` for Runpod (API key from ``RUNPOD_API_KEY``);
    ``Hallo3Client("http://127.0.0.1:8000")`` for the worker's local server. ``timeout`` bounds
    every request except ``/status``, which may take ``status_timeout`` (the local server answers
    it only when the job has ended). ``max_body_bytes`` (``None``: no limit) is checked before
    ``/run`` sends anything.
    """

    def __init__(
        self,
        base_url: str,
        api_key: Optional[str] = None,
        *,
        timeout: float = 30.0,
        status_timeout: float = 3600.0,
        poll_interval: float = 1.0,
        max_body_bytes: Optional[int] = MAX_RUN_BODY_BYTES,
        transport: Optional[httpx.BaseTransport] = None,
    ) -> None:
        base_url = base_url.strip().rstrip("/")
        if not base_url.startswith(("http://", "https://")):
            raise UsageError(f"The API base must be an http(s) URL, got {base_url!r}.")
        self.base_url = base_url
        self.poll_interval = poll_interval
        self.max_body_bytes = max_body_bytes
        self._status_timeout = status_timeout
        self._status_method = "GET"
        headers = {"User-Agent": f"hallo3-client/{_VERSION}"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._http = httpx.Client(base_url=base_url, headers=headers, timeout=timeout, transport=transport)
        # Videos come from the bucket's presigned URL: never send the API key there.
        self._downloads = httpx.Client(timeout=httpx.Timeout(timeout, read=max(timeout, 300.0)),
                                       follow_redirects=True, transport=transport,
                                       headers={"User-Agent": headers["User-Agent"]})

    @classmethod
    def for_endpoint(cls, endpoint_id: str, api_key: Optional[str] = None, **kwargs: Any) -> Hallo3Client:
        """A client of ``https://api.runpod.ai/v2/<endpoint_id>``; the key defaults to ``RUNPOD_API_KEY``."""
        endpoint_id = endpoint_id.strip()
        if not endpoint_id or "/" in endpoint_id or any(c.isspace() for c in endpoint_id):
            raise UsageError(f"Not a Runpod endpoint id: {endpoint_id!r}.")
        api_key = api_key or os.environ.get("RUNPOD_API_KEY")
        if not api_key:
            raise UsageError("Set RUNPOD_API_KEY to your Runpod API key to call an endpoint.")
        return cls(f"{RUNPOD_API_BASE}/{endpoint_id}", api_key, **kwargs)

    def close(self) -> None:
        self._http.close()
        self._downloads.close()

    def __enter__(self) -> Hallo3Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------- routes

    def submit(self, job_input: Mapping[str, Any], *, s3_config: Optional[Mapping[str, str]] = None) -> str:
        """POST ``/run``; return the job id. The body size is checked before anything is sent.

        ``s3_config`` is Runpod's per-request bucket for the result (``accessId``, ``accessSecret``,
        ``bucketName``, ``endpointUrl``); the local server does not forward it.
        """
        body: dict[str, Any] = {"input": dict(job_input)}
        if s3_config is not None:
            body["s3Config"] = dict(s3_config)
        payload = json.dumps(body, separators=(",", ":")).encode("utf-8")
        check_body_size(len(payload), self.max_body_bytes)
        logger.debug("POST %s/run (%d bytes)", self.base_url, len(payload))
        response = self._request("POST", "/run", idempotent=False, content=payload,
                                 headers={"Content-Type": "application/json"})
        data = self._json(response, "/run")
        job_id = data.get("id")
        if not isinstance(job_id, str) or not job_id:
            raise ApiError(f"/run answered without a job id: {_snippet(json.dumps(data))}")
        logger.info("Job %s: %s", job_id, data.get("status", "submitted"))
        return job_id

    def status(self, job_id: str, *, on_no_progress: Optional[Callable[[], None]] = None) -> JobStatus:
        """The job's status: GET ``/status/{id}``, or POST where the API wants it (the local server).

        ``on_no_progress`` is called once GET was refused, before the POST that answers only when the
        job has ended: this API reports no progress while the job runs.
        """
        path = f"/status/{quote(job_id, safe='')}"
        timeout = httpx.Timeout(self._http.timeout.connect, read=self._status_timeout,
                                write=self._http.timeout.write, pool=self._http.timeout.pool)
        response = self._request(self._status_method, path, idempotent=True, timeout=timeout)
        if response.status_code == 405 and self._status_method == "GET":
            logger.debug("GET /status answered 405; asking with POST from now on")
            self._status_method = "POST"
            if on_no_progress is not None:
                on_no_progress()
            response = self._request("POST", path, idempotent=True, timeout=timeout)
        return JobStatus.from_response(self._json(response, "/status"), job_id)

    def cancel(self, job_id: str) -> JobStatus:
        """POST ``/cancel/{id}``. Raises :class:`CancelNotSupported` when the API has no such route."""
        path = f"/cancel/{quote(job_id, safe='')}"
        response = self._request("POST", path, idempotent=True)
        if response.status_code == 404:
            raise CancelNotSupported(
                f"Cancelling is not supported by this API: it answered HTTP 404 to POST {path} (the local "
                "handler.py --rp_serve_api server has no /cancel route).", 404)
        return JobStatus.from_response(self._json(response, "/cancel"), job_id)

    # --------------------------------------------------------------------------- whole jobs

    def wait(self, job_id: str, *, on_update: Optional[UpdateCallback] = None,
             poll_interval: Optional[float] = None, on_no_progress: Optional[Callable[[], None]] = None) -> JobStatus:
        """Poll ``/status`` until the job has ended; ``on_update`` sees every answer (see :meth:`status`)."""
        interval = self.poll_interval if poll_interval is None else poll_interval
        while True:
            status = self.status(job_id, on_no_progress=on_no_progress)
            if on_update is not None:
                on_update(status)
            if not status.active:
                return status
            _sleep(interval)

    def run(
        self,
        job_input: Mapping[str, Any],
        *,
        output_path: Union[str, Path, None] = None,
        on_update: Optional[UpdateCallback] = None,
        on_submitted: Optional[Callable[[str], None]] = None,
        s3_config: Optional[Mapping[str, str]] = None,
        on_no_progress: Optional[Callable[[], None]] = None,
    ) -> JobResult:
        """Submit, wait, and save the video to ``output_path`` (when given).

        Raises :class:`JobFailed` when the job ends without a video. Ctrl-C while the job is queued
        or running asks the endpoint to cancel it and raises :class:`Interrupted` (a
        ``KeyboardInterrupt``) saying how that went.
        """
        job_id: Optional[str] = None
        try:
            job_id = self.submit(job_input, s3_config=s3_config)
            if on_submitted is not None:
                on_submitted(job_id)
            final = self.wait(job_id, on_update=on_update, on_no_progress=on_no_progress)
        except KeyboardInterrupt:
            raise self._interrupted(job_id) from None
        return self.result(final, output_path)

    def result(self, status: JobStatus, output_path: Union[str, Path, None] = None) -> JobResult:
        """A :class:`JobResult` from a finished job's status (saving the video), or :class:`JobFailed`."""
        output = status.output
        if status.status != "COMPLETED":
            raise JobFailed(status.id, status.status, status.error or f"The job ended with status {status.status}.",
                            status.error_code)
        if not isinstance(output, Mapping) or not isinstance(output.get("video"), str):
            message, code = _parse_error(None, output)
            raise JobFailed(status.id, status.status, message or (
                "The job completed without a video in its result (the endpoint may have failed to return "
                "a result that was too large)."), code)
        path = self.save_video(output, output_path) if output_path is not None else None
        return JobResult(job_id=status.id, output=output, path=path, delay_time_ms=status.delay_time_ms,
                         execution_time_ms=status.execution_time_ms)

    def _interrupted(self, job_id: Optional[str]) -> Interrupted:
        if job_id is None:
            return Interrupted(None, False, "Interrupted before the job was queued; there was no job to cancel "
                                            "(a job may still start if the request had already reached the API).")
        try:
            status = self.cancel(job_id)
        except CancelNotSupported as err:
            return Interrupted(job_id, False, f"Interrupted. {err} Job {job_id} may still run there.")
        except ApiError as err:
            return Interrupted(job_id, False, f"Interrupted; cancelling job {job_id} failed: {err}")
        except KeyboardInterrupt:
            return Interrupted(job_id, False, f"Interrupted again while cancelling job {job_id}; it may still run.")
        return Interrupted(job_id, True, f"Interrupted; cancelled job {job_id} on the endpoint "
                                         f"(status {status.status}).")

    # ------------------------------------------------------------------------------- video

    def save_video(self, output: Mapping[str, Any], path: Union[str, Path]) -> Path:
        """Write the result's video to ``path``: downloaded when it is a URL, decoded when base64."""
        path = Path(path)
        video = output.get("video")
        if not isinstance(video, str) or not video:
            raise JobFailed(str(output.get("id", "")), "COMPLETED", "The result has no video.")
        is_url = output.get("video_type") == "url" or (
            output.get("video_type") is None and video.startswith(("http://", "https://")))
        path.parent.mkdir(parents=True, exist_ok=True)
        with _atomic_file(path) as handle:
            if is_url:
                self._download(video, handle)
            else:
                try:
                    handle.write(base64.b64decode(video, validate=True))
                except (binascii.Error, ValueError) as err:
                    raise ApiError(f"The result's video is not valid base64: {err}") from None
        logger.info("Saved the video to %s", path)
        return path

    def _download(self, url: str, handle: Any) -> None:
        logger.debug("Downloading %s", _without_query(url))
        try:
            with self._downloads.stream("GET", url) as response:
                if response.is_error:
                    raise ApiError(f"Downloading the video from {_without_query(url)} failed: HTTP "
                                   f"{response.status_code}.", response.status_code)
                for chunk in response.iter_bytes(1 << 20):
                    handle.write(chunk)
        except httpx.HTTPError as err:
            raise ApiError(f"Downloading the video from {_without_query(url)} failed: {err}") from None

    # ------------------------------------------------------------------------------ plumbing

    def _request(self, method: str, path: str, *, idempotent: bool, **kwargs: Any) -> httpx.Response:
        """One request with bounded retries: a refused connection always (nothing was sent), and for
        idempotent requests a dropped connection or a 429/502/503/504 answer."""
        for attempt in range(1, _RETRIES + 1):
            last = attempt == _RETRIES
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TimeoutException as err:
                raise ApiError(f"{method} {path}: no answer from {self.base_url} in time ({type(err).__name__}).") \
                    from None
            except httpx.TransportError as err:
                retryable = isinstance(err, httpx.ConnectError) or (
                    idempotent and isinstance(err, (httpx.RemoteProtocolError, httpx.ReadError)))
                if last or not retryable:
                    raise ApiError(f"{method} {path}: could not reach {self.base_url}: {err}") from None
                logger.info("%s %s: %s; retrying", method, path, err)
            else:
                if not (idempotent and response.status_code in _RETRY_STATUS_CODES) or last:
                    return response
                logger.info("%s %s: HTTP %d; retrying", method, path, response.status_code)
            _sleep(min(8.0, 0.5 * 2 ** (attempt - 1)))
        raise AssertionError("unreachable")  # the loop returns or raises on its last attempt

    @staticmethod
    def _json(response: httpx.Response, route: str) -> dict[str, Any]:
        code = response.status_code
        if code in (401, 403):
            raise ApiError(f"{route}: the API refused the request (HTTP {code}); check RUNPOD_API_KEY.", code)
        if code == 413:
            raise ApiError(f"{route}: the request is too large for the API (HTTP 413); send the media as URLs "
                           "(--upload s3://bucket/prefix).", code)
        if response.is_error:
            raise ApiError(f"{route}: HTTP {code}: {_snippet(response.text)}", code)
        try:
            data = response.json()
        except ValueError:
            raise ApiError(f"{route}: the answer is not JSON: {_snippet(response.text)}", code) from None
        if not isinstance(data, dict):
            raise ApiError(f"{route}: expected a JSON object, got {_snippet(response.text)}", code)
        return data


@contextlib.contextmanager
def _atomic_file(path: Path) -> Any:
    """A temporary file next to ``path`` that replaces it only when the block succeeds.

    It is created with mode 0666 less the umask, as any file a program writes (not mkstemp's 0600).
    """
    while True:
        name = str(path.parent / f".{path.name}.{secrets.token_hex(6)}.part")
        try:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
        os.replace(name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(name)
        raise
