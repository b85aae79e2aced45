"""Hallo3's sampler: zero-terminal-SNR DDPM schedule, v-prediction, DPM-Solver++(2M) SDE, CFG.

This reproduces upstream's SAT sampler (``VPSDEDPMPP2MSampler`` with ``ZeroSNRDDPMDiscretization``
and ``DiscreteDenoiser``) including its two table details, which diffusers'
``CogVideoXDPMScheduler`` does not share:

* the step coefficients use the zero-SNR rescale of the *selected* timesteps only, while
* the x0 conversion snaps sqrt(alpha_bar) to the nearest entry of the rescale over *all* 1000
  timesteps (the entry for t-1 when t <= 219).

Notation (as upstream): ``a`` is sqrt(alpha_bar), ``lambda = log(a / sqrt(1 - a^2))``. The last
step returns the x0 prediction itself. Table arithmetic is float32 exactly as upstream's, so
the coefficients match bit for bit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch

# model_fn(x, timesteps) -> v prediction; x is the CFG batch [uncond; cond] of the noisy latent.
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# noise_fn(step_index, like) -> standard normal noise shaped like `like`.
NoiseFn = Callable[[int, torch.Tensor], torch.Tensor]
StepCallback = Callable[[int, int], None]


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Defaults are upstream's inference settings."""

    num_steps: int = 50
    guidance: float = 3.5  # constant; upstream's configured DynamicCFG is overridden to 3.5
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012

    def __post_init__(self) -> None:
        # The zero-SNR rescale maps the first selected step to itself and the last to 0, so it
        # needs two distinct steps.
        if not 2 <= self.num_steps < self.num_train_timesteps:
            raise ValueError(f"num_steps must be in [2, {self.num_train_timesteps}), got {self.num_steps}")


def _alphas_cumprod(config: SamplerConfig) -> np.ndarray:
    """alpha_bar for every training timestep, float64 ("scaled linear" betas)."""
    betas = (
        torch.linspace(
            config.beta_start**0.5, config.beta_end**0.5, config.num_train_timesteps, dtype=torch.float64
        )
        ** 2
    ).numpy()
    return np.cumprod(1.0 - betas, axis=0)


