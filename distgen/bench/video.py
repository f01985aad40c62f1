"""``distgen bench video``: clip modes vs one rank, and the sync-overhead table, in one run.

Every configuration runs the same request (same seed) in fresh worker processes:

* the single-rank baseline;
* ``exact``, ``dual-scope``, ``dual-scope --stale-context`` and ``naive`` (``--modes``);
* Video-Infinity's synchronisation-overhead table: no exchange (= naive) -> + temporal conv
  halos -> + GroupNorm statistics -> + attention context (= dual-scope), each measured.

Seconds per step are medians over denoiser calls after the warmup (the same calls for every
configuration, so the stale variant is timed in its stale phase); bytes and waits are per
rank per step; fidelity is PSNR of latents and decoded frames against the single-rank output;
boundary consistency compares the jump between the last frame of a clip and the first of the
next with the jumps inside clips (1.0: seams invisible).
"""

from __future__ import annotations

import dataclasses
import statistics

import numpy as np

from distgen.bench.image import step_seconds
from distgen.config import ConfigError
from distgen.config_video import CLIP_MODES, ClipConfig

# The rows of the overhead table: what is exchanged, cumulatively.
OVERHEAD_ROWS = (("no exchange", ()), ("+ conv", ("conv",)), ("+ GroupNorm", ("conv", "norm")),
                 ("+ attention", ("conv", "norm", "attention")))


def psnr(output: np.ndarray, reference: np.ndarray) -> float:
    """PSNR over the reference's value range (dB)."""
    output, reference = output.astype(np.float64), reference.astype(np.float64)
    mse = float(np.mean((output - reference) ** 2))
    value_range = float(reference.max() - reference.min())
    return float("inf") if mse == 0 else 10.0 * np.log10(value_range**2 / mse)


def boundary_consistency(video: np.ndarray, lengths: list[int], frame_axis: int) -> dict:
    """Mean |frame k+1 - frame k| across clip boundaries and inside clips, and their ratio."""
    frames = np.moveaxis(video.astype(np.float64), frame_axis, 0)
    jumps = np.abs(frames[1:] - frames[:-1]).reshape(frames.shape[0] - 1, -1).mean(axis=1)
    ends = set(np.cumsum(lengths)[:-1] - 1)
    boundary = [jumps[k] for k in sorted(ends)]
    inside = [jumps[k] for k in range(len(jumps)) if k not in ends]
    b = float(np.mean(boundary)) if boundary else float("nan")
    i = float(np.mean(inside)) if inside else float("nan")
    return {"boundary_mad": b, "inside_mad": i, "ratio": b / i if inside and i else float("nan")}


def _clip_starts(lengths: list[int]) -> list[int]:
    """First frames of clips 1..n-1."""
    return [int(b) for b in np.cumsum(lengths)[:-1]]


def object_trajectory(frames: np.ndarray, prompt: str, lengths: list[int]) -> dict | None:
    """The prompt's object tracked by the checker (``distgen.models.train.checker``) frame by frame: its
    centroid's step across clip boundaries vs inside clips (a motion continuous across clips: ratio ~1),
    and frames where it was not found. None when the prompt is not in the shapes grammar."""
    from distgen.models.train.checker import trajectory, trajectory_jumps
    from distgen.models.train.scenes import parse_caption

    try:
        parse_caption(prompt)
    except ValueError:
        return None
    points = trajectory(list(frames), prompt)
    jumps = trajectory_jumps(points, _clip_starts(lengths))
    return {"boundary_step": jumps["boundary"], "inside_step": jumps["inside"], "ratio": jumps["ratio"],
            "missing_frames": jumps["missing_frames"],
            "x_first_last": [None if points[i] is None else round(points[i][0], 3) for i in (0, -1)]}


def still_strip(rows: dict[str, np.ndarray], lengths: list[int], path: str, count: int = 8) -> list[int]:
    """A PNG of ``count`` frames per row (evenly spaced, plus the last frame of each clip and the first of
    the next, where seams show), one row per configuration; returns the frame indices."""
    from PIL import Image

    frames = len(next(iter(rows.values())))
    starts = _clip_starts(lengths)
    picked = sorted(set(np.linspace(0, frames - 1, count).round().astype(int).tolist())
                    | {b - 1 for b in starts} | set(starts))
    Image.fromarray(np.concatenate([np.concatenate([video[i] for i in picked], axis=1) for video in rows.values()],
                                   axis=0)).save(path)
    return picked


