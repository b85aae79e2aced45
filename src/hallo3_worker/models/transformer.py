"""The Hallo3 main transformer: a CogVideoX-5B-I2V DiT with reference, face and audio conditioning.

Per block, in order (B batch, L text tokens, N = T*h*w video tokens, R reference tokens):

1. AdaLN modulation from the time embedding (12 vectors; text and video modulated separately).
2. Self-attention over [text; video] queries and [text; video; reference] keys/values. Video
   queries and keys get the 3-D rotary embedding; text and reference tokens get none; the
   reference tokens (from :class:`~hallo3_worker.models.reference_net.ReferenceNet`) produce no
   output rows. Gated residual.
3. Face cross-attention: video tokens attend to the face tokens. Queries go through the block's
   *self-attention* q-LayerNorm and the rotary embedding of latent frame 0 (spatial position
   only), keys through its k-LayerNorm. Ungated residual.
4. Audio cross-attention, the same recipe, each latent frame attending to its own audio tokens.
5. Gated MLP residual.

Then the final LayerNorm, the modulated output layer and unpatchify. The output is the
v-prediction, shaped like the noisy latent.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from hallo3_worker.models.attention import dispatch_attention
from hallo3_worker.models.audio_proj import AudioProjConfig, AudioProjection
from hallo3_worker.models.face_proj import FaceProjConfig, FaceProjection
from hallo3_worker.models.layers import (
    AdaLNModulation,
    BackboneConfig,
    DiTBackbone,
    DiTBlock,
    apply_rotary,
    fuse_linears,
    merge_heads,
    modulate,
    split_heads,
)


@dataclasses.dataclass(frozen=True)
class TransformerConfig(BackboneConfig):
    """Main transformer config; backbone defaults plus the audio and face projectors'."""

    audio: AudioProjConfig = dataclasses.field(default_factory=AudioProjConfig)
    face: FaceProjConfig = dataclasses.field(default_factory=FaceProjConfig)


