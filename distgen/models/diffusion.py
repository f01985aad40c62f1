"""Adapter for diffusers text-to-image pipelines saved with ``save_pretrained``.

``inspect_pipeline`` reads only the JSON configs, so the launcher can validate a request
(supported denoiser, geometry) before any worker starts; ``load_pipeline`` is what each
worker runs.
"""

from __future__ import annotations

import math

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from distgen.config import ConfigError, ImageRequest, ParallelConfig

# Denoiser class -> (pipeline attribute, family).
SUPPORTED_DENOISERS = {
    "UNet2DConditionModel": ("unet", "unet"),
    "PixArtTransformer2DModel": ("transformer", "pixart"),
    "SD3Transformer2DModel": ("transformer", "sd3"),
    "FluxTransformer2DModel": ("transformer", "flux"),
}
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class PipelineInfo:
    path: str
    pipeline_class: str
    denoiser_attr: str
    denoiser_class: str
    family: str
    vae_scale_factor: int
    # Latent rows of a band must be a multiple of this (UNet downsampling / DiT patch size; Flux: its 2x2
    # packing, so a band is whole rows of packed tokens).
    band_row_multiple: int
    max_latent_size: int | None  # SD3: positions are cropped from a fixed table
    # Flux dev: the guidance scale is an input of the denoiser (distilled guidance), not a CFG batch.
    guidance_embeds: bool = False

    def pixels_per_band_row(self) -> int:
        return self.vae_scale_factor * self.band_row_multiple


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"--model: {what} not found at {path}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--model: {path} is not valid JSON ({exc})") from None


def read_denoiser_entry(path: str | Path, supported: str) -> tuple[Path, dict, str, str]:
    """(root, model_index.json, denoiser attribute, denoiser class) of a local diffusers pipeline
    directory; ``supported`` ends the error when there is no denoiser ("supported denoisers: ...")."""
    root = Path(path)
    if not root.is_dir():
        raise ConfigError(f"--model: directory {str(root)!r} does not exist (expected a diffusers pipeline saved with save_pretrained)")
    index = _read_json(root / "model_index.json", "model_index.json (not a diffusers pipeline directory?)")
    denoiser_attr = next((a for a in ("unet", "transformer") if isinstance(index.get(a), list) and index[a][1]), None)
    if denoiser_attr is None:
        raise ConfigError(f"--model: {root} has no 'unet' or 'transformer' component; {supported}")
    return root, index, denoiser_attr, index[denoiser_attr][1]


def inspect_pipeline(path: str | Path) -> PipelineInfo:
    """Identify a local diffusers pipeline directory without loading weights."""
    supported = ", ".join(SUPPORTED_DENOISERS)
    root, index, denoiser_attr, denoiser_class = read_denoiser_entry(path, f"supported denoisers: {supported}")
    if denoiser_class not in SUPPORTED_DENOISERS:
        raise ConfigError(f"--model: denoiser {denoiser_class} is not supported; supported denoisers: {supported}")
    config = _read_json(root / denoiser_attr / "config.json", f"{denoiser_attr}/config.json")
    vae_scale = 8
    if isinstance(index.get("vae"), list):
        vae_config = _read_json(root / "vae" / "config.json", "vae/config.json")
        vae_scale = 2 ** (len(vae_config.get("block_out_channels", [0, 0, 0, 0])) - 1)
    family = SUPPORTED_DENOISERS[denoiser_class][1]
    max_latent = None
    if family == "unet":
        multiple = 2 ** (len(config.get("down_block_types", [])) - 1)
    elif family == "flux":
        multiple = 2 * int(config.get("patch_size", 1))  # the pipeline packs 2x2 latent pixels per token
    else:
        multiple = int(config.get("patch_size", 2))
        if config.get("pos_embed_max_size"):
            max_latent = int(config["pos_embed_max_size"]) * multiple
    return PipelineInfo(
        path=str(root),
        pipeline_class=index.get("_class_name", "?"),
        denoiser_attr=denoiser_attr,
        denoiser_class=denoiser_class,
        family=family,
        vae_scale_factor=vae_scale,
        band_row_multiple=multiple,
        max_latent_size=max_latent,
        guidance_embeds=bool(config.get("guidance_embeds", False)),
    )


