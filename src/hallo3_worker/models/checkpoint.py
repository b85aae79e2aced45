"""Mapping between upstream Hallo3 checkpoint keys and this package's parameter names.

The official checkpoint (``hallo3/1/mp_rank_00_model_states.pt``) stores the main transformer under
``model.diffusion_model.`` and the reference network under ``ref_model.diffusion_model.``, in
SwissArmyTransformer naming. Every upstream key is covered by exactly one :class:`KeyRule`:

* a rename (one target),
* an explicit split along dim 0 into equal parts (fused ``query_key_value`` -> q, k, v and fused
  cross-attention ``key_value`` -> k, v; rows are contiguous [Q; K; V] / [K; V] blocks), or
* an intentional drop (no target), for keys inference never reads: the rotary tables (recomputed),
  SAT's unused ``position_embeddings`` and the reference network's unused tail.

Conversion is strict: a missing or unexpected upstream key, a shape that does not match, or a
parameter of ours left unfilled raises :class:`CheckpointError` naming the keys.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from hallo3_worker.models.layers import BackboneConfig
from hallo3_worker.models.reference_net import ReferenceNetConfig
from hallo3_worker.models.transformer import TransformerConfig

MAIN_PREFIX = "model.diffusion_model."
REFERENCE_PREFIX = "ref_model.diffusion_model."
# SAT builds an Embedding(max_sequence_length, hidden) it never uses; the shipped config has 64 rows.
SAT_UNUSED_POSITION_ROWS = 64


class CheckpointError(ValueError):
    """The checkpoint does not match the expected layout."""


@dataclasses.dataclass(frozen=True)
class KeyRule:
    """How one upstream tensor becomes ours.

    ``targets`` empty: intentionally unused, and ``unused_shape`` is its upstream shape.
    One target: renamed. Several: split along dim 0 into equal parts, in order.
    """

    source: str
    targets: tuple[str, ...]
    unused_shape: tuple[int, ...] | None = None


def _affine(src: str, dst: str) -> Iterator[KeyRule]:
    for suffix in ("weight", "bias"):
        yield KeyRule(f"{src}.{suffix}", (f"{dst}.{suffix}",))


def _split(src: str, dsts: tuple[str, ...]) -> Iterator[KeyRule]:
    for suffix in ("weight", "bias"):
        yield KeyRule(f"{src}.{suffix}", tuple(f"{d}.{suffix}" for d in dsts))


def _unused(src: str, shapes: dict[str, tuple[int, ...]]) -> Iterator[KeyRule]:
    for suffix, shape in shapes.items():
        yield KeyRule(f"{src}.{suffix}", (), shape)


def _linear_shapes(n_in: int, n_out: int) -> dict[str, tuple[int, ...]]:
    return {"weight": (n_out, n_in), "bias": (n_out,)}


def _norm_shapes(n: int) -> dict[str, tuple[int, ...]]:
    return {"weight": (n,), "bias": (n,)}


def _backbone_rules(config: BackboneConfig) -> Iterator[KeyRule]:
    """Rules for the parts both networks share (everything but the blocks' internals)."""
    c = config
    yield KeyRule("mixins.pos_embed.pos_embedding", ("pos_embedding",))
    video_rows = c.latent_frames * c.tokens_per_frame
    for table in ("freqs_sin", "freqs_cos"):  # recomputed in fp32 at run time
        yield KeyRule(f"mixins.pos_embed.{table}", (), (video_rows, c.head_dim))
    yield KeyRule("transformer.position_embeddings.weight", (), (SAT_UNUSED_POSITION_ROWS, c.hidden_size))
    yield from _affine("mixins.patch_embed.proj", "patch_embed.proj")
    yield from _affine("mixins.patch_embed.text_proj", "patch_embed.text_proj")
    yield from _affine("time_embed.0", "time_embed.linear_1")
    yield from _affine("time_embed.2", "time_embed.linear_2")


def _block_core_rules(i: int) -> Iterator[KeyRule]:
    """Self-attention, norms and MLP of block ``i`` (present in both networks)."""
    src, dst = f"transformer.layers.{i}", f"blocks.{i}"
    yield from _affine(f"mixins.adaln_layer.adaLN_modulations.{i}.1", f"{dst}.adaln.linear")
    yield from _affine(f"{src}.input_layernorm", f"{dst}.norm1")
    yield from _affine(f"mixins.adaln_layer.query_layernorm_list.{i}", f"{dst}.attn.norm_q")
    yield from _affine(f"mixins.adaln_layer.key_layernorm_list.{i}", f"{dst}.attn.norm_k")
    yield from _split(f"{src}.attention.query_key_value", (f"{dst}.attn.to_q", f"{dst}.attn.to_k", f"{dst}.attn.to_v"))
    yield from _affine(f"{src}.attention.dense", f"{dst}.attn.to_out")
    yield from _affine(f"{src}.post_attention_layernorm", f"{dst}.norm2")
    yield from _affine(f"{src}.mlp.dense_h_to_4h", f"{dst}.ff.proj_in")
    yield from _affine(f"{src}.mlp.dense_4h_to_h", f"{dst}.ff.proj_out")


def _final_rules() -> Iterator[KeyRule]:
    yield from _affine("transformer.final_layernorm", "norm_final")
    yield from _affine("mixins.final_layer.norm_final", "final.norm")
    yield from _affine("mixins.final_layer.adaLN_modulation.1", "final.adaln.linear")
    yield from _affine("mixins.final_layer.linear", "final.proj")


def transformer_key_rules(config: TransformerConfig) -> list[KeyRule]:
    """Rules for the main transformer (keys relative to :data:`MAIN_PREFIX`)."""
    rules = list(_backbone_rules(config))
    for i in range(config.num_layers):
        rules += _block_core_rules(i)
        src, dst = f"transformer.layers.{i}", f"blocks.{i}"
        for kind in ("face", "audio"):
            rules += _affine(f"{src}.{kind}_input_layernorm", f"{dst}.{kind}_norm")
            rules += _affine(f"{src}.{kind}_attn.query", f"{dst}.{kind}_attn.to_q")
            rules += _split(f"{src}.{kind}_attn.key_value", (f"{dst}.{kind}_attn.to_k", f"{dst}.{kind}_attn.to_v"))
            rules += _affine(f"{src}.{kind}_attn.dense", f"{dst}.{kind}_attn.to_out")
    rules += _final_rules()
    for name in ("proj1", "proj2", "proj3", "norm"):
        rules += _affine(f"transformer.audio_proj.{name}", f"audio_proj.{name}")
    rules += _affine("transformer.audio_proj.conv1", "audio_proj.conv")
    for name in ("proj", "norm"):
        rules += _affine(f"transformer.face_proj.{name}", f"face_proj.{name}")
    return rules


def reference_key_rules(config: ReferenceNetConfig) -> list[KeyRule]:
    """Rules for the reference network (keys relative to :data:`REFERENCE_PREFIX`).

    The last block contributes only its input norm and modulation; its attention, MLP and the
    final layers never influence the recorded tokens and are dropped.
    """
    c = config
    d, dh, ff = c.hidden_size, c.head_dim, c.mlp_ratio * c.hidden_size
    last = c.num_layers - 1
    rules = list(_backbone_rules(config))
    for i in range(last):
        rules += _block_core_rules(i)
    src, dst = f"transformer.layers.{last}", f"blocks.{last}"
    rules += _affine(f"mixins.adaln_layer.adaLN_modulations.{last}.1", f"{dst}.adaln.linear")
    rules += _affine(f"{src}.input_layernorm", f"{dst}.norm1")
    rules += _unused(f"mixins.adaln_layer.query_layernorm_list.{last}", _norm_shapes(dh))
    rules += _unused(f"mixins.adaln_layer.key_layernorm_list.{last}", _norm_shapes(dh))
    rules += _unused(f"{src}.attention.query_key_value", _linear_shapes(d, 3 * d))
    rules += _unused(f"{src}.attention.dense", _linear_shapes(d, d))
    rules += _unused(f"{src}.post_attention_layernorm", _norm_shapes(d))
    rules += _unused(f"{src}.mlp.dense_h_to_4h", _linear_shapes(d, ff))
    rules += _unused(f"{src}.mlp.dense_4h_to_h", _linear_shapes(ff, d))
    rules += _unused("transformer.final_layernorm", _norm_shapes(d))
    rules += _unused("mixins.final_layer.norm_final", _norm_shapes(d))
    rules += _unused("mixins.final_layer.adaLN_modulation.1", _linear_shapes(c.time_embed_dim, 2 * d))
    rules += _unused("mixins.final_layer.linear", _linear_shapes(d, c.patch_size**2 * c.out_channels))
    return rules


def upstream_shapes(rules: list[KeyRule], model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Upstream key -> shape implied by the rules and our model's parameter shapes (meta is fine)."""
    ours = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    shapes: dict[str, tuple[int, ...]] = {}
    for rule in rules:
        if not rule.targets:
            shapes[rule.source] = rule.unused_shape  # type: ignore[assignment]
            continue
        parts = [ours[t] for t in rule.targets]
        shapes[rule.source] = (sum(p[0] for p in parts), *parts[0][1:])
    return shapes


def convert_state_dict(
    upstream: Mapping[str, torch.Tensor], prefix: str, rules: list[KeyRule], model: nn.Module
) -> dict[str, torch.Tensor]:
    """Take the ``prefix`` part of an upstream state dict and return ``model``'s state dict.

    Tensors are views of the inputs (no copies, dtype unchanged). Keys outside ``prefix`` are
    ignored. Raises :class:`CheckpointError` on any missing, unexpected or mis-shaped key.
    """
    expected_ours = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    expected_upstream = upstream_shapes(rules, model)
    present = {k[len(prefix) :]: v for k, v in upstream.items() if k.startswith(prefix)}

    missing = sorted(set(expected_upstream) - set(present))
    unexpected = sorted(set(present) - set(expected_upstream))
    wrong = sorted(
        f"{k}: {tuple(present[k].shape)} != expected {expected_upstream[k]}"
        for k in set(present) & set(expected_upstream)
        if tuple(present[k].shape) != expected_upstream[k]
    )
    if missing or unexpected or wrong:
        raise CheckpointError(
            _problems(prefix, missing=missing, unexpected=unexpected, wrong_shape=wrong)
        )

    converted: dict[str, torch.Tensor] = {}
    for rule in rules:
        if not rule.targets:
            continue
        tensor = present[rule.source]
        parts = tensor.chunk(len(rule.targets), dim=0) if len(rule.targets) > 1 else (tensor,)
        converted.update(zip(rule.targets, parts))

    unfilled = sorted(set(expected_ours) - set(converted))
    if unfilled:
        raise CheckpointError(_problems(prefix, unfilled=unfilled))
    return converted


def to_upstream_state_dict(
    ours: Mapping[str, torch.Tensor], prefix: str, rules: list[KeyRule], unused_fill: float = 0.0
) -> dict[str, torch.Tensor]:
    """The inverse mapping: our state dict -> upstream-named tensors (used to build test checkpoints).

    Intentionally unused upstream keys are filled with ``unused_fill``.
    """
    out: dict[str, torch.Tensor] = {}
    reference = next(iter(ours.values()))
    for rule in rules:
        if not rule.targets:
            out[prefix + rule.source] = torch.full(rule.unused_shape, unused_fill, dtype=reference.dtype)  # type: ignore[arg-type]
        else:
            out[prefix + rule.source] = torch.cat([ours[t] for t in rule.targets], dim=0)
    return out


def _problems(prefix: str, **lists: list[str]) -> str:
    lines = [f"checkpoint section '{prefix}' does not match the expected layout:"]
    for label, items in lists.items():
        if items:
            shown = ", ".join(items[:10]) + (f" ... ({len(items)} in all)" if len(items) > 10 else "")
            lines.append(f"  {label.replace('_', ' ')}: {shown}")
    return "\n".join(lines)
