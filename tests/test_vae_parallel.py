"""Parallel VAE decode (``--vae-parallel``, distgen.parallel.vae) on real gloo groups.

The VAE is the tiny pipeline's ``AutoencoderKL`` (down/up blocks, GroupNorm, the mid-block
self-attention), saved with ``save_pretrained`` and loaded by the workers through
``AutoencoderKL.from_pretrained``. The reference is the unmodified VAE decoding the same
latents in this process. The decode is exact by construction: fp32 outputs must agree to 1e-4
and the 8-bit images to 1/255 per pixel.
"""

import numpy as np
import pytest
import torch

from distgen.bench.vae import VaeDecodeJob, latent_shape, load_vae
from distgen.config import ConfigError, ImageJob, ImageRequest, ParallelConfig, PatchConfig
from distgen.launch.local import spawn
from distgen.models.diffusion import decode_latents
from distgen.models.tiny import build_pipeline, save_pipeline


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    pipe = build_pipeline("unet", seed=1)
    return str(save_pipeline(pipe, tmp_path_factory.mktemp("vae") / "tiny-sd"))


def _reference(model_dir, height, width, seed):
    vae = load_vae(model_dir, "fp32", torch.device("cpu"))
    latents = torch.randn(latent_shape(vae, height, width), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]


def _decode(model_dir, ranks, height, width, seed=5):
    job = VaeDecodeJob(model=model_dir, height=height, width=width, seed=seed, return_tensor=True,
                       parallel=ParallelConfig({"patch": ranks}), comm_timeout_s=60)
    return spawn(job, ranks, timeout_s=120)


@pytest.mark.timeout(150)
def test_two_rank_decode_equals_one_rank(model_dir):
    result = _decode(model_dir, 2, 64, 96)
    reference = _reference(model_dir, 64, 96, 5)
    assert result["tensor"].shape == reference.shape == (1, 3, 64, 96)
    torch.testing.assert_close(result["tensor"], reference, atol=1e-4, rtol=0)
    pixels = ((reference.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    assert np.abs(result["pixels"].astype(int) - pixels.astype(int)).max() <= 1
    run = result["runs"][0]
    # halos, GroupNorm statistics, K/V and the image bands all went through the engine
    assert run["bytes_sent"] > 0 and run["peak_memory_bytes"] >= 0


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_four_rank_decode_equals_one_rank(model_dir):
    result = _decode(model_dir, 4, 64, 64)
    torch.testing.assert_close(result["tensor"], _reference(model_dir, 64, 64, 5), atol=1e-4, rtol=0)


@pytest.mark.timeout(200)
def test_generate_with_vae_parallel_equals_one_rank_decode(model_dir):
    request = ImageRequest(prompt="a lighthouse at dusk", height=64, width=64, steps=3, seed=2)
    job = ImageJob(request=request, parallel=ParallelConfig({"patch": 2}), patch=PatchConfig(mode="sync"),
                   model=model_dir, vae_parallel=True, return_latents=True, progress=False, threads_per_rank=1,
                   comm_timeout_s=60)
    job.validate()
    result = spawn(job, 2, timeout_s=150)
    pipe = build_pipeline("unet", seed=1)  # the same weights, decoded here on one device
    expected = np.asarray(decode_latents(pipe, result["latents"])[0], dtype=int)
    assert np.abs(np.asarray(result["image"], dtype=int) - expected).max() <= 1
    assert result["decode"]["bytes_sent"] > 0 and result["decode"]["seconds"] > 0


def test_vae_parallel_needs_patch_ranks():
    request = ImageRequest(height=64, width=64, steps=2)
    job = ImageJob(request=request, parallel=ParallelConfig({"cfg": 2}), vae_parallel=True)
    with pytest.raises(ConfigError, match=r"--vae-parallel .*--parallel patch=N with N >= 2 \(got --parallel cfg=2\)"):
        job.validate()


def test_vae_parallel_cli_error_before_launch(capsys):
    from distgen.cli import main

    assert main(["generate", "image", "--vae-parallel", "--steps", "2"]) == 2
    assert "--vae-parallel" in capsys.readouterr().err
    assert main(["bench", "vae", "--parallel", "patch=2", "--sizes", "102"]) == 2
    assert "--sizes 102x102" in capsys.readouterr().err
