"""Speed presets: the step cache, the fp8 twins, CFG truncation and the fallbacks, on tiny networks."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from media_files import write_speech

from hallo3_worker import presets as presets_module
from hallo3_worker.interface import GenerationRequest, Preset
from hallo3_worker.models.attention import choose_backend
from hallo3_worker.models.loading import build_on_meta, materialize_random
from hallo3_worker.models.quantize import Fp8Linears, SimulatedFp8Linear, convertible, fp8_unavailable
from hallo3_worker.models.step_cache import attach_step_cache, detach_step_cache
from hallo3_worker.models.transformer import Hallo3Transformer
from hallo3_worker.presets import PresetPlan
from hallo3_worker.tiny import build_tiny_pipeline, tiny_transformer_config

ASSETS = Path(__file__).resolve().parent / "assets"
STEPS = 6

# ------------------------------------------------------------------------ tiny transformer


def _transformer(layers: int = 3) -> Hallo3Transformer:
    config = dataclasses.replace(tiny_transformer_config(), num_layers=layers, latent_frames=3)
    return materialize_random(build_on_meta(lambda: Hallo3Transformer(config), torch.float32), torch.device("cpu"),
                              seed=3)


def _inputs(model: Hallo3Transformer, batch: int = 2, seed: int = 0) -> dict:
    c, g = model.config, torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, c.latent_frames, c.in_channels, c.latent_height, c.latent_width, generator=g),
        text=torch.randn(batch, c.text_length, c.text_dim, generator=g),
        audio_tokens=torch.randn(batch, c.latent_frames, c.audio.tokens, c.audio.token_dim, generator=g),
        face_tokens=torch.randn(batch, c.face.tokens, c.face.token_dim, generator=g),
        reference=[torch.randn(1, 24, c.hidden_size, generator=g) for _ in range(c.num_layers)],
    )


def _step(model: Hallo3Transformer, inputs: dict, t: float, nudge: float = 0.0) -> torch.Tensor:
    batch = inputs["hidden_states"].shape[0]
    args = dict(inputs, hidden_states=inputs["hidden_states"] + nudge)
    return model(timesteps=torch.full((batch,), t), **args)


class Calls:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self, *args) -> None:
        self.count += 1


@torch.inference_mode()
def test_a_cache_that_never_reuses_gives_the_plain_outputs_bit_for_bit() -> None:
    model = _transformer()
    inputs = _inputs(model)
    steps = ((999, 0.0), (800, 0.01), (600, 0.02), (400, 0.03))
    plain = [_step(model, inputs, t, nudge) for t, nudge in steps]
    cache = attach_step_cache(model.blocks)
    assert attach_step_cache(model.blocks) is cache  # attaching twice is harmless
    cache.begin(1e-12)
    for i, ((t, nudge), expected) in enumerate(zip(steps, plain)):
        cache.next_step(force=i in (0, 3))
        assert torch.equal(_step(model, inputs, t, nudge), expected)
    assert cache.reused_steps == 0 and cache.full_steps == 4
    cache.end()
    detach_step_cache(model.blocks)
    assert type(model.blocks[0]).__name__ == "Hallo3Block" and "_step_cache" not in vars(model.blocks[0])


@torch.inference_mode()
def test_steps_below_the_threshold_skip_the_body_except_the_forced_ones() -> None:
    model = _transformer()
    inputs = _inputs(model)
    middle, last = Calls(), Calls()
    model.blocks[1].register_forward_hook(middle)
    model.blocks[2].register_forward_hook(last)
    cache = attach_step_cache(model.blocks)
    full = _step(model, inputs, 500)  # inactive: the plain forward
    cache.begin(0.5)
    outputs = []
    for i in range(4):  # the same input every step: block 0's residual does not change
        cache.next_step(force=i in (0, 3))
        outputs.append(_step(model, inputs, 500))
        assert cache.reuse == (i in (1, 2))
    assert (middle.count, last.count) == (1 + 2, 1 + 2)  # the inactive forward, then steps 0 and 3
    assert cache.reused_steps == 2
    for out in outputs:  # reusing the residual of an identical step gives the same output (up to rounding)
        torch.testing.assert_close(out, full, rtol=1e-5, atol=1e-5)

    cache.begin(0.5)  # a new segment starts empty: a step that is not forced still runs in full
    cache.next_step(force=False)
    _step(model, inputs, 500)
    assert not cache.reuse
    cache.next_step(force=False)
    _step(model, _inputs(model, batch=1), 500)  # a smaller batch (guidance truncated) runs in full
    assert not cache.reuse
    cache.end()


@torch.inference_mode()
def test_a_large_change_of_the_first_block_residual_recomputes() -> None:
    model = _transformer(layers=2)
    inputs = _inputs(model)
    cache = attach_step_cache(model.blocks)
    cache.begin(0.01)
    cache.next_step(force=True)
    _step(model, inputs, 999)
    cache.next_step()
    _step(model, inputs, 999, nudge=0.5)
    assert not cache.reuse and cache.reused_steps == 0


# ------------------------------------------------------------------------------- fp8 twins


def test_fp8_needs_a_recent_cuda_gpu() -> None:
    reason = fp8_unavailable(torch.device("cpu"), torch.float32)
    assert reason is not None and "CUDA GPU of compute capability 8.9" in reason and "cpu" in reason


@torch.inference_mode()
def test_fp8_twins_switch_on_per_job_and_leave_the_exact_layers_as_they_were() -> None:
    model = _transformer(layers=2)
    inputs = _inputs(model)
    keys = set(model.state_dict())
    before = _step(model, inputs, 700)
    fp8 = Fp8Linears(model.blocks, SimulatedFp8Linear)
    with fp8.enabled():
        approximate = _step(model, inputs, 700)
    after = _step(model, inputs, 700)
    assert fp8.converted > 0 and set(model.state_dict()) == keys  # the twins are not state
    assert not any(convertible(name, m) for name, m in model.named_modules() if "modulation" in name)
    assert torch.equal(after, before)
    assert not torch.equal(approximate, before)
    relative = (approximate - before).norm() / before.norm()
    assert relative < 0.1, relative


def test_a_failed_conversion_leaves_no_layer_half_converted() -> None:
    model = _transformer(layers=2)
    made = []

    def fail_on_the_third(linear):
        if len(made) == 2:
            raise RuntimeError("no kernel")
        made.append(linear)
        return SimulatedFp8Linear(linear)

    with pytest.raises(RuntimeError):
        Fp8Linears(model.blocks, fail_on_the_third).prepare()
    assert not any(type(m).__name__.startswith("Fp8Switched") for m in model.modules())


def test_fp8_copies_that_cannot_be_made_fall_back_with_the_reason_and_are_not_retried(monkeypatch) -> None:
    calls = []

    def broken(linear):
        calls.append(linear)
        raise RuntimeError("no kernel")

    monkeypatch.setattr(presets_module, "fp8_unavailable", lambda device, dtype: None)
    speed_presets = presets_module.SpeedPresets(_transformer(layers=2), torch.device("cpu"), torch.float32,
                                                make_twin=broken)
    request = GenerationRequest(image_path=Path("face.jpg"), audio_path=Path("speech.wav"), prompt="", seed=0,
                                preset=Preset.BALANCED)
    for _ in range(2):
        with speed_presets.job(request) as speed:
            assert speed.warnings[0] == ("Preset 'balanced': fp8 linear layers fell back to the exact float32 "
                                         "layers: making them failed (RuntimeError: no kernel).")
    assert len(calls) == 1


def test_the_8bit_attention_backend_is_refused_without_a_cuda_gpu() -> None:
    with pytest.raises(ValueError, match="sage"):
        choose_backend("sage", torch.device("cpu"))


def test_cfg_steps() -> None:
    assert PresetPlan(Preset.FAST, 0.1, 0.6).cfg_steps(50) == 30
    assert PresetPlan(Preset.FAST, 0.1, 0.6).cfg_steps(6) == 4
    assert PresetPlan(Preset.FAST, 0.1, 0.4).cfg_steps(2) == 1
    assert PresetPlan().cfg_steps(7) == 7


# -------------------------------------------------------------------------- the pipeline


@pytest.fixture(scope="module")
def pipeline():
    return build_tiny_pipeline()


@pytest.fixture(scope="module")
def speech_1s(tmp_path_factory) -> Path:
    return write_speech(tmp_path_factory.mktemp("audio") / "speech_1s.wav", 1.0)


def _generate(pipeline, audio: Path, **kw):
    request = GenerationRequest(image_path=ASSETS / "face.jpg", audio_path=audio, prompt="A person is talking.",
                                seed=4, steps=STEPS, separate_vocals=False, **kw)
    return pipeline.generate(pipeline.prepare(request))


@pytest.fixture(scope="module")
def exact(pipeline, speech_1s):
    return _generate(pipeline, speech_1s)


def test_fast_without_caching_or_truncation_equals_exact_and_says_what_fell_back(pipeline, speech_1s, exact) -> None:
    fast = _generate(pipeline, speech_1s, preset=Preset.FAST, cache_threshold=0.0, cfg_fraction=1.0)
    assert np.array_equal(fast.frames, exact.frames)  # bit for bit, on the CPU where fp8/8-bit fall back
    assert (exact.preset, exact.denoiser_forwards, exact.cached_steps, exact.cond_only_steps) == (
        Preset.EXACT, STEPS, 0, 0)
    assert exact.warnings == []
    assert fast.preset is Preset.FAST and fast.denoiser_forwards == STEPS
    assert len(fast.warnings) == 2
    assert "fp8 linear layers fell back to the exact float32 layers" in fast.warnings[0]
    assert "8-bit attention (SageAttention) fell back to the exact 'sdpa' attention" in fast.warnings[1]


def test_fast_counts_truncated_and_cached_steps(pipeline, speech_1s) -> None:
    fast = _generate(pipeline, speech_1s, preset=Preset.FAST, cache_threshold=0.3, cfg_fraction=0.5)
    assert fast.cond_only_steps == STEPS - 3
    assert fast.cached_steps > 0
    assert fast.denoiser_forwards + fast.cached_steps == STEPS
    assert fast.frames.shape == (25, 480, 480, 3)
    assert not pipeline.presets.cache.active  # closed with the job


def test_balanced_runs_the_fp8_layers_where_they_exist(pipeline, speech_1s, exact, monkeypatch) -> None:
    monkeypatch.setattr(presets_module, "fp8_unavailable", lambda device, dtype: None)
    monkeypatch.setattr(pipeline.presets.fp8, "make_twin", SimulatedFp8Linear)
    balanced = _generate(pipeline, speech_1s, preset=Preset.BALANCED)
    assert balanced.warnings == [
        "Preset 'balanced': 8-bit attention (SageAttention) fell back to the exact 'sdpa' attention: it needs a "
        "CUDA GPU; the networks run on the cpu."]  # the fp8 layers ran
    assert pipeline.presets.fp8.converted > 0 and not pipeline.presets.fp8.switch.on
    assert not np.array_equal(balanced.frames, exact.frames)
