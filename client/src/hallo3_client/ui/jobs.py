"""The jobs of one ``hallo3 ui`` process: sent, followed and saved with the client's own code.

Each job is submitted with :meth:`Hallo3Client.submit` (media inline as data URIs, or uploaded to
the ``--upload`` bucket, exactly as ``hallo3 run`` does), followed on a thread of its own with
:meth:`Hallo3Client.wait`, whose updates feed a :class:`ProgressDisplay` (the CLI's progress bar,
here read as values), and its video is saved with :meth:`Hallo3Client.result` into this process's
results folder, from which the page plays and downloads it.
"""

from __future__ import annotations

import calendar
import contextlib
import dataclasses
import io
import logging
import shutil
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional
from urllib.parse import parse_qs, quote, urlsplit

from hallo3_client.client import Hallo3Client, JobResult, JobStatus, _without_query
from hallo3_client.errors import CancelNotSupported, Hallo3Error, JobFailed, UsageError
from hallo3_client.media import inline_media, resolve_media, uploaded_media
from hallo3_client.progress import ProgressDisplay

logger = logging.getLogger(__name__)

RESULT_FIELDS = ("seed", "width", "height", "fps", "frames", "duration_s", "audio_duration_s", "has_audio",
                 "size_bytes", "preset", "timings", "warnings", "video_type", "resumed_from_segment")


class _LogStream(io.TextIOBase):
    """Where the progress display writes its plain lines: the debug log."""

    def write(self, text: str) -> int:
        if text.strip():
            logger.debug("%s", text.strip())
        return len(text)

    def isatty(self) -> bool:
        return False


