"""Local multi-process launch: ``--nproc N`` without torchrun.

Starts N processes with the torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1,
...), each running :func:`distgen.runtime.worker.run_worker`. The first rank that raises
stops every other rank and its message is re-raised here, so nothing hangs.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import pickle
import queue
import signal
import socket
import time
import traceback
from typing import Any


class WorkerError(RuntimeError):
    """A rank failed; the message is that rank's error."""


def in_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def rank_environment(rank: int, world_size: int, master_addr: str, master_port: int, local_rank: int | None = None,
                     local_world_size: int | None = None) -> dict[str, str]:
    return {
        "RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_RANK": str(rank if local_rank is None else local_rank),
        "LOCAL_WORLD_SIZE": str(world_size if local_world_size is None else local_world_size),
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
    }


def _entry(rank: int, world_size: int, port: int, job: Any, results: "mp.Queue") -> None:
    os.environ.update(rank_environment(rank, world_size, "127.0.0.1", port))
    try:
        from distgen.runtime.worker import run_worker

        result = run_worker(job)
        # Plain pickle bytes: torch's queue pickler would share tensors through file
        # descriptors that die with this process.
        results.put(("ok", rank, pickle.dumps(result)))
    except BaseException as exc:  # report everything, including KeyboardInterrupt
        results.put(("error", rank, f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        raise SystemExit(1)


@contextlib.contextmanager
def threads_for_children(threads_per_rank: int | None):
    """OMP_NUM_THREADS for processes started in this block (children read it at start-up)."""
    saved = os.environ.get("OMP_NUM_THREADS")
    if threads_per_rank:
        os.environ["OMP_NUM_THREADS"] = str(threads_per_rank)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved


def spawn(job: Any, nproc: int, timeout_s: float | None = None, threads_per_rank: int | None = None) -> Any:
    """Run ``job`` on ``nproc`` local processes; return rank 0's result."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    # Children read OMP_NUM_THREADS at start-up; set it only while starting them.
    procs = [ctx.Process(target=_entry, args=(r, nproc, port, job, results), daemon=False) for r in range(nproc)]
    with threads_for_children(threads_per_rank):
        for p in procs:
            p.start()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    rank0_result, finished = None, set()
    try:
        while len(finished) < nproc:
            try:
                message = results.get(timeout=0.2)
            except queue.Empty:
                message = None
            if message is not None:
                if message[0] == "error":
                    _, rank, text, trace = message
                    raise WorkerError(f"rank {rank} failed: {text}\n--- traceback of rank {rank} ---\n{trace}")
                _, rank, payload = message
                finished.add(rank)
                if rank == 0:
                    rank0_result = pickle.loads(payload)
                continue
            for rank, p in enumerate(procs):
                if rank not in finished and p.exitcode not in (None, 0):
                    # Give its error message a moment to arrive before reporting the bare exit.
                    try:
                        message = results.get(timeout=2.0)
                        if message[0] == "error":
                            raise WorkerError(f"rank {message[1]} failed: {message[2]}\n--- traceback of rank {message[1]} ---\n{message[3]}")
                    except queue.Empty:
                        pass
                    raise WorkerError(f"rank {rank} exited with code {p.exitcode} without reporting an error")
            if deadline is not None and time.monotonic() > deadline:
                raise WorkerError(f"the job did not finish within {timeout_s:.0f} s; all ranks were stopped")
        for p in procs:
            p.join(timeout=30)
        return rank0_result
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()


# --------------------------------------------------------------------------- resident groups


def _resident_entry(rank: int, world_size: int, port: int, job: Any, commands, events) -> None:
    os.environ.update(rank_environment(rank, world_size, "127.0.0.1", port))
    try:
        from distgen.runtime.resident import QueueChannel
        from distgen.runtime.worker import run_worker

        run_worker(job, QueueChannel(commands, events) if rank == 0 else None)
    except BaseException as exc:  # report everything; the controller decides what to do
        with contextlib.suppress(Exception):
            events.put(("rank_error", rank, f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        raise SystemExit(1)


def describe_exit(exitcode: int | None) -> str:
    """``-9`` -> 'was killed by SIGKILL'; ``1`` -> 'exited with code 1'."""
    if exitcode is not None and exitcode < 0:
        try:
            return f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"was killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


class QueueLink:
    """The controller's end of a leader's channel: ``send`` commands, ``recv`` events."""

    commands: Any
    events: Any

    def send(self, command) -> None:
        self.commands.put(command)

    def recv(self, timeout: float):
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            return None


class LocalGroup(QueueLink):
    """A resident group of local processes (``--launcher spawn``): rank 0 reads the command queue
    and every rank may report a failure on the event queue; the controller watches each process's
    exit (its sentinel), so a killed rank is noticed at once, not after a collective times out."""

    def __init__(self, job: Any, nproc: int, threads_per_rank: int | None = None):
        self.job, self.nproc, self.threads_per_rank = job, nproc, threads_per_rank
        ctx = mp.get_context("spawn")
        self.commands, self.events = ctx.Queue(), ctx.Queue()
        port = free_port()
        self.procs = [ctx.Process(target=_resident_entry, args=(r, nproc, port, job, self.commands, self.events),
                                  daemon=True, name=f"distgen-rank{r}") for r in range(nproc)]
        with threads_for_children(threads_per_rank):
            for p in self.procs:
                p.start()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def dead(self) -> list[tuple[int, str]]:
        """(rank, how it ended) for every rank that is no longer running."""
        return [(rank, describe_exit(p.exitcode)) for rank, p in enumerate(self.procs) if p.exitcode is not None]

    def stop(self, timeout_s: float = 10.0) -> None:
        """Ask the leader to stop, wait, then terminate whatever is left."""
        if all(p.exitcode is None for p in self.procs):
            with contextlib.suppress(Exception):
                self.send(("stop",))
        deadline = time.monotonic() + timeout_s
        for p in self.procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        self.kill()

    def kill(self) -> None:
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        for q in (self.commands, self.events):
            q.cancel_join_thread()
            q.close()
