"""Face embedding (insightface) and face-mask rectangle (MediaPipe FaceLandmarker), as in Hallo3.

Upstream (``sgm/utils/image_processor.py``, ``sgm/utils/util.py``):

* **Embedding**: ``insightface.app.FaceAnalysis`` over every ``*.onnx`` of
  ``face_analysis/models`` (the antelopev2 set: SCRFD detector, glintr100 ArcFace, 2d106det,
  1k3d68, genderage) with ``det_size=(640, 640)`` on the original image (RGB -> BGR). The face with
  the largest bbox area is kept and its raw, **un-normalised** 512-d ``embedding`` is used.
* **Mask**: MediaPipe FaceLandmarker (``face_landmarker_v2_with_blendshapes.task``, IMAGE mode, one
  face) gives 478 landmarks; the bbox of the 36 face-oval ("silhouette") points is rounded,
  expanded x1.2 by :func:`expand_region` and filled with 255 in a uint8 mask.

Differences from upstream, on purpose:

* no face (either detector) raises ``InputError(NO_FACE)``; upstream silently used a zero embedding
  and then crashed in the mask step;
* in ``Framing.AUTO`` the expanded face box is clamped to the image. Upstream's shift-to-stay-inside
  arithmetic (kept exactly in ``Framing.UPSTREAM``) leaves only a narrow strip masked when the expanded
  box is wider or taller than the image, because the slice start goes negative and numpy wraps it.

The analyser objects are meant to be created once per worker and reused across jobs; call
:meth:`FaceAnalyzer.close` (or use it as a context manager) to release them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

import numpy as np

from hallo3_worker.errors import ErrorCode, InputError
from hallo3_worker.interface import Framing

logger = logging.getLogger(__name__)

#: MediaPipe face-mesh indices of the face oval (``util.py:307-311``).
SILHOUETTE_IDS: tuple[int, ...] = (
    10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288,
    397, 365, 379, 378, 400, 377, 152, 148, 176, 149, 150, 136,
    172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109,
)  # fmt: skip
#: Expansion of the face-oval bbox for the reference-image mask (``sample_video.py``: ``preprocess(..., 1.2)``).
FACE_MASK_EXPAND_RATIO = 1.2
#: Detector input size used by upstream (``FaceAnalysis.prepare(det_size=...)``).
DET_SIZE: tuple[int, int] = (640, 640)
#: File name of the landmarker inside ``face_analysis/models`` (hard-coded upstream, ``util.py:345``).
LANDMARKER_FILENAME = "face_landmarker_v2_with_blendshapes.task"
EMBEDDING_DIM = 512

BoxMinMax = tuple[int, int, int, int]  # (min_x, max_x, min_y, max_y), upstream's order


# --------------------------------------------------------------------------------------------------
# geometry (pure functions, exact upstream arithmetic)
# --------------------------------------------------------------------------------------------------


def expand_region(
    region: Sequence[float],
    image_w: int,
    image_h: int,
    expand_ratio: float = 1.0,
    *,
    clamp: bool = False,
) -> BoxMinMax:
    """Upstream's ``expand_region`` (``util.py:523-558``) on (min_x, max_x, min_y, max_y).

    centre = (min + max) // 2 and half-size = ((max - min) * ratio) // 2 (float floor division); the
    box is shifted, not shrunk, to stay inside the image; Python ``round`` (half to even) at the end.
    With ``clamp=True`` (``Framing.AUTO``) a box still outside the image after the shift (it is larger
    than the image) is clamped to the image instead of being left with a negative start.
    """
    min_x, max_x, min_y, max_y = (np.float64(v) for v in region)
    mid_x = (max_x + min_x) // 2
    side_len_x = (max_x - min_x) * expand_ratio
    mid_y = (max_y + min_y) // 2
    side_len_y = (max_y - min_y) * expand_ratio
    min_x = mid_x - side_len_x // 2
    max_x = mid_x + side_len_x // 2
    min_y = mid_y - side_len_y // 2
    max_y = mid_y + side_len_y // 2
    if min_x < 0:
        max_x -= min_x
        min_x = 0
    if max_x > image_w:
        min_x -= max_x - image_w
        max_x = image_w
    if min_y < 0:
        max_y -= min_y
        min_y = 0
    if max_y > image_h:
        min_y -= max_y - image_h
        max_y = image_h
    if clamp:
        min_x, min_y = max(min_x, 0), max(min_y, 0)
    return round(min_x), round(max_x), round(min_y), round(max_y)


def oval_bounds(landmarks: np.ndarray) -> tuple[float, float, float, float]:
    """Rounded (min_x, max_x, min_y, max_y) of the 36 face-oval points of (478, 2) pixel landmarks."""
    landmarks = np.asarray(landmarks, dtype=np.float64)
    if landmarks.ndim != 2 or landmarks.shape[1] != 2 or landmarks.shape[0] <= max(SILHOUETTE_IDS):
        raise ValueError(f"expected (478, 2) face-mesh landmarks, got {landmarks.shape}")
    oval = np.take(landmarks, SILHOUETTE_IDS, 0)
    min_xy = np.round(np.min(oval, 0))
    max_xy = np.round(np.max(oval, 0))
    return (min_xy[0], max_xy[0], min_xy[1], max_xy[1])


def face_mask_from_box(box: BoxMinMax, height: int, width: int) -> np.ndarray:
    """uint8 (H, W) mask, 255 inside ``box`` = (min_x, max_x, min_y, max_y).

    Uses the same numpy slice as upstream, so a negative start (upstream's edge case) wraps around.
    """
    mask = np.zeros((height, width), dtype=np.uint8)
    min_x, max_x, min_y, max_y = box
    mask[round(min_y) : round(max_y), round(min_x) : round(max_x)] = 255
    return mask


@dataclasses.dataclass(frozen=True)
class FaceRegion:
    """Where the face is, from the landmarker, in pixels of an (height, width) image.

    ``landmarks``: (478, 2) float64 (x, y). ``mask_box``: (min_x, max_x, min_y, max_y) of the mask
    rectangle (may have a negative start in upstream mode, see :func:`expand_region`).
    """

    landmarks: np.ndarray
    height: int
    width: int
    mask_box: BoxMinMax
    clamp: bool

    @classmethod
    def from_landmarks(
        cls,
        landmarks: np.ndarray,
        height: int,
        width: int,
        *,
        framing: Framing = Framing.UPSTREAM,
        expand_ratio: float = FACE_MASK_EXPAND_RATIO,
    ) -> FaceRegion:
        clamp = framing == Framing.AUTO
        box = expand_region(oval_bounds(landmarks), width, height, expand_ratio, clamp=clamp)
        return cls(np.asarray(landmarks, dtype=np.float64), height, width, box, clamp)

    def mask(self) -> np.ndarray:
        """The reference-image mask, uint8 (H, W) with 255 inside the face rectangle."""
        return face_mask_from_box(self.mask_box, self.height, self.width)


# --------------------------------------------------------------------------------------------------
# runtime helpers
# --------------------------------------------------------------------------------------------------


def onnx_providers(prefer_gpu: bool = True) -> list[str]:
    """ONNX Runtime execution providers to use: CUDA first when this onnxruntime offers it."""
    import onnxruntime

    available = onnxruntime.get_available_providers()
    providers = ["CUDAExecutionProvider"] if prefer_gpu and "CUDAExecutionProvider" in available else []
    return providers + ["CPUExecutionProvider"]


def _resolve_face_analysis_root(path: Path) -> Path:
    """The face_analysis folder R whose ``R/models/*.onnx`` insightface loads; accept R or R/models."""
    if (path / "models").is_dir():
        return path
    if path.name == "models" and path.is_dir():
        return path.parent
    raise FileNotFoundError(f"no face-analysis models directory at {path} (expected {path}/models/*.onnx)")


@dataclasses.dataclass(frozen=True)
class DetectedFace:
    """The face insightface kept: ``embedding`` (512,) float32 raw ArcFace vector, ``bbox`` (4,) x0, y0, x1, y1."""

    embedding: np.ndarray
    bbox: np.ndarray
    det_score: float


class FaceEmbedder:
    """insightface ``FaceAnalysis`` over a face_analysis directory, created once and reused."""

    def __init__(
        self,
        models_dir: str | Path,
        *,
        providers: Sequence[str] | None = None,
        det_size: tuple[int, int] = DET_SIZE,
        det_thresh: float = 0.5,
    ) -> None:
        from insightface.app import FaceAnalysis

        root = _resolve_face_analysis_root(Path(models_dir))
        onnx_files = sorted((root / "models").glob("*.onnx"))
        if not onnx_files:
            raise FileNotFoundError(f"no *.onnx face-analysis models in {root / 'models'}")
        self.providers = list(providers) if providers is not None else onnx_providers()
        ctx_id = 0 if "CUDAExecutionProvider" in self.providers else -1
        chatter = io.StringIO()  # insightface reports what it loads on stdout (older releases with print())
        with contextlib.redirect_stdout(chatter):
            # insightface 2 takes the folder of .onnx files as ``name`` (an empty name means the cwd)
            self._analysis: Any = FaceAnalysis(name=str(root / "models"), providers=self.providers)
            if "recognition" not in self._analysis.models:
                raise ValueError(f"no face-recognition (ArcFace) model among {[p.name for p in onnx_files]}")
            self._analysis.prepare(ctx_id=ctx_id, det_thresh=det_thresh, det_size=tuple(det_size))
        for line in chatter.getvalue().splitlines():
            logger.debug("insightface: %s", line)
        self._lock = threading.Lock()
        logger.info("face analysis models loaded from %s: %s", root, sorted(self._analysis.models))

    @property
    def tasks(self) -> list[str]:
        return sorted(self._analysis.models) if self._analysis is not None else []

    def detect(self, image: np.ndarray) -> DetectedFace:
        """Largest face of an RGB uint8 (H, W, 3) image; raises ``InputError(NO_FACE)`` if none."""
        import cv2

        if self._analysis is None:
            raise RuntimeError("FaceEmbedder is closed")
        bgr = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2BGR)
        with self._lock:
            faces = self._analysis.get(bgr)
        if not faces:
            raise InputError(ErrorCode.NO_FACE, "no face was found in the image")
        face = max(faces, key=lambda f: (f["bbox"][2] - f["bbox"][0]) * (f["bbox"][3] - f["bbox"][1]))
        embedding = face.get("embedding")
        if embedding is None:
            raise RuntimeError("the face-recognition model produced no embedding")
        embedding = np.asarray(embedding, dtype=np.float32).reshape(-1)
        if embedding.shape != (EMBEDDING_DIM,):
            logger.warning("face embedding has %d dimensions, Hallo3 expects %d", embedding.size, EMBEDDING_DIM)
        return DetectedFace(
            embedding=embedding, bbox=np.asarray(face["bbox"], dtype=np.float32), det_score=float(face["det_score"])
        )

    def close(self) -> None:
        if self._analysis is None:
            return
        for model in self._analysis.models.values():
            session = getattr(model, "session", None)
            if session is not None:
                model.session = None
        self._analysis = None


class FaceLandmarker:
    """MediaPipe Tasks ``FaceLandmarker`` (IMAGE mode, one face), created once and reused."""

    def __init__(self, task_path: str | Path, *, use_gpu: bool = False) -> None:
        from mediapipe.tasks.python import BaseOptions, vision

        path = Path(task_path)
        if not path.is_file():
            raise FileNotFoundError(f"face landmarker model not found: {path}")
        delegate = BaseOptions.Delegate.GPU if use_gpu else BaseOptions.Delegate.CPU
        options = vision.FaceLandmarkerOptions(
            base_options=BaseOptions(model_asset_path=str(path), delegate=delegate),
            running_mode=vision.RunningMode.IMAGE,
            num_faces=1,
        )
        self._landmarker: Any = vision.FaceLandmarker.create_from_options(options)
        self._lock = threading.Lock()
        logger.info("face landmarker loaded from %s", path)

    def landmarks(self, image: np.ndarray) -> np.ndarray:
        """(478, 2) float64 landmark pixels (x, y) of an RGB uint8 (H, W, 3) image; NO_FACE if none."""
        import mediapipe as mp

        if self._landmarker is None:
            raise RuntimeError("FaceLandmarker is closed")
        height, width = image.shape[:2]
        mp_image = mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(image, dtype=np.uint8))
        with self._lock:
            result = self._landmarker.detect(mp_image)
        if len(result.face_landmarks) != 1:
            raise InputError(ErrorCode.NO_FACE, "no face landmarks were found in the image")
        # util.py compute_face_landmarks: [[p.x * w, p.y * h] for p in landmarks]
        return np.array([[p.x * width, p.y * height] for p in result.face_landmarks[0]], dtype=np.float64)

    def close(self) -> None:
        if self._landmarker is not None:
            self._landmarker.close()
            self._landmarker = None


@dataclasses.dataclass(frozen=True)
class FaceAnalysisResult:
    """Everything the pipeline needs from the portrait's face.

    ``embedding``: (512,) float32 raw ArcFace vector (upstream reshapes it to (1, 512)).
    ``region``: landmarks and mask rectangle; ``mask``: uint8 (H, W), 255 inside the rectangle.
    """

    embedding: np.ndarray
    detection_bbox: np.ndarray
    region: FaceRegion
    mask: np.ndarray


class FaceAnalyzer:
    """Embedding + landmarker, loaded once per worker and reused for every job.

    ``models_dir`` is upstream's ``pretrained_models/face_analysis`` (or its ``models`` subfolder);
    the landmarker defaults to ``models/face_landmarker_v2_with_blendshapes.task`` inside it.
    """

    def __init__(
        self,
        models_dir: str | Path,
        landmarker_path: str | Path | None = None,
        *,
        providers: Sequence[str] | None = None,
        det_size: tuple[int, int] = DET_SIZE,
        landmarker_gpu: bool = False,
    ) -> None:
        root = _resolve_face_analysis_root(Path(models_dir))
        task = Path(landmarker_path) if landmarker_path is not None else root / "models" / LANDMARKER_FILENAME
        self.embedder = FaceEmbedder(root, providers=providers, det_size=det_size)
        try:
            self.landmarker = FaceLandmarker(task, use_gpu=landmarker_gpu)
        except BaseException:
            self.embedder.close()
            raise

    def analyze(
        self,
        image: np.ndarray,
        *,
        framing: Framing = Framing.UPSTREAM,
        expand_ratio: float = FACE_MASK_EXPAND_RATIO,
    ) -> FaceAnalysisResult:
        """Embedding and mask of an RGB uint8 (H, W, 3) image; raises ``InputError(NO_FACE)``."""
        detected = self.embedder.detect(image)
        landmarks = self.landmarker.landmarks(image)
        region = FaceRegion.from_landmarks(
            landmarks, image.shape[0], image.shape[1], framing=framing, expand_ratio=expand_ratio
        )
        return FaceAnalysisResult(
            embedding=detected.embedding, detection_bbox=detected.bbox, region=region, mask=region.mask()
        )

    def close(self) -> None:
        self.landmarker.close()
        self.embedder.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
