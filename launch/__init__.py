"""Launchers: torchrun (SPMD), local spawn (``--nproc N`` without torchrun), Ray controller."""

from distgen.launch.local import WorkerError, in_torchrun, spawn

__all__ = ["WorkerError", "in_torchrun", "spawn"]
