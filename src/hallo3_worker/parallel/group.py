"""The process groups of one worker's ranks.

Every rank joins one ``torch.distributed`` world through a TCP store hosted by rank 0:

* the **data group** (the default group): NCCL on CUDA GPUs, gloo on the CPU, with the collective
  timeout (``HALLO3_COLLECTIVE_TIMEOUT_S``): every tensor exchange of a job runs on it, so a rank
  that dies or hangs makes the others' next collective fail within that time;
* the **control group**: gloo with a long timeout, on which rank 0 broadcasts small command
  messages. The other ranks wait on it between jobs for as long as the worker is idle;
* one **Ulysses group** per CFG half when the tokens are split (see :mod:`.layout`).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import socket

import torch
import torch.distributed as dist

from hallo3_worker.parallel.layout import ParallelLayout

logger = logging.getLogger(__name__)

#: How long a rank waits for the next command (the worker may be idle between jobs for long).
CONTROL_TIMEOUT = datetime.timedelta(days=365)
#: How long start-up may take on every rank (loading the weights) before the ranks meet.
STARTUP_TIMEOUT = datetime.timedelta(minutes=30)
DEFAULT_COLLECTIVE_TIMEOUT_S = 300.0


@dataclasses.dataclass
class RankContext:
    """One rank's place in the layout and the groups it talks on."""

    rank: int
    layout: ParallelLayout
    device: torch.device
    timeout_s: float
    control: dist.ProcessGroup | None = None
    ulysses_group: dist.ProcessGroup | None = None  # this rank's CFG half; None when the tokens are not split

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    @property
    def cfg_index(self) -> int:
        return self.layout.cfg_index(self.rank)

    @property
    def ulysses_rank(self) -> int:
        return self.layout.ulysses_rank(self.rank)


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (for the store of ranks started on this machine)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def host_store(world_size: int, host: str = "127.0.0.1") -> dist.TCPStore:
    """Rank 0's store on a free port (``store.port``), made before the other ranks start."""
    return dist.TCPStore(host, 0, world_size, is_master=True, timeout=STARTUP_TIMEOUT, wait_for_workers=False)


def init_rank(
    rank: int,
    layout: ParallelLayout,
    device: torch.device,
    *,
    port: int | None = None,
    store: dist.Store | None = None,
    host: str = "127.0.0.1",
    timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S,
) -> RankContext:
    """Join the world of ``layout.world_size`` ranks and make the groups.

    Rank 0 hosts the store (``store`` from :func:`host_store`, or a new one on ``port``); the
    others connect to ``host:port``.
    """
    world = layout.world_size
    if store is None:
        if port is None:
            raise ValueError("init_rank needs the store or its port")
        store = dist.TCPStore(host, port, world, is_master=rank == 0, timeout=STARTUP_TIMEOUT, wait_for_workers=False)
    backend = backend_for(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend,
        store=dist.PrefixStore("hallo3", store),
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
        device_id=device if device.type == "cuda" else None,
    )
    context = make_context(rank, layout, device, timeout_s)
    logger.info("rank %d/%d joined (%s on %s, layout %s)", rank, world, backend, device, layout)
    return context


def make_context(rank: int, layout: ParallelLayout, device: torch.device, timeout_s: float) -> RankContext:
    """The control and Ulysses groups of ``layout`` in the current world; every rank must call it.

    The world must already be initialised with ``layout.world_size`` ranks. Tests call this more
    than once to try several layouts in one world.
    """
    if dist.get_world_size() != layout.world_size:
        raise ValueError(f"layout {layout} needs {layout.world_size} ranks, the world has {dist.get_world_size()}")
    control = dist.new_group(list(range(layout.world_size)), timeout=CONTROL_TIMEOUT, backend="gloo")
    ulysses_group = None
    for cfg_index in range(layout.cfg):  # every rank creates every group, in the same order
        ranks = layout.ulysses_ranks(cfg_index)
        group = dist.new_group(ranks, timeout=datetime.timedelta(seconds=timeout_s)) if layout.ulysses > 1 else None
        if rank in ranks:
            ulysses_group = group
    return RankContext(rank, layout, device, timeout_s, control, ulysses_group)


def wait_for_all(context: RankContext, what: str) -> None:
    """Every rank reaches this point (start-up: all weights loaded) within :data:`STARTUP_TIMEOUT`."""
    dist.monitored_barrier(group=context.control, timeout=STARTUP_TIMEOUT, wait_all_ranks=True)
    logger.info("rank %d: all %d ranks %s", context.rank, context.world_size, what)


def leave() -> None:
    """Destroy this process's groups (after the last command)."""
    if dist.is_initialized():
        dist.destroy_process_group()


__all__ = [
    "DEFAULT_COLLECTIVE_TIMEOUT_S",
    "RankContext",
    "backend_for",
    "free_port",
    "host_store",
    "init_rank",
    "leave",
    "make_context",
    "wait_for_all",
]
