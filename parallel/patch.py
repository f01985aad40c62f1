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
    in the full image);
  - Flux: the band is a range of rows of the packed (B, tokens, C) sequence, cut with its global
    image ids (RoPE positions); ``FluxAttention`` processors -> :class:`FluxPatchAttnProcessor`
    (K/V rotated on each band's rank, then exchanged like ``_PatchKV``'s; text replicated).
    With an sp axis too, each band is sequence-sharded within its sp group (see there).

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
from distgen.parallel._denoiser import (
    flux_attention_output,
    flux_qkv,
    get_sample,
    joint_attention,
    map_output,
    set_sample,
)

SUPPORTED_DENOISERS = ("UNet2DConditionModel", "PixArtTransformer2DModel", "SD3Transformer2DModel",
                       "FluxTransformer2DModel")


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
        self.text_tokens = 0  # Flux: text tokens ahead of the image in single-stream blocks
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

    def set_band(self, rows: int, cols: int, what: str) -> slice:
        """This rank's band of an image of ``rows`` x ``cols`` latent pixels (``what`` names the
        option in the error); returns the band's row slice."""
        if rows % self.world:
            raise RuntimeError(f"{what}: latent height {rows} is not divisible by {self.world}")
        self.full_rows, self.cols = rows, cols
        self.band_rows = rows // self.world
        self.band_start = self.rank * self.band_rows
        return slice(self.band_start, self.band_start + self.band_rows)

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
        conv = self.conv
        # "Same" convs (stride 1, kernel 2 x pad + 1): convolve the band with zero row padding, then
        # recompute its first and last ``pad`` rows from thin strips holding the halo. Concatenating
        # the halo onto the band instead would copy the whole band at every conv: one more
        # band-sized tensor alive at each conv, which is what a high-resolution VAE decode is short of.
        thin = (conv.stride[0] == 1 and conv.dilation[0] == 1 and conv.kernel_size[0] == 2 * pad + 1
                and x.shape[2] >= 2 * pad)
        # The image border keeps the conv's own zero padding. Both paths copy the halo out of the
        # receive buffers before this step's rows are posted.
        if thin:
            top = None if from_prev is None else torch.cat([from_prev, x[:, :, : 2 * pad]], dim=2)
            bottom = None if from_next is None else torch.cat([x[:, :, -2 * pad :], from_next], dim=2)
        else:
            top = from_prev if from_prev is not None else torch.zeros_like(to_prev)
            bottom = from_next if from_next is not None else torch.zeros_like(to_next)
            extended = torch.cat([top, x, bottom], dim=2)
        if not state.sync_step:
            engine.post_halo(self.name, to_prev, to_next)  # this step's rows, used at the next
        if not thin:
            return F.conv2d(extended, conv.weight, conv.bias, conv.stride, (0, conv.padding[1]), conv.dilation,
                            conv.groups)
        edge = lambda strip: F.conv2d(strip, conv.weight, conv.bias, 1, (0, conv.padding[1]), 1, conv.groups)  # noqa: E731
        out = F.conv2d(x, conv.weight, conv.bias, 1, (pad, conv.padding[1]), 1, conv.groups)
        if top is not None:
            out[:, :, :pad] = edge(top)
        if bottom is not None:
            out[:, :, -pad:] = edge(bottom)
        return out


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
        # (E[x], E[x^2]) per group without a band-sized temporary (xf.square() would be one)
        var, mean = torch.var_mean(xf, dim=-1, correction=0)
        local = torch.stack([mean, var + mean.square()], dim=-1)  # (B, G, 2)
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
        # One band-sized result, then in place (the activations are what a large decode is short of).
        out = xf - mean.unsqueeze(-1)
        out.mul_(torch.rsqrt(var.clamp_min(0).unsqueeze(-1) + norm.eps))
        out = out.reshape(x.shape)
        if norm.affine:
            shape = (1, -1) + (1,) * (x.dim() - 2)
            out.mul_(norm.weight.float().reshape(shape)).add_(norm.bias.float().reshape(shape))
        return out.to(x.dtype)


