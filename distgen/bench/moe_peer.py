"""``distgen bench moe --peer deepspeed``: one MoE layer, ours against DeepSpeed's, on the same ranks.

DeepSpeed (``deepspeed.moe.layer.MoE``, an optional extra) is the measured peer: its GShard-style
layer routes with a capacity per expert and exchanges fixed-size (experts x capacity x hidden)
buffers, ours exchanges exactly the rows that move. Both get the same shapes (hidden size, expert
width, experts, top-k), random weights and the same input rows; each is timed over
``--peer-repeats`` forward calls after a warmup, for a decode-sized and a prefill-sized batch of
rows. The two do not compute the same function (DeepSpeed's gate normalises and may drop tokens
beyond capacity; we give it a capacity large enough to drop none), so only time and bytes compare.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import ClassVar

import torch

from distgen.config import ParallelConfig


@dataclass(frozen=True)
class MoEPeerJob:
    entry: ClassVar[str] = "distgen.bench.moe_peer:run_peer"

    parallel: ParallelConfig
    hidden: int
    intermediate: int
    experts: int
    top_k: int
    rows: tuple[int, ...] = (8, 512)
    repeats: int = 10
    threads_per_rank: int | None = 1
    comm_timeout_s: float = 120.0


def _time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


@torch.inference_mode()
def run_peer(job: MoEPeerJob, ctx) -> dict | None:
    import torch.distributed as dist

    from distgen.comm import CommStats, ExchangeEngine
    from distgen.models.moe import Expert, MoEBlock, MoESpec
    from distgen.parallel.expert import ExpertParallelBlock, round_robin

    torch.manual_seed(0)
    spec = MoESpec(num_experts=job.experts, top_k=job.top_k, expert_intermediate_size=job.intermediate,
                   norm_topk_prob=True, routing="qwen")
    stats = CommStats()
    engine = ExchangeEngine(dist.group.WORLD, stats, ctx.device)
    block = MoEBlock(job.hidden, spec)
    ours = ExpertParallelBlock(block, round_robin(job.experts, ctx.world_size), engine)
    for p in ours.parameters():
        torch.nn.init.normal_(p, std=0.02)
    out: dict = {"ours": {}, "deepspeed": {}}
    for rows in job.rows:
        x = torch.randn(rows, job.hidden, generator=torch.Generator().manual_seed(rows))
        stats.reset()
        seconds = _time(lambda: ours(x), job.repeats)
        calls = job.repeats + 1
        out["ours"][rows] = {"seconds_per_layer": seconds, "bytes_sent_per_layer": stats.current.bytes_sent // calls,
                             "wait_seconds_per_layer": stats.current.wait_s / calls}
    try:
        import deepspeed
        from deepspeed.moe.layer import MoE
    except ImportError as exc:
        out["deepspeed"] = {"skipped": f"deepspeed not importable ({exc}); install the extra: pip install "
                                       f"--no-build-isolation 'distgen[deepspeed]'"}
        return out if ctx.rank == 0 else None
    deepspeed.init_distributed(dist_backend="gloo")  # joins the existing process group
    capacity = float(job.experts)  # capacity factor = experts: no token is ever dropped
    layer = MoE(hidden_size=job.hidden, expert=Expert(job.hidden, job.intermediate), num_experts=job.experts,
                ep_size=ctx.world_size, k=job.top_k, capacity_factor=capacity, eval_capacity_factor=capacity,
                min_capacity=1, drop_tokens=False, use_rts=False)
    layer.set_deepspeed_parallelism()
    layer.eval()
    out["deepspeed"]["version"] = deepspeed.__version__
    for rows in job.rows:
        # the same tokens in total: DeepSpeed's ranks each bring their own rows (data parallel), ours
        # hold them all and dispatch a share each
        share = rows * (ctx.rank + 1) // ctx.world_size - rows * ctx.rank // ctx.world_size
        x = torch.randn(1, share, job.hidden, generator=torch.Generator().manual_seed(rows + ctx.rank))
        seconds = _time(lambda: layer(x), job.repeats)
        # without dropping, the capacity is the most tokens any expert gets (DeepSpeed all-reduces it);
        # dispatch and combine each send (experts x capacity x hidden) split over the ranks
        counts = layer(x)[2].to(torch.int64).max().reshape(1)
        dist.all_reduce(counts, op=dist.ReduceOp.MAX)
        sent = 2 * job.experts * int(counts) * job.hidden * 4 * (ctx.world_size - 1) // ctx.world_size
        out["deepspeed"][rows] = {"seconds_per_layer": seconds, "bytes_sent_per_layer": sent}
    return out if ctx.rank == 0 else None


def bench_peer(args, config, nproc: int) -> dict:
    from distgen.launch import run_job as launch

    job = MoEPeerJob(parallel=ParallelConfig({"ep": nproc}), hidden=config.hidden_size,
                     intermediate=config.moe.expert_intermediate_size, experts=config.moe.num_experts,
                     top_k=config.moe.top_k, threads_per_rank=args.threads_per_rank)
    result = launch(job, nproc, "spawn", args.timeout, threads_per_rank=args.threads_per_rank)
    return {"layer": {"hidden": job.hidden, "expert_intermediate": job.intermediate, "experts": job.experts,
                      "top_k": job.top_k, "ep": nproc, "rows": list(job.rows)}} | result
