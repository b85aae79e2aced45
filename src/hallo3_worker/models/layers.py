"""Building blocks shared by the Hallo3 main transformer and its reference network.

Both networks are CogVideoX-5B-I2V-shaped diffusion transformers: a patch embedding with a text
projection, a learned positional embedding plus 3-D rotary embedding, AdaLN-modulated blocks with
separate text and video modulation and qk-LayerNorm, a GELU-tanh MLP, and a modulated final layer.
This module holds the pieces the two share; each network lives in its own file.

Layout names used in comments: B batch, T latent frames, C channels, H x W latent size,
h x w = H/p x W/p token grid, N = T*h*w video tokens, L text tokens, D hidden size,
nh heads, dh head dim.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from hallo3_worker.models.attention import dispatch_attention


@dataclasses.dataclass(frozen=True)
class BackboneConfig:
    """Hyper-parameters of the CogVideoX-style backbone. Defaults are the released checkpoint's."""

    num_layers: int = 42
    hidden_size: int = 3072
    num_heads: int = 48
    in_channels: int = 32  # 16 noisy-latent channels + 16 conditioning-latent channels
    out_channels: int = 16
    patch_size: int = 2
    text_dim: int = 4096  # T5-XXL hidden size
    text_length: int = 226
    time_embed_dim: int = 512
    latent_frames: int = 13  # 49 pixel frames at 4x temporal compression
    latent_height: int = 60  # 480 px / 8
    latent_width: int = 90  # 720 px / 8
    mlp_ratio: int = 4
    layernorm_eps: float = 1e-5  # block and final-backbone LayerNorms
    qk_norm_eps: float = 1e-6  # per-head q/k LayerNorms
    final_norm_eps: float = 1e-6  # the final layer's own LayerNorm
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 8:
            raise ValueError(f"head dim {self.head_dim} must be a multiple of 8 for the t:h:w rotary split")
        if self.latent_height % self.patch_size or self.latent_width % self.patch_size:
            raise ValueError(
                f"latent size {self.latent_height}x{self.latent_width} is not divisible by patch {self.patch_size}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid_height(self) -> int:
        return self.latent_height // self.patch_size

    @property
    def grid_width(self) -> int:
        return self.latent_width // self.patch_size

    @property
    def tokens_per_frame(self) -> int:
        return self.grid_height * self.grid_width

    @property
    def max_positions(self) -> int:
        """Rows of the learned positional embedding: text plus every video token."""
        return self.text_length + self.latent_frames * self.tokens_per_frame


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """AdaLN modulation. x: (B, S, D); shift, scale: (B, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding, cosine half first. timesteps: (B,) float -> (B, dim) float32."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rotary_tables(
    frames: int, height: int, width: int, head_dim: int, theta: float, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of the 3-D rotary embedding, each (frames*height*width, head_dim), float32.

    The head dim is split t : h : w = 1/4 : 3/8 : 3/8, each frequency is repeated twice in a row
    (interleaved pairs), and rows are ordered (t, h, w) like the video tokens.
    """
    dim_t = head_dim // 4
    dim_h = head_dim // 8 * 3
    dim_w = head_dim // 8 * 3

    def axis_angles(positions: int, dim: int) -> torch.Tensor:  # (positions, dim)
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, device=device)[: dim // 2].float() / dim))
        angles = torch.arange(positions, dtype=torch.float32, device=device)[:, None] * freqs[None]
        return angles.repeat_interleave(2, dim=-1)

    angles_t = axis_angles(frames, dim_t)[:, None, None, :].expand(frames, height, width, dim_t)
    angles_h = axis_angles(height, dim_h)[None, :, None, :].expand(frames, height, width, dim_h)
    angles_w = axis_angles(width, dim_w)[None, None, :, :].expand(frames, height, width, dim_w)
    angles = torch.cat([angles_t, angles_h, angles_w], dim=-1).reshape(frames * height * width, head_dim)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin).

    x: (B, nh, S, dh); cos, sin: (S, dh), cast to x's dtype (upstream applies bf16 tables in bf16).
    """
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, S, nh*dh) -> (B, nh, S, dh)."""
    return x.unflatten(-1, (num_heads, -1)).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, nh, S, dh) -> (B, S, nh*dh)."""
    return x.transpose(1, 2).flatten(2)


class TimestepEmbedding(nn.Module):
    """Sinusoid of width hidden_size -> Linear -> SiLU -> Linear to time_embed_dim."""

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        self.in_dim = config.hidden_size
        self.linear_1 = nn.Linear(config.hidden_size, config.time_embed_dim)
        self.linear_2 = nn.Linear(config.time_embed_dim, config.time_embed_dim)

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, time_embed_dim)
        # The sinusoid is computed in fp32 and cast to the weights' dtype, as upstream does.
        emb = timestep_embedding(timesteps, self.in_dim).to(self.linear_1.weight.dtype)
        return self.linear_2(F.silu(self.linear_1(emb)))


class PatchEmbedding(nn.Module):
    """Video latents -> patch tokens, text embeddings -> projected tokens, text first."""

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        p = config.patch_size
        self.proj = nn.Conv2d(config.in_channels, config.hidden_size, kernel_size=p, stride=p)
        self.text_proj = nn.Linear(config.text_dim, config.hidden_size)

    def forward(self, latents: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """latents: (B, T, C, H, W); text: (B, L, text_dim) -> (B, L + T*h*w, D)."""
        b, t = latents.shape[:2]
        video = self.proj(latents.flatten(0, 1))  # (B*T, D, h, w)
        video = video.flatten(2).transpose(1, 2).unflatten(0, (b, t)).flatten(1, 2)  # (B, T*h*w, D)
        return torch.cat([self.text_proj(text), video], dim=1)


class SelfAttention(nn.Module):
    """Joint text + video self-attention with per-head q/k LayerNorm and rotary video positions.

    Optional extra key/value tokens (the reference network's tokens) are appended to the keys
    and values only: they get the k-LayerNorm but no rotary embedding, and produce no output rows.
    They can be passed as tokens (B or 1, R, D) or as the keys and values :meth:`extra_kv` made
    from them once, which is the same computation done ahead of time.

    The forward is :meth:`project` (token-local: q/k/v projections and the per-head q/k norms)
    followed by :meth:`attend` (rotary, attention over the whole sequence) and ``to_out``, so a sequence-parallel
    layout can exchange tokens for heads between the two. :meth:`fuse_projections` swaps the
    three q/k/v projections for one matrix product.
    """

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        d = config.hidden_size
        self.num_heads = config.num_heads
        self.to_q = nn.Linear(d, d)
        self.to_k = nn.Linear(d, d)
        self.to_v = nn.Linear(d, d)
        self.to_qkv: nn.Linear | None = None  # set by fuse_projections()
        self.norm_q = nn.LayerNorm(config.head_dim, eps=config.qk_norm_eps)
        self.norm_k = nn.LayerNorm(config.head_dim, eps=config.qk_norm_eps)
        self.to_out = nn.Linear(d, d)

    @torch.no_grad()
    def fuse_projections(self) -> None:
        """Replace ``to_q``/``to_k``/``to_v`` by one ``to_qkv`` (the checkpoint's own fused layout)."""
        if self.to_qkv is not None:
            return
        self.to_qkv = fuse_linears(self.to_q, self.to_k, self.to_v)
        del self.to_q, self.to_k, self.to_v

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (B, S, D) -> q, k (per-head LayerNorms applied), v, each (B, nh, S, dh). Token-local."""
        if self.to_qkv is not None:
            q, k, v = self.to_qkv(x).chunk(3, dim=-1)
            # v gets its own storage, so the fused output is freed once q and k are normed
            # (otherwise v's view would keep all three alive through the attention).
            v = v.contiguous()
        else:
            q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)
        q = self.norm_q(split_heads(q, self.num_heads))
        k = self.norm_k(split_heads(k, self.num_heads))
        return q, k, split_heads(v, self.num_heads)

    def extra_kv(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of extra tokens: (Be, R, D) -> k (k-LayerNorm applied), v, each (Be, nh, R, dh)."""
        if self.to_qkv is not None:
            d = tokens.shape[-1]
            weight, bias = self.to_qkv.weight, self.to_qkv.bias
            k = F.linear(tokens, weight[d : 2 * d], bias[d : 2 * d])
            v = F.linear(tokens, weight[2 * d :], bias[2 * d :])
        else:
            k, v = self.to_k(tokens), self.to_v(tokens)
        return self.norm_k(split_heads(k, self.num_heads)), split_heads(v, self.num_heads)

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        text_length: int,
        rope: tuple[torch.Tensor, torch.Tensor],
        extra_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """q, k, v: (B, nh', L+N, dh) from :meth:`project` (nh' may be a subset of the heads);
        rope: cos, sin each (N, dh); extra_kv: from :meth:`extra_kv`, (B or 1, nh', R, dh) each.

        Returns the attention output (B, nh', L+N, dh), before ``to_out``.
        """
        cos, sin = rope
        q = torch.cat([q[:, :, :text_length], apply_rotary(q[:, :, text_length:], cos, sin)], dim=2)
        k = torch.cat([k[:, :, :text_length], apply_rotary(k[:, :, text_length:], cos, sin)], dim=2)
        if extra_kv is not None:
            k_extra, v_extra = extra_kv
            if k_extra.shape[0] == 1 and k.shape[0] > 1:  # one set of tokens shared by the whole batch
                k_extra = k_extra.expand(k.shape[0], -1, -1, -1)
                v_extra = v_extra.expand(k.shape[0], -1, -1, -1)
            k = torch.cat([k, k_extra.to(k.dtype)], dim=2)  # (B, nh', L+N+R, dh)
            v = torch.cat([v, v_extra.to(v.dtype)], dim=2)
        return dispatch_attention(q, k, v)

    def forward(
        self,
        x: torch.Tensor,
        text_length: int,
        rope: tuple[torch.Tensor, torch.Tensor],
        extra_kv_tokens: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """x: (B, L+N, D); rope: cos, sin each (N, dh); extra_kv_tokens: (B or 1, R, D) tokens or
        their precomputed (k, v) -> (B, L+N, D)."""
        extra = self.extra_kv(extra_kv_tokens) if isinstance(extra_kv_tokens, torch.Tensor) else extra_kv_tokens
        # project -> q, k, v (B, nh, L+N, dh) each
        return self.to_out(merge_heads(self.attend(*self.project(x), text_length, rope, extra)))


def fuse_projections(module: nn.Module) -> int:
    """Fuse the q/k/v (and cross-attention k/v) projections of every attention in ``module``.

    Attached from outside after the weights are loaded (the state dict keeps the separate keys
    until then, so loading stays strict); returns how many attentions were fused.
    """
    attentions = [sub for sub in module.modules() if sub is not module and hasattr(sub, "fuse_projections")]
    for attention in attentions:
        attention.fuse_projections()
    return len(attentions)


@torch.no_grad()
def fuse_linears(*linears: nn.Linear) -> nn.Linear:
    """One Linear whose output is the given Linears' outputs concatenated (same input width)."""
    first = linears[0]
    fused = nn.Linear(
        first.in_features,
        sum(layer.out_features for layer in linears),
        bias=first.bias is not None,
        device=first.weight.device,
        dtype=first.weight.dtype,
    )
    fused.weight.copy_(torch.cat([layer.weight for layer in linears]))
    if first.bias is not None:
        fused.bias.copy_(torch.cat([layer.bias for layer in linears]))
    return fused


class FeedForward(nn.Module):
    """Linear -> GELU (tanh approximation) -> Linear."""

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        self.proj_in = nn.Linear(config.hidden_size, config.mlp_ratio * config.hidden_size)
        self.proj_out = nn.Linear(config.mlp_ratio * config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_out(F.gelu(self.proj_in(x), approximate="tanh"))


class AdaLNModulation(nn.Module):
    """SiLU -> Linear from the time embedding to `chunks` modulation vectors of width D."""

    def __init__(self, time_embed_dim: int, hidden_size: int, chunks: int) -> None:
        super().__init__()
        self.chunks = chunks
        self.linear = nn.Linear(time_embed_dim, chunks * hidden_size)

    def forward(self, emb: torch.Tensor) -> tuple[torch.Tensor, ...]:  # (B, E) -> chunks x (B, D)
        return self.linear(F.silu(emb)).chunk(self.chunks, dim=1)


class Modulation(NamedTuple):
    """The 12 AdaLN vectors of one block, in the checkpoint's chunk order. Each (B, D)."""

    shift_msa: torch.Tensor
    scale_msa: torch.Tensor
    gate_msa: torch.Tensor
    shift_mlp: torch.Tensor
    scale_mlp: torch.Tensor
    gate_mlp: torch.Tensor
    text_shift_msa: torch.Tensor
    text_scale_msa: torch.Tensor
    text_gate_msa: torch.Tensor
    text_shift_mlp: torch.Tensor
    text_scale_mlp: torch.Tensor
    text_gate_mlp: torch.Tensor


class DiTBlock(nn.Module):
    """One CogVideoX block: modulated self-attention and MLP, text and video modulated separately.

    The steps are separate methods so that the Hallo3 block can insert its cross-attentions
    between them and the reference network can stop after the attention input of its last layer.
    With ``attention_and_mlp=False`` only the modulated input norm is built (the reference
    network's last layer, whose attention and MLP outputs are never used).
    """

    def __init__(self, config: BackboneConfig, attention_and_mlp: bool = True) -> None:
        super().__init__()
        d = config.hidden_size
        self.norm1 = nn.LayerNorm(d, eps=config.layernorm_eps)
        self.adaln = AdaLNModulation(config.time_embed_dim, d, 12)
        self.has_attention_and_mlp = attention_and_mlp
        if attention_and_mlp:
            self.attn = SelfAttention(config)
            self.norm2 = nn.LayerNorm(d, eps=config.layernorm_eps)
            self.ff = FeedForward(config)

    def modulation(self, emb: torch.Tensor) -> Modulation:
        return Modulation(*self.adaln(emb))

    def attention_input(
        self, text: torch.Tensor, video: torch.Tensor, mod: Modulation
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """LayerNorm + modulation. text: (B, L, D), video: (B, N, D) -> same shapes."""
        text_in = modulate(self.norm1(text), mod.text_shift_msa, mod.text_scale_msa)
        video_in = modulate(self.norm1(video), mod.shift_msa, mod.scale_msa)
        return text_in, video_in

    def attention_residual(
        self,
        text: torch.Tensor,
        video: torch.Tensor,
        text_in: torch.Tensor,
        video_in: torch.Tensor,
        mod: Modulation,
        rope: tuple[torch.Tensor, torch.Tensor],
        extra_kv_tokens: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gated self-attention residual over [text_in; video_in] (+ extra K/V tokens or their (k, v))."""
        length = text.shape[1]
        out = self.attn(torch.cat([text_in, video_in], dim=1), length, rope, extra_kv_tokens)
        text = text + mod.text_gate_msa.unsqueeze(1) * out[:, :length]
        video = video + mod.gate_msa.unsqueeze(1) * out[:, length:]
        return text, video

    def mlp_residual(
        self, text: torch.Tensor, video: torch.Tensor, mod: Modulation
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Gated MLP residual; one MLP call over [text; video]."""
        length = text.shape[1]
        text_in = modulate(self.norm2(text), mod.text_shift_mlp, mod.text_scale_mlp)
        video_in = modulate(self.norm2(video), mod.shift_mlp, mod.scale_mlp)
        out = self.ff(torch.cat([text_in, video_in], dim=1))
        text = text + mod.text_gate_mlp.unsqueeze(1) * out[:, :length]
        video = video + mod.gate_mlp.unsqueeze(1) * out[:, length:]
        return text, video


class DiTBackbone(nn.Module):
    """Input embeddings shared by the main transformer and the reference network.

    Parameters: ``time_embed``, ``patch_embed`` and the learned ``pos_embedding`` over text plus
    every video position. Subclasses add their blocks.
    """

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        self.config = config
        self.time_embed = TimestepEmbedding(config)
        self.patch_embed = PatchEmbedding(config)
        self.pos_embedding = nn.Parameter(torch.zeros(1, config.max_positions, config.hidden_size))

    def embed(
        self, latents: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """latents: (B, T, C, H, W), timesteps: (B,), text: (B, L, text_dim).

        Returns the time embedding (B, E), text tokens (B, L, D) and video tokens (B, T*h*w, D).
        """
        dtype = self.pos_embedding.dtype
        emb = self.time_embed(timesteps)
        tokens = self.patch_embed(latents.to(dtype), text.to(dtype))  # (B, L + N, D)
        tokens = tokens + self.pos_embedding[:, : tokens.shape[1]]
        length = text.shape[1]
        # Separate storages, so every block sees the same strides (one compiled graph serves them all).
        return emb, tokens[:, :length].contiguous(), tokens[:, length:].contiguous()

    def rope(self, frames: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary cos/sin tables for ``frames`` latent frames, each (frames*h*w, dh) float32."""
        c = self.config
        return rotary_tables(frames, c.grid_height, c.grid_width, c.head_dim, c.rope_theta, device)
