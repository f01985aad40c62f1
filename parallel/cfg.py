"""CFG parallelism: the [unconditional, conditional] guidance batch split over 2 ranks.

Every tensor argument whose leading dimension equals the latent batch is cut to this rank's
half before the denoiser runs; the halves of the output are all-gathered afterwards, so the
pipeline's own guidance arithmetic sees the full batch. Exact.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from distgen.comm import ExchangeEngine
from distgen.parallel._denoiser import get_sample, map_output


def _split_batch(value: Any, batch: int, rank: int, world: int) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return value.chunk(world, dim=0)[rank]
    if isinstance(value, dict):
        return {k: _split_batch(v, batch, rank, world) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and not isinstance(value, torch.Size):
        return type(value)(_split_batch(v, batch, rank, world) for v in value)
    return value


def apply(denoiser: nn.Module, engine: ExchangeEngine) -> None:
    """Hook ``denoiser`` so that each rank of ``engine``'s group runs its share of the batch."""
    rank, world = engine.rank, engine.world

    def split_inputs(module, args, kwargs):
        batch = get_sample(args, kwargs).shape[0]
        if batch % world:
            raise RuntimeError(
                f"cfg={world} needs a guidance batch divisible by {world}, got batch {batch}; "
                "is classifier-free guidance enabled (guidance scale > 1)?"
            )
        return _split_batch(args, batch, rank, world), _split_batch(kwargs, batch, rank, world)

    def gather_output(module, args, kwargs, output):
        return map_output(output, lambda t: torch.cat(engine.all_gather(t), dim=0))

    # prepend: the batch is split before any other strategy (patch) sees the input.
    denoiser.register_forward_pre_hook(split_inputs, with_kwargs=True, prepend=True)
    denoiser.register_forward_hook(gather_output, with_kwargs=True)
