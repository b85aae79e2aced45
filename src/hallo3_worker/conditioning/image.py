"""Hallo3's image preprocessing (``sample_video.py:278-307``).

Upstream turns the user's portrait into two tensors on the model's 480x720 (H x W) canvas:

* the full processed image (frame 0 of every motion clip), and
* the face-masked reference image (input of the reference net): the original image with everything
  outside the expanded face rectangle set to black, **masked at the original resolution** and then
  put through the same resize/crop/pad.

Framing (:class:`~hallo3_worker.interface.Framing`, the ``framing`` field of the job):

* ``UPSTREAM`` is exact. An exactly square image is resized to 480x480 (bilinear, antialiased),
  zero-padded by 120 px left and right and clamped to [0, 1]; the output video later shows only the
  centre 480x480. Any other image is resized (bicubic, antialiased, **no clamp**) so that it covers
  480x720 and centre-cropped, which cuts the head off many portrait photos.
* ``AUTO`` (an extension, not in upstream) is ``UPSTREAM`` except for portrait-orientation images
  (height > width): those are fitted whole. The image is resized to a height of 480 (width rounded to
  an even number), placed in the middle of the canvas and zero-padded left and right, exactly like
  upstream's square path (bilinear, antialiased, clamped); the output video shows only the image
  region, e.g. 360x480 for a 3:4 portrait.

Tensors returned are float32, (1, 3, 480, 720), values ``2x - 1`` (so padding is -1); callers cast.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from hallo3_worker.interface import Framing

logger = logging.getLogger(__name__)

#: The model canvas (height, width): CogVideoX-5B-I2V's 480x720.
CANVAS_SIZE: tuple[int, int] = (480, 720)
Box = tuple[float, float, float, float]  # (x0, y0, x1, y1) in pixels, x1/y1 exclusive


# --------------------------------------------------------------------------------------------------
# tensors
# --------------------------------------------------------------------------------------------------


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """RGB uint8 (H, W, 3) -> float32 (1, 3, H, W) in [0, 1], exactly like torchvision's ``ToTensor``."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 (H, W, 3) array, got {image.dtype} {image.shape}")
    array = np.ascontiguousarray(image)
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(array).permute(2, 0, 1).contiguous().float().div(255)[None]


# --------------------------------------------------------------------------------------------------
# framing
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FramingPlan:
    """Where an (H, W) source image lands on the canvas.

    The image is resized to ``resized_size`` (h, w) and placed with its top-left corner at
    ``offset`` (y, x) of the canvas: negative offsets crop, positive ones pad with zeros.
    ``output_crop`` (top, left, height, width) is the canvas region the output video shows.
    """

    source_size: tuple[int, int]
    canvas_size: tuple[int, int]
    resized_size: tuple[int, int]
    offset: tuple[int, int]
    interpolation: str  # "bilinear" (pad paths) or "bicubic" (crop paths)
    padded: bool
    output_crop: tuple[int, int, int, int]
    kind: str  # "upstream-pad", "upstream-crop" or "auto-letterbox"

    def to_canvas(self, box: Box) -> Box:
        """Map an (x0, y0, x1, y1) box from source pixels to canvas pixels (not clipped)."""
        sy = self.resized_size[0] / self.source_size[0]
        sx = self.resized_size[1] / self.source_size[1]
        x0, y0, x1, y1 = box
        oy, ox = self.offset
        return (x0 * sx + ox, y0 * sy + oy, x1 * sx + ox, y1 * sy + oy)