class CrossAttention(nn.Module):
    """Video queries attending to a few context tokens, with the block's shared q/k norms.

    :meth:`fuse_projections` swaps ``to_k``/``to_v`` for one ``to_kv`` (the checkpoint's layout).
    """

    def __init__(self, hidden_size: int, num_heads: int, context_dim: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.to_q = nn.Linear(hidden_size, hidden_size)
        self.to_k = nn.Linear(context_dim, hidden_size)
        self.to_v = nn.Linear(context_dim, hidden_size)
        self.to_kv: nn.Linear | None = None  # set by fuse_projections()
        self.to_out = nn.Linear(hidden_size, hidden_size)

    @torch.no_grad()
    def fuse_projections(self) -> None:
        if self.to_kv is not None:
            return
        self.to_kv = fuse_linears(self.to_k, self.to_v)
        del self.to_k, self.to_v

    def context_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B', M, context_dim) -> k, v each (B', nh, M, dh), before the k-LayerNorm."""
        if self.to_kv is not None:
            k, v = self.to_kv(context).chunk(2, dim=-1)
        else:
            k, v = self.to_k(context), self.to_v(context)
        return split_heads(k, self.num_heads), split_heads(v, self.num_heads)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        norm_q: nn.Module,
        norm_k: nn.Module,
        rope: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """x: (B', S, D); context: (B', M, context_dim); rope: cos, sin (S, dh) -> (B', S, D)."""
        q = apply_rotary(norm_q(split_heads(self.to_q(x), self.num_heads)), *rope)  # (B', nh, S, dh)
        k, v = self.context_kv(context)  # (B', nh, M, dh)
        k = norm_k(k)
        return self.to_out(merge_heads(dispatch_attention(q, k, v)))


class Hallo3Block(DiTBlock):
    def __init__(self, config: TransformerConfig) -> None:
        super().__init__(config)
        d = config.hidden_size
        self.face_norm = nn.LayerNorm(d, eps=config.layernorm_eps)
        self.face_attn = CrossAttention(d, config.num_heads, config.face.token_dim)
        self.audio_norm = nn.LayerNorm(d, eps=config.layernorm_eps)
        self.audio_attn = CrossAttention(d, config.num_heads, config.audio.token_dim)

    def forward(
        self,
        text: torch.Tensor,
        video: torch.Tensor,
        emb: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        frame0_rope: tuple[torch.Tensor, torch.Tensor],
        reference: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        audio_tokens: torch.Tensor,
        face_tokens: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """text: (B, L, D); video: (B, N, D); emb: (B, E); rope: (N, dh) tables;
        frame0_rope: (h*w, dh) tables; reference: (B or 1, R, D) tokens or their (k, v) from
        ``attn.extra_kv``, each (B or 1, nh, R, dh); audio_tokens: (B*T, Ma, Da);
        face_tokens: (B, Mf, Df). Returns updated (text, video)."""
        mod = self.modulation(emb)
        text_in, video_in = self.attention_input(text, video, mod)
        text, video = self.attention_residual(text, video, text_in, video_in, mod, rope, reference)

        norm_q, norm_k = self.attn.norm_q, self.attn.norm_k
        b, n, d = video.shape
        frames = audio_tokens.shape[0] // b
        # Face: every video token attends to the same face tokens, so all frames go in one call;
        # the frame-0 rotary table is tiled over the frames.  (B, N, D)
        tiled_rope = (frame0_rope[0].repeat(frames, 1), frame0_rope[1].repeat(frames, 1))
        video = video + self.face_attn(self.face_norm(video), face_tokens, norm_q, norm_k, tiled_rope)
        # Audio: each latent frame attends to its own tokens.  (B, N, D) -> (B*T, h*w, D)
        per_frame = self.audio_norm(video).reshape(b * frames, n // frames, d)
        audio_out = self.audio_attn(per_frame, audio_tokens, norm_q, norm_k, frame0_rope)
        video = video + audio_out.reshape(b, n, d)

        return self.mlp_residual(text, video, mod)


class FinalLayer(nn.Module):
    """LayerNorm, (shift, scale) modulation from the time embedding, Linear to patch pixels."""

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        d, p = config.hidden_size, config.patch_size
        self.norm = nn.LayerNorm(d, eps=config.final_norm_eps)
        self.adaln = AdaLNModulation(config.time_embed_dim, d, 2)
        self.proj = nn.Linear(d, p * p * config.out_channels)

    def forward(self, video: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """(B, N, D), (B, E) -> (B, N, p*p*C_out)."""
        shift, scale = self.adaln(emb)
        return self.proj(modulate(self.norm(video), shift, scale))


def unpatchify(x: torch.Tensor, frames: int, grid_h: int, grid_w: int, channels: int, patch: int) -> torch.Tensor:
    """(B, T*h*w, C*p*p) with per-token (c, p, q) order -> (B, T, C, h*p, w*p)."""
    b = x.shape[0]
    x = x.reshape(b, frames, grid_h, grid_w, channels, patch, patch)
    x = x.permute(0, 1, 4, 2, 5, 3, 6)  # (B, T, C, h, p, w, q)
    return x.reshape(b, frames, channels, grid_h * patch, grid_w * patch)


def _cast(reference, dtype: torch.dtype):
    """Reference tokens, or a (k, v) pair, in ``dtype``."""
    if isinstance(reference, torch.Tensor):
        return reference.to(dtype)
    return tuple(t.to(dtype) for t in reference)


class Hallo3Transformer(DiTBackbone):
    """The denoising network. See the module docstring for the block structure."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__(config)
        self.config: TransformerConfig = config
        self.blocks = nn.ModuleList([Hallo3Block(config) for _ in range(config.num_layers)])
        self.norm_final = nn.LayerNorm(config.hidden_size, eps=config.layernorm_eps)
        self.final = FinalLayer(config)
        self.audio_proj = AudioProjection(config.audio)
        self.face_proj = FaceProjection(config.face)

    def encode_conditions(
        self, audio_features: torch.Tensor, face_embedding: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Project the per-segment conditions once; the results are valid for every step.

        audio_features: (B, F, window, layers, dim) -> audio tokens (B, T, Ma, Da);
        face_embedding: (B, 512) -> face tokens (B, Mf, Df).
        """
        return self.audio_proj(audio_features), self.face_proj(face_embedding)

    def reference_kv(self, reference: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each block's keys and values of the reference tokens, computed once for a whole job.

        reference: one (B, R, D) tensor per block -> one (k, v) pair per block, each (B, nh, R, dh)
        in the weights' dtype. :meth:`forward` accepts these in place of the tokens, with the same result.
        """
        dtype = self.pos_embedding.dtype
        return [block.attn.extra_kv(ref.to(dtype)) for block, ref in zip(self.blocks, reference, strict=True)]

    def forward(
        self,
        hidden_states: torch.Tensor,
        timesteps: torch.Tensor,
        text: torch.Tensor,
        audio_tokens: torch.Tensor,
        face_tokens: torch.Tensor,
        reference: list[torch.Tensor] | list[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """Predict v.

        hidden_states: (B, T, C_in, H, W), the noisy latent concatenated on channels with the
            conditioning latent; timesteps: (B,) float; text: (B, L, text_dim);
        audio_tokens: (B, T, Ma, Da) and face_tokens: (B, Mf, Df) from :meth:`encode_conditions`;
        reference: one (B, R, D) tensor per block, from the reference network; with batch 1 the
            same tokens serve every sample (the guided batch shares one reference image). Or the
            per-block (k, v) pairs of :meth:`reference_kv`, made once per job.
        Returns (B, T, C_out, H, W) in the weights' dtype.
        """
        c = self.config
        if len(reference) != len(self.blocks):
            raise ValueError(f"expected {len(self.blocks)} reference tensors, got {len(reference)}")
        b, frames = hidden_states.shape[:2]
        if audio_tokens.shape[:2] != (b, frames):
            raise ValueError(f"audio tokens {tuple(audio_tokens.shape)} do not match {b} x {frames} latent frames")
        dtype = self.pos_embedding.dtype

        emb, text_tokens, video_tokens = self.embed(hidden_states, timesteps, text)
        cos, sin = self.rope(frames, hidden_states.device)
        hw = c.tokens_per_frame
        frame0_rope = (cos[:hw], sin[:hw])
        audio_tokens = audio_tokens.to(dtype).flatten(0, 1)  # (B*T, Ma, Da)
        face_tokens = face_tokens.to(dtype)

        for block, ref in zip(self.blocks, reference):
            text_tokens, video_tokens = block(
                text_tokens, video_tokens, emb, (cos, sin), frame0_rope, _cast(ref, dtype), audio_tokens, face_tokens
            )

        # The backbone's final LayerNorm is per token, so the text rows it would also see are skipped.
        out = self.final(self.norm_final(video_tokens), emb)  # (B, N, p*p*C_out)
        return unpatchify(out, frames, c.grid_height, c.grid_width, c.out_channels, c.patch_size)
