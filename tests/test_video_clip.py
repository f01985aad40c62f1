"""Video generation and clip parallelism on real gloo groups (2 and 4 ranks).

Tiny TextToVideoSD (UNet3D) and AnimateDiff (UNetMotion) pipelines are built from configs,
saved with ``save_pretrained`` and loaded back by the workers through the user's path. The
reference is the plain diffusers pipeline call on the in-memory model, single process.
``exact`` must match it to 1e-4 (fp32, max abs diff on latents), uneven splits included;
``dual-scope`` must beat ``naive`` in PSNR against it and in boundary consistency.

The presets predict x0 (``prediction_type="sample"``): with random weights an ε-predicting
model's output is its amplified initial noise, frames independent of each other, so neither
fidelity nor seams would be visible; predicting x0, the output is the network's own,
temporally mixed, prediction.
"""

import os
import traceback

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import psnr
from distgen.bench.image import step_seconds
from distgen.bench.video import boundary_consistency
from distgen.cli import main
from distgen.comm import CommStats, ExchangeEngine
from distgen.config import ParallelConfig
from distgen.config_video import ClipConfig, VideoJob, VideoRequest
from distgen.launch.local import free_port, spawn
from distgen.models.tiny import save_pipeline
from distgen.models.tiny_video import build_video_pipeline
from distgen.models.video import pipeline_kwargs
from distgen.parallel.clip import ClipState, clip_lengths, dual_scope_layout, global_frame_indices

EXACT_ATOL = 1e-4
# Guidance 2 and few steps: enough to exercise the guidance batch while keeping the random
# model's own fp32 round-off (1 vs 2 threads: ~2e-5) well under the tolerance.
BASE = dict(height=32, width=32, steps=4, guidance_scale=2.0, seed=1)
EXACT_CASES = {  # name -> (family, parallel, frames); every split below is uneven
    "t2v-clip2": ("t2v", "clip=2", 7),  # clips 4, 3
    "t2v-clip4": ("t2v", "clip=4", 10),  # clips 3, 3, 2, 2: conv halos fetched in 2 stages
    "animatediff-cfg2-clip2": ("animatediff", "cfg=2,clip=2", 9),  # clips 5, 4; per-frame text states
}
# 16x16 latents: enough pixels per frame for the one clip boundary's jump to stand out of the
# frame-to-frame variation (with 8x8 the single-device video's own jumps vary as much as a seam).
QUALITY = VideoRequest(frames=16, **{**BASE, "height": 128, "width": 128})


def _request(frames):
    return VideoRequest(frames=frames, **BASE)


def _reference(pipe, request, output_type="latent"):
    with torch.no_grad():
        return pipe(**{**pipeline_kwargs(request, torch.Generator().manual_seed(request.seed)),
                       "output_type": output_type}).frames


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """family -> (saved directory, in-memory pipeline)."""
    root = tmp_path_factory.mktemp("video-pipelines")
    out = {}
    for family in ("t2v", "animatediff"):
        pipe = build_video_pipeline(family, seed=1)
        pipe.set_progress_bar_config(disable=True)
        out[family] = (str(save_pipeline(pipe, root / family)), pipe)
    return out


def run(model_dir, parallel, request, clip=ClipConfig(mode="exact"), **job):
    config = ParallelConfig.parse(parallel)
    job = VideoJob(request=request, parallel=config, clip=clip, model=model_dir, return_latents=True, progress=False,
                   threads_per_rank=1, comm_timeout_s=120, **job)
    return spawn(job, config.world_size, timeout_s=240)


