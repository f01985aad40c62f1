"""Command line: ``distgen generate <kind>``, ``distgen bench <kind>``.

Each workload adds its subcommands through a ``register(generate_kinds, bench_kinds)``
function (modules listed in ``WORKLOAD_COMMANDS``); every subparser sets ``handler`` to a
function ``handler(args) -> exit code``.

Everything is validated here, before any worker starts. Under torchrun every process runs
this same command and becomes one rank (SPMD); otherwise ``--nproc N`` spawns the ranks
locally, or ``--launcher ray`` hands them to a Ray controller.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from torch.distributed.elastic.multiprocessing.errors import record

from distgen.config import SP_MODES
from distgen.config import LAUNCHERS, PATCH_MODES, ConfigError, ImageJob, ImageRequest, ParallelConfig, PatchConfig, IMAGE_AXES


def _add_image_arguments(parser: argparse.ArgumentParser, *, bench: bool) -> None:
    parser.add_argument("--prompt", default="a lighthouse at dusk")
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--height", type=int, default=None, help="pixels (default: 128, or the preset's size)")
    parser.add_argument("--width", type=int, default=None, help="pixels (default: 128, or the preset's size)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 20; bench: 8)")
    parser.add_argument("--guidance-scale", type=float, default=5.0, help="classifier-free guidance; <= 1 disables it")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None, help="local diffusers pipeline directory (save_pretrained layout)")
    parser.add_argument("--parallel", default="", help="degrees per axis, e.g. 'cfg=2,patch=2' (axes: %s)" % ", ".join(IMAGE_AXES))
    mode_help = "comma list of modes to compare" if bench else "patch mode"
    parser.add_argument("--patch-mode", default="displaced", help=f"{mode_help}: {', '.join(PATCH_MODES)}")
    parser.add_argument("--warmup-steps", type=int, default=4, help="synchronous steps before stale context is used")
    parser.add_argument("--pcpp-fraction", type=float, default=0.3, help="partial mode: fraction of each neighbour band attended")
    sp_help = "comma list of sp modes to compare" if bench else "sequence parallelism (DiTs)"
    parser.add_argument("--sp-mode", default="ulysses" if not bench else "ulysses,ring", help=f"{sp_help}: {', '.join(SP_MODES)}")
    parser.add_argument("--dtype", default="fp32", help="fp32, bf16 or fp16")
    add_launch_arguments(parser)


# Modules with a register(generate_kinds, bench_kinds) function, one per workload.
WORKLOAD_COMMANDS: tuple[str, ...] = ("distgen.cli_text", "distgen.cli_video")


def add_launch_arguments(parser: argparse.ArgumentParser, timeout_s: float = 1800.0) -> None:
    """How to start the ranks: the same options for every workload."""
    parser.add_argument("--nproc", type=int, default=None, help="ranks to start (default: product of --parallel degrees)")
    parser.add_argument("--launcher", default="auto", choices=LAUNCHERS, help="auto: torchrun if run under it, else spawn")
    parser.add_argument("--ray-address", default=None, help="Ray cluster address (default: the job's cluster or a local one)")
    parser.add_argument("--timeout", type=float, default=timeout_s, help="seconds before the whole job is stopped")
    parser.add_argument("--comm-timeout", type=float, default=300.0, help="seconds before a stuck collective fails")


def resolve_nproc(args, parallel: ParallelConfig) -> int:
    """--nproc, else torchrun's WORLD_SIZE, else the product of the --parallel degrees."""
    if args.nproc is not None:
        nproc = args.nproc
    elif in_torchrun_env():
        nproc = int(os.environ["WORLD_SIZE"])
    else:
        nproc = parallel.world_size
    if nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {nproc}")
    return nproc


def _register_image(generate_kinds, bench_kinds) -> None:
    image = generate_kinds.add_parser("image", help="text-to-image with a diffusers pipeline")
    _add_image_arguments(image, bench=False)
    image.add_argument("--out", default="out.png", help="PNG written by rank 0")
    image.add_argument("--no-progress", action="store_true")
    image.set_defaults(handler=_generate_image)

    bench_image = bench_kinds.add_parser("image", help="patch / cfg parallelism vs one rank, in one run")
    _add_image_arguments(bench_image, bench=True)
    bench_image.add_argument("--preset", default="tiny-sd", help="embedded model preset (ignored with --model)")
    bench_image.add_argument("--repeats", type=int, default=1, help="requests per configuration (steps are pooled)")
    bench_image.add_argument("--threads-per-rank", type=int, default=1)
    bench_image.add_argument("--no-baseline", action="store_true", help="skip the single-rank run")
    bench_image.set_defaults(handler=_bench_image)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distgen", description="Distributed inference for generative models")
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="generate images, video or text")
    generate_kinds = generate.add_subparsers(dest="kind", required=True)
    bench = commands.add_parser("bench", help="benchmark, prints one JSON object")
    bench_kinds = bench.add_subparsers(dest="kind", required=True)
    _register_image(generate_kinds, bench_kinds)
    for module in WORKLOAD_COMMANDS:
        importlib.import_module(module).register(generate_kinds, bench_kinds)
    importlib.import_module("distgen.cli_place").register_place(commands)  # distgen place (expert placement)
    return parser


