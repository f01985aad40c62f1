"""Video jobs from user options: axes, degrees, modes, the model directory, sizes and frames
against the VAE, the denoiser, the clip ranks and the frame position table, and the attention
windows against the video, all checked before any worker starts.
"""

from __future__ import annotations

from distgen.config import ConfigError, ParallelConfig
from distgen.config_video import VIDEO_AXES, ClipConfig, VideoJob, VideoRequest
from distgen.workloads import resolve_nproc


def resolve_model(args) -> tuple[str, tuple[int, int, int] | None]:
    """The model directory and, for an embedded model, its default (frames, height, width):
    --model (a pipeline directory or an embedded name), --preset (its alias), else the command's
    default (the embedded default; bench: t2v-bench)."""
    from distgen.models import presets

    resolved = presets.resolve("video", args.model, getattr(args, "default_model", None) or presets.default("video"),
                               getattr(args, "preset", None))
    return resolved.directory, resolved.size


def prepare_video_job(args, clip: ClipConfig | None = None, model_dir: str | None = None) -> tuple[VideoJob, int]:
    """Validate everything a user can get wrong; returns the job and the number of ranks."""
    from distgen.models import video as adapter

    if getattr(args, "parallel", "") == "auto":
        from distgen.workloads import resolve_auto_parallel

        directory, size = (model_dir, None) if model_dir else resolve_model(args)
        frames, height, width = size or (None, None, None)
        resolve_auto_parallel(args, "video", directory, height=args.height or height, width=args.width or width,
                              frames=args.frames or frames, steps=args.steps or 20)
    parallel = ParallelConfig.parse(args.parallel, VIDEO_AXES, "video")
    nproc = resolve_nproc(args, parallel)
    parallel.validate(nproc, VIDEO_AXES, "video")
    if clip is None:
        clip = ClipConfig(
            mode=args.clip_mode, stale_context=args.stale_context, warmup_steps=args.warmup_steps,
            local_frames=args.local_frames, global_frames=args.global_frames, scope_switch_t=args.scope_switch_t,
        )
    clip.validate()
    resolved_dir, preset_size = resolve_model(args)
    model_dir = model_dir or resolved_dir
    info = adapter.inspect_video_pipeline(model_dir)
    frames, height, width = preset_size or info.default_size
    request = VideoRequest(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        frames=args.frames or frames,
        height=args.height or height,
        width=args.width or width,
        steps=args.steps or 20,
        guidance_scale=args.guidance_scale,
        seed=args.seed,
        fps=args.fps,
    )
    job = VideoJob(request=request, parallel=parallel, clip=clip, sp_mode=args.sp_mode, model=model_dir,
                   dtype=args.dtype, comm_timeout_s=args.comm_timeout, out=getattr(args, "out", None))
    job.validate()
    resolved = validate_video(info, request, parallel, clip, job.sp_mode)
    return job.replace(clip=resolved), nproc


def validate_video(
    info, request: VideoRequest, parallel: ParallelConfig, clip: ClipConfig, sp_mode: str
) -> ClipConfig:
    """Everything about geometry, frames and windows a user can get wrong; returns the resolved clip config."""
    from distgen.models.video import CLIP_DENOISERS
    from distgen.parallel.clip import clip_lengths

    for name in ("height", "width"):
        value = getattr(request, name)
        if value % info.size_multiple:
            raise ConfigError(
                f"--{name} {value} must be a multiple of {info.size_multiple} for this model "
                f"(VAE factor {info.vae_scale_spatial} x denoiser factor {info.size_multiple // info.vae_scale_spatial})"
            )
    if info.vae_scale_temporal > 1 and (request.frames - 1) % info.vae_scale_temporal:
        k = info.vae_scale_temporal
        lower = (request.frames - 1) // k * k + 1
        raise ConfigError(
            f"--frames {request.frames}: this model's VAE packs {k} frames per latent frame after the first, so "
            f"frames must be {k}*n+1 (e.g. {lower} or {lower + k})"
        )
    latent_frames = info.latent_frames(request.frames)
    if parallel.degree("cfg") > 1 and info.family == "wan":
        raise ConfigError(
            f"--parallel cfg={parallel.degree('cfg')}: {info.pipeline_class} runs the conditional and unconditional "
            "passes as separate denoiser calls, so there is no guidance batch to split; use sp for Wan"
        )
    clip_degree = parallel.degree("clip")
    if clip_degree > 1:
        if info.denoiser_class not in CLIP_DENOISERS:
            raise ConfigError(
                f"--parallel clip={clip_degree}: clip parallelism gives context to temporal UNet modules and supports "
                f"{', '.join(CLIP_DENOISERS)}; this model's denoiser is {info.denoiser_class} (no temporal UNet "
                "modules), use --parallel sp=N for video DiTs"
            )
        if latent_frames < clip_degree:
            raise ConfigError(
                f"--frames {request.frames} is fewer than the {clip_degree} clip ranks (--parallel clip={clip_degree}); "
                f"use at least {clip_degree} frames or fewer clip ranks"
            )
    limit = info.max_frame_positions
    if limit is not None:
        if (clip_degree == 1 or clip.mode == "exact") and latent_frames > limit:
            where = "in exact clip mode every frame keeps its global position" if clip_degree > 1 else "on one clip"
            raise ConfigError(
                f"--frames {request.frames} exceeds this model's frame position table ({limit} positions; "
                f"{where}); use at most {limit} frames, or --parallel clip=N with --clip-mode dual-scope or naive "
                f"and clips of at most {limit} frames"
            )
        longest = clip_lengths(latent_frames, clip_degree)[0]
        if longest > limit:
            raise ConfigError(
                f"--frames {request.frames} over clip={clip_degree} gives clips of {longest} frames, beyond this "
                f"model's frame position table ({limit}); use at least {-(-latent_frames // limit)} clip ranks"
            )
    if parallel.degree("sp") > 1:
        from distgen.parallel import sequence

        tokens = None
        if info.patch_size is not None:
            p = info.patch_size
            tokens = (latent_frames // p[0]) * (request.height // info.vae_scale_spatial // p[1]) * (
                request.width // info.vae_scale_spatial // p[2]
            )
        sequence.validate(info.denoiser_class, info.num_heads, parallel.degree("sp"), sp_mode, tokens)
    return clip.resolved(latent_frames, clip_degree)