def validate_geometry(info: PipelineInfo, request: ImageRequest, parallel: ParallelConfig) -> None:
    """Height/width against the VAE, the denoiser's downsampling and the patch grid."""
    patch = parallel.degree("patch")
    width_multiple = info.pixels_per_band_row()
    height_multiple = width_multiple * patch
    why_width = f"VAE factor {info.vae_scale_factor} x denoiser factor {info.band_row_multiple}"
    if info.family == "flux":
        why_width = f"VAE factor {info.vae_scale_factor} x Flux's 2x2 latent packing"
    why_height = f"{why_width} x patch degree {patch}"
    if info.family in ("unet", "pixart"):
        # their pipelines' own check_inputs want multiples of 8, whatever the VAE factor
        if width_multiple % 8:
            width_multiple = math.lcm(width_multiple, 8)
            why_width += f", and {info.pipeline_class} itself needs a multiple of 8"
        if height_multiple % 8:
            height_multiple = math.lcm(height_multiple, 8)
            why_height += f", and {info.pipeline_class} itself needs a multiple of 8"
    if request.width % width_multiple:
        raise ConfigError(f"--width {request.width} must be a multiple of {width_multiple} for this model ({why_width})")
    latent_rows = request.height // info.vae_scale_factor
    if patch > 1 and latent_rows // info.band_row_multiple < patch:
        raise ConfigError(
            f"--parallel patch={patch}: {request.height} px gives {latent_rows} latent rows, enough for at most "
            f"{latent_rows // info.band_row_multiple} bands of {info.band_row_multiple} rows; use fewer ranks on "
            "the patch axis or a taller image"
        )
    if request.height % height_multiple:
        raise ConfigError(
            f"--height {request.height} must be a multiple of {height_multiple} for patch={patch} on this model "
            f"({why_height})"
        )
    if info.max_latent_size is not None:
        for name, value in (("height", request.height), ("width", request.width)):
            if value // info.vae_scale_factor > info.max_latent_size:
                raise ConfigError(
                    f"--{name} {value} exceeds this model's position table "
                    f"({info.max_latent_size * info.vae_scale_factor} px)"
                )


def load_pipeline(path: str | Path, dtype: str, device: torch.device):
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()  # one loading bar per rank is noise; ours shows the steps

    # Components saved as [null, null] (e.g. SD3 without its T5 encoder) must be passed as None.
    index = _read_json(Path(path) / "model_index.json", "model_index.json")
    absent = {k: None for k, v in index.items() if isinstance(v, list) and v[0] is None and v[1] is None}
    pipe = DiffusionPipeline.from_pretrained(str(path), dtype=TORCH_DTYPES[dtype], **absent)
    return pipe.to(device)


def denoiser_of(pipe) -> torch.nn.Module:
    return pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer


def pipeline_kwargs(pipe, request: ImageRequest, generator: torch.Generator) -> dict:
    """Arguments of the pipeline's own ``__call__`` for a request (latents out, decoded later)."""
    kwargs = dict(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        height=request.height,
        width=request.width,
        num_inference_steps=request.steps,
        guidance_scale=request.guidance_scale,
        generator=generator,
        output_type="latent",
    )
    if type(pipe).__name__.startswith("PixArt"):
        # Keep the requested size (no aspect-ratio bins) and skip caption cleaning (needs bs4).
        kwargs.update(use_resolution_binning=False, clean_caption=False)
    if type(pipe).__name__ == "FluxPipeline":
        # FluxPipeline runs true CFG whenever a negative prompt is passed with true_cfg_scale > 1, so the
        # negative prompt goes in only then; guidance_scale is dev's distilled guidance (ignored by schnell).
        del kwargs["negative_prompt"]
        if flux_true_cfg(pipe.transformer.config.guidance_embeds, request):
            kwargs.update(negative_prompt=request.negative_prompt, true_cfg_scale=request.guidance_scale)
        # T5's sequence: the tokenizer's own limit, at most the pipeline's 512 (FLUX.1's T5 tokenizer: 512)
        kwargs["max_sequence_length"] = min(512, pipe.tokenizer_2.model_max_length)
    return kwargs


