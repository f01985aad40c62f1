"""Flux (FluxPipeline / FluxTransformer2DModel) in the image path, real gloo groups.

Tiny Flux pipelines are built from configs (the dev layout, guidance embedding, and the schnell
layout, without it), saved with ``save_pretrained`` and loaded back by the workers' runners
(``DiffusionRunner``: the pipeline's own ``__call__``). The reference is the plain diffusers
pipeline call on the in-memory model, single process, its packed latents unpacked as Flux's decode
does. Exact modes (sp ulysses / ring, patch sync, patch x sp sync, cfg) must match it to 1e-4 (fp32,
max abs diff); displaced patches must beat naive ones in PSNR against it.

To keep process start-ups few on a 2-core machine, one 2-rank group runs every 2-rank case (a
fresh device mesh per case) and module-scoped fixtures hand the results to the tests.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from conftest import psnr
from distgen.cli import main
from distgen.config import ImageJob, ImageRequest, ParallelConfig, PatchConfig
from distgen.launch.local import spawn
from distgen.models.diffusion import guidance_batch, pipeline_kwargs, unpack_latents
from distgen.models.tiny import build_pipeline, save_pipeline

EXACT_ATOL = 1e-4
WARMUP = 2
# 64x64 px: VAE factor 2 -> 32x32 latent -> 16x16 = 256 packed tokens (16 token rows: 8 per band at patch=2).
DEV = ImageRequest(prompt="a lighthouse at dusk", height=64, width=64, steps=6, guidance_scale=3.5, seed=3)
# schnell layout: true CFG needs a negative prompt and a scale > 1.
SCHNELL = ImageRequest(prompt="a lighthouse at dusk", negative_prompt="fog", height=64, width=64, steps=4,
                       guidance_scale=4.0, seed=5)


def _reference(pipe, request: ImageRequest, batched: bool = False) -> torch.Tensor:
    kwargs = pipeline_kwargs(pipe, request, torch.Generator().manual_seed(request.seed))
    with torch.no_grad():
        if batched:
            with guidance_batch(pipe, kwargs):
                latents = pipe(**kwargs).images
        else:
            latents = pipe(**kwargs).images
    return unpack_latents(pipe, latents, request.height, request.width).float()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """layout -> (saved directory, single-device latents of the in-memory pipeline)."""
    root = tmp_path_factory.mktemp("flux")
    out = {}
    for layout, request, overrides in (("dev", DEV, {}), ("schnell", SCHNELL, {"guidance_embeds": False})):
        pipe = build_pipeline("flux", seed=1, **overrides)
        pipe.set_progress_bar_config(disable=True)
        out[layout] = (str(save_pipeline(pipe, root / layout)), _reference(pipe, request))
        if layout == "schnell":
            # true CFG as one denoiser batch per step (what the runner does) vs the pipeline's two calls
            out["schnell-batched"] = _reference(pipe, request, batched=True)
    return out


# ------------------------------------------------------------------ cases run by one 2-rank group
@dataclass(frozen=True)
class FluxCasesJob:
    """(name, model directory, request, parallel spec, patch mode, sp mode) cases through ``DiffusionRunner``,
    each on a fresh mesh of its axes ("" = rank 0 alone)."""

    entry: ClassVar[str] = "test_flux:run_cases"
    cases: tuple[tuple[str, str, ImageRequest, str, str, str], ...]
    parallel: ParallelConfig  # the group's (its world size)
    comm_timeout_s: float = 60.0
    threads_per_rank: int | None = 1


def run_cases(job: FluxCasesJob, ctx) -> dict | None:
    from torch.distributed.device_mesh import init_device_mesh

    from distgen.runtime.diffusion import DiffusionRunner

    out = {}
    for name, model_dir, request, spec, patch_mode, sp_mode in job.cases:
        parallel = ParallelConfig.parse(spec)
        axes = parallel.mesh_axes
        if not axes and ctx.rank != 0:
            continue
        mesh = init_device_mesh("cpu", tuple(d for _, d in axes), mesh_dim_names=tuple(a for a, _ in axes)) if axes else None
        image_job = ImageJob(request=request, parallel=parallel, patch=PatchConfig(mode=patch_mode, warmup_steps=WARMUP),
                             sp_mode=sp_mode, model=model_dir, progress=False)
        runner = DiffusionRunner(image_job, dataclasses.replace(ctx, mesh=mesh), model_dir)
        result = runner.generate(request, decode=False)
        out[name] = {"latents": result.latents, "bytes_sent": result.bytes_sent, "steps": len(result.step_seconds)}
    return out if ctx.rank == 0 else None


@pytest.fixture(scope="module")
def two_ranks(models):
    dev, schnell = models["dev"][0], models["schnell"][0]
    cases = (
        ("one-rank", dev, DEV, "", "sync", "ulysses"),
        ("schnell-one-rank", schnell, SCHNELL, "", "sync", "ulysses"),
        ("sp-ulysses", dev, DEV, "sp=2", "sync", "ulysses"),
        ("sp-ring", dev, DEV, "sp=2", "sync", "ring"),
        ("patch-sync", dev, DEV, "patch=2", "sync", "ulysses"),
        ("patch-displaced", dev, DEV, "patch=2", "displaced", "ulysses"),
        ("patch-partial", dev, DEV, "patch=2", "partial", "ulysses"),
        ("patch-naive", dev, DEV, "patch=2", "naive", "ulysses"),
        ("cfg", schnell, SCHNELL, "cfg=2", "sync", "ulysses"),
    )
    return spawn(FluxCasesJob(cases, ParallelConfig.parse("sp=2")), 2, timeout_s=170)


@pytest.mark.timeout(180)
def test_saved_model_in_one_rank_matches_in_memory_pipeline(models, two_ranks):
    _, reference = models["dev"]
    torch.testing.assert_close(two_ranks["one-rank"]["latents"], reference, atol=1e-6, rtol=0)
    # schnell with true CFG: the runner batches the two calls of a step (float order only)
    _, reference = models["schnell"]
    latents = two_ranks["schnell-one-rank"]["latents"]
    torch.testing.assert_close(latents, models["schnell-batched"], atol=1e-6, rtol=0)
    print(f"schnell true CFG, batched vs the pipeline's two calls: {(latents - reference).abs().max().item():.2e}")
    assert (latents - reference).abs().max().item() <= 1e-5


@pytest.mark.timeout(180)
@pytest.mark.parametrize("case", ["sp-ulysses", "sp-ring", "patch-sync", "cfg"])
def test_exact_modes_match_single_device(models, two_ranks, case):
    _, reference = models["schnell" if case == "cfg" else "dev"]
    result = two_ranks[case]
    diff = (result["latents"] - reference).abs().max().item()
    print(f"flux {case}: max abs diff {diff:.2e}, bytes/step {result['bytes_sent']}")
    # one denoiser call per step (cfg: the batched guidance pair), each exchanging activations
    assert result["steps"] == (SCHNELL if case == "cfg" else DEV).steps
    assert all(b > 0 for b in result["bytes_sent"])
    assert diff <= EXACT_ATOL


@pytest.mark.timeout(180)
def test_displaced_patches_beat_naive(models, two_ranks):
    _, reference = models["dev"]
    scores = {mode: psnr(two_ranks[f"patch-{mode}"]["latents"], reference) for mode in ("displaced", "partial", "naive")}
    print(f"flux patch=2 PSNR vs single device (dB): {scores}")
    assert scores["displaced"] > scores["naive"] + 3
    assert scores["partial"] > scores["naive"]
    # naive bands exchange nothing but the output bands
    naive, displaced = two_ranks["patch-naive"]["bytes_sent"], two_ranks["patch-displaced"]["bytes_sent"]
    assert max(naive) < min(displaced)


# ------------------------------------------------------------------ patch x sp (4 ranks), the user's path
@pytest.mark.timeout(240)
@pytest.mark.parametrize("sp_mode", ["ulysses", pytest.param("ring", marks=pytest.mark.slow)])
def test_patch_and_sp_compose(models, sp_mode):
    # Bands over the patch axis, each band sequence-sharded over its sp pair: 4 ranks, ImageJob -> run_image_job.
    directory, reference = models["dev"]
    parallel = ParallelConfig.parse("patch=2,sp=2")
    job = ImageJob(request=DEV, parallel=parallel, patch=PatchConfig(mode="sync", warmup_steps=WARMUP),
                   sp_mode=sp_mode, model=directory, return_latents=True, progress=False, threads_per_rank=1,
                   comm_timeout_s=60)
    job.validate()
    result = spawn(job, 4, timeout_s=220)
    diff = (result["latents"] - reference).abs().max().item()
    print(f"flux patch=2,sp=2 {sp_mode} sync: max abs diff {diff:.2e}")
    assert diff <= EXACT_ATOL


# ------------------------------------------------------------------ bad input, before launch
def _error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    return err


def test_cfg_on_a_guidance_embedding_checkpoint(capsys, models):
    err = _error(capsys, ["generate", "image", "--model", models["dev"][0], "--height", "64", "--width", "64",
                          "--parallel", "cfg=2"])
    assert "--parallel cfg=2" in err and "guidance embedding" in err and "guidance_embeds: true" in err
    assert "patch=N or sp=N" in err
    # schnell layout: cfg=2 needs true CFG on (a negative prompt and a scale > 1)
    argv = ["generate", "image", "--model", models["schnell"][0], "--height", "64", "--width", "64", "--parallel", "cfg=2"]
    err = _error(capsys, argv)
    assert "--negative-prompt" in err and "cfg=1" in err
    from distgen.cli import build_parser
    from distgen.workloads.image import prepare_image_job

    job, nproc = prepare_image_job(build_parser().parse_args(argv + ["--negative-prompt", "fog"]))
    assert nproc == 2 and job.parallel.degree("cfg") == 2


def test_geometry_and_ulysses_heads(capsys, models):
    directory = models["dev"][0]
    base = ["generate", "image", "--model", directory]
    # 2x2 packing x VAE factor 2: sides must be multiples of 4 px; bands are whole rows of packed tokens.
    err = _error(capsys, base + ["--height", "64", "--width", "62"])
    assert "--width 62 must be a multiple of 4" in err and "Flux's 2x2 latent packing" in err
    err = _error(capsys, base + ["--height", "68", "--width", "64", "--parallel", "patch=2"])
    assert "--height 68 must be a multiple of 8 for patch=2" in err
    # 4 heads: ulysses degrees 2 and 4 only
    err = _error(capsys, base + ["--height", "64", "--width", "64", "--parallel", "sp=3", "--sp-mode", "ulysses"])
    assert "4 attention heads" in err and "valid ulysses degrees for 4 heads: 2, 4" in err
    # patch x sp: partial mode has no sp form; other families refuse the combination
    err = _error(capsys, base + ["--height", "64", "--width", "64", "--parallel", "patch=2,sp=2",
                                 "--patch-mode", "partial"])
    assert "--patch-mode partial" in err and "sync, displaced or naive" in err


def test_patch_and_sp_refused_on_other_families(capsys, tmp_path):
    # Validation reads only the configs: an SD3 pipeline directory without weights is enough.
    (tmp_path / "transformer").mkdir()
    (tmp_path / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"]})
    )
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"patch_size": 2, "num_attention_heads": 4}))
    err = _error(capsys, ["generate", "image", "--model", str(tmp_path), "--parallel", "patch=2,sp=2"])
    assert "patch and sp" in err and "compose only on Flux" in err and "SD3Transformer2DModel" in err
