"""Embedded video pipelines, built deterministically from configs (no download).

Like the image presets (``distgen.models.tiny``): random weights, saved with
``save_pretrained`` (safetensors) into the cache and loaded back through the user's path.

``TemporalConvLayer`` zero-initialises its last conv (an identity at init, so a pretrained
image UNet can be inflated); a trained video UNet has learned weights there. The presets
re-draw those weights so that temporal convolutions really mix frames and every clip
exchange matters in the tests.

The schedulers predict x0 (DDIM, ``prediction_type="sample"``): with random weights an
ε-predicting model returns its initial noise amplified (frames independent of each other,
values growing with the step count), so neither seams nor fidelity would show; predicting
x0, the video is the network's own, temporally mixed, output.
"""

from __future__ import annotations

from pathlib import Path

import torch

from distgen.models.tiny import _clip_text_encoder, build_tokenizer, cached_preset

VIDEO_FAMILIES = ("t2v", "animatediff", "wan")
DEFAULT_VIDEO_MODEL = "tiny-t2v"
# Name -> (family, denoiser config overrides, default (frames, height, width)).
# ``t2v-bench`` is the compute-dominated preset: a ModelScope-layout UNet3D with channels
# (64, 128), ~5.0 M denoiser parameters; at its default 48 frames of 128x128 px (16x16
# latents, guidance batch 2) one denoiser call costs seconds on one CPU thread. 48 frames give
# each of 2 clip ranks 24, the clip length Video-Infinity's own example runs per GPU (with
# its ±8 local and 16 global context frames): dual-scope keys then number at most
# 8 + 24 + 8 + 12 = 52 per query, about the whole video, not more than it as at 32 frames.
VIDEO_PRESETS: dict[str, tuple[str, dict, tuple[int, int, int]]] = {
    "tiny-t2v": ("t2v", {}, (16, 128, 128)),
    "tiny-animatediff": ("animatediff", {}, (16, 128, 128)),
    "tiny-wan": ("wan", {}, (9, 64, 64)),
    "t2v-bench": ("t2v", {"block_out_channels": (64, 128), "norm_num_groups": 32, "attention_head_dim": 8},
                  (48, 128, 128)),
}


def build_video_pipeline(family: str = "t2v", seed: int = 0, **overrides):
    """A tiny text-to-video pipeline of one family, weights from ``seed``, in eval mode."""
    if family not in VIDEO_FAMILIES:
        raise ValueError(f"family must be one of {', '.join(VIDEO_FAMILIES)}, got {family!r}")
    torch.manual_seed(seed)
    pipe = {"t2v": _t2v, "animatediff": _animatediff, "wan": _wan}[family](**overrides)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe


def _redraw_identity_convs(unet: torch.nn.Module) -> None:
    from diffusers.models.resnet import TemporalConvLayer

    for module in unet.modules():
        if isinstance(module, TemporalConvLayer):
            module.conv4[-1].reset_parameters()


def _video_vae():
    """A frame-wise 2D VAE with the usual 8x spatial factor (video sizes like 320x512 stay cheap)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 16, 16, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
    )


def _ddim():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                         prediction_type="sample")


def _t2v(**overrides):
    from diffusers import TextToVideoSDPipeline, UNet3DConditionModel

    tokenizer = build_tokenizer()
    config = dict(
        block_out_channels=(16, 32),
        norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        sample_size=32,
    )
    config.update(overrides)
    unet = UNet3DConditionModel(**config)
    _redraw_identity_convs(unet)
    return TextToVideoSDPipeline(
        vae=_video_vae(),
        text_encoder=_clip_text_encoder(len(tokenizer), config["cross_attention_dim"]),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_ddim(),
    )


def _animatediff(**overrides):
    from diffusers import AnimateDiffPipeline, UNetMotionModel

    tokenizer = build_tokenizer()
    config = dict(
        block_out_channels=(16, 32),
        norm_num_groups=16,
        down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
        up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"),
        cross_attention_dim=16,
        num_attention_heads=2,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        sample_size=32,
    )
    config.update(overrides)
    return AnimateDiffPipeline(
        vae=_video_vae(),
        text_encoder=_clip_text_encoder(len(tokenizer), config["cross_attention_dim"]),
        tokenizer=tokenizer,
        unet=UNetMotionModel(**config),
        motion_adapter=None,
        scheduler=_ddim(),
    )


def _wan(**overrides):
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import T5Config, UMT5EncoderModel

    tokenizer = build_tokenizer()
    config = dict(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    config.update(overrides)
    text_encoder = UMT5EncoderModel(
        T5Config(vocab_size=len(tokenizer), d_model=config["text_dim"], d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                 decoder_start_token_id=0)
    )
    vae = AutoencoderKLWan(
        base_dim=4, z_dim=config["in_channels"], dim_mult=[1, 1, 1, 1], num_res_blocks=1,
        temperal_downsample=[False, True, True], latents_mean=[0.0] * config["in_channels"],
        latents_std=[1.0] * config["in_channels"],
    )
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=WanTransformer3DModel(**config),
    )


def video_preset_dir(name: str = DEFAULT_VIDEO_MODEL) -> Path:
    """Directory of an embedded video preset, built and cached on first use (safe across processes)."""
    if name not in VIDEO_PRESETS:
        from distgen.config import ConfigError

        raise ConfigError(f"--preset: unknown video preset {name!r}; allowed: {', '.join(VIDEO_PRESETS)}")
    family, overrides, _ = VIDEO_PRESETS[name]
    return cached_preset(name, lambda: build_video_pipeline(family, seed=0, **overrides))
