"""A progress bar of a job from the worker's progress updates.

While a job runs, Runpod's ``/status`` carries the worker's latest update as ``output``:
``{"stage": "denoise", "progress": 0.5, "segment": 2, "num_segments": 4}`` (``progress`` from 0
to 1; ``segment`` and ``num_segments`` while segments are generated). The local server shows no
updates: its first status answer is the end of the job, so the display says so
(:meth:`ProgressDisplay.no_progress`) and the bar only counts the time.

On a terminal the bar is one line, redrawn every second; elsewhere (a log, a pipe) a plain line is
written whenever the status, stage or segment changes.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Optional, TextIO

from hallo3_client.client import JobStatus

_LABELS = {"IN_QUEUE": "queued", "IN_PROGRESS": "running", "RUNNING": "running"}


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class ProgressDisplay:
    """Shows one job's progress on ``stream`` (normally stderr)."""

    def __init__(self, stream: TextIO, *, tty: Optional[bool] = None, width: int = 24,
                 clock: Callable[[], float] = time.monotonic, tick_s: float = 1.0) -> None:
        self.stream = stream
        self.tty = bool(stream.isatty()) if tty is None else tty
        self.width = width
        self._clock = clock
        self._start = clock()
        self._lock = threading.Lock()
        self._label = "submitting"
        self._fraction: Optional[float] = None
        self._segment: Optional[tuple[int, int]] = None
        self._origin: Optional[tuple[float, float]] = None  # (time, fraction) of the first update seen
        self._eta: Optional[tuple[float, float]] = None  # (time of the estimate, seconds left then)
        self._last_plain: Optional[tuple[object, ...]] = None
        self._drawn = 0
        self._stop = threading.Event()
        self._ticker: Optional[threading.Thread] = None
        if self.tty:
            self._ticker = threading.Thread(target=self._tick, args=(tick_s,), daemon=True, name="hallo3-progress")
            self._ticker.start()

    # ------------------------------------------------------------------------------ updates

    def message(self, text: str) -> None:
        """A line of its own (above the bar on a terminal)."""
        with self._lock:
            self._clear()
            self.stream.write(f"hallo3: {text}\n")
            self._redraw()

    def submitted(self, job_id: str, where: str) -> None:
        self._label = "waiting"
        self.message(f"job {job_id} submitted to {where}")

    def no_progress(self) -> None:
        """The API answers ``/status`` only when the job has ended (the worker's local API): say so."""
        self._label = "running (no progress reported)"
        self.message("this API reports no progress while the job runs; waiting for it to end")

    def update(self, status: JobStatus) -> None:
        now = self._clock()
        with self._lock:
            self._label = _LABELS.get(status.status, status.status.lower())
            progress = status.progress
            if progress is not None:
                self._label = str(progress.get("stage", self._label)).replace("_", " ")
                fraction = progress.get("progress")
                if isinstance(fraction, (int, float)) and not isinstance(fraction, bool):
                    self._set_fraction(min(1.0, max(0.0, float(fraction))), now)
                segment, total = progress.get("segment"), progress.get("num_segments")
                self._segment = (segment, total) if isinstance(segment, int) and isinstance(total, int) else None
            elif status.status == "COMPLETED":
                self._fraction, self._eta, self._segment = 1.0, None, None
            elif not status.active:
                self._eta = None
            self._show(now, force=not status.active)

    def close(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=2)
        with self._lock:
            if self.tty and self._drawn:
                self.stream.write("\n")
                self._drawn = 0
            self.stream.flush()

    def __enter__(self) -> ProgressDisplay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------------------- internals

    def _set_fraction(self, fraction: float, now: float) -> None:
        self._fraction = fraction
        if self._origin is None:
            self._origin = (now, fraction)
            return
        start, first = self._origin
        if fraction > first and now > start:
            self._eta = (now, (now - start) * (1.0 - fraction) / (fraction - first))

    def line(self, now: Optional[float] = None) -> str:
        """The current progress as one line of text."""
        now = self._clock() if now is None else now
        parts = []
        if self._fraction is not None:
            filled = int(round(self._fraction * self.width))
            parts.append(f"[{'#' * filled}{'.' * (self.width - filled)}] {100 * self._fraction:3.0f}%")
        parts.append(self._label)
        if self._segment is not None:
            parts.append(f"segment {self._segment[0]}/{self._segment[1]}")
        parts.append(f"elapsed {format_duration(now - self._start)}")
        if self._eta is not None:
            estimated_at, left = self._eta
            parts.append(f"about {format_duration(left - (now - estimated_at))} left")
        return "  ".join(parts)

    def snapshot(self, now: Optional[float] = None) -> dict[str, Any]:
        """The current progress as values, for a display other than a terminal (``hallo3 ui``'s page).

        ``label`` (status or stage), ``fraction`` (0-1 or None), ``segment`` and ``num_segments``
        (or None), ``elapsed_s`` and ``left_s`` (the estimate of the time left, or None).
        """
        now = self._clock() if now is None else now
        with self._lock:
            left = None
            if self._eta is not None:
                estimated_at, remaining = self._eta
                left = max(0.0, remaining - (now - estimated_at))
            segment, total = self._segment if self._segment is not None else (None, None)
            return {"label": self._label, "fraction": self._fraction, "segment": segment, "num_segments": total,
                    "elapsed_s": max(0.0, now - self._start), "left_s": left}

    def _show(self, now: float, force: bool = False) -> None:
        if self.tty:
            self._clear()
            self._redraw(now)
            return
        key = (self._label, self._segment, self._fraction if force else None)
        if key != self._last_plain:
            self._last_plain = key
            self.stream.write(f"hallo3: {self.line(now)}\n")
            self.stream.flush()

    def _clear(self) -> None:
        if self.tty and self._drawn:
            self.stream.write("\r\x1b[K")
            self._drawn = 0

    def _redraw(self, now: Optional[float] = None) -> None:
        if self.tty and not self._stop.is_set():
            text = self.line(now)
            self.stream.write(text)
            self.stream.flush()
            self._drawn = len(text)

    def _tick(self, interval: float) -> None:
        while not self._stop.wait(interval):
            with self._lock:
                self._clear()
                self._redraw()