# ------------------------------------------------------------------ exact clip mode
@pytest.mark.timeout(180)
@pytest.mark.parametrize("case", list(EXACT_CASES))
def test_exact_clip_mode_matches_single_device(models, case):
    family, parallel, frames = EXACT_CASES[case]
    directory, pipe = models[family]
    request = _request(frames)
    reference = _reference(pipe, request).float()
    decode = case == "t2v-clip2"
    result = run(directory, parallel, request, return_frames=decode)
    degree = ParallelConfig.parse(parallel).degree("clip")
    assert result["clip_lengths"] == clip_lengths(frames, degree)
    assert result["clip_lengths"][0] > result["clip_lengths"][-1]  # uneven: larger clips first
    diff = (result["latents"] - reference).abs().max().item()
    print(f"{case} exact, clips {result['clip_lengths']}: max abs diff {diff:.2e} (|ref| max {reference.abs().max():.1f})")
    assert diff <= EXACT_ATOL
    if decode:  # each rank decoded its own clip; rank 0 gathered the frames
        expected = torch.from_numpy((_reference(pipe, request, "np")[0] * 255).round().astype(np.uint8))
        assert result["frames"].shape == expected.shape == (frames, request.height, request.width, 3)
        assert (result["frames"].int() - expected.int()).abs().max().item() <= 1


# ------------------------------------------------------------ approximate clip modes
@pytest.mark.timeout(240)
def test_dual_scope_beats_naive_clips(models):
    directory, pipe = models["t2v"]
    reference = _reference(pipe, QUALITY).float()
    lengths = clip_lengths(QUALITY.frames, 2)
    window = dict(local_frames=4, global_frames=4)
    variants = {
        "dual-scope": ClipConfig(mode="dual-scope", **window),
        "dual-scope+stale": ClipConfig(mode="dual-scope", stale_context=True, warmup_steps=2, **window),
        "naive": ClipConfig(mode="naive"),
    }
    scores, seams, waits = {}, {}, {}
    for name, clip in variants.items():
        result = run(directory, "clip=2", QUALITY, clip)
        scores[name] = psnr(result["latents"], reference)
        seams[name] = boundary_consistency(result["latents"].numpy(), lengths, frame_axis=2)["ratio"]
        waits[name] = result["per_rank"][0]["wait_seconds_per_step"]
    reference_seam = boundary_consistency(reference.numpy(), lengths, frame_axis=2)["ratio"]
    print(f"t2v clip=2 PSNR vs single device (dB): {scores}; boundary/inside jump ratio {seams} "
          f"(single device at the same boundary: {reference_seam:.3f}); wait s/step rank 0 {waits}")
    assert scores["dual-scope"] > scores["naive"] + 1.0
    # Naive clips leave a seam (a jump beyond the single-device one at that frame pair); dual-scope closes it.
    assert seams["naive"] - reference_seam > 0.05
    assert abs(seams["dual-scope"] - reference_seam) < abs(seams["naive"] - reference_seam)
    assert np.isfinite(scores["dual-scope+stale"])


# ------------------------------------------------------------ loading and output files
@pytest.mark.timeout(120)
def test_saved_model_matches_in_memory_and_writes_png_frames(models, tmp_path):
    directory, pipe = models["animatediff"]
    request = _request(6)
    out = str(tmp_path / "frames") + os.sep
    result = run(directory, "", request, out=out)
    torch.testing.assert_close(result["latents"], _reference(pipe, request).float(), atol=1e-6, rtol=0)
    pngs = sorted(os.listdir(out))
    assert len(pngs) == 6
    from PIL import Image

    assert Image.open(os.path.join(out, pngs[0])).size == (request.width, request.height)


