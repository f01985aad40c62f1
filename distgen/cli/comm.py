"""``distgen bench comm``: the exchange engine's collectives, gloo vs same-host shared memory."""

from __future__ import annotations

from distgen.cli.common import add_launch_arguments, print_json


def register(generate_kinds, bench_kinds) -> None:
    bench = bench_kinds.add_parser("comm", help="all-reduce latency and CPU cost, gloo vs shared memory, in one run")
    bench.add_argument("--sizes", default="4K,64K,1M", help="comma list of payload sizes in bytes (K, M suffixes)")
    bench.add_argument("--dtype", default="fp32", help="fp32, bf16, fp16")
    bench.add_argument("--iters", type=int, default=200, help="calls per round and transport")
    bench.add_argument("--rounds", type=int, default=5, help="rounds per size; transports alternate round by round")
    bench.add_argument("--threads-per-rank", type=int, default=1)
    add_launch_arguments(bench, timeout_s=600.0)
    bench.set_defaults(handler=_bench_comm)


def _bench_comm(args) -> int:
    from distgen.bench.comm import bench_comm

    print_json(bench_comm(args))
    return 0
