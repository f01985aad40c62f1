"""Sequence parallelism for DiTs (ALGORITHMS.md §5): exact, Ulysses or ring.

``apply(denoiser, engine, mode)`` changes an unmodified diffusers DiT in place so that each
rank of ``engine``'s group carries a contiguous shard of the token sequence through every
block, and only attention looks beyond the shard:

* the token sequence is cut right after the patch embedding, which has already added the
  positions of the *whole* image (PixArt, SD3: output of ``pos_embed``; Wan: the input of
  ``blocks[0]``, and the RoPE tables returned by ``rope`` are cut the same way, so every shard
  rotates with its global positions);
* the self-attention processors are replaced (``attn.set_processor``): projections, norms and
  RoPE run on the local tokens, then
  - ``ulysses``: one all-to-all turns (sequence shard, all heads) into (whole sequence,
    heads/N) for Q, K and V together; plain SDPA; a second all-to-all turns the output back.
    Needs heads divisible by N;
  - ``ring``: this rank's queries stay put; K/V blocks travel around the ring (``exchange``
    P2P to i+1 / from i-1, posted before the block in hand is used, so the transfer overlaps
    the block's attention); each block's partial output is merged with the online-softmax
    (log-sum-exp) rule in fp32. Any degree;
* the sequence is all-gathered after ``proj_out``, before the model's own unpatchify.

Everything else (MLPs, norms, AdaLN modulation, cross-attention to text) acts per token and
runs unchanged on the shard. Shards are balanced and may differ by one token when the
sequence does not divide by the degree: nothing is padded inside attention, so any token
count >= the degree is exact.

SD3's joint text+image attention: **text tokens are replicated**, not sharded. The text is
short (77-333 tokens against thousands of image tokens), its length rarely divides by the
degree, and its per-token work (context MLP, norms) is small, so every rank keeps the whole
text stream and no gather is needed after the last block. Ulysses: each rank attends with its
head slice of the text Q/K/V appended to the image sequence, then all-gathers the text output
over heads. Ring: the text K/V join only the rank's own (first) block, so they count once;
text queries ride along with the local image queries through the whole ring (a redundant
T x S attention per rank, exact).

Flux (double-stream blocks: joint attention like SD3; single-stream blocks: [text, image] as one
sequence): the packed latent tokens and their (row, column) ids are cut in a pre-hook, before
``x_embedder`` and ``pos_embed``, so each shard's RoPE rows are its global positions; text is
replicated as for SD3, and in single-stream blocks the processor splits the first
``text_tokens`` off as text. Under patch parallelism (patch x sp, patch bands outermost) sp shards
this rank's band, and the band's processor (:class:`distgen.parallel.patch.FluxPatchAttnProcessor`)
passes its K/V, extended over the patch axis with the other bands' shards of the same sp rank, to
:meth:`SequenceState.attention` (``kv_bands``). Exact.

All traffic goes through :class:`distgen.comm.ExchangeEngine` (bytes and waits accounted).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from distgen.comm import ExchangeEngine
from distgen.config import SP_MODES, ConfigError
from distgen.parallel._denoiser import flux_attention_output, flux_qkv, get_sample, merge_heads, split_heads

SUPPORTED_DENOISERS = ("PixArtTransformer2DModel", "SD3Transformer2DModel", "WanTransformer3DModel",
                       "FluxTransformer2DModel")


def shard_lengths(tokens: int, world: int) -> list[int]:
    """Balanced contiguous shards: the first ``tokens % world`` ranks hold one token more."""
    base, extra = divmod(tokens, world)
    return [base + (1 if r < extra else 0) for r in range(world)]


def valid_ulysses_degrees(num_heads: int) -> list[int]:
    return [d for d in range(2, num_heads + 1) if num_heads % d == 0]


# ---------------------------------------------------------------------------- validation
def validate(denoiser_class: str, num_heads: int | None, degree: int, mode: str, tokens: int | None = None) -> None:
    """Everything about ``sp`` a user can get wrong, as a ConfigError (call before launching)."""
    if mode not in SP_MODES:
        raise ConfigError(f"--sp-mode: unknown mode {mode!r}; allowed: {', '.join(SP_MODES)}")
    if degree <= 1:
        return
    if denoiser_class not in SUPPORTED_DENOISERS:
        raise ConfigError(
            f"--parallel sp={degree}: sequence parallelism needs a DiT denoiser ({', '.join(SUPPORTED_DENOISERS)}); "
            f"this model's denoiser is {denoiser_class}"
        )
    if mode == "ulysses" and num_heads is not None and num_heads % degree:
        valid = ", ".join(map(str, valid_ulysses_degrees(num_heads))) or "none"
        raise ConfigError(
            f"--parallel sp={degree} --sp-mode ulysses: the denoiser has {num_heads} attention heads, not divisible "
            f"by {degree}; valid ulysses degrees for {num_heads} heads: {valid} (or use --sp-mode ring, any degree)"
        )
    if tokens is not None and tokens < degree:
        raise ConfigError(
            f"--parallel sp={degree}: the latent gives only {tokens} tokens, fewer than the {degree} ranks of the sp "
            f"axis; use at most sp={tokens} or a larger size"
        )


def denoiser_heads(model_dir: str | Path, denoiser_attr: str = "transformer") -> int | None:
    """``num_attention_heads`` from a saved denoiser's config.json (no weights loaded)."""
    path = Path(model_dir) / denoiser_attr / "config.json"
    try:
        heads = json.loads(path.read_text()).get("num_attention_heads")
    except FileNotFoundError:
        raise ConfigError(f"--model: {path} not found") from None
    return int(heads) if heads is not None else None


