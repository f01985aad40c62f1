"""Small helpers shared by strategies that hook a diffusers denoiser's forward."""

from __future__ import annotations

from typing import Any, Callable

import torch

# diffusers denoisers take the latent as the first positional argument or under one of these names.
_SAMPLE_KWARGS = ("sample", "hidden_states")


def get_sample(args: tuple, kwargs: dict) -> torch.Tensor:
    if args:
        return args[0]
    for key in _SAMPLE_KWARGS:
        if key in kwargs:
            return kwargs[key]
    raise TypeError("denoiser called without a latent (first positional argument, 'sample' or 'hidden_states')")


def set_sample(args: tuple, kwargs: dict, sample: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (sample,) + tuple(args[1:]), kwargs
    kwargs = dict(kwargs)
    for key in _SAMPLE_KWARGS:
        if key in kwargs:
            kwargs[key] = sample
            return args, kwargs
    raise TypeError("denoiser called without a latent")


def map_output(output: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to the sample a denoiser returned (tuple or ``*Output`` dataclass)."""
    if isinstance(output, torch.Tensor):
        return fn(output)
    if isinstance(output, tuple):
        return (fn(output[0]),) + tuple(output[1:])
    if hasattr(output, "sample"):
        output.sample = fn(output.sample)
        return output
    raise TypeError(f"unsupported denoiser output type {type(output).__name__}")


def split_heads(attn, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
    """(batch, tokens, heads*dim) projections of a diffusers ``Attention`` -> (batch, heads, tokens, dim),
    with the block's own q/k norms applied, as its stock processors do."""
    batch, head_dim = query.shape[0], key.shape[-1] // attn.heads
    query, key, value = (t.reshape(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, key, value


def merge_heads(out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(batch, heads, tokens, dim) attention output -> (batch, tokens, heads*dim) in ``dtype``."""
    # explicit width: a zero-token output (PipeFusion's patches without text) reshapes too
    return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], out.shape[1] * out.shape[3]).to(dtype)


# ------------------------------------------------------------------ Flux attention (patch and sp share it)
def flux_qkv(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None, rotary, text_tokens: int):
    """Q/K/V of a ``FluxAttention`` as ``FluxAttnProcessor`` computes them (per-head RMS norms, then RoPE
    on [text, image] with the rows of ``rotary``), split into image and text, each (batch, heads, tokens, dim).

    Double-stream blocks: image from ``hidden_states``, text from ``encoder_hidden_states`` (the added
    projections). Single-stream blocks: ``hidden_states`` is [text, image], its first ``text_tokens`` text.
    """
    from diffusers.models.embeddings import apply_rotary_emb

    if getattr(attn, "fused_projections", False):
        raise NotImplementedError("Flux attention with fused QKV projections")
    query, key, value = (p(hidden_states).unflatten(-1, (-1, attn.head_dim)) for p in (attn.to_q, attn.to_k, attn.to_v))
    query, key = attn.norm_q(query), attn.norm_k(key)
    if encoder_hidden_states is not None:
        text_q, text_k, text_v = (p(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim))
                                  for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        text_q, text_k = attn.norm_added_q(text_q), attn.norm_added_k(text_k)
        query, key, value = (torch.cat(p, dim=1) for p in ((text_q, query), (text_k, key), (text_v, value)))
        text_tokens = encoder_hidden_states.shape[1]
    if rotary is not None:
        query = apply_rotary_emb(query, rotary, sequence_dim=1)
        key = apply_rotary_emb(key, rotary, sequence_dim=1)
    query, key, value = (t.transpose(1, 2) for t in (query, key, value))
    image = tuple(t[:, :, text_tokens:] for t in (query, key, value))
    text = tuple(t[:, :, :text_tokens] for t in (query, key, value))
    return image, text


def joint_attention(q, k, v, text):
    """SDPA of [text, image] queries against [text, image] keys (the keys may reach beyond the queries);
    returns (image output, text output), (batch, heads, tokens, dim)."""
    n = text[0].shape[2]
    out = torch.nn.functional.scaled_dot_product_attention(
        *(torch.cat(p, dim=2) for p in ((text[0], q), (text[1], k), (text[2], v)))
    )
    return out[:, :, n:], out[:, :, :n]


def flux_attention_output(attn, image_out: torch.Tensor, text_out: torch.Tensor, joint: bool, dtype: torch.dtype):
    """What ``FluxAttnProcessor`` returns for those attention outputs: double-stream (``joint``) blocks
    project each stream; single-stream blocks take [text, image] unprojected."""
    image, text = merge_heads(image_out, dtype), merge_heads(text_out, dtype)
    if joint:
        return attn.to_out[1](attn.to_out[0](image)), attn.to_add_out(text)
    return torch.cat([text, image], dim=1)
