"""Sequence parallelism (ulysses, ring) for PixArt, SD3 and Wan, real gloo groups.

Exact strategy: every configuration must match the single-rank output of the same saved
weights to 1e-4 (fp32, max abs diff). Pipelines run through the user's path: saved with
``save_pretrained``, loaded by the workers' runners (``DiffusionRunner``, ``VideoRunner``),
the pipeline's own ``__call__``; the reference is the in-memory pipeline in this process.
Wan also runs at the module level (2 and 4 ranks, odd token count): each rank loads the saved
``WanTransformer3DModel``, computes the single-rank forward, then the sharded forward of a
fresh copy on the same input.

To keep process start-ups few on a 2-core machine, one spawned group runs several cases
(both modes, several models) and module-scoped fixtures hand the results to the tests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from distgen.cli import main
from distgen.comm import CommStats, ExchangeEngine
from distgen.config import ConfigError, ImageJob, ImageRequest, ParallelConfig
from distgen.launch.local import spawn
from distgen.models.diffusion import pipeline_kwargs
from distgen.models.tiny import build_pipeline, save_pipeline
from distgen.parallel import sequence

EXACT_ATOL = 1e-4
MODES = ("ulysses", "ring")
REQUEST = ImageRequest(prompt="a lighthouse at dusk", height=32, width=32, steps=3, guidance_scale=5.0, seed=3)
# 4 heads so that ulysses works at 2 and 4 ranks; 12 = 4 + 4 + 4 RoPE dims (t, h, w).
WAN_CONFIG = dict(
    patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=16,
    freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
)


# ------------------------------------------------------------------ jobs run by every rank
@dataclass(frozen=True)
class WanModuleJob:
    """Single-rank forward vs sp forward of a saved WanTransformer3DModel, each mode."""

    entry: ClassVar[str] = "test_sequence_parallel:run_wan_module"
    model_dir: str
    inputs: str  # torch.save'd kwargs of the forward
    parallel: ParallelConfig
    check_cores: bool = False
    comm_timeout_s: float = 60.0
    threads_per_rank: int | None = 1


def _core_diffs(ctx) -> dict:
    """Joint attention (13 image tokens, uneven over 2 ranks + 5 replicated text) vs full SDPA."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 13, 8) for _ in range(3))
    text = [torch.randn(2, 4, 5, 8) for _ in range(3)]
    full = torch.nn.functional.scaled_dot_product_attention(*(torch.cat([a, b], 2) for a, b in zip((q, k, v), text)))
    diffs = {}
    for mode in MODES:
        state = sequence.SequenceState(ExchangeEngine(ctx.group("sp"), CommStats(), ctx.device), mode)
        state.set_tokens(13)
        image, text_out = state.attention(*(state.shard(t, dim=2) for t in (q, k, v)), text)
        image = state.gather(image, dim=2)
        diffs[mode] = max((image - full[:, :, :13]).abs().max().item(), (text_out - full[:, :, 13:]).abs().max().item())
    return diffs


def run_wan_module(job: WanModuleJob, ctx) -> dict | None:
    from diffusers import WanTransformer3DModel

    inputs = torch.load(job.inputs)
    result = {}
    with torch.no_grad():
        reference = WanTransformer3DModel.from_pretrained(job.model_dir)(**inputs, return_dict=False)[0]
        for mode in MODES:
            model = WanTransformer3DModel.from_pretrained(job.model_dir)
            stats = CommStats()
            state = sequence.apply(model, ExchangeEngine(ctx.group("sp"), stats, ctx.device), mode)
            stats.begin_step()
            out = model(**inputs, return_dict=False)[0]
            stats.end_step()
            result[mode] = {
                "max_abs_diff": (out - reference).abs().max().item(),
                "lengths": state.lengths,
                "bytes_sent": stats.steps[0].bytes_sent,
                "replaced": state.replaced["self_attention"],
            }
        if job.check_cores:
            result["cores"] = _core_diffs(ctx)
    return result if ctx.rank == 0 else None


@dataclass(frozen=True)
class RunnerJob:
    """Several (model directory, sp mode) cases through the image or video runner, one group."""

    entry: ClassVar[str] = "test_sequence_parallel:run_runner_cases"
    kind: str  # "image" | "video"
    request: object
    cases: tuple[tuple[str, str], ...]
    parallel: ParallelConfig
    comm_timeout_s: float = 60.0
    threads_per_rank: int | None = 1


def run_runner_cases(job: RunnerJob, ctx) -> dict | None:
    out = {}
    for model_dir, mode in job.cases:
        if job.kind == "image":
            from distgen.runtime.diffusion import DiffusionRunner

            image_job = ImageJob(request=job.request, parallel=job.parallel, sp_mode=mode, model=model_dir, progress=False)
            result = DiffusionRunner(image_job, ctx, model_dir).generate(job.request, decode=False)
        else:
            from distgen.config_video import VideoJob
            from distgen.runtime.video import VideoRunner

            video_job = VideoJob(request=job.request, parallel=job.parallel, sp_mode=mode, model=model_dir, progress=False)
            result = VideoRunner(video_job, ctx, model_dir).generate(job.request, decode=False, gather_latents=True)
        out[(model_dir, mode)] = {"latents": result.latents, "bytes_sent": result.bytes_sent}
    return out if ctx.rank == 0 else None


