"""The exact speed-ups of the Hallo3 networks, attached from outside after the weights are loaded.

Each one computes the same function as the plain networks (equal within float rounding; the tests
compare every one with the plain path in float32):

* ``fused_projections``: one matrix product for each attention's q/k/v and each cross-attention's
  k/v (:func:`hallo3_worker.models.layers.fuse_projections`), the checkpoint's own fused layout;
* ``reference_kv_once``: the pipeline turns the reference tokens into each block's keys and values
  once per job (:meth:`hallo3_worker.models.transformer.Hallo3Transformer.reference_kv`) instead of
  in every forward;
* ``compile_blocks``: regional ``torch.compile`` of the transformer blocks; all 42 blocks share one
  compiled graph (their weights are graph inputs), so compiling costs one block's worth of time;
  ``None`` means on for CUDA devices and off elsewhere;
* ``attention``: the attention kernel (:mod:`hallo3_worker.models.attention`), ``auto`` or a name.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import torch
from torch import nn

from hallo3_worker.models.attention import choose_backend, set_attention_backend
from hallo3_worker.models.layers import fuse_projections

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ExactSpeedups:
    """Which exact speed-ups a pipeline attaches. The defaults are what the worker runs."""

    fused_projections: bool = True
    reference_kv_once: bool = True
    compile_blocks: bool | None = None  # None: on for CUDA, off elsewhere
    attention: str = "auto"

    @classmethod
    def plain(cls) -> ExactSpeedups:
        """Every item off: the networks exactly as written."""
        return cls(fused_projections=False, reference_kv_once=False, compile_blocks=False, attention="sdpa")

    def compiles_on(self, device: torch.device) -> bool:
        return device.type == "cuda" if self.compile_blocks is None else self.compile_blocks


def compile_blocks(blocks: nn.ModuleList, **options: Any) -> int:
    """``torch.compile`` each block in place (one graph shared by blocks of the same class); returns how many.

    The compile itself happens on the first forward; its time belongs to the worker's cold start.
    """
    options = {"dynamic": False, **options}
    for block in blocks:
        if "forward" in vars(block):  # compiled already (another pipeline over the same networks)
            continue
        # The forward, not the module's whole call: forward hooks (block streaming) stay eager.
        block.forward = torch.compile(block.forward, **options)
    return len(blocks)


@torch.inference_mode()
def warm_up(transformer: nn.Module, device: torch.device, reference_kv: bool = True) -> float:
    """One guided forward on zeros, so a compiled transformer compiles now (cold start), not in the first job.

    Returns the seconds it took (the compile time, for the start-up log and timings).
    """
    c = transformer.config
    dtype = transformer.pos_embedding.dtype
    frames = 4 * (c.latent_frames - 1) + 1

    def zeros(*shape: int) -> torch.Tensor:
        return torch.zeros(*shape, device=device, dtype=dtype)

    started = time.perf_counter()
    audio, face = transformer.encode_conditions(
        zeros(2, frames, c.audio.window, c.audio.feature_layers, c.audio.feature_dim), zeros(2, c.face.embed_dim)
    )
    reference = [zeros(1, c.tokens_per_frame, c.hidden_size) for _ in range(c.num_layers)]
    if reference_kv:  # what the jobs pass (ExactSpeedups.reference_kv_once), so they reuse this graph
        reference = transformer.reference_kv(reference)
    x = zeros(2, c.latent_frames, c.in_channels, c.latent_height, c.latent_width)
    transformer(x, torch.full((2,), 999.0, device=device), zeros(2, c.text_length, c.text_dim), audio, face, reference)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def apply_speedups(
    speedups: ExactSpeedups, device: torch.device, *networks: nn.Module, compiled: nn.ModuleList | None = None
) -> dict[str, Any]:
    """Attach ``speedups`` to ``networks`` (fusion) and ``compiled`` (regional compile); set the attention backend.

    Returns what was done, for the log and the benchmarks.
    """
    backend = choose_backend(speedups.attention, device)
    set_attention_backend(backend)
    report: dict[str, Any] = {"attention": backend}
    if speedups.fused_projections:
        report["fused_attentions"] = sum(fuse_projections(net) for net in networks)
    if compiled is not None and speedups.compiles_on(device):
        report["compiled_blocks"] = compile_blocks(compiled)
    logger.info("exact speed-ups: %s", ", ".join(f"{k}={v}" for k, v in report.items()))
    return report


__all__ = ["ExactSpeedups", "apply_speedups", "compile_blocks", "warm_up"]
