"""The client's exceptions. The command line maps them to exit codes (see ``cli``)."""

from __future__ import annotations

from typing import Optional


class Hallo3Error(Exception):
    """Base class of everything the client raises on purpose."""


class UsageError(Hallo3Error):
    """The request cannot be sent as given (missing file, bad option, missing API key, ...)."""


class RequestTooLarge(UsageError):
    """The JSON body of ``/run`` would pass the endpoint's size limit; nothing was sent."""


class ApiError(Hallo3Error):
    """The API answered with an HTTP error, or could not be reached."""

    def __init__(self, message: str, status_code: Optional[int] = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class CancelNotSupported(ApiError):
    """The API has no ``/cancel`` route (the local ``--rp_serve_api`` server has none)."""


class JobFailed(Hallo3Error):
    """The job ended without a video: ``FAILED``, ``CANCELLED``, ``TIMED_OUT`` or an empty result."""

    def __init__(self, job_id: str, status: str, error: str, error_code: Optional[str] = None) -> None:
        super().__init__(error)
        self.job_id = job_id
        self.status = status
        self.error = error
        self.error_code = error_code


class Interrupted(KeyboardInterrupt):
    """Ctrl-C while a job was running; the client asked the endpoint to cancel it.

    ``cancelled`` says whether the endpoint accepted the cancel request; ``message`` says what
    happened, for people.
    """

    def __init__(self, job_id: Optional[str], cancelled: bool, message: str) -> None:
        super().__init__(message)
        self.job_id = job_id
        self.cancelled = cancelled
        self.message = message
