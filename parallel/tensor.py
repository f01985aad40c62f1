"""Megatron tensor parallelism for the Llama family (ALGORITHMS.md §6), applied to a plain model.

:func:`apply` shards a :class:`distgen.models.llama.CausalLM` built on the meta device, by
module replacement, and narrows each parameter's ``weight_sources`` entry to the slice this
rank holds, so loading reads only that slice:

* q/k/v and gate/up: column parallel (this rank's heads / intermediate columns);
* o and down: row parallel (bias kept on tp rank 0 only); the partial outputs are summed by
  the layer's ``attn_reduce`` / ``mlp_reduce`` slots, replaced here by :class:`AllReduce`, an
  async all-reduce through the exchange engine. The standard wiring waits it at once; Ladder
  layers wait it one sub-block later (the model's :class:`DecoderLayer` decides);
* embedding and head: vocab parallel, rows padded to a multiple of tp; the embedding's
  partial rows are all-reduced, the head's logit shards all-gathered.

``communicate=False`` skips every all-reduce (wrong output): the speed ceiling a benchmark
compares against. The logits all-gather stays so every rank samples the same token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distgen.comm import ExchangeEngine
from distgen.config import ConfigError
from distgen.models.llama import CausalLM, Ready, TextModelConfig

__all__ = ["AllReduce", "VocabParallelEmbedding", "VocabParallelHead", "apply", "set_communicate", "valid_degrees",
           "validate"]


def valid_degrees(config: TextModelConfig) -> list[int]:
    """tp degrees that split heads, KV heads and MLP columns evenly."""
    return [d for d in range(1, config.num_heads + 1)
            if config.num_heads % d == 0 and config.num_kv_heads % d == 0 and config.intermediate_size % d == 0]


def validate(config: TextModelConfig, tp: int, model_name: str = "the model") -> None:
    if tp == 1:
        return
    problems = []
    if config.num_heads % tp:
        problems.append(f"{config.num_heads} attention heads")
    if config.num_kv_heads % tp:
        problems.append(f"{config.num_kv_heads} KV heads")
    if config.intermediate_size % tp:
        problems.append(f"intermediate size {config.intermediate_size}")
    if problems:
        raise ConfigError(
            f"--parallel tp={tp}: tp must divide the {' and the '.join(problems)} of {model_name}; "
            f"valid tp degrees: {', '.join(map(str, valid_degrees(config)))}"
        )
    if tp > config.vocab_size:
        raise ConfigError(f"--parallel tp={tp}: the vocabulary ({config.vocab_size} rows, padded to a multiple of tp) "
                          "must give every rank at least one row")


class AllReduce(nn.Module):
    """Sum of a sub-block's partial outputs over the tp group, issued asynchronously.

    Returns the engine's Pending (``.wait()`` gives the sum). The partial tensor is a fresh
    output of the row-parallel projection, so nothing writes to it while it is in flight.
    Disabled (benchmark ceiling), it returns the partial sum as it is.
    """

    def __init__(self, engine: ExchangeEngine, enabled: bool = True):
        super().__init__()
        self.engine, self.enabled = engine, enabled

    def forward(self, partial: torch.Tensor):
        return self.engine.all_reduce_async(partial) if self.enabled else Ready(partial)


class VocabParallelEmbedding(nn.Module):
    def __init__(self, rows: int, hidden: int, offset: int, engine: ExchangeEngine, communicate: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, hidden), requires_grad=False)
        self.rows, self.offset = rows, offset
        self.engine, self.communicate = engine, communicate

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.offset
        outside = (local < 0) | (local >= self.rows)
        out = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside[..., None], 0.0)
        return self.engine.all_reduce_async(out).wait() if self.communicate else out


class VocabParallelHead(nn.Module):
    def __init__(self, rows: int, hidden: int, vocab: int, engine: ExchangeEngine):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, hidden), requires_grad=False)
        self.vocab, self.engine = vocab, engine

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        shards = self.engine.all_gather(F.linear(h, self.weight))
        return torch.cat(shards, dim=-1)[..., : self.vocab]


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    owner_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(owner_name) if owner_name else model, attr, module)


def _shard_linear(model: CausalLM, name: str, dim: int, start: int, stop: int, keep_bias: bool) -> None:
    """Replace Linear ``name`` by its [start, stop) slice of output (dim 0) or input (dim 1) features."""
    old: nn.Linear = model.get_submodule(name)
    has_bias = old.bias is not None and (dim == 0 or keep_bias)
    size = stop - start
    shape = (size, old.in_features) if dim == 0 else (old.out_features, size)
    new = nn.Linear(shape[1], shape[0], bias=has_bias, device=old.weight.device, dtype=old.weight.dtype)
    _replace(model, name, new)
    sources = model.weight_sources
    sources[f"{name}.weight"] = sources[f"{name}.weight"].narrow(dim, start, stop)
    if old.bias is not None:
        if dim == 0:
            sources[f"{name}.bias"] = sources[f"{name}.bias"].narrow(0, start, stop)
        elif not has_bias:
            del sources[f"{name}.bias"]


def apply(model: CausalLM, engine: ExchangeEngine, communicate: bool = True) -> None:
    """Shard ``model`` (on the meta device, before loading) over ``engine``'s group."""
    config = model.config
    tp, rank = engine.world, engine.rank
    validate(config, tp)
    hd = config.head_dim
    q_rows = config.num_heads // tp * hd
    kv_rows = config.num_kv_heads // tp * hd
    cols = config.intermediate_size // tp
    for index in model.layer_indices:
        prefix = f"model.layers.{index}"
        _shard_linear(model, f"{prefix}.self_attn.q_proj", 0, rank * q_rows, (rank + 1) * q_rows, True)
        _shard_linear(model, f"{prefix}.self_attn.k_proj", 0, rank * kv_rows, (rank + 1) * kv_rows, True)
        _shard_linear(model, f"{prefix}.self_attn.v_proj", 0, rank * kv_rows, (rank + 1) * kv_rows, True)
        _shard_linear(model, f"{prefix}.self_attn.o_proj", 1, rank * q_rows, (rank + 1) * q_rows, rank == 0)
        layer = model.model.layers[str(index)]
        layer.attn_reduce = AllReduce(engine, communicate)
        if config.moe is not None and config.moe.sparse_layers[index]:
            continue  # MoE block: whole on every rank here; distgen.parallel.expert splits its experts
        _shard_linear(model, f"{prefix}.mlp.gate_proj", 0, rank * cols, (rank + 1) * cols, True)
        _shard_linear(model, f"{prefix}.mlp.up_proj", 0, rank * cols, (rank + 1) * cols, True)
        _shard_linear(model, f"{prefix}.mlp.down_proj", 1, rank * cols, (rank + 1) * cols, rank == 0)
        layer.mlp_reduce = AllReduce(engine, communicate)

    rows = -(-config.vocab_size // tp)  # padded rows per rank; rows past the vocab are zeros
    start, stop = rank * rows, (rank + 1) * rows
    device = next(model.parameters()).device
    if model.model.embed_tokens is not None:
        with torch.device(device):
            model.model.embed_tokens = VocabParallelEmbedding(rows, config.hidden_size, start, engine, communicate)
        key = "model.embed_tokens.weight"
        model.weight_sources[key] = model.weight_sources[key].narrow(0, start, stop)
    if model.lm_head is not None:
        with torch.device(device):
            model.lm_head = VocabParallelHead(rows, config.hidden_size, config.vocab_size, engine)
        key = "lm_head.weight"
        model.weight_sources[key] = model.weight_sources[key].narrow(0, start, stop)


def set_communicate(model: CausalLM, on: bool) -> None:
    """Switch every tp all-reduce on or off (off: the benchmark's no-communication ceiling)."""
    for module in model.modules():
        if isinstance(module, AllReduce):
            module.enabled = on
        elif isinstance(module, VocabParallelEmbedding):
            module.communicate = on
