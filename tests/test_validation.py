"""Bad input is a clear error, raised before any worker starts."""

import json

import pytest

from distgen.cli import main
from distgen.config import ConfigError, ParallelConfig


def _error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    return err


def test_degrees_must_multiply_to_ranks(capsys):
    err = _error(capsys, ["generate", "image", "--parallel", "cfg=2,patch=2", "--nproc", "2"])
    assert "product of the degrees" in err and "= 4" in err and "2" in err


def test_unknown_axis_and_bad_degree():
    with pytest.raises(ConfigError, match="allowed axes"):
        ParallelConfig.parse("tensor=2")
    with pytest.raises(ConfigError, match="positive integer"):
        ParallelConfig.parse("patch=two")
    with pytest.raises(ConfigError, match="positive integer"):
        ParallelConfig.parse("patch=0")


def test_axis_not_available_for_images(capsys):
    err = _error(capsys, ["generate", "image", "--parallel", "tp=2"])
    assert "'tp' is not available" in err and "cfg, patch" in err


def test_height_not_divisible(capsys):
    err = _error(capsys, ["generate", "image", "--height", "100", "--parallel", "patch=2"])
    assert "--height 100 must be a multiple of 8" in err
    err = _error(capsys, ["generate", "image", "--width", "90"])
    assert "--width 90 must be a multiple of 4" in err


def test_more_ranks_than_latent_rows(capsys):
    err = _error(capsys, ["generate", "image", "--height", "64", "--parallel", "patch=32"])
    assert "at most 16 bands" in err


def test_cfg_needs_guidance(capsys):
    err = _error(capsys, ["generate", "image", "--parallel", "cfg=2", "--guidance-scale", "1.0"])
    assert "cfg=2 needs classifier-free guidance" in err and "--guidance-scale=1.0" in err


def test_unknown_patch_mode(capsys):
    err = _error(capsys, ["generate", "image", "--parallel", "patch=2", "--patch-mode", "fancy"])
    assert "unknown mode 'fancy'" in err and "sync, displaced, partial, naive" in err


def test_bad_dtype(capsys):
    err = _error(capsys, ["generate", "image", "--dtype", "fp8"])
    assert "fp32, bf16, fp16" in err


def test_missing_model_directory(capsys, tmp_path):
    err = _error(capsys, ["generate", "image", "--model", str(tmp_path / "nope")])
    assert "does not exist" in err


def test_not_a_pipeline_directory(capsys, tmp_path):
    err = _error(capsys, ["generate", "image", "--model", str(tmp_path)])
    assert "model_index.json" in err


def test_unsupported_denoiser(capsys, tmp_path):
    (tmp_path / "model_index.json").write_text(
        json.dumps({"_class_name": "TextToVideoSDPipeline", "unet": ["diffusers", "UNet3DConditionModel"]})
    )
    err = _error(capsys, ["generate", "image", "--model", str(tmp_path)])
    assert "UNet3DConditionModel is not supported" in err
    assert "UNet2DConditionModel, PixArtTransformer2DModel, SD3Transformer2DModel" in err


def test_unknown_preset(capsys):
    err = _error(capsys, ["bench", "image", "--preset", "huge"])
    assert "unknown preset 'huge'" in err and "tiny-sd" in err
