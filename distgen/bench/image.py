"""``distgen bench image``: N ranks vs one rank, each patch mode, in one run; one JSON object.

Every configuration runs the same request (same seed) in fresh worker processes. Seconds
per step are the median over denoiser calls after the warmup; bytes and waits are per rank
per step (rank 0's view; bands are equal, so every rank moves about the same); PSNR compares
the decoded image (and the latents) with the single-rank output. Every row reports memory per
rank (parameter bytes held, resident set) and each rank's waits. With ``--parallel pipefusion=N``
the rows are PipeFusion per ``--pipefusion-patches`` count (with its bubble: waits / step, and
the model's (N-1)/(M+N-1)) and patch=N per ``--compare`` mode (naive, displaced by default).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from distgen.config import IMAGE_AXES, PATCH_MODES, SP_MODES, ConfigError, ParallelConfig


def _psnr(output: np.ndarray, reference: np.ndarray, value_range: float) -> float:
    mse = float(np.mean((output.astype(np.float64) - reference.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(value_range**2 / mse)


def step_seconds(result: dict, skip: int) -> dict:
    """Each rank's median step time (steps of every run pooled, the first ``skip`` of each
    dropped) and the job's: its slowest rank's, since a step is done when every rank is."""
    runs = result["runs"]
    medians = [statistics.median(s for run in runs for s in run["step_seconds_per_rank"][rank][skip:])
               for rank in range(len(runs[0]["step_seconds_per_rank"]))]
    return {"seconds_per_step": max(medians), "seconds_per_step_per_rank": medians}


def _summarise(result: dict, skip: int) -> dict:
    sent = [b for run in result["runs"] for b in run["bytes_sent"][skip:]]
    recv = [b for run in result["runs"] for b in run["bytes_recv"][skip:]]
    wait = [w for run in result["runs"] for w in run["wait_seconds"][skip:]]
    if not any(run["step_seconds"][skip:] for run in result["runs"]):
        raise ConfigError(f"--steps must exceed --warmup-steps ({skip}) to time steady-state steps")
    return {
        **step_seconds(result, skip),
        "bytes_sent_per_rank_per_step": int(statistics.median(sent)),
        "bytes_recv_per_rank_per_step": int(statistics.median(recv)),
        "wait_seconds_per_step": statistics.median(wait),
    }


def bench_image(args) -> dict:
    from distgen.launch import run_job as launch
    from distgen.workloads.image import prepare_image_job, resolve_image_model

    sp_modes = [m.strip() for m in args.sp_mode.split(",") if m.strip()]
    for mode in sp_modes:
        if mode not in SP_MODES:
            raise ConfigError(f"--sp-mode: unknown mode {mode!r}; allowed: {', '.join(SP_MODES)}")
    resolved = resolve_image_model(args)
    model_dir = resolved.directory
    if getattr(args, "vae_parallel", False):
        import os

        from distgen.runtime.memory import MMAP_THRESHOLD_ENV

        os.environ.update(MMAP_THRESHOLD_ENV)  # workers inherit it: the decode's peak memory is measurable
    if resolved.size:
        args.height = args.height or resolved.size
        args.width = args.width or resolved.size
    args.steps = args.steps or 8
    modes = [m.strip() for m in args.patch_mode.split(",") if m.strip()]
    for mode in modes:
        if mode not in PATCH_MODES:
            raise ConfigError(f"--patch-mode: unknown mode {mode!r}; allowed: {', '.join(PATCH_MODES)}")
    # With an sp axis the runs compare sequence-parallel modes (patch modes do not apply).
    mode_key = "sp_mode" if ParallelConfig.parse(args.parallel, IMAGE_AXES, "images").degree("sp") > 1 else "patch_mode"
    # Validate every configuration before launching any.
    jobs = []
    if ParallelConfig.parse(args.parallel, IMAGE_AXES, "images").degree("pipefusion") > 1:
        jobs = _pipefusion_jobs(args, model_dir, modes[0], (sp_modes or ["ulysses"])[0])
    elif getattr(args, "pipefusion_patches", None):
        raise ConfigError(f"--pipefusion-patches {args.pipefusion_patches} applies only with --parallel pipefusion=N")
    for mode in (sp_modes if mode_key == "sp_mode" else modes) if not jobs else ():
        if mode_key == "sp_mode":
            job, nproc = prepare_image_job(args, patch_mode=modes[0], model_dir=model_dir, sp_mode=mode)
        else:
            job, nproc = prepare_image_job(args, patch_mode=mode, model_dir=model_dir, sp_mode=(sp_modes or ["ulysses"])[0])
        jobs.append((mode_key, mode, job, nproc))
    knobs = dict(return_latents=True, progress=False, repeats=args.repeats, threads_per_rank=args.threads_per_rank)
    skip = max(1, args.warmup_steps)

    report: dict = {
        "workload": "image",
        "model": model_dir,
        "preset": resolved.name,
        "height": args.height,
        "width": args.width,
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "dtype": args.dtype,
        "threads_per_rank": args.threads_per_rank,
        "timed_steps": f"slowest rank's median over denoiser calls {skip}..{args.steps - 1}",
    }
    baseline = None
    if not args.no_baseline:
        base_job = jobs[0][2].replace(parallel=type(jobs[0][2].parallel)({}), pipefusion_patches=None,
                                      vae_parallel=False, **knobs)
        started = time.perf_counter()
        base = launch(base_job, 1, "spawn", args.timeout, threads_per_rank=args.threads_per_rank)
        baseline = {"nproc": 1, **_summarise(base, skip), "wall_seconds": time.perf_counter() - started,
                    **_per_rank(base, skip), "decode": base.get("decode")}
        report["baseline"] = baseline
        base_latents = base["latents"].numpy()
        base_image = np.asarray(base["image"], dtype=np.float64) / 255.0
    runs = []
    for key, value, job, nproc in jobs:
        started = time.perf_counter()
        result = launch(job.replace(**knobs), nproc, args.launcher if args.launcher != "auto" else "spawn",
                        args.timeout, args.ray_address, threads_per_rank=args.threads_per_rank)
        entry = {
            "parallel": str(job.parallel),
            key: value,
            "nproc": nproc,
            **_summarise(result, skip),
            "wall_seconds": time.perf_counter() - started,
            **_per_rank(result, skip),
        }
        if key == "pipefusion_patches":
            _bubble(entry, job)
        # rank 0's decode: with --vae-parallel its band of the VAE (seconds, peak memory, bytes)
        entry["decode"] = result.get("decode")
        if job.vae_parallel and baseline is not None and baseline["decode"] and entry["decode"]:
            entry["decode"]["peak_memory_ratio_vs_1_rank"] = (
                entry["decode"]["peak_memory_bytes"] / max(1, baseline["decode"]["peak_memory_bytes"]))
            entry["decode"]["speedup_vs_1_rank"] = baseline["decode"]["seconds"] / entry["decode"]["seconds"]
        if baseline is not None:
            latents = result["latents"].numpy()
            entry["speedup_vs_1_rank"] = baseline["seconds_per_step"] / entry["seconds_per_step"]
            entry["psnr_image_db"] = _psnr(np.asarray(result["image"], dtype=np.float64) / 255.0, base_image, 1.0)
            entry["psnr_latents_db"] = _psnr(latents, base_latents, float(base_latents.max() - base_latents.min()))
            entry["max_abs_diff_latents"] = float(np.abs(latents - base_latents).max())
        runs.append(entry)
    report["runs"] = runs
    _pipefusion_summary(report, runs, baseline)
    by_sp_mode = {r["sp_mode"]: r for r in runs if "sp_mode" in r}
    if "ring" in by_sp_mode and "ulysses" in by_sp_mode and by_sp_mode["ulysses"]["bytes_sent_per_rank_per_step"]:
        report["ring_over_ulysses_bytes"] = (
            by_sp_mode["ring"]["bytes_sent_per_rank_per_step"] / by_sp_mode["ulysses"]["bytes_sent_per_rank_per_step"]
        )
    by_mode = {r["patch_mode"]: r for r in runs if "patch_mode" in r}
    if "partial" in by_mode and "displaced" in by_mode and by_mode["displaced"]["bytes_sent_per_rank_per_step"]:
        report["partial_over_displaced_bytes"] = (
            by_mode["partial"]["bytes_sent_per_rank_per_step"] / by_mode["displaced"]["bytes_sent_per_rank_per_step"]
        )
    return report


# ------------------------------------------------------------------ PipeFusion rows
def _pipefusion_jobs(args, model_dir: str, patch_mode: str, sp_mode: str) -> list:
    """pipefusion=N once per --pipefusion-patches count, then patch=N (same cfg) per --compare mode."""
    from distgen.workloads.image import prepare_image_job

    counts = [None]
    if args.pipefusion_patches:
        try:
            counts = [int(c) for c in str(args.pipefusion_patches).split(",") if c.strip()]
        except ValueError:
            raise ConfigError(
                f"--pipefusion-patches: expected a comma list of integers, got {args.pipefusion_patches!r}") from None
    compare = [] if args.compare.strip() == "none" else [m.strip() for m in args.compare.split(",") if m.strip()]
    for mode in compare:
        if mode not in PATCH_MODES:
            raise ConfigError(f"--compare: unknown patch mode {mode!r}; allowed: {', '.join(PATCH_MODES)}, or 'none'")
    jobs = []
    for m in counts:
        row = argparse.Namespace(**{**vars(args), "pipefusion_patches": m})
        job, nproc = prepare_image_job(row, patch_mode=patch_mode, model_dir=model_dir, sp_mode=sp_mode)
        jobs.append(("pipefusion_patches", m, job, nproc))
    parallel = ParallelConfig.parse(args.parallel, IMAGE_AXES, "images")
    as_patch = ",".join(f"{'patch' if a == 'pipefusion' else a}={d}" for a, d in parallel.degrees.items())
    for mode in compare:
        row = argparse.Namespace(**{**vars(args), "parallel": as_patch, "pipefusion_patches": None})
        job, nproc = prepare_image_job(row, patch_mode=mode, model_dir=model_dir, sp_mode=sp_mode)
        jobs.append(("patch_mode", mode, job, nproc))
    return jobs


def _per_rank(result: dict, skip: int) -> dict:
    """Memory per rank (parameter bytes held, peak and current resident set) and waits per step."""
    ranks = result.get("ranks") or []
    keys = ("denoiser_parameter_bytes", "block_parameter_bytes", "peak_rss_bytes", "rss_bytes")
    return {
        "memory_per_rank": [{k: r[k] for k in keys} for r in ranks],
        "wait_seconds_per_step_per_rank": [statistics.median(r["wait_seconds"][skip:] or [0.0]) for r in ranks],
    }


def _bubble(entry: dict, job) -> None:
    """Each rank's idle share of a step (its waits on the pipeline) next to the model's (N-1)/(M+N-1)."""
    from distgen.parallel.pipefusion import default_patches

    n, m = job.parallel.degree("pipefusion"), job.pipefusion_patches
    if m is None:  # the default the runtime picks for these token rows
        from distgen.models import diffusion as adapter

        info = adapter.inspect_pipeline(job.model)
        per_token = info.vae_scale_factor * info.band_row_multiple
        m = default_patches(n, job.request.height // per_token, job.request.width // per_token)
        entry["pipefusion_patches"] = m
    entry["bubble_fraction_per_rank"] = [w / s for w, s in zip(entry["wait_seconds_per_step_per_rank"],
                                                                 entry["seconds_per_step_per_rank"])]
    entry["bubble_fraction_model"] = (n - 1) / (m + n - 1)


def _pipefusion_summary(report: dict, runs: list, baseline: dict | None) -> None:
    pipefusion = [r for r in runs if "pipefusion_patches" in r]
    if not pipefusion:
        return
    naive = next((r for r in runs if r.get("patch_mode") == "naive"), None)
    for row in pipefusion:
        if naive is not None and "psnr_latents_db" in row:
            row["psnr_latents_gain_over_naive_db"] = row["psnr_latents_db"] - naive["psnr_latents_db"]
        if baseline and baseline["memory_per_rank"] and row["memory_per_rank"]:
            whole = baseline["memory_per_rank"][0]["block_parameter_bytes"]
            row["block_parameters_fraction_per_rank"] = [m["block_parameter_bytes"] / whole
                                                         for m in row["memory_per_rank"]]
