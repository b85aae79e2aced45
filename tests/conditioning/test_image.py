"""Image decoding and Hallo3 image preprocessing, checked against upstream goldens (tests/goldens/vision)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from hallo3_worker.conditioning.decode import decode_image
from hallo3_worker.conditioning.face import FaceRegion
from hallo3_worker.conditioning.image import (
    CANVAS_SIZE,
    apply_framing,
    crop_output_frames,
    image_to_tensor,
    plan_framing,
    preprocess_image,
)
from hallo3_worker.interface import Framing

GOLDENS = Path(__file__).resolve().parents[1] / "goldens" / "vision"
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def cases() -> dict:
    return json.loads((GOLDENS / "cases.json").read_text())


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return load_file(str(GOLDENS / "preprocess.safetensors"))


def _load(file: str) -> np.ndarray:
    # some golden inputs are smaller than the production minimum side; only decoding matters here
    return decode_image(GOLDENS / file, min_side=1).rgb


def _mask(name: str) -> np.ndarray:
    return np.asarray(Image.open(GOLDENS / f"mask_{name}.png"))


INPUT_NAMES = ["square", "landscape_3x2", "wide_2x1", "portrait_3x4", "tall_9x16"]


@pytest.mark.parametrize("name", INPUT_NAMES)
@pytest.mark.parametrize("canvas", [(480, 720), (96, 144)])
def test_upstream_preprocessing_matches_golden(name, canvas, cases, golden) -> None:
    info = cases["inputs"][name]
    image = _load(info["file"])
    assert image.shape == (info["height"], info["width"], 3)
    out = preprocess_image(image, _mask(name), framing=Framing.UPSTREAM, canvas=canvas)
    assert out.image.shape == (1, 3, *canvas) and out.image.dtype == torch.float32
    assert out.plan.padded == info["is_padding"]
    key = f"{name}.{canvas[0]}x{canvas[1]}"
    stride = cases["real_canvas_subsample_stride"] if canvas == (480, 720) else 1
    for field, ours in (("image", out.image), ("ref_image", out.ref_image)):
        want = golden[f"{key}.{field}"]
        got = ours[..., ::stride, ::stride]
        assert got.shape == want.shape
        err = float((got - want).abs().max())
        assert err <= TOLERANCE, f"{key}.{field}: max abs error {err}"


def test_our_face_mask_equals_upstream_mask_for_the_golden_inputs(cases, golden) -> None:
    for name in INPUT_NAMES:
        info = cases["inputs"][name]
        landmarks = golden[f"{name}.landmarks"].numpy()
        region = FaceRegion.from_landmarks(landmarks, info["height"], info["width"])
        np.testing.assert_array_equal(region.mask(), _mask(name))


def test_square_uses_padding_and_output_keeps_centre_square() -> None:
    plan = plan_framing(300, 300)
    assert plan.padded and plan.kind == "upstream-pad"
    assert plan.resized_size == (480, 480) and plan.offset == (0, 120)
    assert plan.output_crop == (0, 120, 480, 480)
    image = np.full((300, 300, 3), 200, np.uint8)
    out = preprocess_image(image, np.full((300, 300), 255, np.uint8))
    # the bars are zero before 2x-1, i.e. -1
    assert torch.all(out.image[..., :120] == -1) and torch.all(out.image[..., 600:] == -1)
    assert torch.allclose(out.image[..., 120:600], torch.tensor(200 / 255 * 2 - 1), atol=1e-6)
    frames = np.zeros((2, 480, 720, 3), np.uint8)
    assert crop_output_frames(frames, out.plan).shape == (2, 480, 480, 3)


@pytest.mark.parametrize(
    ("hw", "resized"),
    [
        ((200, 300), (480, 720)),
        ((160, 320), (480, 960)),
        ((320, 240), (960, 720)),
        ((481, 721), (480, 720)),
        ((97, 300), (480, 1484)),
    ],
)
def test_rectangle_resize_rule(hw, resized) -> None:
    # sample_video.py resize_for_rectangle_crop: w/h > 3/2 -> height 480, else width 720; int() truncates
    plan = plan_framing(*hw)
    assert plan.resized_size == resized
    assert plan.offset == (-((resized[0] - 480) // 2), -((resized[1] - 720) // 2))
    assert not plan.padded and plan.interpolation == "bicubic"


def test_crop_path_is_not_clamped() -> None:
    # a sharp edge overshoots under bicubic resampling; upstream keeps the overshoot
    image = np.zeros((100, 130, 3), np.uint8)
    image[:, 65:] = 255
    out = preprocess_image(image, np.zeros((100, 130), np.uint8))
    assert float(out.image.max()) > 1.0 and float(out.image.min()) < -1.0
    assert torch.all(out.ref_image == -1.0)  # everything masked out -> black -> -1


def test_image_to_tensor_is_totensor() -> None:
    arr = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 13
    t = image_to_tensor(arr)
    assert t.shape == (1, 3, 2, 3)
    assert torch.equal(t[0], torch.from_numpy(arr).permute(2, 0, 1).float() / 255)


@pytest.mark.parametrize("name", ["tall_9x16", "portrait_3x4"])
def test_auto_framing_keeps_the_face_of_a_portrait(name, cases, golden) -> None:
    info = cases["inputs"][name]
    image = _load(info["file"])
    height, width = image.shape[:2]
    region = FaceRegion.from_landmarks(golden[f"{name}.landmarks"].numpy(), height, width, framing=Framing.AUTO)
    min_x, max_x, min_y, max_y = region.mask_box
    face = (float(min_x), float(min_y), float(max_x), float(max_y))
    upstream = plan_framing(height, width, Framing.UPSTREAM)
    auto = plan_framing(height, width, Framing.AUTO)
    ch, cw = CANVAS_SIZE

    def inside(box, top=0, left=0, h=ch, w=cw) -> bool:
        x0, y0, x1, y1 = box
        return x0 >= left and y0 >= top and x1 <= left + w and y1 <= top + h

    if name == "tall_9x16":  # the blind centre crop misses this face entirely
        assert not inside(upstream.to_canvas(face))
    assert auto.kind == "auto-letterbox" and auto.padded
    expected_w = round(width * 480 / height) // 2 * 2
    assert auto.resized_size == (480, expected_w)
    assert auto.output_crop == (0, (720 - expected_w) // 2, 480, expected_w)
    assert inside(auto.to_canvas(face), *auto.output_crop)
    out = preprocess_image(image, region.mask(), framing=Framing.AUTO)
    _, left, h, w = auto.output_crop
    # the visible region is the whole image, bilinear-resized like upstream's square path; bars are -1
    full = torch.nn.functional.interpolate(
        image_to_tensor(image), size=[h, w], mode="bilinear", align_corners=False, antialias=True
    ).clamp(0, 1)
    assert torch.allclose(out.image[..., :, left : left + w], full * 2 - 1, atol=1e-6)
    assert torch.all(out.image[..., :left] == -1) and torch.all(out.image[..., left + w :] == -1)
    frames = np.zeros((3, 480, 720, 3), np.uint8)
    assert crop_output_frames(frames, out.plan).shape == (3, 480, w, 3)


@pytest.mark.parametrize("name", ["square", "landscape_3x2", "wide_2x1"])
def test_auto_framing_equals_upstream_unless_portrait(name, cases) -> None:
    info = cases["inputs"][name]
    image = _load(info["file"])
    up = preprocess_image(image, _mask(name), framing=Framing.UPSTREAM)
    auto = preprocess_image(image, _mask(name), framing=Framing.AUTO)
    assert auto.plan == up.plan
    assert torch.equal(auto.image, up.image) and torch.equal(auto.ref_image, up.ref_image)


def test_auto_letterbox_sizes_are_even() -> None:
    plan = plan_framing(401, 300, Framing.AUTO)  # 300 * 480 / 401 = 359.1 -> 358
    assert plan.resized_size == (480, 358) and plan.offset == (0, 181) and plan.output_crop == (0, 181, 480, 358)
    assert plan_framing(301, 300, Framing.AUTO).resized_size == (480, 478)


def test_apply_framing_rejects_wrong_size() -> None:
    with pytest.raises(ValueError):
        apply_framing(torch.zeros(1, 3, 10, 10), plan_framing(20, 20))
