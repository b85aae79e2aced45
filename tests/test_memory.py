"""Memory accounting: the tensor tracker, tensor replacement for offloading, and the fitness numbers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hallo3_worker import fitness
from hallo3_worker.memory import STAGES, TensorMemoryTracker, estimate_stage_memory, measure
from hallo3_worker.models.loading import replace_tensors


def test_tracker_counts_live_storages_and_the_peak() -> None:
    tracker = TensorMemoryTracker()
    x = torch.randn(256, 256)  # 256 KiB, made before the mode
    assert tracker.track(x) == 256 * 256 * 4
    assert tracker.track(x, x[:10]) == 0  # the same storage is counted once, views too
    with tracker:
        y = x * 2  # +256 KiB
        z = y + 1  # +256 KiB: peak 768 KiB
        del y  # -256 KiB
        w = z.view(-1)  # a view: nothing new
    assert tracker.peak == 3 * 256 * 256 * 4
    assert tracker.current == 2 * 256 * 256 * 4
    del z, w
    assert tracker.current == 256 * 256 * 4


def test_measure_separates_weights_inputs_and_activations() -> None:
    layer = nn.Linear(64, 32, bias=False)
    batch = torch.randn(8, 64)

    def forward() -> torch.Tensor:
        hidden = layer(batch)  # (8, 32) float32
        return torch.relu(hidden)  # (8, 32): both alive at the peak

    stage = measure(forward, [layer], [batch])
    assert stage.weights == 64 * 32 * 4
    assert stage.activations == 2 * 8 * 32 * 4


def test_tracker_sees_attention_as_flash_kernels_allocate() -> None:
    """A (B, H, S, S) score matrix would be counted; the fused kernel keeps only the output."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 48, 19126, 64, dtype=torch.bfloat16)
        stage = measure(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q), [], [q])
    assert stage.activations < 2 * q.numel() * q.element_size()  # far below the 70 GB score matrix


def test_replace_tensors_keeps_ties_and_restores_the_originals() -> None:
    shared = nn.Embedding(5, 3)
    outer = nn.Sequential(shared, nn.BatchNorm1d(3))
    outer.tail = shared  # the same module twice: one tensor under two names
    before = {name: t for name, t in [*outer.named_parameters(remove_duplicate=False), *outer.named_buffers()]}
    restore = replace_tensors(outer, lambda t: t.to(torch.float64) * 0)
    assert outer.tail.weight is outer[0].weight and outer[0].weight.dtype == torch.float64
    assert float(outer[0].weight.abs().sum()) == 0.0 and not outer[0].weight.requires_grad
    assert outer[1].running_var.dtype == torch.float64
    restore()
    after = dict([*outer.named_parameters(remove_duplicate=False), *outer.named_buffers()])
    assert after.keys() == before.keys() and all(after[n] is t for n, t in before.items())
    assert float(outer[1].running_var.sum()) == 3.0


@pytest.fixture(scope="module")
def full_size_stages() -> dict:
    return estimate_stage_memory()


def test_fitness_activation_numbers_match_the_code(full_size_stages: dict) -> None:
    """The constants fitness uses are what the full-size networks allocate now (FakeTensorMode, ~25 s)."""
    assert tuple(full_size_stages) == STAGES
    for name, stage in full_size_stages.items():
        assert stage.activations == pytest.approx(fitness.STAGE_ACTIVATION_BYTES[name], rel=0.02), name


def test_sliced_mlp_activation_number_matches_the_code() -> None:
    stages = estimate_stage_memory(stages=["denoise"], feed_forward_chunk=fitness.FULL_OFFLOAD_FEED_FORWARD_CHUNK)
    chunked = stages["denoise"].activations
    assert chunked == pytest.approx(fitness.STAGE_ACTIVATION_BYTES["denoise_chunked"], rel=0.02)
    assert chunked < 0.75 * fitness.STAGE_ACTIVATION_BYTES["denoise"]  # the slices save a quarter or more


