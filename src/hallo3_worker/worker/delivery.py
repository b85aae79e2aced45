"""Returns the finished MP4: bucket upload (presigned URL) or inline base64; finished segments early.

Order for ``output.mode == "auto"``:

1. the request's top-level ``s3Config``;
2. the endpoint's ``BUCKET_*`` settings;
3. inline base64 when the encoded text fits ``inline_output_max_bytes``;
4. otherwise ``OUTPUT_TOO_LARGE``.

When the video goes to a bucket, :func:`upload_segment` puts each finished segment there too (under
``<job>/segments/``) as soon as it exists, so a caller can watch it before the job ends.

Uploads go through :func:`runpod.serverless.utils.rp_upload.upload_file_to_bucket` with explicit
credentials, bucket name and ``ContentType: video/mp4``. That helper silently copies the file to a
local ``local_upload/`` folder when it cannot build an S3 client; such a result is detected,
removed, and never returned as if it were a URL.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import re
from pathlib import Path

from hallo3_worker.errors import ErrorCode, UserFacingError
from hallo3_worker.settings import Settings
from hallo3_worker.worker.inputs import redact_url
from hallo3_worker.worker.schema import JobSpec, OutputMode

logger = logging.getLogger(__name__)

CONTENT_TYPE = "video/mp4"
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
    try:
        job_part = safe_key_part(spec.job_id)
        return Delivered(_upload(video_path, spec.output.filename or f"{job_part}.mp4", job_part, bucket), "url")
    except _UploadFailed as err:
        if mode is OutputMode.S3 or inline_size(video_path.stat().st_size) > settings.inline_output_max_bytes:
            raise DeliveryError(ErrorCode.UPLOAD_FAILED, str(err)) from None
        return _inline(video_path, settings, [f"{err} The video is returned inline instead."])


def upload_segment(segment_path: Path, spec: JobSpec, settings: Settings) -> str | None:
    """Upload one finished segment next to where the video will go; its presigned URL, or None.

    Only when the video itself goes to a bucket; a failed upload is logged and never fails the job.
    """
    bucket = None if spec.output.mode is OutputMode.BASE64 else choose_bucket(spec, settings)
    if bucket is None:
        return None
    try:
        return _upload(segment_path, segment_path.name, f"{safe_key_part(spec.job_id)}/segments", bucket)
    except _UploadFailed:
        return None


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


def _upload(video_path: Path, filename: str, folder: str, bucket: Bucket) -> str:
    """Upload as ``<bucket prefix>/<folder>/<filename>`` through the SDK and return the presigned URL;
    raise ``_UploadFailed``."""
    from runpod.serverless.utils import rp_upload  # the SDK import is slow; keep it lazy

    prefix = "/".join(p for p in (bucket.prefix, folder) if p)
    where = f"bucket '{bucket.bucket_name}' at {redact_url(bucket.endpoint_url, 60)}"
    try:
        result = rp_upload.upload_file_to_bucket(
            file_name=filename,
            file_location=str(video_path),
            bucket_creds=bucket.creds(),
            bucket_name=bucket.bucket_name,
            prefix=prefix,
            extra_args={"ContentType": CONTENT_TYPE},
        )
    except Exception as err:  # boto3/botocore raise many unrelated types
        reason = _describe_upload_error(err)
        logger.warning("Upload to %s (%s) failed: %s", where, bucket.source, reason)
        raise _UploadFailed(f"Uploading the video to {where} ({bucket.source}) failed: {reason}.") from None
    if not isinstance(result, str) or not result.startswith(("https://", "http://")):
        _remove_local_fallback(result)
        logger.error("The SDK stored the video locally instead of uploading it to %s", where)
        raise _UploadFailed(f"Uploading the video to {where} ({bucket.source}) failed: no S3 client could be made.")
    logger.info("Uploaded the video to %s as %s/%s: %s", where, prefix, filename, redact_url(result))
    return result


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


def _remove_local_fallback(result: object) -> None:
    """Delete the file the SDK's local fallback wrote (``local_upload/<name>``), and its folder if empty."""
    if not isinstance(result, str) or not result:
        return
    path = Path(result).absolute()
    try:
        path.unlink(missing_ok=True)
        if path.parent.name == "local_upload":
            path.parent.rmdir()  # only succeeds when empty
    except OSError:
        pass
