"""Constructing networks without throwaway fp32 weights, and filling them.

Networks are built on the ``meta`` device (no memory), cast there, and then either receive
checkpoint tensors by assignment (:func:`load_converted`) or get fresh random storage directly in
the target dtype and device (:func:`materialize_random`, for the embedded tiny model and
benchmarks, where weight values do not matter).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)


def build_on_meta(factory: Callable[[], M], dtype: torch.dtype | None = None) -> M:
    """Build ``factory()`` on the meta device, optionally cast to ``dtype`` (free on meta)."""
    with torch.device("meta"):
        model = factory()
    if dtype is not None:
        model = model.to(dtype)
    return model.eval().requires_grad_(False)


def load_converted(model: M, state_dict: Mapping[str, torch.Tensor], device: torch.device | str | None = None) -> M:
    """Strictly assign converted tensors to a (meta) model; tensors keep their own dtype.

    With ``device`` given, tensors are moved there first (a no-op when already there).
    """
    if device is not None:
        state_dict = {k: v.to(device) for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def materialize_random(model: M, device: torch.device | str, seed: int = 0, std: float = 0.02) -> M:
    """Allocate a meta model's storage on ``device`` (in its current dtype) and fill it randomly.

    Matrices and biases get N(0, std); LayerNorm weights 1 and biases 0. Deterministic per seed
    on a given device.
    """
    model = model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
            continue
        for param in module.parameters(recurse=False):
            param.normal_(0.0, std, generator=generator)
    return model.eval().requires_grad_(False)


def replace_tensors(
    module: nn.Module, convert: Callable[[torch.Tensor], torch.Tensor], skip: Collection[nn.Module] = ()
) -> Callable[[], None]:
    """Put ``convert(t)`` in place of every parameter and buffer ``t`` of ``module``, keeping ties.

    A tensor shared by several submodules (tied embeddings) is converted once and stays shared.
    Unlike ``module.to(...)``, the original tensors are kept, not released: the returned function
    puts them back (and drops the converted ones). Parameters come back as the same objects.
    The submodules in ``skip`` (and everything inside them) are left as they are.
    """
    converted: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(original) -> (original, new)
    replaced: list[tuple[dict[str, torch.Tensor | None], str, torch.Tensor]] = []

    def new_for(tensor: torch.Tensor, parameter: bool) -> torch.Tensor:
        if id(tensor) not in converted:
            value = convert(tensor.detach())
            if parameter:
                value = nn.Parameter(value, requires_grad=False)
            converted[id(tensor)] = (tensor, value)
        return converted[id(tensor)][1]

    skipped = {id(inner) for outer in skip for inner in outer.modules()}
    for sub in module.modules():
        if id(sub) in skipped:
            continue
        for table, parameter in ((sub._parameters, True), (sub._buffers, False)):
            for name, tensor in list(table.items()):
                if tensor is None:
                    continue
                replaced.append((table, name, tensor))
                table[name] = new_for(tensor, parameter)

    def restore() -> None:
        for table, name, original in reversed(replaced):
            table[name] = original
        replaced.clear()
        converted.clear()

    return restore


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a host tensor to ``device`` without making the host wait for the device.

    A copy from ordinary (pageable) host memory to a CUDA GPU waits for the GPU's queued work
    first; from page-locked memory it is queued like a kernel. So tensors bound for a CUDA device
    go through page-locked memory (already page-locked ones as they are) and are copied
    with ``non_blocking``; the CPU's own tensors are returned as they are.
    """
    if tensor.device == device:
        return tensor
    if device.type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=tensor.device.type == "cpu")


def pin_resting_copies(module: nn.Module) -> int:
    """Move ``module``'s CPU tensors into page-locked memory (ties kept), so visits copy without waiting.

    Returns the bytes pinned. Only for modules that rest on the CPU and visit a CUDA device.
    """
    pinned = 0

    def pin(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal pinned
        if tensor.device.type != "cpu" or tensor.is_pinned():
            return tensor
        pinned += tensor.nbytes
        return tensor.pin_memory()

    replace_tensors(module, pin)  # the originals are released with the discarded restore function
    return pinned
