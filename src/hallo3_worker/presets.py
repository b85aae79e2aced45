"""Speed presets: what a job with ``exact``, ``balanced`` or ``fast`` runs, and what it reports.

* ``exact`` (default): upstream's recipe, bit for bit; nothing here changes its arithmetic.
* ``balanced``: the transformer blocks' linear layers in fp8 with row-wise dynamic scaling
  (:mod:`hallo3_worker.models.quantize`, torchao) and SageAttention's 8-bit attention
  (:mod:`hallo3_worker.models.attention`, backend ``sage``), each where the GPU and the installed
  packages have the kernels. Where one is missing the job runs the exact part instead and its
  result says so in ``warnings``, naming what fell back.
* ``fast``: ``balanced`` plus

  - step caching (:mod:`hallo3_worker.models.step_cache`): a step whose first-block residual
    changed by less than ``cache_threshold`` (relative L1) since the last full step reuses the
    other blocks' residual; the first and last step of every segment always run in full and the
    cache starts empty in every segment and job;
  - classifier-free-guidance truncation: only the first ``cfg_fraction`` of a segment's steps run
    the guided batch [uncond; cond]; the rest run the conditional half alone and take its x0
    as the guided one (``u + g (c - u)`` with ``u = c`` is exactly ``c``).

  With ``cache_threshold`` 0 and ``cfg_fraction`` 1 it is ``balanced``.

:class:`SpeedPresets` is attached to a pipeline once. :meth:`SpeedPresets.job` wraps one job
(switching the fp8 layers and the attention kernel on, and back off afterwards) and
:meth:`SpeedPresets.model_fn` replaces :func:`~hallo3_worker.denoiser.guidance_model_fn` for each
segment's sampler, counting what ran.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Callable, Iterator

import torch

from hallo3_worker.denoiser import SegmentConditions, guidance_model_fn
from hallo3_worker.interface import GenerationRequest, Preset
from hallo3_worker.models.attention import attention_backend, sage_available, set_attention_backend
from hallo3_worker.models.quantize import Fp8Linears, MakeTwin, fp8_unavailable, torchao_twin
from hallo3_worker.models.step_cache import attach_step_cache
from hallo3_worker.models.transformer import Hallo3Transformer
from hallo3_worker.sampling import ModelFn

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PresetPlan:
    """What one job runs."""

    preset: Preset = Preset.EXACT
    cache_threshold: float = 0.0
    cfg_fraction: float = 1.0

    @classmethod
    def of(cls, request: GenerationRequest) -> PresetPlan:
        if request.preset is Preset.FAST:
            return cls(Preset.FAST, request.cache_threshold, request.cfg_fraction)
        return cls(request.preset)

    @property
    def approximate_kernels(self) -> bool:
        """fp8 linear layers and 8-bit attention (balanced and fast)."""
        return self.preset is not Preset.EXACT

    def cfg_steps(self, num_steps: int) -> int:
        """How many of a segment's steps run the guided batch (at least one)."""
        return max(1, min(num_steps, math.ceil(round(self.cfg_fraction * num_steps, 6))))


@dataclasses.dataclass
class JobSpeed:
    """One job's plan, its fallback warnings and what the denoiser ran."""

    plan: PresetPlan
    warnings: list[str] = dataclasses.field(default_factory=list)
    segments: int = 0  # segments sampled through :meth:`SpeedPresets.model_fn`
    denoiser_forwards: int = 0
    cached_steps: int = 0
    cond_only_steps: int = 0

    def report(self) -> dict[str, object]:
        """Fields of :class:`~hallo3_worker.interface.GenerationResult` (no counts if none were made here)."""
        counted = self.segments > 0
        return {
            "preset": self.plan.preset,
            "denoiser_forwards": self.denoiser_forwards if counted else None,
            "cached_steps": self.cached_steps if counted else None,
            "cond_only_steps": self.cond_only_steps if counted else None,
            "warnings": list(self.warnings),
        }


