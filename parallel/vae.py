"""Parallel VAE decode over the patch ranks (ALGORITHMS.md §1b, xDiT's DistVAE), exact.

``apply(vae, engine)`` changes an unmodified diffusers ``AutoencoderKL`` in place so that each
rank of ``engine``'s group decodes one band of latent rows, and the decoded bands are
gathered into the image that ``vae.decode`` returns on the group's rank 0:

* a forward pre-hook on ``vae.decoder`` cuts the latent into this rank's band; a forward hook
  gathers the decoded pixel bands at group rank 0 (the decoder upsamples rows and columns
  alike, so band ``i`` of the latent decodes to band ``i`` of the image). The other ranks'
  ``vae.decode`` returns their own band: only one rank writes the image, and no other rank
  then holds it whole;
* the decoder's modules are replaced by the same band modules patch parallelism uses
  (``distgen.parallel.patch``) in ``sync`` mode, so the result equals one rank's decode:
  - every padded ``Conv2d`` gets its halo rows from ranks i±1 **per conv**, just before it runs.
    The alternative, fetching the whole receptive field once, does not exist here: the
    mid-block's self-attention sees the whole latent, so every row depends on every other;
    and even without it, the decoder's ~20 stacked 3x3 convs and 2x upsamplings would need
    a halo of tens of latent rows, i.e. most of a band at 2-4 ranks. Per-conv halos move one
    or two rows per conv and keep the activation memory at 1/N;
  - ``GroupNorm``: statistics of the whole image, merged across ranks (an all-gather of
    (mean, mean of squares) per group: 2 x groups floats);
  - the mid-block self-attention: queries of the band against keys/values all-gathered at
    the lowest resolution (small: the latent's own size x channels);
  - nearest-neighbour upsampling and 1x1 convs act per pixel and stay as they are.

Peak activation memory per rank falls by about N (the full image is assembled only at the
end, 3 channels, on one rank). Every rank of the group must call ``vae.decode`` with the same
latents. Give ``apply`` an engine without shared memory (``ctx.engine(group, stats,
shared_memory=False)``): the shared-memory transport keeps its all-gather regions for reuse,
which suits exchanges repeated every step, but a decode runs once per image, so they would hold
the K/V of the largest decode for nothing, at the sizes where the decode's memory matters.
"""

from __future__ import annotations

import torch
from torch import nn

from distgen.comm import ExchangeEngine
from distgen.config import PatchConfig
from distgen.parallel import patch as patch_parallel
from distgen.parallel._denoiser import get_sample, set_sample

SUPPORTED_VAES = ("AutoencoderKL",)


class VaeDecodeState(patch_parallel.PatchState):
    """The band of the decode in flight (latent rows) and what was replaced."""

    def __init__(self, engine: ExchangeEngine):
        super().__init__(engine, PatchConfig(mode="sync"))


class _GatheredKV(nn.Module):
    """Self-attention key or value of the whole latent: the band's projection, all-gathered.

    Not patch's slot-based exchange: those buffers persist for stale reuse across steps, and a
    decode runs once, so the gathered K/V is freed as soon as the attention is done.
    """

    def __init__(self, proj: nn.Module, state: VaeDecodeState):
        super().__init__()
        self.proj = proj
        self.state = state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.state.engine.all_gather(self.proj(x)), dim=1)  # (batch, tokens, channels)


def _replace_modules(decoder: nn.Module, state: VaeDecodeState) -> dict[str, int]:
    from diffusers.models.attention_processor import Attention

    replacements: list[tuple[nn.Module, str, nn.Module]] = []
    counts = {"conv": 0, "group_norm": 0, "self_attention": 0}
    for path, module in decoder.named_modules():
        for child_name, child in module.named_children():
            name = f"vae.{path}.{child_name}" if path else f"vae.{child_name}"
            if isinstance(child, nn.Conv2d) and child.padding[0] > 0:
                replacements.append((module, child_name, patch_parallel._PatchConv2d(child, state, name)))
                counts["conv"] += 1
            elif isinstance(child, nn.GroupNorm):
                replacements.append((module, child_name, patch_parallel._PatchGroupNorm(child, state, name)))
                counts["group_norm"] += 1
            elif isinstance(child, Attention):
                for proj in ("to_k", "to_v"):
                    replacements.append((child, proj, _GatheredKV(getattr(child, proj), state)))
                counts["self_attention"] += 1
    for parent, child_name, replacement in replacements:
        setattr(parent, child_name, replacement)
    return counts


def apply(vae: nn.Module, engine: ExchangeEngine) -> VaeDecodeState:
    """Make ``vae.decode`` run on this rank's band of latent rows (a collective over ``engine``'s group)."""
    family = type(vae).__name__
    if family not in SUPPORTED_VAES:
        raise NotImplementedError(f"parallel VAE decode supports {', '.join(SUPPORTED_VAES)}; got {family}")
    state = VaeDecodeState(engine)
    state.replaced = _replace_modules(vae.decoder, state)

    def take_band(module, args, kwargs):
        latent = get_sample(args, kwargs)
        state.engine.reset()  # every decode starts with empty exchange buffers
        band = state.set_band(latent.shape[-2], latent.shape[-1], f"--vae-parallel over {state.world} ranks")
        return set_sample(args, kwargs, latent[..., band, :])

    def gather_bands(module, args, kwargs, output):
        bands = engine.gather(output, dst=0)
        return output if bands is None else torch.cat(bands, dim=-2)

    vae.decoder.register_forward_pre_hook(take_band, with_kwargs=True)
    vae.decoder.register_forward_hook(gather_bands, with_kwargs=True)
    return state
