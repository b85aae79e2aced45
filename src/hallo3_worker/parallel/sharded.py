"""The main transformer's forward on one rank's share of the video tokens (Ulysses).

The same computation as :meth:`Hallo3Transformer.forward
<hallo3_worker.models.transformer.Hallo3Transformer.forward>`, built from the block's own pieces:

* embedding, AdaLN modulation, the norms, the MLP and the final layer are per token: each rank
  runs them on the 226 text tokens (replicated) and its contiguous range of video tokens;
* the self-attention projects locally (:meth:`SelfAttention.project`), trades tokens for heads
  (:func:`.exchange.heads_from_tokens`), attends over [text; all video; reference] for its heads
  with the reference keys/values of those heads (:meth:`SelfAttention.attend`), and trades back;
* the face cross-attention is per token: each local token uses the frame-0 rotary row of its
  spatial position, as the serial path's tiled table does;
* the audio cross-attention groups the local tokens by latent frame (a range may start or end
  inside a frame) and each piece attends to its own frame's audio tokens.

The model's modules and weights are used as they are; nothing is copied or changed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from hallo3_worker.models.layers import Modulation, merge_heads
from hallo3_worker.models.transformer import Hallo3Block, Hallo3Transformer
from hallo3_worker.parallel.exchange import heads_from_tokens, token_splits, tokens_from_heads

Reference = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class ShardedTransformer:
    """Runs ``transformer`` on share ``index`` of ``parts`` of the video tokens; ``group`` holds the parts."""

    def __init__(
        self, transformer: Hallo3Transformer, index: int, parts: int, group: dist.ProcessGroup | None
    ) -> None:
        heads = transformer.config.num_heads
        if heads % parts:
            raise ValueError(f"{parts} token shares do not divide {heads} heads")
        self.transformer = transformer
        self.index, self.parts, self.group = index, parts, group
        self.heads = slice(index * heads // parts, (index + 1) * heads // parts)

    def local_reference(self, reference: list[Reference]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per block, the reference keys and values of this rank's heads, (B or 1, nh/U, R, dh) each.

        ``reference`` is one (B or 1, R, D) token tensor per block or the per-block (k, v) pairs of
        :meth:`Hallo3Transformer.reference_kv`.
        """
        dtype = self.transformer.pos_embedding.dtype
        local = []
        for block, ref in zip(self.transformer.blocks, reference, strict=True):
            k, v = block.attn.extra_kv(ref.to(dtype)) if isinstance(ref, torch.Tensor) else ref
            local.append((k[:, self.heads].to(dtype).contiguous(), v[:, self.heads].to(dtype).contiguous()))
        return local

    def token_range(self, total: int) -> tuple[int, int]:
        splits = token_splits(total, self.parts)
        start = sum(splits[: self.index])
        return start, start + splits[self.index]

    def __call__(
        self,
        hidden_states: torch.Tensor,
        timesteps: torch.Tensor,
        text: torch.Tensor,
        audio_tokens: torch.Tensor,
        face_tokens: torch.Tensor,
        reference: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """Arguments as for the serial forward, ``reference`` from :meth:`local_reference`.

        Returns the final layer's output for this rank's video tokens, (B, n_local, p*p*C_out), in
        the weights' dtype; :func:`hallo3_worker.models.transformer.unpatchify` of all ranks'
        outputs in token order is the serial forward's result.
        """
        t, c = self.transformer, self.transformer.config
        b, frames = hidden_states.shape[:2]
        if audio_tokens.shape[:2] != (b, frames):
            raise ValueError(f"audio tokens {tuple(audio_tokens.shape)} do not match {b} x {frames} latent frames")
        dtype = t.pos_embedding.dtype
        emb, text_tokens, video = t.embed(hidden_states, timesteps, text)
        total = video.shape[1]
        splits = token_splits(total, self.parts)
        start, stop = self.token_range(total)
        video = video[:, start:stop].clone()  # the other ranks' tokens are not kept
        cos, sin = t.rope(frames, hidden_states.device)
        hw = c.tokens_per_frame
        spatial = torch.arange(start, stop, device=cos.device) % hw
        local_rope = (cos[:hw][spatial], sin[:hw][spatial])  # frame-0 rows of each local token's position
        pieces = _frame_pieces(start, stop, hw)
        audio_tokens = audio_tokens.to(dtype)
        face_tokens = face_tokens.to(dtype)
        for block, ref in zip(t.blocks, reference, strict=True):
            mod = block.modulation(emb)
            text_in, video_in = block.attention_input(text_tokens, video, mod)
            text_tokens, video = self._attention_residual(
                block, text_tokens, video, text_in, video_in, mod, (cos, sin), ref, splits
            )
            del text_in, video_in
            video = _cross_attentions(block, video, audio_tokens, face_tokens, local_rope, pieces)
            text_tokens, video = block.mlp_residual(text_tokens, video, mod)
        return t.final(t.norm_final(video), emb)

    def _attention_residual(
        self,
        block: Hallo3Block,
        text: torch.Tensor,
        video: torch.Tensor,
        text_in: torch.Tensor,
        video_in: torch.Tensor,
        mod: Modulation,
        rope: tuple[torch.Tensor, torch.Tensor],
        reference: tuple[torch.Tensor, torch.Tensor],
        splits: list[int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`DiTBlock.attention_residual` with the attention's heads spread over the group."""
        length = text.shape[1]
        attn = block.attn
        q, k, v = attn.project(torch.cat([text_in, video_in], dim=1))  # (B, nh, L + n, dh) each
        text_qkv = [x[:, self.heads, :length] for x in (q, k, v)]  # the text is on every rank
        video_qkv = torch.stack([x[:, :, length:] for x in (q, k, v)])  # (3, B, nh, n, dh)
        del q, k, v
        vq, vk, vv = heads_from_tokens(video_qkv, splits, self.group)  # (B, nh/U, N, dh) each
        del video_qkv
        q, k, v = (torch.cat([tx, vx], dim=2) for tx, vx in zip(text_qkv, (vq, vk, vv)))
        del text_qkv, vq, vk, vv
        out = attn.attend(q, k, v, length, rope, reference)  # (B, nh/U, L + N, dh)
        del q, k, v
        out = attn.to_out(merge_heads(tokens_from_heads(out, length, splits, self.index, self.group)))
        text = text + mod.text_gate_msa.unsqueeze(1) * out[:, :length]
        video = video + mod.gate_msa.unsqueeze(1) * out[:, length:]
        return text, video


def _frame_pieces(start: int, stop: int, tokens_per_frame: int) -> list[tuple[int, int, int]]:
    """(latent frame, local start, local stop) of each run of local tokens [start, stop) in one frame."""
    pieces = []
    position = start
    while position < stop:
        frame = position // tokens_per_frame
        end = min(stop, (frame + 1) * tokens_per_frame)
        pieces.append((frame, position - start, end - start))
        position = end
    return pieces


def _cross_attentions(
    block: Hallo3Block,
    video: torch.Tensor,
    audio_tokens: torch.Tensor,
    face_tokens: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    pieces: list[tuple[int, int, int]],
) -> torch.Tensor:
    """The block's face and audio residuals on local tokens. audio_tokens: (B, T, Ma, Da)."""
    norm_q, norm_k = block.attn.norm_q, block.attn.norm_k
    video = video + block.face_attn(block.face_norm(video), face_tokens, norm_q, norm_k, rope)
    normed = block.audio_norm(video)
    audio_out = torch.cat(
        [
            block.audio_attn(normed[:, a:z], audio_tokens[:, frame], norm_q, norm_k, (rope[0][a:z], rope[1][a:z]))
            for frame, a, z in pieces
        ],
        dim=1,
    )
    return video + audio_out


__all__ = ["ShardedTransformer"]
