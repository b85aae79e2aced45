"""Each exact speed-up computes what the plain networks compute (float32, CPU, <= 1e-5 relative)."""

from __future__ import annotations

import copy

import pytest
import torch

from transformer_inputs import guided_inputs

from hallo3_worker.models import attention, presets
from hallo3_worker.models.layers import fuse_projections
from hallo3_worker.models.loading import build_on_meta, materialize_random
from hallo3_worker.models.reference_net import ReferenceNet
from hallo3_worker.models.speedups import ExactSpeedups, apply_speedups, compile_blocks, warm_up
from hallo3_worker.models.transformer import Hallo3Transformer

CPU = torch.device("cpu")


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


@pytest.fixture(scope="module")
def plain() -> Hallo3Transformer:
    return materialize_random(build_on_meta(lambda: Hallo3Transformer(presets.golden_tiny_transformer())), "cpu", seed=5)


def _inputs(c, seed: int):
    return guided_inputs(c, seed)


@torch.inference_mode()
def _forward(model: Hallo3Transformer, inputs, reference=None) -> torch.Tensor:
    x, t, text, audio, face, tokens = inputs
    return model(x, t, text, *model.encode_conditions(audio, face), tokens if reference is None else reference)


def test_fused_projections_match_the_separate_ones(plain) -> None:
    fused = copy.deepcopy(plain)
    assert fuse_projections(fused) == 3 * plain.config.num_layers
    block, plain_block = fused.blocks[0], plain.blocks[0]
    assert not hasattr(block.attn, "to_q") and block.attn.to_qkv.out_features == 3 * plain.config.hidden_size
    assert torch.equal(block.attn.to_qkv.weight[plain.config.hidden_size:2 * plain.config.hidden_size],
                       plain_block.attn.to_k.weight)
    assert not hasattr(block.audio_attn, "to_k") and block.audio_attn.to_kv is not None
    assert fuse_projections(fused) == 3 * plain.config.num_layers  # fusing twice changes nothing
    for seed in (1, 2):
        inputs = _inputs(plain.config, seed)
        assert relative_error(_forward(fused, inputs), _forward(plain, inputs)) <= 1e-5


def test_fused_reference_network_matches(plain) -> None:
    ref = materialize_random(build_on_meta(lambda: ReferenceNet(presets.golden_tiny_reference_net())), "cpu", seed=6)
    fused = copy.deepcopy(ref)
    fuse_projections(fused)
    latent = torch.randn(1, 1, 16, 60, 90, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for got, expected in zip(fused(latent), ref(latent), strict=True):
            assert relative_error(got, expected) <= 1e-5


@pytest.mark.parametrize("fused", [False, True])
def test_reference_keys_and_values_once_match_the_tokens(plain, fused) -> None:
    model = copy.deepcopy(plain)
    if fused:
        fuse_projections(model)
    inputs = _inputs(plain.config, 3)
    with torch.inference_mode():
        kv = model.reference_kv(inputs[-1])
    nh, dh = plain.config.num_heads, plain.config.head_dim
    assert len(kv) == plain.config.num_layers and kv[0][0].shape == (1, nh, plain.config.tokens_per_frame, dh) == kv[0][1].shape
    expected = _forward(plain, inputs)
    assert relative_error(_forward(model, inputs, reference=kv), expected) <= 1e-5
    # The keys really are what the forward appends: other tokens give another output.
    other = [(k, v * 1000) for k, v in kv]
    assert relative_error(_forward(model, inputs, reference=other), expected) > 1e-3


@pytest.mark.slow
def test_regional_compile_matches_and_compiles_one_graph_for_all_blocks(plain) -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = copy.deepcopy(plain)
    fuse_projections(compiled)
    assert compile_blocks(compiled.blocks) == plain.config.num_layers
    assert compile_blocks(compiled.blocks) == plain.config.num_layers  # compiling again wraps nothing twice
    assert warm_up(compiled, CPU) > 0  # the start-up forward compiles (cold start, not the first job)
    assert counters["stats"]["unique_graphs"] == 1  # both blocks run the one compiled graph
    inputs = _inputs(plain.config, 4)
    with torch.inference_mode():  # as jobs run
        kv = compiled.reference_kv(inputs[-1])
    got = _forward(compiled, inputs, reference=kv)
    assert relative_error(got, _forward(plain, inputs)) <= 1e-5
    assert counters["stats"]["unique_graphs"] == 1  # the job's forward compiled nothing new
    again = _forward(compiled, _inputs(plain.config, 5), reference=kv)  # no recompile for new values
    assert counters["stats"]["unique_graphs"] == 1 and again.shape == got.shape
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["math", "flash"])  # the kernels PyTorch builds for the CPU
def test_attention_backends_match_the_plain_call(plain, backend) -> None:
    q, k, v = torch.randn(3, 2, 4, 300, 16, generator=torch.Generator().manual_seed(7)).unbind(0)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    previous = attention.set_attention_backend(backend)
    try:
        got = attention.dispatch_attention(q, k, v)
    except RuntimeError as err:  # a kernel this CPU build lacks
        pytest.skip(f"{backend} attention is not built for this CPU: {err}")
    finally:
        attention.set_attention_backend(previous)
    assert relative_error(got, expected) <= 1e-5


def test_attention_backend_choice_is_explicit() -> None:
    assert attention.choose_backend("auto", CPU) == "sdpa"
    assert attention.choose_backend("math", CPU) == "math"
    with pytest.raises(ValueError, match="one of"):
        attention.choose_backend("fastest", CPU)
    if not attention.fa3_available():
        with pytest.raises(ValueError, match="flash_attn_interface"):
            attention.choose_backend("fa3", CPU)
    with pytest.raises(ValueError):
        attention.set_attention_backend("auto")  # a concrete backend must be chosen first


def test_apply_speedups_reports_what_it_attached(plain, caplog) -> None:
    model = copy.deepcopy(plain)
    caplog.set_level("INFO")
    report = apply_speedups(ExactSpeedups(), CPU, model, compiled=model.blocks)
    assert report == {"attention": "sdpa", "fused_attentions": 3 * plain.config.num_layers}  # no compile on the CPU
    assert "exact speed-ups" in caplog.text
    untouched = copy.deepcopy(plain)
    assert apply_speedups(ExactSpeedups.plain(), CPU, untouched) == {"attention": "sdpa"}
    assert hasattr(untouched.blocks[0].attn, "to_q")
    assert ExactSpeedups().compiles_on(torch.device("cuda")) and not ExactSpeedups().compiles_on(CPU)
