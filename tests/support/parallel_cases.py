"""What each spawned rank runs in tests/parallel: the guided model function, serial and parallel.

:func:`forward_world` is the body of every rank of one ``torch.multiprocessing.spawn``: it joins
a gloo world, then for every layout and every case rank 0 drives the parallel model function
(:class:`~hallo3_worker.parallel.denoise.ParallelDenoiser`) while the others follow
(:func:`~hallo3_worker.parallel.denoise.serve`), exactly as in the worker. Rank 0 compares with
the serial :func:`~hallo3_worker.denoiser.guidance_model_fn` and writes the errors to a JSON file.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import golden_recipes
import torch
from safetensors.torch import load_file

from hallo3_worker.denoiser import SegmentConditions, guidance_model_fn
from hallo3_worker.models import checkpoint as ck
from hallo3_worker.models import presets
from hallo3_worker.models.audio_proj import AudioProjConfig
from hallo3_worker.models.face_proj import FaceProjConfig
from hallo3_worker.models.layers import fuse_projections
from hallo3_worker.models.loading import build_on_meta, load_converted, materialize_random
from hallo3_worker.models.transformer import Hallo3Transformer, TransformerConfig
from hallo3_worker.parallel.denoise import ParallelDenoiser, serve
from hallo3_worker.parallel.group import init_rank, leave, make_context
from hallo3_worker.parallel.layout import ParallelLayout
from hallo3_worker.sampling import SamplerConfig, Schedule, guided_x0, injected_noise, sample

GOLDEN = Path(__file__).resolve().parents[1] / "goldens" / "denoiser"
CPU = torch.device("cpu")


def small_config() -> TransformerConfig:
    """12 heads (Ulysses 2, 3, 4, 6 divide them) and 3 x 35 video tokens, so every split is uneven
    and crosses latent frames (2 ranks: 53 + 52 tokens, 4 ranks: 27 + 26 + 26 + 26)."""
    return TransformerConfig(
        num_layers=2, hidden_size=192, num_heads=12, time_embed_dim=32, text_dim=32, text_length=7,
        latent_frames=3, latent_height=10, latent_width=14,
        audio=AudioProjConfig(window=5, feature_layers=2, feature_dim=16, hidden_dim=32, tokens=4, token_dim=16),
        face=FaceProjConfig(embed_dim=512, tokens=4, token_dim=32),
    )  # fmt: skip


def _small_case(fused: bool):
    c = small_config()
    transformer = materialize_random(build_on_meta(lambda: Hallo3Transformer(c)), CPU, seed=0)
    g = torch.Generator().manual_seed(1)
    conditions = SegmentConditions(
        concat=torch.randn(1, c.latent_frames, 16, c.latent_height, c.latent_width, generator=g),
        text=torch.randn(1, c.text_length, c.text_dim, generator=g),
        audio_features=torch.randn(1, 4 * (c.latent_frames - 1) + 1, 5, 2, 16, generator=g),
        face_embedding=torch.randn(1, 512, generator=g),
    )
    reference = [torch.randn(1, 35, c.hidden_size, generator=g) for _ in range(c.num_layers)]
    x = torch.randn(1, c.latent_frames, 16, c.latent_height, c.latent_width, generator=g)
    if fused:  # what the worker runs: fused projections, reference keys/values made once per job
        fuse_projections(transformer)
        with torch.no_grad():
            reference = transformer.reference_kv(reference)
    return transformer, conditions, reference, x, None


def _golden_case():
    upstream = golden_recipes.upstream_state_dict("denoiser")
    transformer = build_on_meta(lambda: Hallo3Transformer(presets.golden_tiny_transformer()))
    rules = ck.transformer_key_rules(transformer.config)
    load_converted(transformer, ck.convert_state_dict(upstream, ck.MAIN_PREFIX, rules, transformer))
    inputs = golden_recipes.denoiser_inputs()
    outputs = load_file(GOLDEN / "outputs.safetensors")
    conditions = SegmentConditions(inputs["concat"], inputs["context"], inputs["audio"], inputs["face"])
    reference = [outputs[f"ref_bank.{i}"] for i in range(transformer.config.num_layers)]
    return transformer, conditions, reference, inputs["x"], inputs["timestep"]


CASES = {"small": lambda: _small_case(False), "small_fused_kv": lambda: _small_case(True), "golden": _golden_case}


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def forward_world(rank: int, world: int, port: int, layouts: list[str], cases: list[str], out: str) -> None:
    """One rank of a spawned world: every case under every layout (``"2x1"`` style names)."""
    torch.set_num_threads(1)
    parsed = [ParallelLayout(*map(int, name.split("x"))) for name in layouts]
    contexts = [init_rank(rank, parsed[0], CPU, port=port, timeout_s=120)]
    contexts += [make_context(rank, layout, CPU, 120) for layout in parsed[1:]]
    results: dict[str, dict[str, float]] = {}
    built = {name: CASES[name]() for name in cases}
    with torch.inference_mode():
        for layout, context in zip(layouts, contexts):
            for name, (transformer, conditions, reference, x, t) in built.items():
                if rank != 0:
                    serve(context, transformer)
                    continue
                results[f"{layout}/{name}"] = _drive(context, transformer, conditions, reference, x, t, name)
    if rank == 0:
        Path(out).write_text(json.dumps(results, indent=1))
    leave()


def _drive(context, transformer, conditions, reference, x, t, name: str) -> dict[str, float]:
    """Rank 0: one guided forward (and for the golden case the sampler's first x0), parallel vs serial."""
    batch = torch.cat([x, x])
    timesteps = (t if t is not None else torch.tensor([500.0])).expand(2).float()
    denoiser = ParallelDenoiser(context, transformer)
    parallel = denoiser.model_fn(transformer, conditions, copy.copy(reference))
    serial = guidance_model_fn(transformer, conditions, reference)
    v_parallel, v_serial = parallel(batch, timesteps), serial(batch, timesteps)
    result = {"vs_serial": relative_error(v_parallel, v_serial),
              "halves_differ": relative_error(v_serial[0], v_serial[1])}
    if name == "golden":
        outputs = load_file(GOLDEN / "outputs.safetensors")
        tables = golden_recipes.denoiser_sampler()
        result["vs_golden"] = relative_error(v_parallel, outputs["dit_out"])
        schedule = Schedule.create(SamplerConfig())
        x0 = guided_x0(parallel, tables["x_T"], schedule.sqrt_alphas[0], schedule.timesteps[0], schedule, 3.5)
        result["step0_vs_golden"] = relative_error(x0, tables["denoised_step_0"])
        final = sample(parallel, tables["x_T"], SamplerConfig(), injected_noise(golden_recipes.upstream_step_noise(tables)),
                       schedule=schedule)
        result["trajectory_vs_golden"] = relative_error(final, tables["final"])
    denoiser.stop()
    return result