# ------------------------------------------------------------------ Wan, module level
@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    from diffusers import WanTransformer3DModel

    root = tmp_path_factory.mktemp("wan")
    torch.manual_seed(0)
    WanTransformer3DModel(**WAN_CONFIG).eval().save_pretrained(root / "transformer")
    # Cfg-like batch of 2; 3 frames of 6x6 latents -> 3 x 3 x 3 = 27 tokens (odd: uneven shards).
    inputs = dict(
        hidden_states=torch.randn(2, 4, 3, 6, 6),
        timestep=torch.tensor([700, 300]),
        encoder_hidden_states=torch.randn(2, 7, 16),
    )
    torch.save(inputs, root / "inputs.pt")
    return str(root / "transformer"), str(root / "inputs.pt")


@pytest.fixture(scope="module")
def wan_module_sp2(wan):
    return spawn(WanModuleJob(*wan, ParallelConfig.parse("sp=2"), check_cores=True), 2, timeout_s=100)


def _check_wan_module(result, world):
    print(f"wan module sp={world}: {result}")
    for mode in MODES:
        assert result[mode]["replaced"] == WAN_CONFIG["num_layers"]
        assert sum(result[mode]["lengths"]) == 27 and len(set(result[mode]["lengths"])) == 2  # uneven shards
        assert result[mode]["bytes_sent"] > 0
        assert result[mode]["max_abs_diff"] <= EXACT_ATOL, mode


@pytest.mark.timeout(120)
def test_wan_module_sp2_matches_single_rank(wan_module_sp2):
    _check_wan_module(wan_module_sp2, 2)


@pytest.mark.slow  # sp=2 (test_wan_module_sp2...) and the 4-rank cfg x sp composite stay in make test
@pytest.mark.timeout(120)
def test_wan_module_sp4_matches_single_rank(wan):
    # 4 ranks: ring merges 4 blocks (three online-softmax rescalings), ulysses 1 head per rank.
    _check_wan_module(spawn(WanModuleJob(*wan, ParallelConfig.parse("sp=4")), 4, timeout_s=100), 4)


@pytest.mark.timeout(120)
def test_attention_cores_with_text_and_uneven_shards(wan_module_sp2):
    diffs = wan_module_sp2["cores"]
    print(f"joint attention, 13 image + 5 text tokens over 2 ranks: {diffs}")
    assert diffs["ulysses"] <= 1e-5 and diffs["ring"] <= 1e-5


# ------------------------------------------------------------------ pipelines
@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """family -> (saved directory, single-device latents of the in-memory pipeline)."""
    root = tmp_path_factory.mktemp("sp-pipelines")
    out = {}
    for family in ("pixart", "sd3"):
        pipe = build_pipeline(family, seed=1)
        pipe.set_progress_bar_config(disable=True)
        directory = save_pipeline(pipe, root / family)
        with torch.no_grad():
            reference = pipe(**pipeline_kwargs(pipe, REQUEST, torch.Generator().manual_seed(REQUEST.seed))).images
        out[family] = (str(directory), reference.float())
    return out


@pytest.fixture(scope="module")
def image_sp2(pipelines):
    cases = tuple((pipelines[family][0], mode) for family in ("pixart", "sd3") for mode in MODES)
    return spawn(RunnerJob("image", REQUEST, cases, ParallelConfig.parse("sp=2")), 2, timeout_s=110)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("family", ["pixart", "sd3"])
@pytest.mark.parametrize("sp_mode", MODES)
def test_image_pipeline_sp2_matches_single_rank(pipelines, image_sp2, family, sp_mode):
    directory, reference = pipelines[family]
    result = image_sp2[(directory, sp_mode)]
    diff = (result["latents"] - reference).abs().max().item()
    print(f"{family} sp=2 {sp_mode}: max abs diff {diff:.2e}, bytes/step {result['bytes_sent']}")
    assert len(result["bytes_sent"]) == REQUEST.steps and all(b > 0 for b in result["bytes_sent"])
    assert diff <= EXACT_ATOL


@pytest.mark.timeout(120)
def test_cfg_and_sp_compose_through_the_job(pipelines):
    # The whole user path (ImageJob -> run_image_job): SD3 joint attention, ring, guidance batch on 2 more ranks.
    directory, reference = pipelines["sd3"]
    config = ParallelConfig.parse("cfg=2,sp=2")
    job = ImageJob(request=REQUEST, parallel=config, sp_mode="ring", model=directory, return_latents=True,
                   progress=False, threads_per_rank=1, comm_timeout_s=60)
    job.validate()
    diff = (spawn(job, 4, timeout_s=110)["latents"] - reference).abs().max().item()
    print(f"sd3 cfg=2,sp=2 ring: max abs diff {diff:.2e}")
    assert diff <= EXACT_ATOL


