"""Client of the Hallo3 talking-head worker on Runpod: the ``hallo3`` command and a Python API.

>>> from hallo3_client import Hallo3Client
>>> with Hallo3Client.for_endpoint("abc123") as client:  # RUNPOD_API_KEY from the environment
...     result = client.run({"image": "https://…/face.jpg", "audio": "https://…/hello.wav"},
...                         output_path="hello.mp4")
"""

from hallo3_client.client import MAX_RUN_BODY_BYTES, RUNPOD_API_BASE, Hallo3Client, JobResult, JobStatus
from hallo3_client.errors import (
    ApiError,
    CancelNotSupported,
    Hallo3Error,
    Interrupted,
    JobFailed,
    RequestTooLarge,
    UsageError,
)
from hallo3_client.media import inline_media, resolve_media, upload_to_s3, uploaded_media

__version__ = "0.1.0"

__all__ = [
    "MAX_RUN_BODY_BYTES", "RUNPOD_API_BASE", "ApiError", "CancelNotSupported", "Hallo3Client", "Hallo3Error",
    "Interrupted", "JobFailed", "JobResult", "JobStatus", "RequestTooLarge", "UsageError", "inline_media",
    "resolve_media", "upload_to_s3", "uploaded_media",
]