def url_expiry(url: str) -> Optional[float]:
    """When a presigned URL stops working (Unix time), from its query (SigV4 or SigV2); None if unknown."""
    query = parse_qs(urlsplit(url).query)
    if "X-Amz-Date" in query and "X-Amz-Expires" in query:
        try:
            start = calendar.timegm(time.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ"))
            return start + int(query["X-Amz-Expires"][0])
        except (ValueError, OverflowError):
            return None
    if "Expires" in query:
        with contextlib.suppress(ValueError):
            return float(query["Expires"][0])
    return None


@dataclasses.dataclass
class UiJob:
    """One job as the page sees it."""

    id: str
    submitted_at: float
    display: ProgressDisplay
    status: str = "IN_QUEUE"
    segment_urls: list[str] = dataclasses.field(default_factory=list)
    segments_saved: int = 0  # finished segments downloaded for the page, in order
    result: Optional[JobResult] = None
    error: Optional[str] = None
    error_code: Optional[str] = None
    cancel_message: Optional[str] = None
    done: bool = False

    def view(self) -> dict[str, Any]:
        """The job as JSON for the page (never the video itself, never a presigned URL's signature in logs)."""
        data: dict[str, Any] = {"id": self.id, "status": self.status, "done": self.done,
                                "submitted_at": self.submitted_at, "progress": self.display.snapshot(),
                                "segments_ready": len(self.segment_urls), "segments_saved": self.segments_saved,
                                "error": self.error,
                                "error_code": self.error_code, "cancel_message": self.cancel_message}
        if self.result is not None:
            output = self.result.output
            data["result"] = {k: output[k] for k in RESULT_FIELDS if k in output}
            data["video"] = f"api/jobs/{quote(self.id, safe='')}/video"
            if output.get("video_type") == "url" and isinstance(output.get("video"), str):
                data["result"]["video_url"] = output["video"]
                data["result"]["video_expires_at"] = url_expiry(output["video"])
        return data


class JobBoard:
    """Submits jobs through one :class:`Hallo3Client` and keeps what the page polls."""

    def __init__(self, client: Hallo3Client, results_dir: Path, *, upload: Optional[str] = None) -> None:
        self.client = client
        self.results_dir = results_dir
        self.upload = upload
        self._jobs: dict[str, UiJob] = {}
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        (results_dir / "uploads").mkdir(parents=True, exist_ok=True)

    # --------------------------------------------------------------------------- submitting

    def new_upload_dir(self) -> Path:
        folder = self.results_dir / "uploads" / uuid.uuid4().hex
        folder.mkdir()
        return folder

    def submit(self, fields: Mapping[str, Any], image: Path, audio: Path) -> UiJob:
        """Send a job with the given local files; raises the client's errors (nothing sent on a usage error)."""
        try:
            media = [resolve_media("image", str(image)), resolve_media("audio", str(audio))]
            if self.upload:
                job_input = uploaded_media(fields, media, self.upload)
            else:
                job_input = inline_media(fields, media, self.client.max_body_bytes)
            job_id = self.client.submit(job_input)
        finally:
            shutil.rmtree(image.parent, ignore_errors=True)
        job = UiJob(id=job_id, submitted_at=time.time(), display=ProgressDisplay(_LogStream(), tty=False))
        job.display.submitted(job_id, self.client.base_url)
        with self._lock:
            self._jobs[job_id] = job
        thread = threading.Thread(target=self._follow, args=(job,), daemon=True, name=f"hallo3-ui-{job_id[:8]}")
        self._threads.append(thread)
        thread.start()
        return job

    def _update(self, job: UiJob, status: JobStatus) -> None:
        job.status = status.status
        job.display.update(status)
        progress = status.progress
        urls = progress.get("segment_urls") if progress is not None else None
        if isinstance(urls, list) and len(urls) >= len(job.segment_urls):
            job.segment_urls = [str(u) for u in urls]
        self._save_segments(job)

    def _save_segments(self, job: UiJob) -> None:
        """Download the segments announced so far (the page plays them from here, in order)."""
        while job.segments_saved < len(job.segment_urls):
            index = job.segments_saved
            try:
                self.client.save_video({"video": job.segment_urls[index], "video_type": "url"},
                                       self.segment_path(job.id, index))
            except Hallo3Error as err:
                logger.warning("Job %s: segment %d could not be fetched: %s", job.id, index + 1, err)
                return
            job.segments_saved += 1
            logger.debug("Job %s: segment %d saved", job.id, index + 1)

    def _follow(self, job: UiJob) -> None:
        try:
            final = self.client.wait(job.id, on_update=lambda status: self._update(job, status))
            job.result = self.client.result(final, self.video_path(job.id))
            logger.info("Job %s done: seed %s, video from %s", job.id, job.result.seed,
                        _without_query(str(final.output.get("video", "")))
                        if final.output.get("video_type") == "url" else "base64")
        except JobFailed as err:
            job.status, job.error, job.error_code = err.status, err.error, err.error_code
        except Hallo3Error as err:
            job.error = str(err)
        except Exception as err:  # keep the page informed; the traceback goes to the log
            logger.exception("Job %s: following it failed", job.id)
            job.error = f"Following the job failed: {err}"
        finally:
            job.done = True

    # ------------------------------------------------------------------------------- queries

    def get(self, job_id: str) -> Optional[UiJob]:
        with self._lock:
            return self._jobs.get(job_id)

    def video_path(self, job_id: str) -> Path:
        return self.results_dir / f"{uuid.uuid5(uuid.NAMESPACE_URL, job_id).hex}.mp4"

    def segment_path(self, job_id: str, index: int) -> Path:
        return self.results_dir / f"{uuid.uuid5(uuid.NAMESPACE_URL, job_id).hex}-segment-{index:05d}.mp4"

    def fetch_result(self, job_id: str, url: str) -> Path:
        """Download an earlier result's video (a URL from the page's history) into the results folder."""
        if not url.startswith(("http://", "https://")):
            raise UsageError("An earlier result's video URL must be http(s).")
        return self.client.save_video({"video": url, "video_type": "url"}, self.video_path(job_id))

    def saved_video(self, job_id: str) -> Optional[Path]:
        path = self.video_path(job_id)
        return path if path.is_file() else None

    def cancel(self, job_id: str) -> str:
        """Ask the API to cancel; returns what happened, for people."""
        job = self.get(job_id)
        try:
            status = self.client.cancel(job_id)
        except CancelNotSupported as err:
            message = str(err)
        except Hallo3Error as err:
            message = f"Cancelling job {job_id} failed: {err}"
        else:
            message = f"Cancel requested: the job is {status.status}."
        if job is not None:
            job.cancel_message = message
        return message

    def close(self, wait_s: float = 2.0) -> None:
        for thread in self._threads:
            thread.join(timeout=wait_s / max(1, len(self._threads)))
