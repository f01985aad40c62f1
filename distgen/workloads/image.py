"""Image jobs from user options: every check before any worker starts."""

from __future__ import annotations

from distgen.config import IMAGE_AXES, ImageJob, ImageRequest, ParallelConfig, PatchConfig
from distgen.workloads import resolve_nproc


def resolve_image_model(args):
    """--model (a pipeline directory or an embedded name), --preset (its alias, benches), else the default."""
    from distgen.models import presets

    default = getattr(args, "default_model", None) or presets.default("image")
    return presets.resolve("image", args.model, default, getattr(args, "preset", None))


def prepare_image_job(
    args, patch_mode: str | None = None, model_dir: str | None = None, sp_mode: str | None = None
) -> tuple[ImageJob, int]:
    """Validate everything a user can get wrong; returns the job and the number of ranks."""
    from distgen.models import diffusion as adapter
    from distgen.parallel import cfg, pipefusion, sequence

    if getattr(args, "parallel", "") == "auto":
        from distgen.workloads import resolve_auto_parallel

        resolved = resolve_image_model(args) if model_dir is None else None
        resolve_auto_parallel(args, "image", model_dir or resolved.directory,
                              height=args.height or (resolved.size if resolved else None) or None,
                              width=args.width or (resolved.size if resolved else None) or None,
                              steps=args.steps or 20, guidance=args.guidance_scale > 1)
    parallel = ParallelConfig.parse(args.parallel, IMAGE_AXES, "images")
    nproc = resolve_nproc(args, parallel)
    parallel.validate(nproc, IMAGE_AXES, "images")
    size = 128
    if model_dir is None:
        resolved = resolve_image_model(args)
        model_dir, size = resolved.directory, resolved.size or size
    request = ImageRequest(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        height=args.height or size,
        width=args.width or size,
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
        model=model_dir,
        dtype=args.dtype,
        comm_timeout_s=args.comm_timeout,
        vae_parallel=getattr(args, "vae_parallel", False),
        pipefusion_patches=getattr(args, "pipefusion_patches", None),
    )
    job.validate()
    info = adapter.inspect_pipeline(model_dir)
    adapter.validate_geometry(info, request, parallel)
    sequence.validate_image(info, request, parallel, job.sp_mode)
    cfg.validate_image(info, request, parallel)
    pipefusion.validate_image(info, request, parallel, job.pipefusion_patches)
    return job, nproc
