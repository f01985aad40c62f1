"""The video training skeleton at toy length (issue 17 part 3): a TextToVideoSDPipeline on the image model's
VAE, tokenizer and text encoder, saved in fp16, loading through from_pretrained and generating frames."""

import numpy as np
import pytest
import torch

from distgen.models.train import train_image, train_video


@pytest.mark.slow  # about 40 s on 2 cores for a skeleton that trains nothing yet (CI's budget for make test)
def test_t2v_skeleton_trains_saves_and_loads(tmp_path):
    from diffusers import TextToVideoSDPipeline

    image = tmp_path / "sd"
    assert train_image.main(["--out", str(image), "--images", "16", "--steps", "1", "--vae-steps", "1", "--batch", "8",
                             "--vae-batch", "8", "--sample", "0", "--threads", "1"]) == 0
    out = tmp_path / "t2v"
    assert train_video.main(["--out", str(out), "--image", str(image), "--clips", "4", "--frames", "8", "--steps", "2",
                             "--batch", "2", "--log-every", "1", "--threads", "1"]) == 0
    pipe = TextToVideoSDPipeline.from_pretrained(out, dtype=torch.float32)
    assert type(pipe.unet).__name__ == "UNet3DConditionModel"
    pipe.set_progress_bar_config(disable=True)
    frames = pipe("a red ball bouncing from left to right", num_frames=8, height=64, width=64, num_inference_steps=2,
                  generator=torch.Generator().manual_seed(0), output_type="np").frames
    assert np.asarray(frames).shape == (1, 8, 64, 64, 3) and np.isfinite(np.asarray(frames)).all()
