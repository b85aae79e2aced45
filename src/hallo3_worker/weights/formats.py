"""File layout and names, :class:`WeightsError`, the small file helpers shared with the builder scripts (hashing,
atomic JSON, :func:`check_file`, configs <-> JSON) and the reading of torch / SAT checkpoints without
SwissArmyTransformer or DeepSpeed (a restricted pickle sandbox; memory-mapped, to the CPU). Builds no network.
"""

from __future__ import annotations

import codecs
import collections
import dataclasses
import hashlib
import json
import logging
import os
import pickle
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from hallo3_worker.models import checkpoint as ck

logger = logging.getLogger(__package__)  # one logger for the whole package, named as before the split

HALLO3_REPO_ID = "fudan-generative-ai/hallo3"
DEFAULT_HF_CACHE_DIR = Path("/runpod-volume/huggingface-cache/hub")
DEFAULT_VOLUME_WEIGHTS_DIR = Path("/runpod-volume/hallo3")
DEFAULT_IMAGE_WEIGHTS_DIR = Path("/opt/hallo3/weights")

#: An explicit weights folder of this value means "search the usual places".
AUTO = "auto"
DOWNLOAD_MANIFEST = "hallo3-download-manifest.json"
DOWNLOAD_MARKER = ".hallo3-download-complete"
DOWNLOAD_MANIFEST_FORMAT = "hallo3-download-manifest"
CONVERTED_DIRNAME = "converted"
CONVERTED_MANIFEST = "hallo3-converted.json"
CONVERTED_FORMAT = "hallo3-converted"
FORMAT_VERSION = 1

# The Hugging Face repository's layout (paths relative to a weights folder).
SAT_LATEST = "hallo3/latest"
SAT_CHECKPOINT_NAME = "mp_rank_00_model_states.pt"
SAT_VAE = "cogvideox-5b-i2v-sat/vae/3d-vae.pt"
T5_DIR = "t5-v1_1-xxl"
WAV2VEC_DIR = "wav2vec/wav2vec2-base-960h"
AUDIO_SEPARATOR_DIR = "audio_separator"
FACE_ANALYSIS_DIR = "face_analysis/models"

#: Files the pre-processing models need besides the networks loaded here (spec section 9).
AUX_REQUIRED_FILES: tuple[str, ...] = (
    f"{T5_DIR}/config.json",
    f"{T5_DIR}/spiece.model",
    f"{WAV2VEC_DIR}/config.json",
    f"{AUDIO_SEPARATOR_DIR}/Kim_Vocal_2.onnx",
    f"{FACE_ANALYSIS_DIR}/scrfd_10g_bnkps.onnx",
    f"{FACE_ANALYSIS_DIR}/glintr100.onnx",
    f"{FACE_ANALYSIS_DIR}/2d106det.onnx",
    f"{FACE_ANALYSIS_DIR}/1k3d68.onnx",
    f"{FACE_ANALYSIS_DIR}/genderage.onnx",
    f"{FACE_ANALYSIS_DIR}/face_landmarker_v2_with_blendshapes.task",
)
#: Any one of these is enough for the wav2vec weights.
WAV2VEC_WEIGHT_FILES: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin")

TRANSFORMER = "transformer"
REFERENCE_NET = "reference_net"
VAE = "vae"
COMPONENTS: tuple[str, ...] = (TRANSFORMER, REFERENCE_NET, VAE)
COMPONENT_FILES = {TRANSFORMER: "transformer.safetensors", REFERENCE_NET: "reference_net.safetensors", VAE: "vae.safetensors"}

#: Keys of the SAT checkpoint that belong to other parts of the engine (never read).
IGNORED_SAT_PREFIXES: tuple[str, ...] = ("conditioner.", "first_stage_model.")

_HASH_CHUNK = 16 * 1024 * 1024
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


class WeightsError(ck.CheckpointError):
    """Weights are missing, incomplete, corrupt or do not match the networks; names the file."""

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None) -> None:
        super().__init__(message)
        self.path = Path(path) if path is not None else None


