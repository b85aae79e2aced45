"""Streamed blocks: the same forward, with at most two blocks on the device at a time."""

from __future__ import annotations

import copy

import torch

from hallo3_worker.models import presets
from hallo3_worker.models.block_streaming import stream_blocks
from hallo3_worker.models.loading import build_on_meta, materialize_random, replace_tensors
from hallo3_worker.models.transformer import Hallo3Transformer

META = torch.device("meta")


def _transformer(layers: int = 4) -> Hallo3Transformer:
    config = presets.golden_tiny_transformer()
    config = type(config)(**{**config.__dict__, "num_layers": layers})
    return materialize_random(build_on_meta(lambda: Hallo3Transformer(config)), "cpu", seed=9)


def _inputs(c, device: torch.device = torch.device("cpu")):
    g = torch.Generator().manual_seed(1)
    frames = 4 * (c.latent_frames - 1) + 1
    tensors = (
        torch.randn(2, c.latent_frames, c.in_channels, c.latent_height, c.latent_width, generator=g),
        torch.tensor([999.0, 250.0]),
        torch.randn(2, c.text_length, c.text_dim, generator=g),
        torch.randn(2, frames, c.audio.window, c.audio.feature_layers, c.audio.feature_dim, generator=g),
        torch.randn(2, c.face.embed_dim, generator=g),
    )
    reference = [torch.randn(1, 30, c.hidden_size, generator=g).to(device) for _ in range(c.num_layers)]
    return [t.to(device) for t in tensors], reference


@torch.inference_mode()
def _forward(model: Hallo3Transformer, inputs) -> torch.Tensor:
    (x, t, text, audio, face), reference = inputs
    return model(x, t, text, *model.encode_conditions(audio, face), reference)


def test_streamed_forward_is_the_plain_one_and_visits_in_order() -> None:
    plain = _transformer()
    streamed = copy.deepcopy(plain)
    events: list[str] = []
    streamer = stream_blocks(streamed.blocks, torch.device("cpu"), events.append)
    inputs = _inputs(plain.config)
    assert torch.equal(_forward(streamed, inputs), _forward(plain, inputs))
    assert events == ["load 0", "load 1", "release 0", "load 2", "release 1", "load 3", "release 2", "release 3"]
    assert streamer.loaded == {}
    events.clear()
    _forward(streamed, inputs)  # every forward streams again from block 0
    assert events[:2] == ["load 0", "load 1"] and len(events) == 8
    streamer.remove()
    events.clear()
    _forward(streamed, inputs)
    assert events == []


def test_blocks_rest_on_the_host_and_at_most_two_visit_the_device() -> None:
    model = _transformer()
    # Everything but the blocks lives on the "device" (meta stands in for a GPU); the blocks rest on the host.
    replace_tensors(model, lambda t: t.to(META), skip=(model.blocks,))
    on_device: list[int] = []

    def count(_module, _args) -> None:
        on_device.append(sum(block.adaln.linear.weight.device == META for block in model.blocks))

    stream_blocks(model.blocks, META)
    for block in model.blocks:
        block.register_forward_pre_hook(count)  # runs after the streamer's own pre-hook
    out = _forward(model, _inputs(model.config, META))
    c = model.config
    assert out.device == META and out.shape == (2, c.latent_frames, c.out_channels, c.latent_height, c.latent_width)
    assert on_device == [2, 2, 2, 1]  # the running block and the next one, never more
    assert all(p.device.type == "cpu" for p in model.blocks.parameters())  # back to rest afterwards
