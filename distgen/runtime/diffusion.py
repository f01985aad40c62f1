"""Runs text-to-image requests on one rank: load the pipeline, apply strategies, time steps.

The pipeline's own ``__call__`` (its sampling loop, scheduler and guidance) runs unchanged on
every rank with the same seed; only the denoiser is parallelised, by ``distgen.parallel``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from distgen.comm import CommStats
from distgen.config import ImageJob, ImageRequest
from distgen.models import diffusion as adapter
from distgen.parallel import cfg as cfg_parallel
from distgen.parallel import patch as patch_parallel
from distgen.parallel import pipefusion
from distgen.parallel import sequence as sequence_parallel
from distgen.parallel import vae as vae_parallel
from distgen.runtime.dist import WorkerContext


class StepTimer:
    """Times every denoiser call and brackets it as one step of the engine's accounting."""

    def __init__(self, denoiser: torch.nn.Module, stats, device: torch.device):
        self.stats, self.device = stats, device
        self.seconds: list[float] = []
        self._started = 0.0
        denoiser.register_forward_pre_hook(self._begin, prepend=True)
        denoiser.register_forward_hook(self._end)

    def _begin(self, module, args):
        self.stats.begin_step()
        self._started = time.perf_counter()

    def _end(self, module, args, output):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds.append(time.perf_counter() - self._started)
        self.stats.end_step()


def gather_step_seconds(ctx: WorkerContext, seconds: list[float]) -> list[list[float]] | None:
    """Every rank's step times, at rank 0 (None elsewhere); a collective.

    A parallel step is done when its slowest rank is: ranks that never wait for each other
    (naive modes) can drift apart, and rank 0's times alone would hide a slower rank.
    """
    if ctx.world_size == 1:
        return [list(seconds)]
    mine = torch.tensor(seconds, dtype=torch.float64, device=ctx.device)
    parts = ctx.engine(dist.group.WORLD, CommStats()).gather(mine, dst=0)
    return None if parts is None else [p.cpu().tolist() for p in parts]


def gather_rank_report(ctx: WorkerContext, denoiser: torch.nn.Module, wait_seconds: list[float]) -> list[dict] | None:
    """Every rank's memory and communication waits per step, at rank 0 (None elsewhere); a collective.

    Parameter bytes of the denoiser as this rank holds it (PipeFusion keeps 1/N of the blocks) and
    of its transformer blocks alone; the process's peak resident set (it includes loading the whole
    pipeline, before strategies dropped anything) and its resident set now.
    """
    import resource

    params = sum(p.numel() * p.element_size() for p in denoiser.parameters())
    blocks = pipefusion.block_parameter_bytes(denoiser)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        rss = peak
    mine = torch.tensor([params, blocks, peak, rss, *wait_seconds], dtype=torch.float64, device=ctx.device)
    parts = [mine] if ctx.world_size == 1 else ctx.engine(dist.group.WORLD, CommStats()).gather(mine, dst=0)
    if parts is None:
        return None
    return [{"denoiser_parameter_bytes": int(p[0]), "block_parameter_bytes": int(p[1]), "peak_rss_bytes": int(p[2]),
             "rss_bytes": int(p[3]), "wait_seconds": p[4:].cpu().tolist()} for p in parts]


@dataclass
class ImageResult:
    latents: torch.Tensor
    step_seconds: list[float] = field(default_factory=list)
    bytes_sent: list[int] = field(default_factory=list)
    bytes_recv: list[int] = field(default_factory=list)
    wait_seconds: list[float] = field(default_factory=list)
    images: list | None = None
    decode: dict = field(default_factory=dict)  # seconds, peak_memory_bytes, bytes_sent (when decoded)