def _zero_snr_sqrt(alphas_cumprod: np.ndarray) -> torch.Tensor:
    """sqrt(alpha_bar) rescaled so the last entry is 0 and the first unchanged (float32, as upstream)."""
    a = torch.tensor(alphas_cumprod, dtype=torch.float32).sqrt()
    first, last = a[0].clone(), a[-1].clone()
    a -= last
    a *= first / (first - last)
    return a


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The per-step tables for one number of steps.

    timesteps: network timesteps in call order (high noise first), e.g. 999, 979, ..., 19.
    sqrt_alphas: (num_steps + 1,) float32, the sampler's a per step, high noise first, then 1.0.
    table: (num_train_timesteps,) float32, the denoiser's full-table a indexed by timestep.
    """

    timesteps: tuple[int, ...]
    sqrt_alphas: torch.Tensor
    table: torch.Tensor

    @classmethod
    def create(cls, config: SamplerConfig) -> Schedule:
        alphas_cumprod = _alphas_cumprod(config)
        n, total = config.num_steps, config.num_train_timesteps
        # "trailing" spacing: int(linspace(999, 0, n, endpoint=False)) reversed -> 19, 39, ..., 999
        ascending = np.linspace(total - 1, 0, n, endpoint=False).astype(int)[::-1]
        step_alphas = torch.flip(_zero_snr_sqrt(alphas_cumprod[ascending]), (0,))
        sqrt_alphas = torch.cat([step_alphas, step_alphas.new_ones(1)])
        table = _zero_snr_sqrt(alphas_cumprod)
        return cls(tuple(int(t) for t in ascending[::-1]), sqrt_alphas, table)

    def quantize(self, a: torch.Tensor) -> torch.Tensor:
        """Snap sqrt(alpha_bar) values to the nearest full-table entry (first one on ties)."""
        table = self.table.to(a.device)
        return table[(a - table[:, None]).abs().argmin(dim=0)]

    def on(self, device: torch.device) -> Schedule:
        """The same tables on ``device``, so the step loop copies nothing from the host."""
        if self.table.device == device:
            return self
        return dataclasses.replace(self, sqrt_alphas=self.sqrt_alphas.to(device), table=self.table.to(device))


def guided_x0(
    model_fn: ModelFn, x: torch.Tensor, a: torch.Tensor, timestep: int, schedule: Schedule, guidance: float
) -> torch.Tensor:
    """Classifier-free-guided x0 prediction in float32.

    x: (B, ...) noisy latent; a: sqrt(alpha_bar) of this step (0-d float32). The model sees the
    CFG batch [x; x] with [uncond; cond] conditioning and predicts v; x0 = a_q x - sqrt(1-a_q^2) v
    with a_q the quantised a, and the two halves are combined as u + guidance (c - u).
    """
    batch = torch.cat([x, x])
    a_q = schedule.quantize(a.reshape(1).expand(batch.shape[0]))
    a_q = a_q.reshape(-1, *([1] * (x.ndim - 1)))
    timesteps = torch.full((batch.shape[0],), float(timestep), device=x.device, dtype=torch.float32)
    v = model_fn(batch, timesteps)
    x0 = (v * -((1 - a_q**2) ** 0.5) + batch * a_q).to(torch.float32)
    uncond, cond = x0.chunk(2)
    return uncond + guidance * (cond - uncond)


def _log_snr_half(a: torch.Tensor) -> torch.Tensor:
    """lambda = log(a / sqrt(1 - a^2)); -inf at a = 0."""
    alpha = a**2
    return ((alpha / (1 - alpha)) ** 0.5).log()


def sample(
    model_fn: ModelFn,
    noise: torch.Tensor,
    config: SamplerConfig,
    noise_fn: NoiseFn,
    on_step: StepCallback | None = None,
    schedule: Schedule | None = None,
) -> torch.Tensor:
    """Run the DPM-Solver++(2M) SDE sampler from pure noise and return x0 (float32).

    noise: (B, T, C, H, W) initial latent, used as is (unscaled). noise_fn(i, x) supplies the
    fresh noise added after step i (steps 0 .. num_steps-2; the last step adds none).
    """
    schedule = (schedule or Schedule.create(config)).on(noise.device)
    a = schedule.sqrt_alphas
    n = config.num_steps
    x = noise.to(torch.float32)
    previous_x0: torch.Tensor | None = None
    for i in range(n):
        x0 = guided_x0(model_fn, x, a[i], schedule.timesteps[i], schedule, config.guidance)
        if on_step is not None:
            on_step(i, n)
        if i == n - 1:
            return x0

        a_i, a_next = a[i], a[i + 1]
        lam, lam_next = _log_snr_half(a_i), _log_snr_half(a_next)
        h = lam_next - lam
        mult_x = ((1 - a_next**2) / (1 - a_i**2)) ** 0.5 * (-h).exp()
        mult_x0 = (-2 * h).expm1() * a_next
        mult_noise = (1 - a_next**2) ** 0.5 * (1 - (-2 * h).exp()) ** 0.5
        if previous_x0 is not None:
            # Second-order correction from the previous x0; r = h_prev / h (infinite on step 1,
            # where the previous a is 0, which reduces this to the first-order update).
            r = (lam - _log_snr_half(a[i - 1])) / h
            x0_for_step = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * previous_x0
        else:
            x0_for_step = x0
        x = mult_x * x - mult_x0 * x0_for_step + mult_noise * noise_fn(i, x)
        previous_x0 = x0
    raise AssertionError("unreachable: the loop returns on its last step")


def generator_noise(generator: torch.Generator) -> NoiseFn:
    """Noise drawn from an explicit ``torch.Generator`` (on the generator's device)."""

    def draw(step: int, like: torch.Tensor) -> torch.Tensor:
        return torch.randn(like.shape, generator=generator, device=generator.device, dtype=like.dtype).to(like.device)

    return draw


def injected_noise(tensors: torch.Tensor) -> NoiseFn:
    """Noise taken from a pre-drawn stack (num_steps - 1, *shape), one slice per step."""

    def take(step: int, like: torch.Tensor) -> torch.Tensor:
        return tensors[step].to(device=like.device, dtype=like.dtype)

    return take