def test_sliced_vae_decode_holds_far_less_than_the_plain_one(full_size_stages: dict) -> None:
    """The worker's sliced decoder (what fitness counts) against diffusers' plain one, both at 480x720."""
    plain = estimate_stage_memory(stages=["vae_decode"], sliced_vae_decode=False)["vae_decode"]
    sliced = full_size_stages["vae_decode"]
    assert sliced.weights == plain.weights
    assert sliced.activations <= 0.6 * plain.activations  # 6.6 GiB against 14.7 GiB when written


def test_full_size_weights_match_the_component_sizes(full_size_stages: dict) -> None:
    sizes = fitness.DEFAULT_COMPONENT_BYTES
    assert full_size_stages["denoise"].weights == pytest.approx(sizes["transformer"], rel=0.001)
    assert full_size_stages["text"].weights == sizes["text_encoder"]
    assert full_size_stages["audio"].weights == sizes["audio_encoder"]
    assert full_size_stages["vae_decode"].weights == sizes["vae"]
    # The reference stage runs the reference network and encodes with the VAE; the converted
    # reference network drops the last block's unused attention/MLP, so it is a little under
    # the upstream parameter count.
    reference_net = full_size_stages["reference"].weights - sizes["vae"]
    assert 0.95 * sizes["reference_net"] < reference_net <= sizes["reference_net"]


def test_the_bank_constant_is_the_reference_keys_and_values() -> None:
    from hallo3_worker.models import presets

    main, ref = presets.full_transformer(), presets.full_reference_net()
    per_copy = main.num_layers * ref.tokens_per_frame * main.hidden_size * 2  # bf16
    assert fitness.REFERENCE_BANK_BYTES == 2 * per_copy  # keys and values, batch 1, shared by the guided batch


def test_device_peak_memory_is_none_without_an_accelerator_allocator() -> None:
    from hallo3_worker.memory import device_peak_memory

    with device_peak_memory(torch.device("cpu")) as peak:
        torch.ones(1000).sum()
    assert peak.bytes is None


def test_device_peak_memory_resets_at_entry_and_reads_at_exit(monkeypatch) -> None:
    from hallo3_worker.memory import device_peak_memory

    calls: list[str] = []
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda: torch.device("cuda"))
    monkeypatch.setattr(torch.accelerator, "current_device_index", lambda: 0)
    monkeypatch.setattr(torch.accelerator, "reset_peak_memory_stats", lambda index: calls.append(f"reset {index}"))
    monkeypatch.setattr(torch.accelerator, "max_memory_allocated", lambda index: calls.append(f"read {index}") or 123)
    with device_peak_memory(torch.device("cuda", 1)) as peak:
        assert calls == ["reset 1"] and peak.bytes is None
    assert calls == ["reset 1", "read 1"] and peak.bytes == 123
    with device_peak_memory(torch.device("cuda")) as peak:
        pass
    assert calls[-1] == "read 0" and peak.bytes == 123


def test_streamed_transformer_constants_match_the_network() -> None:
    from hallo3_worker.models import presets
    from hallo3_worker.models.layers import fuse_projections
    from hallo3_worker.models.loading import build_on_meta
    from hallo3_worker.models.transformer import Hallo3Transformer

    model = build_on_meta(lambda: Hallo3Transformer(presets.full_transformer()), torch.bfloat16)
    fuse_projections(model)
    block = sum(p.nbytes for p in model.blocks[0].parameters())
    assert len(model.blocks) == fitness.TRANSFORMER_NUM_BLOCKS and block == fitness.TRANSFORMER_BLOCK_BYTES
    rest = sum(p.nbytes for p in model.parameters()) - len(model.blocks) * block
    assert rest == fitness.TRANSFORMER_REST_BYTES
    # Streaming is what brings the full policy under 20 GiB.
    assert fitness.estimate_gpu_bytes("full") <= 20 * 2**30