def sha256_file(path: str | os.PathLike[str], chunk_size: int = _HASH_CHUNK) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` through a temporary file and an atomic rename."""
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object, raising :class:`WeightsError` naming the file on any problem."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WeightsError(f"{path}: file is missing", path) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{path}: not readable JSON ({exc})", path) from exc
    if not isinstance(data, dict):
        raise WeightsError(f"{path}: expected a JSON object", path)
    return data


def check_file(path: Path, expected_size: int | None = None, expected_sha256: str | None = None) -> int:
    """Check that ``path`` is a regular, non-empty file of the expected size (and hash).

    Returns the size. Raises :class:`WeightsError` naming the file: missing, empty, truncated or
    too long, or a SHA-256 mismatch (corrupt).
    """
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise WeightsError(f"{path}: file is missing", path) from None
    if not path.is_file():
        raise WeightsError(f"{path}: not a regular file", path)
    if expected_size is not None and size != expected_size:
        kind = "truncated" if size < expected_size else "larger than recorded"
        raise WeightsError(f"{path}: {kind}: {size} bytes, expected {expected_size}", path)
    if expected_size is None and size == 0:
        raise WeightsError(f"{path}: file is empty", path)
    if expected_sha256 is not None:
        actual = sha256_file(path)
        if actual != expected_sha256:
            raise WeightsError(f"{path}: corrupt: SHA-256 {actual} does not match the recorded {expected_sha256}", path)
    return size


def config_to_dict(config: Any) -> dict[str, Any]:
    """A frozen config dataclass as plain JSON-able data (nested dataclasses become dicts)."""
    return dataclasses.asdict(config)


def config_from_dict(cls: type, data: Mapping[str, Any]) -> Any:
    """Inverse of :func:`config_to_dict`: rebuild ``cls`` (nested dataclasses and tuples included)."""
    if not dataclasses.is_dataclass(cls) or not isinstance(data, Mapping):
        raise ValueError(f"cannot build {cls!r} from {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {', '.join(unknown)}")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        hint = hints.get(name)
        if isinstance(hint, type) and dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
            value = config_from_dict(hint, value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


# Globals a tensor checkpoint legitimately needs. Everything else (numpy RNG state, DeepSpeed or SAT
# objects, argparse namespaces) is replaced by an inert stand-in: no foreign module is imported and
# no foreign callable runs.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
    ("torch", "Size"): torch.Size,
    ("torch", "device"): torch.device,
    ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("_codecs", "encode"): codecs.encode,
}
_ALLOWED_GLOBALS.update(
    {("torch", str(dtype).removeprefix("torch.")): dtype for dtype in vars(torch).values() if isinstance(dtype, torch.dtype)}
)


class InertObject(dict):
    """Stand-in for a pickled object whose class is not on the allow-list. Accepts and drops its state."""

    __qualified_name__ = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> InertObject:
        return dict.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        dict.__init__(self)

    def __setstate__(self, state: Any) -> None:
        pass

    def append(self, item: Any) -> None:
        pass

    def extend(self, items: Any) -> None:
        pass

    def __repr__(self) -> str:
        return f"<inert {self.__qualified_name__}>"


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only :data:`_ALLOWED_GLOBALS`; anything else becomes an :class:`InertObject` subclass."""

    replaced: set[str]  # per-load subclass attribute (see _restricted_pickle_module)

    def find_class(self, module: str, name: str) -> Any:
        allowed = _ALLOWED_GLOBALS.get((module, name))
        if allowed is not None:
            return allowed
        qualified = f"{module}.{name}"
        type(self).replaced.add(qualified)
        return type(f"Inert_{name}", (InertObject,), {"__qualified_name__": qualified, "__module__": __name__})


def _restricted_pickle_module() -> types.ModuleType:
    module = types.ModuleType("hallo3_restricted_pickle")
    unpickler = type("RestrictedUnpickler", (_RestrictedUnpickler,), {"replaced": set()})
    module.Unpickler = unpickler  # type: ignore[attr-defined]
    module.load = lambda file, **kw: unpickler(file, **kw).load()  # type: ignore[attr-defined]
    module.replaced = unpickler.replaced  # type: ignore[attr-defined]
    return module


@dataclasses.dataclass(frozen=True)
class TorchCheckpoint:
    """A loaded ``torch.save`` file. ``data`` is what it holds; tensors are memory-mapped when possible."""

    path: Path
    data: Any
    load_mode: str  # "weights_only" or "restricted_unpickler"
    mmap: bool
    fallback_reason: str | None = None
    replaced_globals: tuple[str, ...] = ()


def read_torch_checkpoint(path: str | os.PathLike[str]) -> TorchCheckpoint:
    """``torch.load`` a checkpoint to CPU, memory-mapped, as safely as the file allows.

    First ``weights_only=True``. If the file pickles anything else (DeepSpeed bookkeeping such as
    numpy RNG state, SAT objects), it is read again with a restricted unpickler that rebuilds
    tensors and plain containers and turns every other object into an inert placeholder; the reason
    is logged. Neither path imports SwissArmyTransformer or DeepSpeed.
    """
    path = Path(path)
    check_file(path)
    use_mmap = True

    def _load(**kwargs: Any) -> Any:
        nonlocal use_mmap
        try:
            return torch.load(str(path), map_location="cpu", mmap=use_mmap, **kwargs)
        except RuntimeError as exc:
            text = str(exc)
            if use_mmap and "mmap" in text and "zipfile" in text:
                logger.warning("%s: legacy (non-zip) torch format, loading without mmap (uses RAM)", path)
                use_mmap = False
                return torch.load(str(path), map_location="cpu", mmap=False, **kwargs)
            raise

    try:
        try:
            data = _load(weights_only=True)
            return TorchCheckpoint(path, data, "weights_only", use_mmap)
        except pickle.UnpicklingError as exc:
            reason = _unpickling_reason(exc)
        pickle_module = _restricted_pickle_module()
        data = _load(weights_only=False, pickle_module=pickle_module)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, ValueError) as exc:
        raise WeightsError(f"{path}: cannot read the torch checkpoint, the file is truncated or corrupt ({exc})", path) from exc
    replaced = tuple(sorted(pickle_module.replaced))
    logger.warning(
        "%s: weights_only loading refused the file (%s); read it with a restricted unpickler instead. "
        "Non-tensor objects replaced by inert placeholders: %s",
        path,
        reason,
        ", ".join(replaced) or "none",
    )
    return TorchCheckpoint(path, data, "restricted_unpickler", use_mmap, reason, replaced)


def _unpickling_reason(exc: BaseException) -> str:
    """The informative line of torch's weights_only refusal (it names the refused global)."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(exc).splitlines()]
    lines = [line for line in lines if line]
    for line in lines:
        if "WeightsUnpickler error" in line or "Unsupported global" in line:
            return line.split(". ")[0]
    return lines[0] if lines else type(exc).__name__


@dataclasses.dataclass(frozen=True)
class SatCheckpoint:
    """The model state of a SAT / DeepSpeed checkpoint (``sd["module"]`` or the top-level dict)."""

    path: Path
    module: Mapping[str, torch.Tensor]
    load_mode: str
    fallback_reason: str | None
    bookkeeping_keys: tuple[str, ...]
    ignored_key_counts: dict[str, int]

    def dtypes(self, prefix: str) -> dict[str, int]:
        """Count of tensors per dtype under ``prefix``."""
        counts: dict[str, int] = {}
        for key, value in self.module.items():
            if key.startswith(prefix):
                name = str(value.dtype).removeprefix("torch.")
                counts[name] = counts.get(name, 0) + 1
        return counts


def read_sat_checkpoint(path: str | os.PathLike[str]) -> SatCheckpoint:
    """Read ``hallo3/<n>/mp_rank_00_model_states.pt`` (memory-mapped; see :func:`read_torch_checkpoint`).

    Handles the DeepSpeed wrapper (a dict with ``module`` plus bookkeeping such as ``global_steps``
    and ``dp_world_size``). Keys under ``conditioner.`` and ``first_stage_model.`` are counted and
    left alone; only ``model.diffusion_model.`` / ``ref_model.diffusion_model.`` are ever used.
    """
    loaded = read_torch_checkpoint(path)
    data = loaded.data
    bookkeeping: tuple[str, ...] = ()
    if isinstance(data, Mapping) and isinstance(data.get("module"), Mapping):
        bookkeeping = tuple(sorted(str(k) for k in data if k != "module"))
        module = data["module"]
    elif isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
        bookkeeping = tuple(sorted(str(k) for k in data if k != "state_dict"))
        module = data["state_dict"]
    elif isinstance(data, Mapping):
        module = data
    else:
        raise WeightsError(f"{loaded.path}: expected a dict of tensors, found {type(data).__name__}", loaded.path)

    tensors: dict[str, torch.Tensor] = {}
    ignored: dict[str, int] = {}
    for key, value in module.items():
        if not isinstance(key, str):
            continue
        for prefix in IGNORED_SAT_PREFIXES:
            if key.startswith(prefix):
                ignored[prefix] = ignored.get(prefix, 0) + 1
        if isinstance(value, torch.Tensor):
            tensors[key] = value
    if not any(k.startswith((ck.MAIN_PREFIX, ck.REFERENCE_PREFIX)) for k in tensors):
        raise WeightsError(
            f"{loaded.path}: no '{ck.MAIN_PREFIX}' or '{ck.REFERENCE_PREFIX}' tensors found; "
            "this is not a Hallo3 checkpoint",
            loaded.path,
        )
    if ignored:
        logger.info(
            "%s: ignoring %s", loaded.path, ", ".join(f"{n} '{p}*' keys" for p, n in sorted(ignored.items()))
        )
    return SatCheckpoint(loaded.path, tensors, loaded.load_mode, loaded.fallback_reason, bookkeeping, ignored)


def read_sat_vae_state_dict(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], TorchCheckpoint]:
    """Read ``3d-vae.pt`` (a dict with ``state_dict``), memory-mapped; returns its SAT-named tensors."""
    loaded = read_torch_checkpoint(path)
    data = loaded.data
    if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
        data = data["state_dict"]
    if not isinstance(data, Mapping):
        raise WeightsError(f"{loaded.path}: expected a VAE state dict, found {type(data).__name__}", loaded.path)
    tensors = {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightsError(f"{loaded.path}: holds no tensors", loaded.path)
    return tensors, loaded
