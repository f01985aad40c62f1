"""``distgen serve``: a resident worker group behind the OpenAI-compatible HTTP server.

Everything is checked before any worker starts (the model, the plan, the modes, the host and
key). The HTTP server comes up at once and answers ``/health`` with 503 until the group has
loaded the model. Under torchrun every process runs this command: rank 0 serves and leads, the
others follow the leader's plans.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from distgen.cli.common import add_launch_arguments
from distgen.config import DTYPES, PATCH_MODES, SP_MODES, ConfigError

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def register_serve(commands) -> None:
    from distgen.config_video import CLIP_MODES
    from distgen.serve.service import WORKLOADS

    p = commands.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API (resident ranks)")
    p.add_argument("--model", default=None,
                   help="a diffusers pipeline directory, a causal-LM checkpoint directory, or an embedded model "
                        "name (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--workload", default=None, choices=WORKLOADS, help="default: from the model directory")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: the directory's name)")
    p.add_argument("--parallel", default="", help="degrees per axis, as for `distgen generate` (e.g. tp=2, cfg=2,patch=2)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; anything but loopback needs an API key")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key-file", default=None, help="file holding the API key (or set DISTGEN_API_KEY)")
    p.add_argument("--max-queued", type=int, default=64, help="requests waiting or running at once; more get 429")
    p.add_argument("--max-batch-size", type=int, default=8,
                   help="image requests of one shape run together, up to this (text: with --batching request-level)")
    p.add_argument("--batching", default="continuous",
                   help="text: continuous (requests join and leave the running batch every step, on a slot KV cache) "
                        "or request-level (one request at a time)")
    p.add_argument("--max-num-seqs", type=int, default=16, help="text, continuous: cache slots (sequences at once)")
    p.add_argument("--max-num-batched-tokens", type=int, default=512,
                   help="text, continuous: tokens per step (decodes first, prompt chunks fill the rest)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="text, continuous: positions per slot, prompt + new tokens (default: min(context, 2048))")
    p.add_argument("--max-restarts", type=int, default=3, help="group rebuilds after a rank dies, before giving up")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="on SIGTERM: seconds to finish what runs")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body accepted")
    p.add_argument("--max-pixels", type=int, default=2048 * 2048, help="largest image / video frame (width x height)")
    p.add_argument("--max-steps", type=int, default=200, help="most denoising steps a request may ask for")
    p.add_argument("--max-frames", type=int, default=1024, help="most video frames a request may ask for")
    p.add_argument("--output-dir", default=None, help="where finished videos are kept (default: a temporary directory)")
    p.add_argument("--dtype", default="fp32", help=", ".join(DTYPES))
    p.add_argument("--patch-mode", default="displaced", help=f"image patch mode: {', '.join(PATCH_MODES)}")
    p.add_argument("--sp-mode", default="ulysses", help=f"sequence parallelism: {', '.join(SP_MODES)}")
    p.add_argument("--warmup-steps", type=int, default=4, help="synchronous steps before stale context is used")
    p.add_argument("--pipefusion-patches", type=int, default=None,
                   help="image, with --parallel pipefusion=N: patches M >= N (default: up to 4 per stage)")
    p.add_argument("--vae-parallel", action="store_true", help="image: decode over the patch ranks (exact)")
    p.add_argument("--clip-mode", default="dual-scope", help=f"video clip parallelism: {', '.join(CLIP_MODES)}")
    p.add_argument("--stale-context", action="store_true", help="video: previous step's exchanges (overlapped)")
    p.add_argument("--ladder-layers", type=int, default=None, help="text: Ladder Residual on the upper K layers")
    p.add_argument("--threads-per-rank", type=int, default=None, help="CPU threads per rank (default: cores / ranks)")
    p.add_argument("--log-level", default="warning", help="uvicorn's log level")
    add_launch_arguments(p)
    p.set_defaults(handler=serve)


def register_bench_serve(bench_kinds) -> None:
    b = bench_kinds.add_parser("serve", help="a real server under Poisson arrivals vs one-shot runs, in one run")
    b.add_argument("--workload", default="text", choices=("text", "image", "video"))
    b.add_argument("--model", default=None, help="as for `distgen serve` (default: the workload's embedded model)")
    b.add_argument("--parallel", default="")
    b.add_argument("--nproc", type=int, default=None)
    b.add_argument("--launcher", default="auto", choices=("auto", "spawn", "ray"))
    b.add_argument("--requests", type=int, default=32)
    b.add_argument("--rate", type=float, default=2.0, help="mean arrivals per second (Poisson)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--max-tokens", type=int, default=32, help="text: mean tokens per request (EOS ignored)")
    b.add_argument("--length-spread", type=float, default=0.0,
                   help="text: output lengths uniform in max-tokens x [1-s, 1+s], and prompts of mixed length (0: all equal)")
    b.add_argument("--compare", default=None,
                   help="text: batching modes to run in turn on the same requests (continuous,request-level)")
    b.add_argument("--steps", type=int, default=8, help="image / video: denoising steps")
    b.add_argument("--sizes", default="64,128", help="image: comma list of sizes, alternated over requests")
    b.add_argument("--frames", type=int, default=8, help="video: frames per request")
    b.add_argument("--max-queued", type=int, default=256)
    b.add_argument("--oneshot-requests", type=int, default=4,
                   help="how many of the requests also run through one-shot `distgen generate` (0: skip)")
    b.add_argument("--threads-per-rank", type=int, default=1)
    b.add_argument("--timeout", type=float, default=1800.0)
    b.set_defaults(handler=_bench_serve)


def _bench_serve(args) -> int:
    from distgen.bench.serve import bench_serve
    from distgen.cli.common import print_json

    print_json(bench_serve(args))
    return 0


def _api_key(args) -> str | None:
    if args.api_key_file:
        try:
            with open(args.api_key_file) as f:
                key = f.read().strip()
        except OSError as exc:
            raise ConfigError(f"--api-key-file {args.api_key_file}: cannot read it ({exc.strerror})") from None
        if not key:
            raise ConfigError(f"--api-key-file {args.api_key_file}: the file is empty")
        return key
    return os.environ.get("DISTGEN_API_KEY") or None


def prepare_service(args):
    """Validate everything; returns (service, nproc, api key)."""
    from distgen.config import ParallelConfig
    from distgen.serve.service import ServeOptions, Service
    from distgen.workloads import resolve_nproc

    key = _api_key(args)
    if args.host not in LOOPBACK_HOSTS and key is None:
        raise ConfigError(f"--host {args.host}: a server reachable from other machines needs an API key; give one "
                          f"with --api-key-file FILE or DISTGEN_API_KEY (or bind to 127.0.0.1)")
    for name in ("max_queued", "max_batch_size", "max_body_bytes", "max_pixels", "max_steps", "max_frames"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.max_restarts < 0:
        raise ConfigError(f"--max-restarts must be >= 0, got {args.max_restarts}")
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port must be between 1 and 65535, got {args.port}")
    if args.parallel == "auto":
        _auto_parallel(args)
    nproc = resolve_nproc(args, ParallelConfig.parse(args.parallel))
    options = ServeOptions(
        model=args.model, workload=args.workload, served_model_name=args.served_model_name, parallel=args.parallel,
        nproc=nproc, dtype=args.dtype, patch_mode=args.patch_mode, sp_mode=args.sp_mode,
        warmup_steps=args.warmup_steps, clip_mode=args.clip_mode, stale_context=args.stale_context,
        ladder_layers=args.ladder_layers, comm_timeout=args.comm_timeout, max_batch_size=args.max_batch_size,
        batching=args.batching, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len, max_pixels=args.max_pixels, max_steps=args.max_steps, max_frames=args.max_frames, output_dir=args.output_dir,
        pipefusion_patches=args.pipefusion_patches, vae_parallel=args.vae_parallel,
    )
    return Service(options, nproc), nproc, key


def _auto_parallel(args) -> None:
    """--parallel auto: plan for the served workload at its default request size."""
    from distgen.serve.service import ServeOptions, resolve_model_for_serving
    from distgen.workloads import resolve_auto_parallel

    directory, workload, _, size = resolve_model_for_serving(ServeOptions(model=args.model, workload=args.workload))
    if workload == "image":
        request = {"height": size, "width": size} if isinstance(size, int) else {}
    elif workload == "video":
        request = dict(zip(("frames", "height", "width"), size)) if isinstance(size, tuple) else {}
    else:
        request = {"batch": args.max_num_seqs if args.batching == "continuous" else 1}
    resolve_auto_parallel(args, workload, directory, **request)


def serve(args) -> int:
    from distgen.launch.local import in_torchrun

    service, nproc, key = prepare_service(args)
    launcher = args.launcher
    if launcher == "auto":
        launcher = "torchrun" if in_torchrun() else "spawn"
    job = service.resident_job()
    if launcher == "torchrun":
        if not in_torchrun():
            raise ConfigError("--launcher torchrun: not running under torchrun (run `torchrun --nproc-per-node N -m "
                              "distgen serve ...`)")
        if int(os.environ["WORLD_SIZE"]) != nproc:
            raise ConfigError(f"--nproc {nproc} does not match torchrun's WORLD_SIZE {os.environ['WORLD_SIZE']}")
        if os.environ.get("RANK", "0") != "0":
            from distgen.launch.groups import follow

            follow(job)  # until rank 0 broadcasts stop
            return 0
    return run_server(service, job, nproc, launcher, args, key)


def run_server(service, job, nproc: int, launcher: str, args, key: str | None) -> int:
    import asyncio
    import contextlib

    import uvicorn

    from distgen.engine import Engine, EngineConfig
    from distgen.serve.app import create_app

    engine = Engine(EngineConfig(job=job, nproc=nproc, launcher=launcher, ray_address=args.ray_address,
                                 max_queued=args.max_queued,
                                 max_restarts=0 if launcher == "torchrun" else args.max_restarts,
                                 threads_per_rank=args.threads_per_rank))
    app = create_app(service, engine, api_key=key, max_body_bytes=args.max_body_bytes)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=max(1, int(args.drain_timeout)))
    server = uvicorn.Server(config)

    async def main() -> None:
        async def watch() -> None:  # the group is down for good: stop serving, exit non-zero
            while not server.should_exit:
                if engine.state == "failed":
                    print(f"distgen: error: the worker group is down: {engine.stats.last_failure}", file=sys.stderr)
                    server.should_exit = True
                    return
                await asyncio.sleep(0.5)

        async def announce() -> None:
            while engine.state in ("starting",) and not server.should_exit:
                await asyncio.sleep(0.2)
            if engine.state == "ready":
                batching = ""
                if service.continuous is not None:
                    c, m = service.continuous, service.checkpoint.config
                    size = 2 if service.options.dtype in ("fp16", "bf16") else 4
                    cache = c.max_num_seqs * c.max_model_len * m.num_layers * 2 * m.num_kv_heads * m.head_dim * size
                    batching = (f", continuous batching: {c.max_num_seqs} slots x {c.max_model_len} positions "
                                f"({cache / 2**20:.0f} MiB of KV cache over all ranks), "
                                f"{c.max_num_batched_tokens} tokens per step")
                print(f"distgen: ready: {service.workload} model {service.name!r} on {nproc} rank(s) "
                      f"({launcher}, parallel {service.parallel}{batching}) at http://{args.host}:{args.port}/v1",
                      file=sys.stderr, flush=True)

        # Starting the group may block (Ray placement): not on the event loop.
        asyncio.get_running_loop().run_in_executor(None, engine.start, False)
        tasks = [asyncio.create_task(watch()), asyncio.create_task(announce())]
        try:
            await server.serve()
        finally:
            for task in tasks:
                task.cancel()

    print(f"distgen: serving {service.workload} model {service.name!r} ({service.model_dir}); loading on {nproc} "
          f"rank(s) ...", file=sys.stderr, flush=True)
    # uvicorn handles SIGTERM / SIGINT while it serves (graceful shutdown: stop accepting, let open
    # requests finish within --drain-timeout), then re-raises the signal to the handler it found:
    # that must not kill us before the group is stopped and the exit code chosen.
    # Ray's driver installs a SIGTERM handler of its own that aborts the process: join (or start)
    # Ray first, so that the handlers installed after it are the ones that run.
    started_ray = False
    if launcher == "ray":
        from distgen.launch.ray import connect

        started_ray = connect(args.ray_address, num_cpus=max(nproc, os.cpu_count() or 1))
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda s, frame: received.append(s)) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        asyncio.run(main())
    finally:
        clean = engine.stop(drain_timeout_s=args.drain_timeout)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if started_ray:
            import ray

            ray.shutdown()
    if engine.state == "failed":
        return 1
    with contextlib.suppress(Exception):
        if not clean:
            print("distgen: some requests were not finished within --drain-timeout", file=sys.stderr)
    return 0 if clean else 1