class DiffusionRunner:
    def __init__(self, job: ImageJob, ctx: WorkerContext, model_dir: str):
        self.job = job
        self.ctx = ctx
        self.pipe = adapter.load_pipeline(model_dir, job.dtype, ctx.device)
        self.pipe.set_progress_bar_config(disable=not (job.progress and ctx.rank == 0), desc="denoising")
        self.denoiser = adapter.denoiser_of(self.pipe)
        self.stats = CommStats()
        self.patch_state = None
        # Strategy order matters only for the pre-hooks: cfg splits the batch first.
        patch_group = ctx.group("patch")
        if patch_group is not None:
            engine = ctx.engine(patch_group, self.stats)
            self.patch_state = patch_parallel.apply(self.denoiser, engine, job.patch)
        self.sp_state = None
        sp_group = ctx.group("sp")
        if sp_group is not None:
            engine = ctx.engine(sp_group, self.stats)
            self.sp_state = sequence_parallel.apply(self.denoiser, engine, job.sp_mode)
        self.pipefusion_state = None
        pipefusion_group = ctx.group("pipefusion")
        if pipefusion_group is not None:
            from distgen.parallel.pipeline import feedback_group

            # Outputs of the last stage travel on a second group over the same ranks (one kind of message per pair).
            feedback = ctx.engine(feedback_group(ctx.mesh, "pipefusion"), self.stats)
            self.pipefusion_state = pipefusion.apply(self.denoiser, ctx.engine(pipefusion_group, self.stats),
                                                     job.pipefusion_patches, job.patch.warmup_steps, feedback)
        cfg_group = ctx.group("cfg")
        if cfg_group is not None:
            cfg_parallel.apply(self.denoiser, ctx.engine(cfg_group, self.stats))
        self.vae_state = None
        if job.vae_parallel:  # validated: there are patch ranks
            self.vae_stats = CommStats()
            self.vae_state = vae_parallel.apply(self.pipe.vae, ctx.engine(patch_group, self.vae_stats, shared_memory=False))
        self.steps = StepTimer(self.denoiser, self.stats, ctx.device)

    @torch.no_grad()
    def generate(self, request: ImageRequest, decode: bool) -> ImageResult:
        return self.generate_batch([request], decode)

    @torch.no_grad()
    def generate_batch(self, requests: list[ImageRequest], decode: bool) -> ImageResult:
        """One pipeline call for requests of the same size, steps, guidance and negative prompt
        (the resident group's batches); each row draws its initial noise from its own seed, so a
        row equals that request run alone."""
        self.stats.reset()
        self.steps.seconds = []
        if self.patch_state is not None:
            self.patch_state.new_request()
        if self.pipefusion_state is not None:
            self.pipefusion_state.new_request()
        generators = [torch.Generator(device="cpu").manual_seed(r.seed) for r in requests]
        kwargs = adapter.pipeline_kwargs(self.pipe, requests[0], generators[0] if len(requests) == 1 else generators)
        if len(requests) > 1:
            kwargs["prompt"] = [r.prompt for r in requests]
            if "negative_prompt" in kwargs:  # Flux takes one only with true CFG
                kwargs["negative_prompt"] = [r.negative_prompt for r in requests]
        with adapter.guidance_batch(self.pipe, kwargs):  # Flux's true CFG: one denoiser call per step
            output = self.pipe(**kwargs)
        latents = adapter.unpack_latents(self.pipe, output.images, requests[0].height, requests[0].width)
        self.drain()
        result = ImageResult(
            latents=latents.float().cpu(),
            step_seconds=list(self.steps.seconds),
            bytes_sent=[s.bytes_sent for s in self.stats.steps],
            bytes_recv=[s.bytes_recv for s in self.stats.steps],
            wait_seconds=[s.wait_s for s in self.stats.steps],
        )
        if decode:
            result.images, result.decode = self.decode(latents)
        return result

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> tuple[list | None, dict]:
        """Latents -> (PIL images at rank 0, None elsewhere; seconds, peak memory and bytes of the decode).

        With --vae-parallel every rank must call it (each patch group decodes its bands together);
        otherwise only rank 0 decodes and other ranks get (None, {})."""
        from distgen.runtime.memory import measure

        if self.vae_state is None and self.ctx.rank != 0:
            return None, {}
        if self.vae_state is not None:
            self.vae_stats.reset()
            self.vae_stats.begin_step()
        decoded, seconds, peak = measure(lambda: adapter.decode_latents(self.pipe, latents, postprocess=False),
                                         self.ctx.device)
        info = {"seconds": seconds, "peak_memory_bytes": peak, "bytes_sent": 0, "wait_seconds": 0.0}
        if self.vae_state is not None:
            self.vae_stats.end_step()
            info["bytes_sent"] = self.vae_stats.steps[0].bytes_sent
            info["wait_seconds"] = self.vae_stats.steps[0].wait_s
        if self.ctx.rank != 0:
            return None, info
        return self.pipe.image_processor.postprocess(decoded, output_type="pil"), info

    def drain(self) -> None:
        """Finish every exchange still in flight (after a request, or one that was cancelled)."""
        for state in (self.patch_state, self.sp_state, self.pipefusion_state):
            if state is not None and hasattr(state, "engine"):
                state.engine.drain()
