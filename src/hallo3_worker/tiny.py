"""The embedded tiny model: the whole Hallo3 pipeline with tiny random-weight networks.

It runs when no real weights are configured (local demo, CI, a worker without a volume). Every
stage is the real code: vocal separation through audio-separator (with a one-node stand-in ONNX
model), a tiny wav2vec2 and T5 through transformers, a real face detector, the reference network,
the main transformer, the sampler and the CogVideoX VAE, all tiny. The model canvas is 64x96
(8x12 latents) and frames are resized to the real output size, so the video has the length, size,
frame rate and audio a real one would have; its pictures are noise.

The face analyser here is OpenCV's Haar cascade face detector (shipped with opencv-python 4): a real
detector, so images without a face are rejected as in production, with the mask rectangle taken
from its box. OpenCV 5 ships no cascade; there a salient-region box stands in (a featureless image
still has no face). The identity embedding is a fixed random projection of the face crop.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from pathlib import Path

import cv2
import numpy as np
import torch

from hallo3_worker.conditioning.audio import Wav2VecEncoder
from hallo3_worker.conditioning.decode import InputLimits
from hallo3_worker.conditioning.face import FACE_MASK_EXPAND_RATIO, FaceAnalysisResult, FaceRegion, expand_region
from hallo3_worker.conditioning.separation import VocalSeparator
from hallo3_worker.conditioning.text import T5TextEncoder
from hallo3_worker.conditioning.tiny_assets import build_fake_vocal_separator, build_tiny_t5, build_tiny_wav2vec2
from hallo3_worker.errors import ErrorCode, InputError
from hallo3_worker.interface import Framing
from hallo3_worker.models.audio_proj import AudioProjConfig
from hallo3_worker.models.cpu_speedups import use_onednn_conv3d
from hallo3_worker.models.face_proj import FaceProjConfig
from hallo3_worker.models.loading import build_on_meta, materialize_random
from hallo3_worker.models.reference_net import ReferenceNet, ReferenceNetConfig
from hallo3_worker.models.speedups import ExactSpeedups
from hallo3_worker.models.transformer import Hallo3Transformer, TransformerConfig
from hallo3_worker.models.vae import TINY_VAE, Hallo3VAE, build_vae
from hallo3_worker.pipeline import Hallo3Components, Hallo3Pipeline, Placement

logger = logging.getLogger(__name__)

TINY_CANVAS = (64, 96)  # (height, width) of the tiny model's input; latents 8 x 12
_TINY_BACKBONE = dict(
    num_layers=2,
    hidden_size=32,
    num_heads=2,
    time_embed_dim=32,
    text_dim=32,  # the tiny T5's d_model
    latent_frames=13,  # the real segment structure: 49 frames per segment
    latent_height=TINY_CANVAS[0] // 8,
    latent_width=TINY_CANVAS[1] // 8,
)


def tiny_transformer_config() -> TransformerConfig:
    return TransformerConfig(
        **_TINY_BACKBONE,
        audio=AudioProjConfig(window=5, feature_layers=2, feature_dim=32, hidden_dim=32, tokens=4, token_dim=16),
        face=FaceProjConfig(embed_dim=512, tokens=4, token_dim=32),
    )


def tiny_reference_net_config() -> ReferenceNetConfig:
    return ReferenceNetConfig(**_TINY_BACKBONE)


def _haar_detector():
    """OpenCV's frontal-face Haar cascade, or None where this OpenCV has none (OpenCV 5 dropped it)."""
    folder = getattr(getattr(cv2, "data", None), "haarcascades", None)
    if folder is None or not hasattr(cv2, "CascadeClassifier"):
        return None
    detector = cv2.CascadeClassifier(str(Path(folder) / "haarcascade_frontalface_default.xml"))
    return None if detector.empty() else detector


