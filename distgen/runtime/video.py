"""Runs text-to-video requests on one rank: load the pipeline, apply strategies, time steps.

The pipeline's own ``__call__`` (sampling loop, scheduler, guidance) runs unchanged on every
rank with the same seed and ``output_type="latent"``; only the denoiser is parallelised
(``cfg``, ``clip`` for video UNets, ``sp`` for video DiTs). Afterwards each clip rank decodes
its own frames (2D VAEs are frame-wise) and rank 0 gathers them through the exchange engine
and writes the MP4 or PNG frames.
"""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from distgen.comm import CommStats
from distgen.config_video import VideoJob, VideoRequest
from distgen.models import video as adapter
from distgen.models.diffusion import denoiser_of, load_pipeline
from distgen.runtime.diffusion import StepTimer, gather_step_seconds
from distgen.parallel import cfg as cfg_parallel
from distgen.parallel import clip as clip_parallel
from distgen.runtime.dist import WorkerContext


@dataclass
class VideoResult:
    latents: torch.Tensor | None  # rank 0: the whole video's latents (when gathered)
    frames: torch.Tensor | None  # rank 0: uint8 (F, H, W, 3) (when decoded)
    step_seconds: list[float] = field(default_factory=list)
    bytes_sent: list[int] = field(default_factory=list)
    bytes_recv: list[int] = field(default_factory=list)
    wait_seconds: list[float] = field(default_factory=list)
    total_seconds: float = 0.0
    peak_memory_mb: float = 0.0
    start_memory_mb: float = 0.0


def _frame_wise_scheduler(scheduler) -> bool:
    # Dynamic thresholding takes quantiles over a whole sample: it needs every frame.
    return not getattr(scheduler.config, "thresholding", False)


def _memory_mb(device: torch.device, reset: bool) -> float:
    """Allocated GPU memory (peak since the last reset), or this process's resident set on CPU."""
    if device.type == "cuda":
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
            return torch.cuda.memory_allocated(device) / 2**20
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        if reset:
            with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM, the peak resident set
                f.write("5")
        key = "VmRSS:" if reset else "VmHWM:"
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class VideoRunner:
    def __init__(self, job: VideoJob, ctx: WorkerContext, model_dir: str):
        self.job = job
        self.ctx = ctx
        self.info = adapter.inspect_video_pipeline(model_dir)
        self.pipe = load_pipeline(model_dir, job.dtype, ctx.device)
        self.pipe.set_progress_bar_config(disable=not (job.progress and ctx.rank == 0), desc="denoising")
        self.denoiser = denoiser_of(self.pipe)
        self.stats = CommStats()
        # cfg before clip: its output hook then gathers the guidance halves of the clip, not of the video.
        cfg_group = ctx.group("cfg")
        if cfg_group is not None:
            cfg_parallel.apply(self.denoiser, ctx.engine(cfg_group, self.stats))
        self.clip_state = None
        self.clip_engine = None
        clip_group = ctx.group("clip")
        if clip_group is not None:
            self.clip_engine = ctx.engine(clip_group, self.stats)
            self.clip_state = clip_parallel.apply(self.denoiser, self.clip_engine, job.clip)
            self.clip_state.gather_outputs = not _frame_wise_scheduler(self.pipe.scheduler)
        self.sp_state = None
        sp_group = ctx.group("sp")
        if sp_group is not None:
            # Sequence parallelism for video DiTs (Wan): distgen.parallel.sequence.
            from distgen.parallel import sequence

            self.sp_state = sequence.apply(self.denoiser, ctx.engine(sp_group, self.stats), job.sp_mode)
        if self.info.family == "motion" and cfg_group is not None:
            clip_parallel.fold_frame_text(self.denoiser)
        self.steps = StepTimer(self.denoiser, self.stats, ctx.device)

    @property
    def decodes_own_clip(self) -> bool:
        return self.clip_state is not None and self.info.frame_wise_vae

    def _gather_clips(self, own: torch.Tensor, dim: int) -> torch.Tensor | None:
        """Rank 0 of the clip group gets every clip of ``own`` concatenated along ``dim``."""
        lengths = self.clip_state.lengths
        pad = max(lengths) - own.shape[dim]
        if pad:
            shape = list(own.shape)
            shape[dim] = pad
            own = torch.cat([own, own.new_zeros(shape)], dim=dim)
        parts = self.clip_engine.gather(own, dst=0)
        if parts is None:
            return None
        return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, lengths)], dim=dim)

    @torch.no_grad()
    def generate(self, request: VideoRequest, decode: bool, gather_latents: bool) -> VideoResult:
        self.stats.reset()
        self.steps.seconds = []
        if self.clip_state is not None:
            self.clip_state.new_request()
        start_memory = _memory_mb(self.ctx.device, reset=True)
        started = time.perf_counter()
        generator = torch.Generator(device="cpu").manual_seed(request.seed)
        latents = self.pipe(**adapter.pipeline_kwargs(request, generator)).frames
        result = VideoResult(latents=None, frames=None)
        # Only one cfg half decodes; it holds global rank 0.
        in_output_group = self.ctx.axis_rank("cfg") == 0
        if self.clip_state is not None:
            self.clip_engine.drain()
            state = self.clip_state
            own = latents[:, :, state.start : state.start + state.length]
            if gather_latents and in_output_group:
                result.latents = self._gather_clips(own.float().contiguous(), dim=2)
            if decode and in_output_group:
                if self.decodes_own_clip:
                    frames = adapter.decode_frames(self.pipe, self.info, own)
                    result.frames = self._gather_clips(frames, dim=0)
                else:
                    full = self._gather_clips(own.contiguous(), dim=2)
                    if full is not None:
                        result.frames = adapter.decode_frames(self.pipe, self.info, full)
        elif self.ctx.rank == 0:
            if gather_latents:
                result.latents = latents.float().cpu()
            if decode:
                result.frames = adapter.decode_frames(self.pipe, self.info, latents)
        if self.ctx.device.type == "cuda":
            torch.cuda.synchronize(self.ctx.device)
        result.total_seconds = time.perf_counter() - started
        result.peak_memory_mb = _memory_mb(self.ctx.device, reset=False)
        result.start_memory_mb = start_memory
        result.step_seconds = list(self.steps.seconds)
        result.bytes_sent = [s.bytes_sent for s in self.stats.steps]
        result.bytes_recv = [s.bytes_recv for s in self.stats.steps]
        result.wait_seconds = [s.wait_s for s in self.stats.steps]
        if result.latents is not None:
            result.latents = result.latents.cpu()
        if result.frames is not None:
            result.frames = result.frames.cpu()
        return result


