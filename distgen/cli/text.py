"""``distgen generate text``, ``distgen bench text`` and ``distgen bench moe``.

The options are checked by :mod:`distgen.workloads.text` before any worker starts.
"""

from __future__ import annotations

import argparse
import os
import sys

from distgen.cli.common import add_launch_arguments, print_json
from distgen.config import DTYPES


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="Hugging Face checkpoint directory (config.json + *.safetensors + tokenizer), or the "
                             "name of an embedded model: smollm2 (SmolLM2-135M-Instruct, the default of generate "
                             "text), smollm2-moe (SmolLM2 split into 16 experts, Qwen2-MoE format; derived once into "
                             "the cache), llama-bench / tiny (random Llamas without a tokenizer, for bench text; its "
                             "default llama-bench); a directory that exists wins over a name")
    parser.add_argument("--parallel", default="",
                        help="degrees per axis, e.g. 'tp=2,pp=2', 'tp=2,ep=2' or 'dp=2,ep=2' (axes: dp, tp, pp, ep; "
                             "ep shares the dp x tp ranks; dp: each rank its own share of the prompts)")
    parser.add_argument("--ladder-layers", type=int, default=None,
                        help="run the upper K layers with Ladder Residual wiring (default: the checkpoint's "
                             "config.json 'ladder_layers', else 0)")
    parser.add_argument("--micro-batches", type=int, default=None,
                        help="pipeline micro-batches (default: pp, at most the batch size)")
    parser.add_argument("--dtype", default="fp32", help=f"{', '.join(DTYPES)}")
    add_launch_arguments(parser)


def register(generate_kinds, bench_kinds) -> None:
    text = generate_kinds.add_parser("text", help="text generation with a Llama-family checkpoint (tp, pp, Ladder)")
    _add_common(text)
    text.add_argument("--prompt", action="append", default=None,
                      help="prompt text; repeat for a batch (default: a short question)")
    text.add_argument("--prompts-file", default=None, metavar="FILE.jsonl",
                      help="more prompts, one JSON string (or {\"prompt\": ...}) per line, after any --prompt")
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
    bench.add_argument("--preset", default=None,
                       help="alias of --model NAME (kept for older command lines): llama-bench (the default; a random "
                            "~160 M Llama, hidden 1024, 8 layers, 16/8 heads: tp 1, 2, 4, 8), smollm2 (tp 1 or 3), tiny")
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
    moe.add_argument("--model", default=None, help="MoE checkpoint directory, or an embedded name (default: smollm2-moe)")
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


def generate_text(args) -> int:
    from distgen.launch import run_job
    from distgen.launch.local import in_torchrun
    from distgen.workloads.text import ladder_note, prepare_text_job

    job, nproc, tokenizer, checkpoint = prepare_text_job(args)
    note = ladder_note(job, checkpoint)

    rank0 = not in_torchrun() or os.environ.get("RANK", "0") == "0"
    if note and rank0:
        print(f"distgen: note: {note}", file=sys.stderr)
    if job.parallel.degree("dp") > 1 or job.record_routing:
        # dp shards one batch over ranks and routing records are written at the end of a job:
        # both run as a one-off job, not on a resident group
        result = run_job(job, nproc, args.launcher, args.timeout, args.ray_address)
        if result is None:
            return 0
        run = result["results"][0] | result["config"]
    else:
        from distgen.engine import run_once
        from distgen.runtime.resident import ResidentJob

        run = run_once(ResidentJob("text", job.replace(requests=())), nproc, args.launcher, "text", job.requests[0],
                       ray_address=args.ray_address, timeout_s=args.timeout)
        if run is None:
            return 0
    for i, ids in enumerate(run["tokens"]):
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if len(run["tokens"]) > 1:
            print(f"--- [{i}] {args.prompt[i]!r}")
        print(text)
    new_tokens = sum(len(t) for t in run["tokens"])
    decode_steps = max(1, len(run["step_tokens"]) - 1)
    print(f"distgen: {new_tokens} new tokens, prefill {run['prefill_seconds']:.2f} s, decode "
          f"{run['decode_seconds']:.2f} s ({run['decode_seconds'] / decode_steps * 1000:.1f} ms/step); parallel "
          f"{job.parallel}, ladder layers {run['ladder_layers']}/{run['num_layers']}, "
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
    from distgen.bench.text import bench_text as run_bench

    print_json(run_bench(args))
    return 0


def bench_moe(args) -> int:
    from distgen.bench.moe import bench_moe as run_bench

    print_json(run_bench(args))
    return 0
