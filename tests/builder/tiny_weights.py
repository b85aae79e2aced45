"""Tiny upstream-format Hallo3 weights for the conversion and loading tests.

:func:`make_tiny_weights` writes a folder in the Hugging Face repository's layout:

* ``hallo3/latest`` + ``hallo3/1/mp_rank_00_model_states.pt``: a DeepSpeed/SAT-style checkpoint
  (``module`` plus bookkeeping keys) holding ``model.diffusion_model.*`` and
  ``ref_model.diffusion_model.*`` for the golden_tiny presets (from randomly materialised networks
  through ``checkpoint.to_upstream_state_dict``), plus ``conditioner.*`` / ``first_stage_model.*``
  keys that must be ignored;
* ``cogvideox-5b-i2v-sat/vae/3d-vae.pt``: ``{"state_dict": ...}`` with the tiny SAT-format VAE of
  ``tests/goldens/vae`` plus a ``loss.*`` key that must be dropped.

:func:`make_tiny_pipeline_weights` writes a complete folder for the pipeline factory instead: the
embedded tiny model's 13-latent-frame networks as ``converted/`` safetensors, with the tiny T5,
wav2vec2 and vocal-separator stand-ins at their real paths.

The networks they were made from are returned, so tests can compare against them directly.
Import it by path (see :func:`load_by_path`); the tests folder is not a package.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from hallo3_worker.models import checkpoint as ck
from hallo3_worker.models import presets
from hallo3_worker.models.loading import build_on_meta, materialize_random
from hallo3_worker.models.reference_net import ReferenceNet
from hallo3_worker.models.transformer import Hallo3Transformer

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY_SAT_VAE = REPO_ROOT / "tests" / "goldens" / "vae" / "tiny_sat_vae.safetensors"
CHECKPOINT_REL = "hallo3/1/mp_rank_00_model_states.pt"
VAE_REL = "cogvideox-5b-i2v-sat/vae/3d-vae.pt"
IGNORED_KEYS = {
    "conditioner.embedders.0.transformer.shared.weight": (8, 4),
    "first_stage_model.encoder.conv_in.conv.weight": (4, 3, 3, 3, 3),
}


def load_by_path(name: str, path: Path) -> types.ModuleType:
    """Import a module from a file (builder scripts and helpers live outside any package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def builder_module(name: str) -> types.ModuleType:
    """``builder/<name>.py`` as a module."""
    return load_by_path(f"hallo3_builder_{name}", REPO_ROOT / "builder" / f"{name}.py")


class FakeSatArgs:
    """Pickled by reference to a module that does not exist at load time (like SAT's own classes)."""

    def __init__(self) -> None:
        self.num_layers = 2
        self.note = "training-only"


@dataclasses.dataclass
class TinyWeights:
    root: Path
    transformer: Hallo3Transformer  # fp32, the source of the checkpoint's main-transformer tensors
    reference_net: ReferenceNet
    upstream: dict[str, torch.Tensor]  # the module dict as saved
    vae_sat_state: dict[str, torch.Tensor]

    @property
    def checkpoint(self) -> Path:
        return self.root / CHECKPOINT_REL

    @property
    def vae(self) -> Path:
        return self.root / VAE_REL


def tiny_networks(seed: int = 0) -> tuple[Hallo3Transformer, ReferenceNet]:
    main = materialize_random(build_on_meta(lambda: Hallo3Transformer(presets.golden_tiny_transformer())), "cpu", seed)
    ref = materialize_random(build_on_meta(lambda: ReferenceNet(presets.golden_tiny_reference_net())), "cpu", seed + 1)
    return main, ref


def make_tiny_weights(root: Path, *, seed: int = 0, exotic_bookkeeping: bool = False, with_vae: bool = True) -> TinyWeights:
    """Write tiny upstream-format weights under ``root`` (see the module docstring).

    ``exotic_bookkeeping`` adds what plain ``weights_only`` loading refuses: numpy RNG state and an
    object of a class from a module (``sat.fake_args``) that is not importable when loading.
    """
    main, ref = tiny_networks(seed)
    upstream = ck.to_upstream_state_dict(main.state_dict(), ck.MAIN_PREFIX, ck.transformer_key_rules(main.config))
    upstream.update(ck.to_upstream_state_dict(ref.state_dict(), ck.REFERENCE_PREFIX, ck.reference_key_rules(ref.config)))
    generator = torch.Generator().manual_seed(seed + 7)
    for key, shape in IGNORED_KEYS.items():
        upstream[key] = torch.randn(shape, generator=generator)

    saved: dict[str, object] = {
        "module": upstream,
        "buffer_names": [],
        "optimizer": None,
        "param_shapes": None,
        "global_steps": 2000,
        "global_samples": 16000,
        "dp_world_size": 8,
        "mp_world_size": 1,
        "skipped_steps": 0,
        "ds_version": "0.14.4",
        "iteration": 2000,
    }
    checkpoint = root / CHECKPOINT_REL
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    (root / "hallo3" / "latest").write_text("1\n", encoding="utf-8")
    if exotic_bookkeeping:
        saved["np_rng_state"] = np.random.RandomState(0).get_state()
        package, fake = types.ModuleType("sat"), types.ModuleType("sat.fake_args")
        package.fake_args = fake  # type: ignore[attr-defined]
        FakeSatArgs.__module__ = "sat.fake_args"
        fake.FakeSatArgs = FakeSatArgs  # type: ignore[attr-defined]
        sys.modules.update({"sat": package, "sat.fake_args": fake})
        try:
            saved["args"] = FakeSatArgs()
            torch.save(saved, checkpoint)
        finally:
            del sys.modules["sat.fake_args"], sys.modules["sat"]
            FakeSatArgs.__module__ = __name__
    else:
        torch.save(saved, checkpoint)

    vae_state: dict[str, torch.Tensor] = {}
    if with_vae:
        vae_state = load_file(str(TINY_SAT_VAE))
        vae_path = root / VAE_REL
        vae_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": {**vae_state, "loss.logvar": torch.zeros(())}, "global_step": 1}, vae_path)
    return TinyWeights(root, main, ref, upstream, vae_state)


def write_aux_files(root: Path) -> list[str]:
    """Small stand-ins for the T5, wav2vec, vocal-separator and face-analysis files."""
    from hallo3_worker import weights as hw

    files = list(hw.AUX_REQUIRED_FILES) + [f"{hw.T5_DIR}/model.safetensors", f"{hw.WAV2VEC_DIR}/model.safetensors"]
    for rel in files:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"stand-in for {rel}\n".encode())
    return files


