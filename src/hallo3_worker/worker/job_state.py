"""Saved progress of long jobs: a job that comes back continues after its last finished segment.

A job comes back through Runpod's ``/retry`` (same id, same input), a requeue after a lost worker,
or a local run of the same job file. With a state folder configured (``HALLO3_JOB_STATE_DIR``, on
the network volume by default) the worker keeps, per job id::

    <state dir>/<job id>/
      lock                who works on the job (host, pid, time); refreshed after every segment
      segment_00000.mp4   the encoded segments (each its own closed group of pictures)
      resume.bin          the pipeline's resume state after the last saved segment
      job.json            input digest, seed, the saved segments and their frame counts; written last

Every file is written under a temporary name and renamed into place, and ``job.json`` names only
files that were complete before it, so a worker killed at any point leaves a state that is either
the previous one or the new one. Anything unexpected (a truncated or missing file, another input
under the same id, an unreadable folder) is logged and the job starts over; state never fails a
job. A lock held by a live process (or refreshed within ``stale_after_s`` on another host) keeps a
second worker from writing the same job; it then runs without saving. Finished jobs remove their
folder; folders untouched for ``max_age_s`` are removed by :func:`expire`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

FORMAT = 1
_MANIFEST = "job.json"
_RESUME = "resume.bin"
_LOCK = "lock"


def input_digest(files: list[Path], fields: Mapping[str, Any]) -> str:
    """SHA-256 over the input files' bytes and every job field that changes the video."""
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode())
    for path in files:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class SavedProgress:
    """What a returning job continues from."""

    seed: int
    segments: list[Path]  # the encoded segments so far, in order
    frames: int  # frames in them
    resume: bytes  # the pipeline's resume state after the last of them

    @property
    def next_segment(self) -> int:
        return len(self.segments)


def _write_atomic(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


class JobState:
    """The state folder of one job, held by this process (see :meth:`claim`)."""

    def __init__(self, folder: Path, digest: str) -> None:
        self.folder = folder
        self.digest = digest
        self._saved: list[dict[str, Any]] = []

    @classmethod
    def claim(cls, root: Path, job_id: str, digest: str, stale_after_s: float) -> JobState | None:
        """Take the job's folder under ``root``; None when another live worker holds it or it cannot be used."""
        folder = root / job_id
        try:
            folder.mkdir(parents=True, exist_ok=True)
            lock = folder / _LOCK
            if lock.exists() and _held_elsewhere(lock, stale_after_s):
                logger.warning("Job %s: another worker holds its saved state; running without saving", job_id)
                return None
            _write_atomic(lock, json.dumps({"host": socket.gethostname(), "pid": os.getpid()}).encode())
        except OSError as err:
            logger.warning("Job %s: the state folder %s cannot be used (%s); running without saving", job_id, folder,
                           err)
            return None
        return cls(folder, digest)

    def load(self) -> SavedProgress | None:
        """The saved progress of this same input, or None (and a clean folder) when there is none to use."""
        manifest = self.folder / _MANIFEST
        if not manifest.exists():
            return None
        try:
            data = json.loads(manifest.read_text())
            if data.get("format") != FORMAT or data.get("digest") != self.digest:
                raise ValueError("it was saved for another input")
            segments = [self.folder / entry["file"] for entry in data["segments"]]
            for path, entry in zip(segments, data["segments"], strict=True):
                if path.stat().st_size != entry["bytes"]:
                    raise ValueError(f"{path.name} is not the size it was saved with")
            resume = (self.folder / _RESUME).read_bytes()
            if hashlib.sha256(resume).hexdigest() != data["resume_sha256"] or not segments:
                raise ValueError("the resume state is not the one saved")
            self._saved = list(data["segments"])
            return SavedProgress(int(data["seed"]), segments, sum(e["frames"] for e in data["segments"]), resume)
        except (OSError, ValueError, KeyError, TypeError) as err:
            logger.warning("Saved state in %s is not usable (%s); starting over", self.folder, err)
            self.clear()
            return None

    def save(self, seed: int, segment: Path, frames: int, resume: bytes) -> None:
        """Record one more finished segment (already written into this folder) and the state after it."""
        if not resume:
            return  # the pipeline cannot continue from here; keep what was saved
        self._saved.append({"file": segment.name, "frames": frames, "bytes": segment.stat().st_size})
        _write_atomic(self.folder / _RESUME, resume)
        manifest = {"format": FORMAT, "digest": self.digest, "seed": seed, "segments": self._saved,
                    "resume_sha256": hashlib.sha256(resume).hexdigest(), "saved_at": time.time()}
        _write_atomic(self.folder / _MANIFEST, json.dumps(manifest, indent=1).encode())
        (self.folder / _LOCK).touch()

    def clear(self) -> None:
        """Forget all saved progress (the lock stays)."""
        self._saved = []
        for path in self.folder.iterdir():
            if path.name != _LOCK:
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _held_elsewhere(lock: Path, stale_after_s: float) -> bool:
    """Whether the lock belongs to a live worker other than this process."""
    try:
        holder = json.loads(lock.read_text())
        age = time.time() - lock.stat().st_mtime
    except (OSError, ValueError):
        return False  # unreadable: treat as abandoned
    if holder.get("host") == socket.gethostname():
        pid = int(holder.get("pid", 0))
        if pid == os.getpid():
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False  # that process is gone
        except PermissionError:
            return True
        return True
    return age < stale_after_s


def expire(root: Path, max_age_s: float) -> None:
    """Remove job folders under ``root`` that nothing touched for ``max_age_s``."""
    now = time.time()
    try:
        folders = [path for path in root.iterdir() if path.is_dir()]
    except OSError:
        return
    for folder in folders:
        try:
            newest = max((p.stat().st_mtime for p in folder.iterdir()), default=folder.stat().st_mtime)
        except OSError:
            continue
        if now - newest > max_age_s:
            logger.info("Removing expired job state %s", folder)
            shutil.rmtree(folder, ignore_errors=True)
