"""Resident worker groups, one per launcher, with one interface for the engine:
``send(command)`` to the leader, ``recv(timeout)`` -> event or None, ``dead()`` -> [(rank, how)],
``stop()`` (ask, then terminate), ``kill()``.

* ``spawn``: local processes (:class:`distgen.launch.local.LocalGroup`).
* ``ray``: one actor per rank in a placement group (:class:`distgen.launch.ray.RayGroup`).
* ``torchrun``: this process is rank 0 and runs the leader in a thread; the other torchrun
  processes follow (:func:`follow`). No controller can restart torchrun's processes, so a failure
  is final here: the server reports it and exits non-zero for the supervisor to restart.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import traceback
from typing import Any

from distgen.launch.local import QueueLink


def start_group(job: Any, nproc: int, launcher: str, ray_address: str | None = None,
                threads_per_rank: int | None = None):
    if launcher in ("auto", "spawn"):
        from distgen.launch.local import LocalGroup, in_torchrun

        if launcher == "auto" and in_torchrun():
            return InProcessGroup(job)
        return LocalGroup(job, nproc, threads_per_rank=threads_per_rank)
    if launcher == "ray":
        from distgen.launch.ray import RayGroup

        return RayGroup(job, nproc, address=ray_address)
    if launcher == "torchrun":
        return InProcessGroup(job)
    raise ValueError(f"unknown launcher {launcher!r}")


class InProcessGroup(QueueLink):
    """Rank 0 of a torchrun job: the leader loop runs in a thread of this (the server's) process."""

    def __init__(self, job: Any):
        from distgen.runtime.resident import QueueChannel

        self.commands: queue.Queue = queue.Queue()
        self.events: queue.Queue = queue.Queue()
        self._error: str | None = None
        self.pids = [os.getpid()]
        self.thread = threading.Thread(target=self._run, args=(job, QueueChannel(self.commands, self.events)),
                                       name="distgen-rank0", daemon=True)
        self.thread.start()

    def _run(self, job, channel) -> None:
        from distgen.runtime.worker import run_worker

        try:
            run_worker(job, channel)
        except BaseException as exc:  # noqa: BLE001 - reported to the engine
            self._error = f"{type(exc).__name__}: {exc}"
            self.events.put(("rank_error", 0, self._error, traceback.format_exc()))

    def dead(self) -> list[tuple[int, str]]:
        if self.thread.is_alive():
            return []
        return [(0, f"stopped: {self._error}" if self._error else "stopped")]

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.thread.is_alive():
            self.send(("stop",))
            self.thread.join(timeout_s)

    def kill(self) -> None:
        with contextlib.suppress(Exception):
            self.send(("stop",))


def follow(job: Any) -> None:
    """A torchrun rank other than 0: run the leader's plans until it says stop."""
    from distgen.runtime.worker import run_worker

    run_worker(job)
