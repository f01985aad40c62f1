"""Configuration of the video workload: request, clip parallelism, job (validated at the edge).

Checks that need the model (frames against clip ranks and position tables, window sizes
against the video) live in :func:`distgen.workloads.video.validate_video`, which the CLI calls
before any worker starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from distgen.config import DTYPES, SP_MODES, ConfigError, ParallelConfig

# Axes the video path implements: cfg halves, clips of frames (video UNets), token shards (video DiTs).
VIDEO_AXES = ("cfg", "clip", "sp")
CLIP_MODES = ("exact", "dual-scope", "naive")
# What a clip exchanges with its neighbours; the benchmark switches them on one by one
# (Video-Infinity's synchronisation-overhead table).
CLIP_EXCHANGES = ("conv", "norm", "attention")
VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", ".webm")


@dataclass(frozen=True)
class VideoRequest:
    """One text-to-video request; every rank runs it with the same seed."""

    prompt: str = "a paper boat drifting down a river"
    negative_prompt: str = ""
    frames: int = 16
    height: int = 64
    width: int = 64
    steps: int = 20
    guidance_scale: float = 7.5
    seed: int = 0
    fps: int = 8

    def validate(self) -> None:
        if not self.prompt:
            raise ConfigError("--prompt must not be empty")
        for name in ("frames", "height", "width", "steps", "fps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be a positive integer, got {getattr(self, name)}")

    @property
    def guidance_enabled(self) -> bool:
        return self.guidance_scale > 1.0


@dataclass(frozen=True)
class ClipConfig:
    """Clip parallelism over frames (ALGORITHMS.md §4, Video-Infinity).

    ``local_frames`` / ``global_frames`` of None pick min(8, smallest clip) and min(16, a
    quarter of the frames) once the video length is known (:func:`resolved`): the reference's
    8 and 16, kept below the video length so that dual-scope stays cheaper than exact on
    short videos.
    """

    mode: str = "dual-scope"
    stale_context: bool = False
    warmup_steps: int = 2  # synchronous denoiser calls before stale context is used
    local_frames: int | None = None
    global_frames: int | None = None
    scope_switch_t: float = 800.0
    exchanges: tuple[str, ...] = CLIP_EXCHANGES

    def validate(self) -> None:
        if self.mode not in CLIP_MODES:
            raise ConfigError(f"--clip-mode: unknown mode {self.mode!r}; allowed: {', '.join(CLIP_MODES)}")
        if self.stale_context and self.mode == "naive":
            raise ConfigError("--stale-context needs a mode that exchanges context (exact, dual-scope); naive exchanges nothing")
        if self.warmup_steps < 0:
            raise ConfigError(f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        unknown = [e for e in self.exchanges if e not in CLIP_EXCHANGES]
        if unknown:
            raise ConfigError(f"clip exchanges: unknown {unknown}; allowed: {', '.join(CLIP_EXCHANGES)}")
        if self.scope_switch_t < 0:
            raise ConfigError(f"--scope-switch-t must be >= 0, got {self.scope_switch_t}")

    def resolved(self, frames: int, clip_degree: int) -> "ClipConfig":
        """Fill the window defaults and check them against a video of ``frames`` latent frames."""
        smallest = frames // clip_degree
        local = self.local_frames if self.local_frames is not None else max(1, min(8, smallest))
        global_ = self.global_frames if self.global_frames is not None else max(1, min(16, frames // 4))
        if self.mode == "dual-scope" and clip_degree > 1:
            if not 1 <= local <= smallest:
                raise ConfigError(
                    f"--local-frames {local} is out of range for {frames} frames over clip={clip_degree}: each side of "
                    f"the window comes from the adjacent clip, so it must be in 1..{smallest} (the smallest clip)"
                )
            if not 0 <= global_ <= frames:
                raise ConfigError(f"--global-frames {global_} is out of range for the video: must be in 0..{frames}")
        return dataclasses.replace(self, local_frames=local, global_frames=global_)

    @property
    def active_exchanges(self) -> frozenset[str]:
        return frozenset() if self.mode == "naive" else frozenset(self.exchanges)


@dataclass(frozen=True)
class VideoJob:
    """Everything a worker needs to run one video request (picklable, sent to every rank)."""

    entry: ClassVar[str] = "distgen.runtime.video:run_video_job"

    request: VideoRequest
    parallel: ParallelConfig
    clip: ClipConfig = ClipConfig()
    sp_mode: str = "ulysses"  # with an sp axis (video DiTs): "ulysses" or "ring"
    model: str | None = None  # local diffusers pipeline directory; None = embedded default
    dtype: str = "fp32"
    out: str | None = None  # .mp4 (or .mkv/.mov/.webm) or a directory for PNG frames; rank 0 writes it
    progress: bool = True
    repeats: int = 1
    return_latents: bool = False
    return_frames: bool = False
    threads_per_rank: int | None = None
    comm_timeout_s: float = 300.0

    def validate(self) -> None:
        self.request.validate()
        self.clip.validate()
        if self.sp_mode not in SP_MODES:
            raise ConfigError(f"--sp-mode: unknown mode {self.sp_mode!r}; allowed: {', '.join(SP_MODES)}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype: unknown dtype {self.dtype!r}; allowed: {', '.join(DTYPES)}")
        if self.parallel.degree("clip") > 1 and self.parallel.degree("sp") > 1:
            raise ConfigError(
                "--parallel: clip (video UNets) and sp (video DiTs) apply to different models; use one of them "
                f"(got clip={self.parallel.degree('clip')}, sp={self.parallel.degree('sp')})"
            )
        if self.parallel.degree("cfg") > 2:
            raise ConfigError(f"--parallel: cfg degree must be 1 or 2 (the two halves of the guidance batch), got {self.parallel.degree('cfg')}")
        if self.parallel.degree("cfg") == 2 and not self.request.guidance_enabled:
            raise ConfigError(
                f"--parallel cfg=2 needs classifier-free guidance, but --guidance-scale={self.request.guidance_scale} "
                "disables it (guidance is on only for a scale > 1); use cfg=1 or a scale > 1"
            )
        if self.out is not None:
            suffix = _suffix(self.out)
            if suffix and suffix not in VIDEO_SUFFIXES:
                raise ConfigError(
                    f"--out {self.out!r}: unknown video suffix {suffix!r}; use one of {', '.join(VIDEO_SUFFIXES)} "
                    "or a directory (ending in '/') for PNG frames"
                )

    def replace(self, **changes) -> "VideoJob":
        return dataclasses.replace(self, **changes)


def _suffix(path: str) -> str:
    import os

    if path.endswith(("/", os.sep)) or os.path.isdir(path):
        return ""
    return os.path.splitext(path)[1].lower()
