"""Assembling the real Hallo3 pipeline from a weights folder.

:func:`build_pipeline_from_weights` turns a located weights folder (see
:func:`hallo3_worker.weights.locate_weights`) into a :class:`~hallo3_worker.pipeline.Hallo3Pipeline`:

* every file it is about to read is checked first (presence and size, SHA-256 on request), so a
  missing or truncated file stops the start-up with a :class:`~hallo3_worker.weights.WeightsError`
  naming it before anything is loaded;
* the main transformer and the VAE load onto ``placement.device``; the reference network onto
  ``placement.offload_device`` when ``placement.offload`` (it visits the device once per job), in
  ``placement.dtype`` (the VAE in ``vae_dtype``, by default the same dtype, as upstream runs it in
  bf16); networks are built on ``meta`` and filled tensor by tensor in their target dtype on their
  target device, so no throwaway float32 copy of a network is ever made;
* with ``placement.offload_transformer`` the main transformer waits on the offload device too (it
  visits the device for each segment's denoising);
* T5 (``placement.dtype``) waits on the offload device like the reference network; wav2vec2 runs
  in float32 on the device, as upstream; the vocal separator and the face analyser use ONNX
  Runtime with the CUDA provider when the device is a CUDA GPU and the installed onnxruntime has it.

Loading times per component go to the log and to ``pipeline.load_timings``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hallo3_worker import weights as hw
from hallo3_worker.conditioning.audio import ATTN_IMPLEMENTATIONS, Wav2VecEncoder
from hallo3_worker.conditioning.decode import InputLimits
from hallo3_worker.conditioning.face import FaceAnalyzer, onnx_providers
from hallo3_worker.conditioning.image import CANVAS_SIZE
from hallo3_worker.conditioning.separation import REQUIRED_METADATA, SeparationError, VocalSeparator
from hallo3_worker.conditioning.text import T5TextEncoder
from hallo3_worker.models.reference_net import ReferenceNet
from hallo3_worker.models.speedups import ExactSpeedups, warm_up
from hallo3_worker.models.transformer import Hallo3Transformer
from hallo3_worker.pipeline import FaceAnalyzerLike, Hallo3Components, Hallo3Pipeline, Placement

if TYPE_CHECKING:
    from hallo3_worker.models.vae import Hallo3VAE

logger = logging.getLogger(__name__)

#: wav2vec2 runs in float32 whatever the networks' dtype (upstream's audio processor does).
WAV2VEC_DTYPE = torch.float32
_FACE_PREFIX = hw.FACE_ANALYSIS_DIR + "/"


def build_pipeline_from_weights(
    location: hw.WeightsLocation,
    placement: Placement,
    *,
    limits: InputLimits = InputLimits(),
    verify_hashes: bool = False,
    attn_implementation: str = "sdpa",
    face_analyzer: FaceAnalyzerLike | None = None,
    canvas: tuple[int, int] = CANVAS_SIZE,
    vae_dtype: torch.dtype | None = None,
    speedups: ExactSpeedups = ExactSpeedups(),
) -> Hallo3Pipeline:
    """Load every component from ``location`` and assemble the pipeline.

    Args:
        location: the weights folder (converted safetensors or the upstream SAT checkpoints).
        placement: compute device and dtype, and where T5 and the reference network wait.
        limits: the CPU-side input checks of ``prepare``.
        verify_hashes: also check SHA-256 of every file read (minutes for the full weights).
        attn_implementation: wav2vec2's attention kernel (``"sdpa"`` or ``"eager"``).
        face_analyzer: use this instead of loading insightface + MediaPipe from
            ``location.face_analysis_dir`` (whose files are then not required).
        canvas: the model's (height, width) input; must match the networks' latent grid
            (480x720 for the released checkpoint).
        vae_dtype: the VAE's dtype; None means ``placement.dtype``.
        speedups: the exact speed-ups to attach; with compiled blocks on a resident transformer,
            one warm-up forward compiles them now (``load_timings["compile"]``), not in the first job.

    Raises:
        WeightsError: a file is missing, truncated, corrupt, or does not fit the networks; the
            message names it.
    """
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {attn_implementation!r}")
    timings: dict[str, float] = {}
    started = time.perf_counter()
    device, dtype = placement.device, placement.dtype
    resting = placement.job_network_device
    vae_dtype = dtype if vae_dtype is None else vae_dtype
    logger.info(
        "loading Hallo3 from %s (%s) on %s as %s; T5 and the reference network wait on %s, the transformer on %s",
        location.root,
        location.source.replace("_", " "),
        device,
        hw.dtype_name(dtype),
        resting,
        placement.transformer_device,
    )

    with _timed(timings, "verify"):
        hw.verify_weights(location, check_hashes=verify_hashes, require_aux=False)
        check_aux_files(location, check_hashes=verify_hashes, face=face_analyzer is None)

    # One load per target device: the reference network may rest elsewhere than the rest.
    groups: dict[torch.device, list[str]] = {}
    for name, target in ((hw.TRANSFORMER, placement.transformer_device), (hw.VAE, device), (hw.REFERENCE_NET, resting)):
        groups.setdefault(target, []).append(name)
    parts: dict[str, Any] = {}
    for target, names in groups.items():
        networks = hw.load_networks(
            location, device=target, dtype=dtype, vae_dtype=vae_dtype, components=tuple(names), verify=False
        )
        for key, seconds in networks.timings.items():
            if key != "total":
                timings[key] = timings.get(key, 0.0) + seconds
        parts.update({name: getattr(networks, name) for name in names})
    transformer: Hallo3Transformer = parts[hw.TRANSFORMER]
    reference_net: ReferenceNet = parts[hw.REFERENCE_NET]
    vae: Hallo3VAE = parts[hw.VAE]
    _check_canvas(location, canvas, transformer, reference_net, vae)
    if device.type == "cpu":
        from hallo3_worker.models.cpu_speedups import use_onednn_conv3d

        use_onednn_conv3d(vae.vae)

    with _timed(timings, "text_encoder"), _as_weights_error(location.t5_dir, "T5 text encoder"):
        text_encoder = T5TextEncoder.from_pretrained(location.t5_dir, device=resting, dtype=dtype)
    with _timed(timings, "audio_encoder"), _as_weights_error(location.wav2vec_dir, "wav2vec2 audio encoder"):
        audio_encoder = Wav2VecEncoder.from_pretrained(
            location.wav2vec_dir, device=device, dtype=WAV2VEC_DTYPE, attn_implementation=attn_implementation
        )
    with _timed(timings, "vocal_separator"), _as_weights_error(location.audio_separator_dir, "vocal separator"):
        separator = VocalSeparator(location.audio_separator_dir, torch_device=device)
        separator.load()  # fail now, not on the first job that separates vocals
    if face_analyzer is None:
        with _timed(timings, "face_analyzer"), _as_weights_error(location.face_analysis_dir, "face analysis models"):
            face_analyzer = FaceAnalyzer(
                location.face_analysis_dir, providers=onnx_providers(prefer_gpu=device.type == "cuda")
            )

    components = Hallo3Components(
        transformer=transformer,
        reference_net=reference_net,
        vae=vae,
        text_encoder=text_encoder,
        audio_encoder=audio_encoder,
        face_analyzer=face_analyzer,
        separator=separator,
    )
    pipeline = Hallo3Pipeline(components, placement, is_tiny=False, canvas=canvas, limits=limits, speedups=speedups)
    if "compiled_blocks" in pipeline.speedup_report:
        if placement.transformer_device == device:
            timings["compile"] = warm_up(transformer, device, speedups.reference_kv_once)
        else:
            logger.info("the transformer rests off the GPU (HALLO3_OFFLOAD=full): its blocks compile during the first job")
    timings["total"] = time.perf_counter() - started
    pipeline.load_timings = {k: round(v, 3) for k, v in timings.items()}  # type: ignore[attr-defined]
    logger.info(
        "Hallo3 pipeline ready in %.1f s: %s",
        timings["total"],
        ", ".join(f"{k} {v:.2f} s" for k, v in timings.items() if k != "total"),
    )
    return pipeline


def aux_files(location: hw.WeightsLocation, *, face: bool = True) -> list[str]:
    """Paths (relative to the weights folder) of the files the non-network components read.

    The T5 and wav2vec2 weights (whatever sharding they have), the vocal separator's model and
    metadata, and, with ``face``, the face-analysis models.
    """
    files = hw.verify._aux_files(location.root)  # noqa: SLF001 - the one definition of the aux file list
    files += [f"{hw.AUDIO_SEPARATOR_DIR}/{name}" for name in REQUIRED_METADATA]
    if not face:
        files = [rel for rel in files if not rel.startswith(_FACE_PREFIX)]
    return list(dict.fromkeys(files))


def check_aux_files(location: hw.WeightsLocation, *, check_hashes: bool = False, face: bool = True) -> int:
    """Check that every file of :func:`aux_files` is there and not empty; returns the bytes checked.

    Raises :class:`~hallo3_worker.weights.WeightsError` naming the first missing or empty file.
    """
    total = 0
    for rel in aux_files(location, face=face):
        path = location.path(rel)
        size = hw.check_file(path)
        if check_hashes:
            expected = hw.verify._hf_blob_sha256(path)  # noqa: SLF001 - Hugging Face cache blobs carry their hash
            if expected is not None:
                hw.check_file(path, size, expected)
        total += size
    return total


def _check_canvas(
    location: hw.WeightsLocation,
    canvas: tuple[int, int],
    transformer: Hallo3Transformer,
    reference_net: ReferenceNet,
    vae: Hallo3VAE,
) -> None:
    """The canvas must give the latent grid the networks were built for."""
    factor = 2 ** (len(vae.vae.config.block_out_channels) - 1)
    latent = (canvas[0] // factor, canvas[1] // factor)
    if canvas[0] % factor or canvas[1] % factor:
        raise ValueError(f"canvas {canvas[0]}x{canvas[1]} is not a multiple of the VAE's {factor}x downsampling")
    for name, config in (("transformer", transformer.config), ("reference network", reference_net.config)):
        grid = (config.latent_height, config.latent_width)
        if grid != latent:
            raise hw.WeightsError(
                f"{location.root}: the {name} was built for {grid[0]}x{grid[1]} latents "
                f"({grid[0] * factor}x{grid[1] * factor} pixels), not for the {canvas[0]}x{canvas[1]} canvas",
                location.root,
            )


@contextlib.contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - started
    logger.info("%s ready in %.2f s", name, timings[name])


@contextlib.contextmanager
def _as_weights_error(folder: Path, what: str) -> Iterator[None]:
    """Report a component that cannot be read from ``folder`` as a WeightsError naming the folder.

    Only file-shaped failures are translated (missing or unreadable files, configs that do not
    parse, the separator's model-folder checks); anything else, such as running out of GPU
    memory, propagates as it is.
    """
    try:
        yield
    except hw.WeightsError:
        raise
    except (OSError, ValueError, SeparationError) as exc:
        raise hw.WeightsError(f"{folder}: cannot load the {what} ({exc})", folder) from exc


__all__ = ["WAV2VEC_DTYPE", "aux_files", "build_pipeline_from_weights", "check_aux_files"]
