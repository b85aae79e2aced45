"""Several GPUs per worker: one process per GPU, this process being rank 0.

:func:`start_ranks` reads ``HALLO3_GPUS`` / ``HALLO3_PARALLEL`` (or a rank count given by a
script), checks the layout against the model's heads, starts ranks 1..N-1 and joins the process
group; :meth:`Ranks.attach` hands the pipeline's denoising to all ranks once every rank has
loaded its transformer. Rank 0 keeps everything else: the Runpod loop, ``prepare``, the
once-per-job networks, the sampler, the VAE and delivery. The other ranks only hold the main
transformer (:func:`follower_main`).

A rank that stops or hangs fails the running job (:class:`~hallo3_worker.parallel.denoise.ParallelFailure`);
the worker then stops the other ranks and exits non-zero so that the platform replaces it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import TYPE_CHECKING

import torch

from hallo3_worker.parallel.denoise import ParallelDenoiser, serve
from hallo3_worker.parallel.group import RankContext, host_store, init_rank, leave, wait_for_all
from hallo3_worker.parallel.launch import FollowerProcesses, exit_with_parent
from hallo3_worker.parallel.layout import ParallelLayout, choose_layout
from hallo3_worker.settings import Settings, SettingsError
from hallo3_worker.worker.runtime import configure_logging, resolve_device, resolve_dtype, speedups_for

if TYPE_CHECKING:
    from hallo3_worker.models.transformer import Hallo3Transformer
    from hallo3_worker.pipeline import Hallo3Pipeline

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RankSpec:
    """What every rank needs to join: the settings, the layout, the store's port, the device kind."""

    settings: Settings
    layout: ParallelLayout
    port: int
    device_type: str

    def device(self, rank: int) -> torch.device:
        return torch.device("cuda", rank) if self.device_type == "cuda" else torch.device("cpu")


def model_heads(settings: Settings) -> int:
    """Attention heads of the main transformer the worker will load."""
    if settings.weights_dir is None:
        from hallo3_worker.tiny import tiny_transformer_config

        return tiny_transformer_config().num_heads
    from hallo3_worker.models.transformer import TransformerConfig

    return TransformerConfig().num_heads  # the released checkpoint's 48


def world_size(settings: Settings, device: torch.device, requested: int | None = None) -> tuple[int, str]:
    """How many ranks to run, and the setting it came from (for messages).

    ``requested`` (a script's ``--ranks``) wins; on the CPU it starts that many gloo processes.
    ``HALLO3_GPUS=auto`` is every visible CUDA GPU (1 off CUDA); a number must not exceed them.
    """
    if requested is not None:
        source = "--ranks"
        count = requested
    elif settings.gpus == "auto":
        return (torch.cuda.device_count() if device.type == "cuda" else 1) or 1, "HALLO3_GPUS"
    else:
        source, count = "HALLO3_GPUS", int(settings.gpus)
        if count > 1 and device.type != "cuda":
            raise SettingsError(f"HALLO3_GPUS={count} needs CUDA GPUs, but the worker runs on {device.type}")
    if count < 1:
        raise SettingsError(f"{source} must be at least 1, got {count}")
    if count > 1 and device.type == "cuda":
        visible = torch.cuda.device_count()
        if count > visible:
            raise SettingsError(f"{source}={count}, but only {visible} CUDA GPU(s) are visible")
        if device.index not in (None, 0):
            raise SettingsError(f"HALLO3_DEVICE={settings.device} names one GPU; with {source}={count} "
                                f"the ranks use cuda:0 to cuda:{count - 1}")
    return count, source


class Ranks:
    """Rank 0's handle on the other ranks."""

    def __init__(self, spec: RankSpec, followers: FollowerProcesses, context: RankContext) -> None:
        self.spec, self.followers, self.context = spec, followers, context
        self.denoiser: ParallelDenoiser | None = None
        self._closed = False

    @property
    def layout(self) -> ParallelLayout:
        return self.spec.layout

    @property
    def failure(self) -> str | None:
        """Why the ranks cannot serve another job, or None while they can."""
        if self.denoiser is not None and self.denoiser.broken is not None:
            return self.denoiser.broken
        return self.followers.failure()

    def attach(self, pipeline: Hallo3Pipeline) -> None:
        """Let every rank compute ``pipeline``'s denoising; waits until every rank has loaded its transformer.

        Raises SettingsError when rank 0's transformer streams its blocks (``HALLO3_OFFLOAD=full``)
        under a Ulysses split, which runs the blocks' pieces rather than the blocks.
        """
        if self.layout.ulysses > 1 and getattr(pipeline, "block_streamer", None) is not None:
            raise SettingsError(
                f"HALLO3_OFFLOAD=full streams the transformer's blocks through the first GPU, which the "
                f"{self.layout} split (Ulysses {self.layout.ulysses}) cannot run; use HALLO3_OFFLOAD=off or "
                "partial (the other GPUs hold only the transformer) or HALLO3_PARALLEL=2x1"
            )
        self.denoiser = ParallelDenoiser(self.context, pipeline.components.transformer, self.followers.failure)
        pipeline.parallel = self.denoiser
        wait_for_all(self.context, "loaded")
        logger.info("denoising on %s", self.layout.describe())

    def close(self) -> None:
        """Stop the other ranks (a ``stop`` command, then signals) and leave the group. Idempotent."""
        if self._closed:
            return
        self._closed = True
        healthy = self.failure is None
        if healthy and self.denoiser is not None:
            try:
                self.denoiser.stop()
            except Exception:  # they are ended by signal below
                logger.warning("could not send the stop command", exc_info=True)
                healthy = False
        self.followers.stop(grace_s=10.0 if healthy else 1.0)
        if healthy:
            leave()


