"""Binding one segment's conditions to the main transformer for the sampler.

Classifier-free guidance runs as one forward of batch 2 ordered [uncond; cond]. The unconditional
half has zero text and zero audio features; the face embedding, the conditioning latent and the
reference tokens are identical in both halves. Audio and face tokens are projected once per
segment here rather than once per step (same values, fewer FLOPs).
"""

from __future__ import annotations

import dataclasses

import torch

from hallo3_worker.models.transformer import Hallo3Transformer
from hallo3_worker.sampling import ModelFn


@dataclasses.dataclass(frozen=True)
class SegmentConditions:
    """Conditioning of one segment, batch B (normally 1), conditional half only.

    concat: (B, T, C, H, W) conditioning latent (motion-frame latent followed by zero frames).
    text: (B, L, text_dim) prompt embedding; the unconditional text is zeros.
    audio_features: (B, F, window, layers, dim) windowed wav2vec2 features; unconditional = zeros.
    face_embedding: (B, 512) raw identity embedding, used in both halves.
    """

    concat: torch.Tensor
    text: torch.Tensor
    audio_features: torch.Tensor
    face_embedding: torch.Tensor


def guidance_model_fn(
    transformer: Hallo3Transformer,
    conditions: SegmentConditions,
    reference: list[torch.Tensor] | list[tuple[torch.Tensor, torch.Tensor]],
) -> ModelFn:
    """Return model_fn(x, timesteps) for :func:`hallo3_worker.sampling.sample`.

    reference: the reference network's per-block tokens, batch B, or their per-block (k, v) pairs
        (:meth:`Hallo3Transformer.reference_kv`). With B = 1 (one job) both halves of the guided
        batch share the same tensors instead of a doubled copy.
    """
    c = conditions
    with torch.no_grad():
        audio = torch.cat([torch.zeros_like(c.audio_features), c.audio_features])
        face = torch.cat([c.face_embedding, c.face_embedding])
        audio_tokens, face_tokens = transformer.encode_conditions(audio, face)
    text = torch.cat([torch.zeros_like(c.text), c.text])
    concat = torch.cat([c.concat, c.concat])
    if any(_batch(r) != 1 for r in reference):
        reference = [torch.cat([r, r]) if isinstance(r, torch.Tensor) else tuple(torch.cat([t, t]) for t in r)
                     for r in reference]

    def model_fn(x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        hidden_states = torch.cat([x, concat.to(x.dtype)], dim=2)  # (2B, T, 2C, H, W)
        return transformer(hidden_states, timesteps, text, audio_tokens, face_tokens, reference)

    return model_fn


def _batch(reference: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> int:
    return (reference if isinstance(reference, torch.Tensor) else reference[0]).shape[0]