@torch.no_grad()
def transformer_output(model: Hallo3Transformer, seed: int = 0) -> torch.Tensor:
    """One forward pass of a golden_tiny transformer on fixed random inputs, in its dtype."""
    c = model.config
    dtype = model.pos_embedding.dtype
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, c.latent_frames, c.in_channels, c.latent_height, c.latent_width, generator=g)
    text = torch.randn(1, c.text_length, c.text_dim, generator=g)
    audio = torch.randn(1, 4 * (c.latent_frames - 1) + 1, c.audio.window, c.audio.feature_layers, c.audio.feature_dim, generator=g)
    face = torch.randn(1, c.face.embed_dim, generator=g)
    reference = [torch.randn(1, c.tokens_per_frame, c.hidden_size, generator=g).to(dtype) for _ in range(c.num_layers)]
    audio_tokens, face_tokens = model.encode_conditions(audio.to(dtype), face.to(dtype))
    return model(x.to(dtype), torch.tensor([500.0]), text.to(dtype), audio_tokens, face_tokens, reference)


@torch.no_grad()
def reference_output(model: ReferenceNet, seed: int = 1) -> list[torch.Tensor]:
    c = model.config
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(1, 1, c.in_channels // 2, c.latent_height, c.latent_width, generator=g)
    return model(latent.to(model.pos_embedding.dtype))


@torch.no_grad()
def vae_decode(vae: object, seed: int = 2) -> torch.Tensor:
    """Decode a fixed 3-latent-frame latent with a ``Hallo3VAE``."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 3, 16, 4, 6, generator=g)
    return vae.decode(latents)  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------------------------
# A complete tiny weights folder for the pipeline factory (converted layout)
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TinyPipelineWeights:
    """A weights folder in the real layout holding the embedded tiny model's networks.

    ``transformer``, ``reference_net`` and ``vae`` (diffusers ``AutoencoderKLCogVideoX``) are the
    float32 networks whose tensors were written to ``converted/``.
    """

    root: Path
    transformer: Hallo3Transformer
    reference_net: ReferenceNet
    vae: torch.nn.Module
    vae_config: object
    manifest: dict[str, object]


def make_tiny_pipeline_weights(root: Path, *, seed: int = 0, face_stand_ins: bool = False) -> TinyPipelineWeights:
    """Write the 13-latent-frame tiny model of ``hallo3_worker.tiny`` as a real weights folder.

    * ``converted/{transformer,reference_net,vae}.safetensors`` + ``hallo3-converted.json``, written
      with ``builder/convert_weights.py``'s own writer and manifest entries (float32, as made);
    * ``t5-v1_1-xxl/`` and ``wav2vec/wav2vec2-base-960h/``: the tiny T5 and wav2vec2 of
      ``conditioning.tiny_assets``; ``audio_separator/``: the stand-in MDX model and its metadata;
    * with ``face_stand_ins``, placeholder bytes for the face-analysis files (enough for the size
      checks, not loadable).
    """
    from hallo3_worker import weights as hw
    from hallo3_worker.conditioning.tiny_assets import build_fake_vocal_separator, build_tiny_t5, build_tiny_wav2vec2
    from hallo3_worker.models.vae import TINY_VAE, build_vae
    from hallo3_worker.tiny import tiny_reference_net_config, tiny_transformer_config

    convert = builder_module("convert_weights")
    main = materialize_random(build_on_meta(lambda: Hallo3Transformer(tiny_transformer_config())), "cpu", seed)
    ref = materialize_random(build_on_meta(lambda: ReferenceNet(tiny_reference_net_config())), "cpu", seed + 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # diffusers initialises the VAE from the global generator
        vae = build_vae(TINY_VAE, dtype=torch.float32, device="cpu")

    out = root / hw.CONVERTED_DIRNAME
    components: dict[str, object] = {}
    for name, model, config in (
        (hw.TRANSFORMER, main, main.config),
        (hw.REFERENCE_NET, ref, ref.config),
        (hw.VAE, vae, TINY_VAE),
    ):
        state = model.state_dict()
        written = convert.write_safetensors_streaming(
            out / hw.COMPONENT_FILES[name], state, metadata={"format": "pt", "component": name}
        )
        dtypes: dict[str, int] = {}
        for tensor in state.values():
            dtypes[hw.dtype_name(tensor.dtype)] = dtypes.get(hw.dtype_name(tensor.dtype), 0) + 1
        components[name] = convert._component_entry(name, config, written, dtypes)
    manifest = json.loads(json.dumps({
        "format": hw.CONVERTED_FORMAT,
        "format_version": hw.FORMAT_VERSION,
        "sources": {},
        "components": components,
    }))
    hw.write_json_atomic(out / hw.CONVERTED_MANIFEST, manifest)

    build_tiny_t5(root / hw.T5_DIR, seed=seed)
    build_tiny_wav2vec2(root / hw.WAV2VEC_DIR, seed=seed)
    build_fake_vocal_separator(root / hw.AUDIO_SEPARATOR_DIR)
    if face_stand_ins:
        for rel in hw.AUX_REQUIRED_FILES:
            if rel.startswith(hw.FACE_ANALYSIS_DIR + "/"):
                path = root / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(f"stand-in for {rel}\n".encode())
    return TinyPipelineWeights(root, main, ref, vae, TINY_VAE, manifest)
