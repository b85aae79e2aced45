"""Seeded tensors of the golden runs, rebuilt from their recipes instead of stored.

Upstream's code ran on random weights and inputs that come from seeded CPU ``torch.Generator``
draws (tests/goldens/README.md). Those tensors are not stored; this module rebuilds them bit for
bit from the recipe each folder's ``weights.json`` records (key order, shape and rule per key, one
generator seed per network) and from the seeds in its ``config.json``. Each rebuilt tensor is
checked against the SHA-256 prefix the generator run recorded, so a drift in the rebuild (another
draw order, another RNG) fails loudly instead of comparing against different weights.
"""

from __future__ import annotations

import functools
import hashlib
import json
import wave
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

GOLDENS = Path(__file__).resolve().parents[1] / "goldens"


def sha256_16(tensor: torch.Tensor) -> str:
    """The first 16 hex digits of the SHA-256 of a tensor's contiguous bytes (the generator's digest)."""
    data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


def _apply_rule(rule: str, z: torch.Tensor) -> torch.Tensor:
    """One key's initialisation from its fp32 draw ``z``; ``rule`` is as the generator logged it."""
    if rule == "0.1*randn":
        return 0.1 * z
    if rule == "1+0.1*randn":
        return 1 + 0.1 * z
    if rule == "randn*0.1":
        return z * 0.1
    if rule.startswith("randn*") and rule.endswith("**-0.5"):
        fan_in = int(rule[len("randn*") : -len("**-0.5")])
        return z * fan_in**-0.5
    raise ValueError(f"unknown initialisation rule {rule!r}")


def _verify(name: str, tensors: dict[str, torch.Tensor], digests: dict[str, str]) -> None:
    wrong = [key for key, value in tensors.items() if key in digests and sha256_16(value) != digests[key]]
    unchecked = [key for key in tensors if key not in digests]
    if wrong or unchecked:
        raise AssertionError(f"{name}: rebuilt tensors differ from the recorded run: {wrong[:5]} "
                             f"(no digest for {unchecked[:5]})")


@functools.cache
def _folder_config(folder: str) -> tuple[dict, dict]:
    root = GOLDENS / folder
    return json.loads((root / "weights.json").read_text()), json.loads((root / "config.json").read_text())


def upstream_state_dict(folder: str) -> dict[str, torch.Tensor]:
    """The engine state dict upstream ran with in ``tests/goldens/<folder>``, rebuilt and verified.

    ``weights.json`` lists, per network (main DiT seed 0, reference DiT seed 1), every key of the
    network's own ``state_dict()`` in sorted order with its shape and rule. Keys whose rule is
    ``kept`` made no draw and hold upstream's computed values, stored in ``kept.safetensors``.
    With ``"dtype": "float16"`` the learned tensors were rounded to fp16 after the draw.
    """
    recipe, config = _folder_config(folder)
    kept_path = GOLDENS / folder / "kept.safetensors"
    kept = load_file(kept_path) if kept_path.exists() else {}
    out: dict[str, torch.Tensor] = {}
    for network in recipe["networks"]:
        names = [name for name, _, _ in network["keys"]]
        if names != sorted(names):
            raise AssertionError(f"{folder}: the recipe's keys must be in sorted order (the draw order)")
        generator = torch.Generator().manual_seed(network["seed"])
        for name, shape, rule in network["keys"]:
            key = network["prefix"] + name
            if rule == "kept":
                out[key] = kept[key]
                continue
            value = _apply_rule(rule, torch.randn(tuple(shape), generator=generator, dtype=torch.float32))
            out[key] = value.to(getattr(torch, recipe.get("dtype", "float32")))
    _verify(f"{folder}/state_dict", out, config["tensor_sha256_16"]["state_dict.safetensors"])
    return out


def denoiser_inputs() -> dict[str, torch.Tensor]:
    """``tests/goldens/denoiser`` inputs: one generator seeded ``seeds.inputs``, in the recorded order."""
    _, config = _folder_config("denoiser")
    g = torch.Generator().manual_seed(config["seeds"]["inputs"])
    latent = (1, 3, 16, 60, 90)
    x = torch.randn(latent, generator=g)
    concat = torch.zeros(latent)
    concat[0, 0] = torch.randn(latent[2:], generator=g)  # the motion latent; later frames stay zero
    inputs = {
        "x": x,
        "concat": concat,
        "ref_latent": torch.randn((1, 1, *latent[2:]), generator=g),
        "context": torch.randn((1, 226, 32), generator=g),
        "audio": torch.randn((1, 9, 5, 2, 16), generator=g),
        "face": torch.randn((1, 512), generator=g) * 5,
        "timestep": torch.tensor([500.0]),
    }
    _verify("denoiser/inputs", inputs, config["tensor_sha256_16"]["inputs.safetensors"])
    return inputs


def denoiser_sampler() -> dict[str, torch.Tensor]:
    """``tests/goldens/denoiser/sampler.safetensors`` plus the seeded initial noise ``x_T``."""
    _, config = _folder_config("denoiser")
    tables = load_file(GOLDENS / "denoiser" / "sampler.safetensors")
    shape = tuple(tables["final"].shape)
    x_t = torch.randn(shape, generator=torch.Generator().manual_seed(config["seeds"]["x_T"]))
    _verify("denoiser/x_T", {"x_T": x_t}, config["tensor_sha256_16"]["sampler.safetensors"])
    return {**tables, "x_T": x_t}


def upstream_step_noise(tables: dict[str, torch.Tensor]) -> torch.Tensor:
    """The noise upstream added at steps 0..48 of the denoiser golden run, rebuilt from its seeded draws.

    Upstream drew 97 tensors from a seed-99 generator (one at step 0, two at each of steps 1-48,
    the first of each pair discarded); the noise added at step k is draw 2k. Every draw is checked
    against the run's per-draw checksums (sum, sum of squares).
    """
    generator = torch.Generator().manual_seed(99)
    shape = tuple(tables["final"].shape)
    draws = [torch.randn(shape, generator=generator) for _ in range(int(tables["all_draws_count"].item()))]
    checksums = torch.tensor([[d.double().sum().item(), d.double().square().sum().item()] for d in draws],
                             dtype=torch.float64)
    torch.testing.assert_close(checksums, tables["all_draws_checksum"], rtol=1e-12, atol=1e-6)
    used = torch.stack(draws[::2])
    if used.shape[0] != 49:
        raise AssertionError(f"expected 49 added noises, rebuilt {used.shape[0]}")
    return used


def read_pcm16_wav(path: Path) -> tuple[np.ndarray, int]:
    """A mono 16-bit WAV as float32 (n,) and its rate, read as libsndfile and librosa read it (x / 32768).

    The standard library's reader, so tests of the goldens run where PyAV and soundfile are not installed.
    """
    with wave.open(str(path)) as wav:
        if wav.getsampwidth() != 2 or wav.getnchannels() != 1:
            raise ValueError(f"{path} is not mono 16-bit PCM")
        pcm = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
        return (pcm.astype(np.float32) / 32768.0).astype(np.float32), wav.getframerate()
