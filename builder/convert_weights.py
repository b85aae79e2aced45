#!/usr/bin/env python3
"""Convert the Hallo3 SAT checkpoints into per-network safetensors files in this package's names.

Reads, from a weights folder in the Hugging Face repository's layout:

* ``hallo3/<latest>/mp_rank_00_model_states.pt``: the DeepSpeed/SAT checkpoint (``module`` plus
  bookkeeping). Only ``model.diffusion_model.*`` (main transformer) and
  ``ref_model.diffusion_model.*`` (reference network) are used; ``conditioner.*`` and
  ``first_stage_model.*`` are ignored.
* ``cogvideox-5b-i2v-sat/vae/3d-vae.pt`` (``state_dict``): the CogVideoX VAE.

Writes ``<output>/transformer.safetensors`` and ``reference_net.safetensors`` (bfloat16 by default),
``vae.safetensors`` (stored precision by default) and ``hallo3-converted.json`` (configs, dtypes,
sizes, SHA-256, sources). The key mapping is strict: a missing, unexpected or mis-shaped tensor
stops the conversion with the file and keys named.

Memory: the checkpoints are memory-mapped (``torch.load(mmap=True)``), and each output file is
streamed one tensor at a time, so the peak is about one tensor (the largest, the audio projector's
1-D convolution, is 2.4 GB in bfloat16), never a copy of a whole network. Nothing from
SwissArmyTransformer or DeepSpeed is imported.

Usage::

    python builder/convert_weights.py --weights-dir /runpod-volume/hallo3
    python builder/convert_weights.py --weights-dir /opt/hallo3/weights --delete-sources
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import struct
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

try:
    import hallo3_worker  # noqa: F401  (installed package)
except ImportError:  # a plain checkout: use the sources next to this folder
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import torch

from hallo3_worker import weights as hw
from hallo3_worker.models import checkpoint as ck
from hallo3_worker.models import presets
from hallo3_worker.models.reference_net import ReferenceNetConfig
from hallo3_worker.models.transformer import TransformerConfig

logger = logging.getLogger("hallo3.convert_weights")

# safetensors dtype names (https://github.com/huggingface/safetensors, format description).
_ST_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}


@dataclasses.dataclass(frozen=True)
class WrittenFile:
    path: Path
    size: int
    sha256: str | None
    tensors: int
    dtypes: dict[str, int]


def write_safetensors_streaming(
    path: Path,
    tensors: Mapping[str, torch.Tensor],
    *,
    dtype: torch.dtype | None = None,
    metadata: Mapping[str, str] | None = None,
    compute_sha256: bool = True,
    check_finite: bool = False,
) -> WrittenFile:
    """Write a safetensors file one tensor at a time.

    ``safetensors.torch.save_file`` needs every tensor contiguous and in memory at once (and rejects
    views sharing storage, such as the Q/K/V slices of one fused weight), which for a memory-mapped
    17 GB network means either a full copy or a failure. This writer produces the same format
    (8-byte little-endian header length, JSON header padded with spaces to 8 bytes, then the data
    in header order) from each tensor in turn: floating tensors are cast to ``dtype`` (when given)
    and made contiguous right before being written, then dropped. Tensors are laid out largest
    element size first, so every tensor is aligned to its element size. The file is written to
    ``<path>.partial`` and renamed when complete; the SHA-256 is computed while writing.
    """
    def target_dtype(t: torch.Tensor) -> torch.dtype:
        return dtype if dtype is not None and t.is_floating_point() else t.dtype

    order = sorted(tensors, key=lambda k: -target_dtype(tensors[k]).itemsize)  # stable: keeps given order within a size
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    dtypes: dict[str, int] = {}
    for key in order:
        t = tensors[key]
        td = target_dtype(t)
        if td not in _ST_DTYPES:
            raise ValueError(f"{key}: dtype {td} cannot be stored in safetensors")
        nbytes = t.numel() * td.itemsize
        header[key] = {"dtype": _ST_DTYPES[td], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
        name = hw.dtype_name(td)
        dtypes[name] = dtypes.get(name, 0) + 1
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)

    digest = hashlib.sha256() if compute_sha256 else None
    partial = path.with_name(path.name + ".partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(partial, "wb") as out:
        for chunk in (struct.pack("<Q", len(header_bytes)), header_bytes):
            out.write(chunk)
            if digest is not None:
                digest.update(chunk)
        for key in order:
            t = tensors[key].detach()
            td = target_dtype(t)
            data = t.to(device="cpu", dtype=td).contiguous()
            if check_finite and data.is_floating_point() and not bool(torch.isfinite(data).all()):
                raise ValueError(f"{key}: holds NaN or infinite values")
            raw = data.reshape(-1).view(torch.uint8).numpy()
            out.write(raw)
            if digest is not None:
                digest.update(raw)
            del data, raw
    os.replace(partial, path)
    return WrittenFile(path, path.stat().st_size, digest.hexdigest() if digest else None, len(order), dtypes)


# --------------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------------

PRESETS: dict[str, Callable[[], tuple[TransformerConfig, ReferenceNetConfig, Any]]] = {}


def _full_preset() -> tuple[TransformerConfig, ReferenceNetConfig, Any]:
    from hallo3_worker.models.vae import COGVIDEOX_5B_VAE

    return presets.full_transformer(), presets.full_reference_net(), COGVIDEOX_5B_VAE


def _golden_tiny_preset() -> tuple[TransformerConfig, ReferenceNetConfig, Any]:
    from hallo3_worker.models.vae import TINY_VAE

    return presets.golden_tiny_transformer(), presets.golden_tiny_reference_net(), TINY_VAE


PRESETS["full"] = _full_preset
PRESETS["golden_tiny"] = _golden_tiny_preset


def _source_entry(root: Path, path: Path) -> dict[str, Any]:
    try:
        rel = str(path.relative_to(root))
    except ValueError:
        rel = str(path)
    return {"path": rel, "size": path.stat().st_size}


def _up_to_date(output_dir: Path, configs: Mapping[str, Any], sources: Mapping[str, dict[str, Any]]) -> bool:
    """True when ``output_dir`` already holds a complete conversion of these sources and configs."""
    if not (output_dir / hw.CONVERTED_MANIFEST).is_file():
        return False
    try:
        manifest = hw.read_converted_manifest(output_dir)
        hw.verify_converted(output_dir, configs)
    except hw.WeightsError as exc:
        logger.info("existing conversion is not usable (%s); converting again", exc)
        return False
    for name, config in configs.items():
        if manifest["components"][name].get("config") != json.loads(json.dumps(hw.config_to_dict(config))):
            logger.info("%s was converted with another config; converting again", name)
            return False
    recorded = manifest.get("sources", {})
    for name, entry in sources.items():
        old = recorded.get(name)
        if old is None or old.get("size") != entry["size"]:
            logger.info("source %s changed since the last conversion; converting again", entry["path"])
            return False
    return True


def convert(
    weights_dir: str | os.PathLike[str],
    output_dir: str | os.PathLike[str] | None = None,
    *,
    transformer_config: TransformerConfig | None = None,
    reference_config: ReferenceNetConfig | None = None,
    vae_config: Any = None,
    components: Sequence[str] = hw.COMPONENTS,
    dit_dtype: torch.dtype | None = torch.bfloat16,
    vae_dtype: torch.dtype | None = None,
    sat_checkpoint: str | os.PathLike[str] | None = None,
    sat_vae: str | os.PathLike[str] | None = None,
    force: bool = False,
    delete_sources: bool = False,
    check_finite: bool = False,
    compute_sha256: bool = True,
) -> dict[str, Any]:
    """Convert the checkpoints in ``weights_dir``; returns the written description (see module doc).

    Configs default to the released checkpoint's. ``dit_dtype``/``vae_dtype`` None keep the stored
    dtype. An existing, complete conversion of the same sources is kept unless ``force``.
    ``delete_sources`` removes the two source checkpoints afterwards (for a baked image, where only
    the converted files are needed) and records that in the download manifest.
    """
    root = Path(weights_dir)
    out = Path(output_dir) if output_dir is not None else root / hw.CONVERTED_DIRNAME
    components = tuple(dict.fromkeys(components))
    unknown = sorted(set(components) - set(hw.COMPONENTS))
    if unknown:
        raise ValueError(f"unknown component(s) {unknown}; choose from {hw.COMPONENTS}")
    t_cfg = transformer_config or presets.full_transformer()
    r_cfg = reference_config or presets.full_reference_net()
    v_cfg = vae_config
    if v_cfg is None and hw.VAE in components:
        from hallo3_worker.models.vae import COGVIDEOX_5B_VAE

        v_cfg = COGVIDEOX_5B_VAE
    configs = {hw.TRANSFORMER: t_cfg, hw.REFERENCE_NET: r_cfg, hw.VAE: v_cfg}

    needs_dit = hw.TRANSFORMER in components or hw.REFERENCE_NET in components
    ckpt_path = Path(sat_checkpoint) if sat_checkpoint else (root / hw.sat_checkpoint_relpath(root) if needs_dit else None)
    vae_path = Path(sat_vae) if sat_vae else root / hw.SAT_VAE
    sources: dict[str, dict[str, Any]] = {}
    if needs_dit:
        hw.check_file(ckpt_path)
        sources["checkpoint"] = _source_entry(root, ckpt_path)
    if hw.VAE in components:
        hw.check_file(vae_path)
        sources["vae"] = _source_entry(root, vae_path)

    if not force and _up_to_date(out, {c: configs[c] for c in components}, sources):
        logger.info("%s already holds a complete conversion; nothing to do (use --force to redo)", out)
        manifest = hw.read_converted_manifest(out)
        manifest["skipped"] = True
        _maybe_delete_sources(root, delete_sources, ckpt_path if needs_dit else None, vae_path if hw.VAE in components else None)
        return manifest

    out.mkdir(parents=True, exist_ok=True)
    stale = out / hw.CONVERTED_MANIFEST
    if stale.exists():
        stale.unlink()  # the description is written last: its presence means "complete"
    started = time.perf_counter()
    result: dict[str, Any] = {
        "format": hw.CONVERTED_FORMAT,
        "format_version": hw.FORMAT_VERSION,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "sources": sources,
        "components": {},
    }

    if needs_dit:
        sat = hw.read_sat_checkpoint(ckpt_path)
        result["sources"]["checkpoint"].update(
            load_mode=sat.load_mode,
            fallback_reason=sat.fallback_reason,
            bookkeeping_keys=list(sat.bookkeeping_keys),
            ignored_keys=sat.ignored_key_counts,
        )
        jobs = []
        if hw.TRANSFORMER in components:
            jobs.append((hw.TRANSFORMER, ck.MAIN_PREFIX, t_cfg, hw.build_transformer(t_cfg), ck.transformer_key_rules(t_cfg)))
        if hw.REFERENCE_NET in components:
            jobs.append((hw.REFERENCE_NET, ck.REFERENCE_PREFIX, r_cfg, hw.build_reference_net(r_cfg), ck.reference_key_rules(r_cfg)))
        for name, prefix, config, model, rules in jobs:
            start = time.perf_counter()
            try:
                state = ck.convert_state_dict(sat.module, prefix, rules, model)
            except ck.CheckpointError as exc:
                raise ck.CheckpointError(f"{ckpt_path}: {exc}") from exc
            ordered = {k: state[k] for k in model.state_dict()}  # our parameter order
            written = write_safetensors_streaming(
                out / hw.COMPONENT_FILES[name],
                ordered,
                dtype=dit_dtype,
                metadata={"format": "pt", "component": name},
                compute_sha256=compute_sha256,
                check_finite=check_finite,
            )
            result["components"][name] = _component_entry(name, config, written, sat.dtypes(prefix))
            logger.info("%s: %d tensors, %.2f GB in %.1f s", written.path, written.tensors, written.size / 1e9, time.perf_counter() - start)
            del state, ordered
        del sat

    if hw.VAE in components:
        from hallo3_worker.models.vae import check_vae_state_dict, convert_sat_vae_state_dict

        start = time.perf_counter()
        sat_state, loaded = hw.read_sat_vae_state_dict(vae_path)
        result["sources"]["vae"].update(load_mode=loaded.load_mode, fallback_reason=loaded.fallback_reason)
        try:
            state = convert_sat_vae_state_dict(sat_state, v_cfg.num_levels)
            meta_vae = hw.build_vae_on_meta(v_cfg)
            check_vae_state_dict(meta_vae, state)
        except ValueError as exc:  # VaeCheckpointError
            raise ck.CheckpointError(f"{vae_path}: {exc}") from exc
        stored: dict[str, int] = {}
        for t in sat_state.values():
            stored[hw.dtype_name(t.dtype)] = stored.get(hw.dtype_name(t.dtype), 0) + 1
        ordered = {k: state[k] for k in meta_vae.state_dict()}
        written = write_safetensors_streaming(
            out / hw.COMPONENT_FILES[hw.VAE],
            ordered,
            dtype=vae_dtype,
            metadata={"format": "pt", "component": hw.VAE},
            compute_sha256=compute_sha256,
            check_finite=check_finite,
        )
        result["components"][hw.VAE] = _component_entry(hw.VAE, v_cfg, written, stored)
        logger.info("%s: %d tensors, %.2f GB in %.1f s", written.path, written.tensors, written.size / 1e9, time.perf_counter() - start)
        del sat_state, state, ordered

    result["seconds"] = round(time.perf_counter() - started, 2)
    result = json.loads(json.dumps(result))  # exactly what the JSON file holds (tuples become lists)
    hw.write_json_atomic(out / hw.CONVERTED_MANIFEST, result)
    _maybe_delete_sources(root, delete_sources, ckpt_path if needs_dit else None, vae_path if hw.VAE in components else None)
    return result


def _component_entry(name: str, config: Any, written: WrittenFile, source_dtypes: Mapping[str, int]) -> dict[str, Any]:
    return {
        "file": written.path.name,
        "config": hw.config_to_dict(config),
        "config_class": type(config).__name__,
        "dtypes": written.dtypes,
        "source_dtypes": dict(source_dtypes),
        "tensors": written.tensors,
        "size": written.size,
        "sha256": written.sha256,
    }


def _maybe_delete_sources(root: Path, delete: bool, *paths: Path | None) -> None:
    """Remove converted source checkpoints and record that in the download manifest (if any)."""
    if not delete:
        return
    removed = []
    for path in paths:
        if path is not None and path.exists():
            path.unlink()
            logger.info("deleted source %s", path)
        if path is not None:
            try:
                removed.append(str(path.relative_to(root)))
            except ValueError:
                pass
    manifest_path = root / hw.DOWNLOAD_MANIFEST
    if removed and manifest_path.is_file():
        manifest = hw.read_json(manifest_path)
        already = list(manifest.get("removed_after_conversion") or [])
        manifest["removed_after_conversion"] = sorted(set(already) | set(removed))
        hw.write_json_atomic(manifest_path, manifest)
        marker = root / hw.DOWNLOAD_MARKER
        if marker.is_file():  # keep the marker consistent with the edited manifest
            state = hw.read_json(marker)
            state["manifest_sha256"] = hw.sha256_file(manifest_path)
            hw.write_json_atomic(marker, state)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def _parse_components(text: str) -> tuple[str, ...]:
    items = tuple(c.strip() for c in text.split(",") if c.strip())
    bad = sorted(set(items) - set(hw.COMPONENTS))
    if bad or not items:
        raise argparse.ArgumentTypeError(f"components must be a comma-separated subset of {','.join(hw.COMPONENTS)}")
    return items


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Convert the Hallo3 SAT checkpoints into safetensors files for fast loading.",
    )
    parser.add_argument("--weights-dir", required=True, type=Path, help="folder in the Hugging Face repository's layout")
    parser.add_argument("--output", type=Path, default=None, help="output folder (default: <weights-dir>/converted)")
    parser.add_argument("--components", type=_parse_components, default=hw.COMPONENTS, help="comma-separated subset to convert (default: all three)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full", help="network configs: full (default) or golden_tiny (tests)")
    parser.add_argument("--dit-dtype", default="bfloat16", help="dtype of the two transformers (default bfloat16; 'keep' = as stored)")
    parser.add_argument("--vae-dtype", default="keep", help="dtype of the VAE (default 'keep' = as stored)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="explicit path of mp_rank_00_model_states.pt")
    parser.add_argument("--vae", type=Path, default=None, help="explicit path of 3d-vae.pt")
    parser.add_argument("--force", action="store_true", help="convert even if a complete conversion exists")
    parser.add_argument("--delete-sources", action="store_true", help="delete the two source checkpoints afterwards")
    parser.add_argument("--check-finite", action="store_true", help="fail on NaN/inf values (slower)")
    parser.add_argument("--no-sha256", action="store_true", help="do not record SHA-256 of the outputs")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="default INFO")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t_cfg, r_cfg, v_cfg = PRESETS[args.preset]()
    try:
        result = convert(
            args.weights_dir,
            args.output,
            transformer_config=t_cfg,
            reference_config=r_cfg,
            vae_config=v_cfg,
            components=args.components,
            dit_dtype=hw.parse_dtype(args.dit_dtype),
            vae_dtype=hw.parse_dtype(args.vae_dtype),
            sat_checkpoint=args.checkpoint,
            sat_vae=args.vae,
            force=args.force,
            delete_sources=args.delete_sources,
            check_finite=args.check_finite,
            compute_sha256=not args.no_sha256,
        )
    except (ck.CheckpointError, ValueError, OSError) as exc:
        logger.error("conversion failed: %s", exc)
        return 1
    summary = {
        "output": str(args.output or args.weights_dir / hw.CONVERTED_DIRNAME),
        "skipped": bool(result.get("skipped")),
        "components": {k: {"file": v["file"], "size": v["size"], "dtypes": v["dtypes"]} for k, v in result["components"].items()},
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
