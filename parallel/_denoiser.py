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
    return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1).to(dtype)
