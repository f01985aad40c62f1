"""The per-rank entry point every launcher calls (torchrun, local spawn, Ray actors)."""

from __future__ import annotations

import importlib
import os
from typing import Any

from distgen.config import ImageJob
from distgen.runtime.dist import init_worker, shutdown_worker


def resolve_model_dir(model: str | None) -> str:
    """A job's model directory; ``None``: the embedded default image model."""
    from distgen.models import presets

    return presets.resolve("image", None, presets.default("image")).directory if model is None else model


def quiet_libraries() -> None:
    """Workers print our progress bar and errors, not N copies of the libraries' chatter.

    Through the libraries' environment variables (read when they are first imported), so a
    worker that never needs diffusers or transformers does not pay for importing them.
    """
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import sys

    for name in ("diffusers", "transformers"):  # already imported (spawned workers inherit nothing, torchrun may)
        if name in sys.modules:
            logging = importlib.import_module(f"{name}.utils.logging")
            logging.set_verbosity_error()
            logging.disable_progress_bar()


def run_worker(job: Any, channel=None) -> dict | None:
    """Run ``job`` as this process's rank; rank 0 returns a picklable result dict.

    ``channel``: rank 0's link to a controller, for resident jobs
    (:class:`distgen.runtime.resident.ResidentJob`); their entry is called as fn(job, ctx, channel).
    """
    quiet_libraries()
    entry = getattr(type(job), "entry", None)
    if not isinstance(entry, str) or ":" not in entry:
        raise TypeError(f"unsupported job type {type(job).__name__} (no 'module:function' entry)")
    module_name, _, function_name = entry.partition(":")
    run = getattr(importlib.import_module(module_name), function_name)
    ctx = init_worker(job.parallel, timeout_s=job.comm_timeout_s, threads=job.threads_per_rank)
    try:
        fault = os.environ.get("DISTGEN_INJECT_FAULT")
        if fault is not None and int(fault) == ctx.rank:
            # Test hook: one rank fails while the others go on into collectives.
            raise RuntimeError(f"injected fault on rank {ctx.rank}")
        return run(job, ctx) if channel is None else run(job, ctx, channel)
    finally:
        shutdown_worker()


def run_image_job(job: ImageJob, ctx) -> dict | None:
    from distgen.runtime.diffusion import DiffusionRunner, gather_rank_report, gather_step_seconds

    runner = DiffusionRunner(job, ctx, resolve_model_dir(job.model))
    results = []
    for repeat in range(job.repeats):
        last = repeat == job.repeats - 1
        decode = last and (ctx.rank == 0 or job.vae_parallel)  # a parallel decode is a collective
        results.append(runner.generate(job.request, decode=decode))
    per_rank_steps = [gather_step_seconds(ctx, r.step_seconds) for r in results]
    ranks = gather_rank_report(ctx, runner.denoiser, results[-1].wait_seconds)  # memory per rank, waits
    if ctx.rank != 0:
        return None
    final = results[-1]
    if job.out:
        os.makedirs(os.path.dirname(os.path.abspath(job.out)) or ".", exist_ok=True)
        final.images[0].save(job.out)
    return {
        "out": job.out,
        "latents": final.latents if job.return_latents else None,
        "image": final.images[0] if final.images else None,
        "runs": [
            {
                "step_seconds": r.step_seconds,
                "step_seconds_per_rank": steps,
                "bytes_sent": r.bytes_sent,
                "bytes_recv": r.bytes_recv,
                "wait_seconds": r.wait_seconds,
            }
            for r, steps in zip(results, per_rank_steps)
        ],
        "decode": final.decode,
        "ranks": ranks,
    }