def salient_box(gray: np.ndarray, min_edge_fraction: float = 0.01) -> tuple[int, int, int, int] | None:
    """A face-sized (x, y, w, h) box around the image's detail, or None for a featureless image.

    The stand-in detector where no Haar cascade is available: pixels whose gradient is strong count
    as detail; with too few of them (a blank or flat picture) there is no face. The box is a square
    of 40% of the shorter side, inside the image, centred on the detail's median column and, since
    a portrait's face sits above its shoulders, on the row that has a fifth of the detail above it.
    """
    g = gray.astype(np.float32)
    gy, gx = np.gradient(g)
    edges = np.hypot(gx, gy) > 24.0  # about a tenth of the full range across two pixels
    if edges.mean() < min_edge_fraction:
        return None
    ys, xs = np.nonzero(edges)
    height, width = gray.shape
    side = max(8, int(0.4 * min(height, width)))
    cx, cy = int(np.median(xs)), int(np.percentile(ys, 20))
    x = min(max(cx - side // 2, 0), width - side)
    y = min(max(cy - side // 2, 0), height - side)
    return x, y, side, side


class TinyFaceAnalyzer:
    """Face detection (OpenCV's Haar cascade where present) with a random-projection identity embedding.

    Where the OpenCV build has no Haar cascade (OpenCV 5), :func:`salient_box` stands in: a
    featureless image is still refused with ``NO_FACE``. ``detector="salient"`` picks it explicitly.
    """

    def __init__(self, seed: int = 0, embed_dim: int = 512, crop: int = 32, detector: str = "auto") -> None:
        if detector not in ("auto", "haar", "salient"):
            raise ValueError(f"detector must be auto, haar or salient, got {detector!r}")
        self.detector = None if detector == "salient" else _haar_detector()
        if self.detector is None and detector == "haar":
            raise RuntimeError("this OpenCV build has no Haar cascade face detector")
        if self.detector is None and detector == "auto":
            logger.info("tiny face analyser: no Haar cascade in OpenCV %s; using the salient-region box",
                        cv2.__version__)
        generator = torch.Generator().manual_seed(seed)
        self.crop = crop
        self.projection = torch.randn(crop * crop, embed_dim, generator=generator) / crop
        self._lock = threading.Lock()  # cv2 classifiers are not safe to share between threads

    def _detect(self, gray: np.ndarray) -> tuple[int, int, int, int] | None:
        if self.detector is None:
            return salient_box(gray)
        with self._lock:
            faces = self.detector.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(24, 24))
        if len(faces) == 0:
            return None
        return tuple(int(v) for v in max(faces, key=lambda f: int(f[2]) * int(f[3])))

    def analyze(self, image: np.ndarray, *, framing: Framing = Framing.UPSTREAM) -> FaceAnalysisResult:
        """Largest detected face of an RGB uint8 (H, W, 3) image; raises ``InputError(NO_FACE)``."""
        gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        found = self._detect(gray)
        if found is None:
            raise InputError(ErrorCode.NO_FACE, "No face was found in the image.")
        x, y, w, h = found
        height, width = image.shape[:2]
        bounds = (float(x), float(x + w), float(y), float(y + h))  # (min_x, max_x, min_y, max_y)
        box = expand_region(bounds, width, height, FACE_MASK_EXPAND_RATIO, clamp=framing == Framing.AUTO)
        corners = np.array([[x, y], [x + w, y], [x, y + h], [x + w, y + h]], dtype=np.float64)
        region = FaceRegion(corners, height, width, box, framing == Framing.AUTO)
        patch = cv2.resize(gray[y : y + h, x : x + w], (self.crop, self.crop), interpolation=cv2.INTER_AREA)
        embedding = (torch.from_numpy(patch.astype(np.float32) / 255.0).flatten() @ self.projection).numpy()
        return FaceAnalysisResult(
            embedding=embedding.astype(np.float32),
            detection_bbox=np.array([x, y, x + w, y + h], dtype=np.float32),
            region=region,
            mask=region.mask(),
        )


def build_tiny_transformer(placement: Placement = Placement(), *, seed: int = 0) -> Hallo3Transformer:
    """The tiny main transformer alone, with the weights :func:`build_tiny_pipeline` gives it for ``seed``."""
    return materialize_random(
        build_on_meta(lambda: Hallo3Transformer(tiny_transformer_config()), placement.dtype),
        placement.transformer_device,
        seed=seed,
    )


def build_tiny_pipeline(
    assets_dir: Path | None = None,
    placement: Placement = Placement(),
    *,
    seed: int = 0,
    limits: InputLimits = InputLimits(),
    speedups: ExactSpeedups = ExactSpeedups(),
) -> Hallo3Pipeline:
    """Build every tiny component, writing the wav2vec2/T5/separator stand-ins under ``assets_dir``.

    Without ``assets_dir`` they go to a temporary folder that lives as long as the pipeline.
    """
    temporary = None
    if assets_dir is None:
        temporary = tempfile.TemporaryDirectory(prefix="hallo3-tiny-")
        assets_dir = Path(temporary.name)
    assets_dir = Path(assets_dir)
    device, dtype = placement.device, placement.dtype
    transformer = build_tiny_transformer(placement, seed=seed)
    reference_net = materialize_random(
        build_on_meta(lambda: ReferenceNet(tiny_reference_net_config()), dtype),
        placement.job_network_device,
        seed=seed + 1,
    )
    torch.manual_seed(seed)  # diffusers initialises the VAE from the global generator
    vae = Hallo3VAE(build_vae(TINY_VAE, dtype=dtype, device=device), TINY_VAE.scaling_factor)
    if device.type == "cpu":
        use_onednn_conv3d(vae.vae)
    text_encoder = T5TextEncoder.from_pretrained(
        build_tiny_t5(assets_dir / "t5", seed=seed), device=placement.job_network_device, dtype=dtype
    )
    audio_encoder = Wav2VecEncoder.from_pretrained(
        build_tiny_wav2vec2(assets_dir / "wav2vec2", seed=seed), device=device
    )
    separator = VocalSeparator(build_fake_vocal_separator(assets_dir / "audio_separator"), torch_device=device)
    components = Hallo3Components(
        transformer=transformer,
        reference_net=reference_net,
        vae=vae,
        text_encoder=text_encoder,
        audio_encoder=audio_encoder,
        face_analyzer=TinyFaceAnalyzer(seed=seed),
        separator=separator,
    )
    logger.info("built the embedded tiny model on %s (%s)", device, str(dtype).removeprefix("torch."))
    pipeline = Hallo3Pipeline(components, placement, is_tiny=True, canvas=TINY_CANVAS, limits=limits, speedups=speedups)
    pipeline.assets_tmp = temporary  # removed with the pipeline
    return pipeline
