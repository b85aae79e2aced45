"""Blocks that rest in host memory and visit the device one at a time, the next one copied ahead.

:func:`stream_blocks` attaches forward hooks to every block of a ``ModuleList`` (the main
transformer's 42 blocks, 0.4 GiB each in bf16): before block ``i`` runs, its weights are on the
device (copied earlier) and block ``i + 1``'s copy is queued on a separate CUDA stream, so the
copy overlaps block ``i``'s compute; after block ``i`` the device copies are dropped. At most two
blocks are on the device at once, instead of all 42. The computation is unchanged: the same
tensors, on the same device, in the same order.

The resting copies should be page-locked (:func:`hallo3_worker.models.loading.pin_resting_copies`)
so the copies are truly asynchronous. On a device that is the resting device the hooks do nothing
but bookkeeping (tests use that to check the order of visits).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from hallo3_worker.models.loading import replace_tensors, to_device


class BlockStreamer:
    """The hooks of :func:`stream_blocks` and which blocks are on the device now."""

    def __init__(self, blocks: nn.ModuleList, device: torch.device, on_event: Callable[[str], None] | None = None) -> None:
        self.blocks = blocks
        self.device = device
        self.on_event = on_event
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.loaded: dict[int, tuple[Callable[[], None], torch.cuda.Event | None]] = {}
        self.handles = []
        for index, block in enumerate(blocks):
            self.handles.append(block.register_forward_pre_hook(functools.partial(self._before, index)))
            self.handles.append(block.register_forward_hook(functools.partial(self._after, index)))

    def _event(self, text: str) -> None:
        if self.on_event is not None:
            self.on_event(text)

    def _load(self, index: int) -> None:
        if index in self.loaded:
            return
        block = self.blocks[index]
        event = None
        if self.copy_stream is not None:
            with torch.cuda.stream(self.copy_stream):
                restore = replace_tensors(block, lambda t: to_device(t, self.device))
                event = torch.cuda.Event()
                event.record(self.copy_stream)
        else:
            restore = replace_tensors(block, lambda t: to_device(t, self.device))
        self.loaded[index] = (restore, event)
        self._event(f"load {index}")

    def _before(self, index: int, module: nn.Module, args) -> None:
        self._load(index)
        _, event = self.loaded[index]
        if event is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(event)  # the compute stream waits for the copy; the host does not
            for tensor in (*module.parameters(), *module.buffers()):
                tensor.record_stream(compute)  # made on the copy stream, used and freed on this one
        if index + 1 < len(self.blocks):
            self._load(index + 1)  # overlaps this block's compute

    def _after(self, index: int, module: nn.Module, args, output) -> None:
        restore, _ = self.loaded.pop(index)
        restore()
        self._event(f"release {index}")

    def release(self) -> None:
        """Drop every device copy still held (after an interrupted forward)."""
        for index in list(self.loaded):
            self.loaded.pop(index)[0]()
            self._event(f"release {index}")

    def remove(self) -> None:
        """Detach the hooks."""
        self.release()
        for handle in self.handles:
            handle.remove()


def stream_blocks(blocks: nn.ModuleList, device: torch.device, on_event: Callable[[str], None] | None = None) -> BlockStreamer:
    """Make ``blocks`` visit ``device`` one at a time during each forward (see the module docstring)."""
    return BlockStreamer(blocks, device, on_event)


__all__ = ["BlockStreamer", "stream_blocks"]
