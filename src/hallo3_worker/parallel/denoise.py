"""The guided model function across ranks: rank 0 drives, the other ranks follow.

Rank 0 runs the pipeline as usual: conditioning, the sampler, the VAE, delivery, and all random
draws. Only the model function differs: :meth:`ParallelDenoiser.model_fn` has the same contract
as :func:`hallo3_worker.denoiser.guidance_model_fn`, and each call is computed by every rank.

Messages, in order (commands on the control group, tensors broadcast from rank 0 on the data group):

* ``segment``: the segment's conditions (conditioning latent, text, audio features, face
  embedding) and the per-block reference tokens or keys/values. Every rank builds the inputs of
  its CFG half (zero text and audio for the unconditional one) and, when the tokens are split, the
  reference keys/values of its heads;
* ``forward``: the sampler's latent batch and timesteps; every rank computes its share
  (:class:`~.sharded.ShardedTransformer`, or the plain forward of its half when the tokens are
  not split) and rank 0 gathers the shares into the v prediction of the whole guided batch;
* ``stop``: the other ranks leave their loop.

The other ranks draw no random numbers: the latents they see are rank 0's. Any failure inside an
exchange leaves the ranks out of step, so it makes the group unusable: the job fails with
:class:`ParallelFailure` and every later call fails at once.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from hallo3_worker.denoiser import SegmentConditions
from hallo3_worker.models.transformer import Hallo3Transformer, unpatchify
from hallo3_worker.parallel.exchange import token_splits
from hallo3_worker.parallel.group import RankContext
from hallo3_worker.parallel.layout import ParallelLayout
from hallo3_worker.parallel.sharded import ShardedTransformer
from hallo3_worker.sampling import ModelFn

logger = logging.getLogger(__name__)

Reference = torch.Tensor | tuple[torch.Tensor, torch.Tensor]
T = TypeVar("T")
#: How long a failing rank 0 waits for the process monitor to name the rank that stopped.
_FAILURE_DETAIL_WAIT_S = 3.0


class ParallelFailure(RuntimeError):
    """A rank stopped, hung or fell out of step; the ranks cannot serve another job."""


@dataclasses.dataclass
class _Segment:
    """One rank's inputs for the current segment: its CFG half (or both), its reference heads."""

    rows: slice  # rows of the guided batch [uncond; cond] this rank computes
    concat: torch.Tensor
    text: torch.Tensor
    audio_tokens: torch.Tensor
    face_tokens: torch.Tensor
    reference: list[Any]


