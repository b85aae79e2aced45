"""Finding the weights folder. :func:`locate_weights` searches, in this order, and takes the first place that holds weights:

1. an explicit folder (the worker passes ``HALLO3_WEIGHTS_DIR``; ``auto`` means "search"); given
   but unusable is an error, never a silent fall-through;
2. Runpod's cached-models folder for ``fudan-generative-ai/hallo3``:
   ``/runpod-volume/huggingface-cache/hub/models--fudan-generative-ai--hallo3/snapshots/<hash>/``
   (the snapshot is resolved here, from ``refs/<revision>`` or the only snapshot present);
3. a folder on the network volume (default ``/runpod-volume/hallo3``), filled once by
   ``builder/download_weights.py`` and ``builder/convert_weights.py``;
4. the folder baked into the image (default ``/opt/hallo3/weights``).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from hallo3_worker.weights.formats import (
    _COMMIT_RE, AUDIO_SEPARATOR_DIR, AUTO, CONVERTED_DIRNAME, CONVERTED_MANIFEST, DEFAULT_HF_CACHE_DIR,
    DEFAULT_IMAGE_WEIGHTS_DIR, DEFAULT_VOLUME_WEIGHTS_DIR, DOWNLOAD_MANIFEST, DOWNLOAD_MARKER, FACE_ANALYSIS_DIR,
    HALLO3_REPO_ID, SAT_CHECKPOINT_NAME, SAT_LATEST, SAT_VAE, T5_DIR, WAV2VEC_DIR, WeightsError, logger,
)


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
