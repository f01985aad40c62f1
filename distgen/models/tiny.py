"""Embedded default pipelines, built deterministically from configs (no download).

Random weights: images look like structured noise, but every rank computes exactly what a
single device computes, so they are real workloads for correctness and speed. Pipelines are
saved with ``save_pretrained`` (safetensors) and loaded back through the user's path.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from pathlib import Path

import torch

FAMILIES = ("unet", "pixart", "sd3", "flux")
DEFAULT_MODEL = "tiny-sd"
# Name -> (family, denoiser config overrides, default image size in pixels).
# ``dit-bench`` is the compute-dominated preset: a PixArt DiT of 8 layers, hidden 512
# (8 heads x 64), ~30 M denoiser parameters, 1024 image tokens at 128x128 px.
PRESETS: dict[str, tuple[str, dict, int]] = {
    "tiny-sd": ("unet", {}, 128),
    "tiny-pixart": ("pixart", {}, 128),
    "tiny-sd3": ("sd3", {}, 128),
    "unet-bench": ("unet", {"block_out_channels": (64, 128), "layers_per_block": 2}, 128),
    "dit-bench": ("pixart", {"num_layers": 8, "num_attention_heads": 8, "attention_head_dim": 64}, 128),
    "tiny-flux": ("flux", {}, 128),  # FLUX.1-dev layout (guidance embedding); guidance_embeds=False: schnell
}


def cache_root() -> Path:
    return Path(os.environ.get("DISTGEN_CACHE", Path.home() / ".cache" / "distgen"))


def _bytes_to_unicode() -> dict[int, str]:
    # The byte-to-printable map of GPT-2/CLIP byte-level BPE.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


def build_tokenizer(max_length: int = 77):
    """A CLIP byte-level BPE tokenizer with a character vocabulary (no merges)."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for suffix in ("", "</w>"):
        for c in chars:
            vocab[c + suffix] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def _clip_text_encoder(vocab_size: int, hidden: int, with_projection: bool = False, projection_dim: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=projection_dim,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def _vae(latent_channels: int = 4, **config):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        **config,
        block_out_channels=(16, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=latent_channels,
        norm_num_groups=8,
        layers_per_block=1,
    )


def build_pipeline(family: str = "unet", seed: int = 0, **overrides):
    """A tiny text-to-image pipeline of one denoiser family, weights from ``seed``.

    Components are in eval mode, as ``from_pretrained`` leaves them (T5 has dropout).
    """
    pipe = _build_pipeline(family, seed, **overrides)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe


def _build_pipeline(family: str, seed: int, **overrides):
    from diffusers import (
        DDIMScheduler,
        FlowMatchEulerDiscreteScheduler,
        PixArtAlphaPipeline,
        PixArtTransformer2DModel,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r}")
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    vocab = len(tokenizer)
    if family == "unet":
        unet_config = dict(
            block_out_channels=(32, 64),
            layers_per_block=1,
            sample_size=32,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=32,
        )
        unet_config.update(overrides)
        return StableDiffusionPipeline(
            vae=_vae(),
            text_encoder=_clip_text_encoder(vocab, 32),
            tokenizer=tokenizer,
            unet=UNet2DConditionModel(**unet_config),
            scheduler=DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    if family == "pixart":
        from transformers import T5Config, T5EncoderModel

        dit_config = dict(
            sample_size=16,
            num_layers=2,
            patch_size=2,
            attention_head_dim=8,
            num_attention_heads=2,
            in_channels=4,
            out_channels=8,
            cross_attention_dim=None,
            caption_channels=32,
            attention_bias=True,
            activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000,
            norm_type="ada_norm_single",
            norm_elementwise_affine=False,
            norm_eps=1e-6,
            use_additional_conditions=False,
        )
        dit_config.update(overrides)
        dit_config["cross_attention_dim"] = dit_config["num_attention_heads"] * dit_config["attention_head_dim"]
        text_encoder = T5EncoderModel(
            T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0)
        )
        return PixArtAlphaPipeline(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=_vae(),
            transformer=PixArtTransformer2DModel(**dit_config),
            scheduler=DDIMScheduler(steps_offset=1),
        )
    if family == "flux":
        return _flux_pipeline(tokenizer, vocab, overrides)
    sd3_config = dict(
        sample_size=32,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
        pos_embed_max_size=96,
    )
    sd3_config.update(overrides)
    tokenizer_2 = build_tokenizer()
    return StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(**sd3_config),
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_vae(),
        text_encoder=_clip_text_encoder(vocab, 16, with_projection=True, projection_dim=32),
        tokenizer=tokenizer,
        text_encoder_2=_clip_text_encoder(vocab, 16, with_projection=True, projection_dim=32),
        tokenizer_2=tokenizer_2,
        text_encoder_3=None,
        tokenizer_3=None,
    )


