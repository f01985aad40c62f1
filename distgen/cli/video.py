"""``distgen generate video`` and ``distgen bench video`` (checked by :mod:`distgen.workloads.video`)."""

from __future__ import annotations

import argparse
import os

from distgen.cli.common import StepProgress, add_launch_arguments, print_json
from distgen.config import SP_MODES
from distgen.config_video import CLIP_MODES, VIDEO_AXES


def _add_video_arguments(parser: argparse.ArgumentParser, *, bench: bool) -> None:
    parser.add_argument("--prompt", default="a paper boat drifting down a river")
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--frames", type=int, default=None, help="frames of output video (default: the preset's / 16)")
    parser.add_argument("--height", type=int, default=None, help="pixels (default: the preset's / the model's)")
    parser.add_argument("--width", type=int, default=None, help="pixels (default: the preset's / the model's)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 20; bench: 8)")
    parser.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance; <= 1 disables it")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fps", type=int, default=8, help="frame rate written into the video file")
    from distgen.models import presets

    default = "t2v-bench" if bench else presets.default("video")
    parser.add_argument("--model", default=None,
                        help=f"diffusers video pipeline directory (save_pretrained layout), or the name of an embedded "
                             f"model: {', '.join(presets.names('video'))} (default {default}; a directory "
                             f"that exists wins over a name)")
    parser.add_argument("--preset", default=None, help="alias of --model NAME for an embedded model (kept for older "
                                                       "command lines)")
    parser.set_defaults(default_model=default)
    parser.add_argument("--parallel", default="", help="degrees per axis, e.g. 'clip=2' or 'cfg=2,clip=4' (axes: %s)" % ", ".join(VIDEO_AXES))
    parser.add_argument("--clip-mode", default="dual-scope",
                        help=f"clip parallelism: {', '.join(CLIP_MODES)}" + ("; bench: the headline mode (all are measured)" if bench else ""))
    parser.add_argument("--stale-context", action="store_true",
                        help="use the previous step's halos, K/V and statistics (exchanges overlap compute)")
    parser.add_argument("--warmup-steps", type=int, default=2, help="synchronous denoiser calls before --stale-context applies")
    parser.add_argument("--local-frames", type=int, default=None, help="dual-scope: attention window of +-N frames (default min(8, smallest clip))")
    parser.add_argument("--global-frames", type=int, default=None, help="dual-scope: frames sampled across the video (default min(16, frames/4))")
    parser.add_argument("--scope-switch-t", type=float, default=800.0, help="dual-scope: global emphasis for t >= this, local below")
    parser.add_argument("--sp-mode", default="ulysses", help=f"sequence parallelism (video DiTs): {', '.join(SP_MODES)}")
    parser.add_argument("--dtype", default="fp32", help="fp32, bf16 or fp16")
    add_launch_arguments(parser, timeout_s=3600.0)


def register(generate_kinds, bench_kinds) -> None:
    video = generate_kinds.add_parser("video", help="text-to-video (TextToVideoSD / AnimateDiff / Wan pipelines)")
    _add_video_arguments(video, bench=False)
    video.add_argument("--out", default="out.mp4", help=".mp4 / .mkv / .mov / .webm, or a directory (ending in /) for PNG frames")
    video.add_argument("--no-progress", action="store_true")
    video.set_defaults(handler=_generate_video)

    bench = bench_kinds.add_parser("video", help="clip modes vs one rank and the sync-overhead table, in one run")
    _add_video_arguments(bench, bench=True)
    bench.add_argument("--modes", default="exact,dual-scope,dual-scope+stale,naive",
                       help="variants to measure; '+stale' adds --stale-context")
    bench.add_argument("--no-overhead-table", action="store_true", help="skip the + conv / + GroupNorm runs")
    bench.add_argument("--strip", default=None, metavar="PNG",
                       help="also write a still strip: a few frames (and those around each clip boundary) per mode")
    bench.add_argument("--repeats", type=int, default=1, help="requests per configuration (steps are pooled)")
    bench.add_argument("--rounds", type=int, default=1,
                       help="measure every configuration this many times, interleaved (steps pooled): evens out a "
                            "machine whose speed drifts during the run")
    bench.add_argument("--threads-per-rank", type=int, default=1)
    bench.add_argument("--no-baseline", action="store_true", help="skip the single-rank run")
    bench.set_defaults(handler=_bench_video)


def _generate_video(args) -> int:
    from distgen.engine import run_once
    from distgen.runtime.resident import ResidentJob
    from distgen.workloads.video import prepare_video_job

    job, nproc = prepare_video_job(args)
    job = job.replace(progress=False)
    out = os.path.abspath(job.out) + ("/" if job.out.endswith("/") else "")  # rank 0 writes it, wherever it runs
    progress = StepProgress("denoising", enabled=not args.no_progress)
    try:
        result = run_once(ResidentJob("video", job), nproc, args.launcher, "video", job.request, options={"out": out},
                          ray_address=args.ray_address, timeout_s=args.timeout, on_event=progress)
    finally:
        progress.close()
    if result is not None:
        result["out"] = job.out
        steps = result["step_seconds"]
        r = job.request
        mode = ""
        if job.parallel.degree("clip") > 1:
            mode = f" clip mode {job.clip.mode}" + (" (stale context)" if job.clip.stale_context else "")
        elif job.parallel.degree("sp") > 1:
            mode = f" sp mode {job.sp_mode}"
        print(f"wrote {result['out']} ({r.frames} frames {r.width}x{r.height}, {len(steps)} denoiser calls, "
              f"parallel {job.parallel}{mode}, {sum(steps):.2f} s in the denoiser)")
    return 0


def _bench_video(args) -> int:
    from distgen.bench.video import bench_video

    print_json(bench_video(args))
    return 0
