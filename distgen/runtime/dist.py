"""Process groups and the device mesh of one worker.

NCCL with one GPU per rank on CUDA machines, gloo on CPU: the same code path.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from distgen.comm import CommStats, ExchangeEngine
from distgen.config import ParallelConfig


@dataclass
class WorkerContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh | None
    timeout_s: float = 300.0  # the process group's; exchanges outside gloo (shared memory) honour it too

    def engine(self, group: dist.ProcessGroup | None, stats: CommStats,
               shared_memory: bool | None = None) -> ExchangeEngine:
        """The exchange engine of one process group of this worker (its device and timeout;
        ``shared_memory``: see :class:`ExchangeEngine`)."""
        return ExchangeEngine(group, stats, self.device, timeout_s=self.timeout_s, shared_memory=shared_memory)

    def group(self, axis: str) -> dist.ProcessGroup | None:
        """Process group of a mesh axis, or None when the axis has degree 1."""
        if self.mesh is None or axis not in (self.mesh.mesh_dim_names or ()):
            return None
        return self.mesh.get_group(axis)

    def axis_rank(self, axis: str) -> int:
        group = self.group(axis)
        return dist.get_rank(group) if group is not None else 0


def init_worker(parallel: ParallelConfig, timeout_s: float = 300.0, threads: int | None = None) -> WorkerContext:
    """Join the process group described by the torchrun-style environment and build the mesh.

    Reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT (set by torchrun, by our
    spawn launcher and by the Ray controller alike).
    """
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            # Two ranks on one GPU would silently halve each other's memory and speed.
            raise RuntimeError(
                f"rank {rank} has LOCAL_RANK {local_rank} but this node has {torch.cuda.device_count()} GPU(s); "
                "start at most one rank per GPU"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
        if threads is None:
            threads = max(1, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", world_size))))
        torch.set_num_threads(threads)
    if threads is not None and device.type == "cuda":
        torch.set_num_threads(threads)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if backend == "nccl" else None,
        )
    axes = parallel.mesh_axes
    mesh = None
    if axes:
        mesh = init_device_mesh(
            device.type, tuple(d for _, d in axes), mesh_dim_names=tuple(a for a, _ in axes)
        )
    return WorkerContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device, mesh=mesh,
                         timeout_s=timeout_s)


def shutdown_worker() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
