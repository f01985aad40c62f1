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
    assert "'tp' is not available" in err and "cfg, pipefusion, patch" in err


def test_height_not_divisible(capsys):
    tiny = ["--model", "tiny-sd"]  # VAE factor 2 x UNet factor 2
    err = _error(capsys, ["generate", "image", *tiny, "--height", "100", "--parallel", "patch=2"])
    assert "--height 100 must be a multiple of 8" in err
    err = _error(capsys, ["generate", "image", *tiny, "--width", "90"])
    assert "--width 90 must be a multiple of 8" in err and "StableDiffusionPipeline itself needs a multiple of 8" in err
    err = _error(capsys, ["generate", "image", *tiny, "--width", "100"])  # a multiple of the VAE x denoiser factor 4 only
    assert "--width 100 must be a multiple of 8" in err
    # the trained default: a 4x VAE and a UNet that halves twice
    err = _error(capsys, ["generate", "image", "--height", "100", "--parallel", "patch=2"])
    assert "--height 100 must be a multiple of 32 for patch=2" in err and "VAE factor 4 x denoiser factor 4" in err


def test_more_ranks_than_latent_rows(capsys):
    err = _error(capsys, ["generate", "image", "--model", "tiny-sd", "--height", "64", "--parallel", "patch=32"])
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
    assert "--preset huge: does not exist, and is not the name of an embedded image model" in err and "tiny-sd" in err


# ------------------------------------------------- errors name what the user typed (issue 20)
@pytest.mark.parametrize("argv,axes,others", [
    (["generate", "image"], "allowed axes for images: cfg, pipefusion, patch, sp", ("tp", "clip")),
    (["bench", "image"], "allowed axes for images: cfg, pipefusion, patch, sp", ("tp", "clip")),
    (["generate", "video"], "allowed axes for video: cfg, clip, sp", ("tp", "patch")),
    (["generate", "text"], "allowed axes for text: dp, pp, ep, tp", ("cfg", "patch")),
])
def test_unknown_axis_lists_only_the_workloads_axes(capsys, argv, axes, others):
    err = _error(capsys, argv + ["--parallel", "foo=2"])
    assert "unknown axis 'foo'" in err and axes in err
    assert not any(axis in err.split("allowed axes")[1] for axis in others), err


def test_axis_of_another_workload_names_this_one(capsys):
    err = _error(capsys, ["generate", "text", "--parallel", "cfg=2"])
    assert "'cfg' is not available for text; allowed: dp, pp, ep, tp" in err


def test_place_blames_ranks_not_parallel(capsys):
    err = _error(capsys, ["place", "--synthetic", "8,32,2", "--ranks", "7"])
    assert "--ranks 7 must divide the number of expert slots" in err and "valid rank counts: 1, 2, 4, 8" in err
    assert "--parallel" not in err


def test_routing_file_of_another_shape_names_the_flag(capsys, tmp_path):
    from distgen.placement.routing import synthetic

    path = str(tmp_path / "t16.npz")
    synthetic(8, 16, 2, tokens=100, seed=0).save(path)
    err = _error(capsys, ["place", "--synthetic", "8,32,2", "--ranks", "8", "--routing", path])
    assert f"--routing {path}: the routing trace has 16 experts per layer, the model has 32" in err


@pytest.fixture(scope="module")
def tokenizerless(tmp_path_factory):
    from distgen.models.tiny_llm import save_random_llama

    directory = tmp_path_factory.mktemp("notok")
    save_random_llama(directory, vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    return directory


def test_missing_tokenizer_is_one_line(capsys, tokenizerless):
    err = _error(capsys, ["generate", "text", "--model", str(tokenizerless)])
    assert err.count("\n") == 1 and "no tokenizer in the directory" in err, err
    assert "sentencepiece" not in err and "Traceback" not in err


def test_broken_tokenizer_keeps_transformers_text_for_verbose(capsys, tokenizerless, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tokenizerless, broken)
    (broken / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "Nope"}}))
    err = _error(capsys, ["generate", "text", "--model", str(broken)])
    assert err.count("\n") == 1 and "tokenizer files do not load with transformers" in err, err
    err = _error(capsys, ["generate", "text", "--model", str(broken), "--verbose"])
    assert "Traceback" in err and "The above exception was the direct cause" in err


