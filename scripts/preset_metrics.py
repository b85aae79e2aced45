"""Quality measures for scripts/evaluate_presets.py (imported as a sibling module).

* :func:`psnr` and :func:`ssim`: each preset's frames against the exact preset's, on RGB uint8
  videos. SSIM is the usual one (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01,
  K2 0.03) on the luma channel, averaged over pixels and frames.
* A lip-sync proxy: how well a per-frame mouth signal follows the speech loudness envelope
  (Pearson correlation over the frames, :func:`lipsync_r`). Two mouth signals:

  - :class:`LandmarkMouthOpening` (the real one): MediaPipe's face landmarker (a
    ``face_landmarker*.task`` model file, which must be given: none ships with the ``mediapipe``
    package and none can be fetched at run time) finds the 478 face-mesh points in every frame;
    the opening is the distance between the inner lips (points 13 and 14) over the face height
    (points 10 and 152). Frames where no face is found are left out.
  - :class:`MouthRegionContrast` (a stand-in, used when no landmarker model is given): the
    standard deviation of the grey levels in a fixed mouth box (the lower middle of the face
    found in the exact video's first frame, or of the frame when none is found). An open mouth
    shows dark cavity and bright teeth, so the contrast rises with the opening on real faces; it
    is a crude proxy, not a validated measure, and on the tiny random-weight model (whose
    frames are noise) its numbers mean nothing.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

FPS = 25
_LUMA = torch.tensor([0.299, 0.587, 0.114])


def psnr(video: np.ndarray, reference: np.ndarray) -> float:
    """PSNR in dB of uint8 (N, H, W, 3) ``video`` against ``reference``; inf when identical."""
    mse = float(np.mean((video.astype(np.float64) - reference.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g /= g.sum()
    return (g[:, None] * g[None, :])[None, None]  # (1, 1, size, size)


def ssim(video: np.ndarray, reference: np.ndarray, batch: int = 16) -> float:
    """Mean SSIM of the luma of uint8 (N, H, W, 3) ``video`` against ``reference`` (valid window positions)."""
    window = _gaussian_window()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    total, count = 0.0, 0
    for start in range(0, len(video), batch):
        x = torch.from_numpy(video[start : start + batch]).double() @ _LUMA.double()
        y = torch.from_numpy(reference[start : start + batch]).double() @ _LUMA.double()
        x, y = x[:, None], y[:, None]  # (n, 1, H, W)
        mu_x, mu_y = F.conv2d(x, window), F.conv2d(y, window)
        var_x = F.conv2d(x * x, window) - mu_x**2
        var_y = F.conv2d(y * y, window) - mu_y**2
        cov = F.conv2d(x * y, window) - mu_x * mu_y
        s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
        total += float(s.mean(dim=(1, 2, 3)).sum())
        count += s.shape[0]
    return total / count


def loudness_envelope(samples: np.ndarray, rate: int, frames: int, fps: int = FPS) -> np.ndarray:
    """RMS of mono ``samples`` over each video frame's 1/fps window: (frames,) float64."""
    samples = np.asarray(samples, dtype=np.float64)
    out = np.zeros(frames)
    for i in range(frames):
        piece = samples[int(round(i * rate / fps)) : int(round((i + 1) * rate / fps))]
        out[i] = math.sqrt(float(np.mean(piece**2))) if piece.size else 0.0
    return out


def lipsync_r(mouth: np.ndarray, loudness: np.ndarray) -> float | None:
    """Pearson correlation of the mouth signal with the loudness over frames where both exist; None if undefined."""
    n = min(len(mouth), len(loudness))
    mouth, loudness = np.asarray(mouth[:n], dtype=np.float64), np.asarray(loudness[:n], dtype=np.float64)
    valid = np.isfinite(mouth) & np.isfinite(loudness)
    if valid.sum() < 3 or np.std(mouth[valid]) == 0 or np.std(loudness[valid]) == 0:
        return None
    return float(np.corrcoef(mouth[valid], loudness[valid])[0, 1])


class MouthMeter(Protocol):
    """Turns a video into one mouth-opening value per frame (NaN where it cannot tell)."""

    name: str

    def measure(self, frames: np.ndarray) -> np.ndarray: ...


class LandmarkMouthOpening:
    """Inner-lip distance over face height from MediaPipe face landmarks (see the module docstring)."""

    name = "mediapipe-landmarks"

    def __init__(self, task_path: Path) -> None:
        from hallo3_worker.conditioning.face import FaceLandmarker

        self.landmarker = FaceLandmarker(task_path)

    def measure(self, frames: np.ndarray) -> np.ndarray:
        from hallo3_worker.errors import InputError

        values = np.full(len(frames), np.nan)
        for i, frame in enumerate(frames):
            try:
                points = self.landmarker.landmarks(frame)
            except InputError:  # no face in this frame
                continue
            face = np.linalg.norm(points[10] - points[152])
            if face > 0:
                values[i] = np.linalg.norm(points[13] - points[14]) / face
        return values


class MouthRegionContrast:
    """Grey-level standard deviation in a fixed mouth box (the stand-in; see the module docstring)."""

    name = "mouth-region-contrast (stand-in)"

    def __init__(self, box: tuple[int, int, int, int]) -> None:
        self.box = box  # (top, bottom, left, right) in output pixels

    @classmethod
    def from_face(cls, face_box: tuple[float, float, float, float] | None, height: int, width: int
                  ) -> MouthRegionContrast:
        """The lower middle of ``face_box`` (x0, y0, x1, y1), or of the whole frame when None."""
        x0, y0, x1, y1 = face_box if face_box is not None else (0.0, 0.0, float(width), float(height))
        w, h = x1 - x0, y1 - y0
        top, bottom = y0 + 0.62 * h, y0 + 0.9 * h
        left, right = x0 + 0.3 * w, x0 + 0.7 * w
        clip = lambda v, hi: int(min(max(round(v), 0), hi))  # noqa: E731
        top, bottom = clip(top, height - 1), clip(bottom, height)
        left, right = clip(left, width - 1), clip(right, width)
        return cls((top, max(bottom, top + 1), left, max(right, left + 1)))

    def measure(self, frames: np.ndarray) -> np.ndarray:
        top, bottom, left, right = self.box
        region = frames[:, top:bottom, left:right].astype(np.float64) @ _LUMA.numpy().astype(np.float64)
        return region.reshape(len(frames), -1).std(axis=1)


__all__ = ["LandmarkMouthOpening", "MouthMeter", "MouthRegionContrast", "lipsync_r", "loudness_envelope", "psnr",
           "ssim"]