def _per_rank_summary(result: VideoResult, skip: int, ctx: WorkerContext) -> list[dict] | None:
    """Memory and traffic of every rank, gathered at rank 0 (small tensor, through the engine)."""
    def median(values, default=0.0):
        values = values[skip:] or values
        return float(statistics.median(values)) if values else default

    mine = torch.tensor(
        [result.peak_memory_mb, result.start_memory_mb, median(result.bytes_sent), median(result.bytes_recv),
         median(result.wait_seconds)],
        dtype=torch.float64,
    )
    if ctx.world_size > 1:
        engine = ctx.engine(dist.group.WORLD, CommStats())
        parts = engine.gather(mine.to(ctx.device), dst=0)
    else:
        parts = [mine]
    if parts is None:
        return None
    keys = ("peak_memory_mb", "start_memory_mb", "bytes_sent_per_step", "bytes_recv_per_step", "wait_seconds_per_step")
    return [{"rank": r, **{k: float(v) for k, v in zip(keys, p.cpu().tolist())}} for r, p in enumerate(parts)]


def run_video_job(job: VideoJob, ctx: WorkerContext) -> dict | None:
    from distgen.models import presets

    model_dir = job.model if job.model is not None else presets.resolve("video", None, presets.default("video")).directory
    runner = VideoRunner(job, ctx, model_dir)
    decode = bool(job.out) or job.return_frames
    results = []
    for repeat in range(job.repeats):
        last = repeat == job.repeats - 1
        results.append(runner.generate(job.request, decode=decode and last, gather_latents=job.return_latents and last))
    final = results[-1]
    skip = max(1, job.clip.warmup_steps) if job.clip.stale_context else 1
    per_rank = _per_rank_summary(final, skip, ctx)
    per_rank_steps = [gather_step_seconds(ctx, r.step_seconds) for r in results]
    if ctx.rank != 0:
        return None
    if job.out:
        adapter.write_video(final.frames.numpy(), job.out, job.request.fps)
    state = runner.clip_state
    return {
        "out": job.out,
        "latents": final.latents,
        "frames": final.frames if job.return_frames else None,
        "clip_lengths": list(state.lengths) if state is not None else None,
        "clip_replaced": dict(state.replaced) if state is not None else None,
        "clip_config": state.config if state is not None else None,
        "per_rank": per_rank,
        "runs": [
            {
                "step_seconds": r.step_seconds,
                "step_seconds_per_rank": steps,
                "bytes_sent": r.bytes_sent,
                "bytes_recv": r.bytes_recv,
                "wait_seconds": r.wait_seconds,
                "total_seconds": r.total_seconds,
            }
            for r, steps in zip(results, per_rank_steps)
        ],
    }
