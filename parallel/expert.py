"""Expert parallelism over an ``ep`` axis (issue 6, ALGORITHMS.md §8) — WORK IN PROGRESS.

Not yet wired into ``distgen.runtime.text`` (see /work/notes/issue6-progress.md). :func:`apply`
replaces every :class:`~distgen.models.moe.MoEBlock` of a meta-device model by an
:class:`ExpertParallelBlock` holding only this rank's physical expert slots (and points their
weight sources at those experts, so the rank reads only them). A placement is
``slots[rank] = [logical expert per slot]`` per layer; an expert may have several replicas.

Forward, per MoE layer: the router (replicated) runs on this rank's tokens; each
(token, choice) goes to one replica of its expert (replicas taken in turn, so a replicated
expert's tokens are spread); send counts are exchanged first (an even all-to-all of one count
per peer), then token rows go out with uneven splits, every rank computes its slots, and the
results come back by the reverse all-to-all and are added, scaled by their routing weights. A
rank with no tokens still takes part in both all-to-alls (zero rows), so nobody hangs.
"""

from __future__ import annotations

import torch
from torch import nn

from distgen.comm import ExchangeEngine
from distgen.config import ConfigError
from distgen.models.moe import MoEBlock, set_block_sources

__all__ = ["ExpertParallelBlock", "apply", "round_robin", "validate"]


def round_robin(num_experts: int, ep: int) -> list[list[int]]:
    """slots[rank]: expert e on rank e % ep (baseline placement, no replicas)."""
    return [[e for e in range(num_experts) if e % ep == rank] for rank in range(ep)]


def validate(num_slots: int, ep: int) -> None:
    if ep > 1 and num_slots % ep:
        raise ConfigError(f"--parallel ep={ep}: ep must divide the number of expert slots ({num_slots}); "
                          f"valid ep degrees: {', '.join(str(d) for d in range(1, num_slots + 1) if num_slots % d == 0)}")


class ExpertParallelBlock(nn.Module):
    def __init__(self, block: MoEBlock, slots: list[list[int]], engine: ExchangeEngine):
        super().__init__()
        rank = engine.rank
        self.inner = MoEBlock(block.gate.in_features, block.spec, slot_experts=slots[rank])
        self.inner.layer = block.layer
        self.engine = engine
        self.set_slots(slots)

    def set_slots(self, slots: list[list[int]]) -> None:
        # replicas[e] = [(rank, local slot), ...]
        self.slots = [list(s) for s in slots]
        self.replicas: dict[int, list[tuple[int, int]]] = {}
        for rank, experts in enumerate(self.slots):
            for slot, e in enumerate(experts):
                self.replicas.setdefault(e, []).append((rank, slot))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        weights, experts = self.inner.routing(x)
        world = self.engine.world
        flat_e = experts.reshape(-1)
        token = torch.arange(x.shape[0], device=x.device).repeat_interleave(experts.shape[1])
        # one replica per (token, choice), replicas in turn
        dest = torch.empty_like(flat_e)
        slot = torch.empty_like(flat_e)
        for e in flat_e.unique().tolist():
            where = (flat_e == e).nonzero().flatten()
            reps = self.replicas[e]
            pick = torch.arange(where.numel(), device=x.device) % len(reps)
            dest[where] = torch.tensor([r for r, _ in reps], device=x.device)[pick]
            slot[where] = torch.tensor([s for _, s in reps], device=x.device)[pick]
        order = torch.argsort(dest, stable=True)
        send_counts = torch.bincount(dest, minlength=world)
        recv_counts = self.engine.all_to_all(send_counts.clone())  # one count per peer
        rows = x[token[order]]
        got = self.engine.all_to_all(rows, send_counts.tolist(), recv_counts.tolist())
        got_slot = self.engine.all_to_all(slot[order], send_counts.tolist(), recv_counts.tolist())
        out_rows = torch.zeros_like(got)
        for s in got_slot.unique().tolist():
            idx = (got_slot == s).nonzero().flatten()
            out_rows[idx] = self.inner.experts[s](got[idx])
        back = self.engine.all_to_all(out_rows, recv_counts.tolist(), send_counts.tolist())
        flat_w = weights.reshape(-1)[order]
        out = torch.zeros_like(x)
        out.index_add_(0, token[order], (back * flat_w[:, None]).to(out.dtype))
        shared = self.inner.shared(x)
        if shared is not None:
            out = out + shared
        return out.reshape(shape)


def apply(model, engine: ExchangeEngine, placement: dict[int, list[list[int]]] | None = None) -> None:
    """Replace each MoE block of ``model`` (meta device) by this rank's expert slots."""
    for index in model.layer_indices:
        layer = model.model.layers[str(index)]
        if not isinstance(layer.mlp, MoEBlock):
            continue
        slots = (placement or {}).get(index) or round_robin(layer.mlp.spec.num_experts, engine.world)
        validate(sum(len(s) for s in slots), engine.world)
        block = ExpertParallelBlock(layer.mlp, slots, engine)
        layer.mlp = block.inner
        # sources for the inner block's slots, then re-prefix them under the wrapper
        set_block_sources(model, index)
        prefix = f"model.layers.{index}.mlp."
        for name in [n for n in model.weight_sources if n.startswith(prefix)]:
            model.weight_sources[prefix + "inner." + name[len(prefix):]] = model.weight_sources.pop(name)
        layer.mlp = block
