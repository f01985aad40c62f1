"""Hugging Face causal-LM checkpoints: ``config.json`` + ``*.safetensors``, read slice by slice.

A checkpoint directory holds ``config.json`` and either ``model.safetensors`` or shards listed
in ``model.safetensors.index.json`` (plus the tokenizer files). :func:`open_checkpoint`
checks all of it before any worker starts (every file present and readable, every tensor the
model needs present with the right shape) and names the file at fault. In the workers,
:func:`load_parameters` fills a model built on the meta device: each parameter is read from
the slice its ``weight_sources`` entry names, so a rank reads only its own shards.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from distgen.config import ConfigError
from distgen.models.llama import (
    SUPPORTED_ARCHITECTURES,
    CausalLM,
    ModelConfigError,
    TensorSlice,
    TextModelConfig,
    build_model,
)

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG_FILE = "generation_config.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class CheckpointError(ConfigError):
    """A checkpoint directory that cannot be run; the message names the file at fault."""


@dataclass
class Checkpoint:
    directory: str
    config: TextModelConfig
    hf_config: dict
    files: dict[str, str] = field(default_factory=dict)  # tensor name -> safetensors path
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """End-of-sequence ids: generation_config.json's if given, else config.json's."""
        path = os.path.join(self.directory, GENERATION_CONFIG_FILE)
        ids = list(self.config.eos_token_ids)
        if os.path.isfile(path):
            with open(path) as f:
                eos = json.load(f).get("eos_token_id")
            if eos is not None:
                ids = list(eos) if isinstance(eos, (list, tuple)) else [eos]
        return tuple(int(i) for i in ids)


def read_config(directory: str) -> tuple[TextModelConfig, dict]:
    if not os.path.isdir(directory):
        raise CheckpointError(f"--model: {directory!r} is not a directory (expected a Hugging Face checkpoint "
                              "directory with config.json and *.safetensors)")
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"--model: missing {path} (a Hugging Face checkpoint directory has config.json)")
    try:
        with open(path) as f:
            hf = json.load(f)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"--model: cannot read {path}: {exc}") from None
    try:
        return TextModelConfig.from_hf(hf), hf
    except ModelConfigError as exc:
        raise CheckpointError(f"--model {directory}: {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"--model: {path} lacks or has a bad value for {exc}") from None


def _weight_files(directory: str) -> dict[str, str]:
    """tensor name -> file, from the index (sharded) or the single file's header."""
    from safetensors import safe_open

    index_path = os.path.join(directory, INDEX_FILE)
    single_path = os.path.join(directory, SINGLE_FILE)
    if os.path.isfile(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"--model: cannot read the shard index {index_path}: {exc!r}") from None
        return {name: os.path.join(directory, file) for name, file in weight_map.items()}
    if os.path.isfile(single_path):
        try:
            with safe_open(single_path, framework="pt") as f:
                return {name: single_path for name in f.keys()}
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"--model: corrupt safetensors file {single_path}: {exc}") from None
    raise CheckpointError(f"--model: no weights in {directory}: expected {SINGLE_FILE} or {INDEX_FILE} "
                          "with its shards")


def open_checkpoint(directory: str) -> Checkpoint:
    """Read and check a checkpoint directory (cheap: headers only, no tensor data)."""
    from safetensors import safe_open

    directory = os.path.abspath(directory)
    config, hf = read_config(directory)
    files = _weight_files(directory)
    shapes: dict[str, tuple[int, ...]] = {}
    for path in sorted(set(files.values())):
        if not os.path.isfile(path):
            raise CheckpointError(f"--model: missing safetensors file {path} (listed in {INDEX_FILE})")
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    shapes[name] = tuple(f.get_slice(name).get_shape())
        except Exception as exc:
            raise CheckpointError(f"--model: corrupt safetensors file {path}: {exc}") from None
    checkpoint = Checkpoint(directory=directory, config=config, hf_config=hf, files=files, shapes=shapes)
    _check_tensors(checkpoint)
    return checkpoint


def resolve_source(checkpoint: Checkpoint, source: TensorSlice) -> TensorSlice:
    """The source as stored: a per-expert MoE key becomes a slice of the fused expert tensor
    when the checkpoint holds the fused layout (``experts.gate_up_proj`` / ``experts.down_proj``)."""
    if source.key in checkpoint.files or checkpoint.config.moe is None:
        return source
    from distgen.models.moe import fused_source

    fused = fused_source(source, checkpoint.shapes, checkpoint.config.moe.expert_intermediate_size)
    return source if fused is None else fused


def _sliced_shape(shape: tuple[int, ...], source: TensorSlice) -> tuple[int, ...]:
    out = [(r[1] - r[0]) if r is not None else n for r, n in zip(list(source.ranges) + [None] * len(shape), shape)]
    return tuple(out[1:]) if len(source.ranges) and source.key.endswith(("gate_up_proj", "down_proj")) and out[0] == 1 \
        else tuple(out)


