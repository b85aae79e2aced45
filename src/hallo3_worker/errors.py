"""Errors that carry a stable, user-facing code.

Anything the user sent that cannot be processed raises :class:`InputError` with a code from
:class:`ErrorCode`; the handler turns it into ``{"error": message, "error_code": code}`` before any
GPU work starts. Internal failures use other exception types and are reported generically.
"""

from __future__ import annotations

import enum


class ErrorCode(str, enum.Enum):
    """Stable error codes returned to clients. Never rename a member: clients match on them."""

    INVALID_INPUT = "INVALID_INPUT"
    UNKNOWN_FIELD = "UNKNOWN_FIELD"
    INVALID_TYPE = "INVALID_TYPE"
    OUT_OF_RANGE = "OUT_OF_RANGE"
    MEDIA_FETCH_FAILED = "MEDIA_FETCH_FAILED"
    MEDIA_TOO_LARGE = "MEDIA_TOO_LARGE"
    IMAGE_UNDECODABLE = "IMAGE_UNDECODABLE"
    IMAGE_TOO_SMALL = "IMAGE_TOO_SMALL"
    AUDIO_UNDECODABLE = "AUDIO_UNDECODABLE"
    AUDIO_TOO_LONG = "AUDIO_TOO_LONG"
    AUDIO_TOO_SHORT = "AUDIO_TOO_SHORT"
    AUDIO_SILENT = "AUDIO_SILENT"
    AUDIO_LAYOUT_UNSUPPORTED = "AUDIO_LAYOUT_UNSUPPORTED"
    NO_FACE = "NO_FACE"
    OUTPUT_TOO_LARGE = "OUTPUT_TOO_LARGE"
    UPLOAD_FAILED = "UPLOAD_FAILED"
    CANCELLED = "CANCELLED"
    GPU_OUT_OF_MEMORY = "GPU_OUT_OF_MEMORY"
    GPU_ERROR = "GPU_ERROR"
    INTERNAL_ERROR = "INTERNAL_ERROR"
    MISSING_FIELD = "MISSING_FIELD"
    PATH_NOT_ALLOWED = "PATH_NOT_ALLOWED"
    URL_NOT_ALLOWED = "URL_NOT_ALLOWED"
    BUCKET_NOT_CONFIGURED = "BUCKET_NOT_CONFIGURED"
    WORKER_DISK_FULL = "WORKER_DISK_FULL"


class UserFacingError(Exception):
    """An error whose message is safe to show to the user verbatim, with a stable code.

    ``refresh_worker``: the fault is the worker's (a full disk), so the platform should replace it.
    """

    def __init__(self, code: ErrorCode, message: str, *, refresh_worker: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.refresh_worker = refresh_worker

    def to_response(self) -> dict[str, object]:
        response: dict[str, object] = {"error": self.message, "error_code": self.code.value}
        if self.refresh_worker:
            response["refresh_worker"] = True
        return response


class InputError(UserFacingError, ValueError):
    """A problem with what the user sent."""
