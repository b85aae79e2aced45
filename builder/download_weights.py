#!/usr/bin/env python3
"""Download the Hallo3 files that inference needs from ``fudan-generative-ai/hallo3``.

Only what the worker opens is fetched (``--list-patterns`` prints them); the repository's
``cogvideox-5b-i2v-sat/transformer`` (about 11 GB, used only to initialise training) is skipped.

* The target folder gets the repository's layout. ``--hf-cache`` instead fills a Hugging Face cache
  folder (``models--fudan-generative-ai--hallo3/snapshots/<hash>/``), the layout of Runpod's cached
  models.
* Downloads resume: ``huggingface_hub.snapshot_download`` keeps partial files and skips finished
  ones.
* When everything is there, ``hallo3-download-manifest.json`` (path, size and SHA-256 of every
  file) and then the completion marker ``.hallo3-download-complete`` are written.
* Running again on a completed folder verifies it against the manifest instead of downloading
  (sizes by default, ``--verify sha256`` for hashes too); ``--repair`` downloads whatever is missing
  or changed.

A Hugging Face token is optional (the repository is public). It is read from ``--token-file``,
else ``/run/secrets/HF_TOKEN`` (a Docker BuildKit secret), else the ``HF_TOKEN`` environment
variable. It is never logged or written anywhere.

Usage::

    python builder/download_weights.py --target /runpod-volume/hallo3
    python builder/download_weights.py --target /opt/hallo3/weights --token-file /run/secrets/HF_TOKEN
    python builder/download_weights.py --target /runpod-volume/huggingface-cache/hub --hf-cache
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import fnmatch
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

try:
    import hallo3_worker  # noqa: F401  (installed package)
except ImportError:  # a plain checkout: use the sources next to this folder
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from hallo3_worker import weights as hw

logger = logging.getLogger("hallo3.download_weights")

#: Exactly the files inference opens (spec section 9). Not ``cogvideox-5b-i2v-sat/transformer``.
INFERENCE_ALLOW_PATTERNS: tuple[str, ...] = (
    "hallo3/latest",
    "hallo3/1/mp_rank_00_model_states.pt",
    "cogvideox-5b-i2v-sat/vae/3d-vae.pt",
    "t5-v1_1-xxl/*",
    "wav2vec/wav2vec2-base-960h/*",
    "audio_separator/*",
    "face_analysis/models/*",
)
DEFAULT_SECRET_FILE = Path("/run/secrets/HF_TOKEN")
_SKIP_DIRS = {".cache"}  # huggingface_hub's own bookkeeping inside a local_dir

SnapshotDownload = Callable[..., str]


class DownloadError(RuntimeError):
    """The download could not be completed or verified."""


@dataclasses.dataclass(frozen=True)
class DownloadResult:
    folder: Path  # the weights folder (for --hf-cache: the snapshot folder)
    action: str  # "downloaded", "verified" or "repaired"
    files: int
    total_bytes: int
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "folder": str(self.folder),
            "action": self.action,
            "files": self.files,
            "total_bytes": self.total_bytes,
            "seconds": round(self.seconds, 2),
        }


@dataclasses.dataclass(frozen=True)
class Token:
    value: str | None
    source: str

    def __repr__(self) -> str:  # never show the value
        return f"Token(source={self.source!r}, present={self.value is not None})"


def resolve_token(token_file: Path | None = None, env: dict[str, str] | None = None) -> Token:
    """The Hugging Face token from a file (explicit, else the BuildKit secret) or ``HF_TOKEN``."""
    env = dict(os.environ) if env is None else env
    for path in (token_file, DEFAULT_SECRET_FILE):
        if path is not None and path.is_file():
            value = path.read_text(encoding="utf-8").strip()
            if value:
                return Token(value, f"file {path}")
    value = (env.get("HF_TOKEN") or "").strip()
    if value:
        return Token(value, "environment variable HF_TOKEN")
    return Token(None, "none (anonymous download)")


def _matching_files(folder: Path, patterns: Sequence[str]) -> list[str]:
    """Relative paths under ``folder`` matching the allow patterns (fnmatch, as huggingface_hub)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        rel_dir = Path(dirpath).relative_to(folder)
        dirnames[:] = sorted(d for d in dirnames if not (rel_dir == Path(".") and d in _SKIP_DIRS))
        for name in sorted(filenames):
            rel = (rel_dir / name).as_posix()
            if rel in (hw.DOWNLOAD_MANIFEST, hw.DOWNLOAD_MARKER) or rel.endswith(".incomplete"):
                continue
            if any(fnmatch.fnmatch(rel, pattern) for pattern in patterns):
                found.append(rel)
    return found


def write_manifest(folder: Path, repo_id: str, revision: str | None, patterns: Sequence[str]) -> dict[str, Any]:
    """Hash every downloaded file, check every pattern matched, write the manifest, then the marker."""
    files = _matching_files(folder, patterns)
    unmatched = [p for p in patterns if not any(fnmatch.fnmatch(f, p) for f in files)]
    if unmatched:
        raise DownloadError(
            f"{folder}: nothing downloaded for pattern(s) {', '.join(unmatched)}; "
            f"the repository layout of {repo_id} may have changed"
        )
    entries = []
    for rel in files:
        path = folder / rel
        entries.append({"path": rel, "size": path.stat().st_size, "sha256": hw.sha256_file(path)})
        logger.debug("hashed %s", rel)
    manifest = {
        "format": hw.DOWNLOAD_MANIFEST_FORMAT,
        "format_version": hw.FORMAT_VERSION,
        "repo_id": repo_id,
        "revision": revision or "main",
        "allow_patterns": list(patterns),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "files": entries,
        "removed_after_conversion": [],
    }
    manifest_path = folder / hw.DOWNLOAD_MANIFEST
    hw.write_json_atomic(manifest_path, manifest)
    hw.write_json_atomic(
        folder / hw.DOWNLOAD_MARKER,
        {"completed": manifest["created"], "manifest_sha256": hw.sha256_file(manifest_path), "files": len(entries)},
    )
    return manifest