def _partial_rows(state: PatchState, fresh: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first and last rows of the band's tokens that partial mode sends to the neighbours."""
    tokens = fresh.shape[dim]
    rows = state.token_rows(tokens)
    used = max(1, math.ceil(state.config.pcpp_fraction * rows)) * (tokens // rows)
    return fresh.narrow(dim, 0, used), fresh.narrow(dim, tokens - used, used)


def _beyond_band(state: PatchState, name: str, fresh: torch.Tensor, dim: int) -> torch.Tensor:
    """This band's keys or values (tokens along ``dim``) extended with the other bands': all of them,
    fresh in sync steps and one step stale after; in ``partial`` mode the nearest rows of the two
    neighbours (stale)."""
    engine = state.engine
    if state.sync_step:
        full = torch.cat(engine.gather_now(name, fresh), dim=dim)
        if state.config.mode == "partial" and state.next_step_stale:
            engine.post_halo(name, *_partial_rows(state, fresh, dim))
        return full
    if state.config.mode == "partial":
        from_prev, from_next = engine.halo(name)
        full = torch.cat([p for p in (from_prev, fresh, from_next) if p is not None], dim=dim)
        engine.post_halo(name, *_partial_rows(state, fresh, dim))
        return full
    parts = list(engine.stale(name))
    parts[state.rank] = fresh
    full = torch.cat(parts, dim=dim)
    engine.enqueue(name, fresh)
    return full


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _beyond_band(self.state, self.name, self.proj(x), dim=1)


class FluxPatchAttnProcessor:
    """``FluxAttnProcessor`` on a band, for both Flux block kinds.

    Flux rotates K with RoPE inside its processor, so keys cannot be extended at the projection as
    :class:`_PatchKV` does: here the band's Q/K/V are computed and rotated with the band's rows of
    the rotary table (its global image ids, cut by :func:`apply`), then K/V are extended with the
    other bands' rotated K/V through the same exchange (sync / displaced / partial). The text tokens
    (double-stream: ``encoder_hidden_states``; single-stream: the first ``state.text_tokens``) are
    replicated on every rank, their K/V local. ``sequence``: set by sp (patch x sp): the band's
    tokens are sharded over the sp axis, the exchanged K/V are this sp rank's shard of each band, and
    attention runs over the sp group.
    """

    def __init__(self, state: PatchState, name: str):
        self.state = state
        self.name = name
        self.sequence = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if attention_mask is not None:
            raise NotImplementedError("patch parallelism: Flux attention with a mask")
        state = self.state
        (query, key, value), text = flux_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb,
                                             state.text_tokens)
        key = _beyond_band(state, f"{self.name}.k", key, dim=2)
        value = _beyond_band(state, f"{self.name}.v", value, dim=2)
        if self.sequence is None:
            image_out, text_out = joint_attention(query, key, value, text)
        else:
            image_out, text_out = self.sequence.attention(query, key, value, text, kv_bands=state.world)
        return flux_attention_output(attn, image_out, text_out, encoder_hidden_states is not None, hidden_states.dtype)


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
    from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor

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
            elif isinstance(child, FluxAttention):
                if exchange:  # naive: the stock processor on the band alone
                    if type(child.processor) is not FluxAttnProcessor:
                        raise NotImplementedError(f"patch parallelism replaces FluxAttnProcessor; {name} uses "
                                                  f"{type(child.processor).__name__}")
                    child.set_processor(FluxPatchAttnProcessor(state, name))
                    counts["self_attention"] += 1
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
    denoiser._distgen_patch = state  # sp checks it: only Flux composes patch and sp

    def take_flux_band(module, args, kwargs):
        # Flux's sample is the packed (B, tokens, C) sequence in row-major order of its (row, column)
        # ids: a band is a contiguous range of packed token rows, with its global ids (RoPE positions).
        if args:
            raise NotImplementedError("patch parallelism: Flux called with positional arguments")
        sample, ids = kwargs["hidden_states"], kwargs["img_ids"]
        ids = ids[0] if ids.ndim == 3 else ids  # the deprecated batched ids are the same for every row
        rows, cols = int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
        grid = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1).reshape(-1, 2)
        if sample.shape[1] != rows * cols or not torch.equal(ids[:, 1:].cpu(), grid.to(ids.dtype)):
            raise NotImplementedError("patch parallelism: Flux image ids must be the pipeline's row-major grid")
        rows_of_band = state.set_band(rows, cols, f"patch={state.world} (rows of packed latent tokens)")
        state.text_tokens = kwargs["encoder_hidden_states"].shape[1]
        band = slice(rows_of_band.start * cols, rows_of_band.stop * cols)
        return args, {**kwargs, "hidden_states": sample[:, band], "img_ids": ids[band]}

    def take_band(module, args, kwargs):
        sample = get_sample(args, kwargs)
        band = state.set_band(sample.shape[-2], sample.shape[-1], f"patch={state.world}")
        return set_sample(args, kwargs, sample[..., band, :])

    def gather_bands(module, args, kwargs, output):
        out = map_output(output, lambda t: torch.cat(engine.all_gather(t), dim=-2))
        state.call_index += 1
        return out

    flux = family == "FluxTransformer2DModel"
    denoiser.register_forward_pre_hook(take_flux_band if flux else take_band, with_kwargs=True)
    # Output bands: latent rows (dim -2 of (B, C, H, W)) or Flux's token rows (dim -2 of (B, tokens, C)).
    denoiser.register_forward_hook(gather_bands, with_kwargs=True)
    return state
