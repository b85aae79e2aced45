"""The embedded tiny model's face analyser: OpenCV's Haar cascade where it exists, the salient box elsewhere."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from hallo3_worker.errors import ErrorCode, InputError
from hallo3_worker.tiny import TinyFaceAnalyzer, salient_box

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def portrait() -> np.ndarray:
    data = json.loads((ROOT / "test_input.json").read_text())["input"]["image"].split(",", 1)[1]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))


def iou(a, b) -> float:
    ax0, ay0, ax1, ay1 = a
    bx0, by0, bx1, by1 = b
    inter = max(0, min(ax1, bx1) - max(ax0, bx0)) * max(0, min(ay1, by1) - max(ay0, by0))
    return inter / ((ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter)


def test_auto_uses_the_cascade_exactly_when_opencv_has_one() -> None:
    has_cascade = hasattr(cv2, "CascadeClassifier") and hasattr(getattr(cv2, "data", None), "haarcascades")
    assert (TinyFaceAnalyzer().detector is not None) == has_cascade


def test_salient_box_finds_the_portrait_face(portrait: np.ndarray) -> None:
    face = TinyFaceAnalyzer(detector="salient").analyze(portrait)
    x0, y0, x1, y1 = face.detection_bbox
    height, width = portrait.shape[:2]
    assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
    assert face.embedding.shape == (512,) and np.isfinite(face.embedding).all()
    assert face.mask.shape == (height, width) and face.mask.any()
    if TinyFaceAnalyzer().detector is not None:  # where both exist, they find the same region
        assert iou(face.detection_bbox, TinyFaceAnalyzer().analyze(portrait).detection_bbox) > 0.2


@pytest.mark.parametrize("detector", ["salient", "auto"])
def test_featureless_images_have_no_face(detector: str) -> None:
    analyzer = TinyFaceAnalyzer(detector=detector)
    for image in (np.full((256, 256, 3), 255, np.uint8), np.full((300, 200, 3), 90, np.uint8)):
        with pytest.raises(InputError) as caught:
            analyzer.analyze(image)
        assert caught.value.code == ErrorCode.NO_FACE


def test_salient_box_stays_inside_and_is_deterministic() -> None:
    gray = np.zeros((120, 200), np.uint8)
    gray[10:40, 170:195] = (np.indices((30, 25)) // 3).sum(axis=0) % 2 * 255  # a checkered patch near the top-right corner
    box = salient_box(gray)
    assert box == salient_box(gray.copy())
    x, y, w, h = box
    assert w == h == 48 and 0 <= x and x + w <= 200 and 0 <= y and y + h <= 120
    assert x + w == 200 and y == 0  # pushed inside from the corner
