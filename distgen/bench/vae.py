"""``distgen bench vae``: one-rank vs parallel VAE decode (``--vae-parallel``), in one run; one JSON object.

Decode only: the VAE of a diffusers pipeline directory (``AutoencoderKL.from_pretrained`` of its
``vae`` folder, the user's path) decodes seeded Gaussian latents of each size, so the large sizes
where the decode's memory matters (2048², 4096²) are measured without a denoiser run at that size.
For every size: one rank, then ``patch=N`` ranks with :mod:`distgen.parallel.vae`, each in fresh
processes; per-rank peak memory above the loaded model (:mod:`distgen.runtime.memory`), seconds,
bytes sent, and the largest per-pixel difference against the one-rank decode (0-255 units).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from distgen.config import DTYPES, ConfigError, ParallelConfig


@dataclass(frozen=True)
class VaeDecodeJob:
    entry: ClassVar[str] = "distgen.bench.vae:run_vae_decode_job"

    model: str  # diffusers pipeline directory
    height: int
    width: int
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    seed: int = 0
    dtype: str = "fp32"
    repeats: int = 1
    return_tensor: bool = False  # the float decode (tests, small sizes), besides the uint8 image
    threads_per_rank: int | None = 1
    comm_timeout_s: float = 600.0


def load_vae(model: str, dtype: str, device: torch.device):
    from diffusers import AutoencoderKL

    from distgen.models.diffusion import TORCH_DTYPES

    return AutoencoderKL.from_pretrained(str(Path(model) / "vae"), torch_dtype=TORCH_DTYPES[dtype]).to(device).eval()


def latent_shape(vae, height: int, width: int) -> tuple[int, int, int, int]:
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return (1, vae.config.latent_channels, height // factor, width // factor)


@torch.no_grad()
def run_vae_decode_job(job: VaeDecodeJob, ctx) -> dict | None:
    from distgen.comm import CommStats
    from distgen.parallel import vae as vae_parallel
    from distgen.runtime.memory import measure

    vae = load_vae(job.model, job.dtype, ctx.device)
    stats = CommStats()
    group = ctx.group("patch")
    if group is not None:
        vae_parallel.apply(vae, ctx.engine(group, stats, shared_memory=False))
    generator = torch.Generator().manual_seed(job.seed)
    latents = torch.randn(latent_shape(vae, job.height, job.width), generator=generator).to(ctx.device, vae.dtype)
    latents = latents / vae.config.scaling_factor
    # One small decode first: lazy initialisation (kernels, allocator arenas, exchange buffers)
    # is not the decode's memory.
    vae.decode(torch.randn(1, latents.shape[1], 2 * ctx.world_size, 8).to(latents), return_dict=False)
    runs = []
    for _ in range(job.repeats):
        stats.reset()
        stats.begin_step()
        image, seconds, peak = measure(lambda: vae.decode(latents, return_dict=False)[0], ctx.device)
        stats.end_step()
        runs.append({"seconds": seconds, "peak_memory_bytes": peak, "bytes_sent": stats.steps[0].bytes_sent,
                     "wait_seconds": stats.steps[0].wait_s})
    mine = torch.tensor([[r["seconds"], r["peak_memory_bytes"], r["bytes_sent"], r["wait_seconds"]] for r in runs],
                        dtype=torch.float64)
    per_rank = ctx.engine(torch.distributed.group.WORLD, CommStats()).gather(mine, dst=0) if ctx.world_size > 1 else [mine]
    if ctx.rank != 0:
        return None
    pixels = ((image.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    return {
        "runs": runs,
        "per_rank": [p.tolist() for p in per_rank],
        "pixels": pixels.numpy(),
        "tensor": image.float().cpu() if job.return_tensor else None,
    }


def _parse_sizes(spec: str) -> list[tuple[int, int]]:
    sizes = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        h, _, w = item.lower().partition("x")
        try:
            height, width = int(h), int(w or h)
        except ValueError:
            raise ConfigError(f"--sizes: expected sizes like '2048' or '2048x1024', got {item!r}") from None
        if height < 8 or width < 8:
            raise ConfigError(f"--sizes: sides must be at least 8 px, got {item!r}")
        sizes.append((height, width))
    if not sizes:
        raise ConfigError("--sizes: give at least one size, e.g. '2048,4096'")
    return sizes


def bench_vae(args) -> dict:
    from distgen.launch import run_job
    from distgen.runtime.memory import MMAP_THRESHOLD_ENV
    from distgen.workloads.image import resolve_image_model
    import os

    resolved = resolve_image_model(args)
    vae_config = Path(resolved.directory) / "vae" / "config.json"
    if not vae_config.exists():
        raise ConfigError(f"--model: {resolved.directory} has no vae/config.json (a diffusers pipeline directory, or "
                          "any directory holding an AutoencoderKL saved with save_pretrained under vae/)")
    factor = 2 ** (len(json.loads(vae_config.read_text())["block_out_channels"]) - 1)
    parallel = ParallelConfig.parse(args.parallel, ("patch",), "the VAE decode bench")
    ranks = parallel.degree("patch")
    if ranks < 2:
        raise ConfigError(f"--parallel: give the patch ranks to decode over, e.g. 'patch=2' (got {args.parallel!r})")
    if args.dtype not in DTYPES:
        raise ConfigError(f"--dtype: unknown dtype {args.dtype!r}; allowed: {', '.join(DTYPES)}")
    sizes = _parse_sizes(args.sizes)
    for height, width in sizes:
        if height % (factor * ranks) or width % factor:
            raise ConfigError(f"--sizes {height}x{width}: the height must be a multiple of VAE factor {factor} x "
                              f"{ranks} ranks = {factor * ranks} and the width of {factor}")
    os.environ.update(MMAP_THRESHOLD_ENV)  # workers inherit it: freed tensors leave the resident set
    report = {"workload": "vae-decode", "model": resolved.directory, "preset": resolved.name, "dtype": args.dtype,
              "vae_scale_factor": factor, "threads_per_rank": args.threads_per_rank, "repeats": args.repeats,
              "peak_memory": "per rank, resident set above the loaded VAE and latents, sampled every 1 ms",
              "sizes": []}
    for height, width in sizes:
        row = {"height": height, "width": width}
        results = {}
        for nproc, spec in ((1, ParallelConfig({})), (ranks, parallel)):
            job = VaeDecodeJob(model=resolved.directory, height=height, width=width, parallel=spec, seed=args.seed,
                               dtype=args.dtype, repeats=args.repeats, threads_per_rank=args.threads_per_rank,
                               comm_timeout_s=args.comm_timeout)
            started = time.perf_counter()
            result = run_job(job, nproc, "spawn", args.timeout, threads_per_rank=args.threads_per_rank)
            per_rank = np.asarray(result["per_rank"])  # (rank, repeat, [seconds, peak, bytes, wait])
            results[nproc] = result
            row["1_rank" if nproc == 1 else f"patch={ranks}"] = {
                "seconds": float(per_rank[:, :, 0].max(axis=0).min()),  # slowest rank, best repeat
                "peak_memory_bytes_per_rank": [int(v) for v in per_rank[:, :, 1].max(axis=1)],
                "bytes_sent_per_rank": int(per_rank[0, -1, 2]),
                "wait_seconds": float(per_rank[0, -1, 3]),
                "wall_seconds": time.perf_counter() - started,
            }
        one, many = row["1_rank"], row[f"patch={ranks}"]
        row["peak_memory_ratio"] = max(many["peak_memory_bytes_per_rank"]) / max(1, one["peak_memory_bytes_per_rank"][0])
        row["speedup_vs_1_rank"] = one["seconds"] / many["seconds"]
        diff = np.abs(results[1]["pixels"].astype(np.int16) - results[ranks]["pixels"].astype(np.int16))
        row["max_pixel_diff_255"] = int(diff.max())
        report["sizes"].append(row)
    return report