def _check_tensors(checkpoint: Checkpoint) -> None:
    """Every tensor the model reads exists, in the file that should hold it, with its shape."""
    model = build_model(checkpoint.config)
    params = dict(model.named_parameters())
    for name, source in model.weight_sources.items():
        if source.key not in checkpoint.files:
            fused = resolve_source(checkpoint, source)
            if fused is not source:
                shape = _sliced_shape(checkpoint.shapes[fused.key], fused)
                if shape != tuple(params[name].shape):
                    raise CheckpointError(f"--model: fused expert tensor {fused.key!r} gives {list(shape)} for "
                                          f"{source.key!r}, config.json implies {list(params[name].shape)}")
                continue
        path = checkpoint.files.get(source.key)
        if path is None:
            raise CheckpointError(f"--model: tensor {source.key!r} is missing from the checkpoint in {checkpoint.directory}")
        shape = checkpoint.shapes.get(source.key)
        if shape is None:
            raise CheckpointError(f"--model: tensor {source.key!r} is missing from {path} (the index says it is there)")
        if shape != tuple(params[name].shape):
            raise CheckpointError(f"--model: tensor {source.key!r} in {path} has shape {list(shape)}, "
                                  f"config.json implies {list(params[name].shape)}")


# ---------------------------------------------------------------------------- loading


def _read_slice(handle, source: TensorSlice, shape: torch.Size, path: str) -> torch.Tensor:
    view = handle.get_slice(source.key)
    full = view.get_shape()
    index, pad = [], []
    for dim, size in enumerate(full):
        rng = source.ranges[dim] if dim < len(source.ranges) else None
        start, stop = (0, size) if rng is None else rng
        index.append(slice(min(start, size), min(stop, size)))
        pad.append(stop - start)
    data = view[tuple(index)] if full else view[:]
    if list(data.shape) != pad:  # rows past the end of the tensor: zero padding
        padded = torch.zeros(pad, dtype=data.dtype)
        padded[tuple(slice(0, n) for n in data.shape)] = data
        data = padded
    if data.dim() == len(shape) + 1 and data.shape[0] == 1:  # one expert of a fused expert tensor
        data = data[0]
    if tuple(data.shape) != tuple(shape):
        raise CheckpointError(f"tensor {source.key!r} slice {source.ranges} of {path} has shape {list(data.shape)}, "
                              f"the parameter needs {list(shape)}")
    return data


def _set_parameter(model: torch.nn.Module, name: str, param: torch.nn.Parameter) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    setattr(owner, attr, param)


def load_parameters(model: CausalLM, checkpoint: Checkpoint, dtype: torch.dtype, device: torch.device) -> None:
    """Materialise every (meta) parameter from its checkpoint slice.

    Parameters with the same source slice become one tensor (tied embedding and head).
    """
    from safetensors import safe_open

    handles: dict[str, object] = {}
    loaded: dict[TensorSlice, torch.nn.Parameter] = {}
    try:
        for name, param in list(model.named_parameters(remove_duplicate=False)):
            source = model.weight_sources.get(name)
            if source is None:
                raise RuntimeError(f"parameter {name} has no checkpoint source (a strategy replaced its module "
                                   "without recording one)")
            source = resolve_source(checkpoint, source)
            shared = loaded.get(source)
            if shared is not None:
                _set_parameter(model, name, shared)
                continue
            path = checkpoint.files[source.key]
            handle = handles.get(path)
            if handle is None:
                try:
                    handle = handles[path] = safe_open(path, framework="pt", device="cpu")
                except Exception as exc:
                    raise CheckpointError(f"corrupt safetensors file {path}: {exc}") from None
            try:
                data = _read_slice(handle, source, param.shape, path)
            except CheckpointError:
                raise
            except Exception as exc:
                raise CheckpointError(f"cannot read tensor {source.key!r} from {path}: {exc}") from None
            new = torch.nn.Parameter(data.to(device=device, dtype=dtype), requires_grad=False)
            _set_parameter(model, name, new)
            loaded[source] = new
    finally:
        handles.clear()


def supported_architectures() -> str:
    return ", ".join(SUPPORTED_ARCHITECTURES)


def load_tokenizer(directory: str):
    from transformers import AutoTokenizer

    files = ("tokenizer.json", "tokenizer_config.json")
    if not any(os.path.isfile(os.path.join(directory, name)) for name in files):
        raise CheckpointError(f"--model {directory}: no tokenizer in the directory (neither {' nor '.join(files)}); "
                              f"text generation needs the checkpoint's tokenizer files next to config.json")
    try:
        return AutoTokenizer.from_pretrained(directory)
    except Exception as exc:  # transformers' own text stays out of the one-line error (see --verbose)
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
        raise CheckpointError(f"--model {directory}: its tokenizer files do not load with transformers "
                              f"({type(exc).__name__}: {first[:160]}); rerun with --verbose for transformers' "
                              f"error") from exc
