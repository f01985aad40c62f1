"""CFG parallelism: the [unconditional, conditional] guidance batch split over 2 ranks.

Every tensor argument whose leading dimension equals the latent batch is cut to this rank's
half before the denoiser runs; the halves of the output are all-gathered afterwards, so the
pipeline's own guidance arithmetic sees the full batch. Exact.

Flux: FluxPipeline runs true CFG as two transformer calls per step; the adapter batches them
into one [unconditional, conditional] call (``distgen.models.diffusion.guidance_batch``), which
is split here like any other. Guidance-distilled checkpoints (dev, ``guidance_embeds``) make one
call per step with the scale as an input: nothing to split (:func:`validate_image`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from distgen.comm import ExchangeEngine
from distgen.config import ConfigError
from distgen.parallel._denoiser import get_sample, map_output

# Per-token arguments whose leading dimension is not the batch (Flux's position ids).
_UNBATCHED_KWARGS = ("img_ids", "txt_ids")


def validate_model(info, parallel) -> None:
    """cfg=2 against the checkpoint alone (``info``: :class:`distgen.models.diffusion.PipelineInfo`)."""
    degree = parallel.degree("cfg")
    if degree > 1 and info.family == "flux" and info.guidance_embeds:
        raise ConfigError(
            f"--parallel cfg={degree}: this Flux checkpoint uses guidance embedding ({info.denoiser_attr}/config.json "
            "guidance_embeds: true, as FLUX.1-dev): --guidance-scale is an input of the transformer (distilled "
            "guidance), each step is one transformer call and there is no classifier-free guidance batch to split; "
            "use --parallel patch=N or sp=N instead, or cfg=2 with a checkpoint without guidance embedding "
            "(FLUX.1-schnell's layout) and a --negative-prompt"
        )


def validate_image(info, request, parallel) -> None:
    """cfg=2 for one request: the checkpoint, and Flux's true CFG being on."""
    from distgen.models.diffusion import flux_true_cfg

    validate_model(info, parallel)
    degree = parallel.degree("cfg")
    if degree > 1 and info.family == "flux" and not flux_true_cfg(info.guidance_embeds, request):
        raise ConfigError(
            f"--parallel cfg={degree}: Flux runs true classifier-free guidance only with a --negative-prompt and a "
            f"--guidance-scale > 1 (got negative prompt {request.negative_prompt!r}, scale {request.guidance_scale}); "
            "give both, or use cfg=1"
        )


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
        kwargs = {k: v if k in _UNBATCHED_KWARGS else _split_batch(v, batch, rank, world) for k, v in kwargs.items()}
        return _split_batch(args, batch, rank, world), kwargs

    def gather_output(module, args, kwargs, output):
        return map_output(output, lambda t: torch.cat(engine.all_gather(t), dim=0))

    # prepend: the batch is split before any other strategy (patch) sees the input.
    denoiser.register_forward_pre_hook(split_inputs, with_kwargs=True, prepend=True)
    denoiser.register_forward_hook(gather_output, with_kwargs=True)
