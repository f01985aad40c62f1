"""Adapter for diffusers text-to-video pipelines saved with ``save_pretrained``.

Three layouts: ``TextToVideoSDPipeline`` (``UNet3DConditionModel``: ModelScope, VideoCrafter2),
``AnimateDiffPipeline`` (``UNetMotionModel``) and ``WanPipeline`` (``WanTransformer3DModel``).
``inspect_video_pipeline`` reads only JSON configs, so a request is validated before any
worker starts; ``decode_frames`` and ``write_video`` turn latents into an MP4 or PNG frames.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from distgen.config import ConfigError
from distgen.config_video import VideoRequest
from distgen.models.diffusion import _read_json, read_denoiser_entry

# Denoiser class -> family.
VIDEO_DENOISERS = {
    "UNet3DConditionModel": "t2v",
    "UNetMotionModel": "motion",
    "WanTransformer3DModel": "wan",
}
# Families whose temporal layers clip parallelism knows how to give context.
CLIP_DENOISERS = ("UNet3DConditionModel", "UNetMotionModel")
IMAGE_DENOISERS = ("UNet2DConditionModel", "PixArtTransformer2DModel", "SD3Transformer2DModel", "FluxTransformer2DModel")


@dataclass(frozen=True)
class VideoPipelineInfo:
    path: str
    pipeline_class: str
    denoiser_attr: str
    denoiser_class: str
    family: str
    vae_scale_spatial: int
    vae_scale_temporal: int  # pixel frames per latent frame (Wan's causal VAE: 4, +1 first frame)
    size_multiple: int  # pixels: VAE factor x denoiser downsampling / patch
    max_frame_positions: int | None  # AnimateDiff motion modules: length of the sinusoidal table
    frame_wise_vae: bool  # a 2D VAE decodes each frame alone, so every rank decodes its own clip
    num_heads: int | None
    patch_size: tuple[int, int, int] | None
    default_size: tuple[int, int, int]  # (frames, height, width) the pipeline itself defaults to

    def latent_frames(self, frames: int) -> int:
        if self.vae_scale_temporal == 1:
            return frames
        return (frames - 1) // self.vae_scale_temporal + 1


def inspect_video_pipeline(path: str | Path) -> VideoPipelineInfo:
    """Identify a local diffusers video pipeline directory without loading weights."""
    supported = ", ".join(VIDEO_DENOISERS)
    root, index, denoiser_attr, denoiser_class = read_denoiser_entry(path, f"supported video denoisers: {supported}")
    if denoiser_class not in VIDEO_DENOISERS:
        kind = "an image denoiser" if denoiser_class in IMAGE_DENOISERS else "not a supported video denoiser"
        raise ConfigError(
            f"--model: {denoiser_class} is {kind}; `distgen generate video` supports {supported} "
            f"(clip parallelism: {', '.join(CLIP_DENOISERS)}; sp: WanTransformer3DModel). "
            "For images use `distgen generate image`"
        )
    config = _read_json(root / denoiser_attr / "config.json", f"{denoiser_attr}/config.json")
    vae_config = _read_json(root / "vae" / "config.json", "vae/config.json") if isinstance(index.get("vae"), list) else {}
    family = VIDEO_DENOISERS[denoiser_class]
    if family == "wan":
        spatial = int(vae_config.get("scale_factor_spatial") or 8)
        temporal = int(vae_config.get("scale_factor_temporal") or 4)
        patch = tuple(config.get("patch_size", (1, 2, 2)))
        multiple = spatial * int(patch[1])
        heads = config.get("num_attention_heads")
        max_positions = None
        default = (81, 480, 832)
    else:
        spatial = 2 ** (len(vae_config.get("block_out_channels", [0, 0, 0, 0])) - 1)
        temporal = 1
        patch = None
        multiple = spatial * 2 ** (len(config.get("down_block_types", [])) - 1)
        heads = None
        max_positions = int(config.get("motion_max_seq_length", 32)) if family == "motion" else None
        side = int(config.get("sample_size") or 32) * spatial
        default = (16, side, side)
    return VideoPipelineInfo(
        path=str(root),
        pipeline_class=index.get("_class_name", "?"),
        denoiser_attr=denoiser_attr,
        denoiser_class=denoiser_class,
        family=family,
        vae_scale_spatial=spatial,
        vae_scale_temporal=temporal,
        size_multiple=multiple,
        max_frame_positions=max_positions,
        frame_wise_vae=family != "wan",
        num_heads=int(heads) if heads is not None else None,
        patch_size=patch,
        default_size=default,
    )


def pipeline_kwargs(request: VideoRequest, generator: torch.Generator) -> dict:
    """Arguments of the pipeline's own ``__call__`` (latents out; decoded per rank afterwards)."""
    return dict(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        num_frames=request.frames,
        height=request.height,
        width=request.width,
        num_inference_steps=request.steps,
        guidance_scale=request.guidance_scale,
        generator=generator,
        output_type="latent",
    )


def _to_uint8(video: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8, rounded as the pipelines' PIL/np output."""
    video = (video.float() / 2 + 0.5).clamp(0, 1)
    return (video * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


@torch.no_grad()
def decode_frames(pipe, info: VideoPipelineInfo, latents: torch.Tensor, chunk: int = 8) -> torch.Tensor:
    """Latents (1, C, F, h, w) -> uint8 frames (F', H, W, 3), decoded as the pipeline would."""
    vae = pipe.vae
    latents = latents.to(vae.device, vae.dtype)
    if info.family == "wan":
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1).to(latents)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1).to(latents)
        video = vae.decode(latents * std + mean, return_dict=False)[0]  # (1, 3, F', H, W)
        return _to_uint8(video[0].permute(1, 0, 2, 3))
    # Frame-wise 2D VAE: chunks of frames keep the decoder's activations small.
    frames = latents[0].permute(1, 0, 2, 3) / vae.config.scaling_factor  # (F, C, h, w)
    out = [_to_uint8(vae.decode(frames[i : i + chunk]).sample) for i in range(0, frames.shape[0], chunk)]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.uint8)


def is_frame_directory(out: str) -> bool:
    return out.endswith(("/", os.sep)) or os.path.isdir(out) or not os.path.splitext(out)[1]


def write_video(frames: np.ndarray, out: str, fps: int) -> str:
    """uint8 frames (F, H, W, 3) -> an MP4 (H.264 via PyAV's bundled FFmpeg) or a directory of PNGs."""
    if is_frame_directory(out):
        from PIL import Image

        os.makedirs(out, exist_ok=True)
        for i, frame in enumerate(frames):
            Image.fromarray(frame).save(os.path.join(out, f"frame_{i:05d}.png"))
        return out
    import av

    os.makedirs(os.path.dirname(os.path.abspath(out)) or ".", exist_ok=True)
    height, width = frames.shape[1:3]
    with av.open(out, mode="w") as container:
        codec = "libvpx-vp9" if out.lower().endswith(".webm") else "libx264"
        stream = container.add_stream(codec, rate=fps)
        # yuv420p, what players expect, needs even sizes: validation keeps sizes multiples of the VAE factor.
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out