def _upstream_plan(height: int, width: int, canvas: tuple[int, int]) -> FramingPlan:
    ch, cw = canvas
    if height == width:  # resize_for_square_padding
        side = ch
        pad_left = (cw - side) // 2
        return FramingPlan(
            source_size=(height, width),
            canvas_size=canvas,
            resized_size=(side, side),
            offset=(0, pad_left),
            interpolation="bilinear",
            padded=True,
            output_crop=(0, (cw - min(ch, cw)) // 2, ch, min(ch, cw)),
            kind="upstream-pad",
        )
    # resize_for_rectangle_crop(..., reshape_mode="center")
    if width / height > cw / ch:
        resized = (ch, int(width * ch / height))
    else:
        resized = (int(height * cw / width), cw)
    top = (resized[0] - ch) // 2
    left = (resized[1] - cw) // 2
    return FramingPlan(
        source_size=(height, width),
        canvas_size=canvas,
        resized_size=resized,
        offset=(-top, -left),
        interpolation="bicubic",
        padded=False,
        output_crop=(0, 0, ch, cw),
        kind="upstream-crop",
    )


def _letterbox_plan(height: int, width: int, canvas: tuple[int, int]) -> FramingPlan:
    ch, cw = canvas
    scale = min(ch / height, cw / width)
    new_h = min(ch, max(2, round(height * scale) // 2 * 2))  # even sizes, so the video can be encoded
    new_w = min(cw, max(2, round(width * scale) // 2 * 2))
    pad_top, pad_left = (ch - new_h) // 2, (cw - new_w) // 2
    return FramingPlan(
        source_size=(height, width),
        canvas_size=canvas,
        resized_size=(new_h, new_w),
        offset=(pad_top, pad_left),
        interpolation="bilinear",
        padded=True,
        output_crop=(pad_top, pad_left, new_h, new_w),
        kind="auto-letterbox",
    )


def plan_framing(
    height: int,
    width: int,
    framing: Framing = Framing.UPSTREAM,
    canvas: tuple[int, int] = CANVAS_SIZE,
) -> FramingPlan:
    """Decide how an (height, width) image is fitted to the canvas (see the module docstring)."""
    if framing == Framing.AUTO and height > width:
        return _letterbox_plan(height, width, canvas)
    return _upstream_plan(height, width, canvas)


def apply_framing(pixels: torch.Tensor, plan: FramingPlan) -> torch.Tensor:
    """Resize and crop/pad (B, 3, H, W) pixels in [0, 1] onto the canvas: (B, 3, canvas_h, canvas_w).

    Padding paths are clamped to [0, 1] (upstream's square path); crop paths are not clamped, so
    bicubic overshoot survives as in upstream.
    """
    if tuple(pixels.shape[-2:]) != plan.source_size:
        raise ValueError(f"pixels are {tuple(pixels.shape[-2:])}, the plan is for {plan.source_size}")
    x = pixels
    if tuple(x.shape[-2:]) != plan.resized_size:  # torchvision's resize returns equal sizes untouched
        x = F.interpolate(x, size=list(plan.resized_size), mode=plan.interpolation, align_corners=False, antialias=True)
    ch, cw = plan.canvas_size
    oy, ox = plan.offset
    if plan.padded:
        rh, rw = plan.resized_size
        x = F.pad(x, (ox, cw - rw - ox, oy, ch - rh - oy), mode="constant", value=0.0)
        return x.clamp(0, 1)
    return x[..., -oy : -oy + ch, -ox : -ox + cw].contiguous()


# --------------------------------------------------------------------------------------------------
# full preprocessing
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ProcessedImage:
    """Hallo3's image conditioning on the canvas.

    ``image``: full processed image, float32 (1, 3, 480, 720) in [-1, 1] (crop paths may overshoot).
    ``ref_image``: the face-masked image processed the same way, same shape.
    ``plan``: how the source was framed; ``plan.output_crop`` is what the output video keeps.
    """

    image: torch.Tensor
    ref_image: torch.Tensor
    plan: FramingPlan

    @property
    def output_crop(self) -> tuple[int, int, int, int]:
        return self.plan.output_crop


def preprocess_image(
    image: np.ndarray,
    face_mask: np.ndarray,
    *,
    framing: Framing = Framing.UPSTREAM,
    canvas: tuple[int, int] = CANVAS_SIZE,
    device: torch.device | str | None = None,
) -> ProcessedImage:
    """Upstream's image preprocessing (``sample_video.py:278-307``).

    ``image``: RGB uint8 (H, W, 3). ``face_mask``: (H, W) (or (H, W, 3)), nonzero inside the face
    rectangle (e.g. :meth:`hallo3_worker.conditioning.face.FaceRegion.mask`); it is applied at the
    original resolution (``ref = image * mask``) before the resize, as upstream does.
    """
    if face_mask.shape[:2] != image.shape[:2]:
        raise ValueError(f"face mask {face_mask.shape[:2]} and image {image.shape[:2]} differ in size")
    pixels = image_to_tensor(image)
    if device is not None:
        pixels = pixels.to(device)
    mask = face_mask if face_mask.ndim == 2 else face_mask[..., 0]
    mask_t = torch.from_numpy((np.asarray(mask) > 0).astype(np.float32)).to(pixels.device)[None, None]
    ref = pixels * mask_t  # (1, 3, H, W) * (1, 1, H, W)
    plan = plan_framing(image.shape[0], image.shape[1], framing, canvas)
    return ProcessedImage(
        image=apply_framing(pixels, plan) * 2.0 - 1.0,
        ref_image=apply_framing(ref, plan) * 2.0 - 1.0,
        plan=plan,
    )


def crop_output_frames(frames: np.ndarray, plan_or_crop: FramingPlan | Sequence[int]) -> np.ndarray:
    """Cut the output region from canvas frames (..., canvas_h, canvas_w, C) (upstream: centre 480x480
    for the padding path)."""
    top, left, height, width = plan_or_crop.output_crop if isinstance(plan_or_crop, FramingPlan) else plan_or_crop
    return frames[..., top : top + height, left : left + width, :]
