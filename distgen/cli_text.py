"""``distgen generate text`` and ``distgen bench text``.

Everything a user can get wrong is checked here, before any worker starts: the checkpoint
(files present and readable, a supported architecture), tp against heads / KV heads / MLP
columns, pp against the layer count, --ladder-layers against the layer count, the prompt
against the model's context.
"""

from __future__ import annotations

import argparse
import os
import sys

from distgen.config import DTYPES, ConfigError, ParallelConfig

LADDER_CAVEAT = (
    "Ladder Residual is a different function from the standard residual: converting the upper {k} layer(s) of a "
    "checkpoint trained with the standard wiring is a speed study only; the output quality needs a checkpoint "
    "trained (or retrained) with ladder_layers={k}."
)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="Hugging Face checkpoint directory (config.json + *.safetensors + tokenizer), or "
                             "'smollm2-moe': the embedded MoE model (SmolLM2 split into 16 experts, Qwen2-MoE "
                             "format; derived once into the cache); default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--parallel", default="",
                        help="degrees per axis, e.g. 'tp=2,pp=2', 'tp=2,ep=2' or 'dp=2,ep=2' (axes: dp, tp, pp, ep; "
                             "ep shares the dp x tp ranks; dp: each rank its own share of the prompts)")
    parser.add_argument("--ladder-layers", type=int, default=None,
                        help="run the upper K layers with Ladder Residual wiring (default: the checkpoint's "
                             "config.json 'ladder_layers', else 0)")
    parser.add_argument("--micro-batches", type=int, default=None,
                        help="pipeline micro-batches (default: pp, at most the batch size)")
    parser.add_argument("--dtype", default="fp32", help=f"{', '.join(DTYPES)}")
    from distgen.cli import add_launch_arguments

    add_launch_arguments(parser)


def register(generate_kinds, bench_kinds) -> None:
    text = generate_kinds.add_parser("text", help="text generation with a Llama-family checkpoint (tp, pp, Ladder)")
    _add_common(text)
    text.add_argument("--prompt", action="append", default=None,
                      help="prompt text; repeat for a batch (default: a short question)")
    text.add_argument("--chat", default="auto", choices=("auto", "on", "off"),
                      help="wrap each prompt as a user message in the checkpoint's chat template "
                           "(auto: when the tokenizer has one)")
    text.add_argument("--system", default=None, help="system message for the chat template")
    text.add_argument("--max-new-tokens", type=int, default=64)
    text.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    text.add_argument("--top-p", type=float, default=1.0)
    text.add_argument("--seed", type=int, default=0)
    text.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    add_moe_arguments(text)
    text.set_defaults(handler=generate_text)

    bench = bench_kinds.add_parser("text", help="standard vs Ladder tensor parallelism vs one rank, in one run")
    _add_common(bench)
    bench.add_argument("--preset", default="llama-bench",
                       help="embedded model when --model is not given: llama-bench (default; a random ~160 M "
                            "Llama, hidden 1024, 8 layers, 16/8 heads: tp 1, 2, 4, 8), smollm2 (tp 1 or 3), tiny")
    bench.add_argument("--batch-size", default="1", help="comma list of batch sizes, e.g. 1,8")
    bench.add_argument("--compare", default="standard,ladder,no-comm",
                       help="comma list of wirings: standard, ladder (all layers unless --ladder-layers), "
                            "no-comm (every tp all-reduce skipped: wrong output, the speed ceiling)")
    bench.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per sequence (random ids)")
    bench.add_argument("--max-new-tokens", type=int, default=32, help="decoding steps measured per request")
    bench.add_argument("--repeats", type=int, default=3, help="measured requests per wiring and batch size "
                                                                "(wirings alternate; medians are reported)")
    bench.add_argument("--threads-per-rank", type=int, default=1)
    bench.add_argument("--no-baseline", action="store_true", help="skip the single-rank run")
    bench.set_defaults(handler=bench_text)

    moe = bench_kinds.add_parser("moe", help="expert placement policies (round-robin, eplb, tuner) vs one rank, in one run")
    moe.add_argument("--model", default=None, help="MoE checkpoint directory (default: the embedded smollm2-moe)")
    moe.add_argument("--parallel", default="ep=2", help="degrees per axis with ep >= 2, e.g. 'ep=2' or 'tp=2,ep=2'")
    moe.add_argument("--compare", default="round-robin,eplb,tuner", help="comma list of placement policies")
    moe.add_argument("--redundant-experts", type=int, default=None,
                     help="eplb's spare slots per layer (default: one per ep rank)")
    moe.add_argument("--nodes", type=int, default=1, help="nodes for hierarchical eplb")
    moe.add_argument("--routing", default=None, help="place from this trace instead of the baseline's recorded routing")
    moe.add_argument("--time-limit", type=float, default=10.0, help="tuner: solver time limit in seconds")
    moe.add_argument("--batch-size", type=int, default=8, help="prompts per request")
    moe.add_argument("--max-new-tokens", type=int, default=24, help="decoding steps per request")
    moe.add_argument("--repeats", type=int, default=2, help="measured requests per policy (medians reported)")
    moe.add_argument("--ranks", type=int, default=8, help="project every policy to this many ranks")
    moe.add_argument("--link-gbps", type=float, default=100.0, help="projection: link bandwidth, Gbit/s per rank")
    moe.add_argument("--link-latency-us", type=float, default=10.0, help="projection: per-message latency")
    moe.add_argument("--dtype", default="fp32", help=f"{', '.join(DTYPES)}")
    from distgen.cli import add_launch_arguments

    add_launch_arguments(moe)
    moe.add_argument("--threads-per-rank", type=int, default=1)
    moe.add_argument("--no-baseline", action="store_true", help="skip the single-rank run (needs --routing)")
    moe.add_argument("--peer", default=None, choices=("deepspeed",),
                     help="also time one MoE layer of the same shape in DeepSpeed's MoE (optional extra) vs ours")
    moe.set_defaults(handler=bench_moe)