def conditional_model_fn(
    transformer: Hallo3Transformer,
    conditions: SegmentConditions,
    reference: list[torch.Tensor] | list[tuple[torch.Tensor, torch.Tensor]],
) -> ModelFn:
    """model_fn(x, timesteps) of the conditional half alone (batch B instead of 2B)."""
    c = conditions
    with torch.no_grad():
        audio_tokens, face_tokens = transformer.encode_conditions(c.audio_features, c.face_embedding)

    def model_fn(x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        hidden_states = torch.cat([x, c.concat.to(x.dtype)], dim=2)  # (B, T, 2C, H, W)
        return transformer(hidden_states, timesteps, c.text, audio_tokens, face_tokens, reference)

    return model_fn


class SpeedPresets:
    """The presets of one pipeline's transformer (see the module docstring).

    ``device``/``dtype``: where and how the transformer runs; ``offloaded``: it rests on the offload
    device and visits the GPU per segment (no fp8 copies then). ``make_twin`` builds an fp8 layer.
    """

    def __init__(
        self,
        transformer: Hallo3Transformer,
        device: torch.device,
        dtype: torch.dtype,
        *,
        offloaded: bool = False,
        make_twin: MakeTwin = torchao_twin,
    ) -> None:
        self.device, self.dtype, self.offloaded = device, dtype, offloaded
        self.cache = attach_step_cache(transformer.blocks)
        self.fp8 = Fp8Linears(transformer.blocks, make_twin)
        self.fp8_failure: str | None = None  # why making the fp8 copies failed, once; not retried
        self.current: JobSpeed | None = None

    # ------------------------------------------------------------------------------ per job

    @contextlib.contextmanager
    def job(self, request: GenerationRequest) -> Iterator[JobSpeed]:
        """Run one job's networks under its preset; yields the counters the segments fill in."""
        speed = JobSpeed(PresetPlan.of(request))
        with contextlib.ExitStack() as stack:
            if speed.plan.approximate_kernels:
                self._fp8(speed, stack)
                self._attention(speed, stack)
            for warning in speed.warnings:
                logger.warning("%s", warning)
            self.current = speed
            stack.callback(self._close)
            yield speed

    def _close(self) -> None:
        self.current = None
        self.cache.end()

    def _fp8(self, speed: JobSpeed, stack: contextlib.ExitStack) -> None:
        reason = self.fp8_failure or fp8_unavailable(self.device, self.dtype)
        if reason is None and self.offloaded:
            reason = "the transformer is offloaded between segments (HALLO3_OFFLOAD=full)"
        if reason is None:
            try:
                stack.enter_context(self.fp8.enabled())
                return
            except Exception as err:  # a kernel library that fails to load or convert: fall back, say so
                logger.exception("fp8 linear layers could not be made")
                reason = self.fp8_failure = f"making them failed ({type(err).__name__}: {err})"
        speed.warnings.append(
            f"Preset '{speed.plan.preset.value}': fp8 linear layers fell back to the exact "
            f"{str(self.dtype).removeprefix('torch.')} layers: {reason}."
        )

    def _attention(self, speed: JobSpeed, stack: contextlib.ExitStack) -> None:
        reason = None
        if self.device.type != "cuda":
            reason = f"it needs a CUDA GPU; the networks run on the {self.device.type}"
        elif not sage_available():
            reason = "the sageattention package is not installed"
        if reason is None:
            try:
                previous = set_attention_backend("sage")
                stack.callback(set_attention_backend, previous)
                return
            except Exception as err:  # e.g. its Triton kernels do not import
                reason = f"it could not be loaded ({type(err).__name__}: {err})"
        speed.warnings.append(
            f"Preset '{speed.plan.preset.value}': 8-bit attention (SageAttention) fell back to the exact "
            f"'{attention_backend()}' attention: {reason}."
        )

    # -------------------------------------------------------------------------- per segment

    def model_fn(
        self,
        transformer: Hallo3Transformer,
        conditions: SegmentConditions,
        reference: list[torch.Tensor] | list[tuple[torch.Tensor, torch.Tensor]],
        num_steps: int,
        guided_factory: Callable[..., ModelFn] = guidance_model_fn,
    ) -> ModelFn:
        """The sampler's model_fn for one segment of the current job (exact outside a job).

        ``guided_factory(transformer, conditions, reference)`` makes the guided model function
        (several ranks pass theirs; the counts are kept here either way).
        """
        speed = self.current or JobSpeed(PresetPlan())
        plan = speed.plan
        guided = guided_factory(transformer, conditions, reference)
        cfg_steps = plan.cfg_steps(num_steps)
        conditional = conditional_model_fn(transformer, conditions, reference) if cfg_steps < num_steps else None
        cache = self.cache
        cache.begin(plan.cache_threshold)
        speed.segments += 1
        step = 0

        def model_fn(x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
            nonlocal step
            index, step = step, step + 1
            cache.next_step(force=index == 0 or index >= num_steps - 1)
            if conditional is None or index < cfg_steps:
                v = guided(x, timesteps)
            else:  # the batch is [x; x]: predict the conditional half once and use it for both
                half = x.shape[0] // 2
                v_cond = conditional(x[half:], timesteps[half:])
                v = torch.cat([v_cond, v_cond])
                speed.cond_only_steps += 1
            if cache.reuse:
                speed.cached_steps += 1
            else:
                speed.denoiser_forwards += 1
            if index >= num_steps - 1:
                cache.end()
            return v

        return model_fn


__all__ = ["JobSpeed", "PresetPlan", "SpeedPresets", "conditional_model_fn"]