@pytest.mark.timeout(120)
def test_wan_pipeline_matches_single_rank(tmp_path):
    """The video path: a saved tiny WanPipeline through VideoRunner, sp=2 both modes."""
    from distgen.config_video import VideoRequest
    from distgen.models.tiny_video import build_video_pipeline
    from distgen.models.video import pipeline_kwargs as video_kwargs

    # 5 frames -> 2 latent frames of 4x4 -> 2 x 2 x 2 = 8 tokens.
    request = VideoRequest(prompt="a paper boat", frames=5, height=32, width=32, steps=2, guidance_scale=5.0, seed=1)
    pipe = build_video_pipeline("wan", seed=2)
    pipe.set_progress_bar_config(disable=True)
    directory = str(save_pipeline(pipe, tmp_path / "wan"))
    with torch.no_grad():
        reference = pipe(**video_kwargs(request, torch.Generator().manual_seed(request.seed))).frames.float()
    results = spawn(RunnerJob("video", request, tuple((directory, m) for m in MODES), ParallelConfig.parse("sp=2")),
                    2, timeout_s=110)
    for mode in MODES:
        result = results[(directory, mode)]
        diff = (result["latents"] - reference).abs().max().item()
        print(f"wan pipeline sp=2 {mode}: max abs diff {diff:.2e}, bytes/step {result['bytes_sent']}")
        assert result["bytes_sent"] and all(b > 0 for b in result["bytes_sent"])
        assert diff <= EXACT_ATOL, mode


# ------------------------------------------------------------------ bad input, before launch
def _error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    return err


def test_sp_with_a_unet_names_the_dits(capsys, tmp_path):
    # Validation reads only the configs: a UNet pipeline directory without weights is enough.
    (tmp_path / "unet").mkdir()
    (tmp_path / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]})
    )
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"down_block_types": ["DownBlock2D"] * 2}))
    err = _error(capsys, ["generate", "image", "--model", str(tmp_path), "--parallel", "sp=2"])
    assert "UNet2DConditionModel" in err
    for name in sequence.SUPPORTED_DENOISERS:
        assert name in err


def test_ulysses_heads_not_divisible(capsys, pipelines):
    directory, _ = pipelines["pixart"]  # 2 heads
    argv = ["generate", "image", "--model", directory, "--height", "64", "--width", "64"]
    err = _error(capsys, argv + ["--parallel", "sp=4", "--sp-mode", "ulysses"])
    assert "2 attention heads" in err and "valid ulysses degrees for 2 heads: 2" in err and "ring" in err
    # The same degree is fine with ring: validation passes (the job is not launched here).
    from distgen.cli import build_parser
    from distgen.workloads.image import prepare_image_job

    args = build_parser().parse_args(argv + ["--parallel", "sp=4", "--sp-mode", "ring"])
    job, nproc = prepare_image_job(args)
    assert nproc == 4 and job.sp_mode == "ring"


def test_unknown_sp_mode(capsys):
    err = _error(capsys, ["generate", "image", "--parallel", "sp=2", "--sp-mode", "striped"])
    assert "--sp-mode: unknown mode 'striped'" in err and "ulysses, ring" in err
    with pytest.raises(ConfigError, match="allowed: ulysses, ring"):
        ImageJob(request=REQUEST, parallel=ParallelConfig({}), sp_mode="Ring").validate()
    err = _error(capsys, ["bench", "image", "--preset", "tiny-pixart", "--parallel", "sp=2", "--sp-mode", "ulysses,zigzag"])
    assert "unknown mode 'zigzag'" in err


def test_fewer_tokens_than_ranks_and_patch_with_sp(capsys, pipelines):
    directory, _ = pipelines["sd3"]  # 4 heads, patch 2, VAE factor 2: 8x8 px -> 2x2 = 4 tokens
    err = _error(capsys, ["generate", "image", "--model", directory, "--height", "8", "--width", "8",
                          "--parallel", "sp=8", "--sp-mode", "ring"])
    assert "only 4 tokens" in err and "at most sp=4" in err
    err = _error(capsys, ["generate", "image", "--model", directory, "--parallel", "patch=2,sp=2"])
    assert "patch and sp" in err


def test_uneven_token_count_is_accepted():
    # Any token count >= the degree is exact (balanced shards, no padding): 15 x 15 tokens on sp=2.
    assert sequence.shard_lengths(225, 2) == [113, 112]
    assert sequence.shard_lengths(27, 4) == [7, 7, 7, 6]
    sequence.validate("SD3Transformer2DModel", 4, 2, "ring", tokens=225)
