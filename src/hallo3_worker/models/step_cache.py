"""Step caching for the main transformer ("fast" preset): reuse the body's residual between steps.

A First-Block-Cache: at every denoising step block 0 runs as usual; its video residual (output
minus input) is compared with the one of the last step that ran every block, by relative L1
distance ``mean|r - r_prev| / mean|r_prev|``. Below the threshold the step skips blocks 1..N-1
and adds the residual those blocks produced at that last full step (output of the last block
minus output of block 0, for the text and the video tokens). Otherwise every block runs and the
cache is refreshed. Comparing against the last *full* step (not the previous step) bounds the
drift: small changes add up until one step crosses the threshold and recomputes.

The caller (:mod:`hallo3_worker.presets`) drives it: :meth:`StepCache.begin` per segment (which
resets it), :meth:`StepCache.next_step` before every transformer forward (with ``force=True`` on
the first and last step of a segment, which always run in full), :meth:`StepCache.end` after the
segment. A change of batch size (classifier-free guidance switched off part-way) also forces a
full step. While no segment is open the blocks run exactly as written.

How it is attached: :func:`attach_step_cache` swaps each block's class for a subclass whose
``__call__`` consults the cache and otherwise calls the block as before (so weights, state-dict
keys, ``isinstance`` and a regional ``torch.compile`` of the blocks stay as they are); the
decision itself runs outside any compiled region. The block code is not touched.

Why not cache-dit (PyPI ``cache-dit``, DBCache through a ``BlockAdapter``): its forward patterns
require blocks whose parameters are named ``hidden_states``/``encoder_hidden_states`` with the
video stream first, while ours take ``(text, video, ...)`` positionally; it manages one context
per pipeline call with its own CFG handling (our guided batch is one forward of [uncond; cond]
per step, and our segments each restart the schedule); and it brings diffusers-pipeline hooks
and a 0.5 MB dependency for what is about a hundred lines here.

Under a sequence-parallel split each rank sees a shard of the tokens: ``reduce`` (default:
none) must then sum the two L1 norms over the ranks so that every rank takes the same decision.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

logger = logging.getLogger(__name__)

#: reduce(stacked) -> stacked: combines the (|r - r_prev| sum, |r_prev| sum, count) of every rank.
Reduce = Callable[[torch.Tensor], torch.Tensor]


class StepCache:
    """Cache state of one transformer; see the module docstring."""

    def __init__(self, num_blocks: int, reduce: Reduce | None = None) -> None:
        self.num_blocks = num_blocks
        self.reduce = reduce
        self.active = False
        self.threshold = 0.0
        self.full_steps = 0  # over the lifetime; the caller takes differences per job
        self.reused_steps = 0
        self._reset()

    def _reset(self) -> None:
        self.force = True
        self.reuse = False
        self.previous: torch.Tensor | None = None  # block 0's video residual at the last full step
        self.first_out: tuple[torch.Tensor, torch.Tensor] | None = None  # block 0's output this step
        self.residual: tuple[torch.Tensor, torch.Tensor] | None = None  # blocks 1..N-1's (text, video)

    def begin(self, threshold: float) -> None:
        """Open a segment: nothing cached. ``threshold`` <= 0 leaves the blocks untouched."""
        self._reset()
        self.threshold = threshold
        self.active = threshold > 0 and self.num_blocks > 1

    def end(self) -> None:
        """Close the segment and drop the cached tensors."""
        self._reset()
        self.active = False

    def next_step(self, force: bool = False) -> None:
        """Called before each transformer forward; ``force`` makes this step run every block."""
        self.force = force
        self.reuse = False

    # ------------------------------------------------------------------ called by the blocks

    def after_first_block(self, video_in: torch.Tensor, out: tuple[torch.Tensor, torch.Tensor]) -> None:
        residual = out[1] - video_in
        reuse = False
        if not self.force and self.previous is not None and self.residual is not None \
                and self.previous.shape == residual.shape:
            reuse = self._distance(residual) < self.threshold
        self.reuse = reuse
        if reuse:
            self.reused_steps += 1
        else:
            self.previous = residual
            self.first_out = out
            self.full_steps += 1

    def _distance(self, residual: torch.Tensor) -> float:
        sums = torch.stack([
            (residual.float() - self.previous.float()).abs().sum(),
            self.previous.float().abs().sum(),
        ])
        if self.reduce is not None:
            sums = self.reduce(sums)
        change, scale = sums.tolist()
        return change / scale if scale > 0 else float("inf")

    def after_last_block(self, out: tuple[torch.Tensor, torch.Tensor]) -> None:
        first_text, first_video = self.first_out
        self.residual = (out[0] - first_text, out[1] - first_video)
        self.first_out = None

    def cached_output(self, text: torch.Tensor, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The last block's output on a reused step: its input plus the cached residual."""
        res_text, res_video = self.residual
        return text + res_text, video + res_video


class _StepCachedBlock:
    """Mixed in front of a block's class by :func:`attach_step_cache`."""

    _step_cache: StepCache
    _step_cache_index: int

    def __call__(self, text: torch.Tensor, video: torch.Tensor, *args, **kwargs):
        cache, index = self._step_cache, self._step_cache_index
        if not cache.active:
            return super().__call__(text, video, *args, **kwargs)
        last = index == cache.num_blocks - 1
        if index == 0:
            out = super().__call__(text, video, *args, **kwargs)
            cache.after_first_block(video, out)
            return out
        if cache.reuse:
            return cache.cached_output(text, video) if last else (text, video)
        out = super().__call__(text, video, *args, **kwargs)
        if last:
            cache.after_last_block(out)
        return out


_SUBCLASSES: dict[type, type] = {}


def _cached_class(cls: type) -> type:
    if cls not in _SUBCLASSES:
        _SUBCLASSES[cls] = type(f"StepCached{cls.__name__}", (_StepCachedBlock, cls), {})
    return _SUBCLASSES[cls]


def attach_step_cache(blocks: nn.ModuleList, reduce: Reduce | None = None) -> StepCache:
    """Make ``blocks`` (each called as ``block(text, video, ...) -> (text, video)``) consult one cache.

    Attaching twice returns the cache already attached. Inactive until :meth:`StepCache.begin`.
    """
    existing = getattr(blocks[0], "_step_cache", None) if len(blocks) else None
    if existing is not None:
        return existing
    cache = StepCache(len(blocks), reduce)
    for index, block in enumerate(blocks):
        block.__class__ = _cached_class(type(block))
        object.__setattr__(block, "_step_cache", cache)
        object.__setattr__(block, "_step_cache_index", index)
    logger.debug("step cache attached to %d blocks", len(blocks))
    return cache


def detach_step_cache(blocks: nn.ModuleList) -> None:
    """Undo :func:`attach_step_cache`."""
    for block in blocks:
        if isinstance(block, _StepCachedBlock):
            block.__class__ = type(block).__mro__[2]
            del block.__dict__["_step_cache"], block.__dict__["_step_cache_index"]


__all__ = ["StepCache", "attach_step_cache", "detach_step_cache"]