@pytest.mark.timeout(180)
def test_cli_writes_mp4_with_requested_frames_and_size(models, tmp_path, capsys):
    import av

    directory, _ = models["t2v"]
    out = tmp_path / "boat.mp4"
    code = main(["generate", "video", "--model", directory, "--frames", "7", "--height", "32", "--width", "48",
                 "--steps", "2", "--parallel", "clip=2", "--clip-mode", "dual-scope", "--nproc", "2",
                 "--out", str(out), "--no-progress", "--timeout", "150"])
    assert code == 0, capsys.readouterr().err
    with av.open(str(out)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 7
    assert frames[0].shape == (32, 48, 3)


@pytest.mark.timeout(150)
def test_wan_sequence_parallel_through_the_video_runtime(tmp_path):
    pipe = build_video_pipeline("wan", seed=2)
    pipe.set_progress_bar_config(disable=True)
    directory = str(save_pipeline(pipe, tmp_path / "wan"))
    request = VideoRequest(frames=9, height=64, width=64, steps=3, guidance_scale=3.0, seed=4)
    reference = _reference(pipe, request).float()
    result = run(directory, "sp=2", request, sp_mode="ulysses")
    diff = (result["latents"] - reference).abs().max().item()
    print(f"wan sp=2 ulysses via generate video: max abs diff {diff:.2e}")
    assert diff <= EXACT_ATOL


# ------------------------------------------------------------------ pieces
def test_uneven_clips_and_global_frames():
    assert clip_lengths(10, 4) == [3, 3, 2, 2]
    assert clip_lengths(7, 2) == [4, 3]
    assert global_frame_indices(16, 4) == [2, 6, 10, 14]
    assert global_frame_indices(5, 5) == [0, 1, 2, 3, 4]
    with pytest.raises(Exception, match="local-frames"):
        ClipConfig(local_frames=5).resolved(frames=8, clip_degree=2)


def test_bench_step_time_is_the_slowest_ranks():
    # rank 0 pooled after skipping each run's first call: 1,1,1,1,1,5 (median 1); rank 1: 2,3,2,2,2,2 (median 2)
    runs = [{"step_seconds_per_rank": [[9, 1, 1, 1], [9, 2, 3, 2]]}, {"step_seconds_per_rank": [[9, 1, 1, 5], [9, 2, 2, 2]]}]
    assert step_seconds({"runs": runs}, skip=1) == {"seconds_per_step": 2, "seconds_per_step_per_rank": [1, 2]}


@pytest.mark.parametrize("frames,world,local,n_global", [(48, 2, 8, 12), (10, 4, 2, 4), (7, 2, 3, 3), (16, 2, 8, 0)])
@pytest.mark.parametrize("emphasise_global", [True, False])
def test_dual_scope_keys_equal_separate_local_and_global_copies(frames, world, local, n_global, emphasise_global):
    """One key per frame with logaddexp biases == Video-Infinity's window keys + separate global keys."""
    lengths = clip_lengths(frames, world)
    starts = [sum(lengths[:r]) for r in range(world)]
    indices = global_frame_indices(frames, n_global) if n_global else []
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, frames, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    for rank in range(world):
        start, stop = starts[rank], starts[rank] + lengths[rank]
        lo, hi = start - (local if rank > 0 else 0), stop + (local if rank < world - 1 else 0)
        # Reference: window keys masked to |key - query| <= local, then every global frame again.
        window = torch.arange(lo, hi)
        local_bias = torch.where((window[None] - torch.arange(start, stop)[:, None]).abs() <= local, 0.0, float("-inf"))
        global_bias = torch.zeros(stop - start, len(indices))
        (global_bias if emphasise_global else local_bias).add_(10.0)
        ref = torch.nn.functional.scaled_dot_product_attention(
            q[:, :, start:stop], k[:, :, list(range(lo, hi)) + indices], v[:, :, list(range(lo, hi)) + indices],
            attn_mask=torch.cat([local_bias, global_bias], dim=1).double())
        layout = dual_scope_layout(starts, lengths, rank, local, indices, emphasise_global, torch.float64)
        keys = list(range(lo, hi)) + [indices[p] for p in layout.extra]
        assert len(set(keys)) == len(keys)  # no frame twice
        out = torch.nn.functional.scaled_dot_product_attention(q[:, :, start:stop], k[:, :, keys], v[:, :, keys],
                                                               attn_mask=layout.bias)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def _assembly_worker(rank, world, port, frames, local, n_global, errors):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        engine = ExchangeEngine(dist.group.WORLD, CommStats(), torch.device("cpu"))
        state = ClipState(engine, ClipConfig(mode="dual-scope", local_frames=local, global_frames=n_global))
        state.set_frames(frames)
        full = torch.randn(3, frames, 10, generator=torch.Generator().manual_seed(0))  # keys|values, every frame
        start, stop = state.start, state.start + state.length
        own = full[:, start:stop]  # not contiguous: travels through strided copies
        lo, hi = start - (local if rank > 0 else 0), stop + (local if rank < world - 1 else 0)
        for timestep in (900.0, 100.0):  # global, then local emphasis
            state.timestep = timestep
            begun = state.dual_scope_begin("attn", own)
            kv, bias = state.dual_scope_end("attn", own, begun)
            layout = dual_scope_layout(state.starts, state.lengths, rank, local, state.global_indices, timestep >= 800)
            keys = list(range(lo, hi)) + [state.global_indices[p] for p in layout.extra]
            assert torch.equal(kv, full[:, keys]), f"rank {rank}: keys of frames {keys} expected"
            assert torch.equal(bias, layout.bias)
        assert torch.equal(state.full_kv("attn", own), full)
        dist.destroy_process_group()
    except BaseException:
        errors.put(f"rank {rank}: {traceback.format_exc()}")
        raise


@pytest.mark.timeout(90)
@pytest.mark.parametrize("frames,world,local,n_global", [(48, 2, 8, 12), (10, 4, 2, 4)])
def test_dual_scope_keys_arrive_from_the_right_frames(frames, world, local, n_global):
    """Across real ranks, each rank's assembled keys|values are the full video's at its layout's frames."""
    _run_ranks(_assembly_worker, world, frames, local, n_global, join_s=80)


def _run_ranks(worker, world: int, *args, join_s: float) -> None:
    """``worker(rank, world, port, *args, errors)`` on ``world`` spawned ranks; fails with a rank's traceback."""
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, world, port, *args, errors)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(join_s)
    for p in procs:
        if p.is_alive():  # hung: do not leave it behind
            p.terminate()
    assert errors.empty(), errors.get()
    assert all(p.exitcode == 0 for p in procs)