def add_moe_arguments(parser: argparse.ArgumentParser) -> None:
    moe = parser.add_argument_group("mixture of experts (--parallel ep=N)")
    moe.add_argument("--placement", default=None,
                     help="expert placement: round-robin (default), linear, eplb, tuner, or a placement .json "
                          "written by `distgen place`")
    moe.add_argument("--redundant-experts", type=int, default=0,
                     help="spare expert slots per layer, filled with replicas of the heaviest experts (eplb)")
    moe.add_argument("--nodes", type=int, default=1, help="nodes the ep ranks span (hierarchical eplb)")
    moe.add_argument("--routing", default=None,
                     help="routing trace (.npz from --record-routing) that eplb / tuner place from "
                          "(default for eplb: uniform loads, refined online with --rebalance-interval)")
    moe.add_argument("--rebalance-interval", type=int, default=None,
                     help="online EPLB: recompute the placement every N decoding steps and migrate experts by P2P")
    moe.add_argument("--rebalance-window", type=int, default=32,
                     help="forward passes of routing the online EPLB looks at (sliding window)")
    moe.add_argument("--record-routing", default=None, metavar="FILE.npz",
                     help="write per-layer expert loads and cross-layer routing counts of this run")
    moe.add_argument("--time-limit", type=float, default=10.0, help="tuner: solver time limit in seconds")


def resolve_placement(args, config, parallel: ParallelConfig) -> dict:
    """--placement / --routing / --redundant-experts -> TextJob fields (checked before launch)."""
    from distgen.parallel.expert import moe_layers

    fields = {"redundant_experts": args.redundant_experts, "nodes": args.nodes,
              "rebalance_interval": args.rebalance_interval, "rebalance_window": args.rebalance_window,
              "record_routing": args.record_routing}
    placement = args.placement or ("eplb" if args.redundant_experts or args.routing else None)
    if config.moe is None or placement is None:
        if config.moe is None and args.routing:
            raise ConfigError(f"--routing {args.routing}: the model is dense ({config.architecture}); routing traces "
                              f"belong to MoE checkpoints")
        if args.placement is not None:
            fields["placement_policy"] = args.placement  # check_job names the dense model
            fields["placement"] = {}
        return fields
    from distgen.placement.policies import POLICIES, Placement, compute
    from distgen.placement.routing import RoutingTrace

    ep = parallel.degree("ep")
    layers = moe_layers(config)
    if ep == 1:
        raise ConfigError(f"--placement {placement}: placing experts needs expert parallelism (--parallel ep=N, N > 1)")
    trace = None
    if args.routing:
        trace = RoutingTrace.load(args.routing)
        trace.check_for(config.moe.num_experts, layers, args.routing)
    if placement in POLICIES:
        result = compute(placement, trace, config.moe.num_experts, layers, ep, nodes=args.nodes,
                         redundant=args.redundant_experts, time_limit_s=args.time_limit)
        if result.note:
            print(f"distgen: note: {result.note}", file=sys.stderr)
    elif placement.endswith(".json") or os.path.exists(placement):
        result = Placement.load(placement)
        result.check_for(config.moe.num_experts, layers, ep, placement)
        slots = len(next(iter(result.layers.values()))[0]) * ep
        fields["redundant_experts"] = slots - config.moe.num_experts
    else:
        raise ConfigError(f"--placement: unknown policy {placement!r}; allowed: {', '.join(POLICIES)}, "
                          f"or a placement .json file")
    return fields | {"placement": {int(k): v for k, v in result.layers.items()}, "placement_policy": result.policy}


def default_model_dir() -> str:
    from distgen.models import smollm2

    return str(smollm2.model_dir())


