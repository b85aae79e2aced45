"""From ``--image``/``--audio`` to job input values: URLs as they are, local files inline or uploaded.

Local files go inline as data URIs (the worker accepts data URIs, plain base64, URLs and volume
paths; a data URI is never mistaken for a path). When the request would pass the ``/run`` size
limit, :func:`inline_media` refuses before anything is sent; :func:`upload_to_s3` puts the files in
the caller's bucket instead and returns presigned GET URLs for the worker to fetch. boto3 is
imported only there (``pip install './client[s3]'`` from a checkout of the worker).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import mimetypes
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional

from hallo3_client.client import check_body_size
from hallo3_client.errors import Hallo3Error, UsageError

logger = logging.getLogger(__name__)

MEDIA_FIELDS = ("image", "audio")
UPLOAD_URL_EXPIRES_S = 24 * 3600  # long enough for a job that waits in the queue


@dataclasses.dataclass(frozen=True)
class Media:
    """One of the job's media: ``field`` is ``"image"`` or ``"audio"``; ``path`` is None for a URL."""

    field: str
    source: str
    path: Optional[Path] = None

    @property
    def is_local(self) -> bool:
        return self.path is not None


def is_url(value: str) -> bool:
    return value.strip().lower().startswith(("http://", "https://"))


def resolve_media(field: str, value: str) -> Media:
    """A URL is passed through; anything else must be a readable local file."""
    value = value.strip()
    if is_url(value):
        return Media(field, value)
    path = Path(value).expanduser()
    if not path.is_file():
        raise UsageError(f"--{field}: {value!r} is not a file (give a local file or an http(s) URL).")
    return Media(field, value, path)


def _mime(path: Path) -> str:
    return mimetypes.guess_type(path.name)[0] or "application/octet-stream"


def data_uri(path: Path) -> str:
    """The file as a data URI (the worker decides the type from the content, not the declared one)."""
    return f"data:{_mime(path)};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def _data_uri_size(path: Path) -> int:
    size = path.stat().st_size
    return len(f"data:{_mime(path)};base64,") + 4 * ((size + 2) // 3)


def inline_media(fields: Mapping[str, Any], media: Sequence[Media], max_body_bytes: Optional[int]) -> dict[str, Any]:
    """The job input with local files as data URIs.

    Raises :class:`~hallo3_client.errors.RequestTooLarge` before reading any file when the request
    body would pass ``max_body_bytes`` (``None``: no limit).
    """
    job = dict(fields)
    for item in media:
        job[item.field] = "" if item.is_local else item.source
    # The body is {"input": job}; each empty placeholder above grows by exactly the data URI's length.
    estimate = len(json.dumps({"input": job}, separators=(",", ":")).encode("utf-8"))
    estimate += sum(_data_uri_size(item.path) for item in media if item.path is not None)
    check_body_size(estimate, max_body_bytes)
    for item in media:
        if item.path is not None:
            job[item.field] = data_uri(item.path)
    return job


def parse_s3_target(target: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ``("bucket", "some/prefix")``."""
    if not target.startswith("s3://"):
        raise UsageError(f"--upload wants s3://bucket/prefix, got {target!r}.")
    bucket, _, prefix = target[len("s3://"):].partition("/")
    if not bucket:
        raise UsageError(f"--upload wants s3://bucket/prefix, got {target!r} (no bucket).")
    return bucket, prefix.strip("/")


def upload_to_s3(paths: Sequence[Path], target: str, *, expires_s: int = UPLOAD_URL_EXPIRES_S,
                 s3_client: Any = None) -> list[str]:
    """Upload files under ``s3://bucket/prefix/<random folder>/`` and return presigned GET URLs.

    boto3 finds the bucket and credentials the standard way (``AWS_ENDPOINT_URL``,
    ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, ``AWS_REGION``, ...). The
    objects are left in the bucket.
    """
    bucket, prefix = parse_s3_target(target)
    try:
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        raise UsageError("--upload needs boto3: install the client with its s3 extra, "
                         "pip install './client[s3]' (from a checkout of the worker).") from None
    s3 = s3_client or boto3.client("s3")
    folder = f"{prefix}/{uuid.uuid4().hex}" if prefix else uuid.uuid4().hex
    urls: list[str] = []
    keys: set[str] = set()
    for index, path in enumerate(paths):
        key = f"{folder}/{path.name}"
        if key in keys:  # two files of the same name
            key = f"{folder}/{index}-{path.name}"
        keys.add(key)
        try:
            s3.upload_file(str(path), bucket, key, ExtraArgs={"ContentType": _mime(path)})
            urls.append(s3.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key},
                                                  ExpiresIn=expires_s))
        except (BotoCoreError, ClientError) as err:
            raise Hallo3Error(f"Uploading {path.name} to s3://{bucket}/{key} failed: {err}") from None
        logger.info("Uploaded %s to s3://%s/%s", path, bucket, key)
    return urls


def uploaded_media(fields: Mapping[str, Any], media: Sequence[Media], target: str, **kwargs: Any) -> dict[str, Any]:
    """The job input with local files uploaded to ``target`` and sent as presigned URLs."""
    job = dict(fields)
    local = [item for item in media if item.path is not None]
    urls = upload_to_s3([item.path for item in local], target, **kwargs) if local else []  # type: ignore[misc]
    for item in media:
        job[item.field] = item.source
    for item, url in zip(local, urls):
        job[item.field] = url
    return job
