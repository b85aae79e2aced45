"""fp8 linear layers for the "balanced" and "fast" presets, switched on per job.

The large linear layers of the transformer blocks get an fp8 twin: float8 e4m3 weights with one
scale per output row, and activations quantised per token at run time ("row-wise dynamic
scaling", torchao's ``Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())``). The
twin shares the original's bias; the original bf16 weights stay, so jobs with the exact preset
run exactly as before. A job switches the twins on with :meth:`Fp8Linears.enabled`.

The twins are made on the first job that asks for them (seconds; about one byte per weight of
extra device memory, some 5 GB for the released transformer) and kept for later jobs.

Only the main transformer's blocks are converted: the reference network runs once per job, so
an fp8 copy of it would cost memory for well under one percent of the work.

torchao's fp8 kernels need a CUDA GPU of compute capability 8.9 or newer (Ada, Hopper and later);
:func:`fp8_unavailable` says why they cannot run anywhere else, and the caller then runs the
exact layers and says so. ``make_twin`` can be replaced (the tests use a simulated fp8 twin on
the CPU).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn

logger = logging.getLogger(__name__)

FP8_MIN_CAPABILITY = (8, 9)
#: Linear layers smaller than this on either side, or not a multiple of 16, stay as they are.
MIN_FEATURES = 16
#: Linear layers applied to the time embedding (one row per sample) stay as they are.
_SKIPPED_NAMES = ("modulation", "adaln")

MakeTwin = Callable[[nn.Linear], nn.Module]


def fp8_unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why fp8 linear layers cannot run on ``device`` with networks in ``dtype``; None when they can."""
    if device.type != "cuda":
        return f"they need a CUDA GPU of compute capability 8.9 or newer; the networks run on the {device.type}"
    capability = torch.cuda.get_device_capability(device)
    if tuple(capability) < FP8_MIN_CAPABILITY:
        return f"they need a CUDA GPU of compute capability 8.9 or newer; this one has {capability[0]}.{capability[1]}"
    if dtype != torch.bfloat16:
        return f"they need the networks in bfloat16; they run in {str(dtype).removeprefix('torch.')}"
    if importlib.util.find_spec("torchao") is None:
        return "the torchao package is not installed"
    return None


def torchao_twin(linear: nn.Linear) -> nn.Module:
    """An fp8 row-wise dynamic copy of ``linear`` made by torchao (sharing its bias)."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    twin = _twin_shell(linear)
    quantize_(twin, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
    return twin


class SimulatedFp8Linear(nn.Module):
    """fp8 arithmetic emulated in the input dtype: e4m3 weights (per-row scale) and activations (per-token scale).

    For tests on machines without fp8 kernels; slower than the plain layer, never used by the worker.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight, scale = _quantize_rows(linear.weight.detach())
        self.register_buffer("weight_fp8", weight)
        self.register_buffer("weight_scale", scale)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, x_scale = _quantize_rows(x)
        w = self.weight_fp8.to(x.dtype) * self.weight_scale.to(x.dtype)
        return nn.functional.linear(q.to(x.dtype) * x_scale.to(x.dtype), w, self.bias)


def _quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row e4m3 values and their float32 scales (amax / 448)."""
    amax = x.detach().abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / torch.finfo(torch.float8_e4m3fn).max
    return (x.float() / scale).to(torch.float8_e4m3fn), scale


def _twin_shell(linear: nn.Linear) -> nn.Linear:
    """A Linear of the same shape whose parameters are the original's (torchao replaces the weight)."""
    twin = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    twin.weight = nn.Parameter(linear.weight.detach(), requires_grad=False)
    if linear.bias is not None:
        twin.bias = linear.bias
    return twin


class _Switch:
    on = False


class _Fp8Switched:
    """Mixed in front of ``nn.Linear`` by :class:`Fp8Linears`: routes through the twin while switched on."""

    _fp8_switch: _Switch
    _fp8_twin: nn.Module | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fp8_switch.on and self._fp8_twin is not None:
            return self._fp8_twin(x)
        return super().forward(x)


_SWITCHED: dict[type, type] = {}


def _switched_class(cls: type) -> type:
    if cls not in _SWITCHED:
        _SWITCHED[cls] = type(f"Fp8Switched{cls.__name__}", (_Fp8Switched, cls), {})
    return _SWITCHED[cls]


def convertible(name: str, module: nn.Module) -> bool:
    """Whether the linear layer ``name`` gets an fp8 twin."""
    return (
        isinstance(module, nn.Linear)
        and not any(part in name.lower() for part in _SKIPPED_NAMES)
        and min(module.in_features, module.out_features) >= MIN_FEATURES
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
    )


class Fp8Linears:
    """The fp8 twins of one network's linear layers (see the module docstring)."""

    def __init__(self, network: nn.Module, make_twin: MakeTwin = torchao_twin) -> None:
        self.network = network
        self.make_twin = make_twin
        self.switch = _Switch()
        self.converted = 0

    def prepare(self) -> int:
        """Make the twins (once); returns how many layers have one."""
        if self.converted:
            return self.converted
        started = time.perf_counter()
        done: list[nn.Module] = []
        try:
            for name, module in list(self.network.named_modules()):
                if not convertible(name, module) or isinstance(module, _Fp8Switched):
                    continue
                twin = self.make_twin(module)
                module.__class__ = _switched_class(type(module))
                object.__setattr__(module, "_fp8_twin", twin)  # not a submodule: no new state-dict keys
                object.__setattr__(module, "_fp8_switch", self.switch)
                done.append(module)
        except BaseException:
            for module in done:  # all or nothing
                module.__class__ = type(module).__mro__[2]
                del module.__dict__["_fp8_twin"], module.__dict__["_fp8_switch"]
            raise
        self.converted = len(done)
        logger.info("fp8 copies of %d linear layers made in %.1f s", self.converted, time.perf_counter() - started)
        return self.converted

    @contextlib.contextmanager
    def enabled(self) -> Iterator[None]:
        """Run the converted layers through their twins inside the block (:meth:`prepare` first)."""
        self.prepare()
        self.switch.on = True
        try:
            yield
        finally:
            self.switch.on = False


__all__ = ["FP8_MIN_CAPABILITY", "Fp8Linears", "SimulatedFp8Linear", "convertible", "fp8_unavailable",
           "torchao_twin"]
