"""Image jobs from user options: every check before any worker starts."""

from __future__ import annotations

from distgen.config import IMAGE_AXES, ImageJob, ImageRequest, ParallelConfig, PatchConfig
from distgen.workloads import resolve_nproc


def prepare_image_job(
    args, patch_mode: str | None = None, model_dir: str | None = None, sp_mode: str | None = None
) -> tuple[ImageJob, int]:
    """Validate everything a user can get wrong; returns the job and the number of ranks."""
    from distgen.models import diffusion as adapter
    from distgen.models.tiny import DEFAULT_MODEL, preset_dir
    from distgen.parallel import sequence

    parallel = ParallelConfig.parse(args.parallel, IMAGE_AXES, "images")
    nproc = resolve_nproc(args, parallel)
    parallel.validate(nproc, IMAGE_AXES, "images")
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
    sequence.validate_image(info, request, parallel, job.sp_mode)
    return job.replace(model=model), nproc