def resolve_model(model: str | None) -> str:
    """--model: a checkpoint directory, the embedded MoE's name, or None (the embedded SmolLM2)."""
    from distgen.models.smollm2_moe import CLI_NAME, smollm2_moe_dir

    if model == CLI_NAME and not os.path.isdir(model):
        return str(smollm2_moe_dir())
    return model or default_model_dir()


def encode_prompts(tokenizer, prompts: list[str], chat: str, system: str | None) -> list[list[int]]:
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat == "on" and not has_template:
        raise ConfigError("--chat on: this checkpoint's tokenizer has no chat template; use --chat off")
    encoded = []
    for prompt in prompts:
        if chat == "on" or (chat == "auto" and has_template):
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer(prompt)["input_ids"]
        encoded.append(list(ids))
    return encoded


def prepare_text_job(args):
    """Validate and tokenize; returns (job, nproc, tokenizer, checkpoint)."""
    from distgen.models.checkpoint import load_tokenizer, open_checkpoint
    from distgen.runtime.text import TextJob, TextRequest, check_job

    from distgen.cli import resolve_nproc

    parallel = ParallelConfig.parse(args.parallel)
    nproc = resolve_nproc(args, parallel)
    model = resolve_model(args.model)
    checkpoint = open_checkpoint(model)
    tokenizer = load_tokenizer(checkpoint.directory)
    prompts = args.prompt or ["Explain tensor parallelism in one sentence."]
    if any(not p for p in prompts):
        raise ConfigError("--prompt must not be empty")
    prompt_ids = encode_prompts(tokenizer, prompts, args.chat, args.system)
    eos = set(checkpoint.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        eos.add(int(tokenizer.eos_token_id))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (min(eos) if eos else 0)
    request = TextRequest(
        prompt_ids=tuple(tuple(p) for p in prompt_ids),
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        eos_token_ids=() if args.ignore_eos else tuple(sorted(eos)),
        pad_token_id=int(pad),
    )
    moe = resolve_placement(args, checkpoint.config, parallel) if hasattr(args, "placement") else {}
    job = TextJob(requests=(request,), parallel=parallel, model=checkpoint.directory, dtype=args.dtype,
                  ladder_layers=args.ladder_layers, micro_batches=args.micro_batches, comm_timeout_s=args.comm_timeout,
                  **moe)
    check_job(job, checkpoint, nproc)
    return job, nproc, tokenizer, checkpoint


def ladder_note(job, checkpoint) -> str | None:
    k = job.ladder_layers
    if k is not None and k > checkpoint.config.ladder_layers:
        return LADDER_CAVEAT.format(k=k)
    return None


def generate_text(args) -> int:
    from distgen.cli import launch

    job, nproc, tokenizer, checkpoint = prepare_text_job(args)
    note = ladder_note(job, checkpoint)
    from distgen.launch.local import in_torchrun

    rank0 = not in_torchrun() or os.environ.get("RANK", "0") == "0"
    if note and rank0:
        print(f"distgen: note: {note}", file=sys.stderr)
    result = launch(job, nproc, args.launcher, args.timeout, args.ray_address)
    if result is None:
        return 0
    run = result["results"][0]
    for i, ids in enumerate(run["tokens"]):
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if len(run["tokens"]) > 1:
            print(f"--- [{i}] {args.prompt[i]!r}")
        print(text)
    new_tokens = sum(len(t) for t in run["tokens"])
    decode_steps = max(1, len(run["step_tokens"]) - 1)
    print(f"distgen: {new_tokens} new tokens, prefill {run['prefill_seconds']:.2f} s, decode "
          f"{run['decode_seconds']:.2f} s ({run['decode_seconds'] / decode_steps * 1000:.1f} ms/step); parallel "
          f"{job.parallel}, ladder layers {result['config']['ladder_layers']}/{result['config']['num_layers']}, "
          f"model {checkpoint.directory}", file=sys.stderr)
    if job.parallel.degree("ep") > 1:
        moved = sum(r["experts_moved_all_ranks"] for r in run["rebalances"])
        print(f"distgen: experts: placement {job.placement_policy}, {sum(run['ep_bytes'])} bytes sent by rank 0 in "
              f"expert exchanges, {sum(run['ep_wait_seconds']):.3f} s waiting; {len(run['rebalances'])} online "
              f"rebalance(s), {moved} expert copies moved", file=sys.stderr)
    if job.record_routing:
        print(f"distgen: routing written to {job.record_routing}", file=sys.stderr)
    return 0


def bench_text(args) -> int:
    from distgen.bench_text import bench_text as run_bench
    from distgen.cli import print_json

    print_json(run_bench(args))
    return 0


def bench_moe(args) -> int:
    from distgen.bench_moe import bench_moe as run_bench
    from distgen.cli import print_json

    print_json(run_bench(args))
    return 0