def _variants(spec: str, headline: ClipConfig) -> list[tuple[str, ClipConfig]]:
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        mode, _, extra = item.partition("+")
        if mode not in CLIP_MODES or extra not in ("", "stale"):
            raise ConfigError(f"--modes: unknown variant {item!r}; use modes {', '.join(CLIP_MODES)}, optionally with '+stale'")
        out.append((item, dataclasses.replace(headline, mode=mode, stale_context=extra == "stale")))
    return out


def _summarise(result: dict, skip: int, frames: int) -> dict:
    wait = [w for run in result["runs"] for w in run["wait_seconds"][skip:]]
    if not any(run["step_seconds"][skip:] for run in result["runs"]):
        raise ConfigError(f"--steps must exceed the {skip} warmup denoiser calls to time steady-state steps")
    per_rank = result["per_rank"]
    total = result["runs"][-1]["total_seconds"]
    return {
        **step_seconds(result, skip),
        "bytes_sent_per_rank_per_step": [int(r["bytes_sent_per_step"]) for r in per_rank],
        "wait_seconds_per_step": statistics.median(wait),
        "wait_seconds_per_step_per_rank": [r["wait_seconds_per_step"] for r in per_rank],
        "peak_memory_mb_per_rank": [round(r["peak_memory_mb"], 1) for r in per_rank],
        "peak_increase_mb_per_rank": [round(r["peak_memory_mb"] - r["start_memory_mb"], 1) for r in per_rank],
        "request_seconds": total,
        "output_frames_per_second": frames / total,
    }


