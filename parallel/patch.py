"""Patch parallelism over latent row bands (ALGORITHMS.md §1 DistriFusion, §2 PCPP).

``apply(denoiser, engine, config)`` changes an unmodified diffusers denoiser in place:

* a forward pre-hook cuts the latent into this rank's band of rows and a forward hook
  all-gathers the output bands, so the pipeline's own sampling loop and scheduler run
  unchanged on every rank (same seed, same full latent);
* module replacement gives each band the context it lacks:
  - ``nn.Conv2d`` with row padding -> :class:`_PatchConv2d` (halo rows from ranks i±1, P2P);
  - ``nn.GroupNorm``               -> :class:`_PatchGroupNorm` (global statistics);
  - self-attention ``to_k``/``to_v`` -> :class:`_PatchKV` (keys/values of the whole image,
    or of the nearest rows of the neighbours in ``partial`` mode). Queries stay local, so
    any attention processor (SD, PixArt, SD3 joint attention) works unchanged;
  - cross-attention ``to_k``/``to_v`` -> :class:`_CachedProjection` (text K/V once per request);
  - DiT ``PatchEmbed``            -> :class:`_BandPatchEmbed` (positions of the band's rows
    in the full image).

Modes: ``sync`` exchanges fresh context every step (exact: the oracle); ``displaced`` and
``partial`` run ``warmup_steps`` synchronous steps, then use one-step-stale context and send
this step's values asynchronously for the next; ``naive`` exchanges nothing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from distgen.comm import ExchangeEngine
from distgen.config import PatchConfig
from distgen.parallel._denoiser import get_sample, map_output, set_sample

SUPPORTED_DENOISERS = ("UNet2DConditionModel", "PixArtTransformer2DModel", "SD3Transformer2DModel")


class PatchState:
    """What every replaced module of one denoiser needs to know about the current call."""

    def __init__(self, engine: ExchangeEngine, config: PatchConfig):
        self.engine = engine
        self.config = config
        self.rank = engine.rank
        self.world = engine.world
        self.call_index = 0  # denoiser calls since the request started
        self.band_start = 0  # first latent row of this rank's band
        self.band_rows = 0
        self.full_rows = 0
        self.cols = 0
        self.caches: list[_CachedProjection] = []

    def new_request(self) -> None:
        self.call_index = 0
        self.engine.reset()
        for cache in self.caches:
            cache.clear()

    @property
    def warmup_calls(self) -> int:
        # At least one synchronous step: stale context must exist before it can be used.
        return max(1, self.config.warmup_steps)

    @property
    def sync_step(self) -> bool:
        return self.config.mode == "sync" or self.call_index < self.warmup_calls

    @property
    def next_step_stale(self) -> bool:
        return self.config.mode in ("displaced", "partial") and self.call_index + 1 >= self.warmup_calls

    def token_rows(self, n_tokens: int) -> int:
        """Rows of this band at the resolution of a layer holding ``n_tokens`` tokens."""
        rows = round(math.sqrt(n_tokens * self.band_rows / self.cols))
        if rows < 1 or n_tokens % rows:
            raise RuntimeError(f"cannot map {n_tokens} tokens onto a band of {self.band_rows}x{self.cols} latent pixels")
        return rows


class _PatchConv2d(nn.Module):
    """Conv with halo rows from the neighbouring bands (fresh in sync steps, stale after)."""

    def __init__(self, conv: nn.Conv2d, state: PatchState, name: str):
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise NotImplementedError(f"patch parallelism supports zero-padded convs with integer padding ({name})")
        self.conv = conv
        self.state = state
        self.name = name
        self.halo_rows = conv.padding[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state, engine, pad = self.state, self.state.engine, self.halo_rows
        to_prev, to_next = x[:, :, :pad], x[:, :, -pad:]
        if state.sync_step:
            engine.post_halo(self.name, to_prev, to_next)
        from_prev, from_next = engine.halo(self.name)  # stale steps: posted at the previous step
        # The image border keeps the conv's own zero padding.
        top = from_prev if from_prev is not None else torch.zeros_like(to_prev)
        bottom = from_next if from_next is not None else torch.zeros_like(to_next)
        extended = torch.cat([top, x, bottom], dim=2)  # copies the halo out of the receive buffers
        if not state.sync_step:
            engine.post_halo(self.name, to_prev, to_next)  # this step's rows, used at the next
        conv = self.conv
        return F.conv2d(extended, conv.weight, conv.bias, conv.stride, (0, conv.padding[1]), conv.dilation, conv.groups)


class _PatchGroupNorm(nn.Module):
    """GroupNorm with statistics of the whole image.

    Sync: local (E[x], E[x²]) all-gathered and averaged every step. Stale (DistriFusion's
    corrected async GroupNorm): mean of the stale statistics of all bands, corrected by this
    band's fresh-minus-stale difference; where the variance estimate is negative, fall back
    to local statistics.
    """

    def __init__(self, norm: nn.GroupNorm, state: PatchState, name: str):
        super().__init__()
        self.norm = norm
        self.state = state
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state, engine, norm = self.state, self.state.engine, self.norm
        batch, groups = x.shape[0], norm.num_groups
        xf = x.float().reshape(batch, groups, -1)
        local = torch.stack([xf.mean(-1), xf.square().mean(-1)], dim=-1)  # (B, G, 2)
        if state.sync_step:
            stats = torch.stack(engine.gather_now(self.name, local)).mean(0)
        else:
            stale = torch.stack(engine.stale(self.name))
            stats = stale.mean(0) + (local - stale[state.rank])
            engine.enqueue(self.name, local)
        mean, var = stats[..., 0], stats[..., 1] - stats[..., 0].square()
        negative = var < 0
        if negative.any():
            local_var = local[..., 1] - local[..., 0].square()
            mean = torch.where(negative, local[..., 0], mean)
            var = torch.where(negative, local_var, var)
        out = (xf - mean.unsqueeze(-1)) * torch.rsqrt(var.clamp_min(0).unsqueeze(-1) + norm.eps)
        out = out.reshape(x.shape)
        if norm.affine:
            shape = (1, -1) + (1,) * (x.dim() - 2)
            out = out * norm.weight.float().reshape(shape) + norm.bias.float().reshape(shape)
        return out.to(x.dtype)


class _PatchKV(nn.Module):
    """Self-attention key or value projection returning keys/values beyond the band.

    The wrapped ``Linear`` runs on the band's tokens only; the result is extended with the
    other bands' tokens (all of them, or in ``partial`` mode the nearest rows of the two
    neighbours), so the attention processor computes band queries against image keys.
    """

    def __init__(self, proj: nn.Module, state: PatchState, name: str):
        super().__init__()
        self.proj = proj
        self.state = state
        self.name = name

    def _partial_rows(self, fresh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.state.token_rows(fresh.shape[1])
        per_row = fresh.shape[1] // rows
        used = max(1, math.ceil(self.state.config.pcpp_fraction * rows)) * per_row
        return fresh[:, :used], fresh[:, -used:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state, engine = self.state, self.state.engine
        fresh = self.proj(x)
        if state.sync_step:
            full = torch.cat(engine.gather_now(self.name, fresh), dim=1)
            if state.config.mode == "partial" and state.next_step_stale:
                engine.post_halo(self.name, *self._partial_rows(fresh))
            return full
        if state.config.mode == "partial":
            from_prev, from_next = engine.halo(self.name)
            parts = [p for p in (from_prev, fresh, from_next) if p is not None]
            full = torch.cat(parts, dim=1)
            engine.post_halo(self.name, *self._partial_rows(fresh))
            return full
        parts = list(engine.stale(self.name))
        parts[state.rank] = fresh
        full = torch.cat(parts, dim=1)
        engine.enqueue(self.name, fresh)
        return full


class _CachedProjection(nn.Module):
    """Cross-attention K/V: the text states are the same tensor every step of a request."""

    def __init__(self, proj: nn.Module):
        super().__init__()
        self.proj = proj
        self._key = None
        self._value = None

    def clear(self) -> None:
        self._key = self._value = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.data_ptr(), tuple(x.shape), x.stride(), x._version, x.dtype)
        if key != self._key:
            self._key, self._value = key, self.proj(x)
        return self._value


class _BandPatchEmbed(nn.Module):
    """DiT patch embedding that adds the positions of the band's rows in the full image."""

    def __init__(self, embed: nn.Module, state: PatchState):
        super().__init__()
        self.embed = embed
        self.state = state
        self._pos_key = None
        self._pos = None

    def _full_positions(self, full_rows: int, cols: int, device: torch.device) -> torch.Tensor:
        from diffusers.models.embeddings import get_2d_sincos_pos_embed

        embed = self.embed
        key = (full_rows, cols, device)
        if key != self._pos_key:
            if embed.pos_embed_max_size:
                pos = embed.cropped_pos_embed(full_rows, cols)
            else:
                grid = (full_rows // embed.patch_size, cols // embed.patch_size)
                if (embed.height, embed.width) != grid:
                    pos = get_2d_sincos_pos_embed(
                        embed_dim=embed.pos_embed.shape[-1],
                        grid_size=grid,
                        base_size=embed.base_size,
                        interpolation_scale=embed.interpolation_scale,
                        device=device,
                        output_type="pt",
                    ).float().unsqueeze(0)
                else:
                    pos = embed.pos_embed
            self._pos_key, self._pos = key, pos
        return self._pos

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        embed, state = self.embed, self.state
        tokens = embed.proj(latent)
        if embed.flatten:
            tokens = tokens.flatten(2).transpose(1, 2)
        if embed.layer_norm:
            tokens = embed.norm(tokens)
        if embed.pos_embed is None:
            return tokens
        p = embed.patch_size
        pos = self._full_positions(state.full_rows, latent.shape[-1], latent.device)
        per_row = latent.shape[-1] // p
        first = state.band_start // p
        band = pos[:, first * per_row : (first + latent.shape[-2] // p) * per_row]
        return (tokens + band).to(tokens.dtype)


def _replace_modules(denoiser: nn.Module, state: PatchState) -> dict[str, int]:
    from diffusers.models.attention_processor import Attention
    from diffusers.models.embeddings import PatchEmbed

    exchange = state.config.mode != "naive"
    replacements: list[tuple[nn.Module, str, nn.Module]] = []
    counts = {"conv": 0, "group_norm": 0, "self_attention": 0, "cross_attention": 0, "patch_embed": 0}
    for path, module in denoiser.named_modules():
        for child_name, child in module.named_children():
            name = f"{path}.{child_name}" if path else child_name
            if isinstance(child, PatchEmbed) and child.flatten:
                replacements.append((module, child_name, _BandPatchEmbed(child, state)))
                counts["patch_embed"] += 1
            elif exchange and isinstance(child, nn.Conv2d) and child.padding[0] > 0 and "pos_embed" not in path:
                replacements.append((module, child_name, _PatchConv2d(child, state, name)))
                counts["conv"] += 1
            elif exchange and isinstance(child, nn.GroupNorm):
                replacements.append((module, child_name, _PatchGroupNorm(child, state, name)))
                counts["group_norm"] += 1
            elif isinstance(child, Attention):
                if child.is_cross_attention:
                    for proj in ("to_k", "to_v"):
                        cache = _CachedProjection(getattr(child, proj))
                        state.caches.append(cache)
                        replacements.append((child, proj, cache))
                    counts["cross_attention"] += 1
                elif exchange:
                    for proj in ("to_k", "to_v"):
                        replacements.append((child, proj, _PatchKV(getattr(child, proj), state, f"{name}.{proj}")))
                    counts["self_attention"] += 1
    for parent, child_name, replacement in replacements:
        setattr(parent, child_name, replacement)
    return counts


def apply(denoiser: nn.Module, engine: ExchangeEngine, config: PatchConfig) -> PatchState:
    """Make ``denoiser`` run on this rank's band of latent rows; returns the shared state.

    Call ``state.new_request()`` before each pipeline call.
    """
    family = type(denoiser).__name__
    if family not in SUPPORTED_DENOISERS:
        raise NotImplementedError(f"patch parallelism supports {', '.join(SUPPORTED_DENOISERS)}; got {family}")
    state = PatchState(engine, config)
    state.replaced = _replace_modules(denoiser, state)

    def take_band(module, args, kwargs):
        sample = get_sample(args, kwargs)
        rows = sample.shape[-2]
        if rows % state.world:
            raise RuntimeError(f"patch={state.world}: latent height {rows} is not divisible by the patch degree")
        state.full_rows, state.cols = rows, sample.shape[-1]
        state.band_rows = rows // state.world
        state.band_start = state.rank * state.band_rows
        band = sample[..., state.band_start : state.band_start + state.band_rows, :]
        return set_sample(args, kwargs, band)

    def gather_bands(module, args, kwargs, output):
        out = map_output(output, lambda t: torch.cat(engine.all_gather(t), dim=-2))
        state.call_index += 1
        return out

    denoiser.register_forward_pre_hook(take_band, with_kwargs=True)
    denoiser.register_forward_hook(gather_bands, with_kwargs=True)
    return state
