"""``distgen place``: compute expert placements and predict their balance and cross-rank traffic.

Reads the MoE shape from a checkpoint (``--model DIR``) or takes one (``--synthetic
layers,experts,top_k``), the routing from ``--routing FILE.npz`` (recorded with
``--record-routing``) or a synthetic trace, and prints one JSON object: per policy the
balancedness (mean / max tokens per rank, overall and per layer), the cross-rank token
fraction, solver seconds and notes, plus the tuner's cut against round-robin and the most any
placement could cut on this trace (``routing.cross_rank_floor``: a bound, not a solve).
"""

from __future__ import annotations

def register_place(subparsers) -> None:
    from distgen.placement.policies import POLICIES

    p = subparsers.add_parser("place", help="compute an expert placement; prints its predicted balance as JSON")
    shape = p.add_mutually_exclusive_group(required=True)
    shape.add_argument("--model", default=None, help="MoE checkpoint directory (config.json gives experts and layers)")
    shape.add_argument("--synthetic", default=None, metavar="LAYERS,EXPERTS,TOP_K",
                       help="no model: a synthetic MoE shape, e.g. 8,32,2 (MoE layers 0..LAYERS-1)")
    p.add_argument("--routing", default=None, metavar="FILE.npz",
                   help="recorded routing (--record-routing); default: a synthetic trace (--zipf, --correlation, ...)")
    p.add_argument("--zipf", type=float, default=1.0,
                   help="synthetic trace: Zipf skew of expert popularity (0: uniform)")
    p.add_argument("--correlation", type=float, default=0.8,
                   help="synthetic trace: probability a token follows its cross-layer path")
    p.add_argument("--tokens", type=int, default=20000, help="synthetic trace: tokens")
    p.add_argument("--seed", type=int, default=0, help="synthetic trace: seed")
    p.add_argument("--save-trace", default=None, metavar="FILE.npz", help="write the synthetic trace used")
    p.add_argument("--ranks", type=int, required=True, help="expert-parallel ranks (the ep degree)")
    p.add_argument("--nodes", type=int, default=1, help="nodes the ranks span (hierarchical eplb when > 1)")
    p.add_argument("--policy", default="all", help=f"{', '.join(POLICIES)} or all (default: all, compare them)")
    p.add_argument("--redundant-experts", type=int, default=0,
                   help="spare expert slots in all (eplb / tuner replicate into them)")
    p.add_argument("--groups", type=int, default=None,
                   help="eplb hierarchical: contiguous expert groups kept on one node (default: one per expert)")
    p.add_argument("--time-limit", type=float, default=10.0, help="tuner: seconds for all CP-SAT solves together")
    p.add_argument("--out", default=None, metavar="placement.json",
                   help="write the placement (required with a single --policy; not allowed with all)")
    p.set_defaults(handler=_place)


def _moe_shape(args) -> tuple[int, tuple[int, ...], int, str]:
    """(experts, MoE layer indices, top_k, description) from --model or --synthetic."""
    from distgen.config import ConfigError

    if args.model is not None:
        from distgen.models.checkpoint import open_checkpoint

        from distgen.workloads.text import resolve_model

        config = open_checkpoint(resolve_model(args.model)).config
        if config.moe is None:
            raise ConfigError(f"--model {args.model} is a dense model ({config.architecture}): placement needs an "
                              "MoE checkpoint (Mixtral, Qwen2-MoE or Qwen3-MoE)")
        layers = tuple(i for i, sparse in enumerate(config.moe.sparse_layers) if sparse)
        return config.moe.num_experts, layers, config.moe.top_k, f"{args.model} ({config.architecture})"
    try:
        num_layers, experts, top_k = (int(x) for x in args.synthetic.split(","))
    except ValueError:
        raise ConfigError(f"--synthetic must be LAYERS,EXPERTS,TOP_K (three integers, e.g. 8,32,2), "
                          f"got {args.synthetic!r}") from None
    if num_layers < 1 or experts < 1 or not 1 <= top_k <= experts:
        raise ConfigError(f"--synthetic {args.synthetic}: need LAYERS >= 1, EXPERTS >= 1 and 1 <= TOP_K <= EXPERTS")
    return experts, tuple(range(num_layers)), top_k, f"synthetic {num_layers} layers x {experts} experts, top-{top_k}"