def serving_settings(settings: Settings, ranks: Ranks | None) -> Settings:
    """The settings the worker serves with: on several ranks only the ``exact`` preset, for now.

    The approximate presets' step cache and CFG truncation act on the serial model function, and
    their fp8 layers would switch on in rank 0 only; their jobs are refused with the endpoint's
    list of presets (``exact``) instead.
    """
    if ranks is None or tuple(settings.presets) == ("exact",):
        return settings
    logger.warning("with %d ranks only the exact preset is served; HALLO3_PRESETS=%s is narrowed to exact",
                   ranks.layout.world_size, ",".join(settings.presets))
    return dataclasses.replace(settings, presets=("exact",))


def start_ranks(settings: Settings, requested: int | None = None) -> Ranks | None:
    """Start the other ranks when the settings (or ``requested``) ask for more than one; else None.

    Raises SettingsError naming the setting when the GPU count or the layout cannot work.
    """
    device = resolve_device(settings)
    count, source = world_size(settings, device, requested)
    layout = choose_layout(count, model_heads(settings), settings.parallel, source=source)
    if count == 1:
        return None
    if device.type == "cuda":
        # An exchange that times out raises in the waiting thread (the job fails with a clear
        # error) instead of the watchdog ending the process.
        os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")
    store = host_store(count)
    spec = RankSpec(settings, layout, store.port, device.type)
    logger.info("starting %d ranks (%s, %s), collective timeout %g s", count, layout.describe(),
                "NCCL" if device.type == "cuda" else "gloo", settings.collective_timeout_s)
    followers = FollowerProcesses(follower_main, count, (spec,))
    try:
        context = init_rank(0, layout, spec.device(0), store=store, timeout_s=settings.collective_timeout_s)
    except BaseException:
        followers.stop(grace_s=0.0)
        raise
    return Ranks(spec, followers, context)


# ------------------------------------------------------------------------------ ranks 1..N-1


def follower_main(rank: int, spec: RankSpec) -> None:
    """Entry point of ranks 1..N-1: join, load the transformer, follow rank 0 until ``stop``."""
    configure_logging(spec.settings)
    for handler in logging.getLogger("hallo3_worker").handlers:  # this rank's lines carry its number
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s"))
    exit_with_parent()
    device = spec.device(rank)
    try:
        context = init_rank(rank, spec.layout, device, port=spec.port, timeout_s=spec.settings.collective_timeout_s)
        transformer = follower_transformer(spec.settings, device, compiled=spec.layout.ulysses == 1)
        wait_for_all(context, "loaded")
        serve(context, transformer)
        leave()
    except BaseException:
        logger.exception("rank %d failed", rank)
        logging.shutdown()
        raise SystemExit(1) from None


def follower_transformer(settings: Settings, device: torch.device, *, compiled: bool = True) -> Hallo3Transformer:
    """The main transformer as rank 0's pipeline has it: same weights, same exact speed-ups.

    ``compiled``: compile its blocks as the settings ask (the Ulysses path runs the blocks' pieces,
    not the blocks, so it has nothing to compile).
    """
    from hallo3_worker.models.speedups import apply_speedups
    from hallo3_worker.pipeline import Placement

    dtype = resolve_dtype(settings, device)
    if settings.weights_dir is None:
        from hallo3_worker.tiny import build_tiny_transformer

        transformer = build_tiny_transformer(Placement(device=device, dtype=dtype))
    else:
        from hallo3_worker import weights as hw

        location = hw.locate_weights(settings.weights_dir)
        networks = hw.load_networks(location, device=device, dtype=dtype, components=(hw.TRANSFORMER,), verify=False)
        transformer = networks.transformer
    blocks = transformer.blocks if compiled else None
    apply_speedups(speedups_for(settings, device), device, transformer, compiled=blocks)
    return transformer.eval()


__all__ = [
    "RankSpec",
    "Ranks",
    "follower_main",
    "follower_transformer",
    "model_heads",
    "serving_settings",
    "start_ranks",
    "world_size",
]