class _RankModel:
    """What every rank does with the segment and forward messages."""

    def __init__(self, context: RankContext, transformer: Hallo3Transformer) -> None:
        self.context = context
        self.transformer = transformer
        layout = context.layout
        self.sharded = (
            ShardedTransformer(transformer, context.ulysses_rank, layout.ulysses, context.ulysses_group)
            if layout.ulysses > 1
            else None
        )
        self.segment: _Segment | None = None

    # -------------------------------------------------------------------------- segment

    def receive_segment(self, header: dict[str, Any], tensors: list[torch.Tensor] | None = None) -> None:
        """Broadcast (rank 0: send ``tensors``) the segment's tensors and build this rank's inputs."""
        tensors = _broadcast_tensors(header["tensors"], tensors, self.context.device)
        concat, text, audio, face, *flat = tensors
        per_block = 2 if header["reference"] == "kv" else 1
        reference = [tuple(flat[i : i + 2]) if per_block == 2 else flat[i] for i in range(0, len(flat), per_block)]
        self.segment = self._inputs(SegmentConditions(concat, text, audio, face), reference)

    def _inputs(self, c: SegmentConditions, reference: list[Reference]) -> _Segment:
        """This rank's part of :func:`~hallo3_worker.denoiser.guidance_model_fn`'s batch."""
        halves = [self.context.cfg_index] if self.context.layout.cfg == 2 else [0, 1]
        batch = c.concat.shape[0]

        def pick(cond: torch.Tensor) -> torch.Tensor:  # the unconditional half has zeros
            return torch.cat([cond if half else torch.zeros_like(cond) for half in halves])

        with torch.no_grad():
            audio_tokens, face_tokens = self.transformer.encode_conditions(
                pick(c.audio_features), torch.cat([c.face_embedding] * len(halves))
            )
        if len(halves) > 1 and any(_batch(r) != 1 for r in reference):  # per-sample reference: one copy per half
            reference = [torch.cat([r] * len(halves)) if isinstance(r, torch.Tensor)
                         else tuple(torch.cat([t] * len(halves)) for t in r) for r in reference]
        if self.sharded is not None:
            reference = self.sharded.local_reference(reference)
        rows = slice(halves[0] * batch, (halves[-1] + 1) * batch)
        concat = torch.cat([c.concat] * len(halves))
        return _Segment(rows, concat, pick(c.text), audio_tokens, face_tokens, reference)

    # -------------------------------------------------------------------------- forward

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> list[torch.Tensor] | None:
        """This rank's share of v for the guided batch ``x``; rank 0 gets every rank's share."""
        s = self.segment
        if s is None:
            raise RuntimeError("a forward arrived before any segment")
        hidden = torch.cat([x[s.rows], s.concat.to(x.dtype)], dim=2)
        args = (hidden, timesteps[s.rows], s.text, s.audio_tokens, s.face_tokens, s.reference)
        share = self.sharded(*args) if self.sharded is not None else self.transformer(*args)
        return self._gather(share, x)

    def _share_shape(self, rank: int, x: torch.Tensor) -> tuple[int, ...]:
        c = self.transformer.config
        layout = self.context.layout
        rows = x.shape[0] // layout.cfg
        if self.sharded is None:
            return (rows, x.shape[1], c.out_channels, x.shape[3], x.shape[4])
        tokens = x.shape[1] * (x.shape[3] // c.patch_size) * (x.shape[4] // c.patch_size)
        share = token_splits(tokens, layout.ulysses)[layout.ulysses_rank(rank)]
        return (rows, share, c.patch_size**2 * c.out_channels)

    def _gather(self, share: torch.Tensor, x: torch.Tensor) -> list[torch.Tensor] | None:
        """Every rank's share at rank 0 (``dist.gather`` of shares padded to the largest)."""
        world = self.context.world_size
        shapes = [self._share_shape(rank, x) for rank in range(world)]
        if tuple(share.shape) != shapes[self.context.rank]:
            expected = shapes[self.context.rank]
            raise RuntimeError(f"rank {self.context.rank} computed {tuple(share.shape)}, expected {expected}")
        size = max(_numel(shape) for shape in shapes)
        padded = share.new_zeros(size)
        padded[: share.numel()] = share.reshape(-1)
        received = [torch.empty_like(padded) for _ in range(world)] if self.context.is_leader else None
        dist.gather(padded, received, dst=0)
        if received is None:
            return None
        return [flat[: _numel(shape)].view(shape) for flat, shape in zip(received, shapes)]

    def assemble(self, shares: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Rank 0: the shares -> v for the whole guided batch, (2B, T, C_out, H, W)."""
        c, layout = self.transformer.config, self.context.layout
        halves = []
        for cfg_index in range(layout.cfg):
            ranks = layout.ulysses_ranks(cfg_index)
            if self.sharded is None:
                halves.append(shares[ranks[0]])
                continue
            tokens = torch.cat([shares[rank] for rank in ranks], dim=1)
            halves.append(unpatchify(tokens, x.shape[1], x.shape[3] // c.patch_size, x.shape[4] // c.patch_size,
                                     c.out_channels, c.patch_size))
        return torch.cat(halves)


class ParallelDenoiser:
    """Rank 0's side: the pipeline's model function computed by all ranks.

    ``failure_detail`` (optional) names a rank that stopped, for the error message (the process
    monitor of :class:`~.launch.FollowerProcesses`).
    """

    def __init__(
        self,
        context: RankContext,
        transformer: Hallo3Transformer,
        failure_detail: Callable[[], str | None] | None = None,
    ) -> None:
        if not context.is_leader:
            raise ValueError("the ParallelDenoiser runs on rank 0; the other ranks call serve()")
        self.context = context
        self.rank_model = _RankModel(context, transformer)
        self.failure_detail = failure_detail or (lambda: None)
        self.broken: str | None = None

    @property
    def layout(self) -> ParallelLayout:
        return self.context.layout

    def model_fn(
        self, transformer: Hallo3Transformer, conditions: SegmentConditions, reference: list[Reference]
    ) -> ModelFn:
        """Same contract as :func:`~hallo3_worker.denoiser.guidance_model_fn`; sends the segment to every rank."""
        if transformer is not self.rank_model.transformer:
            raise ValueError("the parallel denoiser was set up for another transformer")
        c = conditions
        tensors: list[torch.Tensor] = [c.concat, c.text, c.audio_features, c.face_embedding]
        kind = "tokens" if isinstance(reference[0], torch.Tensor) else "kv"
        for r in reference:
            tensors.extend([r] if kind == "tokens" else r)
        tensors = [t.to(self.context.device).contiguous() for t in tensors]
        header = {"op": "segment", "reference": kind, "tensors": [_describe(t) for t in tensors]}
        self._guarded(lambda: (_send(self.context, header), self.rank_model.receive_segment(header, tensors)))

        def model_fn(x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            if x.shape[0] != 2 * c.concat.shape[0]:
                raise ValueError(f"expected the guided batch [uncond; cond] of {2 * c.concat.shape[0]}, "
                                 f"got {x.shape[0]}")
            return self._guarded(lambda: self._forward(x, timesteps))

        return model_fn

    def _forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        x = x.to(self.context.device).contiguous()
        timesteps = timesteps.to(device=self.context.device, dtype=torch.float32).contiguous()
        header = {"op": "forward", "tensors": [_describe(x), _describe(timesteps)]}
        _send(self.context, header)
        _broadcast_tensors(header["tensors"], [x, timesteps], self.context.device)
        shares = self.rank_model.forward(x, timesteps)
        return self.rank_model.assemble(shares, x)

    def stop(self) -> None:
        """Tell the other ranks to leave their loop (no-op once the group is broken)."""
        if self.broken is None:
            _send(self.context, {"op": "stop"})

    def _guarded(self, step: Callable[[], T]) -> T:
        if self.broken is not None:
            raise ParallelFailure(self.broken)
        try:
            return step()
        except Exception as err:
            detail = self._wait_for_detail()
            what = detail or f"an exchange failed: {type(err).__name__}: {_first_line(err)}"
            self.broken = (
                f"its {self.context.world_size} ranks fell out of step ({what}; "
                f"collective timeout {self.context.timeout_s:g} s)"
            )
            logger.error("parallel denoising failed: %s", self.broken, exc_info=True)
            raise ParallelFailure(self.broken) from err

    def _wait_for_detail(self) -> str | None:
        deadline = time.monotonic() + _FAILURE_DETAIL_WAIT_S
        while (detail := self.failure_detail()) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        return detail


def serve(context: RankContext, transformer: Hallo3Transformer) -> None:
    """The loop of every rank but 0: follow rank 0's commands until ``stop``."""
    if context.is_leader:
        raise ValueError("rank 0 drives; serve() is for the other ranks")
    model = _RankModel(context, transformer)
    logger.info("rank %d waiting for work", context.rank)
    with torch.inference_mode():
        while True:
            header = _receive(context)
            op = header["op"]
            if op == "stop":
                logger.info("rank %d stopping", context.rank)
                return
            if op == "segment":
                model.receive_segment(header)
            elif op == "forward":
                x, timesteps = _broadcast_tensors(header["tensors"], None, context.device)
                model.forward(x, timesteps)
            else:
                raise RuntimeError(f"rank {context.rank} received an unknown command {op!r}")


# ------------------------------------------------------------------------------ helpers


def _send(context: RankContext, header: dict[str, Any]) -> None:
    """Rank 0: one command to every rank, within the collective timeout (the control group's own
    timeout is the followers' idle wait, far longer)."""
    payload = torch.frombuffer(bytearray(json.dumps(header).encode()), dtype=torch.uint8)
    timeout = datetime.timedelta(seconds=context.timeout_s)
    for tensor in (torch.tensor([payload.numel()], dtype=torch.int64), payload):
        dist.broadcast(tensor, src=0, group=context.control, async_op=True).wait(timeout=timeout)


def _receive(context: RankContext) -> dict[str, Any]:
    """Ranks 1..N-1: wait (as long as the worker is idle) for rank 0's next command."""
    size = torch.zeros(1, dtype=torch.int64)
    dist.broadcast(size, src=0, group=context.control)
    payload = torch.empty(int(size.item()), dtype=torch.uint8)
    dist.broadcast(payload, src=0, group=context.control)
    return json.loads(payload.numpy().tobytes().decode())


def _describe(tensor: torch.Tensor) -> tuple[tuple[int, ...], str]:
    return tuple(tensor.shape), str(tensor.dtype).removeprefix("torch.")


def _broadcast_tensors(
    described: list[tuple[tuple[int, ...], str]], tensors: list[torch.Tensor] | None, device: torch.device
) -> list[torch.Tensor]:
    """Rank 0 sends ``tensors``; the others receive tensors of the described shapes and dtypes."""
    if tensors is None:
        tensors = [torch.empty(shape, dtype=getattr(torch, dtype), device=device) for shape, dtype in described]
    for tensor in tensors:
        dist.broadcast(tensor, src=0)
    return tensors


def _batch(reference: Reference) -> int:
    return (reference if isinstance(reference, torch.Tensor) else reference[0]).shape[0]


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for size in shape:
        n *= size
    return n


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else ""


__all__ = ["ParallelDenoiser", "ParallelFailure", "serve"]