def _snapshot_folder(target: Path, hf_cache: bool, repo_id: str, revision: str | None) -> Path | None:
    if not hf_cache:
        return target
    return hw.resolve_snapshot(hw.hf_cache_repo_dir(target, repo_id), revision)


def download_weights(
    target: str | os.PathLike[str],
    *,
    repo_id: str = hw.HALLO3_REPO_ID,
    revision: str | None = None,
    allow_patterns: Sequence[str] = INFERENCE_ALLOW_PATTERNS,
    token: Token | None = None,
    hf_cache: bool = False,
    verify: str = "size",
    repair: bool = False,
    max_workers: int = 8,
    snapshot_download: SnapshotDownload | None = None,
) -> DownloadResult:
    """Download (or verify) the inference files into ``target``; see the module docstring.

    ``verify`` is ``"size"`` or ``"sha256"``: how a completed folder is checked on a re-run.
    ``snapshot_download`` defaults to ``huggingface_hub.snapshot_download`` (tests pass a stand-in).
    """
    if verify not in ("size", "sha256"):
        raise ValueError("verify must be 'size' or 'sha256'")
    start = time.perf_counter()
    target = Path(target)
    token = token or Token(None, "none (anonymous download)")

    folder = _snapshot_folder(target, hf_cache, repo_id, revision)
    if folder is not None and (folder / hw.DOWNLOAD_MARKER).is_file() and not repair:
        try:
            checked = hw.verify_download_manifest(folder, check_hashes=verify == "sha256")
        except hw.WeightsError as exc:
            raise DownloadError(f"verification failed: {exc}. Run again with --repair to fetch the damaged files.") from exc
        total = sum(size for _, size in checked)
        logger.info("%s: complete, %d files (%.2f GB) verified by %s; nothing downloaded", folder, len(checked), total / 1e9, verify)
        return DownloadResult(folder, "verified", len(checked), total, time.perf_counter() - start)

    if snapshot_download is None:
        from huggingface_hub import snapshot_download as hf_snapshot_download

        snapshot_download = hf_snapshot_download
    if folder is not None:
        marker = folder / hw.DOWNLOAD_MARKER
        if marker.exists():
            marker.unlink()  # incomplete until the new manifest is written
    target.mkdir(parents=True, exist_ok=True)
    logger.info(
        "downloading %s (revision %s) into %s%s; token: %s",
        repo_id,
        revision or "main",
        target,
        " (Hugging Face cache layout)" if hf_cache else "",
        token.source,
    )
    kwargs: dict[str, Any] = {
        "repo_id": repo_id,
        "revision": revision,
        "allow_patterns": list(allow_patterns),
        "token": token.value,
        "max_workers": max_workers,
    }
    kwargs["cache_dir" if hf_cache else "local_dir"] = str(target)
    try:
        returned = snapshot_download(**kwargs)
    except Exception as exc:  # network, auth, disk: report without the token
        raise DownloadError(f"download of {repo_id} failed: {type(exc).__name__}: {exc}") from exc
    folder = Path(returned) if hf_cache else target
    manifest = write_manifest(folder, repo_id, revision, allow_patterns)
    total = sum(e["size"] for e in manifest["files"])
    logger.info("%s: %d files, %.2f GB, manifest and completion marker written", folder, len(manifest["files"]), total / 1e9)
    return DownloadResult(folder, "repaired" if repair else "downloaded", len(manifest["files"]), total, time.perf_counter() - start)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Download the Hallo3 inference weights (resumable, verified).",
    )
    parser.add_argument("--target", type=Path, help="destination folder (for --hf-cache: the cache root)")
    parser.add_argument("--hf-cache", action="store_true", help="use the Hugging Face cache layout (models--org--name/snapshots/<hash>)")
    parser.add_argument("--repo-id", default=hw.HALLO3_REPO_ID, help=f"default {hw.HALLO3_REPO_ID}")
    parser.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")
    parser.add_argument("--token-file", type=Path, default=None, help=f"file holding a Hugging Face token (default: {DEFAULT_SECRET_FILE} if present, else $HF_TOKEN)")
    parser.add_argument("--verify", choices=("size", "sha256"), default="size", help="how a completed folder is checked again (default: size)")
    parser.add_argument("--repair", action="store_true", help="download again whatever is missing or changed")
    parser.add_argument("--max-workers", type=int, default=8, help="parallel file downloads (default: 8)")
    parser.add_argument("--list-patterns", action="store_true", help="print the allow-patterns and exit")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="default INFO")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list_patterns:
        print("\n".join(INFERENCE_ALLOW_PATTERNS))
        return 0
    if args.target is None:
        parser.error("--target is required")
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = download_weights(
            args.target,
            repo_id=args.repo_id,
            revision=args.revision,
            token=resolve_token(args.token_file),
            hf_cache=args.hf_cache,
            verify=args.verify,
            repair=args.repair,
            max_workers=args.max_workers,
        )
    except (DownloadError, hw.WeightsError, OSError) as exc:
        logger.error("%s", exc)
        return 1
    print(json.dumps(result.as_dict(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
