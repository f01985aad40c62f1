"""The image training command at toy length (issue 17 part 2): it saves pipelines that diffusers'
``from_pretrained`` and distgen's ``inspect_pipeline`` accept, both layouts generate, and the same seed gives
the same weights."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from distgen.models.train import train_image

TOY = ["--images", "32", "--resolution", "64", "--steps", "3", "--vae-steps", "3", "--batch", "8", "--vae-batch", "8",
       "--log-every", "1", "--sample", "0", "--threads", "1"]


def _weights(directory):
    return {f"{p.parent.name}/{k}": v for p in sorted(directory.rglob("*.safetensors")) for k, v in load_file(p).items()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    assert train_image.main(["--out", str(root / "sd"), "--seed", "3", *TOY]) == 0
    return root


def test_sd_layout_loads_generates_and_is_accepted_by_distgen(trained):
    from diffusers import StableDiffusionPipeline

    from distgen.models.diffusion import inspect_pipeline

    directory = trained / "sd"
    info = inspect_pipeline(directory)
    assert (info.family, info.vae_scale_factor, info.band_row_multiple) == ("unet", 4, 4)
    weights = _weights(directory)
    assert weights and all(v.dtype == torch.float16 for v in weights.values())
    record = json.loads((directory / "training.json").read_text())
    assert record["denoiser"]["steps"] == 3 and np.isfinite(record["denoiser"]["final_loss"])
    pipe = StableDiffusionPipeline.from_pretrained(directory, dtype=torch.float32)
    assert pipe.tokenizer("a red circle").input_ids == [pipe.tokenizer.bos_token_id,
                                                        *pipe.tokenizer.convert_tokens_to_ids(["a</w>", "red</w>", "circle</w>"]),
                                                        pipe.tokenizer.eos_token_id]
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle on a white background", height=64, width=64, num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


def test_same_seed_same_weights_other_seed_other_weights(trained, tmp_path):
    assert train_image.main(["--out", str(tmp_path / "again"), "--seed", "3", *TOY]) == 0
    first, again = _weights(trained / "sd"), _weights(tmp_path / "again")
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert train_image.main(["--out", str(tmp_path / "other"), "--seed", "4", *TOY]) == 0
    other = _weights(tmp_path / "other")
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_pixart_layout_reuses_the_vae_and_loads(trained, tmp_path):
    from diffusers import PixArtAlphaPipeline

    from distgen.models.diffusion import inspect_pipeline

    out = tmp_path / "pixart"
    assert train_image.main(["--out", str(out), "--layout", "pixart", "--vae", str(trained / "sd"), "--seed", "3",
                             *TOY]) == 0
    vae, shared = _weights(out), _weights(trained / "sd")
    assert all(torch.equal(vae[k], shared[k]) for k in shared if k.startswith("vae/"))
    assert inspect_pipeline(out).family == "pixart"
    pipe = PixArtAlphaPipeline.from_pretrained(out, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("two blue stars", height=64, width=64, num_inference_steps=2, use_resolution_binning=False,
                 clean_caption=False, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


def test_rendering_workers_give_the_same_data():
    one, captions = train_image.render_data(5, 24, 32, workers=1)
    many, captions_many = train_image.render_data(5, 24, 32, workers=2)
    assert torch.equal(one, many) and captions == captions_many
