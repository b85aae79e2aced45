"""Finding, verifying and loading the Hallo3 weights.

Where the weights can be
------------------------
:func:`locate_weights` searches, in this order, and takes the first place that holds weights:

1. an explicit folder (the worker passes ``HALLO3_WEIGHTS_DIR``; ``auto`` means "search"); given
   but unusable is an error, never a silent fall-through;
2. Runpod's cached-models folder for ``fudan-generative-ai/hallo3``:
   ``/runpod-volume/huggingface-cache/hub/models--fudan-generative-ai--hallo3/snapshots/<hash>/``
   (the snapshot is resolved here, from ``refs/<revision>`` or the only snapshot present);
3. a folder on the network volume (default ``/runpod-volume/hallo3``), filled once by
   ``builder/download_weights.py`` and ``builder/convert_weights.py``;
4. the folder baked into the image (default ``/opt/hallo3/weights``).

What a weights folder holds
---------------------------
The Hugging Face repository's layout (``hallo3/``, ``cogvideox-5b-i2v-sat/vae/``, ``t5-v1_1-xxl/``,
``wav2vec/wav2vec2-base-960h/``, ``audio_separator/``, ``face_analysis/models/``), optionally with

* ``hallo3-download-manifest.json`` + ``.hallo3-download-complete``: written by the downloader
  (path, size and SHA-256 of every file, then a completion marker);
* ``converted/``: ``transformer.safetensors``, ``reference_net.safetensors`` and ``vae.safetensors``
  in this package's parameter names, described by ``converted/hallo3-converted.json`` (configs,
  dtypes, sizes, SHA-256), written by ``builder/convert_weights.py``.

With ``converted/`` the networks load from the safetensors files (memory-mapped, no copies on the
CPU). Without it (the cached-models case, where the folder is exactly the Hugging Face snapshot)
they load from the SAT checkpoints themselves: ``torch.load(mmap=True)`` and the key mapping of
:mod:`hallo3_worker.models.checkpoint`, again without materialising a second copy.

Loading
-------
:func:`load_networks` builds the networks on the ``meta`` device (no memory), checks every key and
shape against the file before reading any data, and assigns the tensors (``assign=True``) in
their stored dtype unless another is asked for, casting tensor by tensor on the target device.
Every problem raises :class:`WeightsError` (a :class:`~hallo3_worker.models.checkpoint.CheckpointError`)
naming the file.
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import pickle
import re
import time
import types
import typing
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hallo3_worker.models import checkpoint as ck
from hallo3_worker.models import presets
from hallo3_worker.models.loading import build_on_meta
from hallo3_worker.models.reference_net import ReferenceNet, ReferenceNetConfig
from hallo3_worker.models.transformer import Hallo3Transformer, TransformerConfig

if typing.TYPE_CHECKING:  # diffusers is slow to import; only the VAE path needs it
    from hallo3_worker.models.vae import Hallo3VAE, VaeConfig

logger = logging.getLogger(__name__)

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


# --------------------------------------------------------------------------------------------------
# Small file helpers shared with the builder scripts
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Configs <-> JSON
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Reading torch / SAT checkpoints without SwissArmyTransformer
# --------------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------------
# Locating a weights folder
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WeightsLocation:
    """A folder with the Hallo3 weights, in the Hugging Face repository's layout."""

    root: Path
    source: str  # "explicit", "cached_model", "network_volume" or "image"

    def path(self, relative: str) -> Path:
        return self.root / relative

    @property
    def converted_dir(self) -> Path:
        return self.root / CONVERTED_DIRNAME

    @property
    def converted_manifest(self) -> Path:
        return self.converted_dir / CONVERTED_MANIFEST

    @property
    def has_converted(self) -> bool:
        return self.converted_manifest.is_file()

    @property
    def download_manifest(self) -> Path:
        return self.root / DOWNLOAD_MANIFEST

    @property
    def t5_dir(self) -> Path:
        return self.root / T5_DIR

    @property
    def wav2vec_dir(self) -> Path:
        return self.root / WAV2VEC_DIR

    @property
    def audio_separator_dir(self) -> Path:
        return self.root / AUDIO_SEPARATOR_DIR

    @property
    def face_analysis_dir(self) -> Path:
        return self.root / FACE_ANALYSIS_DIR

    @property
    def sat_vae(self) -> Path:
        return self.root / SAT_VAE

    def sat_checkpoint(self) -> Path:
        """``hallo3/<latest>/mp_rank_00_model_states.pt``, with ``<latest>`` read from ``hallo3/latest``."""
        return self.root / sat_checkpoint_relpath(self.root)


