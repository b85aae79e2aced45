"""Checking that a weights folder is complete and uncorrupted (:func:`verify_weights`, manifests); reads no tensors."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from hallo3_worker.weights.formats import (
    _SHA256_RE, AUX_REQUIRED_FILES, COMPONENTS, CONVERTED_DIRNAME, CONVERTED_FORMAT, CONVERTED_MANIFEST, DOWNLOAD_MANIFEST,
    DOWNLOAD_MANIFEST_FORMAT, DOWNLOAD_MARKER, FORMAT_VERSION, REFERENCE_NET, SAT_VAE, T5_DIR, TRANSFORMER, VAE, WAV2VEC_DIR,
    WAV2VEC_WEIGHT_FILES, WeightsError, check_file, logger, read_json, sha256_file,
)
from hallo3_worker.weights.locate import WeightsLocation, sat_checkpoint_relpath


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


def converted_component_sizes(location: WeightsLocation) -> dict[str, int]:
    """Bytes of each converted network file (empty when the folder has no converted files)."""
    if not location.has_converted:
        return {}
    manifest = read_converted_manifest(location)
    return {name: int(entry["size"]) for name, entry in manifest["components"].items()}
