"""Returns the finished MP4: bucket upload (presigned URL) or inline base64; finished segments early.

Order for ``output.mode == "auto"``:

1. the request's top-level ``s3Config``;
2. the endpoint's ``BUCKET_*`` settings;
3. inline base64 when the encoded text fits ``inline_output_max_bytes``;
4. otherwise ``OUTPUT_TOO_LARGE``.

When the video goes to a bucket, :class:`SegmentUploads` puts each finished segment there too (under
``<job>/segments/``) as soon as it exists, so a caller can watch it before the job ends; after one
failed segment upload it stops trying for that job, so a bucket that never answers costs the job one
bounded wait there and one for the video.

Uploads go through :class:`hallo3_worker.worker.bucket.BucketClient`, whose every request has
connect and read timeouts and a bounded number of attempts (``HALLO3_BUCKET_*`` settings).
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import re
import time
from pathlib import Path

from hallo3_worker.errors import ErrorCode, UserFacingError
from hallo3_worker.settings import Settings
from hallo3_worker.worker.bucket import BucketClient
from hallo3_worker.worker.inputs import redact_url
from hallo3_worker.worker.schema import JobSpec, OutputMode

logger = logging.getLogger(__name__)

_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9._-]")


class DeliveryError(UserFacingError):
    """The video exists but could not be handed back."""


@dataclasses.dataclass(frozen=True)
class Bucket:
    """Where to upload: credentials in the SDK's ``bucket_creds`` shape plus bucket and prefix."""

    endpoint_url: str
    access_id: str
    access_secret: str
    bucket_name: str
    prefix: str
    source: str  # "s3Config" or "BUCKET_* settings", for messages

    def creds(self) -> dict[str, str]:
        return {"endpointUrl": self.endpoint_url, "accessId": self.access_id, "accessSecret": self.access_secret}

    def __repr__(self) -> str:  # keep secrets out of logs and tracebacks
        return f"Bucket({self.source}, {redact_url(self.endpoint_url)}, {self.bucket_name!r})"


@dataclasses.dataclass
class Delivered:
    video: str  # presigned URL or base64 text
    video_type: str  # "url" or "base64"
    warnings: list[str] = dataclasses.field(default_factory=list)


def choose_bucket(spec: JobSpec, settings: Settings) -> Bucket | None:
    """The request's ``s3Config`` wins over the endpoint's ``BUCKET_*`` settings."""
    if spec.s3_config is not None:
        c = spec.s3_config
        return Bucket(c.endpoint_url, c.access_id, c.access_secret, c.bucket_name, "", "s3Config")
    if settings.bucket is not None:
        b = settings.bucket
        return Bucket(b.endpoint_url, b.access_key_id, b.secret_access_key, b.bucket_name, b.prefix,
                      "BUCKET_* settings")
    return None


def safe_key_part(text: str, fallback: str = "job") -> str:
    """``text`` reduced to characters that are safe in an object key, at most 128 of them."""
    cleaned = _UNSAFE_KEY_CHARS.sub("_", text).strip("._")[:128]
    return cleaned or fallback