def sat_checkpoint_relpath(root: Path) -> str:
    latest_file = root / SAT_LATEST
    try:
        tag = latest_file.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise WeightsError(f"{latest_file}: file is missing (it names the checkpoint folder)", latest_file) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise WeightsError(f"{latest_file}: not readable ({exc})", latest_file) from exc
    if not tag or "/" in tag or tag in (".", ".."):
        raise WeightsError(f"{latest_file}: unexpected content {tag[:40]!r}", latest_file)
    return f"hallo3/{tag}/{SAT_CHECKPOINT_NAME}"


def hf_cache_repo_dir(cache_dir: Path, repo_id: str) -> Path:
    """``<cache>/models--org--name`` (Hugging Face cache naming)."""
    return cache_dir / ("models--" + repo_id.replace("/", "--"))


def resolve_snapshot(repo_dir: Path, revision: str | None = None) -> Path | None:
    """The snapshot folder of a Hugging Face cache repo folder, or None when there is none.

    ``revision`` may be a commit hash or a ref name (default ``main``, read from ``refs/``). Without a
    usable ref, the only snapshot is taken; with several, the newest one (with a warning).
    """
    snapshots = repo_dir / "snapshots"
    if not snapshots.is_dir():
        return None
    if revision and _COMMIT_RE.match(revision):
        candidate = snapshots / revision
        if not candidate.is_dir():
            raise WeightsError(f"{candidate}: snapshot for revision {revision} is missing", candidate)
        return candidate
    ref_file = repo_dir / "refs" / (revision or "main")
    if ref_file.is_file():
        commit = ref_file.read_text(encoding="utf-8").strip()
        candidate = snapshots / commit
        if candidate.is_dir():
            return candidate
        logger.warning("%s points at %s, which has no snapshot folder", ref_file, commit)
    elif revision:
        raise WeightsError(f"{ref_file}: no ref named {revision!r} in the model cache", ref_file)
    found = sorted((p for p in snapshots.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    if not found:
        return None
    if len(found) > 1:
        logger.warning("%s holds %d snapshots and no usable ref; using the newest, %s", snapshots, len(found), found[-1].name)
    return found[-1]


def looks_like_weights(folder: Path) -> bool:
    """True when ``folder`` holds any sign of a Hallo3 weights folder (complete or not)."""
    if not folder.is_dir():
        return False
    markers = (DOWNLOAD_MARKER, DOWNLOAD_MANIFEST, f"{CONVERTED_DIRNAME}/{CONVERTED_MANIFEST}", SAT_LATEST)
    return any((folder / m).exists() for m in markers)


def weights_search_order(
    explicit_dir: str | os.PathLike[str] | None = None,
    *,
    hf_cache_dir: str | os.PathLike[str] | None = DEFAULT_HF_CACHE_DIR,
    repo_id: str = HALLO3_REPO_ID,
    volume_dir: str | os.PathLike[str] | None = DEFAULT_VOLUME_WEIGHTS_DIR,
    image_dir: str | os.PathLike[str] | None = DEFAULT_IMAGE_WEIGHTS_DIR,
) -> list[tuple[str, Path]]:
    """The places :func:`locate_weights` looks at, in order, as ``(source, folder)`` pairs."""
    order: list[tuple[str, Path]] = []
    if explicit_dir is not None and str(explicit_dir).strip() and str(explicit_dir).strip().lower() != AUTO:
        order.append(("explicit", Path(explicit_dir).expanduser()))
    if hf_cache_dir is not None:
        order.append(("cached_model", hf_cache_repo_dir(Path(hf_cache_dir), repo_id)))
    if volume_dir is not None:
        order.append(("network_volume", Path(volume_dir)))
    if image_dir is not None:
        order.append(("image", Path(image_dir)))
    return order


def locate_weights(
    explicit_dir: str | os.PathLike[str] | None = None,
    *,
    hf_cache_dir: str | os.PathLike[str] | None = DEFAULT_HF_CACHE_DIR,
    repo_id: str = HALLO3_REPO_ID,
    revision: str | None = None,
    volume_dir: str | os.PathLike[str] | None = DEFAULT_VOLUME_WEIGHTS_DIR,
    image_dir: str | os.PathLike[str] | None = DEFAULT_IMAGE_WEIGHTS_DIR,
) -> WeightsLocation:
    """Find the weights folder (see the module docstring for the order). Pass None to skip a place.

    An explicit folder may be a weights folder or a Hugging Face cache folder (``models--org--name``,
    whose snapshot is then resolved); None, an empty string or ``"auto"`` means "search". Raises
    :class:`WeightsError` listing every place searched.
    """
    searched: list[str] = []
    for source, folder in weights_search_order(
        explicit_dir, hf_cache_dir=hf_cache_dir, repo_id=repo_id, volume_dir=volume_dir, image_dir=image_dir
    ):
        if source == "explicit":
            if not folder.is_dir():
                raise WeightsError(f"{folder}: the configured weights folder does not exist", folder)
            snapshot = resolve_snapshot(folder, revision)
            root = snapshot if snapshot is not None else folder
            if not looks_like_weights(root):
                raise WeightsError(
                    f"{root}: the configured weights folder holds no Hallo3 weights (no {SAT_LATEST}, "
                    f"{DOWNLOAD_MANIFEST} or {CONVERTED_DIRNAME}/{CONVERTED_MANIFEST})",
                    root,
                )
            return _found(WeightsLocation(root, source))
        if source == "cached_model":
            snapshot = resolve_snapshot(folder, revision)
            if snapshot is not None and looks_like_weights(snapshot):
                return _found(WeightsLocation(snapshot, source))
            searched.append(f"{folder}/snapshots/<hash> (cached model)")
            continue
        if looks_like_weights(folder):
            return _found(WeightsLocation(folder, source))
        searched.append(f"{folder} ({source.replace('_', ' ')})")
    raise WeightsError(
        "no Hallo3 weights found; searched: " + "; ".join(searched)
        + ". Set the endpoint's cached model to " + repo_id
        + ", attach a network volume prepared with builder/download_weights.py, or build the image with WEIGHTS_MODE=baked."
    )


def _found(location: WeightsLocation) -> WeightsLocation:
    logger.info("Hallo3 weights: %s (%s)", location.root, location.source.replace("_", " "))
    return location


# --------------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VerificationReport:
    root: Path
    files: tuple[str, ...]
    total_bytes: int
    hashed: bool
    seconds: float
    converted: bool

    def summary(self) -> str:
        what = "sizes and SHA-256" if self.hashed else "sizes"
        layout = "converted safetensors" if self.converted else "upstream checkpoints"
        return (
            f"{len(self.files)} files, {self.total_bytes / 1e9:.2f} GB verified ({what}) in {self.seconds:.1f} s "
            f"at {self.root}; networks load from {layout}"
        )


def _hf_blob_sha256(path: Path) -> str | None:
    """For a Hugging Face cache snapshot symlink into ``blobs/<sha256>``, that hash (LFS files)."""
    if not path.is_symlink():
        return None
    name = Path(os.readlink(path)).name
    return name if _SHA256_RE.match(name) else None


def verify_download_manifest(root: Path, *, check_hashes: bool = False, skip_removed: bool = True) -> list[tuple[str, int]]:
    """Verify ``root``'s download manifest and completion marker; returns ``(path, size)`` checked."""
    manifest_path = root / DOWNLOAD_MANIFEST
    marker = root / DOWNLOAD_MARKER
    manifest = read_json(manifest_path)
    if manifest.get("format") != DOWNLOAD_MANIFEST_FORMAT or not isinstance(manifest.get("files"), list):
        raise WeightsError(f"{manifest_path}: not a Hallo3 download manifest", manifest_path)
    if not marker.is_file():
        raise WeightsError(
            f"{marker}: completion marker is missing: the download into {root} did not finish; "
            "re-run builder/download_weights.py on that folder",
            marker,
        )
    recorded = read_json(marker).get("manifest_sha256")
    if recorded is not None and recorded != sha256_file(manifest_path):
        raise WeightsError(f"{manifest_path}: changed after the download completed (marker {marker} disagrees)", manifest_path)
    removed = set(manifest.get("removed_after_conversion") or ()) if skip_removed else set()
    checked = []
    for entry in manifest["files"]:
        rel = entry["path"]
        if rel in removed:
            continue
        size = check_file(root / rel, int(entry["size"]), entry.get("sha256") if check_hashes else None)
        checked.append((rel, size))
    return checked


def read_converted_manifest(location_or_dir: WeightsLocation | Path) -> dict[str, Any]:
    directory = location_or_dir.converted_dir if isinstance(location_or_dir, WeightsLocation) else location_or_dir
    path = directory / CONVERTED_MANIFEST
    manifest = read_json(path)
    if manifest.get("format") != CONVERTED_FORMAT or not isinstance(manifest.get("components"), Mapping):
        raise WeightsError(f"{path}: not a Hallo3 converted-weights description", path)
    if int(manifest.get("format_version", 0)) > FORMAT_VERSION:
        raise WeightsError(f"{path}: format version {manifest['format_version']} is newer than this worker reads", path)
    return manifest


def verify_converted(directory: Path, components: Iterable[str] = COMPONENTS, *, check_hashes: bool = False) -> list[tuple[str, int]]:
    """Verify the converted safetensors files named in ``hallo3-converted.json``."""
    manifest = read_converted_manifest(directory)
    checked = []
    for name in components:
        entry = manifest["components"].get(name)
        if entry is None:
            raise WeightsError(f"{directory / CONVERTED_MANIFEST}: has no '{name}' component", directory / CONVERTED_MANIFEST)
        path = directory / entry["file"]
        size = check_file(path, int(entry["size"]), entry.get("sha256") if check_hashes else None)
        checked.append((f"{CONVERTED_DIRNAME}/{entry['file']}", size))
    return checked


def _check_upstream_file(root: Path, rel: str, check_hashes: bool) -> int:
    path = root / rel
    size = check_file(path)
    if check_hashes:
        expected = _hf_blob_sha256(path)
        if expected is not None:
            check_file(path, size, expected)
    return size


def _aux_files(root: Path) -> list[str]:
    files = list(AUX_REQUIRED_FILES)
    index = root / T5_DIR / "model.safetensors.index.json"
    if index.is_file():
        files.append(f"{T5_DIR}/model.safetensors.index.json")
        weight_map = read_json(index).get("weight_map", {})
        files += sorted({f"{T5_DIR}/{shard}" for shard in weight_map.values()})
    else:
        files.append(f"{T5_DIR}/model.safetensors")
    wav2vec = next((n for n in WAV2VEC_WEIGHT_FILES if (root / WAV2VEC_DIR / n).exists()), WAV2VEC_WEIGHT_FILES[0])
    files.append(f"{WAV2VEC_DIR}/{wav2vec}")
    return files


def verify_weights(
    location: WeightsLocation,
    *,
    check_hashes: bool = False,
    components: Iterable[str] = COMPONENTS,
    require_aux: bool = True,
) -> VerificationReport:
    """Check that ``location`` holds everything needed, complete and (optionally) uncorrupted.

    Always: presence and size of every file (sizes from the manifests where they exist). With
    ``check_hashes``: SHA-256 of every file too (minutes for the full ~50 GB). ``components`` are the
    networks that will be loaded; ``require_aux`` also checks the T5, wav2vec, vocal-separator and
    face-analysis files. Raises :class:`WeightsError` naming the first bad file.
    """
    start = time.perf_counter()
    root = location.root
    components = tuple(components)
    checked: dict[str, int] = {}
    if (root / DOWNLOAD_MANIFEST).exists() or (root / DOWNLOAD_MARKER).exists():
        checked.update(verify_download_manifest(root, check_hashes=check_hashes))
    converted = location.has_converted
    if converted:
        checked.update(verify_converted(location.converted_dir, components, check_hashes=check_hashes))
    else:
        needed = []
        if TRANSFORMER in components or REFERENCE_NET in components:
            needed.append(sat_checkpoint_relpath(root))
        if VAE in components:
            needed.append(SAT_VAE)
        for rel in needed:
            if rel not in checked:
                checked[rel] = _check_upstream_file(root, rel, check_hashes)
    if require_aux:
        for rel in _aux_files(root):
            if rel not in checked:
                checked[rel] = _check_upstream_file(root, rel, check_hashes)
    report = VerificationReport(
        root=root,
        files=tuple(checked),
        total_bytes=sum(checked.values()),
        hashed=check_hashes,
        seconds=time.perf_counter() - start,
        converted=converted,
    )
    logger.info("weights verified: %s", report.summary())
    return report


# --------------------------------------------------------------------------------------------------
# Building networks on meta and filling them
# --------------------------------------------------------------------------------------------------


def build_transformer(config: TransformerConfig, dtype: torch.dtype | None = None) -> Hallo3Transformer:
    """The main transformer on the meta device (no storage)."""
    return build_on_meta(lambda: Hallo3Transformer(config), dtype)


def build_reference_net(config: ReferenceNetConfig, dtype: torch.dtype | None = None) -> ReferenceNet:
    return build_on_meta(lambda: ReferenceNet(config), dtype)


def build_vae_on_meta(config: VaeConfig, dtype: torch.dtype | None = None) -> nn.Module:
    """diffusers' ``AutoencoderKLCogVideoX`` for ``config`` on the meta device."""
    from diffusers import AutoencoderKLCogVideoX

    return build_on_meta(lambda: AutoencoderKLCogVideoX(**config.diffusers_config()), dtype)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """``"bfloat16"`` / ``torch.bfloat16`` -> ``torch.bfloat16``; None or ``"keep"`` -> None."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if name in ("keep", "stored", ""):
        return None
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def _key_problems(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]]) -> list[str]:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(
        f"{k} {found[k]} != expected {expected[k]}" for k in set(expected) & set(found) if tuple(found[k]) != tuple(expected[k])
    )
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if items:
            shown = ", ".join(items[:8]) + (f" ... ({len(items)} in all)" if len(items) > 8 else "")
            problems.append(f"{label}: {shown}")
    return problems


def _to_target(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    target_dtype = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
    return tensor.to(device=device, dtype=target_dtype)


def _assign(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:  # shapes were checked already; anything left is still a file problem
        raise WeightsError(f"{path}: does not fit the network ({exc})", path) from exc
    leftovers = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftovers:
        raise WeightsError(f"{path}: left {len(leftovers)} tensors unfilled, e.g. {leftovers[:3]}", path)
    model.eval().requires_grad_(False)


def load_safetensors_into(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    device: torch.device | str,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Fill a meta-device ``model`` strictly from one safetensors file.

    The file is opened with ``safetensors.safe_open`` (memory-mapped). Keys and shapes are checked
    against the model from the header before any data is read. On the CPU the parameters end up
    *backed by the file mapping* (no copy); on another device each tensor is copied there once and,
    if ``dtype`` differs from the stored one, cast there.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    device = torch.device(device)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            found = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
            problems = _key_problems(expected, found)
            if problems:
                raise WeightsError(f"{path}: tensors do not match the network: " + "; ".join(problems), path)
            state = {k: _to_target(handle.get_tensor(k), device, dtype) for k in expected}
    except SafetensorError as exc:
        raise WeightsError(f"{path}: not a readable safetensors file, it is truncated or corrupt ({exc})", path) from exc
    except FileNotFoundError:
        raise WeightsError(f"{path}: file is missing", path) from None
    _assign(model, state, path)
    return model


def load_converted_state_into(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    path: Path,
    *,
    device: torch.device | str,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """Fill a meta-device ``model`` from already converted (our-named) tensors read from ``path``."""
    device = torch.device(device)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = _key_problems(expected, {k: tuple(v.shape) for k, v in state.items()})
    if problems:
        raise WeightsError(f"{path}: tensors do not match the network: " + "; ".join(problems), path)
    _assign(model, {k: _to_target(state[k], device, dtype) for k in expected}, path)
    return model


@dataclasses.dataclass
class LoadedNetworks:
    """What :func:`load_networks` returns. ``timings`` holds seconds per step and in total."""

    location: WeightsLocation
    source_format: str  # "converted" or "upstream"
    transformer: Hallo3Transformer | None = None
    reference_net: ReferenceNet | None = None
    vae: Hallo3VAE | None = None
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    verification: VerificationReport | None = None


@contextlib.contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - start
    logger.info("loaded %s in %.2f s", name, timings[name])


def _wrap_conversion(path: Path) -> contextlib.AbstractContextManager[None]:
    @contextlib.contextmanager
    def wrapper() -> Iterator[None]:
        try:
            yield
        except WeightsError:
            raise
        except ck.CheckpointError as exc:
            raise WeightsError(f"{path}: {exc}", path) from exc
        except ValueError as exc:  # VaeCheckpointError and friends
            raise WeightsError(f"{path}: {exc}", path) from exc

    return wrapper()


def load_networks(
    location: WeightsLocation,
    *,
    device: torch.device | str,
    dtype: torch.dtype | None = torch.bfloat16,
    vae_dtype: torch.dtype | None = None,
    components: Sequence[str] = COMPONENTS,
    verify: bool = True,
    verify_hashes: bool = False,
    require_aux: bool = False,
    transformer_config: TransformerConfig | None = None,
    reference_config: ReferenceNetConfig | None = None,
    vae_config: VaeConfig | None = None,
) -> LoadedNetworks:
    """Build the requested networks on ``meta`` and load them from ``location``.

    ``dtype`` is the transformer and reference-net dtype (None keeps the stored one); ``vae_dtype``
    likewise for the VAE. Configs come from ``hallo3-converted.json`` when the folder has converted
    files, else from the arguments, else the released checkpoint's (``presets.full_*``).
    ``verify`` runs :func:`verify_weights` first (sizes; ``verify_hashes`` adds SHA-256).
    """
    unknown = sorted(set(components) - set(COMPONENTS))
    if unknown:
        raise ValueError(f"unknown component(s) {unknown}; choose from {COMPONENTS}")
    device = torch.device(device)
    timings: dict[str, float] = {}
    total_start = time.perf_counter()
    result = LoadedNetworks(location, "converted" if location.has_converted else "upstream", timings=timings)
    if verify:
        with _timed(timings, "verify"):
            result.verification = verify_weights(
                location, check_hashes=verify_hashes, components=components, require_aux=require_aux
            )

    if location.has_converted:
        manifest = read_converted_manifest(location)
        entries = manifest["components"]
        requested = {TRANSFORMER: transformer_config, REFERENCE_NET: reference_config, VAE: vae_config}
        for name in components:
            entry = entries.get(name)
            if entry is None:
                raise WeightsError(
                    f"{location.converted_manifest}: has no '{name}'; run builder/convert_weights.py for it",
                    location.converted_manifest,
                )
            path = location.converted_dir / entry["file"]
            with _timed(timings, name), _wrap_conversion(path):
                if name == TRANSFORMER:
                    config = _recorded_config(TransformerConfig, entry, requested[name], path)
                    result.transformer = load_safetensors_into(build_transformer(config), path, device=device, dtype=dtype)
                elif name == REFERENCE_NET:
                    config = _recorded_config(ReferenceNetConfig, entry, requested[name], path)
                    result.reference_net = load_safetensors_into(build_reference_net(config), path, device=device, dtype=dtype)
                else:
                    from hallo3_worker.models.vae import Hallo3VAE, VaeConfig

                    config = _recorded_config(VaeConfig, entry, requested[name], path)
                    vae = load_safetensors_into(build_vae_on_meta(config), path, device=device, dtype=vae_dtype)
                    result.vae = Hallo3VAE(vae, config.scaling_factor)
    else:
        _load_upstream(result, components, device, dtype, vae_dtype, transformer_config, reference_config, vae_config)

    timings["total"] = time.perf_counter() - total_start
    logger.info(
        "Hallo3 networks loaded from %s (%s) on %s: %s",
        location.root,
        result.source_format,
        device,
        ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()),
    )
    return result


def _recorded_config(cls: type, entry: Mapping[str, Any], requested: Any, path: Path) -> Any:
    """The config recorded for a converted file; a different explicitly requested one is an error."""
    try:
        recorded = config_from_dict(cls, entry["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise WeightsError(f"{path}: its recorded {cls.__name__} is unusable ({exc})", path) from exc
    if requested is not None and requested != recorded:
        raise WeightsError(f"{path}: was converted for a different {cls.__name__} than the one requested", path)
    return recorded


def _load_upstream(
    result: LoadedNetworks,
    components: Sequence[str],
    device: torch.device,
    dtype: torch.dtype | None,
    vae_dtype: torch.dtype | None,
    transformer_config: TransformerConfig | None,
    reference_config: ReferenceNetConfig | None,
    vae_config: VaeConfig | None,
) -> None:
    location, timings = result.location, result.timings
    sat: SatCheckpoint | None = None
    if TRANSFORMER in components or REFERENCE_NET in components:
        path = location.sat_checkpoint()
        with _timed(timings, "read_checkpoint"):
            sat = read_sat_checkpoint(path)
    if TRANSFORMER in components and sat is not None:
        with _timed(timings, TRANSFORMER), _wrap_conversion(sat.path):
            model = build_transformer(transformer_config or presets.full_transformer())
            state = ck.convert_state_dict(sat.module, ck.MAIN_PREFIX, ck.transformer_key_rules(model.config), model)
            result.transformer = load_converted_state_into(model, state, sat.path, device=device, dtype=dtype)
    if REFERENCE_NET in components and sat is not None:
        with _timed(timings, REFERENCE_NET), _wrap_conversion(sat.path):
            ref = build_reference_net(reference_config or presets.full_reference_net())
            state = ck.convert_state_dict(sat.module, ck.REFERENCE_PREFIX, ck.reference_key_rules(ref.config), ref)
            result.reference_net = load_converted_state_into(ref, state, sat.path, device=device, dtype=dtype)
    if VAE in components:
        from hallo3_worker.models.vae import COGVIDEOX_5B_VAE, Hallo3VAE, convert_sat_vae_state_dict

        config = vae_config or COGVIDEOX_5B_VAE
        with _timed(timings, VAE), _wrap_conversion(location.sat_vae):
            sat_state, _ = read_sat_vae_state_dict(location.sat_vae)
            state = convert_sat_vae_state_dict(sat_state, config.num_levels)
            vae = load_converted_state_into(build_vae_on_meta(config), state, location.sat_vae, device=device, dtype=vae_dtype)
            result.vae = Hallo3VAE(vae, config.scaling_factor)


def converted_component_sizes(location: WeightsLocation) -> dict[str, int]:
    """Bytes of each converted network file (empty when the folder has no converted files)."""
    if not location.has_converted:
        return {}
    manifest = read_converted_manifest(location)
    return {name: int(entry["size"]) for name, entry in manifest["components"].items()}


__all__ = [
    "AUX_REQUIRED_FILES",
    "COMPONENTS",
    "DEFAULT_HF_CACHE_DIR",
    "DEFAULT_IMAGE_WEIGHTS_DIR",
    "DEFAULT_VOLUME_WEIGHTS_DIR",
    "HALLO3_REPO_ID",
    "LoadedNetworks",
    "SatCheckpoint",
    "TorchCheckpoint",
    "VerificationReport",
    "WeightsError",
    "WeightsLocation",
    "build_reference_net",
    "build_transformer",
    "build_vae_on_meta",
    "check_file",
    "config_from_dict",
    "config_to_dict",
    "dtype_name",
    "load_networks",
    "load_safetensors_into",
    "locate_weights",
    "parse_dtype",
    "read_sat_checkpoint",
    "read_sat_vae_state_dict",
    "read_torch_checkpoint",
    "resolve_snapshot",
    "sha256_file",
    "verify_weights",
    "weights_search_order",
]
