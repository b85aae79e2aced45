"""The S3 client of uploads: every network wait bounded, presigned GET URLs.

One :class:`BucketClient` per job and bucket. Its boto3 client carries a botocore ``Config`` with
``HALLO3_BUCKET_CONNECT_TIMEOUT_S``, ``HALLO3_BUCKET_READ_TIMEOUT_S`` and
``HALLO3_BUCKET_MAX_ATTEMPTS`` (standard retry mode), so a bucket that accepts connections and then
never answers fails one request after at most ``attempts x (connect + read timeout)`` plus the short
retry back-off, instead of botocore's defaults (60 s each, and the Runpod SDK's 25 KiB multipart
parts, each of which would wait that long). Files up to 8 MiB go up in one ``PutObject``.

Presigned URLs are computed locally (no request), valid for 7 days like the Runpod SDK's.
boto3 is installed with the Runpod SDK; it is imported on first use.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from hallo3_worker.settings import Settings

if TYPE_CHECKING:
    from hallo3_worker.worker.delivery import Bucket

logger = logging.getLogger(__name__)

PRESIGNED_URL_EXPIRES_S = 7 * 24 * 3600
CONTENT_TYPE = "video/mp4"
_TRANSFER_THREADS = 4
#: The most one request may wait on a bucket that accepts and never answers, for each attempt: the
#: connect and read timeouts, plus botocore's wait for "100 Continue" before it sends a body anyway.
_CONTINUE_WAIT_S = 1.0
_MAX_BACKOFF_S = 1.0  # standard retry mode: a random wait of up to 2**(attempt - 1) s before attempt 2


def request_bound_s(settings: Settings) -> float:
    """The longest one bucket request can take when the bucket never answers, all attempts included."""
    attempts = settings.bucket_max_attempts
    per_attempt = settings.bucket_connect_timeout_s + settings.bucket_read_timeout_s + _CONTINUE_WAIT_S
    backoff = sum(min(20.0, _MAX_BACKOFF_S * 2 ** (n - 1)) for n in range(1, attempts))
    return attempts * per_attempt + backoff


def region_of(endpoint_url: str) -> str | None:
    """The region named in an AWS-, Backblaze- or DigitalOcean-style endpoint, as the Runpod SDK reads it."""
    host = urlsplit(endpoint_url).hostname or ""
    if ".s3." in host:
        return host.split(".s3.", 1)[1].split(".", 1)[0] or None
    if host.endswith(".digitaloceanspaces.com"):
        return host.split(".")[-3] if host.count(".") >= 2 else None
    return None


class BucketClient:
    """Uploads files to one bucket and presigns their URLs; the boto3 client is made on first use."""

    def __init__(self, bucket: Bucket, settings: Settings) -> None:
        self.bucket = bucket
        self.settings = settings
        self._client: Any = None

    def client(self) -> Any:
        if self._client is None:
            import boto3.session
            from botocore.config import Config

            s = self.settings
            config = Config(
                signature_version="s3v4",
                connect_timeout=s.bucket_connect_timeout_s,
                read_timeout=s.bucket_read_timeout_s,
                retries={"total_max_attempts": s.bucket_max_attempts, "mode": "standard"},
                tcp_keepalive=True,
            )
            self._client = boto3.session.Session().client(
                "s3",
                endpoint_url=self.bucket.endpoint_url,
                aws_access_key_id=self.bucket.access_id,
                aws_secret_access_key=self.bucket.access_secret,
                region_name=region_of(self.bucket.endpoint_url),
                config=config,
            )
        return self._client

    def upload(self, path: Path, key: str) -> str:
        """Put ``path`` at ``key`` (``Content-Type: video/mp4``) and return a presigned GET URL.

        boto3/botocore errors propagate (timeouts, refused connections, ``ClientError``...).
        """
        from boto3.s3.transfer import TransferConfig

        client = self.client()
        client.upload_file(str(path), self.bucket.bucket_name, key, ExtraArgs={"ContentType": CONTENT_TYPE},
                           Config=TransferConfig(max_concurrency=_TRANSFER_THREADS))
        return client.generate_presigned_url("get_object", Params={"Bucket": self.bucket.bucket_name, "Key": key},
                                             ExpiresIn=PRESIGNED_URL_EXPIRES_S)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
