"""Per-job temporary folders under the work dir, each recording the process that owns it.

Several worker processes may share one work dir (a local API server beside ``scripts/run_job.py``,
two test runs, a restarted worker). Each job folder ``job-<id>-<random>`` holds ``.owner.json``
with the owner's host name, process id and process start time. At start-up a worker removes only
the folders whose owner is gone: on this host, a process id that no longer runs, or that now
belongs to a process started at another time (the id was reused). Folders of other hosts are left
alone (their processes cannot be checked from here). A folder without a readable record is
removed once it is older than :data:`UNRECORDED_GRACE_S` (a folder left by an older version, or by
a process that died before writing its record); a younger one may be a job that is starting.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

logger = logging.getLogger(__name__)

JOB_DIR_PREFIX = "job-"
OWNER_FILE = ".owner.json"
#: A job folder without an owner record is left alone while it is younger than this (seconds).
UNRECORDED_GRACE_S = 600.0
#: Start times of one process read by two processes may differ by the clock's adjustments.
_START_TIME_TOLERANCE_S = 1.0


@dataclasses.dataclass(frozen=True)
class Owner:
    """The process that owns a job folder."""

    host: str
    pid: int
    started: float  # the process's start time, seconds since the epoch


def process_start_time(pid: int) -> float | None:
    """When the process ``pid`` of this host started (seconds since the epoch), or None if none runs."""
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.Error:  # access denied and the like: it exists, the start time is unknown
        return -1.0


@functools.cache
def _this_process(pid: int) -> Owner:
    started = process_start_time(pid)
    return Owner(socket.gethostname(), pid, started if started is not None else time.time())


def this_process() -> Owner:
    """This process as an owner (computed again in a forked child, whose pid differs)."""
    return _this_process(os.getpid())


def is_running(owner: Owner) -> bool | None:
    """Whether ``owner`` still runs: None when it belongs to another host (cannot be checked here)."""
    if owner.host != socket.gethostname():
        return None
    started = process_start_time(owner.pid)
    if started is None:
        return False
    return started < 0 or abs(started - owner.started) <= _START_TIME_TOLERANCE_S


def read_owner(folder: Path) -> Owner | None:
    """The owner recorded in ``folder``, or None when there is no readable record."""
    try:
        data = json.loads((folder / OWNER_FILE).read_text(encoding="utf-8"))
        return Owner(str(data["host"]), int(data["pid"]), float(data["started"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_owner(folder: Path, owner: Owner) -> None:
    partial = folder / f"{OWNER_FILE}.partial"
    partial.write_text(json.dumps(dataclasses.asdict(owner)), encoding="utf-8")
    partial.replace(folder / OWNER_FILE)  # a reader sees the whole record or none


@contextlib.contextmanager
def job_dir(base: Path, ref: str) -> Iterator[Path]:
    """A fresh folder for one job under ``base``, owned by this process, removed on exit whatever happens."""
    base.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f"{JOB_DIR_PREFIX}{ref[:40]}-", dir=base))
    try:
        _write_owner(path, this_process())
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        if path.exists():
            logger.error("Could not remove the job folder %s", path)


def remove_orphaned_job_dirs(base: Path, *, now: float | None = None) -> list[Path]:
    """Remove the job folders under ``base`` whose owner is gone (see the module docstring); return them."""
    now = time.time() if now is None else now
    removed: list[Path] = []
    for folder in sorted(base.glob(f"{JOB_DIR_PREFIX}*")):
        if not folder.is_dir() or folder.is_symlink():
            continue
        owner = read_owner(folder)
        if owner is None:
            with contextlib.suppress(OSError):
                if now - folder.stat().st_mtime < UNRECORDED_GRACE_S:
                    logger.debug("Job folder %s has no owner record yet; left alone", folder.name)
                    continue
            reason = "no owner record"
        else:
            running = is_running(owner)
            if running is not False:
                where = "another host" if running is None else "a running process"
                logger.info("Job folder %s belongs to %s (%s, pid %d); left alone", folder.name, where,
                            owner.host, owner.pid)
                continue
            reason = f"process {owner.pid} has ended"
        shutil.rmtree(folder, ignore_errors=True)
        logger.info("Removed the job folder %s left behind (%s)", folder.name, reason)
        removed.append(folder)
    return removed
