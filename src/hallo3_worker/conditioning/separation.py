"""Vocal separation with audio-separator's MDX-Net runner (Hallo3 uses ``Kim_Vocal_2.onnx``).

Upstream (``hallo3/sgm/utils/audio_processor.py:51-62,88-98``) builds one ``Separator`` with the
library defaults (44.1 kHz output, MDX hop 1024, segment 256, overlap 0.25, batch 1) and writes
the vocals into a shared, working-directory-relative cache folder. Here:

* every job writes into its own folder, passed in by the caller;
* the model folder is a parameter (it must hold what Hallo3's ``pretrained_models/audio_separator``
  holds: the ``.onnx`` file plus ``download_checks.json``, ``mdx_model_data.json`` and
  ``vr_model_data.json``, so that audio-separator never goes online);
* ONNX Runtime providers are chosen from what the installed onnxruntime offers (CUDA first when
  present), and the torch device for the STFT is an argument;
* the separator reads a lossless float WAV of the decoded input (so any format PyAV decodes
  works, with no ffmpeg binary) and writes float WAV; the 16-bit quantisation upstream's writer
  applied is done afterwards by :func:`hallo3_worker.conditioning.audio.vocals_to_16k`.

audio-separator's chatter stays out of the job log unless this module's logger is at DEBUG
(``HALLO3_LOG_LEVEL=DEBUG``): its own log lines below ERROR (such as "Using soundfile for
writing"), its tqdm progress bars, and the Python warnings raised while it runs (a NumPy
``RuntimeWarning`` from its overlap division, torch's STFT deprecation warning), which are logged
here at DEBUG instead of printed.

audio-separator's MDX module imports ``onnx2torch`` at import time, which needs torchvision; the
ONNX Runtime path used here (segment size == the model's ``dim_t``) never calls it, so a stub is
installed when the real package cannot be imported.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import threading
import types
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from hallo3_worker.conditioning.audio import write_float_wav
from hallo3_worker.interface import DecodedAudio

logger = logging.getLogger(__name__)

KIM_VOCAL_2 = "Kim_Vocal_2.onnx"
SEPARATOR_SAMPLE_RATE = 44_100
#: audio-separator's MDX defaults, which upstream (audio-separator 0.21.2) ran with.
MDX_PARAMS: dict[str, Any] = {
    "hop_length": 1024,
    "segment_size": 256,
    "overlap": 0.25,
    "batch_size": 1,
    "enable_denoise": False,
}
NORMALIZATION_THRESHOLD = 0.9
#: files audio-separator reads from the model folder instead of downloading them
REQUIRED_METADATA = ("download_checks.json", "mdx_model_data.json", "vr_model_data.json")
INPUT_NAME = "separator_input.wav"
VOCALS_NAME = "vocals"

_CUDA_PROVIDER = "CUDAExecutionProvider"
_CPU_PROVIDER = "CPUExecutionProvider"


class SeparationError(RuntimeError):
    """The separation model is missing or failed (a server problem, not the user's input)."""


def onnx_providers(*, use_cuda: bool = True) -> list[str]:
    """ONNX Runtime execution providers to use: CUDA (when available and wanted), then CPU."""
    import onnxruntime

    available = onnxruntime.get_available_providers()
    providers = [_CUDA_PROVIDER] if use_cuda and _CUDA_PROVIDER in available else []
    providers.append(_CPU_PROVIDER)
    return providers


def _stub_onnx2torch() -> None:
    """Make ``import onnx2torch`` succeed when the real package (or torchvision) is unusable."""
    if "onnx2torch" in sys.modules and not getattr(sys.modules["onnx2torch"], "_hallo3_stub", False):
        return
    try:
        importlib.import_module("onnx2torch")
        return
    except Exception:  # noqa: BLE001 - any import failure (missing, or torchvision broken) means: stub it
        for name in [n for n in sys.modules if n == "onnx2torch" or n.startswith("onnx2torch.")]:
            del sys.modules[name]

    def convert(*_args: object, **_kwargs: object) -> None:
        raise SeparationError(
            "onnx2torch is unavailable: keep the MDX segment size equal to the model's dim_t so that "
            "audio-separator runs the model with ONNX Runtime"
        )

    stub = types.ModuleType("onnx2torch")
    stub.convert = convert  # type: ignore[attr-defined]
    stub._hallo3_stub = True  # type: ignore[attr-defined]
    sys.modules["onnx2torch"] = stub
    logger.debug("onnx2torch unavailable; installed a stub (ONNX Runtime path only)")


def _progress_bars_at_debug_only(module: types.ModuleType) -> None:
    """Make the tqdm bars of an audio-separator architecture module draw only when this module logs DEBUG."""
    bar = getattr(module, "tqdm", None)
    if bar is None or getattr(bar, "_hallo3_debug_only", False):
        return

    def debug_only_bar(*args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("disable", not logger.isEnabledFor(logging.DEBUG))
        return bar(*args, **kwargs)

    debug_only_bar._hallo3_debug_only = True  # type: ignore[attr-defined]
    module.tqdm = debug_only_bar  # type: ignore[attr-defined]


def check_model_dir(model_dir: str | os.PathLike[str], model_filename: str = KIM_VOCAL_2) -> Path:
    """Return ``model_dir`` as a Path if it holds the model and audio-separator's metadata files.

    Raises:
        SeparationError: listing the missing files (audio-separator would otherwise try to download them).
    """
    folder = Path(model_dir)
    missing = [name for name in (model_filename, *REQUIRED_METADATA) if not (folder / name).is_file()]
    if missing:
        raise SeparationError(f"vocal separation model folder {folder} lacks {', '.join(missing)}")
    try:
        checks = json.loads((folder / "download_checks.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise SeparationError(f"{folder / 'download_checks.json'} is unreadable: {err}") from err
    if model_filename not in checks.get("mdx_download_list", {}).values():
        raise SeparationError(f"{model_filename} is not listed as an MDX model in {folder / 'download_checks.json'}")
    return folder


class VocalSeparator:
    """Kim_Vocal_2 (or another MDX-Net ONNX model) through audio-separator, loaded once, used per job.

    ``separate`` is serialised with a lock: audio-separator keeps per-file state on the model.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        model_filename: str = KIM_VOCAL_2,
        *,
        torch_device: torch.device | str = "cpu",
        providers: Sequence[str] | None = None,
        log_level: int | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        self.model_filename = model_filename
        self.torch_device = torch.device(torch_device)
        if providers is None:
            providers = onnx_providers(use_cuda=self.torch_device.type == "cuda")
        self.providers = list(providers)
        self.log_level = log_level  # audio-separator's; None: DEBUG when this module logs DEBUG, else ERROR
        self._separator: Any = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._separator is not None

    def load(self) -> None:
        """Create the ``Separator`` and load the model (idempotent)."""
        with self._lock:
            if self._separator is None:
                self._separator = self._build()

    def _build(self) -> Any:
        check_model_dir(self.model_dir, self.model_filename)
        _stub_onnx2torch()
        from audio_separator.separator import Separator

        # Separator() silences every Python warning process-wide unless log_level is DEBUG;
        # catch_warnings restores the filters. info_only=True skips its device probing (which also
        # insists on an ffmpeg binary); device and providers are set explicitly below.
        log_level = self.log_level
        if log_level is None:
            log_level = logging.DEBUG if logger.isEnabledFor(logging.DEBUG) else logging.ERROR
        with warnings.catch_warnings():
            separator = Separator(
                log_level=log_level,
                model_file_dir=str(self.model_dir),
                output_dir=str(self.model_dir),  # never written to: separate() sets the job's folder
                output_format="WAV",
                output_single_stem="Vocals",
                normalization_threshold=NORMALIZATION_THRESHOLD,
                sample_rate=SEPARATOR_SAMPLE_RATE,
                use_soundfile=True,
                mdx_params=dict(MDX_PARAMS),
                info_only=True,
            )
            separator.torch_device_cpu = torch.device("cpu")
            separator.torch_device = self.torch_device
            separator.onnx_execution_provider = list(self.providers)
            separator.load_model(self.model_filename)
        if separator.model_instance is None:
            raise SeparationError(f"audio-separator could not load {self.model_filename}")
        _progress_bars_at_debug_only(sys.modules[type(separator.model_instance).__module__])
        logger.info(
            "Loaded vocal separator %s (providers %s, STFT on %s)",
            self.model_filename,
            self.providers,
            self.torch_device,
        )
        return separator

    def separate(self, audio: DecodedAudio, job_dir: Path) -> Path:
        """Separate the vocals of ``audio`` into ``job_dir/vocals.wav`` (44.1 kHz float WAV, usually stereo).

        ``job_dir`` must be a folder private to the job; the separator's input copy is written
        there too.
        """
        self.load()
        job_dir = Path(job_dir)
        job_dir.mkdir(parents=True, exist_ok=True)
        mix_path = write_float_wav(job_dir / INPUT_NAME, audio)
        with self._lock:
            separator = self._separator
            # The output folder is captured by the loaded model; point it at this job's folder.
            separator.model_instance.output_dir = str(job_dir)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                outputs = separator.separate(str(mix_path), custom_output_names={"Vocals": VOCALS_NAME})
        for warning in caught:
            logger.debug("audio-separator: %s: %s (%s:%s)", warning.category.__name__, warning.message,
                         Path(warning.filename).name, warning.lineno)
        if not outputs:
            raise SeparationError("vocal separation produced no output")
        vocals = job_dir / Path(outputs[0]).name
        if not vocals.is_file():
            raise SeparationError(f"vocal separation did not write {vocals}")
        return vocals