def bench_video(args) -> dict:
    from distgen.launch import run_job as launch
    from distgen.workloads.video import prepare_video_job, resolve_model

    model_dir, _ = resolve_model(args)
    args.steps = args.steps or 8
    # Validate every configuration before launching any.
    headline_job, nproc = prepare_video_job(args, model_dir=model_dir)
    clip_degree = headline_job.parallel.degree("clip")
    if clip_degree < 2:
        raise ConfigError("bench video compares clip modes: give --parallel with clip=N (N >= 2)")
    headline = headline_job.clip
    variants = _variants(args.modes, headline)
    if not args.no_overhead_table:
        for label, exchanges in OVERHEAD_ROWS[1:3]:
            variants.append((f"dual-scope exchanging {'+'.join(exchanges)}",
                             dataclasses.replace(headline, mode="dual-scope", stale_context=False, exchanges=exchanges)))
    jobs = [(name, prepare_video_job(args, clip=clip, model_dir=model_dir)[0]) for name, clip in variants]
    knobs = dict(return_latents=True, return_frames=True, progress=False, repeats=args.repeats,
                 threads_per_rank=args.threads_per_rank, out=None)
    skip = max(1, args.warmup_steps)
    request = headline_job.request
    launcher = args.launcher if args.launcher != "auto" else "spawn"

    report: dict = {
        "workload": "video",
        "model": model_dir,
        "preset": None if model_dir == args.model else (args.model or args.preset or args.default_model),
        "frames": request.frames,
        "height": request.height,
        "width": request.width,
        "steps": request.steps,
        "guidance_scale": request.guidance_scale,
        "parallel": str(headline_job.parallel),
        "nproc": nproc,
        "clip_config": {"local_frames": headline.local_frames, "global_frames": headline.global_frames,
                        "scope_switch_t": headline.scope_switch_t, "warmup_steps": headline.warmup_steps},
        "dtype": args.dtype,
        "threads_per_rank": args.threads_per_rank,
        "timed_steps": f"slowest rank's median over denoiser calls {skip}..{request.steps - 1}",
    }
    if args.rounds < 1:
        raise ConfigError(f"--rounds must be >= 1, got {args.rounds}")
    report["rounds"] = args.rounds
    # Every configuration once per round, in the same order; a round's step times join the
    # earlier rounds' (outputs are identical: same seed), so slow spells of the machine fall
    # on every configuration alike instead of on whichever ran then.
    configs = [] if args.no_baseline else [
        ("1 rank", headline_job.replace(parallel=type(headline_job.parallel)({}), **knobs), 1, "spawn")]
    configs += [(name, job.replace(**knobs), nproc, launcher) for name, job in jobs]
    measured: dict[str, dict] = {}
    for _ in range(args.rounds):
        for name, job, ranks, how in configs:
            result = launch(job, ranks, how, args.timeout, args.ray_address, threads_per_rank=args.threads_per_rank)
            if name in measured:
                measured[name]["runs"] += result["runs"]
            else:
                measured[name] = result
    baseline = None
    if not args.no_baseline:
        base = measured["1 rank"]
        baseline = {"nproc": 1, **_summarise(base, skip, request.frames)}
        report["baseline"] = baseline
        base_latents = base["latents"].numpy()
        base_frames = base["frames"].numpy()
    runs = []
    for name, job in jobs:
        result = measured[name]
        lengths = result["clip_lengths"]
        latents, frames = result["latents"].numpy(), result["frames"].numpy()
        entry = {
            "variant": name,
            "clip_mode": job.clip.mode,
            "stale_context": job.clip.stale_context,
            "exchanges": sorted(job.clip.active_exchanges),
            "clip_lengths": lengths,
            **_summarise(result, skip, request.frames),
            "boundary_consistency_frames": boundary_consistency(frames, lengths, frame_axis=0),
            "boundary_consistency_latents": boundary_consistency(latents, lengths, frame_axis=2),
        }
        trajectory = object_trajectory(frames, request.prompt, lengths)
        if trajectory is not None:
            entry["object_trajectory"] = trajectory
        if baseline is not None:
            entry["speedup_vs_1_rank"] = baseline["seconds_per_step"] / entry["seconds_per_step"]
            entry["psnr_frames_db"] = psnr(frames, base_frames)
            entry["psnr_latents_db"] = psnr(latents, base_latents)
            entry["max_abs_diff_latents"] = float(np.abs(latents - base_latents).max())
        runs.append(entry)
    report["runs"] = runs
    if baseline is not None:
        lengths = runs[0]["clip_lengths"]
        baseline["boundary_consistency_frames"] = boundary_consistency(base_frames, lengths, frame_axis=0)
        baseline["boundary_consistency_latents"] = boundary_consistency(base_latents, lengths, frame_axis=2)
        trajectory = object_trajectory(base_frames, request.prompt, lengths)
        if trajectory is not None:
            baseline["object_trajectory"] = trajectory
    if getattr(args, "strip", None):
        rows = ({} if baseline is None else {"1 rank": base_frames}) | {
            name: measured[name]["frames"].numpy() for name, _ in jobs if not name.startswith("dual-scope exchanging")}
        report["strip"] = {"path": args.strip, "rows": list(rows),
                           "frames": still_strip(rows, runs[0]["clip_lengths"], args.strip)}
    by_name = {r["variant"]: r for r in runs}
    naive = by_name.get("naive")
    if naive is not None:
        def overhead(row):
            return 100.0 * (row["seconds_per_step"] / naive["seconds_per_step"] - 1.0)

        table = []
        if not args.no_overhead_table and "dual-scope" in by_name:
            for label, exchanges in OVERHEAD_ROWS:
                row = {"no exchange": naive, "+ attention": by_name["dual-scope"]}.get(label) or \
                    by_name[f"dual-scope exchanging {'+'.join(exchanges)}"]
                table.append({"step": label, "seconds_per_step": row["seconds_per_step"],
                              "overhead_vs_no_exchange_pct": overhead(row)})
            report["sync_overhead_table"] = table
        report["full_sync_overhead_vs_naive_pct"] = {
            name: overhead(by_name[name]) for name in ("exact", "dual-scope", "dual-scope+stale", "exact+stale") if name in by_name
        }
    head = "dual-scope" if headline.mode == "dual-scope" else headline.mode
    head += "+stale" if headline.stale_context else ""
    if head in by_name and baseline is not None:
        report["headline"] = {"variant": head, "speedup_vs_1_rank": by_name[head]["speedup_vs_1_rank"],
                              **{f"{n}_speedup": by_name[n]["speedup_vs_1_rank"] for n in ("exact", "naive") if n in by_name}}
    return report