def _gather_worker(rank, world, port, errors):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        stats = CommStats()
        engine = ExchangeEngine(dist.group.WORLD, stats, torch.device("cpu"))
        got = engine.gather(torch.full((2, 3), float(rank), dtype=torch.float64), dst=1)
        if rank == 1:
            assert [t[0, 0].item() for t in got] == list(range(world))
            assert stats.current.bytes_recv == 48 * (world - 1) and stats.current.bytes_sent == 0
        else:
            assert got is None
            assert stats.current.bytes_sent == 48 and stats.current.sent_to == {1: 48}
        dist.destroy_process_group()
    except BaseException:
        errors.put(f"rank {rank}: {traceback.format_exc()}")
        raise


@pytest.mark.timeout(60)
def test_engine_gather_to_one_rank():
    _run_ranks(_gather_worker, 3, join_s=50)


# ------------------------------------------------------------------ bad input
def _error(capsys, argv):
    code = main(["generate", "video", *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    return err


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--preset", "tiny-wan", "--parallel", "clip=2"], "supports UNet3DConditionModel, UNetMotionModel"),
        (["--parallel", "sp=2"], "needs a DiT denoiser"),
        (["--parallel", "clip=4", "--frames", "3"], "fewer than the 4 clip ranks"),
        (["--parallel", "clip=2", "--frames", "16", "--local-frames", "9"], "--local-frames 9 is out of range"),
        (["--parallel", "clip=2", "--frames", "16", "--global-frames", "17"], "--global-frames 17 is out of range"),
        (["--parallel", "clip=2", "--clip-mode", "fast"], "allowed: exact, dual-scope, naive"),
        (["--sp-mode", "star"], "allowed: ulysses, ring"),
        (["--preset", "tiny-animatediff", "--frames", "40", "--parallel", "clip=2", "--clip-mode", "exact"],
         "exceeds this model's frame position table (32 positions"),
        (["--parallel", "clip=2", "--clip-mode", "naive", "--stale-context"], "--stale-context needs a mode"),
        (["--parallel", "tp=2"], "allowed: cfg, clip, sp"),
        (["--preset", "tiny-wan", "--frames", "8"], "frames must be 4*n+1"),
        (["--out", "clip.gif"], "unknown video suffix"),
    ],
)
def test_bad_video_input_is_a_clear_error(capsys, argv, expected):
    assert expected in _error(capsys, argv)


def test_clip_with_an_image_model_is_an_error(capsys):
    from distgen.models.tiny import preset_dir

    err = _error(capsys, ["--model", str(preset_dir("tiny-sd")), "--parallel", "clip=2"])
    assert "UNet2DConditionModel is an image denoiser" in err and "clip parallelism: UNet3DConditionModel" in err
