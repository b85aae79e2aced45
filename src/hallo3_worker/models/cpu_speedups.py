"""Speed-ups for running the networks on a CPU (the embedded tiny model, tests).

PyTorch's CPU dispatcher sends float32 ``Conv3d`` to its generic ``slow_conv3d`` kernel, several
times slower than oneDNN's convolution for the VAE's shapes. :func:`use_onednn_conv3d` reroutes a
module's 3-D convolutions to oneDNN when they run on the CPU in float32 without autograd, and
leaves every other case (GPU, other dtypes, training) on the plain path. It is attached from
outside; the networks themselves do not know about it.
"""

from __future__ import annotations

import types

import torch
from torch import nn


def _onednn_conv_forward(self: nn.Conv3d, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    if (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and not torch.is_grad_enabled()
        and self.padding_mode == "zeros"
        and not isinstance(self.padding, str)
        and torch.backends.mkldnn.is_available()
    ):
        return torch.mkldnn_convolution(
            x.contiguous(), weight.contiguous(), bias, self.padding, self.stride, self.dilation, self.groups
        )
    return nn.Conv3d._conv_forward(self, x, weight, bias)


def use_onednn_conv3d(module: nn.Module) -> int:
    """Route every ``nn.Conv3d`` in ``module`` through oneDNN on the CPU; returns how many."""
    count = 0
    for sub in module.modules():
        if isinstance(sub, nn.Conv3d):
            sub._conv_forward = types.MethodType(_onednn_conv_forward, sub)  # type: ignore[method-assign]
            count += 1
    return count


__all__ = ["use_onednn_conv3d"]
