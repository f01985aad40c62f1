"""Launchers: torchrun (SPMD), local spawn (``--nproc N`` without torchrun), Ray controller."""

from __future__ import annotations

import os

from distgen.config import ConfigError
from distgen.launch.local import WorkerError, in_torchrun, spawn

__all__ = ["WorkerError", "in_torchrun", "run_job", "spawn"]


def run_job(job, nproc: int, launcher: str, timeout_s: float, ray_address: str | None = None, threads_per_rank=None):
    """Run a job with the chosen launcher; returns rank 0's result (None on other torchrun ranks)."""
    from distgen.launch import local

    if launcher == "auto":
        launcher = "torchrun" if local.in_torchrun() else "spawn"
    if launcher == "torchrun":
        if not local.in_torchrun():
            raise ConfigError("--launcher torchrun: not running under torchrun (run `torchrun --nproc-per-node N -m distgen ...`)")
        world = int(os.environ["WORLD_SIZE"])
        if world != nproc:
            raise ConfigError(f"--nproc {nproc} does not match torchrun's WORLD_SIZE {world}")
        from distgen.runtime.worker import run_worker

        return run_worker(job)
    if launcher == "ray":
        from distgen.launch.ray import run_on_ray

        return run_on_ray(job, nproc, address=ray_address, timeout_s=timeout_s)
    return local.spawn(job, nproc, timeout_s=timeout_s, threads_per_rank=threads_per_rank)
