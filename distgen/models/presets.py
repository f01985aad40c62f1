"""Embedded models by name: what ``--model`` accepts besides a directory, for every workload.

``--model X`` is a directory when ``X`` exists on disk (a directory always wins over a name), else
the name of an embedded model of that workload, built (or converted, or derived) into the cache
on first use and from then on loaded like any checkpoint. ``--preset X``, where a command has it
(the benchmarks, ``generate video``), is an alias of ``--model X`` kept for older command lines.

- image: the trained :data:`distgen.models.trained.TRAINED` models (``shapes-sd`` the default: it draws
  what a shapes prompt says), then the random-weight :data:`distgen.models.tiny.PRESETS` (``tiny-sd``,
  ``tiny-pixart``, ``tiny-sd3``, ``unet-bench``, ``dit-bench``, ``tiny-flux``: tests and benches, where
  random weights are the point)
- video: the trained ``shapes-t2v`` (the default when shipped), then the random-weight
  :data:`distgen.models.tiny_video.VIDEO_PRESETS` (``tiny-t2v``, ``tiny-animatediff``, ``tiny-wan``,
  ``t2v-bench``)
- text: ``smollm2`` (the default, SmolLM2-135M-Instruct), ``distgen-moe`` (a Qwen2-MoE trained from
  scratch, routing learned), ``smollm2-moe`` (derived from SmolLM2 by MoEfication) and
  the random-weight bench Llamas of :data:`distgen.models.tiny_llm.PRESETS` (``llama-bench``,
  ``tiny``; they have no tokenizer: ``distgen bench text`` feeds them token ids)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from distgen.config import ConfigError

WORKLOADS = ("image", "video", "text")


@dataclass(frozen=True)
class ResolvedModel:
    directory: str
    name: str | None = None  # the embedded model's name; None for a user directory
    size: int | tuple[int, int, int] | None = None  # the preset's default image side / (frames, height, width)


def default(workload: str) -> str:
    """The embedded model a command of ``workload`` runs without ``--model``."""
    return names(workload)[0]


def names(workload: str) -> tuple[str, ...]:
    """The embedded model names of a workload, the default first."""
    if workload == "image":
        from distgen.models import trained
        from distgen.models.tiny import PRESETS

        return (*trained.names("image"), *PRESETS)
    if workload == "video":
        from distgen.models import trained
        from distgen.models.tiny_video import VIDEO_PRESETS

        return (*trained.names("video"), *VIDEO_PRESETS)
    if workload == "text":
        from distgen.models import trained
        from distgen.models.smollm2_moe import CLI_NAME
        from distgen.models.tiny_llm import PRESETS

        return ("smollm2", *trained.names("text"), CLI_NAME, *PRESETS)
    raise ValueError(f"unknown workload {workload!r}; one of {', '.join(WORKLOADS)}")


def _build(workload: str, name: str) -> ResolvedModel:
    """The cache directory of an embedded model, building it on first use."""
    from distgen.models import trained

    if name in trained.TRAINED:
        return ResolvedModel(str(trained.trained_dir(name)), name, trained.TRAINED[name].size)
    if workload == "image":
        from distgen.models.tiny import PRESETS, preset_dir

        return ResolvedModel(str(preset_dir(name)), name, PRESETS[name][2])
    if workload == "video":
        from distgen.models.tiny_video import VIDEO_PRESETS, video_preset_dir

        return ResolvedModel(str(video_preset_dir(name)), name, VIDEO_PRESETS[name][2])
    from distgen.models import smollm2_moe, tiny_llm  # module attributes: tests replace the builders

    if name == smollm2_moe.CLI_NAME:
        return ResolvedModel(str(smollm2_moe.smollm2_moe_dir()), name)
    return ResolvedModel(str(tiny_llm.preset_dir(name)), name)


def resolve(workload: str, model: str | None, default: str, preset: str | None = None,
            option: str = "--model") -> ResolvedModel:
    """``--model`` (a directory or an embedded name), else ``--preset`` (its alias), else ``default``.

    A path that exists is returned as it is (the workload's loader says what is wrong with it);
    anything else must be an embedded name of ``workload``, or a ConfigError lists them."""
    allowed = names(workload)
    if model is not None and preset is not None and model != preset:
        raise ConfigError(f"{option} {model} and --preset {preset}: --preset is an alias of {option}; give one")
    value, flag = (model, option) if model is not None else (preset, "--preset") if preset is not None else (default, None)
    if flag is not None and os.path.exists(value):
        return ResolvedModel(value)
    if value in allowed:
        return _build(workload, value)
    if flag is None:  # a caller's default that is not embedded: a bug, not user input
        raise ValueError(f"default {value!r} is not an embedded {workload} model")
    kind = "checkpoint" if workload == "text" else "pipeline"
    raise ConfigError(f"{flag} {value}: does not exist, and is not the name of an embedded {workload} model; give a "
                      f"{kind} directory or one of: {', '.join(allowed)}")