def print_json(obj) -> None:
    print(json.dumps(obj, indent=2))


def prepare_image_job(
    args, patch_mode: str | None = None, model_dir: str | None = None, sp_mode: str | None = None
) -> tuple[ImageJob, int]:
    """Validate everything a user can get wrong; returns the job and the number of ranks."""
    from distgen.models import diffusion as adapter
    from distgen.models.tiny import DEFAULT_MODEL, preset_dir

    parallel = ParallelConfig.parse(args.parallel)
    nproc = resolve_nproc(args, parallel)
    parallel.validate(nproc, IMAGE_AXES)
    request = ImageRequest(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        height=args.height or 128,
        width=args.width or 128,
        steps=args.steps or 20,
        guidance_scale=args.guidance_scale,
        seed=args.seed,
    )
    patch = PatchConfig(mode=patch_mode or args.patch_mode, warmup_steps=args.warmup_steps, pcpp_fraction=args.pcpp_fraction)
    job = ImageJob(
        request=request,
        parallel=parallel,
        patch=patch,
        sp_mode=sp_mode or args.sp_mode,
        model=model_dir or args.model,
        dtype=args.dtype,
        comm_timeout_s=args.comm_timeout,
    )
    job.validate()
    model = job.model if job.model is not None else str(preset_dir(DEFAULT_MODEL))
    info = adapter.inspect_pipeline(model)
    adapter.validate_geometry(info, request, parallel)
    from distgen.parallel import sequence

    sequence.validate_image(info, request, parallel, job.sp_mode)
    return job.replace(model=model), nproc


def in_torchrun_env() -> bool:
    from distgen.launch.local import in_torchrun

    return in_torchrun()


def launch(job, nproc: int, launcher: str, timeout_s: float, ray_address: str | None = None, threads_per_rank=None):
    """Run a job with the chosen launcher; returns rank 0's result (None on other torchrun ranks)."""
    from distgen.launch import local

    if launcher == "auto":
        launcher = "torchrun" if local.in_torchrun() else "spawn"
    if launcher == "torchrun":
        if not local.in_torchrun():
            raise ConfigError("--launcher torchrun: not running under torchrun (run `torchrun --nproc-per-node N -m distgen ...`)")
        world = int(os.environ["WORLD_SIZE"])
        if world != nproc:
            raise ConfigError(f"--nproc {nproc} does not match torchrun's WORLD_SIZE {world}")
        from distgen.runtime.worker import run_worker

        return run_worker(job)
    if launcher == "ray":
        from distgen.launch.ray import run_on_ray

        return run_on_ray(job, nproc, address=ray_address, timeout_s=timeout_s)
    return local.spawn(job, nproc, timeout_s=timeout_s, threads_per_rank=threads_per_rank)


def _generate_image(args) -> int:
    job, nproc = prepare_image_job(args)
    job = job.replace(out=args.out, progress=not args.no_progress)
    result = launch(job, nproc, args.launcher, args.timeout, args.ray_address)
    if result is not None:
        steps = result["runs"][-1]["step_seconds"]
        print(f"wrote {result['out']} ({job.request.width}x{job.request.height}, {len(steps)} steps, "
              f"parallel {job.parallel} mode {job.sp_mode if job.parallel.degree('sp') > 1 else job.patch.mode}, "
              f"{sum(steps):.2f} s in the denoiser)")
    return 0


def _bench_image(args) -> int:
    from distgen.bench import bench_image

    print_json(bench_image(args))
    return 0


@record  # under torchrun, the failing rank's message lands in the error summary
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from distgen.launch.local import WorkerError

    try:
        return args.handler(args)
    except ConfigError as exc:
        print(f"distgen: error: {exc}", file=sys.stderr)
        return 2
    except (WorkerError, ConnectionError) as exc:
        # A rank failed (its message and traceback are in exc) or the cluster is unreachable.
        print(f"distgen: error: {exc}", file=sys.stderr)
        return 1