def test_option_error_is_one_line_without_usage(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "image", "--steps", "x"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "usage:" not in err
    assert "argument --steps: invalid int value: 'x'" in err and "--help" in err


def test_rank_traceback_only_with_verbose(capsys, monkeypatch):
    import distgen.cli.place
    from distgen.launch.local import WorkerError

    def failing_handler(args):
        raise WorkerError("rank 1 failed: RuntimeError: boom\n--- traceback of rank 1 ---\nTraceback (most recent ...)")

    monkeypatch.setattr(distgen.cli.place, "_place", failing_handler)  # a handler whose rank failed
    argv = ["place", "--synthetic", "2,4,2", "--ranks", "2"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "rank 1 failed: RuntimeError: boom" in err and "Traceback" not in err and "--verbose" in err
    assert main(argv + ["--verbose"]) == 1
    assert "--- traceback of rank 1 ---" in capsys.readouterr().err


def test_redundant_experts_bounded_in_place(capsys):
    err = _error(capsys, ["place", "--synthetic", "8,32,2", "--ranks", "2", "--redundant-experts", "100"])
    assert "--redundant-experts 100: at most 32 for 32 experts on --ranks 2" in err
    from distgen.placement.policies import validate

    validate("eplb", 32, range(8), 2, redundant=32)  # full replication is allowed
    with pytest.raises(ConfigError, match="--redundant-experts 1: spare slots need more than one"):
        validate("eplb", 32, range(8), 1, redundant=1)


@pytest.fixture(scope="module")
def tiny_mixtral(tmp_path_factory):
    """4 experts x 3 layers, with a word tokenizer (as tests/test_moe.py builds it)."""
    import torch
    from test_moe import _build, _word_tokenizer

    directory = tmp_path_factory.mktemp("mixtral")
    torch.manual_seed(0)
    _build("mixtral").save_pretrained(directory)
    _word_tokenizer().save_pretrained(directory)
    return str(directory)


@pytest.mark.parametrize("command", [["generate", "text", "--chat", "off"], ["bench", "moe"]])
def test_redundant_experts_bounded_in_text_and_bench(capsys, tiny_mixtral, command):
    err = _error(capsys, command + ["--model", tiny_mixtral, "--parallel", "ep=2", "--redundant-experts", "5"])
    assert "--redundant-experts 5: at most 4 for 4 experts on --parallel ep=2" in err


# ------------------------------------------------- more ranks than cores (issue 20 item 4)
def test_ranks_beyond_cores_are_noted_once(capsys, monkeypatch):
    import argparse

    from distgen.workloads import cores_note, resolve_nproc

    monkeypatch.setattr("os.cpu_count", lambda: 2)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    note = cores_note(3, "spawn")
    assert note.startswith("3 ranks on 2 CPU cores") and "slower than one rank" in note and "at most 2 ranks" in note
    assert cores_note(2, "auto") is None and cores_note(3, "ray") is None and cores_note(1, "spawn", 8) is None
    assert "2 ranks x 2 threads = 4 threads on 2 CPU cores" in cores_note(2, "spawn", threads_per_rank=2)
    monkeypatch.setattr("distgen.workloads._NOTED", set())
    args = argparse.Namespace(nproc=3, launcher="auto")
    assert resolve_nproc(args, ParallelConfig.parse("")) == 3
    assert resolve_nproc(args, ParallelConfig.parse("")) == 3
    assert capsys.readouterr().err.count("3 ranks on 2 CPU cores") == 1


# ------------------------------------------------- embedded models by name (issue 20 item 1)
def _prepare(argv):
    from distgen.cli import build_parser

    args = build_parser().parse_args(argv)
    return args


def test_model_accepts_an_embedded_image_name():
    from distgen.workloads.image import prepare_image_job

    job, nproc = prepare_image_job(_prepare(["generate", "image", "--model", "tiny-pixart", "--parallel", "sp=2"]))
    assert nproc == 2 and job.model.endswith("tiny-pixart-v1") and (job.request.height, job.request.width) == (128, 128)


def test_model_accepts_an_embedded_video_name():
    from distgen.workloads.video import prepare_video_job

    job, nproc = prepare_video_job(_prepare(["generate", "video", "--model", "tiny-wan", "--parallel", "sp=2"]))
    assert nproc == 2 and job.model.endswith("tiny-wan-v1") and job.request.frames == 9  # the preset's size
    alias, _ = prepare_video_job(_prepare(["generate", "video", "--preset", "tiny-wan", "--parallel", "sp=2"]))
    assert alias.model == job.model


@pytest.mark.parametrize("argv,workload,listed", [
    (["generate", "image"], "image", "shapes-sd, tiny-sd, tiny-pixart, tiny-sd3, unet-bench, dit-bench"),
    (["generate", "video"], "video", "tiny-t2v, tiny-animatediff, tiny-wan, t2v-bench"),
    (["generate", "text"], "text", "smollm2, distgen-moe, smollm2-moe, tiny, llama-bench"),
    (["bench", "text"], "text", "smollm2, distgen-moe, smollm2-moe, tiny, llama-bench"),
])
def test_unknown_model_name_lists_the_embedded_ones(capsys, argv, workload, listed):
    err = _error(capsys, argv + ["--model", "tiny-nope"])
    assert f"--model tiny-nope: does not exist, and is not the name of an embedded {workload} model" in err
    assert listed in err


def test_a_directory_wins_over_a_name(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny-sd").mkdir()  # an (empty) directory called like the embedded model
    err = _error(capsys, ["generate", "image", "--model", "tiny-sd"])
    assert "model_index.json" in err


def test_preset_is_an_alias_of_model(capsys):
    err = _error(capsys, ["bench", "image", "--model", "tiny-sd", "--preset", "dit-bench"])
    assert "--preset is an alias of --model" in err


def test_tokenizerless_bench_model_cannot_generate_text(capsys):
    err = _error(capsys, ["generate", "text", "--model", "tiny"])
    assert "--model tiny: an embedded benchmark model without a tokenizer" in err and "smollm2-moe" in err


def test_prompts_file_is_read_and_checked(capsys, tmp_path):
    from distgen.workloads.text import read_prompts_file

    good = tmp_path / "p.jsonl"
    good.write_text('"def f(x):\\n    return"\n\n{"prompt": "import os"}\n')
    assert read_prompts_file(str(good)) == ["def f(x):\n    return", "import os"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('"ok"\nnot json\n')
    err = _error(capsys, ["generate", "text", "--model", "tiny-sd-nope", "--prompts-file", str(bad)])
    assert f"--prompts-file {bad}:2: not JSON" in err
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"text": "x"}\n')
    assert "expected a JSON string" in _error(capsys, ["generate", "text", "--prompts-file", str(wrong)])
    assert "no such file" in _error(capsys, ["generate", "text", "--prompts-file", str(tmp_path / "none.jsonl")])