def flux_true_cfg(guidance_embeds: bool, request: ImageRequest) -> bool:
    """Whether a Flux request runs true classifier-free guidance: only without guidance embedding (dev's
    guidance scale is distilled into the model), with a negative prompt and a scale > 1, as FluxPipeline
    decides it."""
    return not guidance_embeds and bool(request.negative_prompt) and request.guidance_enabled


class _GuidancePair:
    """Stands in for FluxPipeline's transformer while it runs true CFG.

    The pipeline calls the transformer twice per step, conditional then unconditional, on the same
    latents. Here the conditional call returns a NaN placeholder and the unconditional one runs both as
    one batch [unconditional, conditional] (the layout of the other pipelines' CFG batch), then fills the
    placeholder in place: the pipeline reads the conditional prediction only after the second call. So
    the denoiser sees one call per step, which cfg=2 splits over its ranks and patch / sp count as one step.
    """

    _BATCHED = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance")

    def __init__(self, denoiser: torch.nn.Module):
        self.denoiser = denoiser
        self.pending: tuple[dict, torch.Tensor] | None = None

    def __getattr__(self, name: str):
        return getattr(self.denoiser, name)  # config, dtype, cache_context, ... of the real transformer

    def __call__(self, *args, **kwargs):
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        if args or kwargs.get("joint_attention_kwargs"):
            raise NotImplementedError("batched true CFG: FluxPipeline's keyword call without attention kwargs")
        wrap = (lambda t: Transformer2DModelOutput(sample=t)) if kwargs.get("return_dict", True) else (lambda t: (t,))
        latents = kwargs["hidden_states"]
        if self.pending is None:
            shape = (*latents.shape[:-1], self.denoiser.proj_out.out_features)
            placeholder = latents.new_full(shape, float("nan"))
            self.pending = (kwargs, placeholder)
            return wrap(placeholder)
        cond, placeholder = self.pending
        self.pending = None
        if cond["hidden_states"] is not latents or not torch.equal(cond["txt_ids"], kwargs["txt_ids"]):
            raise RuntimeError("batched true CFG: the two calls of a step differ in latents or text ids")
        batched = dict(kwargs)
        for key in self._BATCHED:
            if kwargs.get(key) is not None:
                batched[key] = torch.cat([kwargs[key], cond[key]])
        out = self.denoiser(**batched)
        sample = out[0] if isinstance(out, tuple) else out.sample
        uncond_rows = latents.shape[0]
        placeholder.copy_(sample[uncond_rows:])
        return wrap(sample[:uncond_rows])


@contextmanager
def guidance_batch(pipe, kwargs: dict):
    """Around ``pipe(**kwargs)``: FluxPipeline's true CFG as one denoiser batch per step (:class:`_GuidancePair`);
    any other call unchanged."""
    paired = (type(pipe).__name__ == "FluxPipeline" and kwargs.get("negative_prompt") is not None
              and kwargs.get("true_cfg_scale", 1.0) > 1)
    if not paired:
        yield
        return
    denoiser = pipe.transformer
    pair = pipe.transformer = _GuidancePair(denoiser)
    try:
        yield
    finally:
        pipe.transformer = denoiser
    if pair.pending is not None:
        raise RuntimeError("batched true CFG: a conditional transformer call had no unconditional call after it")


def unpack_latents(pipe, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The pipeline's latent output as (B, C, H, W): Flux's packed (B, tokens, 4C) sequence unpacked as its
    own decode does; other pipelines' latents unchanged."""
    if type(pipe).__name__ == "FluxPipeline" and latents.dim() == 3:
        return pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
    return latents


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor, postprocess: bool = True):
    """Latents -> list of PIL images, as the pipeline would decode them (``postprocess=False``: the
    VAE's output tensor, values in [-1, 1])."""
    vae = pipe.vae
    if latents.dim() == 3:
        raise ValueError("decode_latents: packed Flux latents (B, tokens, C); unpack_latents(pipe, latents, height, "
                         "width) gives the VAE's (B, C, H, W)")
    latents = latents.to(vae.dtype)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    latents = latents / vae.config.scaling_factor + shift
    image = vae.decode(latents, return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="pil") if postprocess else image
