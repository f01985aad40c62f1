"""Turning user options into validated jobs, one module per workload (image, text, video).

The CLI, the benchmarks and the HTTP server all prepare their work here, so every entry point
checks the same things with the same messages, before any worker starts.
"""

from __future__ import annotations

import os

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
    return nproc
