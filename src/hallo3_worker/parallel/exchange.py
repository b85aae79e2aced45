"""The Ulysses exchange: video tokens split over ranks <-> attention heads split over ranks.

The video tokens of one CFG half are split into contiguous ranges, one per rank of its Ulysses
group (:func:`token_splits`; the sizes may differ by one, ``all_to_all_single`` takes uneven
splits). The 226 text tokens are on every rank. Before the self-attention each rank sends every
other rank that rank's heads of its own video tokens (:func:`heads_from_tokens`), so each rank
attends with all tokens for its heads; afterwards the attention output goes back
(:func:`tokens_from_heads`), text rows included, so every rank holds all heads of the text rows
and of its own video tokens again. One ``all_to_all_single`` each way per block.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from hallo3_worker.models.transformer import TransformerConfig


def token_splits(total: int, parts: int) -> list[int]:
    """Sizes of ``parts`` contiguous ranges covering ``total`` tokens; the first ranges get one more."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def token_range(total: int, parts: int, index: int) -> tuple[int, int]:
    """(start, stop) of range ``index`` of :func:`token_splits`."""
    splits = token_splits(total, parts)
    start = sum(splits[:index])
    return start, start + splits[index]


def heads_from_tokens(local: torch.Tensor, splits: list[int], group: dist.ProcessGroup | None) -> torch.Tensor:
    """(S, B, nh, n_local, dh) -> (S, B, nh/U, N, dh): all video tokens, this rank's heads.

    ``S`` stacks tensors that travel together (q, k, v). ``splits`` holds every rank's token
    count in rank order; head block ``j`` goes to rank ``j`` of ``group``.
    """
    parts = len(splits)
    s, b, nh, n, dh = local.shape
    h = nh // parts
    send = local.reshape(s, b, parts, h, n, dh).permute(2, 0, 1, 3, 4, 5).contiguous()  # (U, S, B, h, n, dh)
    received = local.new_empty(s * b * h * sum(splits) * dh)
    dist.all_to_all_single(
        received,
        send.reshape(-1),
        output_split_sizes=[s * b * h * size * dh for size in splits],
        input_split_sizes=[s * b * h * n * dh] * parts,
        group=group,
    )
    pieces = received.split([s * b * h * size * dh for size in splits])
    return torch.cat([piece.view(s, b, h, size, dh) for piece, size in zip(pieces, splits)], dim=3)


def tokens_from_heads(
    out: torch.Tensor, text_length: int, splits: list[int], index: int, group: dist.ProcessGroup | None
) -> torch.Tensor:
    """(B, nh/U, L + N, dh) -> (B, nh, L + n_local, dh): every head of the text and this rank's video rows.

    ``index`` is this rank's place in ``group``. Every rank receives the same text rows, so the
    replicated text stays identical on all ranks.
    """
    parts = len(splits)
    b, h, _, dh = out.shape
    text, video = out[:, :, :text_length], out[:, :, text_length:]
    send = torch.cat([torch.cat([text, rows], dim=2).reshape(-1) for rows in video.split(splits, dim=2)])
    rows = text_length + splits[index]
    received = out.new_empty(parts * b * h * rows * dh)
    dist.all_to_all_single(
        received,
        send,
        output_split_sizes=[b * h * rows * dh] * parts,
        input_split_sizes=[b * h * (text_length + size) * dh for size in splits],
        group=group,
    )
    return received.view(parts, b, h, rows, dh).permute(1, 0, 2, 3, 4).reshape(b, parts * h, rows, dh)


def all_to_all_bytes_per_block(batch: int, text: int, video: int, hidden: int, parts: int, element_bytes: int) -> int:
    """Bytes one rank sends per block: q, k, v of its video tokens out, the attention output back.

    Per rank and block: 3 x (B x N/U x D) out (keeping 1/U locally), and (B x (L + N/U) x D)
    back per peer-share; the figure counts what leaves the rank.
    """
    local = video / parts
    out = 3 * batch * local * hidden * (parts - 1) / parts
    back = batch * (parts - 1) * (text + local) * hidden / parts
    return int((out + back) * element_bytes)


def step_volume(
    config: TransformerConfig, cfg: int, ulysses: int, element_bytes: int, reference_tokens: int = 1350
) -> dict[str, int]:
    """Bytes moved between ranks for one guided forward (one sampler step) under a layout, from the shapes.

    ``all_to_all_per_rank``: what one rank sends in the Ulysses exchanges of all blocks;
    ``broadcast``: the latent batch and timesteps rank 0 sends every rank (float32);
    ``gather``: the v shares the other ranks send rank 0. Per segment add the conditions and the
    reference keys/values (``segment_broadcast``), sent once.
    """
    video = config.latent_frames * config.tokens_per_frame
    batch = 2 // cfg
    world = cfg * ulysses
    per_block = all_to_all_bytes_per_block(batch, config.text_length, video, config.hidden_size, ulysses, element_bytes)
    latent = 2 * config.latent_frames * config.out_channels * config.latent_height * config.latent_width
    head_dim = config.hidden_size // config.num_heads
    reference = 2 * config.num_layers * config.num_heads * reference_tokens * head_dim  # k and v per block
    return {
        "all_to_all_per_rank": per_block * config.num_layers,
        "all_to_all_total": per_block * config.num_layers * world,
        "broadcast": (latent + 2) * 4 * (world - 1),
        "gather": latent * element_bytes * (world - 1) // world,
        "segment_broadcast": reference * element_bytes * (world - 1),
    }


__all__ = [
    "all_to_all_bytes_per_block",
    "heads_from_tokens",
    "step_volume",
    "token_range",
    "token_splits",
    "tokens_from_heads",
]