def _flux_pipeline(tokenizer, vocab: int, overrides: dict):
    """FLUX.1's layout at toy size: 2 double-stream + 2 single-stream blocks, 4 heads x 16 (RoPE 4+6+6
    over (text, row, column) ids), CLIP pooled + T5 sequence text, a 16-channel VAE with Flux's shift and
    scale whose latents the pipeline packs into 2x2 patches (64 channels per token). Default: the dev
    layout (``guidance_embeds=True``, distilled guidance); ``guidance_embeds=False`` gives schnell's."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    flux_config = dict(
        patch_size=1,
        in_channels=64,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    flux_config.update(overrides)
    text_encoder_2 = T5EncoderModel(
        T5Config(vocab_size=vocab, d_model=flux_config["joint_attention_dim"], d_kv=8, d_ff=64, num_layers=2,
                 num_heads=4, decoder_start_token_id=0)
    )
    return FluxPipeline(
        transformer=FluxTransformer2DModel(**flux_config),
        # FLUX.1's scheduler: the shift grows with the image's token count (mu from the pipeline)
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                  max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096),
        vae=_vae(latent_channels=flux_config["in_channels"] // 4, scaling_factor=0.3611, shift_factor=0.1159,
                 use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=_clip_text_encoder(vocab, flux_config["pooled_projection_dim"]),
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        # T5's sequence: 32 tokens here (the pipeline pads to max_sequence_length; see pipeline_kwargs)
        tokenizer_2=build_tokenizer(max_length=32),
    )


def save_pipeline(pipe, directory: str | os.PathLike) -> Path:
    """``save_pretrained`` into ``directory`` atomically (build in a sibling temp dir, rename)."""
    return _write_atomically(Path(directory), lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True))


def _write_atomically(directory: Path, write, marker: str = "model_index.json") -> Path:
    """``write(tmp)`` into a sibling temp dir, then rename it to ``directory`` (a reader never sees half)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=directory.name + ".", dir=directory.parent))
    try:
        write(tmp)
        try:
            os.rename(tmp, directory)
        except OSError:
            if not (directory / marker).exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return directory


def cached_directory(key: str, write, marker: str = "model_index.json") -> Path:
    """The cache's model directory ``key``, written once by ``write(tmp_dir)`` (safe across processes);
    ``marker``: the file a complete directory has (a pipeline's index, a checkpoint's config)."""
    directory = cache_root() / "models" / key
    if (directory / marker).exists():
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.parent / f".{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (directory / marker).exists():
            _write_atomically(directory, write, marker)
    return directory


def cached_preset(name: str, build) -> Path:
    """``build()``'s pipeline saved under the cache as preset ``name``, built once (safe across processes)."""
    return cached_directory(f"{name}-v1", lambda tmp: build().save_pretrained(tmp, safe_serialization=True))


def preset_dir(name: str = DEFAULT_MODEL) -> Path:
    """Directory of an embedded preset, built and cached on first use (safe across processes)."""
    if name not in PRESETS:
        from distgen.config import ConfigError

        raise ConfigError(f"--preset: unknown preset {name!r}; allowed: {', '.join(PRESETS)}")
    family, overrides, _ = PRESETS[name]
    return cached_preset(name, lambda: build_pipeline(family, seed=0, **overrides))
