"""``distgen bench moe``: expert placement policies vs one rank, on the same routing, in one run.

1. The single-rank baseline generates the requests and records their routing (per-layer
   expert loads and the cross-layer matrices) — or ``--routing`` gives a recorded trace.
2. Each policy of ``--compare`` computes its placement for the ep ranks from that trace
   (eplb with ``--redundant-experts`` spare slots, default one per rank).
3. One set of ep workers loads the model once and runs the same requests under every
   placement in turn, migrating expert weights by P2P between policies
   (``TextJob.placements``), so machine drift hits every policy alike.

Per policy: seconds per decoding step and per prefill, expert all-to-all bytes per step and per
rank pair (every rank's counters), seconds waiting on expert communication, the balancedness
(mean / max tokens per rank) of each layer and overall, and the MoETuner cross-rank fraction,
from the recorded routing. ``--ranks N`` projects each policy to N ranks: its placement is
computed for N ranks on the same trace, per-layer compute is the busiest rank's token count
times the measured per-token expert time, communication a link model (``--link-gbps``,
``--link-latency-us``) over the rows that leave their dispatching rank (see
``distgen.parallel.expert.Dispatch``).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import numpy as np
import torch

from distgen.config import ConfigError, ParallelConfig, parse_choices

PROMPTS = (
    "Explain how a bicycle stays upright.",
    "Write a short poem about the sea.",
    "What is the capital of France, and why is it famous?",
    "List three uses of copper.",
    "How do vaccines work?",
    "Describe a rainy afternoon in a city.",
    "What is 17 times 23? Show your steps.",
    "Give advice to someone learning to cook.",
)


def _requests(tokenizer, batch: int, new_tokens: int, repeats: int):
    from distgen.workloads.text import encode_prompts
    from distgen.runtime.text import TextRequest

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    ids = tuple(tuple(p) for p in encode_prompts(tokenizer, prompts, "auto", None))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    warmup = TextRequest(prompt_ids=ids, max_new_tokens=min(4, new_tokens), pad_token_id=int(pad))
    measured = TextRequest(prompt_ids=ids, max_new_tokens=new_tokens, pad_token_id=int(pad))
    return (warmup,) + (measured,) * repeats


def _expert_seconds_per_token(hidden: int, intermediate: int, dtype: torch.dtype) -> dict:
    """Measured cost of one expert: t(rows) = fixed + per_token * rows (least squares, 1 thread)."""
    from distgen.models.moe import Expert

    expert = Expert(hidden, intermediate).to(dtype)
    sizes, times = (1, 8, 32, 128), []
    with torch.inference_mode():
        for rows in sizes:
            x = torch.randn(rows, hidden, dtype=dtype)
            expert(x)
            started = time.perf_counter()
            for _ in range(20):
                expert(x)
            times.append((time.perf_counter() - started) / 20)
    slope, intercept = np.polyfit(sizes, times, 1)
    return {"per_token_s": max(float(slope), 0.0), "fixed_s": max(float(intercept), 0.0)}


def project(policy_layers: dict, trace, ranks: int, tokens_per_step: int, hidden: int, bytes_per_value: int,
            expert_cost: dict, link_gbps: float, link_latency_us: float) -> dict:
    """Projected MoE seconds per step on ``ranks`` ranks, as our runtime moves rows: per layer,
    the busiest rank's expert work, plus dispatch and combine of the choices that leave their
    row's dispatching rank, plus every rank's combined rows to every rank."""
    from distgen.placement.metrics import cross_rank_fraction, rank_loads

    compute = comm = 0.0
    share = tokens_per_step * trace.top_k / max(1.0, float(trace.loads.sum(axis=1).mean()))
    # first MoE layer: rows sliced evenly, a choice stays home with probability 1 / ranks; later
    # layers: rows sit where their previous first choice was, so the co-routing metric applies
    later = cross_rank_fraction(policy_layers, trace)
    for i, layer in enumerate(trace.layers):
        slots = policy_layers[layer]
        loads = rank_loads(slots, trace.loads[i]) * share  # token-choices per rank this step
        experts_here = max(len(s) for s in slots)
        compute += float(loads.max()) * expert_cost["per_token_s"] + experts_here * expert_cost["fixed_s"]
        leaving = 1 - 1.0 / ranks if i == 0 else later
        rows_out = tokens_per_step * trace.top_k * leaving / ranks  # choices one rank sends, on average
        payload = (2 * rows_out + tokens_per_step / ranks * (ranks - 1)) * hidden * bytes_per_value
        comm += payload * 8 / (link_gbps * 1e9) + 3 * (ranks - 1) * link_latency_us * 1e-6
    return {"compute_seconds_per_step": compute, "communication_seconds_per_step": comm,
            "moe_seconds_per_step": compute + comm}


def bench_moe(args) -> dict:
    from distgen.launch import run_job as launch
    from distgen.workloads import resolve_nproc
    from distgen.workloads.text import resolve_model
    from distgen.models.checkpoint import DTYPES as TORCH_DTYPES
    from distgen.models.checkpoint import load_tokenizer, open_checkpoint
    from distgen.parallel.expert import moe_layers
    from distgen.placement.metrics import summary
    from distgen.placement.policies import POLICIES, compute
    from distgen.placement.routing import RoutingTrace
    from distgen.runtime.text import TEXT_AXES, TextJob, check_job

    parallel = ParallelConfig.parse(args.parallel, TEXT_AXES, "text")
    nproc = resolve_nproc(args, parallel)
    ep = parallel.degree("ep")
    if ep < 2:
        raise ConfigError(f"--parallel: the MoE benchmark compares placements over expert-parallel ranks; give ep >= 2 "
                          f"(got {parallel})")
    policies = parse_choices(args.compare, POLICIES, "--compare", "policy")
    for name in ("batch_size", "max_new_tokens", "repeats", "ranks"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    checkpoint = open_checkpoint(resolve_model(args.model, default="smollm2-moe"))
    config = checkpoint.config
    if config.moe is None:
        raise ConfigError(f"--model {checkpoint.directory} is a dense model ({config.architecture}); the MoE benchmark "
                          f"needs an MoE checkpoint")
    redundant = ep if args.redundant_experts is None else args.redundant_experts
    tokenizer = load_tokenizer(checkpoint.directory)
    requests = _requests(tokenizer, args.batch_size, args.max_new_tokens, args.repeats)
    layers, experts = moe_layers(config), config.moe.num_experts
    base = TextJob(requests=requests, parallel=parallel, model=checkpoint.directory, dtype=args.dtype,
                   threads_per_rank=args.threads_per_rank, comm_timeout_s=args.comm_timeout, redundant_experts=redundant)
    check_job(base, checkpoint, nproc)  # ep against the slots, before any launch
    launcher = args.launcher if args.launcher != "auto" else "spawn"
    report: dict = {
        "workload": "moe", "model": checkpoint.directory, "architecture": config.architecture,
        "experts": experts, "top_k": config.moe.top_k, "moe_layers": len(layers), "parallel": str(parallel),
        "nproc": nproc, "dtype": args.dtype, "threads_per_rank": args.threads_per_rank,
        "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "repeats": args.repeats,
        "redundant_experts_eplb": redundant,
    }

    def per_step(run: dict, key: str, first: int = 1):
        values = run[key][first:]
        return statistics.median(values) if values else 0

    def summarise(runs: list[dict]) -> dict:
        measured = runs[1:]  # skip the warmup request
        steps = [r["decode_seconds"] / max(1, len(r["step_tokens"]) - 1) for r in measured]
        return {"seconds_per_decode_step": statistics.median(steps),
                "prefill_seconds": statistics.median(r["prefill_seconds"] for r in measured),
                "decode_tokens_per_s": statistics.median(sum(r["step_tokens"][1:]) / r["decode_seconds"] for r in measured),
                "ep_bytes_sent_per_decode_step": int(statistics.median(per_step(r, "ep_bytes") for r in measured)),
                "ep_bytes_sent_prefill": int(statistics.median(r["ep_bytes"][0] for r in measured)),
                "ep_wait_seconds_per_decode_step": statistics.median(per_step(r, "ep_wait_seconds") for r in measured),
                "tokens": measured[-1]["tokens"]}

    if args.routing:  # a user's trace is checked before any launch
        RoutingTrace.load(args.routing).check_for(experts, layers, f"--routing {args.routing}")
    with tempfile.TemporaryDirectory() as tmp:
        trace_path = args.routing or os.path.join(tmp, "routing.npz")
        baseline = None
        if not args.no_baseline or not args.routing:
            single = base.replace(parallel=ParallelConfig({}), redundant_experts=0,
                                  record_routing=None if args.routing else trace_path)
            started = time.perf_counter()
            result = launch(single, 1, "spawn", args.timeout, threads_per_rank=args.threads_per_rank)
            baseline = summarise(result["results"]) | {"wall_seconds": time.perf_counter() - started}
        trace = RoutingTrace.load(trace_path)
        trace.check_for(experts, layers, f"--routing {args.routing}" if args.routing else "the recorded routing")
    report["routing"] = {"source": args.routing or "recorded by the single-rank baseline on the same requests",
                         "tokens": int(trace.tokens)}
    placements = []
    for policy in policies:
        placement = compute(policy, trace, experts, layers, ep, nodes=args.nodes,
                            redundant=redundant if policy == "eplb" else 0, time_limit_s=args.time_limit)
        placements.append((policy, {int(k): v for k, v in placement.layers.items()}, placement))
    job = base.replace(placement=placements[0][1], placement_policy=policies[0],
                       placements=tuple((p, layers_) for p, layers_, _ in placements))
    started = time.perf_counter()
    result = launch(job, nproc, launcher, args.timeout, args.ray_address, threads_per_rank=args.threads_per_rank)
    report["wall_seconds"] = time.perf_counter() - started
    if baseline is not None:
        report["baseline"] = {"nproc": 1} | {k: v for k, v in baseline.items() if k != "tokens"}
    per_policy = len(requests)
    runs = []
    for i, (policy, _, placement) in enumerate(placements):
        mine = result["results"][i * per_policy:(i + 1) * per_policy]
        entry = {"policy": policy, "slots_per_rank": len(placement.layers[layers[0]][0]),
                 "solver_seconds": placement.solver_seconds, "note": placement.note}
        entry |= summarise(mine)
        tokens = entry.pop("tokens")
        if baseline is not None:
            entry["decode_speedup_vs_1_rank"] = baseline["seconds_per_decode_step"] / entry["seconds_per_decode_step"]
            entry["same_tokens_as_1_rank"] = tokens == baseline["tokens"]
        matrices = [r["ep_bytes_matrix"] for r in mine[1:]]
        entry["ep_bytes_per_rank_pair_per_request"] = [
            [int(statistics.median(m[src][dst] for m in matrices)) for dst in range(nproc)] for src in range(nproc)]
        entry["migration_before"] = mine[0]["migration"]
        entry |= summary(placement, trace)
        runs.append(entry)
    report["runs"] = runs
    # projection to --ranks N from the measured expert cost and a link model
    dtype = TORCH_DTYPES[args.dtype]
    cost = _expert_seconds_per_token(config.hidden_size, config.moe.expert_intermediate_size, dtype)
    projection = {"ranks": args.ranks, "link_gbps": args.link_gbps, "link_latency_us": args.link_latency_us,
                  "tokens_per_step": args.batch_size, "expert_cost": cost, "policies": {}}
    for policy in policies:
        if (experts + (args.ranks if policy == "eplb" else 0)) % args.ranks:
            projection["policies"][policy] = {"skipped": f"{args.ranks} ranks do not divide the expert slots"}
            continue
        placement = compute(policy, trace, experts, layers, args.ranks,
                            redundant=args.ranks if policy == "eplb" else 0, time_limit_s=args.time_limit)
        projection["policies"][policy] = project(
            {int(k): v for k, v in placement.layers.items()}, trace, args.ranks, args.batch_size,
            config.hidden_size, dtype.itemsize, cost, args.link_gbps, args.link_latency_us) | {
            k: v for k, v in summary(placement, trace).items() if not isinstance(v, (list, dict))}
    report["projection"] = projection
    if args.peer == "deepspeed":
        from distgen.bench.moe_peer import bench_peer

        report["peer"] = bench_peer(args, config, nproc)
    return report