def inline_size(size_bytes: int) -> int:
    """Length of the base64 text for ``size_bytes`` bytes."""
    return 4 * ((size_bytes + 2) // 3)


def deliver(video_path: Path, spec: JobSpec, settings: Settings) -> Delivered:
    """Hand the video back as the job asks; raise ``DeliveryError`` when it cannot."""
    mode = spec.output.mode
    bucket = None if mode is OutputMode.BASE64 else choose_bucket(spec, settings)
    if bucket is None:
        if mode is OutputMode.S3:  # normally caught by the schema before any work
            raise DeliveryError(ErrorCode.BUCKET_NOT_CONFIGURED, "output.mode 's3' needs a bucket.")
        return _inline(video_path, settings, [])
    client = BucketClient(bucket, settings)
    try:
        job_part = safe_key_part(spec.job_id)
        return Delivered(_upload(client, video_path, spec.output.filename or f"{job_part}.mp4", job_part), "url")
    except _UploadFailed as err:
        if mode is OutputMode.S3 or inline_size(video_path.stat().st_size) > settings.inline_output_max_bytes:
            raise DeliveryError(ErrorCode.UPLOAD_FAILED, str(err)) from None
        return _inline(video_path, settings, [f"{err} The video is returned inline instead."])
    finally:
        client.close()


def goes_inline(spec: JobSpec, settings: Settings) -> bool:
    """Whether the video will be returned inline (no bucket, or ``output.mode`` "base64")."""
    return spec.output.mode is OutputMode.BASE64 or choose_bucket(spec, settings) is None


class SegmentUploads:
    """One job's early segment uploads: next to where the video will go, only when that is a bucket.

    A failed upload is logged and never fails the job; after the first failure the job's later
    segments are not tried (the bucket is refusing or not answering; the video's own upload still is).
    """

    def __init__(self, spec: JobSpec, settings: Settings) -> None:
        self.spec = spec
        bucket = None if spec.output.mode is OutputMode.BASE64 else choose_bucket(spec, settings)
        self.client = BucketClient(bucket, settings) if bucket is not None else None

    def upload(self, segment_path: Path) -> str | None:
        """The segment's presigned URL, or None (no bucket, or uploads failed)."""
        if self.client is None:
            return None
        try:
            return _upload(self.client, segment_path, segment_path.name, f"{safe_key_part(self.spec.job_id)}/segments")
        except _UploadFailed:
            logger.warning("Segment uploads stopped for this job after a failed upload")
            self.close()
            return None

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None


def _inline(video_path: Path, settings: Settings, warnings: list[str]) -> Delivered:
    size = video_path.stat().st_size
    if inline_size(size) > settings.inline_output_max_bytes:
        limit_mb = settings.inline_output_max_bytes / 1e6
        raise DeliveryError(
            ErrorCode.OUTPUT_TOO_LARGE,
            f"The video is {size / 1e6:.1f} MB ({inline_size(size) / 1e6:.1f} MB as base64), more than the "
            f"{limit_mb:.1f} MB that can be returned inline. Send 's3Config' with the request (or configure "
            "BUCKET_* on the endpoint), or use shorter audio.",
        )
    return Delivered(base64.b64encode(video_path.read_bytes()).decode("ascii"), "base64", warnings)


class _UploadFailed(Exception):
    pass


def _upload(client: BucketClient, path: Path, filename: str, folder: str) -> str:
    """Upload as ``<bucket prefix>/<folder>/<filename>`` and return the presigned URL; raise ``_UploadFailed``."""
    bucket = client.bucket
    key = "/".join(p for p in (bucket.prefix, folder, filename) if p)
    where = f"bucket '{bucket.bucket_name}' at {redact_url(bucket.endpoint_url, 60)}"
    started = time.monotonic()
    try:
        url = client.upload(path, key)
    except Exception as err:  # boto3/botocore raise many unrelated types
        reason = _describe_upload_error(err)
        if any("Timeout" in kind.__name__ for kind in type(err).__mro__):
            s = client.settings
            reason += (f" (the bucket did not answer: {s.bucket_max_attempts} attempt(s), connect timeout "
                       f"{s.bucket_connect_timeout_s:g} s, read timeout {s.bucket_read_timeout_s:g} s)")
        logger.warning("Upload to %s (%s) failed after %.1f s: %s", where, bucket.source,
                       time.monotonic() - started, reason)
        raise _UploadFailed(f"Uploading the video to {where} ({bucket.source}) failed: {reason}.") from None
    logger.info("Uploaded %s to %s as %s in %.1f s: %s", path.name, where, key, time.monotonic() - started,
                redact_url(url))
    return url


def _describe_upload_error(err: Exception) -> str:
    response = getattr(err, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        if code:
            return str(code)
    cause = err.__cause__ or err.__context__
    if cause is not None and getattr(cause, "response", None):
        return _describe_upload_error(cause)  # boto3 wraps ClientError in S3UploadFailedError
    return type(err).__name__
