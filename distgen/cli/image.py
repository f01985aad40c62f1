"""``distgen generate image`` and ``distgen bench image``."""

from __future__ import annotations

import argparse
import os

from distgen.cli.common import StepProgress, add_launch_arguments, print_json
from distgen.config import IMAGE_AXES, PATCH_MODES, SP_MODES


def _add_image_arguments(parser: argparse.ArgumentParser, *, bench: bool) -> None:
    parser.add_argument("--prompt", default="a red circle and a blue square on a yellow background",
                        help="the trained default model knows the shapes vocabulary (README: Embedded models)")
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--height", type=int, default=None, help="pixels (default: the embedded model's training size, else 128)")
    parser.add_argument("--width", type=int, default=None, help="pixels (default: the embedded model's training size, else 128)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 20; bench: 8)")
    parser.add_argument("--guidance-scale", type=float, default=5.0, help="classifier-free guidance; <= 1 disables it (Flux: dev's distilled guidance; "
                                                                       "without guidance embedding, true CFG with --negative-prompt)")
    parser.add_argument("--seed", type=int, default=0)
    default = "tiny-sd" if bench else "shapes-sd"
    parser.add_argument("--model", default=None,
                        help="diffusers pipeline directory (save_pretrained layout), or the name of an embedded model: "
                             "shapes-sd (trained, 64 px), or with random weights tiny-sd (UNet), tiny-pixart, "
                             "tiny-sd3 (DiTs, for sp), unet-bench, dit-bench, tiny-flux (FLUX.1-dev layout; patch x sp) "
                             f"(default {default}; a directory that exists wins over a name)")
    parser.set_defaults(default_model=default)
    parser.add_argument("--parallel", default="", help="degrees per axis, e.g. 'cfg=2,patch=2' (axes: %s)" % ", ".join(IMAGE_AXES))
    mode_help = "comma list of modes to compare" if bench else "patch mode"
    parser.add_argument("--patch-mode", default="displaced", help=f"{mode_help}: {', '.join(PATCH_MODES)}")
    parser.add_argument("--warmup-steps", type=int, default=4, help="synchronous steps before stale context is used")
    parser.add_argument("--pcpp-fraction", type=float, default=0.3, help="partial mode: fraction of each neighbour band attended")
    sp_help = "comma list of sp modes to compare" if bench else "sequence parallelism (DiTs)"
    parser.add_argument("--sp-mode", default="ulysses" if not bench else "ulysses,ring", help=f"{sp_help}: {', '.join(SP_MODES)}")
    if bench:
        parser.add_argument("--pipefusion-patches", default=None,
                            help="with --parallel pipefusion=N: comma list of patch counts M >= N to compare "
                                 "(default: up to 4 per stage that divide the token rows, >= 64 tokens each)")
        parser.add_argument("--compare", default="naive,displaced",
                            help="with --parallel pipefusion=N: patch modes also run at patch=N for comparison "
                                 f"(comma list of {', '.join(PATCH_MODES)}, or 'none')")
    else:
        parser.add_argument("--pipefusion-patches", type=int, default=None,
                            help="with --parallel pipefusion=N: image tokens cut into M >= N patches of rows "
                                 "(default: up to 4 per stage that divide the token rows, >= 64 tokens each)")
    parser.add_argument("--dtype", default="fp32", help="fp32, bf16 or fp16")
    parser.add_argument("--vae-parallel", action="store_true",
                        help="decode over the patch ranks, one band of rows each (exact; VAE memory per rank / N)")
    add_launch_arguments(parser)


def register(generate_kinds, bench_kinds) -> None:
    image = generate_kinds.add_parser("image", help="text-to-image with a diffusers pipeline")
    _add_image_arguments(image, bench=False)
    image.add_argument("--out", default="out.png", help="PNG written by rank 0")
    image.add_argument("--no-progress", action="store_true")
    image.set_defaults(handler=_generate_image)

    bench_image = bench_kinds.add_parser("image", help="patch / cfg parallelism vs one rank, in one run")
    _add_image_arguments(bench_image, bench=True)
    bench_image.add_argument("--preset", default=None, help="alias of --model NAME for an embedded model (kept for older "
                                                            "command lines)")
    bench_image.add_argument("--repeats", type=int, default=1, help="requests per configuration (steps are pooled)")
    bench_image.add_argument("--threads-per-rank", type=int, default=1)
    bench_image.add_argument("--no-baseline", action="store_true", help="skip the single-rank run")
    bench_image.set_defaults(handler=_bench_image)

    bench_vae = bench_kinds.add_parser("vae", help="one-rank vs parallel VAE decode (--vae-parallel): memory, time")
    bench_vae.add_argument("--model", default=None, help="diffusers pipeline directory or embedded image model name "
                                                         "(default tiny-sd); its vae/ is decoded")
    bench_vae.set_defaults(default_model="tiny-sd")
    bench_vae.add_argument("--sizes", default="2048,4096", help="comma list of image sizes in pixels, 'H' or 'HxW'")
    bench_vae.add_argument("--parallel", default="patch=2", help="the patch ranks to decode over, e.g. 'patch=2'")
    bench_vae.add_argument("--dtype", default="fp32", help="fp32, bf16 or fp16")
    bench_vae.add_argument("--seed", type=int, default=0)
    bench_vae.add_argument("--repeats", type=int, default=1, help="decodes per configuration (best time, highest peak)")
    bench_vae.add_argument("--threads-per-rank", type=int, default=1)
    add_launch_arguments(bench_vae)
    bench_vae.set_defaults(handler=_bench_vae)


def _generate_image(args) -> int:
    from distgen.engine import run_once
    from distgen.runtime.resident import ResidentJob
    from distgen.workloads.image import prepare_image_job

    job, nproc = prepare_image_job(args)
    job = job.replace(out=args.out, progress=False)
    # the same path as the server: a resident group for one request
    progress = StepProgress("denoising", enabled=not args.no_progress)
    try:
        result = run_once(ResidentJob("image", job), nproc, args.launcher, "image", job.request,
                          ray_address=args.ray_address, timeout_s=args.timeout, on_event=progress)
    finally:
        progress.close()
    if result is not None:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)) or ".", exist_ok=True)
        result["image"].save(args.out)
        steps = result["step_seconds"]
        print(f"wrote {args.out} ({job.request.width}x{job.request.height}, {len(steps)} steps, "
              f"parallel {job.parallel} {_mode(job)}, "
              f"{sum(steps):.2f} s in the denoiser)")
    return 0


def _mode(job) -> str:
    if job.parallel.degree("pipefusion") > 1:
        return f"pipefusion patches {job.pipefusion_patches or 'default'}"
    return f"mode {job.sp_mode if job.parallel.degree('sp') > 1 else job.patch.mode}"


def _bench_image(args) -> int:
    from distgen.bench.image import bench_image

    print_json(bench_image(args))
    return 0


def _bench_vae(args) -> int:
    from distgen.bench.vae import bench_vae

    print_json(bench_vae(args))
    return 0
