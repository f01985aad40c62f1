"""Turning user options into validated jobs, one module per workload (image, text, video).

The CLI, the benchmarks and the HTTP server all prepare their work here, so every entry point
checks the same things with the same messages, before any worker starts.
"""

from __future__ import annotations

import os
import sys

from distgen.config import ConfigError, ParallelConfig


def resolve_nproc(args, parallel: ParallelConfig) -> int:
    """--nproc, else torchrun's WORLD_SIZE, else the product of the --parallel degrees."""
    from distgen.launch.local import in_torchrun

    if getattr(args, "nproc", None) is not None:
        nproc = args.nproc
    elif in_torchrun():
        nproc = int(os.environ["WORLD_SIZE"])
    else:
        nproc = parallel.world_size
    if nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {nproc}")
    note = cores_note(nproc, getattr(args, "launcher", "auto"), getattr(args, "threads_per_rank", None))
    if note and note not in _NOTED:  # once per process (a benchmark prepares several jobs)
        _NOTED.add(note)
        print(f"distgen: note: {note}", file=sys.stderr)
    return nproc


_NOTED: set[str] = set()


def cores_note(nproc: int, launcher: str, threads_per_rank: int | None = None) -> str | None:
    """Why a local launch of ``nproc`` CPU ranks will be slower than one rank, when it starts more
    ranks (or ranks x threads) than this machine has cores; None when it does not."""
    from distgen.launch.local import in_torchrun

    if nproc < 2 or launcher not in ("auto", "spawn") or in_torchrun():
        return None
    import torch

    if torch.cuda.is_available():  # one GPU per rank: the cores only feed the GPUs
        return None
    cores = os.cpu_count() or 1
    threads = threads_per_rank or max(1, cores // nproc)  # what each rank sets (distgen.runtime.dist)
    if nproc * threads <= cores:
        return None
    why = ("the ranks take turns on the cores, and every collective waits for the slowest rank, which waits for a "
           "core, so expect this run to be slower than one rank; it shows the layout works, not its speed")
    if nproc > cores:
        return f"{nproc} ranks on {cores} CPU cores: {why} (for speed here: at most {cores} ranks)"
    return (f"{nproc} ranks x {threads} threads = {nproc * threads} threads on {cores} CPU cores: {why} (for speed "
            f"here: --threads-per-rank {max(1, cores // nproc)})")
