"""Plain configuration dataclasses, validated once at the edge (CLI, launcher, server).

Every validation error is a :class:`ConfigError` that names the parameter and the values it
accepts, and is raised before any worker process is started.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

# Mesh axis order, outermost first. Bandwidth-hungry axes sit innermost so that, with the
# usual rank numbering, they land on adjacent ranks (same node, NVLink).
MESH_AXES = ("dp", "pp", "cfg", "pipefusion", "patch", "sp", "clip", "ep", "tp")
# Axes the image path implements today.
IMAGE_AXES = ("cfg", "pipefusion", "patch", "sp")
PATCH_MODES = ("sync", "displaced", "partial", "naive")
# Sequence parallelism for DiTs (distgen.parallel.sequence): all-to-all over heads, or a K/V ring.
SP_MODES = ("ulysses", "ring")
DTYPES = ("fp32", "bf16", "fp16")
LAUNCHERS = ("auto", "spawn", "torchrun", "ray")


class ConfigError(ValueError):
    """Bad user input, reported before any work is launched."""


def parse_choices(spec: str, allowed: tuple[str, ...], option: str, what: str) -> tuple[str, ...]:
    """``'a,b,a'`` -> ``('a', 'b')``, each one of ``allowed``; ConfigError naming ``option`` otherwise."""
    items = tuple(dict.fromkeys(item.strip() for item in spec.split(",") if item.strip()))
    for item in items:
        if item not in allowed:
            raise ConfigError(f"{option}: unknown {what} {item!r}; allowed: {', '.join(allowed)}")
    if not items:
        raise ConfigError(f"{option}: give at least one of {', '.join(allowed)}")
    return items


@dataclass(frozen=True)
class ParallelConfig:
    """Degrees on named axes; their product is the number of ranks."""

    degrees: dict[str, int] = field(default_factory=dict)

    @classmethod
    def parse(cls, spec: str | None, axes: tuple[str, ...] = MESH_AXES, workload: str | None = None) -> "ParallelConfig":
        """Parse ``"cfg=2,patch=2"``. An empty spec means one rank. ``axes``: the workload's axes
        (named in the error for an unknown one); ``workload``: its name, for the message."""
        degrees: dict[str, int] = {}
        where = f" for {workload}" if workload else ""
        for item in filter(None, (s.strip() for s in (spec or "").split(","))):
            name, sep, value = item.partition("=")
            name = name.strip()
            if not sep:
                raise ConfigError(f"--parallel: expected AXIS=DEGREE items like 'cfg=2,patch=2', got {item!r}")
            if name not in MESH_AXES:
                raise ConfigError(f"--parallel: unknown axis {name!r}; allowed axes{where}: {', '.join(axes)}")
            if name in degrees:
                raise ConfigError(f"--parallel: axis {name!r} given twice")
            try:
                degree = int(value)
            except ValueError:
                raise ConfigError(f"--parallel: degree of {name!r} must be a positive integer, got {value!r}") from None
            if degree < 1:
                raise ConfigError(f"--parallel: degree of {name!r} must be a positive integer, got {degree}")
            if degree > 1 and name not in axes:
                raise ConfigError(f"--parallel: axis {name!r} is not available{where or ' for this workload'}; "
                                  f"allowed: {', '.join(axes)}")
            degrees[name] = degree
        return cls(degrees)

    def degree(self, axis: str) -> int:
        return self.degrees.get(axis, 1)

    @property
    def world_size(self) -> int:
        size = 1
        for axis, d in self.degrees.items():
            size *= self.mesh_degree(axis)
        return size

    def mesh_degree(self, axis: str) -> int:
        """Ranks an axis adds to the mesh. ``ep`` shares the ranks of ``dp`` x ``tp`` (attention data-
        and tensor-parallel, experts expert-parallel over the same ranks, as vLLM does): it adds
        ep / (dp x tp) replicas."""
        degree = self.degrees.get(axis, 1)
        if axis == "ep" and degree > 1:
            shared = self.degrees.get("tp", 1) * self.degrees.get("dp", 1)
            return degree // shared if degree % shared == 0 else degree
        return degree

    @property
    def mesh_axes(self) -> tuple[tuple[str, int], ...]:
        """(name, ranks) of every axis adding ranks, outermost first."""
        return tuple((a, self.mesh_degree(a)) for a in MESH_AXES if self.mesh_degree(a) > 1)

    def validate(self, world_size: int, allowed_axes: tuple[str, ...], workload: str | None = None) -> None:
        for axis, degree in self.degrees.items():
            if degree > 1 and axis not in allowed_axes:
                raise ConfigError(
                    f"--parallel: axis {axis!r} is not available for {workload or 'this workload'}; allowed: "
                    f"{', '.join(allowed_axes)}"
                )
        ep, tp, dp = self.degree("ep"), self.degree("tp"), self.degree("dp")
        if ep > 1 and ep % (tp * dp):
            valid = ", ".join(str(tp * dp * k) for k in range(1, 5))
            raise ConfigError(f"--parallel: ep={ep} must be a multiple of dp x tp = {dp * tp} (experts are spread over "
                              f"the dp x tp ranks and ep / (dp x tp) replicas of them); valid ep degrees: {valid}, ...")
        if self.world_size != world_size:
            product = " x ".join(f"{a}={self.mesh_degree(a)}" for a in self.degrees) or "(none)"
            if ep > 1 and tp * dp > 1:
                product += f" (ep={ep} shares the dp x tp ranks)"
            raise ConfigError(
                f"--parallel: the product of the degrees ({product} = {self.world_size}) must equal the number of "
                f"ranks (--nproc / WORLD_SIZE = {world_size})"
            )

    def __str__(self) -> str:
        return ",".join(f"{a}={d}" for a, d in self.degrees.items()) or "none"


@dataclass(frozen=True)
class PatchConfig:
    """Patch parallelism over latent row bands (ALGORITHMS.md §1-2)."""

    mode: str = "displaced"
    warmup_steps: int = 4
    pcpp_fraction: float = 0.3

    def validate(self) -> None:
        if self.mode not in PATCH_MODES:
            raise ConfigError(f"--patch-mode: unknown mode {self.mode!r}; allowed: {', '.join(PATCH_MODES)}")
        if self.warmup_steps < 0:
            raise ConfigError(f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        if not (0.0 < self.pcpp_fraction <= 1.0):
            raise ConfigError(f"--pcpp-fraction must be in (0, 1], got {self.pcpp_fraction}")


@dataclass(frozen=True)
class ImageRequest:
    """One text-to-image request; every rank runs it with the same seed."""

    prompt: str = "a lighthouse at dusk"
    negative_prompt: str = ""
    height: int = 128
    width: int = 128
    steps: int = 20
    guidance_scale: float = 5.0
    seed: int = 0

    def validate(self) -> None:
        if not self.prompt:
            raise ConfigError("--prompt must not be empty")
        for name in ("height", "width", "steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be a positive integer, got {getattr(self, name)}")

    @property
    def guidance_enabled(self) -> bool:
        # diffusers pipelines switch classifier-free guidance on only for scale > 1.
        return self.guidance_scale > 1.0


@dataclass(frozen=True)
class ImageJob:
    """Everything a worker needs to run one image request (picklable, sent to every rank)."""

    # Every job type names the per-rank function that runs it ("module:function"); it is
    # called as fn(job, ctx) by distgen.runtime.worker.run_worker under every launcher.
    # Jobs also carry `parallel`, `comm_timeout_s` and `threads_per_rank`.
    entry: ClassVar[str] = "distgen.runtime.worker:run_image_job"

    request: ImageRequest
    parallel: ParallelConfig
    patch: PatchConfig = PatchConfig()
    sp_mode: str = "ulysses"  # with an sp axis: "ulysses" or "ring"
    pipefusion_patches: int | None = None  # with a pipefusion axis: patches M >= N (None: the default)
    model: str | None = None  # local diffusers pipeline directory; None = embedded default
    dtype: str = "fp32"
    out: str | None = None  # PNG path written by rank 0
    progress: bool = True
    # Benchmark knobs: run the request this many times and keep per-step timings.
    repeats: int = 1
    return_latents: bool = False
    threads_per_rank: int | None = None
    comm_timeout_s: float = 300.0
    # decode over the patch ranks (distgen.parallel.vae): band of latent rows per rank, exact
    vae_parallel: bool = False

    def validate(self) -> None:
        self.request.validate()
        self.patch.validate()
        if self.vae_parallel and self.parallel.degree("patch") < 2:
            raise ConfigError(
                f"--vae-parallel decodes one band of rows per patch rank; it needs --parallel patch=N with N >= 2 "
                f"(got --parallel {self.parallel})"
            )
        if self.sp_mode not in SP_MODES:
            raise ConfigError(f"--sp-mode: unknown mode {self.sp_mode!r}; allowed: {', '.join(SP_MODES)}")
        pipefusion = self.parallel.degree("pipefusion")
        if pipefusion > 1 and self.parallel.degree("patch") > 1:
            raise ConfigError(f"--parallel: pipefusion and patch both split the image tokens; use one of them "
                              f"(got pipefusion={pipefusion}, patch={self.parallel.degree('patch')})")
        if pipefusion > 1 and self.parallel.degree("sp") > 1:
            raise ConfigError(f"--parallel: pipefusion with sequence-sharded stages (sp, xDiT's hybrid) is not "
                              f"supported yet; use pipefusion=N or sp=N (got pipefusion={pipefusion}, "
                              f"sp={self.parallel.degree('sp')})")
        # patch x sp composes on Flux only (checked against the model: distgen.parallel.sequence.validate_image)
        if self.parallel.degree("sp") > 1 and self.parallel.degree("patch") > 1 and self.patch.mode == "partial":
            raise ConfigError(
                f"--patch-mode partial with --parallel patch={self.parallel.degree('patch')},sp="
                f"{self.parallel.degree('sp')}: partial attends the nearest rows of the neighbour bands, but under sp "
                "a rank holds a contiguous token shard of its band, not those rows; use --patch-mode sync, "
                "displaced or naive with sp"
            )
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype: unknown dtype {self.dtype!r}; allowed: {', '.join(DTYPES)}")
        if self.parallel.degree("cfg") > 2:
            raise ConfigError(f"--parallel: cfg degree must be 1 or 2 (the two halves of the guidance batch), got {self.parallel.degree('cfg')}")
        if self.parallel.degree("cfg") == 2 and not self.request.guidance_enabled:
            raise ConfigError(
                f"--parallel cfg=2 needs classifier-free guidance, but --guidance-scale={self.request.guidance_scale} "
                "disables it (guidance is on only for a scale > 1); use cfg=1 or a scale > 1"
            )

    def replace(self, **changes) -> "ImageJob":
        return dataclasses.replace(self, **changes)