def validate_image(info, request, parallel, mode: str) -> None:
    """Image path: ``info`` is :class:`distgen.models.diffusion.PipelineInfo`."""
    degree = parallel.degree("sp")
    if mode not in SP_MODES or degree <= 1:
        validate(info.denoiser_class, None, degree, mode)
        return
    bands = parallel.degree("patch")
    if bands > 1 and info.family != "flux":
        raise ConfigError(
            f"--parallel patch={bands},sp={degree}: patch and sp both split the image tokens and compose only on "
            f"Flux (FluxTransformer2DModel, whose attention processors take both); this model's denoiser is "
            f"{info.denoiser_class}: use one of them"
        )
    heads = denoiser_heads(info.path, info.denoiser_attr) if info.denoiser_class in SUPPORTED_DENOISERS else None
    patch = info.band_row_multiple
    tokens = (request.height // info.vae_scale_factor // patch) * (request.width // info.vae_scale_factor // patch)
    validate(info.denoiser_class, heads, degree, mode, tokens // bands)  # patch x sp: sp shards one band


# ---------------------------------------------------------------------------- attention
def _attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SDPA (B, H, Sq, D) plus the log-sum-exp of each query's scores (B, H, Sq), fp32."""
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False)
        return out, lse.float()
    if q.device.type == "cuda":
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False)[:2]
        return out, lse[..., : q.shape[2]].float()  # older kernels pad lse to a multiple of 32
    scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    lse = scores.logsumexp(-1)
    return (torch.softmax(scores, -1) @ v.float()).to(q.dtype), lse


