"""Start-up fitness checks: refuse to take jobs on a worker that cannot run them.

Each ``check_*`` function raises :class:`FitnessError` with a message that says what is wrong and
what to do, and returns a one-line description when all is well. :func:`fitness_checks` bundles
them as argument-free callables for ``runpod.serverless.register_fitness_check`` (which runs them
before the job loop, on the platform only, and stops the worker on the first failure);
:func:`run_fitness_checks` runs them directly, e.g. before the expensive model load.

Checks:

* :func:`check_weights`: the weights folder is found and complete (sizes; hashes optional);
* :func:`check_gpu_memory`: when CUDA is present, the GPU has enough free memory for a job's peak
  under the offload policy (:func:`estimate_gpu_bytes`);
* :func:`check_video_encoders`: PyAV (or an ``ffmpeg`` binary) can encode H.264 (libx264) and AAC.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence

from hallo3_worker import weights as hw

logger = logging.getLogger(__name__)

GIB = 1024**3

#: Bytes of each component's weights at inference (bf16 networks; spec section 8.4). Used when the
#: weights folder does not record sizes (the converted files' sizes replace the first three).
DEFAULT_COMPONENT_BYTES: dict[str, int] = {
    hw.TRANSFORMER: 17_842_507_904,  # 8.921 B parameters x 2 bytes
    hw.REFERENCE_NET: 11_250_568_320,  # 5.625 B x 2
    hw.VAE: 431_167_814,  # 215.6 M x 2
    "text_encoder": 9_524_621_312,  # T5-v1.1-XXL encoder, bf16
    "audio_encoder": 377_486_848,  # wav2vec2-base-960h, fp32
    "onnx": 500_000_000,  # insightface models + vocal separator under ONNX Runtime CUDA (estimate)
}
#: Offload policies (``HALLO3_OFFLOAD`` without ``auto``), from most to least GPU memory:
#: ``off`` keeps every network on the GPU; ``partial`` keeps the once-per-job networks (reference
#: network, T5) in CPU memory, visiting the GPU for their own stage; ``full`` also keeps the main
#: transformer there: its small parts visit for each segment's denoising, its blocks one at a time
#: during each forward, and its MLPs run in slices.
OFFLOAD_POLICIES: tuple[str, ...] = ("off", "partial", "full")
#: Which network visits the GPU for which stage, per policy; every other network stays resident.
VISITORS: dict[str, dict[str, str]] = {
    "off": {},
    "partial": {"text": "text_encoder", "reference": hw.REFERENCE_NET},
    "full": {"text": "text_encoder", "reference": hw.REFERENCE_NET, "denoise": hw.TRANSFORMER},
}
#: Tokens per MLP slice under the ``full`` policy (hallo3_worker.models.memory_savers).
FULL_OFFLOAD_FEED_FORWARD_CHUNK = 4096
#: The networks of a worker (what ``off`` keeps on the GPU).
GPU_COMPONENTS: tuple[str, ...] = (hw.TRANSFORMER, hw.REFERENCE_NET, hw.VAE, "text_encoder", "audio_encoder", "onnx")

#: Peak bytes of the tensors each stage holds besides its weights and inputs, for a full-size job at
#: 480x720 in bf16 and 60 s of audio: ``scripts/estimate_memory.py`` (hallo3_worker.memory,
#: tensor sizes under FakeTensorMode). tests/test_memory.py recomputes them from the code.
#: ``denoise_chunked`` is the guided step with FULL_OFFLOAD_FEED_FORWARD_CHUNK-token MLP slices.
STAGE_ACTIVATION_BYTES: dict[str, int] = {
    "audio": 786_427_904,
    "text": 32_457_216,  # transformers 5's T5 (50_337_892 with transformers 4.57)
    "reference": 1_839_974_400,
    "denoise": 3_290_333_184,
    "denoise_chunked": 2_402_067_456,
    "vae_encode": 2_569_881_600,
    "vae_decode": 7_061_888_768,
}
#: The reference tokens' keys and values, made once per job and kept for the whole job: 42 blocks x
#: 2 x (1, 48, 1350, 64) bf16, shared by both halves of the guided batch (hallo3_worker.denoiser).
#: Twice the tokens they replace, in exchange for two (1350 x 3072 x 3072) products per block and step.
REFERENCE_BANK_BYTES = 42 * 2 * 1350 * 3072 * 2
#: The main transformer in bf16 (fused projections): each of its blocks, and everything else
#: (embeddings, projectors, final layer). Under ``full`` the blocks stream through the GPU
#: (hallo3_worker.models.block_streaming): the running block and the next one are there at once.
TRANSFORMER_NUM_BLOCKS = 42
TRANSFORMER_BLOCK_BYTES = 361_986_560
TRANSFORMER_REST_BYTES = 2_638_679_168
STREAMED_BLOCKS = 2
#: What tensor sizes do not show: CUDA context, cuBLAS/cuDNN/attention workspaces and the caching
#: allocator's rounding and fragmentation (an allowance, not a measurement).
CUDA_OVERHEAD_BYTES = 2 * GIB
REQUIRED_ENCODERS: tuple[str, ...] = ("libx264", "aac")


class FitnessError(RuntimeError):
    """The worker cannot serve jobs; the message says why and what to change."""


# --------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------


def check_weights(
    explicit_dir: str | os.PathLike[str] | None = None,
    *,
    hf_cache_dir: str | os.PathLike[str] | None = hw.DEFAULT_HF_CACHE_DIR,
    repo_id: str = hw.HALLO3_REPO_ID,
    revision: str | None = None,
    volume_dir: str | os.PathLike[str] | None = hw.DEFAULT_VOLUME_WEIGHTS_DIR,
    image_dir: str | os.PathLike[str] | None = hw.DEFAULT_IMAGE_WEIGHTS_DIR,
    check_hashes: bool = False,
    require_aux: bool = True,
) -> str:
    """Locate the weights (same search as :func:`hallo3_worker.weights.locate_weights`) and verify them."""
    try:
        location = hw.locate_weights(
            explicit_dir,
            hf_cache_dir=hf_cache_dir,
            repo_id=repo_id,
            revision=revision,
            volume_dir=volume_dir,
            image_dir=image_dir,
        )
        report = hw.verify_weights(location, check_hashes=check_hashes, require_aux=require_aux)
    except hw.WeightsError as exc:
        raise FitnessError(f"Hallo3 weights are not usable: {exc}") from exc
    return f"weights OK ({location.source.replace('_', ' ')}): {report.summary()}"


# --------------------------------------------------------------------------------------------------
# GPU memory
# --------------------------------------------------------------------------------------------------


def component_bytes(location: hw.WeightsLocation | None = None, sizes: Mapping[str, int] | None = None) -> dict[str, int]:
    """Weight bytes per component: ``sizes``, else the converted files at ``location``, else the defaults."""
    known = dict(DEFAULT_COMPONENT_BYTES)
    if location is not None:
        try:
            known.update(hw.converted_component_sizes(location))
        except hw.WeightsError as exc:
            logger.warning("cannot read converted sizes (%s); using defaults", exc)
    if sizes:
        known.update(sizes)
    return known


def estimate_gpu_bytes(
    policy: str = "partial",
    *,
    location: hw.WeightsLocation | None = None,
    sizes: Mapping[str, int] | None = None,
    activations: Mapping[str, int] | None = None,
) -> int:
    """Peak GPU bytes of a job under an offload ``policy`` (:data:`OFFLOAD_POLICIES`).

    The resident networks, plus the largest stage (its activations from
    :data:`STAGE_ACTIVATION_BYTES` or ``activations``, the network visiting for it, and the
    reference tokens during the segment loop), plus :data:`CUDA_OVERHEAD_BYTES`. Estimates from
    tensor sizes, not measurements on a GPU.
    """
    if policy not in OFFLOAD_POLICIES:
        raise ValueError(f"unknown offload policy {policy!r}; choose from {OFFLOAD_POLICIES}")
    weights = component_bytes(location, sizes)
    stage = dict(STAGE_ACTIVATION_BYTES)
    if activations:
        stage.update(activations)
    visitors = VISITORS[policy]
    resident = sum(weights[name] for name in GPU_COMPONENTS if name not in visitors.values())
    denoise = stage["denoise_chunked" if policy == "full" else "denoise"]
    peaks = {
        "audio": stage["audio"],
        "text": stage["text"],
        "reference": stage["reference"],
        "denoise": REFERENCE_BANK_BYTES + denoise,
        "vae_encode": REFERENCE_BANK_BYTES + stage["vae_encode"],
        "vae_decode": REFERENCE_BANK_BYTES + stage["vae_decode"],
    }
    visiting = {name: weights[network] for name, network in visitors.items()}
    if policy == "full":  # the blocks stream: two of them and the rest of the transformer are on the GPU
        share = (TRANSFORMER_REST_BYTES + STREAMED_BLOCKS * TRANSFORMER_BLOCK_BYTES) / (
            TRANSFORMER_REST_BYTES + TRANSFORMER_NUM_BLOCKS * TRANSFORMER_BLOCK_BYTES
        )
        visiting["denoise"] = int(weights[hw.TRANSFORMER] * share)
    peak = max(bytes_ + visiting.get(name, 0) for name, bytes_ in peaks.items())
    return resident + peak + CUDA_OVERHEAD_BYTES


def cuda_memory(device_index: int) -> tuple[int, int, str] | None:
    """(free, total, name) of CUDA device ``device_index``, or None without a usable CUDA device."""
    import torch

    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info(device_index)
    return int(free), int(total), torch.cuda.get_device_name(device_index)


def check_gpu_memory(
    required_bytes: int,
    *,
    device_index: int = 0,
    require_cuda: bool = False,
    memory_info: Callable[[int], tuple[int, int, str] | None] = cuda_memory,
) -> str:
    """Fail when the CUDA device has less free memory than ``required_bytes``.

    Without CUDA the check passes (CPU runs are for development) unless ``require_cuda``.
    """
    info = memory_info(device_index)
    if info is None:
        if require_cuda:
            raise FitnessError(
                "no usable CUDA device: the worker is configured for the GPU but torch sees none "
                "(driver too old for this image's CUDA 13 build, or no GPU assigned)"
            )
        return "no CUDA device; GPU memory check skipped"
    free, total, name = info
    if free < required_bytes:
        raise FitnessError(
            f"GPU {device_index} ({name}) has {free / GIB:.1f} GiB free of {total / GIB:.1f} GiB, but this "
            f"configuration needs about {required_bytes / GIB:.1f} GiB (weights plus activations). Use a GPU "
            "with more memory (docs/deploy.md lists what fits), set HALLO3_OFFLOAD=partial or full, and make sure "
            "nothing else runs on this GPU."
        )
    return f"GPU {device_index} ({name}): {free / GIB:.1f} GiB free of {total / GIB:.1f} GiB, about {required_bytes / GIB:.1f} GiB needed"


# --------------------------------------------------------------------------------------------------
# Video encoders
# --------------------------------------------------------------------------------------------------


def pyav_encoders(names: Sequence[str]) -> dict[str, bool]:
    """Which of ``names`` PyAV can open for encoding."""
    try:
        import av
    except ImportError:
        return {name: False for name in names}
    found = {}
    for name in names:
        try:
            av.codec.Codec(name, "w")
            found[name] = True
        except Exception:  # av raises UnknownCodecError (or ValueError in older releases)
            found[name] = False
    return found


def ffmpeg_encoders(names: Sequence[str], ffmpeg: str | None = None, timeout_s: float = 20.0) -> dict[str, bool]:
    """Which of ``names`` the ``ffmpeg`` binary lists as encoders (all False without a binary)."""
    binary = ffmpeg or shutil.which("ffmpeg")
    if binary is None:
        return {name: False for name in names}
    try:
        listing = subprocess.run(
            [binary, "-hide_banner", "-encoders"], capture_output=True, text=True, timeout=timeout_s, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {name: False for name in names}
    listed = {line.split()[1] for line in listing.splitlines() if len(line.split()) >= 2 and len(line.split()[0]) == 6}
    return {name: name in listed for name in names}


def check_video_encoders(
    encoders: Sequence[str] = REQUIRED_ENCODERS,
    *,
    backends: Sequence[str] = ("pyav", "ffmpeg"),
) -> str:
    """Pass when one of ``backends`` (``"pyav"``, ``"ffmpeg"``) has every encoder in ``encoders``."""
    probes = {"pyav": pyav_encoders, "ffmpeg": ffmpeg_encoders}
    results = {}
    for backend in backends:
        if backend not in probes:
            raise ValueError(f"unknown backend {backend!r}")
        results[backend] = probes[backend](encoders)
        if all(results[backend].values()):
            return f"video encoders OK via {backend}: {', '.join(encoders)}"
    details = "; ".join(
        f"{backend} lacks {', '.join(n for n, ok in found.items() if not ok)}" for backend, found in results.items()
    )
    raise FitnessError(f"cannot encode the output video ({details}). Install PyAV wheels with libx264 or ffmpeg with libx264 and aac.")


# --------------------------------------------------------------------------------------------------
# Bundling
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FitnessConfig:
    """What the checks need; the handler fills it from its settings."""

    check_weights: bool = True
    weights_dir: str | os.PathLike[str] | None = None
    hf_cache_dir: str | os.PathLike[str] | None = hw.DEFAULT_HF_CACHE_DIR
    repo_id: str = hw.HALLO3_REPO_ID
    revision: str | None = None
    volume_dir: str | os.PathLike[str] | None = hw.DEFAULT_VOLUME_WEIGHTS_DIR
    image_dir: str | os.PathLike[str] | None = hw.DEFAULT_IMAGE_WEIGHTS_DIR
    verify_hashes: bool = False
    offload: str = "partial"  # an OFFLOAD_POLICIES entry
    device_index: int = 0
    require_cuda: bool = False
    encoders: tuple[str, ...] = REQUIRED_ENCODERS
    encoder_backends: tuple[str, ...] = ("pyav", "ffmpeg")


def _search_places(config: FitnessConfig) -> dict[str, object]:
    """Where to look for the weights, as keyword arguments of ``locate_weights``/``check_weights``."""
    return {
        "hf_cache_dir": config.hf_cache_dir,
        "repo_id": config.repo_id,
        "revision": config.revision,
        "volume_dir": config.volume_dir,
        "image_dir": config.image_dir,
    }


def fitness_checks(config: FitnessConfig = FitnessConfig()) -> list[Callable[[], str]]:
    """Argument-free check functions, named for the logs, in the order they should run."""
    checks: list[Callable[[], str]] = []

    if config.check_weights:

        def hallo3_weights_present() -> str:
            return check_weights(config.weights_dir, **_search_places(config), check_hashes=config.verify_hashes)

        checks.append(hallo3_weights_present)

    def hallo3_gpu_memory() -> str:
        location = None
        if config.check_weights:
            try:
                location = hw.locate_weights(config.weights_dir, **_search_places(config))
            except hw.WeightsError:
                location = None
        required = estimate_gpu_bytes(config.offload, location=location)
        return check_gpu_memory(required, device_index=config.device_index, require_cuda=config.require_cuda)

    def hallo3_video_encoders() -> str:
        return check_video_encoders(config.encoders, backends=config.encoder_backends)

    checks.append(hallo3_gpu_memory)
    checks.append(hallo3_video_encoders)
    return checks


def run_fitness_checks(checks: Iterable[Callable[[], str]]) -> list[str]:
    """Run checks in order, logging each result; the first failure propagates."""
    messages = []
    for check in checks:
        message = check()
        logger.info("fitness %s: %s", getattr(check, "__name__", "check"), message)
        messages.append(message)
    return messages


__all__ = [
    "CUDA_OVERHEAD_BYTES",
    "DEFAULT_COMPONENT_BYTES",
    "FULL_OFFLOAD_FEED_FORWARD_CHUNK",
    "GPU_COMPONENTS",
    "OFFLOAD_POLICIES",
    "REFERENCE_BANK_BYTES",
    "STAGE_ACTIVATION_BYTES",
    "VISITORS",
    "FitnessConfig",
    "FitnessError",
    "check_gpu_memory",
    "check_video_encoders",
    "check_weights",
    "component_bytes",
    "cuda_memory",
    "estimate_gpu_bytes",
    "ffmpeg_encoders",
    "fitness_checks",
    "pyav_encoders",
    "run_fitness_checks",
]
