"""Local multi-process launch: ``--nproc N`` without torchrun.

Starts N processes with the torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1,
...), each running :func:`distgen.runtime.worker.run_worker`. The first rank that raises
stops every other rank and its message is re-raised here, so nothing hangs.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
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


def spawn(job: Any, nproc: int, timeout_s: float | None = None, threads_per_rank: int | None = None) -> Any:
    """Run ``job`` on ``nproc`` local processes; return rank 0's result."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    # Children read OMP_NUM_THREADS at start-up; set it only while starting them.
    saved_threads = os.environ.get("OMP_NUM_THREADS")
    if threads_per_rank:
        os.environ["OMP_NUM_THREADS"] = str(threads_per_rank)
    procs = [ctx.Process(target=_entry, args=(r, nproc, port, job, results), daemon=False) for r in range(nproc)]
    try:
        for p in procs:
            p.start()
    finally:
        if saved_threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = saved_threads
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