class SequenceState:
    """What every replaced module of one denoiser needs to know about the current call."""

    def __init__(self, engine: ExchangeEngine, mode: str):
        if mode not in SP_MODES:
            raise ValueError(f"sp mode must be one of {', '.join(SP_MODES)}, got {mode!r}")
        self.engine = engine
        self.mode = mode
        self.rank = engine.rank
        self.world = engine.world
        self.lengths: list[int] = []  # tokens per rank for the current denoiser call
        self.text_tokens = 0  # Flux: text tokens ahead of the image in single-stream blocks
        self.replaced: dict[str, int] = {}

    def set_tokens(self, tokens: int) -> None:
        if tokens < self.world:
            raise RuntimeError(f"sp={self.world}: {tokens} tokens cannot be spread over {self.world} ranks")
        self.lengths = shard_lengths(tokens, self.world)

    @property
    def offset(self) -> int:
        return sum(self.lengths[: self.rank])

    def shard(self, t: torch.Tensor, dim: int = 1) -> torch.Tensor:
        total = sum(self.lengths)
        if t.shape[dim] != total:
            raise RuntimeError(f"sp: expected {total} tokens along dim {dim}, got shape {tuple(t.shape)}")
        return t.narrow(dim, self.offset, self.lengths[self.rank])

    def gather(self, t: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """All shards in sequence order; uneven shards travel padded to the longest."""
        longest = max(self.lengths)
        if t.shape[dim] < longest:
            pad = list(t.shape)
            pad[dim] = longest - t.shape[dim]
            t = torch.cat([t, t.new_zeros(pad)], dim=dim)
        parts = self.engine.all_gather(t)
        return torch.cat([p.narrow(dim, 0, n) for p, n in zip(parts, self.lengths)], dim=dim)

    # -- attention over the whole sequence, from this rank's shard of queries, keys, values
    def attention(self, q, k, v, text=None, kv_bands: int = 1):
        """q, k, v: (B, H, S_local, D) image tokens; ``text``: replicated (q, k, v) (B, H, T, D).

        ``kv_bands`` > 1 (patch x sp on Flux): k and v hold this rank's shard of each of ``kv_bands``
        equal bands (its own band's and, from patch parallelism, the other bands'), so they are
        ``kv_bands`` times as long as q on every rank.

        Returns (image output (B, H, S_local, D), text output (B, H, T, D) or None), equal to
        SDPA over [all image tokens, text tokens].
        """
        kv_lengths = [kv_bands * n for n in self.lengths]
        if k.shape[2] != kv_lengths[self.rank]:
            raise RuntimeError(f"sp: {k.shape[2]} keys for {q.shape[2]} queries, expected {kv_lengths[self.rank]}")
        if self.mode == "ulysses":
            return self._ulysses(q, k, v, text, kv_lengths)
        return self._ring(q, k, v, text, kv_lengths)

    def _ulysses(self, q, k, v, text, kv_lengths):
        world, rank, lengths = self.world, self.rank, self.lengths
        batch, heads, local, dim = q.shape
        if heads % world:
            raise RuntimeError(f"sp ulysses: {heads} heads do not divide by the degree {world}")
        h = heads // world
        # Sequence shard -> head shard: block j (heads j*h..) of Q, then of K and V, goes to rank j.
        q_send = q.unflatten(1, (world, h)).movedim(1, 0).reshape(world, -1)  # (N, B*h*S_local*D)
        kv_send = torch.stack([k, v]).unflatten(2, (world, h)).movedim(2, 0).reshape(world, -1)
        q_token, kv_token = batch * h * dim, 2 * batch * h * dim
        recv_counts = [q_token * n + kv_token * m for n, m in zip(lengths, kv_lengths)]
        recv = self.engine.all_to_all(torch.cat([q_send, kv_send], dim=1).reshape(-1),
                                      [q_token * local + kv_token * k.shape[2]] * world, recv_counts)
        q_blocks, kv_blocks = [], []
        for block, n, m in zip(recv.split(recv_counts), lengths, kv_lengths):
            q_block, kv_block = block.split([q_token * n, kv_token * m])
            q_blocks.append(q_block.view(batch, h, n, dim))
            kv_blocks.append(kv_block.view(2, batch, h, m, dim))
        q_all = torch.cat(q_blocks, dim=2)  # (B, h, S, D)
        k_all, v_all = torch.cat(kv_blocks, dim=3).unbind(0)  # (B, h, kv_bands * S, D) each
        if text is not None:
            q_t, k_t, v_t = (t[:, rank * h : (rank + 1) * h] for t in text)
            q_all, k_all, v_all = (torch.cat(p, dim=2) for p in ((q_all, q_t), (k_all, k_t), (v_all, v_t)))
        out = F.scaled_dot_product_attention(q_all, k_all, v_all)
        total = sum(lengths)
        image_out, text_out = out[:, :, :total], out[:, :, total:]
        # Head shard -> sequence shard: rank j gets its tokens of this rank's heads.
        send = torch.cat([part.reshape(-1) for part in image_out.split(lengths, dim=2)])
        per_token = batch * h * dim
        recv = self.engine.all_to_all(send, [per_token * n for n in lengths], [per_token * local] * world)
        image = recv.view(world, batch, h, local, dim).movedim(0, 1).reshape(batch, heads, local, dim)
        if text is None:
            return image, None
        return image, torch.cat(self.engine.all_gather(text_out), dim=1)

    def _ring(self, q, k, v, text, kv_lengths):
        world, rank, engine = self.world, self.rank, self.engine
        local = q.shape[2]
        queries, keys, values = q, k, v
        if text is not None:  # replicated text: its keys count once, in this rank's own block
            queries = torch.cat([q, text[0]], dim=2)
            keys = torch.cat([k, text[1]], dim=2)
            values = torch.cat([v, text[2]], dim=2)
        block = torch.stack([k, v])  # the image K/V that travels, (2, B, H, S_block, D)
        nxt, prev = (rank + 1) % world, (rank - 1) % world
        acc_out = acc_lse = None
        for step in range(world):
            pending = None
            if step < world - 1:
                # Post the transfer of the block in hand before using it: it overlaps the attention.
                incoming = kv_lengths[(rank - step - 1) % world]
                buf = block.new_empty((*block.shape[:3], incoming, block.shape[4]))
                pending = engine.exchange({nxt: block}, {prev: buf})
            if step == 0:
                out, lse = _attention_with_lse(queries, keys, values)
            else:
                out, lse = _attention_with_lse(queries, block[0], block[1])
            out = out.float()
            if acc_out is None:
                acc_out, acc_lse = out, lse
            else:  # online softmax: rescale both partial results to the joint normaliser
                new_lse = torch.logaddexp(acc_lse, lse)
                acc_out = acc_out * (acc_lse - new_lse).exp().unsqueeze(-1) + out * (lse - new_lse).exp().unsqueeze(-1)
                acc_lse = new_lse
            if pending is not None:
                block = pending.wait()[prev]
        acc_out = acc_out.to(q.dtype)
        if text is None:
            return acc_out, None
        return acc_out[:, :, :local], acc_out[:, :, local:]


# ---------------------------------------------------------------------------- processors
class _SelfAttnProcessor:
    """``AttnProcessor2_0`` for the self-attention of a DiT block (PixArt ``attn1``)."""

    def __init__(self, state: SequenceState):
        self.state = state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise NotImplementedError("sequence parallelism: self-attention with a mask or encoder states")
        residual = hidden_states
        query, key, value = split_heads(attn, attn.to_q(hidden_states), attn.to_k(hidden_states),
                                        attn.to_v(hidden_states))
        out, _ = self.state.attention(query, key, value)
        out = merge_heads(out, query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class _JointAttnProcessor:
    """``JointAttnProcessor2_0`` (SD3 / SD3.5) with replicated text tokens."""

    def __init__(self, state: SequenceState):
        self.state = state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        if attention_mask is not None:
            raise NotImplementedError("sequence parallelism: joint attention with a mask")
        batch = hidden_states.shape[0]
        query, key, value = split_heads(attn, attn.to_q(hidden_states), attn.to_k(hidden_states),
                                        attn.to_v(hidden_states))
        head_dim = key.shape[-1]
        text = None
        if encoder_hidden_states is not None:
            text = [
                proj(encoder_hidden_states).view(batch, -1, attn.heads, head_dim).transpose(1, 2)
                for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
            ]
            if attn.norm_added_q is not None:
                text[0] = attn.norm_added_q(text[0])
            if attn.norm_added_k is not None:
                text[1] = attn.norm_added_k(text[1])
        image_out, text_out = self.state.attention(query, key, value, text)
        image_out = merge_heads(image_out, query.dtype)
        image_out = attn.to_out[1](attn.to_out[0](image_out))
        if text_out is None:
            return image_out
        text_out = merge_heads(text_out, query.dtype)
        if not attn.context_pre_only:
            text_out = attn.to_add_out(text_out)
        return image_out, text_out


def _wan_rotary(hidden_states: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    # As WanAttnProcessor applies it (interleaved pairs), on this shard's rows of the table.
    x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(hidden_states)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(hidden_states)


class _WanSelfAttnProcessor:
    """``WanAttnProcessor`` for Wan's self-attention (``attn1``; QK RMSNorm across heads, RoPE)."""

    def __init__(self, state: SequenceState):
        self.state = state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise NotImplementedError("sequence parallelism: Wan self-attention with a mask or encoder states")
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)  # per token, across heads: local is exact
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        if rotary_emb is not None:
            query, key = _wan_rotary(query, *rotary_emb), _wan_rotary(key, *rotary_emb)
        out, _ = self.state.attention(*(t.transpose(1, 2) for t in (query, key, value)))
        out = out.transpose(1, 2).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


class _FluxAttnProcessor:
    """``FluxAttnProcessor`` with replicated text tokens, for both Flux block kinds: double-stream (text
    from ``encoder_hidden_states``) and single-stream, where [text, image shard] is one sequence whose
    first ``state.text_tokens`` are the text. RoPE rotates each token with its global position: the
    shard's image ids were cut before ``pos_embed`` (see :func:`apply`)."""

    def __init__(self, state: SequenceState):
        self.state = state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        if attention_mask is not None:
            raise NotImplementedError("sequence parallelism: Flux attention with a mask")
        image, text = flux_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb, self.state.text_tokens)
        image_out, text_out = self.state.attention(*image, text)
        return flux_attention_output(attn, image_out, text_out, encoder_hidden_states is not None, hidden_states.dtype)


# ---------------------------------------------------------------------------- apply
def _replace_processors(denoiser: nn.Module, state: SequenceState) -> dict[str, int]:
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0, JointAttnProcessor2_0

    family = type(denoiser).__name__
    replacements: list[tuple[nn.Module, object]] = []
    for name, module in denoiser.named_modules():
        if family == "FluxTransformer2DModel":
            from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor

            from distgen.parallel.patch import FluxPatchAttnProcessor

            if not isinstance(module, FluxAttention):
                continue
            if isinstance(module.processor, FluxPatchAttnProcessor):
                # patch x sp: the band's processor exchanges K/V over the patch axis, then attends over this one
                expected, replacement = FluxPatchAttnProcessor, module.processor
                module.processor.sequence = state
            else:
                expected, replacement = FluxAttnProcessor, _FluxAttnProcessor(state)
        elif family == "WanTransformer3DModel":
            from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor

            if not isinstance(module, WanAttention) or module.is_cross_attention:
                continue  # cross-attention: local queries against the replicated text, unchanged
            expected, replacement = WanAttnProcessor, _WanSelfAttnProcessor(state)
        elif isinstance(module, Attention):
            if family == "SD3Transformer2DModel":
                expected, replacement = JointAttnProcessor2_0, _JointAttnProcessor(state)
            elif module.is_cross_attention:
                continue
            else:
                expected, replacement = AttnProcessor2_0, _SelfAttnProcessor(state)
                if module.spatial_norm is not None or module.group_norm is not None:
                    raise NotImplementedError(f"sequence parallelism: {name} has a spatial or group norm")
        else:
            continue
        if type(module.processor) is not expected:
            raise NotImplementedError(
                f"sequence parallelism replaces {expected.__name__}; {name} uses {type(module.processor).__name__}"
            )
        if state.mode == "ulysses" and module.heads % state.world:
            raise ValueError(f"sp={state.world} ulysses: {name} has {module.heads} heads, not divisible by {state.world}")
        replacements.append((module, replacement))
    for module, replacement in replacements:
        if module.processor is not replacement:
            module.set_processor(replacement)
    return {"self_attention": len(replacements)}


def _tokens(denoiser: nn.Module, sample: torch.Tensor) -> int:
    patch = denoiser.config.patch_size
    if isinstance(patch, int):
        patch = (patch,) * 2
    tokens = 1
    for size, p in zip(sample.shape[-len(patch):], patch):
        tokens *= size // p
    return tokens


def _apply_flux_hooks(denoiser: nn.Module, state: SequenceState) -> None:
    def shard_tokens(module, args, kwargs):
        # The packed latent tokens and their (row, column) ids are cut before x_embedder and pos_embed
        # (both per token): each shard embeds its own tokens and RoPE rotates them with global positions.
        if args:
            raise NotImplementedError("sequence parallelism: Flux called with positional arguments")
        if kwargs.get("controlnet_block_samples") is not None or kwargs.get("controlnet_single_block_samples") is not None:
            raise NotImplementedError("sequence parallelism: Flux ControlNet residuals")
        sample, ids = kwargs["hidden_states"], kwargs["img_ids"]
        ids = ids[0] if ids.ndim == 3 else ids  # the deprecated batched ids are the same for every row
        state.set_tokens(sample.shape[1])
        state.text_tokens = kwargs["encoder_hidden_states"].shape[1]
        return args, {**kwargs, "hidden_states": state.shard(sample), "img_ids": state.shard(ids, dim=0)}

    denoiser.register_forward_pre_hook(shard_tokens, with_kwargs=True)
    denoiser.proj_out.register_forward_hook(lambda m, a, out: state.gather(out))


def apply(denoiser: nn.Module, engine: ExchangeEngine, mode: str = "ulysses") -> SequenceState:
    """Make ``denoiser`` (PixArt, SD3, Wan or Flux) run on this rank's shard of its token sequence.

    Flux under patch parallelism (applied first): the shard is of this rank's band (see
    :class:`distgen.parallel.patch.FluxPatchAttnProcessor`)."""

    family = type(denoiser).__name__
    if family not in SUPPORTED_DENOISERS:
        raise NotImplementedError(f"sequence parallelism supports {', '.join(SUPPORTED_DENOISERS)}; got {family}")
    if family != "FluxTransformer2DModel" and getattr(denoiser, "_distgen_patch", None) is not None:
        raise NotImplementedError(f"patch and sp compose only on FluxTransformer2DModel; got {family}")
    state = SequenceState(engine, mode)
    state.replaced = _replace_processors(denoiser, state)
    if family == "FluxTransformer2DModel":
        _apply_flux_hooks(denoiser, state)
        return state

    def plan_call(module, args, kwargs):
        if kwargs.get("block_controlnet_hidden_states") is not None:
            raise NotImplementedError("sequence parallelism: SD3 ControlNet residuals")
        state.set_tokens(_tokens(denoiser, get_sample(args, kwargs)))
        if family == "WanTransformer3DModel":
            # Wan 2.2 TI2V: one timestep per token, cut like the tokens.
            timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
            if timestep is not None and timestep.ndim == 2:
                if "timestep" in kwargs:
                    kwargs = {**kwargs, "timestep": state.shard(timestep)}
                else:
                    args = (args[0], state.shard(timestep), *args[2:])
                return args, kwargs
        return None

    denoiser.register_forward_pre_hook(plan_call, with_kwargs=True)
    if family == "WanTransformer3DModel":
        denoiser.rope.register_forward_hook(lambda m, a, out: tuple(state.shard(t) for t in out))

        def shard_first_block_input(module, args, kwargs):
            if args:
                return (state.shard(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": state.shard(kwargs["hidden_states"])}

        denoiser.blocks[0].register_forward_pre_hook(shard_first_block_input, with_kwargs=True)
    else:
        # PatchEmbed has added the full image's positions: cutting after it keeps them global.
        denoiser.pos_embed.register_forward_hook(lambda m, a, out: state.shard(out))
    # Before the model's own unpatchify, every rank gets the whole sequence back.
    denoiser.proj_out.register_forward_hook(lambda m, a, out: state.gather(out))
    return state
