"""Turns the ``image``/``audio`` strings of a job into local files, with size caps.

A media string is one of (checked in this order):

* ``http://`` or ``https://`` URL: downloaded through the Runpod SDK's SSRF-guarded getter
  (:func:`runpod.serverless.utils.rp_ssrf.safe_get`), which blocks private and link-local
  destinations (unless ``RUNPOD_ALLOW_PRIVATE_DOWNLOAD_URLS`` is set) and honours
  ``RUNPOD_MAX_DOWNLOAD_BYTES``; the body streams into the job folder under our own cap too.
  The SDK bounds each wait (``timeout`` = connect and read timeout) but not the whole download, so
  a server that trickles bytes could hold a job for ever: the download also has a deadline in all.
* ``data:<type>;base64,<data>`` data URI; the declared type may be any token (or empty): the
  content decides what the file is.
* an absolute path (starts with ``/``, at most 4096 characters, not the ``/9j/`` start of a base64
  JPEG): must lie inside the network volume root once symlinks are resolved; read in place.
* anything else: plain base64.

Nothing here writes outside the job folder, and nothing logs payloads or URL query strings: use
:func:`describe` to name a source in a log line or message.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import enum
import errno
import logging
import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import requests
import urllib3

from hallo3_worker.errors import ErrorCode, InputError

logger = logging.getLogger(__name__)

MAX_PATH_CHARS = 4096
DOWNLOAD_TRIES = 3  # attempts per URL when the connection fails (a server that went silent is not retried)
RETRY_DELAY_S = 0.5  # times the attempt number
_CHUNK_BYTES = 1024 * 1024
_DATA_URI_RE = re.compile(r"^data:(?P<mime>[^;,]*)(?P<params>(;[^;,=]+=[^;,]*)*)(?P<b64>;base64)?,", re.IGNORECASE)
_GUARD_HOST_RE = re.compile(r"host '([^']{1,253})'")
_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_WHITESPACE_RE = re.compile(r"\s+")
_URLSAFE_TO_STANDARD = str.maketrans("-_", "+/")


class SourceKind(str, enum.Enum):
    URL = "url"
    DATA_URI = "data_uri"
    BASE64 = "base64"
    PATH = "path"


@dataclasses.dataclass(frozen=True)
class FetchedMedia:
    """A media input available as a local file."""

    path: Path
    kind: SourceKind
    size_bytes: int


def classify(value: str) -> SourceKind:
    """Tell which form a media string takes (see the module docstring for the rules)."""
    lowered = value[:16].lower()
    if lowered.startswith(("http://", "https://")):
        return SourceKind.URL
    if lowered.startswith("data:"):
        return SourceKind.DATA_URI
    if _SCHEME_RE.match(value[:32]):
        return SourceKind.URL  # an unsupported scheme; rejected when fetched
    if value.startswith("/") and not value.startswith("/9j/") and len(value) <= MAX_PATH_CHARS:
        return SourceKind.PATH
    return SourceKind.BASE64


def redact_url(url: str, limit: int = 80) -> str:
    """``scheme://host/path`` without credentials, query or fragment, shortened to ``limit``."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        text = f"{parts.scheme}://{host}{parts.path}"
    except ValueError:
        text = url.split("?", 1)[0].split("#", 1)[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe(value: str) -> str:
    """A log-safe description of a media string (no payloads, no query strings)."""
    kind = classify(value)
    if kind is SourceKind.URL:
        return f"url {redact_url(value)}"
    if kind is SourceKind.PATH:
        return f"path {value[:120]}"
    return f"{kind.value} ({len(value)} characters)"


def fetch_media(value: str, field: str, dest: Path, max_bytes: int, *, volume_root: Path,
                timeout_s: float, deadline_s: float | None = None) -> FetchedMedia:
    """Make the media string ``value`` of job field ``field`` a local file.

    ``dest`` is the file to write for URL and base64 sources (its folder must exist); a volume
    path is checked and returned in place. A URL download waits at most ``timeout_s`` for any one
    answer and takes at most ``deadline_s`` in all (retries included). Raises ``InputError`` for
    anything unusable.
    """
    kind = classify(value)
    if kind is SourceKind.URL:
        size = _download(value, field, dest, max_bytes, timeout_s, deadline_s)
        return FetchedMedia(dest, kind, size)
    if kind is SourceKind.PATH:
        path = _volume_path(value, field, volume_root, max_bytes)
        return FetchedMedia(path, kind, path.stat().st_size)
    payload = _strip_data_uri(value, field) if kind is SourceKind.DATA_URI else value
    size = _write_base64(payload, field, dest, max_bytes)
    return FetchedMedia(dest, kind, size)


def _too_large(field: str, max_bytes: int) -> InputError:
    return InputError(ErrorCode.MEDIA_TOO_LARGE, f"'{field}' is larger than the {max_bytes // 1024} KiB limit.")


def _strip_data_uri(value: str, field: str) -> str:
    match = _DATA_URI_RE.match(value[:256])
    if match is None or not match.group("b64"):
        raise InputError(
            ErrorCode.INVALID_INPUT,
            f"'{field}' is a data URI but not of the form 'data:<type>;base64,<data>'.",
        )
    return value[match.end():]


def _write_base64(payload: str, field: str, dest: Path, max_bytes: int) -> int:
    """Decode base64 text into ``dest``; the size is checked before decoding."""
    text = _WHITESPACE_RE.sub("", payload)
    if len(text) * 3 // 4 > max_bytes + 3:  # every 4 characters carry 3 bytes
        raise _too_large(field, max_bytes)
    text += "=" * (-len(text) % 4)
    try:
        standard = text.translate(_URLSAFE_TO_STANDARD)  # accept the URL-safe alphabet too
        data = base64.b64decode(standard.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise InputError(
            ErrorCode.INVALID_INPUT,
            f"'{field}' is neither a URL, a data URI, a volume path nor valid base64.",
        ) from None
    if not data:
        raise InputError(ErrorCode.INVALID_INPUT, f"'{field}' decodes to no data.")
    if len(data) > max_bytes:
        raise _too_large(field, max_bytes)
    dest.write_bytes(data)
    return len(data)


def _volume_path(value: str, field: str, volume_root: Path, max_bytes: int) -> Path:
    """Resolve ``value`` and make sure it is a regular file inside ``volume_root``."""
    root = Path(os.path.realpath(volume_root))
    path = Path(os.path.realpath(value))
    if not path.is_relative_to(root) or path == root:
        raise InputError(
            ErrorCode.PATH_NOT_ALLOWED,
            f"'{field}' is a path outside the network volume; only files under {volume_root} can be "
            "read (send other media as a URL, base64 or data URI).",
        )
    if not path.is_file():
        raise InputError(ErrorCode.MEDIA_FETCH_FAILED, f"'{field}' names no file on the network volume: {value[:200]}")
    if path.stat().st_size > max_bytes:
        raise _too_large(field, max_bytes)
    return path


class _DeadlineExceeded(requests.Timeout):
    """The download as a whole took longer than its deadline."""


def _timed_out(err: BaseException) -> bool:
    """Whether a requests error is a timeout; one in mid-body arrives as a ConnectionError around urllib3's."""
    return isinstance(err, requests.Timeout) or any(isinstance(arg, urllib3.exceptions.TimeoutError)
                                                    for arg in err.args)


def _download(url: str, field: str, dest: Path, max_bytes: int, timeout_s: float,
              deadline_s: float | None = None) -> int:
    """Stream ``url`` into ``dest`` through the SDK's SSRF guard; return the byte count.

    Connection failures are retried (``DOWNLOAD_TRIES`` in all) while the deadline allows; HTTP
    errors and timeouts (a server that stopped answering) are not.
    """
    from runpod.serverless.utils import rp_ssrf  # the SDK import is slow; keep it lazy

    shown = redact_url(url)
    cap = min(max_bytes, rp_ssrf.max_download_bytes())
    if not url.lower().startswith(("http://", "https://")):
        raise InputError(ErrorCode.URL_NOT_ALLOWED, f"'{field}' URL must use http or https: {shown}")
    started = time.monotonic()
    deadline = started + (deadline_s if deadline_s is not None else DOWNLOAD_TRIES * timeout_s)
    try:
        for attempt in range(1, DOWNLOAD_TRIES + 1):
            try:
                remaining = max(0.1, deadline - time.monotonic())
                written = _download_once(url, dest, cap, min(timeout_s, remaining), deadline)
                break
            except (requests.ConnectionError, requests.Timeout) as err:
                if attempt == DOWNLOAD_TRIES or _timed_out(err) or time.monotonic() + RETRY_DELAY_S * attempt >= deadline:
                    raise
                logger.info("Download of %s for '%s' failed (%s); retrying", shown, field, type(err).__name__)
                time.sleep(RETRY_DELAY_S * attempt)
    except rp_ssrf.SSRFError as err:
        dest.unlink(missing_ok=True)
        raise _guard_error(err, field, url, cap) from None
    except requests.HTTPError as err:
        dest.unlink(missing_ok=True)
        status = err.response.status_code if err.response is not None else "error"
        raise InputError(
            ErrorCode.MEDIA_FETCH_FAILED, f"Could not download '{field}' from {shown}: HTTP {status}."
        ) from None
    except (requests.RequestException, OSError) as err:
        dest.unlink(missing_ok=True)
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise  # the worker's disk is full: not the URL's fault
        logger.warning("Download of %s for '%s' failed: %s", shown, field, type(err).__name__)
        host = _host(url)
        if isinstance(err, _DeadlineExceeded):
            reason = f"the host {host} took longer than {deadline - started:g} s in all"
        elif isinstance(err, requests.ConnectionError) and _timed_out(err):  # stalled in mid-body
            reason = f"the host {host} sent nothing for {timeout_s:g} s"
        else:
            reason = _connection_problem(err, host, timeout_s)
        raise InputError(ErrorCode.MEDIA_FETCH_FAILED, f"Could not download '{field}' from {shown}: {reason}.") from None
    if written == 0:
        dest.unlink(missing_ok=True)
        raise InputError(ErrorCode.MEDIA_FETCH_FAILED, f"'{field}' download from {shown} was empty.")
    return written


def _host(url: str) -> str:
    try:
        return urlsplit(url).hostname or "(none)"
    except ValueError:
        return "(unreadable)"


def _guard_error(err: Exception, field: str, url: str, cap: int) -> InputError:
    """The user-facing error for a refusal of the SDK's SSRF guard (``rp_ssrf.SSRFError``).

    Only a destination that is not public, or not http(s), is URL_NOT_ALLOWED; a name that does not
    resolve, a broken redirect or a proxy this worker cannot use is MEDIA_FETCH_FAILED.
    """
    text = str(err)
    shown = redact_url(url)
    named = _GUARD_HOST_RE.search(text)
    host = named.group(1) if named else _host(url)  # a redirect may lead to another host
    if "size cap" in text:
        return _too_large(field, cap)
    if isinstance(err.__cause__, socket.gaierror) or text.startswith(("could not resolve host", "no addresses")):
        logger.info("Download of %s for '%s' failed: the host %s does not resolve", shown, field, host)
        return InputError(ErrorCode.MEDIA_FETCH_FAILED,
                          f"Could not download '{field}' from {shown}: the host {host} could not be resolved "
                          "(no such name, or its DNS did not answer).")
    if text.startswith("refusing to fetch"):  # an HTTP(S)_PROXY of the worker: a server setting, not the URL
        logger.warning("Download of %s for '%s' refused: the SSRF guard cannot pin addresses through a proxy; "
                       "exempt the host with NO_PROXY or remove the proxy setting", shown, field)
        return InputError(ErrorCode.MEDIA_FETCH_FAILED,
                          f"Could not download '{field}' from {shown}: this worker reaches hosts only through a "
                          "proxy, which its guarded downloads cannot use.")
    if "redirect" in text:
        return InputError(ErrorCode.MEDIA_FETCH_FAILED,
                          f"Could not download '{field}' from {shown}: too many redirects, or a redirect without a "
                          "target.")
    logger.warning("Blocked download of %s for '%s': %s", shown, field, text.split(":")[0][:120])
    return InputError(
        ErrorCode.URL_NOT_ALLOWED,
        f"'{field}' URL is not allowed (only public http/https hosts can be fetched; {host} is not one): {shown}",
    )


def _connection_problem(err: BaseException, host: str, timeout_s: float) -> str:
    """A few words on why a connection failed, naming the host (no payloads, no query strings)."""
    if isinstance(err, requests.Timeout):
        return f"the host {host} did not answer within {timeout_s:g} s"
    if _caused_by(err, ConnectionRefusedError):
        return f"the host {host} refused the connection"
    if isinstance(err, requests.ConnectionError):
        return f"could not connect to the host {host}"
    return f"{type(err).__name__} while reading from the host {host}"


def _caused_by(err: BaseException, kind: type[BaseException], depth: int = 8) -> bool:
    """Whether ``kind`` is among the errors that led to ``err`` (causes, contexts, wrapped reasons)."""
    seen: list[object] = [err]
    for _ in range(depth):
        found: list[object] = []
        for item in seen:
            if isinstance(item, kind):
                return True
            if isinstance(item, BaseException):
                found += [item.__cause__, item.__context__, getattr(item, "reason", None), *item.args]
        seen = [item for item in found if isinstance(item, BaseException)]
        if not seen:
            return False
    return False


def _download_once(url: str, dest: Path, cap: int, timeout_s: float, deadline: float | None = None) -> int:
    """One guarded GET of ``url`` streamed into ``dest`` (at most ``cap`` bytes, until the monotonic
    ``deadline``); SDK/requests errors propagate."""
    from runpod.serverless.utils import rp_download, rp_ssrf

    written = 0
    with rp_ssrf.safe_get(url, stream=True, timeout=timeout_s, headers=rp_download.HEADERS, max_bytes=cap) as response:
        response.raise_for_status()
        with open(dest, "wb") as out:
            for chunk in _body(response, deadline):
                written += len(chunk)
                if written > cap:  # as rp_ssrf.iter_content_capped: a lying or absent Content-Length
                    raise rp_ssrf.SSRFError(f"download exceeds size cap: >{cap} bytes")
                out.write(chunk)
    return written


def _body(response: requests.Response, deadline: float | None) -> Iterator[bytes]:
    """The body as it arrives (each piece after at most one read, so a trickle cannot outlast the deadline).

    urllib3's errors are raised as requests raises them from ``iter_content``.
    """
    try:
        while chunk := response.raw.read1(_CHUNK_BYTES, decode_content=True):
            if deadline is not None and time.monotonic() > deadline:
                raise _DeadlineExceeded("the download passed its deadline")
            yield chunk
    except urllib3.exceptions.ProtocolError as err:
        raise requests.exceptions.ChunkedEncodingError(err) from err
    except urllib3.exceptions.DecodeError as err:
        raise requests.exceptions.ContentDecodingError(err) from err
    except urllib3.exceptions.ReadTimeoutError as err:
        raise requests.ConnectionError(err) from err
    except urllib3.exceptions.SSLError as err:
        raise requests.exceptions.SSLError(err) from err
