"""Checkpoint key mapping: full-size key set on the meta device, strictness, round trips."""

from __future__ import annotations

import math
import time

import pytest
import torch

from hallo3_worker.models import checkpoint as ck
from hallo3_worker.models import presets
from hallo3_worker.models.loading import build_on_meta, load_converted, materialize_random
from hallo3_worker.models.reference_net import ReferenceNet
from hallo3_worker.models.transformer import Hallo3Transformer

# Parameter counts of upstream's networks built from the shipped YAML (buffers excluded).
UPSTREAM_MAIN_PARAMS = 8_921_253_952
UPSTREAM_REFERENCE_PARAMS = 5_625_284_160
UPSTREAM_BUFFERS = {"mixins.pos_embed.freqs_sin", "mixins.pos_embed.freqs_cos"}


def _param_count(shapes: dict[str, tuple[int, ...]]) -> int:
    return sum(math.prod(s) for k, s in shapes.items() if k not in UPSTREAM_BUFFERS)


def test_full_size_networks_build_on_meta_with_upstream_key_set() -> None:
    start = time.perf_counter()
    main = build_on_meta(lambda: Hallo3Transformer(presets.full_transformer()), torch.bfloat16)
    ref = build_on_meta(lambda: ReferenceNet(presets.full_reference_net()), torch.bfloat16)
    elapsed = time.perf_counter() - start

    assert elapsed < 5.0
    assert all(t.is_meta for t in main.state_dict().values())
    assert all(t.is_meta for t in ref.state_dict().values())
    assert {p.dtype for p in main.parameters()} == {torch.bfloat16}

    main_shapes = ck.upstream_shapes(ck.transformer_key_rules(main.config), main)
    ref_shapes = ck.upstream_shapes(ck.reference_key_rules(ref.config), ref)
    assert _param_count(main_shapes) == UPSTREAM_MAIN_PARAMS
    assert _param_count(ref_shapes) == UPSTREAM_REFERENCE_PARAMS
    # Spot checks against the published layout (spec section 2.6).
    assert main_shapes["mixins.pos_embed.pos_embedding"] == (1, 17776, 3072)
    assert main_shapes["transformer.layers.41.attention.query_key_value.weight"] == (9216, 3072)
    assert main_shapes["transformer.layers.0.face_attn.key_value.weight"] == (6144, 1024)
    assert main_shapes["transformer.layers.0.audio_attn.key_value.weight"] == (6144, 768)
    assert main_shapes["transformer.audio_proj.conv1.weight"] == (24576, 24576, 2)
    assert main_shapes["transformer.audio_proj.proj1.weight"] == (512, 46080)
    assert main_shapes["transformer.face_proj.proj.weight"] == (4096, 512)
    assert main_shapes["mixins.adaln_layer.adaLN_modulations.0.1.weight"] == (36864, 512)
    assert main_shapes["mixins.final_layer.linear.weight"] == (64, 3072)
    assert main_shapes["mixins.pos_embed.freqs_sin"] == (17550, 64)
    assert ref_shapes["transformer.layers.41.mlp.dense_h_to_4h.weight"] == (12288, 3072)
    assert len([k for k in main_shapes if k.startswith("transformer.layers.")]) == 42 * 28  # 14 affine modules per layer (spec 2.6)


def test_every_parameter_is_filled_exactly_once() -> None:
    for model, rules in (
        (build_on_meta(lambda: Hallo3Transformer(presets.full_transformer())), ck.transformer_key_rules),
        (build_on_meta(lambda: ReferenceNet(presets.full_reference_net())), ck.reference_key_rules),
    ):
        targets = [t for rule in rules(model.config) for t in rule.targets]
        assert len(targets) == len(set(targets))
        assert set(targets) == set(model.state_dict())


def _tiny_pair(seed: int) -> tuple[Hallo3Transformer, dict[str, torch.Tensor]]:
    model = materialize_random(build_on_meta(lambda: Hallo3Transformer(presets.golden_tiny_transformer())), "cpu", seed)
    upstream = ck.to_upstream_state_dict(model.state_dict(), ck.MAIN_PREFIX, ck.transformer_key_rules(model.config))
    return model, upstream


def test_round_trip_through_upstream_names_gives_identical_outputs() -> None:
    model, upstream = _tiny_pair(seed=3)
    fresh = build_on_meta(lambda: Hallo3Transformer(presets.golden_tiny_transformer()))
    converted = ck.convert_state_dict(upstream, ck.MAIN_PREFIX, ck.transformer_key_rules(fresh.config), fresh)
    load_converted(fresh, converted)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 32, 60, 90, generator=g)
    text = torch.randn(2, 226, 32, generator=g)
    raw_audio, raw_face = torch.randn(2, 9, 5, 2, 16, generator=g), torch.randn(2, 512, generator=g)
    reference = [torch.randn(2, 1350, 64, generator=g) for _ in range(2)]
    t = torch.tensor([300.0, 300.0])
    with torch.no_grad():
        expected = model(x, t, text, *model.encode_conditions(raw_audio, raw_face), reference)
        got = fresh(x, t, text, *fresh.encode_conditions(raw_audio, raw_face), reference)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_qkv_split_is_row_blocks_in_q_k_v_order() -> None:
    model, upstream = _tiny_pair(seed=4)
    qkv = upstream[ck.MAIN_PREFIX + "transformer.layers.1.attention.query_key_value.weight"]
    d = model.config.hidden_size
    assert torch.equal(qkv[:d], model.blocks[1].attn.to_q.weight)
    assert torch.equal(qkv[d : 2 * d], model.blocks[1].attn.to_k.weight)
    assert torch.equal(qkv[2 * d :], model.blocks[1].attn.to_v.weight)
    kv = upstream[ck.MAIN_PREFIX + "transformer.layers.0.audio_attn.key_value.bias"]
    assert torch.equal(kv[:d], model.blocks[0].audio_attn.to_k.bias)
    assert torch.equal(kv[d:], model.blocks[0].audio_attn.to_v.bias)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda sd: sd.pop(ck.MAIN_PREFIX + "transformer.layers.0.mlp.dense_h_to_4h.weight"), "missing"),
        (lambda sd: sd.__setitem__(ck.MAIN_PREFIX + "transformer.layers.9.bogus", torch.zeros(1)), "unexpected"),
        (
            lambda sd: sd.__setitem__(ck.MAIN_PREFIX + "transformer.layers.1.attention.dense.weight", torch.zeros(3, 3)),
            "wrong shape",
        ),
    ],
)
def test_conversion_is_strict(mutate, message: str) -> None:
    _, upstream = _tiny_pair(seed=5)
    mutate(upstream)
    fresh = build_on_meta(lambda: Hallo3Transformer(presets.golden_tiny_transformer()))
    with pytest.raises(ck.CheckpointError, match=message):
        ck.convert_state_dict(upstream, ck.MAIN_PREFIX, ck.transformer_key_rules(fresh.config), fresh)


def test_keys_of_other_sections_are_ignored() -> None:
    _, upstream = _tiny_pair(seed=6)
    upstream["conditioner.embedders.0.transformer.shared.weight"] = torch.zeros(2, 2)
    upstream["first_stage_model.encoder.conv_in.weight"] = torch.zeros(2, 2)
    fresh = build_on_meta(lambda: Hallo3Transformer(presets.golden_tiny_transformer()))
    converted = ck.convert_state_dict(upstream, ck.MAIN_PREFIX, ck.transformer_key_rules(fresh.config), fresh)
    assert set(converted) == set(fresh.state_dict())
