"""Starting, watching and ending the other ranks of a worker (rank 0 is the worker's own process).

:class:`FollowerProcesses` starts ranks 1..N-1 as ``spawn`` processes, watches them from a
thread and names the first one that exits unexpectedly (:meth:`FollowerProcesses.failure`); the
worker turns that into a failed job and exits. :meth:`FollowerProcesses.stop` ends them: a
polite wait after the ``stop`` command, then SIGTERM, then SIGKILL, so that no process outlives
the worker. Each follower watches rank 0 in turn (:func:`exit_with_parent`) and exits when it
is gone, even when it is stuck in an exchange.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import threading
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)


class FollowerProcesses:
    """Ranks 1..``world_size``-1, each running ``target(rank, *args)`` in a fresh interpreter."""

    def __init__(self, target: Callable[..., Any], world_size: int, args: tuple[Any, ...] = ()) -> None:
        context = multiprocessing.get_context("spawn")
        self.processes = {
            rank: context.Process(target=target, args=(rank, *args), name=f"hallo3-rank{rank}")
            for rank in range(1, world_size)
        }
        self._failure: str | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        for process in self.processes.values():
            process.start()
        self.pids: list[int] = [p.pid for p in self.processes.values()]
        self._monitor = threading.Thread(target=self._watch, name="hallo3-rank-monitor", daemon=True)
        self._monitor.start()
        logger.info("started ranks 1-%d (pids %s)", world_size - 1,
                    ", ".join(map(str, self.pids)))

    def failure(self) -> str | None:
        """'rank 2 (pid 1234) exited with code -9' once a rank has stopped unexpectedly, else None."""
        with self._lock:
            return self._failure

    def _watch(self) -> None:
        waiting = {p.sentinel: rank for rank, p in self.processes.items()}
        while waiting and not self._stopping.is_set():
            for sentinel in multiprocessing.connection.wait(list(waiting), timeout=1.0):
                rank = waiting.pop(sentinel)
                if self._stopping.is_set():
                    return
                process = self.processes[rank]
                process.join(timeout=1.0)
                with self._lock:
                    if self._failure is None:
                        self._failure = f"rank {rank} (pid {process.pid}) exited with code {process.exitcode}"
                logger.error("%s while the worker was running", self._failure)

    def stop(self, grace_s: float = 10.0) -> None:
        """End every follower: wait up to ``grace_s`` for a clean exit, then terminate, then kill."""
        self._stopping.set()
        for process in self.processes.values():
            process.join(timeout=grace_s)
        for signal_name, method in (("SIGTERM", "terminate"), ("SIGKILL", "kill")):
            alive = [p for p in self.processes.values() if p.is_alive()]
            if not alive:
                break
            logger.warning("sending %s to ranks that did not exit: %s", signal_name, ", ".join(p.name for p in alive))
            for process in alive:
                getattr(process, method)()
            for process in alive:
                process.join(timeout=5.0)
        for process in self.processes.values():
            if process.exitcode is None:
                logger.error("%s (pid %s) could not be stopped", process.name, process.pid)
            else:
                process.close()
        self._monitor.join(timeout=2.0)


def exit_with_parent(code: int = 1) -> None:
    """In a follower: end this process as soon as the process that started it is gone."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        logger.error("rank 0 is gone; this rank exits")
        logging.shutdown()
        os._exit(code)

    threading.Thread(target=watch, name="hallo3-parent-watch", daemon=True).start()


__all__ = ["FollowerProcesses", "exit_with_parent"]
