"""Command line: ``distgen generate|bench <kind>``, ``distgen place``.

Each workload adds its subcommands through a ``register(generate_kinds, bench_kinds)``
function (modules listed in ``WORKLOAD_COMMANDS``); every subparser sets ``handler`` to a
function ``handler(args) -> exit code``.

Everything is validated (by :mod:`distgen.workloads`) before any worker starts. Under
torchrun every process runs this same command and becomes one rank (SPMD); otherwise
``--nproc N`` spawns the ranks locally, or ``--launcher ray`` hands them to a Ray controller.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from torch.distributed.elastic.multiprocessing.errors import record

from distgen.config import ConfigError

# Modules with a register(generate_kinds, bench_kinds) function, one per workload.
WORKLOAD_COMMANDS: tuple[str, ...] = ("distgen.cli.image", "distgen.cli.text", "distgen.cli.video", "distgen.cli.comm")


class _Parser(argparse.ArgumentParser):
    """An option error is one line naming the option (the usage block only with --verbose);
    subcommand parsers are of this class too."""

    verbose = False

    def error(self, message: str):
        if self.verbose:
            self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="distgen", description="Distributed inference for generative models")
    parser.add_argument("--verbose", action="store_true",
                        help="errors with their full tracebacks (a failing rank's, a library's); anywhere on the line")
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="generate images, video or text")
    generate_kinds = generate.add_subparsers(dest="kind", required=True)
    bench = commands.add_parser("bench", help="benchmark, prints one JSON object")
    bench_kinds = bench.add_subparsers(dest="kind", required=True)
    for module in WORKLOAD_COMMANDS:
        importlib.import_module(module).register(generate_kinds, bench_kinds)
    importlib.import_module("distgen.cli.place").register_place(commands)  # distgen place (expert placement)
    importlib.import_module("distgen.cli.plan").register_plan(commands)  # distgen plan (cost-model planner)
    serve = importlib.import_module("distgen.cli.serve")
    serve.register_serve(commands)  # distgen serve (HTTP API)
    serve.register_bench_serve(bench_kinds)  # distgen bench serve
    return parser


RANK_TRACEBACK = "\n--- traceback of rank"  # where a WorkerError's message ends and the rank's traceback starts


@record  # under torchrun, the failing rank's message lands in the error summary
def main(argv: list[str] | None = None) -> int:
    # --verbose is global and may stand anywhere on the line: errors then carry their tracebacks
    # (a rank's, or the third-party library's behind a one-line message).
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv
    argv = [a for a in argv if a != "--verbose"]
    _Parser.verbose = verbose
    args = build_parser().parse_args(argv)
    from distgen.launch.local import WorkerError

    try:
        return args.handler(args)
    except ConfigError as exc:
        if verbose:
            traceback.print_exception(exc, file=sys.stderr)
        print(f"distgen: error: {exc}", file=sys.stderr)
        return 2
    except (WorkerError, ConnectionError) as exc:
        # A rank failed (its message, then its traceback, are in exc) or the cluster is unreachable.
        message = str(exc)
        if not verbose and RANK_TRACEBACK in message:
            message = message.split(RANK_TRACEBACK, 1)[0] + " (rerun with --verbose for the rank's traceback)"
        print(f"distgen: error: {message}", file=sys.stderr)
        return 1
