"""Building the networks on ``meta`` and filling them (:func:`load_networks`): every key and shape is checked
against the file before any data is read; tensors are assigned (``assign=True``) in their stored dtype unless
another is asked for, cast tensor by tensor on the target device. Files are found, checked and read elsewhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from hallo3_worker.models import checkpoint as ck
from hallo3_worker.models import presets
from hallo3_worker.models.loading import build_on_meta
from hallo3_worker.models.reference_net import ReferenceNet, ReferenceNetConfig
from hallo3_worker.models.transformer import Hallo3Transformer, TransformerConfig
from hallo3_worker.weights.formats import (
    COMPONENTS, REFERENCE_NET, TRANSFORMER, VAE, SatCheckpoint, WeightsError, config_from_dict, logger, read_sat_checkpoint,
    read_sat_vae_state_dict,
)
from hallo3_worker.weights.locate import WeightsLocation
from hallo3_worker.weights.verify import VerificationReport, read_converted_manifest, verify_weights

if TYPE_CHECKING:  # diffusers is slow to import; only the VAE path needs it
    from hallo3_worker.models.vae import Hallo3VAE, VaeConfig


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
