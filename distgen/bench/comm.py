"""``distgen bench comm``: the exchange engine's all-reduce over gloo vs shared memory, in one run.

Both transports run in the same rank processes and alternate round by round (load drift on a
shared machine hits both alike). Per payload size: ``--rounds`` rounds of ``--iters`` blocking
``all_reduce`` calls per transport, then the same with ``all_reduce_async`` issued and waited
right away; reported per transport: median seconds per call over the rounds, and this rank's CPU
seconds per call (``time.process_time``: includes gloo's own threads, the cost a small
all-reduce takes from compute on a loaded host). ``same_bits`` checks that both transports gave
identical sums on every call (rank 0's view; the ranks hold the same bits by construction).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from distgen.config import ConfigError, ParallelConfig

DEFAULT_SIZES = "4K,64K,1M"
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20}


def parse_sizes(text: str) -> list[int]:
    """'4K,64K,1M' -> bytes."""
    sizes = []
    for item in (s.strip().upper() for s in text.split(",") if s.strip()):
        unit = item[-1] if item[-1] in "KM" else ""
        try:
            value = int(item[:-1] if unit else item) * _UNITS[unit]
        except ValueError:
            value = 0
        if value <= 0:
            raise ConfigError(f"--sizes: expected a comma list of byte sizes such as 4K,64K,1M, got {text!r}")
        sizes.append(value)
    if not sizes:
        raise ConfigError(f"--sizes: expected a comma list of byte sizes such as 4K,64K,1M, got {text!r}")
    return sizes


@dataclass(frozen=True)
class CommBenchJob:
    entry: ClassVar[str] = "distgen.bench.comm:run_comm_bench"
    sizes: tuple[int, ...]
    dtype: str = "fp32"
    iters: int = 200
    rounds: int = 5
    parallel: ParallelConfig = field(default_factory=lambda: ParallelConfig({}))
    threads_per_rank: int = 1
    comm_timeout_s: float = 60.0


def run_comm_bench(job: CommBenchJob, ctx) -> dict | None:
    import torch.distributed as dist

    from distgen.comm import CommStats, ExchangeEngine
    from distgen.models.diffusion import TORCH_DTYPES

    dtype = TORCH_DTYPES[job.dtype]
    engines = {name: ExchangeEngine(dist.group.WORLD, CommStats(), ctx.device, timeout_s=ctx.timeout_s,
                                    shared_memory=name == "shm")
               for name in ("gloo", "shm")}
    available = {name: engine._channel() is not None if name == "shm" else True for name, engine in engines.items()}
    out = []
    for nbytes in job.sizes:
        numel = max(1, nbytes // torch.empty((), dtype=dtype).element_size())
        generator = torch.Generator().manual_seed(ctx.rank + numel)
        x = torch.randn(numel, generator=generator).to(dtype).to(ctx.device)
        entry = {"bytes": numel * x.element_size(), "numel": numel}
        same = True
        for mode in ("blocking", "async"):
            wall = {name: [] for name in engines}
            cpu = {name: [] for name in engines}
            for _ in range(job.rounds):
                results = {}
                for name, engine in engines.items():
                    dist.barrier()
                    w0, c0 = time.perf_counter(), time.process_time()
                    for _ in range(job.iters):
                        if mode == "blocking":
                            result = engine.all_reduce(x)
                        else:
                            result = engine.all_reduce_async(x.clone()).wait()
                    wall[name].append((time.perf_counter() - w0) / job.iters)
                    cpu[name].append((time.process_time() - c0) / job.iters)
                    results[name] = result
                same = same and torch.equal(results["gloo"].view(-1).view(torch.uint8),
                                            results["shm"].view(-1).view(torch.uint8))
            for name in engines:
                entry[f"{mode}_{name}_seconds_per_call"] = statistics.median(wall[name])
                entry[f"{mode}_{name}_cpu_seconds_per_call"] = statistics.median(cpu[name])
            entry[f"{mode}_shm_speedup"] = entry[f"{mode}_gloo_seconds_per_call"] / entry[f"{mode}_shm_seconds_per_call"]
        entry["same_bits"] = same
        out.append(entry)
    return {"shm_available": available["shm"], "sizes": out} if ctx.rank == 0 else None


def bench_comm(args) -> dict:
    from distgen.launch import run_job as launch
    from distgen.config import DTYPES

    if args.dtype not in DTYPES:
        raise ConfigError(f"--dtype: unknown dtype {args.dtype!r}; allowed: {', '.join(DTYPES)}")
    for name in ("iters", "rounds", "nproc"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ConfigError(f"--{name} must be a positive integer, got {getattr(args, name)}")
    nproc = args.nproc or 2
    if nproc < 2:
        raise ConfigError(f"--nproc: an all-reduce needs at least 2 ranks, got {nproc}")
    job = CommBenchJob(sizes=tuple(parse_sizes(args.sizes)), dtype=args.dtype, iters=args.iters, rounds=args.rounds,
                       threads_per_rank=args.threads_per_rank, comm_timeout_s=args.comm_timeout)
    launcher = args.launcher if args.launcher != "auto" else "spawn"
    started = time.perf_counter()
    result = launch(job, nproc, launcher, args.timeout, args.ray_address, threads_per_rank=args.threads_per_rank)
    from distgen.comm import shm

    return {
        "workload": "comm",
        "op": "all_reduce (sum)",
        "nproc": nproc,
        "dtype": args.dtype,
        "threads_per_rank": args.threads_per_rank,
        "iters": args.iters,
        "rounds": args.rounds,
        "shm_reduce_limit_bytes": shm.REDUCE_LIMIT,
        "note": ("gloo and shared memory alternate round by round in the same ranks; medians over rounds of the "
                 "mean per call; cpu = this rank's process CPU time per call (gloo's threads included). async = "
                 "all_reduce_async issued and waited at once (no overlap)."),
        **result,
        "wall_seconds": time.perf_counter() - started,
    }