def _place(args) -> int:
    from distgen.cli.common import print_json
    from distgen.config import ConfigError
    from distgen.placement import metrics
    from distgen.placement.policies import POLICIES, compute, validate
    from distgen.placement.routing import RoutingTrace, synthetic

    policies = POLICIES if args.policy == "all" else (args.policy,)
    if args.policy != "all" and args.policy not in POLICIES:
        raise ConfigError(f"--policy must be one of {', '.join(POLICIES)} or all, got {args.policy!r}")
    if args.policy == "all" and args.out:
        raise ConfigError("--out writes one placement: choose it with --policy "
                          f"({', '.join(POLICIES)}); --policy all only compares them")
    if args.policy != "all" and not args.out:
        raise ConfigError(f"--policy {args.policy} needs --out placement.json (or --policy all to only compare)")
    if args.routing and args.save_trace:
        raise ConfigError("--save-trace writes the synthetic trace; it does not apply with --routing")
    if args.tokens < 1:
        raise ConfigError(f"--tokens must be >= 1, got {args.tokens}")
    experts, moe_layers, top_k, model = _moe_shape(args)
    for policy in policies:  # every bad parameter before any solve
        validate(policy, experts, moe_layers, args.ranks, args.nodes, args.redundant_experts, True, args.time_limit,
                 args.groups, ranks_flag=f"--ranks {args.ranks}")

    if args.routing:
        trace = RoutingTrace.load(args.routing)
        trace.check_for(experts, moe_layers, f"--routing {args.routing}")
        routing = {"source": args.routing}
    else:
        trace = synthetic(len(moe_layers), experts, top_k, args.tokens, zipf_s=args.zipf,
                          correlation=args.correlation, seed=args.seed)
        trace.layers = moe_layers  # the model's MoE layer indices
        routing = {"source": "synthetic", "zipf": args.zipf, "correlation": args.correlation, "seed": args.seed}
        if args.save_trace:
            trace.save(args.save_trace)
            routing["saved"] = args.save_trace
    routing.update(tokens=trace.tokens, moe_layers=len(trace.layers), experts=trace.num_experts, top_k=trace.top_k)

    results = {}
    for policy in policies:
        placement = compute(policy, trace, experts, moe_layers, args.ranks, args.nodes, args.redundant_experts,
                            args.time_limit, source=f"--routing {args.routing}" if args.routing else "synthetic",
                            groups=args.groups, ranks_flag=f"--ranks {args.ranks}")
        results[policy] = metrics.summary(placement, trace)
        if args.out:
            placement.save(args.out)
    slots_per_rank = (experts + args.redundant_experts) // args.ranks
    routing["cross_rank_floor"] = round(metrics.cross_rank_floor(trace, slots_per_rank), 4)
    mi = metrics.consecutive_mutual_information(trace)
    routing["consecutive_layer_mi_bits"] = [round(x, 4) for x in mi]  # 0: layers route independently
    routing["mean_consecutive_layer_mi_bits"] = round(sum(mi) / len(mi), 4) if mi else 0.0
    out = {"model": model, "routing": routing, "ranks": args.ranks, "nodes": args.nodes,
           "redundant_experts": args.redundant_experts, "policies": results}
    if "round-robin" in results:
        base = results["round-robin"]
        for policy in results:
            if policy == "round-robin":
                continue
            r = results[policy]
            r["cross_rank_cut_vs_round_robin"] = (round(1 - r["cross_rank_fraction"] / base["cross_rank_fraction"], 4)
                                                  if base["cross_rank_fraction"] > 0 else 0.0)
            r["balancedness_vs_round_robin"] = round(r["balancedness"] / base["balancedness"], 4)
        if base["cross_rank_fraction"] > 0:  # what no placement can beat: see metrics.cross_rank_floor
            out["max_possible_cut_vs_round_robin"] = round(
                1 - routing["cross_rank_floor"] / base["cross_rank_fraction"], 4)
    if args.out:
        out["out"] = args.out
    print_json(out)
    return 0

